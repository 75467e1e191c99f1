//! Evaluation metrics as the anomaly-detection papers compute them: AUROC (image and pixel), PRO
//! (area under the per-region-overlap curve up to 30% FPR, normalised), F1-max, and accuracy.

/// Area under the ROC curve of `scores` against `labels` (true = anomalous), by the rank-sum
/// (Mann-Whitney) formula with ties counted half. NaN when one class is missing.
pub fn auroc(scores: &[f32], labels: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut n_pos) = (0.0f64, 0u64);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their mean.
        let mean_rank = (i + j + 2) as f64 / 2.0;
        for &k in &idx[i..=j] {
            if labels[k] {
                rank_sum += mean_rank;
                n_pos += 1;
            }
        }
        i = j + 1;
    }
    let n_neg = scores.len() as u64 - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return f64::NAN;
    }
    (rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0) / (n_pos as f64 * n_neg as f64)
}

/// Largest F1 over all thresholds (anomalous = positive).
pub fn f1_max(scores: &[f32], labels: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let total_pos = labels.iter().filter(|&&l| l).count() as f64;
    if total_pos == 0.0 {
        return f64::NAN;
    }
    let (mut tp, mut fp, mut best) = (0.0f64, 0.0f64, 0.0f64);
    let mut i = 0;
    while i < idx.len() {
        // Threshold between distinct scores only.
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if labels[idx[i]] {
                tp += 1.0
            } else {
                fp += 1.0
            }
            i += 1;
        }
        best = best.max(2.0 * tp / (2.0 * tp + fp + (total_pos - tp)));
    }
    best
}

/// Fraction of verdicts that agree with the labels.
pub fn accuracy(verdicts: &[bool], labels: &[bool]) -> f64 {
    if verdicts.is_empty() {
        return f64::NAN;
    }
    verdicts.iter().zip(labels).filter(|(v, l)| v == l).count() as f64 / verdicts.len() as f64
}

/// How a verdict rule does at the operating point a plant cares about, from per-image scores, verdicts
/// and labels (anomalous = true). The same definitions as `shared/tools/calib-check.py`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OperatingPoint {
    /// Share of good images judged NG.
    pub frr: f64,
    /// Share of defective images judged OK.
    pub escape: f64,
    /// The escape rate of the best threshold in hindsight that flags at most `target` of the good images
    /// (an image is flagged when its score is above the threshold).
    pub best_escape: f64,
    /// The accuracy of the best threshold in hindsight.
    pub hindsight_accuracy: f64,
}

/// The [`OperatingPoint`] of `verdicts` at a false-reject target; NaN where a class is missing.
pub fn operating_point(scores: &[f32], verdicts: &[bool], labels: &[bool], target: f64) -> OperatingPoint {
    let share = |want: bool, verdict: bool| {
        let of: Vec<bool> = verdicts.iter().zip(labels).filter(|(_, l)| **l == want).map(|(v, _)| *v).collect();
        if of.is_empty() { f64::NAN } else { of.iter().filter(|v| **v == verdict).count() as f64 / of.len() as f64 }
    };
    let mut good: Vec<f32> = scores.iter().zip(labels).filter(|(_, l)| !**l).map(|(s, _)| *s).collect();
    let bad: Vec<f32> = scores.iter().zip(labels).filter(|(_, l)| **l).map(|(s, _)| *s).collect();
    good.sort_by(f32::total_cmp);
    // Good images allowed above the threshold; the threshold sits on the next highest good score.
    let k = (target * good.len() as f64 + 1e-9).floor() as usize;
    let t = if k < good.len() { good[good.len() - 1 - k] } else { f32::NEG_INFINITY };
    let best_escape =
        if bad.is_empty() { f64::NAN } else { bad.iter().filter(|s| **s <= t).count() as f64 / bad.len() as f64 };
    let mut cuts: Vec<f32> = scores.to_vec();
    cuts.sort_by(f32::total_cmp);
    cuts.dedup();
    let below = cuts.first().map(|c| c - 1.0);
    let hindsight_accuracy = below
        .into_iter()
        .chain(cuts.iter().copied())
        .map(|c| {
            let right = scores.iter().zip(labels).filter(|(s, l)| (**s > c) == **l).count();
            right as f64 / scores.len() as f64
        })
        .fold(f64::NAN, f64::max);
    OperatingPoint { frr: share(false, true), escape: share(true, false), best_escape, hindsight_accuracy }
}

