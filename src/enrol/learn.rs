//! Line mode: an enrolment learns the line's own normal variation from its first parts, unlabelled.
//!
//! The first `learn_parts` parts after enrolment are judged with the enrolment's threshold and kept
//! (brought to the encoder input). Then [`Learner::finish`]:
//! 1. **Guard** ([`Learner::guard`]). The half of the parts with the lowest scores under the enrolment
//!    grows banks that know what a good part of this line looks like; every part is scored against banks
//!    that did not learn it, and a [`NormalModel`] of those scores sets the outliers aside: defects, a
//!    dropped part, an empty fixture. Only the rest are learned from, and both counts are reported.
//! 2. **Appearance.** The accepted parts are split into two folds. Each fold grows a copy of the bank
//!    ([`bank::grow`]: the patches farthest from the bank, bounded), and the other fold is scored against
//!    it, so every accepted part gets a held-out score against a bank that has learned from the line.
//! 3. **Threshold.** The model of the held-out scores (outliers set aside again, and kept out of the bank)
//!    gives the new image threshold at the target. The final bank grows from every part that passed.
//!    Simulated anomalies made from the learned parts are scored against it: the mask threshold and
//!    the expected escape rate come from them, as at enrolment.
//!
//! The held-out scores come from banks grown from half the parts, which score good parts a little
//! higher than the final bank: the threshold errs towards rejecting fewer good parts.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::config::detect::DetectConfig;
use crate::detect::detector::Detector;
use crate::detect::enrolment::{Calibration, Enrolment, Thresholds};
use crate::detect::features::Patches;
use crate::detect::inspection::DetectError;
use crate::detect::normal::NormalModel;
use crate::enrol::bank;
use crate::enrol::calibrate;
use crate::util::imageio;
use crate::util::rng::Rng;

/// A learned bank holds at most this many times the enrolment's rows (and never more than
/// `detect.max_bank`): the decoder's time grows with the bank, and this bounds it.
pub const GROWTH: usize = 4;

/// Fewer accepted parts than this teach nothing: the enrolment stays as it is.
pub const MIN_PARTS: usize = crate::config::daemon::MIN_LEARN_PARTS;

/// What learning did, for the log, the metrics and the enrolment's history.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LearnReport {
    /// Parts observed, parts that entered the model and the bank, parts the guard refused.
    pub parts: usize,
    pub entered: usize,
    pub refused: usize,
    pub threshold_before: f32,
    pub threshold_after: f32,
    /// Rows of the first bank layer before and after.
    pub bank_before: usize,
    pub bank_after: usize,
    /// For each observed part in order, whether it entered.
    pub kept: Vec<bool>,
}

/// Scores grown from fewer parts than this are too noisy to judge the others by.
const MIN_CORE: usize = 4;

/// Collects the first parts of a line and learns from them.
#[derive(Debug)]
pub struct Learner {
    want: usize,
    parts: Vec<(RgbImage, f32)>,
    guard: bool,
}

impl Learner {
    /// A learner that waits for `parts` parts.
    pub fn new(parts: usize) -> Self {
        Self { want: parts, parts: Vec::with_capacity(parts), guard: true }
    }

    /// A learner without the poisoning guard: every part enters. Only for measuring what the guard
    /// is worth (tests, `eval`); never on a line.
    pub fn unguarded(parts: usize) -> Self {
        Self { guard: false, ..Self::new(parts) }
    }

    /// Keeps one part (any size; it is brought to the enrolment's input) with its score under the
    /// enrolment. Parts past the wanted count are ignored.
    pub fn add(&mut self, enrolment: &Enrolment, img: &RgbImage, score: f32) {
        if self.parts.len() < self.want {
            let (w, h) = enrolment.meta.geometry.input_size(img.width(), img.height());
            self.parts.push((imageio::resize(img, w, h), score));
        }
    }

    pub fn is_complete(&self) -> bool {
        self.parts.len() >= self.want
    }

