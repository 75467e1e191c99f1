//! Automatic thresholds: no threshold is ever set by hand.
//!
//! At enrolment anomalyd scores two sets it makes from the shots alone:
//! - **normal**: nuisance views of each shot (shifts, exposure, noise) and, where it exists, held-out
//!   evidence: each reference scored against a bank of the others (leave one out), or for a texture with
//!   a single shot, each half of the shot against a bank of the other half;
//! - **anomalous**: simulated anomalies made from the shots (foreign patch, cut-paste, Perlin texture).
//!
//! The image threshold and the mask threshold are then chosen from these distributions by the rule
//! written down in [`choose_image_threshold`] and [`choose_pixel_threshold`].
//!
//! Regions an operator set to ignore or to inspect ([`crate::detect::zones`]) take part in every score
//! (they are in the enrolment the scores are taken with), and simulated anomalies are placed where the
//! zones inspect.

use image::RgbImage;

use crate::config::detect::DetectConfig;
use crate::detect::detector::Detector;
use crate::detect::enrolment::{Bank, Calibration, EnrolmentMeta, Thresholds};
use crate::detect::features::{self, Patches};
use crate::detect::inspection::DetectError;
use crate::detect::map::Grid;
use crate::detect::normal::NormalModel;
use crate::detect::zones;
use crate::enrol::bank;
use crate::enrol::synth::{self, Kind};
use crate::util::imageio::{self, Dihedral};
use crate::util::rng::Rng;

/// A shot whose [`stationarity`] ratio is below this is a texture. Measured: textured magnetic tiles
/// 1.70-1.84, the juice bottle (an aligned object) 4.47-4.66, the built-in demo part 2.67.
pub const TEXTURE_RATIO: f32 = 2.2;

/// How position-independent a shot looks. The shot is shifted circularly by a third of its size in
/// both axes and its patches are matched against the unshifted shot twice: near their own place
/// (within [`STATIONARITY_WINDOW`]) and anywhere. A texture looks alike everywhere, so both searches
/// find equally good matches (ratio near 1); an object's moved parts exist only elsewhere, so the
/// positional search is much worse (ratio well above 1). The ratio is of the mean distances.
pub fn stationarity(det: &mut Detector, img: &RgbImage, group: &[Vec<usize>], pool: usize) -> Result<f32, DetectError> {
    let cosine = vec![features::Distance::Cosine; group.len()];
    let reference = det.patches(img, group, pool, &cosine)?.remove(0);
    let (w, h) = img.dimensions();
    let shifted = RgbImage::from_fn(w, h, |x, y| *img.get_pixel((x + w / 3) % w, (y + h / 3) % h));
    let q = det.patches(&shifted, group, pool, &cosine)?.remove(0);
    let (near, _) = features::nearest_within(
        &q.rows,
        &q.pos,
        &reference.rows,
        &reference.pos,
        q.dim,
        STATIONARITY_WINDOW,
        features::Distance::Cosine,
    );
    let (anywhere, _) = features::nearest(&q.rows, &reference.rows, q.dim);
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    Ok(mean(&near) / mean(&anywhere).max(1e-6))
}

/// Window of the positional search in [`stationarity`].
pub const STATIONARITY_WINDOW: f32 = 0.125;

/// Splits an image into two halves across its longer side.
fn split_image(img: &RgbImage) -> [RgbImage; 2] {
    let (w, h) = img.dimensions();
    let crop = |x, y, w, h| image::imageops::crop_imm(img, x, y, w, h).to_image();
    if h >= w {
        [crop(0, 0, w, h / 2), crop(0, h / 2, w, h - h / 2)]
    } else {
        [crop(0, 0, w / 2, h), crop(w / 2, 0, w - w / 2, h)]
    }
}