/// Accumulates pixel scores for PRO: the scores of every normal pixel, and per ground-truth region
/// (8-connected component of one image's mask) the scores of its pixels.
#[derive(Debug, Default)]
pub struct ProAccumulator {
    normal: Vec<f32>,
    regions: Vec<Vec<f32>>,
}

impl ProAccumulator {
    /// Adds one image's map and its binary mask (same length, row-major `w` wide).
    pub fn add(&mut self, map: &[f32], mask: &[bool], w: usize) {
        let h = map.len() / w.max(1);
        let mut seen = vec![false; map.len()];
        for i in 0..map.len() {
            if !mask[i] {
                self.normal.push(map[i]);
                continue;
            }
            if seen[i] {
                continue;
            }
            let mut region = Vec::new();
            let mut stack = vec![i];
            seen[i] = true;
            while let Some(p) = stack.pop() {
                region.push(map[p]);
                let (x, y) = ((p % w) as isize, (p / w) as isize);
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (nx, ny) = (x + dx, y + dy);
                        if nx >= 0 && ny >= 0 && (nx as usize) < w && (ny as usize) < h {
                            let q = ny as usize * w + nx as usize;
                            if mask[q] && !seen[q] {
                                seen[q] = true;
                                stack.push(q);
                            }
                        }
                    }
                }
            }
            self.regions.push(region);
        }
    }

    /// Normalised area under the PRO-vs-FPR curve for FPR in `[0, max_fpr]` (the papers use 0.3).
    /// Thresholds are the normal-pixel quantiles at `steps` evenly spaced FPRs; NaN without regions.
    pub fn aupro(mut self, max_fpr: f64, steps: usize) -> f64 {
        if self.regions.is_empty() || self.normal.is_empty() {
            return f64::NAN;
        }
        self.normal.sort_by(f32::total_cmp);
        self.regions.iter_mut().for_each(|r| r.sort_by(f32::total_cmp));
        let n = self.normal.len();
        // Counts of normal pixels above the threshold: evenly spaced FPRs, plus the first count at or past
        // max_fpr so that the curve can be cut exactly there.
        let mut counts: Vec<usize> =
            (0..=steps).map(|s| ((max_fpr * s as f64 / steps as f64) * n as f64).round() as usize).collect();
        counts.push(((max_fpr * n as f64).ceil() as usize).min(n));
        counts.sort_unstable();
        counts.dedup();
        let mut points: Vec<(f64, f64)> = counts
            .into_iter()
            .map(|above| {
                // FPR 0 is reached just above the largest normal score, not at +inf.
                let t = if above == 0 { self.normal[n - 1].next_up() } else { self.normal[n - above.min(n)] };
                let fpr = (n - self.normal.partition_point(|&v| v < t)) as f64 / n as f64;
                let pro = self
                    .regions
                    .iter()
                    .map(|r| (r.len() - r.partition_point(|&v| v < t)) as f64 / r.len() as f64)
                    .sum::<f64>()
                    / self.regions.len() as f64;
                (fpr, pro)
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        // Trapezoids up to max_fpr, interpolating the segment that crosses it.
        let mut area = 0.0;
        for p in points.windows(2) {
            let ((x0, y0), (x1, y1)) = (p[0], p[1]);
            if x0 >= max_fpr {
                break;
            }
            let (xe, ye) = if x1 > max_fpr { (max_fpr, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)) } else { (x1, y1) };
            area += (xe - x0) * (y0 + ye) / 2.0;
        }
        area / max_fpr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_hand_computed() {
        // Perfect separation, reversed, and the classic 3-vs-3 case with one swap: 8 of 9 pairs.
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), 1.0);
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), 0.0);
        let a = auroc(&[0.1, 0.2, 0.5, 0.4, 0.6, 0.7], &[false, false, false, true, true, true]);
        assert!((a - 8.0 / 9.0).abs() < 1e-12, "{a}");
        // Ties count half: one pos and one neg at the same score.
        assert_eq!(auroc(&[0.5, 0.5], &[false, true]), 0.5);
        assert!(auroc(&[0.1, 0.2], &[true, true]).is_nan());
    }

    #[test]
    fn f1_max_hand_computed() {
        // Scores 0.9(P) 0.8(N) 0.7(P) 0.1(N): best cut keeps 0.9..0.7 -> tp 2, fp 1 -> F1 = 4/5.
        let f = f1_max(&[0.9, 0.8, 0.7, 0.1], &[true, false, true, false]);
        assert!((f - 0.8).abs() < 1e-12, "{f}");
        assert_eq!(f1_max(&[0.9, 0.1], &[true, false]), 1.0);
    }

    #[test]
    fn operating_point_hand_computed() {
        // Good 0.1 0.2 0.3 0.4 0.9, defective 0.5 0.8 0.35; threshold 0.6 flags 0.9 (good) and 0.8.
        let scores = [0.1, 0.2, 0.3, 0.4, 0.9, 0.5, 0.8, 0.35];
        let labels = [false, false, false, false, false, true, true, true];
        let verdicts: Vec<bool> = scores.iter().map(|s| *s >= 0.6).collect();
        let p = operating_point(&scores, &verdicts, &labels, 0.2);
        assert_eq!(p.frr, 0.2);
        assert!((p.escape - 2.0 / 3.0).abs() < 1e-12);
        // One good image in five may be flagged: the threshold is the next highest good score, 0.4,
        // so 0.35 escapes and 0.5 and 0.8 are caught.
        assert!((p.best_escape - 1.0 / 3.0).abs() < 1e-12);
        // Best cut in hindsight: above 0.4 catches 0.5 and 0.8 and flags 0.9: 6 of 8 right; above 0.3 the same.
        assert_eq!(p.hindsight_accuracy, 0.75);
        // With no good image allowed above it, the threshold is the highest good score, 0.9: every defect escapes.
        assert_eq!(operating_point(&scores, &verdicts, &labels, 0.0).best_escape, 1.0);
    }

    #[test]
    fn accuracy_counts_agreement() {
        assert_eq!(accuracy(&[true, false, true, true], &[true, false, false, true]), 0.75);
    }

    #[test]
    fn pro_of_perfect_and_of_half_detected_regions() {
        // Perfect map: regions score 1, normal 0 -> PRO 1 at every FPR.
        let mut acc = ProAccumulator::default();
        let mask = [true, true, false, false, false, false, false, true];
        let map: Vec<f32> = mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        acc.add(&map, &mask, 4);
        assert!((acc.aupro(0.3, 300) - 1.0).abs() < 1e-9);

        // Two regions of two pixels; each has one pixel above every normal pixel and one below all of
        // them. Up to the FPR where the low pixels cross (never within 0.3 here), PRO stays 0.5.
        let mut acc = ProAccumulator::default();
        let mask = [true, true, false, false, false, false, false, false, false, false, true, true];
        let map = [0.9, 0.0, 0.3, 0.4, 0.5, 0.35, 0.45, 0.3, 0.4, 0.5, 0.0, 0.9];
        acc.add(&map, &mask, 12);
        let v = acc.aupro(0.3, 3000);
        assert!((v - 0.5).abs() < 1e-3, "{v}");
    }

    #[test]
    fn pro_weights_regions_equally_not_by_size() {
        // A big region fully found and a small one missed: PRO 0.5 whatever their sizes.
        let mut acc = ProAccumulator::default();
        let w = 10;
        let mut mask = vec![false; 100];
        let mut map = vec![0.1f32; 100];
        for i in 0..30 {
            mask[i] = true;
            map[i] = 1.0;
        }
        mask[99] = true;
        map[99] = 0.0;
        acc.add(&map, &mask, w);
        let v = acc.aupro(0.3, 1000);
        assert!((v - 0.5).abs() < 1e-3, "{v}");
    }
}
