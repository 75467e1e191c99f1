//! Drift watch: whether the line's scores have moved away from what they were when its enrolment
//! took effect (lighting, lens dirt, a new batch of material).
//!
//! The first [`WINDOW`] scores under an enrolment are its baseline, modelled by a [`NormalModel`]
//! (defects among them are set aside as outliers). From then on the median of the last [`WINDOW`]
//! log-scores is compared with the baseline's location, in units of its spread, which is never below the
//! spread of the model the threshold came from (see [`unit`]). A shift of
//! [`ALARM_SPREADS`] either way raises the alarm (upwards good parts start to be rejected, downwards
//! defects start to pass); it clears below [`CLEAR_SPREADS`]. The watch never adapts its baseline: only
//! a new enrolment (learned, reloaded or rolled back) starts a new one.

use std::collections::VecDeque;

use crate::detect::enrolment::Calibration;
use crate::detect::normal::NormalModel;

/// Scores in the baseline and in the moving window.
pub const WINDOW: usize = 64;
/// The alarm rises at this shift of the moving median, in spreads of the baseline: where a threshold
/// set for 5% false rejects starts rejecting twice that (1 - Φ(1.645 - 0.4) = 10.7%).
pub const ALARM_SPREADS: f64 = 0.4;
/// And clears below this.
pub const CLEAR_SPREADS: f64 = 0.2;

/// The least spread a drift is measured in: that of the model the enrolment's threshold came from. A
/// shift is only worth an alarm in the units that decide false rejects; a line whose parts repeat
/// closely can have a baseline far narrower than that.
pub fn unit(cal: &Calibration) -> f64 {
    cal.model.map_or(MIN_UNIT, |m| m.scale.max(MIN_UNIT))
}

/// No drift is measured in less than this (1% of the score).
const MIN_UNIT: f64 = 0.01;

/// What the watch says after a score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftState {
    /// Shift of the moving median from the baseline, in spreads (positive: scores rose).
    pub shift: f64,
    pub drifting: bool,
    /// Whether `drifting` changed with this score.
    pub changed: bool,
}

#[derive(Debug, Clone)]
pub struct DriftWatch {
    floor: f64,
    baseline: Option<NormalModel>,
    first: Vec<f32>,
    recent: VecDeque<f64>,
    drifting: bool,
}

impl DriftWatch {
    /// A watch whose baseline spread is at least `floor` (log units).
    pub fn new(floor: f64) -> Self {
        Self { floor, baseline: None, first: Vec::new(), recent: VecDeque::with_capacity(WINDOW), drifting: false }
    }

    /// Takes one inspected part's score. None while the baseline or the first window is filling.
    pub fn push(&mut self, score: f32) -> Option<DriftState> {
        if !(score.is_finite() && score > 0.0) {
            return None;
        }
        let Some(base) = self.baseline else {
            self.first.push(score);
            if self.first.len() >= WINDOW {
                self.baseline = NormalModel::fit(&self.first, self.floor);
                self.first.clear();
            }
            return None;
        };
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((score as f64).ln());
        if self.recent.len() < WINDOW {
            return None;
        }
        let mut v: Vec<f64> = self.recent.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let median = 0.5 * (v[(WINDOW - 1) / 2] + v[WINDOW / 2]);
        let shift = (median - base.location) / base.scale;
        let was = self.drifting;
        if shift.abs() >= ALARM_SPREADS {
            self.drifting = true;
        } else if shift.abs() < CLEAR_SPREADS {
            self.drifting = false;
        }
        Some(DriftState { shift, drifting: self.drifting, changed: was != self.drifting })
    }

    pub fn baseline(&self) -> Option<NormalModel> {
        self.baseline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_scores_never_alarm_and_a_shift_does_then_clears() {
        let mut w = DriftWatch::new(0.01);
        let noise = |i: usize| 1.0 + 0.1 * (((i * 7919) % 101) as f32 / 100.0 - 0.5);
        let mut last = None;
        for i in 0..400 {
            last = w.push(noise(i)).or(last);
            assert!(!last.is_some_and(|s| s.drifting), "false alarm at {i}: {last:?}");
        }
        // Scores rise by half the baseline's range: the alarm rises once, with a positive shift.
        let mut rose = 0;
        for i in 400..600 {
            if let Some(s) = w.push(noise(i) * 1.06)
                && s.changed
            {
                assert!(s.drifting && s.shift > 0.0, "{s:?}");
                rose += 1;
            }
        }
        assert_eq!(rose, 1);
        // Back to normal: it clears.
        let cleared = (600..800).filter_map(|i| w.push(noise(i))).any(|s| s.changed && !s.drifting);
        assert!(cleared);
    }
}