/// Scores the calibration sets and chooses both thresholds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn calibrate(
    det: &mut Detector,
    meta: &EnrolmentMeta,
    banks: &[Bank],
    per_ref: &[Vec<Patches>],
    prepared: &[RgbImage],
    cfg: &DetectConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<(Thresholds, Calibration), DetectError> {
    let mut rng = Rng::new(cfg.seed);
    let mut cal = Calibration::default();
    let k = prepared.len();
    // Enrolment gives a texture's bank its rotations and flips, and an aligned product's none.
    let texture = meta.augment.len() > 1;
    let mut pixel_samples: Vec<(Grid, Option<image::GrayImage>)> = Vec::new();

    progress(&format!("calibrating: {} nuisance views, {} simulated anomalies", cfg.normal_views, cfg.anomaly_views));
    for v in 0..cfg.normal_views {
        let base = random_view(&prepared[v % k], &meta.augment, &mut rng);
        let view = synth::nuisance(&base, &mut rng, 0.03);
        let s = det.score_prepared(meta, banks, &view)?;
        cal.normal.push(s.score);
        pixel_samples.push((s.map, None));
    }

    // Held-out normal evidence.
    if k >= 2 {
        cal.leave_one_out = true;
        cal.held_out = leave_one_out(det, meta, banks, per_ref, prepared, cfg.max_bank)?;
    } else if texture {
        let halves = split_image(&prepared[0]);
        let mut half_patches = Vec::new();
        for half in &halves {
            half_patches.push(det.reference_patches(meta, half)?);
        }
        cal.held_out = leave_one_out(det, meta, banks, &half_patches, &halves, cfg.max_bank)?;
    }

    cal.anomaly = simulate_anomalies(det, meta, banks, prepared, cfg.anomaly_views, &mut rng, &mut pixel_samples)?;

    let choice = choose_image_threshold(&cal, cfg.false_reject_target);
    let image = choice.threshold;
    let pixel = choose_pixel_threshold(&pixel_samples, image);
    cal.false_reject_target = cfg.false_reject_target;
    cal.model = Some(choice.model);
    cal.evidence = choice.evidence.clone();
    cal.simulated_escape = simulated_escape(&cal.anomaly, image);
    if cal.leave_one_out {
        cal.warnings.extend(unlike_references(&cal, &meta.references));
    }
    if cal.simulated_escape > HIGH_ESCAPE {
        cal.warnings.push(format!(
            "{:.0}% of simulated defects score below the threshold: this product's defects may pass; add shots, \
             or let it learn on the line (camera.learn_parts)",
            100.0 * cal.simulated_escape
        ));
    }
    progress(&format!(
        "thresholds: image {image:.4} ({}: median {:.4}, spread {:.3}, target {:.1}% of good parts), pixel {pixel:.4}; \
         simulated defects passed {:.0}%",
        choice.evidence,
        choice.model.median(),
        choice.model.scale,
        100.0 * cfg.false_reject_target,
        100.0 * cal.simulated_escape
    ));
    for w in &cal.warnings {
        progress(&format!("warning: {w}"));
    }
    Ok((Thresholds { image, pixel, source: "auto".into() }, cal))
}

/// Scores `n` simulated anomalies made from the normal images `bases` (each taking foreign material
/// from the next) against `banks`; their maps and masks join `pixel_samples`.
pub(crate) fn simulate_anomalies(
    det: &mut Detector,
    meta: &EnrolmentMeta,
    banks: &[Bank],
    bases: &[RgbImage],
    n: usize,
    rng: &mut Rng,
    pixel_samples: &mut Vec<(Grid, Option<image::GrayImage>)>,
) -> Result<Vec<f32>, DetectError> {
    let k = bases.len();
    let mut scores = Vec::with_capacity(n);
    for a in 0..n {
        let i = a % k;
        let base = synth::nuisance(&random_view(&bases[i], &meta.augment, rng), rng, 0.03);
        let donor = &bases[(i + 1) % k];
        let donor = imageio::resize(donor, base.width().min(donor.width()), base.height().min(donor.height()));
        let kind = Kind::ALL[a % Kind::ALL.len()];
        // A defect belongs where the operator's zones inspect: placed again (a few times at most) until
        // half of it lies there.
        let mut made = synth::anomaly(&base, &donor, kind, rng);
        for _ in 0..PLACEMENT_TRIES {
            if zones::share_inspected(&meta.zones, &made.1) >= 0.5 {
                break;
            }
            made = synth::anomaly(&base, &donor, kind, rng);
        }
        let (img, mask) = made;
        let s = det.score_prepared(meta, banks, &img)?;
        scores.push(s.score);
        pixel_samples.push((s.map, Some(mask)));
    }
    Ok(scores)
}

/// Placements a simulated defect gets to land where the zones inspect.
const PLACEMENT_TRIES: usize = 16;