    /// The poisoning guard: which parts may be learned from. Assumes fewer than half the warm-up is
    /// defective. The half with the lowest scores under the enrolment is the core, taken to be good: two
    /// halves of it each grow a bank. Each core part is scored against the other half's bank, every
    /// other part against both (the mean), and a part whose score is an outlier of the robust model of
    /// all these scores is refused. Against banks that have learned the line's good variation, a defect
    /// stands out more than it does against the shots.
    fn guard(
        &self,
        det: &mut Detector,
        enrolment: &Enrolment,
        scores: &[f32],
        grow: &dyn Fn(&[usize]) -> Vec<crate::detect::enrolment::Bank>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<usize>, DetectError> {
        let meta = &enrolment.meta;
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let core_len = scores.len().div_ceil(2);
        if core_len < MIN_CORE {
            // Too few to learn what a good part looks like: the scores under the enrolment alone judge.
            let m = NormalModel::fit(scores, calibrate::MIN_SPREAD);
            return Ok((0..scores.len()).filter(|&i| m.is_some_and(|m| !m.is_outlier(scores[i]))).collect());
        }
        let (core, rest) = order.split_at(core_len);
        let halves: [Vec<usize>; 2] =
            [core.iter().copied().step_by(2).collect(), core.iter().copied().skip(1).step_by(2).collect()];
        let banks = [grow(&halves[0]), grow(&halves[1])];
        // Every part scored against banks that have learned good parts: the core against the other
        // half's bank, the rest against both (the mean). Defects stand out more than against the shots.
        let mut judged = vec![0.0f32; scores.len()];
        for (h, half) in halves.iter().enumerate() {
            for &i in half {
                judged[i] = det.score_prepared(meta, &banks[1 - h], &self.parts[i].0)?.score;
            }
        }
        for &i in rest {
            let a = det.score_prepared(meta, &banks[0], &self.parts[i].0)?.score;
            let b = det.score_prepared(meta, &banks[1], &self.parts[i].0)?.score;
            judged[i] = 0.5 * (a + b);
        }
        let Some(model) = NormalModel::fit(&judged, calibrate::MIN_SPREAD) else {
            return Ok(core.to_vec());
        };
        let accepted: Vec<usize> = (0..scores.len()).filter(|&i| !model.is_outlier(judged[i])).collect();
        progress(&format!(
            "guard: {} of {} parts pass (banks grown from the {} lowest-scoring judge them)",
            accepted.len(),
            scores.len(),
            core.len()
        ));
        Ok(accepted)
    }

    /// Learns from the parts seen so far: a new enrolment (grown bank, refined thresholds) and what
    /// changed. With fewer than [`MIN_PARTS`] accepted parts the enrolment comes back unchanged.
    pub fn finish(
        self,
        det: &mut Detector,
        enrolment: &Enrolment,
        cfg: &DetectConfig,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Enrolment, LearnReport), DetectError> {
        let meta = &enrolment.meta;
        // Dozens of parts estimate their own spread; the nuisance views' is no floor (they spread more).
        let floor = calibrate::MIN_SPREAD;
        let scores: Vec<f32> = self.parts.iter().map(|(_, s)| *s).collect();
        let mut report = LearnReport {
            parts: scores.len(),
            threshold_before: meta.thresholds.image,
            threshold_after: meta.thresholds.image,
            bank_before: enrolment.banks.first().map_or(0, |b| b.len()),
            ..Default::default()
        };
        report.bank_after = report.bank_before;
        // Each part's patches, as the encoder sees it on the line.
        let mut patches: Vec<Vec<Patches>> = Vec::with_capacity(self.parts.len());
        for (img, _) in &self.parts {
            patches.push(det.patches(img, &meta.groups, meta.pool, &meta.distances)?);
        }
        let limit = cfg.max_bank.min(GROWTH * report.bank_before.max(1));
        let grow = |idx: &[usize]| {
            let parts: Vec<Vec<Patches>> = idx.iter().map(|&i| patches[i].clone()).collect();
            bank::grow(&enrolment.banks, &parts, meta.window, &meta.distances, limit)
        };
        // 1. The guard.
        let accepted: Vec<usize> = if self.guard {
            self.guard(det, enrolment, &scores, &grow, progress)?
        } else {
            (0..self.parts.len()).collect()
        };
        if accepted.len() < MIN_PARTS {
            let why = format!("{} of {} parts passed the guard, fewer than {MIN_PARTS}", accepted.len(), report.parts);
            return Ok(unchanged(enrolment, report, accepted.len(), &why, progress));
        }
        progress(&format!(
            "learning from {} parts ({} refused by the guard)",
            accepted.len(),
            scores.len() - accepted.len()
        ));
        // 2. Held-out scores of the accepted parts: two folds, each scored against a bank grown from the other.
        let folds: [Vec<usize>; 2] =
            [accepted.iter().copied().step_by(2).collect(), accepted.iter().copied().skip(1).step_by(2).collect()];
        let mut held = vec![0.0f32; self.parts.len()];
        let mut maps = vec![None; self.parts.len()];
        // Scored with the search the line will inspect with (the index, where the bank has one), so
        // that the threshold and the scores it judges are measured alike.
        for (f, fold) in folds.iter().enumerate() {
            let banks = grow(fold);
            let index = Enrolment::index_for(meta, &banks);
            for &i in &folds[1 - f] {
                let s = det.score_indexed(meta, &banks, &index, &self.parts[i].0)?;
                held[i] = s.score;
                maps[i] = Some(s.map);
            }
        }
        // 3. The threshold from the accepted parts' held-out scores.
        let accepted_held: Vec<f32> = accepted.iter().map(|&i| held[i]).collect();
        let fitted = if self.guard {
            NormalModel::fit(&accepted_held, floor)
        } else {
            NormalModel::fit_all(&accepted_held, floor)
        };
        let Some(model) = fitted else {
            return Ok(unchanged(enrolment, report, 0, "no usable held-out score", progress));
        };
        // A part whose held-out score is an outlier of the model stays out of the bank too.
        let keep: Vec<usize> = accepted.into_iter().filter(|&i| !self.guard || !model.is_outlier(held[i])).collect();
        if keep.len() < MIN_PARTS {
            let why = format!("{} parts are left after the held-out check, fewer than {MIN_PARTS}", keep.len());
            return Ok(unchanged(enrolment, report, keep.len(), &why, progress));
        }
        report.kept = (0..self.parts.len()).map(|i| keep.contains(&i)).collect();
        let banks = grow(&keep);
        report.entered = keep.len();
        report.refused = report.parts - keep.len();
        let image = model.threshold(cfg.false_reject_target);
        let bases: Vec<RgbImage> = keep.iter().take(8).map(|&i| self.parts[i].0.clone()).collect();
        let mut rng = Rng::new(cfg.seed ^ 0x1EA2);
        // The held-out maps are the mask threshold's normal pixels.
        let mut samples: Vec<_> = keep.iter().filter_map(|&i| maps[i].take()).map(|m| (m, None)).collect();
        let anomaly =
            calibrate::simulate_anomalies(det, meta, &banks, &bases, cfg.anomaly_views, &mut rng, &mut samples)?;
        let pixel = calibrate::choose_pixel_threshold(&samples, image);
        let simulated_escape = calibrate::simulated_escape(&anomaly, image);
        let mut warnings = Vec::new();
        if simulated_escape > calibrate::HIGH_ESCAPE {
            warnings.push(format!(
                "after learning, {:.0}% of simulated defects still score below the threshold: this product's \
                 defects may pass",
                100.0 * simulated_escape
            ));
        }
        let mut new_meta = meta.clone();
        new_meta.thresholds = Thresholds { image, pixel, source: "learned".into() };
        new_meta.calibration = Calibration {
            held_out: keep.iter().map(|&i| held[i]).collect(),
            anomaly,
            leave_one_out: false,
            false_reject_target: cfg.false_reject_target,
            model: Some(model),
            evidence: format!("{} line parts, each held out of a bank grown from the others' fold", keep.len()),
            simulated_escape,
            warnings,
            learned_parts: keep.len(),
            refused_parts: report.refused,
            ..meta.calibration.clone()
        };
        report.threshold_after = image;
        report.bank_after = banks.first().map_or(0, |b| b.len());
        progress(&format!(
            "learned: {} parts entered, {} refused; image threshold {:.4} -> {image:.4}, bank {} -> {} patches; \
             simulated defects passed {:.0}%",
            report.entered,
            report.refused,
            report.threshold_before,
            report.bank_before,
            report.bank_after,
            100.0 * simulated_escape
        ));
        Ok((Enrolment::new(new_meta, banks), report))
    }
}

/// The enrolment as it was, with a report that no part entered (`passed` got through the guard) and why.
fn unchanged(
    enrolment: &Enrolment,
    mut report: LearnReport,
    passed: usize,
    why: &str,
    progress: &mut dyn FnMut(&str),
) -> (Enrolment, LearnReport) {
    report.refused = report.parts - passed;
    report.kept = vec![false; report.parts];
    progress(&format!("learning: {why}: the enrolment stays as it is"));
    (enrolment.clone(), report)
}
