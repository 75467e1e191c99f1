//! The model of a product's normal variation: how good parts' image scores spread.
//!
//! Image scores are positive and right-skewed (a mean of the largest patch distances), so the model
//! works on their logarithms. Location and scale are the median and the normalised median absolute
//! deviation, which ignore up to half the sample; values more than [`OUTLIER_SIGMAS`] scales above the
//! location are then set aside and the two are estimated again, until nothing changes. What is set
//! aside is an outlier: a defect among unlabelled parts, or a reference unlike the others.
//!
//! The threshold for a false-reject target `f` is the model's `1 - f` quantile: a good part is
//! rejected with probability `f` if good parts' log-scores are normal with that location and scale.
//! docs/CALIBRATION.md gives the measurements behind this choice.

use serde::{Deserialize, Serialize};

/// Scores this many scales above the location are outliers (about 1 in 740 good parts under the model).
pub const OUTLIER_SIGMAS: f64 = 3.0;

/// MAD times this estimates the standard deviation of a normal distribution.
const MAD_TO_SIGMA: f64 = 1.4826;

/// A robust log-normal model of good parts' image scores.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct NormalModel {
    /// Median of the inliers' log-scores.
    pub location: f64,
    /// Spread of the inliers' log-scores (normalised MAD), never below the floor it was fitted with.
    pub scale: f64,
    /// How many scores the model was fitted on, and how many of them were inliers.
    pub samples: usize,
    pub inliers: usize,
}

impl NormalModel {
    /// Fits the model to `scores` (non-positive and non-finite ones are ignored), with the scale held at
    /// or above `min_scale` (in log units). None without a usable score.
    pub fn fit(scores: &[f32], min_scale: f64) -> Option<Self> {
        let logs: Vec<f64> = scores.iter().filter(|s| s.is_finite() && **s > 0.0).map(|&s| (s as f64).ln()).collect();
        if logs.is_empty() {
            return None;
        }
        let mut keep = logs.clone();
        let (mut location, mut scale) = robust(&keep, min_scale);
        // Set aside high outliers and estimate again; each round only removes, so this ends.
        loop {
            let limit = location + OUTLIER_SIGMAS * scale;
            let next: Vec<f64> = logs.iter().copied().filter(|&x| x <= limit).collect();
            if next.len() == keep.len() || next.is_empty() {
                break;
            }
            keep = next;
            (location, scale) = robust(&keep, min_scale);
        }
        Some(Self { location, scale, samples: logs.len(), inliers: keep.len() })
    }

    /// The model of every score as it is, with no outlier set aside (what a guard-less learner sees).
    pub fn fit_all(scores: &[f32], min_scale: f64) -> Option<Self> {
        let logs: Vec<f64> = scores.iter().filter(|s| s.is_finite() && **s > 0.0).map(|&s| (s as f64).ln()).collect();
        if logs.is_empty() {
            return None;
        }
        let n = logs.len() as f64;
        let mean = logs.iter().sum::<f64>() / n;
        let sd = (logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        Some(Self { location: mean, scale: sd.max(min_scale), samples: logs.len(), inliers: logs.len() })
    }

    /// The score that good parts exceed with probability `target` under the model.
    pub fn threshold(&self, target: f64) -> f32 {
        (self.location + normal_quantile(1.0 - target.clamp(1e-6, 0.5)) * self.scale).exp() as f32
    }

    /// How many scales above the location a score lies.
    pub fn sigmas(&self, score: f32) -> f64 {
        if score <= 0.0 {
            return f64::NEG_INFINITY;
        }
        ((score as f64).ln() - self.location) / self.scale
    }

    /// Whether a score lies beyond [`OUTLIER_SIGMAS`] scales above the location.
    pub fn is_outlier(&self, score: f32) -> bool {
        self.sigmas(score) > OUTLIER_SIGMAS
    }

    /// The median score.
    pub fn median(&self) -> f32 {
        self.location.exp() as f32
    }
}

/// Median and normalised MAD of `v` (not empty), the scale floored at `min_scale`.
fn robust(v: &[f64], min_scale: f64) -> (f64, f64) {
    let m = median(v);
    let dev: Vec<f64> = v.iter().map(|x| (x - m).abs()).collect();
    (m, (MAD_TO_SIGMA * median(&dev)).max(min_scale))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { 0.5 * (s[n / 2 - 1] + s[n / 2]) }
}

/// The standard normal quantile (Acklam's rational approximation, relative error below 1.2e-9).
#[allow(clippy::excessive_precision)] // Acklam's published coefficients, as published.
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] =
        [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantile_matches_tables() {
        for (p, z) in [(0.5, 0.0), (0.95, 1.644854), (0.99, 2.326348), (0.01, -2.326348), (0.999, 3.090232)] {
            assert!((normal_quantile(p) - z).abs() < 1e-5, "{p}: {}", normal_quantile(p));
        }
    }

    /// Log-normal scores with location ln 1 and scale 0.1, at evenly spaced quantiles.
    fn lognormal(n: usize) -> Vec<f32> {
        (0..n).map(|i| (0.1 * normal_quantile((i as f64 + 0.5) / n as f64)).exp() as f32).collect()
    }

    #[test]
    fn threshold_is_the_target_quantile() {
        let m = NormalModel::fit(&lognormal(200), 0.0).unwrap();
        assert!(m.location.abs() < 1e-3, "{m:?}");
        assert!((m.scale - 0.1).abs() < 0.005, "{m:?}");
        // 5% of good parts above: exp(1.645 * 0.1).
        assert!((m.threshold(0.05) - 1.1788).abs() < 0.01, "{}", m.threshold(0.05));
        assert!(m.threshold(0.01) > m.threshold(0.05));
        assert_eq!(m.inliers, 200);
    }

    #[test]
    fn a_third_of_defects_do_not_lift_the_threshold_above_them() {
        // 70 good parts around 1.0 and 30 defects at 2-3x: the defects are set aside, and the threshold
        // stays below every one of them. A plain quantile of the mixture would sit among the defects.
        let mut scores = lognormal(70);
        scores.extend((0..30).map(|i| 2.0 + i as f32 / 30.0));
        let m = NormalModel::fit(&scores, 0.0).unwrap();
        assert_eq!(m.inliers, 70, "{m:?}");
        assert!(m.threshold(0.05) < 1.3, "{}", m.threshold(0.05));
        let mut sorted = scores.clone();
        sorted.sort_by(f32::total_cmp);
        assert!(sorted[94] > 2.0, "the 95% quantile of the mixture lies among the defects");
        assert!(scores[70..].iter().all(|&s| m.is_outlier(s)));
    }

    #[test]
    fn scale_floor_holds_for_identical_scores() {
        let m = NormalModel::fit(&[0.5; 8], 0.05).unwrap();
        assert_eq!(m.scale, 0.05);
        assert!(m.threshold(0.05) > 0.5);
        assert!(NormalModel::fit(&[], 0.05).is_none());
        assert!(NormalModel::fit(&[0.0, f32::NAN], 0.05).is_none());
    }
}