/// Scores each part (a reference, or half of one) against a bank built from the other parts.
fn leave_one_out(
    det: &mut Detector,
    meta: &EnrolmentMeta,
    banks: &[Bank],
    patches: &[Vec<Patches>],
    images: &[RgbImage],
    max_bank: usize,
) -> Result<Vec<f32>, DetectError> {
    let strides: Vec<usize> = banks.iter().map(|b| b.stride).collect();
    let mut scores = Vec::with_capacity(images.len());
    for (i, img) in images.iter().enumerate() {
        let others = bank::build_banks(patches, &strides, Some(i), max_bank, &mut |_| {});
        scores.push(det.score_prepared(meta, &others, img)?.score);
    }
    Ok(scores)
}

fn random_view(img: &RgbImage, augment: &[Dihedral], rng: &mut Rng) -> RgbImage {
    let d = augment[rng.below(augment.len() as u32) as usize];
    d.apply(img)
}

/// Above this share of simulated defects passed, enrolment warns that real defects may pass too.
pub const HIGH_ESCAPE: f32 = 0.25;

/// The image threshold and the evidence behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub threshold: f32,
    pub model: NormalModel,
    /// Which scores the model was fitted on, in words.
    pub evidence: String,
}

/// The image threshold rule: the `1 - target` quantile of a [`NormalModel`] of good parts' scores.
///
/// Held-out scores (each reference against a bank of the others, or a single texture shot's halves
/// against each other) are real part-to-part variation, so wherever there are two or more they alone
/// place the model. Its spread needs [`MIN_HELD_OUT_FOR_SPREAD`] of them: with fewer (two halves, two or
/// three shots) the nuisance views' spread stands in. Without held-out scores (one aligned shot) the
/// model is the nuisance views' own. docs/CALIBRATION.md gives the measurements: nuisance views score far
/// below real parts and spread more than they do, so they never place a model that held-out scores can.
pub fn choose_image_threshold(cal: &Calibration, target: f64) -> Choice {
    let n = cal.held_out.len();
    let (model, evidence) = if n >= MIN_HELD_OUT_FOR_SPREAD {
        (NormalModel::fit(&cal.held_out, MIN_SPREAD), format!("{n} held-out scores"))
    } else if n >= 2 {
        let spread = nuisance_spread(&cal.normal);
        (NormalModel::fit(&cal.held_out, spread), format!("{n} held-out scores, spread of the nuisance views"))
    } else {
        let all: Vec<f32> = cal.normal.iter().chain(&cal.held_out).copied().collect();
        (NormalModel::fit(&all, MIN_SPREAD), format!("{} nuisance views", all.len()))
    };
    let model = model.unwrap_or(NormalModel { location: 0.0, scale: MIN_SPREAD, samples: 0, inliers: 0 });
    Choice { threshold: model.threshold(target), model, evidence }
}

/// Fewer held-out scores than this cannot estimate a spread (the MAD of two or three values is one gap).
pub const MIN_HELD_OUT_FOR_SPREAD: usize = 4;

/// The spread (log units) of nuisance views' scores: the least two good parts can differ.
fn nuisance_spread(normal: &[f32]) -> f64 {
    NormalModel::fit(normal, MIN_SPREAD).map_or(MIN_SPREAD, |m| m.scale)
}

/// No model is narrower than this (1% of the score), so identical scores still leave room.
pub const MIN_SPREAD: f64 = 0.01;

/// Share of simulated-anomaly scores below `threshold`.
pub fn simulated_escape(anomaly: &[f32], threshold: f32) -> f32 {
    if anomaly.is_empty() {
        return f32::NAN;
    }
    anomaly.iter().filter(|&&s| s < threshold).count() as f32 / anomaly.len() as f32
}

/// References whose leave-one-out score is an outlier of the model of the others' scores: a warning
/// each, with its evidence. A reference is the user's word that a part is good, so it stays. The others
/// are too few to estimate a spread, so the nuisance views' stands in.
pub fn unlike_references(cal: &Calibration, names: &[String]) -> Vec<String> {
    let floor = nuisance_spread(&cal.normal);
    let mut out = Vec::new();
    for (i, &s) in cal.held_out.iter().enumerate() {
        let others: Vec<f32> = cal.held_out.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, v)| *v).collect();
        let Some(m) = NormalModel::fit(&others, floor) else { continue };
        if m.is_outlier(s) {
            out.push(format!(
                "reference {} does not look like the others: scored against them it gets {s:.4}, {:.1} spreads \
                 above their median {:.4}; is it the same product, framed the same way?",
                names.get(i).map_or("?", |n| n.as_str()),
                m.sigmas(s),
                m.median()
            ));
        }
    }
    out
}

