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
//! The lesson is a new enrolment; applying it (a new version, with history and rollback) is the caller's.

use image::RgbImage;

use crate::config::detect::DetectConfig;
use crate::detect::detector::Detector;
use crate::detect::enrolment::{Calibration, Enrolment, Thresholds};
use crate::detect::inspection::DetectError;
use crate::enrol::{bank, calibrate};
use crate::util::imageio;

/// What a false-reject lesson would change, and the enrolment it makes.
#[derive(Debug, Clone)]
pub struct Lesson {
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
