//! Drift watch: whether the line's scores have moved away from what they were when its enrolment
//! took effect (lighting, lens dirt, a new batch of material).
//!
//! The first [`BASELINE`] scores under an enrolment are its baseline, modelled by a [`NormalModel`]
//! (defects among them are set aside as outliers). From then on each log-score is put in the baseline's
//! units (its spread, never below the spread of the model the threshold came from, see [`unit`]),
//! clipped to ±[`CLIP`] so that a defect moves it little, and followed by an exponentially weighted
//! moving average (EWMA, weight [`LAMBDA`]). A shift of [`ALARM_SPREADS`] either way raises the alarm
//! (upwards good parts start to be rejected, downwards defects start to pass); it clears below
//! [`CLEAR_SPREADS`]. The watch never adapts its baseline: only a new enrolment (learned, reloaded or
//! rolled back) starts a new one.
//!
//! Why an EWMA and these numbers (docs/CALIBRATION.md has the measurements): on a steady line the alarm
//! must stay quiet for thousands of parts, and the baseline's own error (a location estimated from
//! [`BASELINE`] parts) is part of the noise. The EWMA weighs every recent part (a moving median wastes a
//! third of the information on normal data) and is watching from the first part after the baseline
//! (a window is blind until it has filled).

use crate::detect::enrolment::Calibration;
use crate::detect::normal::NormalModel;

/// Scores in the baseline.
pub const BASELINE: usize = 128;
/// The EWMA's weight on the newest score: its memory is about 1/λ = 50 parts.
pub const LAMBDA: f64 = 0.02;
/// The moving window the EWMA is worth in variance (2/λ - 1 parts), reported beside the state.
pub const WINDOW: usize = 99;
/// Scores further than this from the baseline, in its spreads, count as this far.
pub const CLIP: f64 = 2.0;
/// The alarm rises at this shift, in spreads of the baseline: where a threshold set for 5% false
/// rejects starts rejecting 12.6% (1 - Φ(1.645 - 0.5)). Lower, and steady lines alarm (see the tests).
pub const ALARM_SPREADS: f64 = 0.5;
/// And clears below this.
pub const CLEAR_SPREADS: f64 = 0.25;

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
    /// Shift of the moving average from the baseline, in spreads (positive: scores rose).
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
    ewma: f64,
    drifting: bool,
}

impl DriftWatch {
    /// A watch whose baseline spread is at least `floor` (log units).
    pub fn new(floor: f64) -> Self {
        Self { floor, baseline: None, first: Vec::new(), ewma: 0.0, drifting: false }
    }

    /// Takes one inspected part's score. None while the baseline is filling.
    pub fn push(&mut self, score: f32) -> Option<DriftState> {
        if !(score.is_finite() && score > 0.0) {
            return None;
        }
        let Some(base) = self.baseline else {
            self.first.push(score);
            if self.first.len() >= BASELINE {
                self.baseline = NormalModel::fit(&self.first, self.floor);
                self.first = Vec::new();
            }
            return None;
        };
        let z = (((score as f64).ln() - base.location) / base.scale).clamp(-CLIP, CLIP);
        self.ewma += LAMBDA * (z - self.ewma);
        let shift = self.ewma;
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
    use crate::util::rng::Rng;

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

    /// One simulated line: log-normal good-part scores (spread 1 in log units after the baseline),
    /// `ramp` spreads a part from part `from` on. The part at which the alarm first rises.
    fn first_alarm(seed: u64, parts: usize, ramp: f64, from: usize) -> Option<usize> {
        let mut rng = Rng::new(seed);
        let mut w = DriftWatch::new(0.01);
        (0..parts).find(|&i| {
            let shift = ramp * i.saturating_sub(from) as f64;
            let score = (3.0 + 0.2 * (rng.normal() as f64 + shift)).exp() as f32;
            w.push(score).is_some_and(|s| s.drifting)
        })
    }

    /// The reason for the EWMA, the 128-part baseline and 0.5: measured on 200 simulated steady lines of
    /// 2,000 parts each, the watch this replaced (64-part baseline, median of 64, 0.4) alarmed on most
    /// of them (93 in 100 in the same simulation, docs/CALIBRATION.md).
    #[test]
    fn steady_lines_rarely_alarm_and_a_slow_ramp_is_caught_within_a_hundred_parts() {
        let lines: usize = 200;
        let false_alarms = (0..lines).filter(|&s| first_alarm(s as u64, BASELINE + 2000, 0.0, 0).is_some()).count();
        eprintln!("{false_alarms} of {lines} steady lines of 2000 parts alarmed");
        assert!(false_alarms * 100 <= lines * 15, "{false_alarms} of {lines} steady lines alarmed");
        // Scores rising by 0.011 spreads a part (the generated line of tests/line.rs): caught.
        let from = BASELINE + 100;
        let delays: Vec<usize> = (0..lines)
            .filter_map(|s| first_alarm(1000 + s as u64, from + 400, 0.011, from))
            .map(|a| a.saturating_sub(from))
            .collect();
        assert!(delays.len() == lines, "{} of {lines} ramps were never caught", lines - delays.len());
        let mean = delays.iter().sum::<usize>() as f64 / delays.len() as f64;
        eprintln!("a ramp of 0.011 spreads a part is caught {mean:.0} parts in, on average");
        assert!(mean < 100.0, "a ramp of 0.011 spreads a part is caught {mean:.0} parts in, on average");
        // And a fall (defects start to pass) as well as a rise.
        assert!(first_alarm(7, BASELINE + 400, -0.011, BASELINE + 50).is_some());
    }
}