/// The mask threshold: the value that maximises pixel F1 on the simulated anomalies (their masks are
/// the positives; normal views contribute negatives), never below the image threshold's scale floor.
pub fn choose_pixel_threshold(samples: &[(Grid, Option<image::GrayImage>)], image_threshold: f32) -> f32 {
    const BINS: usize = 512;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for (g, _) in samples {
        for &v in &g.data {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return image_threshold;
    }
    let bin = |v: f32| (((v - lo) / (hi - lo) * (BINS - 1) as f32) as usize).min(BINS - 1);
    let (mut pos, mut neg) = (vec![0u64; BINS], vec![0u64; BINS]);
    for (g, mask) in samples {
        for (i, &v) in g.data.iter().enumerate() {
            let is_pos = mask.as_ref().is_some_and(|m| {
                let (x, y) = ((i % g.w) as u32, (i / g.w) as u32);
                x < m.width() && y < m.height() && m.get_pixel(x, y).0[0] > 127
            });
            if is_pos { pos[bin(v)] += 1 } else { neg[bin(v)] += 1 }
        }
    }
    let total_pos: u64 = pos.iter().sum();
    let (mut tp, mut fp) = (0u64, 0u64);
    let (mut best, mut best_t) = (-1.0f64, hi);
    // Sweep from the top: everything in bins >= b is predicted positive.
    for b in (0..BINS).rev() {
        tp += pos[b];
        fp += neg[b];
        let f1 = if tp == 0 { 0.0 } else { 2.0 * tp as f64 / (2 * tp + fp + (total_pos - tp)) as f64 };
        if f1 > best {
            best = f1;
            best_t = lo + (hi - lo) * b as f32 / (BINS - 1) as f32;
        }
    }
    best_t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::map::quantile;

    #[test]
    fn quantiles_interpolate() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn held_out_scores_give_the_threshold_when_there_are_two_or_more() {
        // Nuisance views sit low and tight; held-out references spread more and decide.
        let cal = Calibration {
            normal: vec![0.10, 0.11, 0.12, 0.10],
            held_out: vec![0.30, 0.40, 0.35, 0.32],
            anomaly: vec![0.2, 0.9],
            ..Default::default()
        };
        let c = choose_image_threshold(&cal, 0.05);
        assert!(c.threshold > 0.40, "{c:?}");
        assert!(c.evidence.contains("held-out"), "{c:?}");
        // A stricter target (fewer good parts rejected) raises it.
        assert!(choose_image_threshold(&cal, 0.01).threshold > c.threshold);
    }

    #[test]
    fn nuisance_views_give_the_threshold_without_held_out_evidence() {
        let cal = Calibration { normal: vec![0.10, 0.12, 0.11, 0.13, 0.09], ..Default::default() };
        let c = choose_image_threshold(&cal, 0.05);
        assert!(c.threshold > 0.12 && c.threshold < 0.2, "{c:?}");
        assert!(c.evidence.contains("nuisance"), "{c:?}");
    }

    #[test]
    fn simulated_escape_counts_anomalies_below_the_threshold() {
        assert_eq!(simulated_escape(&[0.1, 0.5, 0.9, 1.0], 0.6), 0.5);
        assert!(simulated_escape(&[], 0.6).is_nan());
    }

    #[test]
    fn pixel_threshold_separates_masked_pixels() {
        let mut mask = image::GrayImage::new(4, 1);
        mask.put_pixel(3, 0, image::Luma([255]));
        let samples =
            vec![(Grid::new(4, 1, vec![0.1, 0.2, 0.15, 0.9]), Some(mask)), (Grid::new(4, 1, vec![0.3; 4]), None)];
        let t = choose_pixel_threshold(&samples, 0.5);
        assert!(t > 0.3 && t <= 0.9, "{t}");
    }

    #[test]
    fn a_reference_unlike_the_others_is_a_warning_with_its_evidence() {
        let cal = Calibration {
            normal: vec![0.10, 0.11, 0.12],
            held_out: vec![0.30, 0.31, 0.29, 0.90],
            leave_one_out: true,
            ..Default::default()
        };
        let names: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let w = unlike_references(&cal, &names);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("reference d") && w[0].contains("0.9000"), "{w:?}");
    }
}
