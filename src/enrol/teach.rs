//! Teaching by an operator: a part the detector rejected is declared good (a false reject).
//!
//! The model is a memory bank with calibrated thresholds, so a lesson needs no training:
//! 1. **Evidence.** The part's score under the enrolment that rejected it is a held-out score of a good
//!    part (the bank has never seen it): it joins the calibration's held-out scores, and the image
//!    threshold is chosen again by the same rule as at enrolment ([`calibrate::choose_image_threshold`]),
//!    at the enrolment's false-reject target. The rule's model is robust, so one part moves the
//!    threshold only as far as the other evidence allows.
//! 2. **Appearance.** The part's patches join the bank ([`bank::grow`]: farthest from the bank first),
//!    bounded by `detect.max_bank`, so a part like it matches there and scores low.
//!
//! Regions to ignore or to inspect ([`zones`]) are the other lesson: the enrolment takes the zones, and
//! its thresholds are calibrated again with them from the product's reference images when they are at
//! hand (the nuisance views, the held-out references and the simulated defects are all scored with the
//! zones, and the defects placed where they inspect). Without the images the thresholds are kept and a
//! warning says so: masking only lowers scores, so no part that passed is rejected after the lesson.
//!
//! A labelled region ([`label`]) joins the product's library of defect classes
//! ([`crate::detect::classes`]): its descriptor, measured on the frame and its anomaly map under the
//! enrolment, becomes an example that new regions are labelled from.
//!
//! A lesson is a new enrolment; applying it (a new version, with history and rollback) is the caller's.

use image::RgbImage;

use crate::config::detect::DetectConfig;
use crate::detect::detector::Detector;
use crate::detect::enrolment::{Calibration, Enrolment, Thresholds};
use crate::detect::inspection::DetectError;
use crate::detect::zones::{self, Zone};
use crate::enrol::{bank, calibrate};
use crate::util::imageio;

/// What the operator taught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LessonKind {
    /// A rejected part is good.
    FalseReject,
    /// Regions to ignore or to inspect.
    Zones,
}

impl LessonKind {
    /// The action's name in the audit log and the versions' history.
    pub fn action(self) -> &'static str {
        match self {
            LessonKind::FalseReject => "false_reject",
            LessonKind::Zones => "zones",
        }
    }
}

/// What a lesson would change, and the enrolment it makes.
#[derive(Debug, Clone)]
pub struct Lesson {
    pub kind: LessonKind,
    pub enrolment: Enrolment,
    pub threshold_before: f32,
    pub threshold_after: f32,
    /// The part's score under the enrolment before and after the lesson.
    pub score_before: f32,
    pub score_after: f32,
    /// Rows of the first bank layer before and after.
    pub bank_before: usize,
    pub bank_after: usize,
    /// What the new threshold was fitted on, in words.
    pub evidence: String,
}

impl Lesson {
    /// True when the part itself would now pass.
    pub fn part_passes(&self) -> bool {
        self.score_after < self.threshold_after
    }
}

/// The lesson "this part is good" for `enrolment`, from the part's image as captured.
pub fn false_reject(
    det: &mut Detector,
    enrolment: &Enrolment,
    img: &RgbImage,
    cfg: &DetectConfig,
) -> Result<Lesson, DetectError> {
    let meta = &enrolment.meta;
    let score_before = det.inspect(enrolment, img)?.verdict.score;
    let (w, h) = meta.geometry.input_size(img.width(), img.height());
    let part = imageio::resize(img, w, h);
    let patches = det.patches(&part, &meta.groups, meta.pool, &meta.distances)?;
    let bank_before = enrolment.banks.first().map_or(0, |b| b.len());
    // Room for every patch of the part, within the bank bound; a full bank learns the score only.
    let part_rows = patches.first().map_or(0, |p| p.pos.len());
    let limit = cfg.max_bank.min(bank_before + part_rows).max(bank_before);
    let banks = bank::grow(&enrolment.banks, &[patches], meta.window, &meta.distances, limit);
    let target = if meta.calibration.false_reject_target > 0.0 {
        meta.calibration.false_reject_target
    } else {
        cfg.false_reject_target
    };
    let mut cal: Calibration = meta.calibration.clone();
    cal.held_out.push(score_before);
    let choice = calibrate::choose_image_threshold(&cal, target);
    cal.model = Some(choice.model);
    cal.evidence = format!("{} (the last one a part an operator declared good)", choice.evidence);
    let mut new_meta = meta.clone();
    new_meta.thresholds = Thresholds { image: choice.threshold, pixel: meta.thresholds.pixel, source: "taught".into() };
    new_meta.calibration = cal;
    let taught = Enrolment::new(new_meta, banks);
    let score_after = det.inspect(&taught, img)?.verdict.score;
    Ok(Lesson {
        kind: LessonKind::FalseReject,
        threshold_before: meta.thresholds.image,
        threshold_after: choice.threshold,
        score_before,
        score_after,
        bank_before,
        bank_after: taught.banks.first().map_or(0, |b| b.len()),
        evidence: choice.evidence,
        enrolment: taught,
    })
}

