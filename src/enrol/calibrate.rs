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

use image::RgbImage;

use crate::config::detect::DetectConfig;
use crate::detect::detector::Detector;
use crate::detect::enrolment::{Bank, Calibration, EnrolmentMeta, Thresholds};
use crate::detect::features::{self, Patches};
use crate::detect::inspection::DetectError;
use crate::detect::map::{Grid, quantile};
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

    for a in 0..cfg.anomaly_views {
        let i = a % k;
        let base = synth::nuisance(&random_view(&prepared[i], &meta.augment, &mut rng), &mut rng, 0.03);
        let donor = &prepared[(i + 1) % k];
        let donor = imageio::resize(donor, base.width().min(donor.width()), base.height().min(donor.height()));
        let kind = Kind::ALL[a % Kind::ALL.len()];
        let (img, mask) = synth::anomaly(&base, &donor, kind, &mut rng);
        let s = det.score_prepared(meta, banks, &img)?;
        cal.anomaly.push(s.score);
        pixel_samples.push((s.map, Some(mask)));
    }

    let image = choose_image_threshold(&cal);
    let pixel = choose_pixel_threshold(&pixel_samples, image);
    progress(&format!(
        "thresholds: image {image:.4} (normal max {:.4}, held-out {:?}, anomaly median {:.4}), pixel {pixel:.4}",
        quantile(&cal.normal, 1.0),
        cal.held_out.iter().map(|v| (v * 1e4).round() / 1e4).collect::<Vec<_>>(),
        cal.anomaly_median()
    ));
    Ok((Thresholds { image, pixel, source: "auto".into() }, cal))
}

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

/// The image threshold rule.
///
/// `n_hi` is the highest normal evidence: the largest nuisance-view score, raised to the largest
/// held-out score where one exists (held-out references see real part-to-part variation that nuisance
/// views of one shot cannot). `a_lo` is the 25th percentile of the simulated-anomaly scores. The
/// threshold is the midpoint of the two when they are ordered; when simulated anomalies score below
/// normal evidence the shots cannot separate them, and the threshold sits just above the normal evidence.
pub fn choose_image_threshold(cal: &Calibration) -> f32 {
    let mut n_hi = quantile(&cal.normal, 1.0);
    if let Some(h) = cal.held_out.iter().copied().reduce(f32::max) {
        n_hi = n_hi.max(h);
    }
    let a_lo = quantile(&cal.anomaly, 0.25);
    if a_lo > n_hi { 0.5 * (n_hi + a_lo) } else { n_hi * 1.05 }
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

    #[test]
    fn quantiles_interpolate() {
        let v = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert_eq!(quantile(&v, 0.5), 2.5);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn image_threshold_sits_between_separated_sets() {
        let cal = Calibration { normal: vec![0.1, 0.2], anomaly: vec![0.5, 0.6, 0.7, 0.8], ..Default::default() };
        let t = choose_image_threshold(&cal);
        assert!(t > 0.2 && t < 0.575, "{t}");
        // Held-out evidence raises the normal side.
        let cal = Calibration { held_out: vec![0.4], ..cal };
        assert!(choose_image_threshold(&cal) > 0.4);
    }

    #[test]
    fn image_threshold_above_normal_when_sets_overlap() {
        let cal = Calibration { normal: vec![0.3, 0.5], anomaly: vec![0.2, 0.25, 0.3, 0.9], ..Default::default() };
        assert!(choose_image_threshold(&cal) > 0.5);
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
    fn outlier_reference_is_found_only_with_leave_one_out() {
        let cal = Calibration {
            held_out: vec![0.1, 0.9],
            anomaly: vec![0.5, 0.6],
            leave_one_out: true,
            ..Default::default()
        };
        assert_eq!(cal.outlier(), Some((1, 0.9)));
        let cal = Calibration { leave_one_out: false, ..cal };
        assert_eq!(cal.outlier(), None);
    }
}