/// The lesson "ignore these regions, inspect those" for `enrolment`, shown on the frame `img`. With the
/// product's reference images (`references`, as enrolled), the thresholds are calibrated again with the
/// zones; without them they are kept, with a warning.
pub fn zones(
    det: &mut Detector,
    enrolment: &Enrolment,
    img: &RgbImage,
    zones: &[Zone],
    references: Option<&[RgbImage]>,
    cfg: &DetectConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Lesson, DetectError> {
    zones::check(zones)?;
    let meta = &enrolment.meta;
    let score_before = det.inspect(enrolment, img)?.verdict.score;
    let mut new_meta = meta.clone();
    new_meta.zones = zones.to_vec();
    let (thresholds, cal, evidence) = match references.filter(|r| !r.is_empty()) {
        Some(refs) => {
            let prepared: Vec<RgbImage> = refs
                .iter()
                .map(|r| {
                    let (w, h) = meta.geometry.input_size(r.width(), r.height());
                    imageio::resize(r, w, h)
                })
                .collect();
            let mut per_ref = Vec::with_capacity(prepared.len());
            for p in &prepared {
                per_ref.push(det.reference_patches(&new_meta, p)?);
            }
            let target = if meta.calibration.false_reject_target > 0.0 {
                meta.calibration.false_reject_target
            } else {
                cfg.false_reject_target
            };
            let cfg = DetectConfig { false_reject_target: target, ..cfg.clone() };
            let (mut th, mut cal) =
                calibrate::calibrate(det, &new_meta, &enrolment.banks, &per_ref, &prepared, &cfg, progress)?;
            th.source = "zones".into();
            cal.stationarity = meta.calibration.stationarity;
            cal.learned_parts = meta.calibration.learned_parts;
            cal.refused_parts = meta.calibration.refused_parts;
            if meta.calibration.learned_parts > 0 {
                cal.warnings.push(format!(
                    "the thresholds were calibrated again on the {} reference(s) with the zones; the {} parts learned \
                     on the line were scored without them, so their scores are not evidence any more",
                    prepared.len(),
                    meta.calibration.learned_parts
                ));
            }
            let evidence = format!("{}, scored with the zones", cal.evidence);
            (th, cal, evidence)
        }
        None => {
            let mut cal = meta.calibration.clone();
            cal.warnings.push(
                "the zones were set after enrolment and the reference images are not at hand: the thresholds are \
                 kept. Masking only lowers scores, so no part that passed is rejected now; enrol again from \
                 images to calibrate with the zones"
                    .into(),
            );
            let evidence = "the thresholds before the zones (no reference images at hand)".to_string();
            (Thresholds { source: "zones".into(), ..meta.thresholds.clone() }, cal, evidence)
        }
    };
    new_meta.thresholds = thresholds;
    new_meta.calibration = cal;
    let taught = Enrolment { meta: new_meta, ..enrolment.clone() };
    let score_after = det.inspect(&taught, img)?.verdict.score;
    let bank = enrolment.banks.first().map_or(0, |b| b.len());
    Ok(Lesson {
        kind: LessonKind::Zones,
        threshold_before: meta.thresholds.image,
        threshold_after: taught.meta.thresholds.image,
        score_before,
        score_after,
        bank_before: bank,
        bank_after: bank,
        evidence,
        enrolment: taught,
    })
}

/// The lesson "this region of the frame `img` is a `label`": the region's descriptor (on the frame's
/// anomaly map under `enrolment`) joins the product's library of defect classes.
pub fn label(
    det: &mut Detector,
    enrolment: &Enrolment,
    img: &RgbImage,
    region: &crate::types::findings::Region,
    label: &str,
    frame_id: &str,
    by: &str,
) -> Result<Enrolment, DetectError> {
    use crate::detect::classes;
    let label = classes::clean_label(label)?;
    if enrolment.meta.classes.len() >= classes::MAX_EXAMPLES {
        return Err(classes::ClassError::Full.into());
    }
    let ins = det.inspect(enrolment, img)?;
    let descriptor = classes::describe(img, &ins.map, region, enrolment.meta.thresholds.pixel);
    let mut meta = enrolment.meta.clone();
    meta.classes.push(classes::Example { label, descriptor, frame_id: frame_id.into(), by: by.into() });
    Ok(Enrolment { meta, ..enrolment.clone() })
}
