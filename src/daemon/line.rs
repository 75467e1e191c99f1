//! A camera's line mode, beside its worker: learning from the first parts after an enrolment takes
//! effect, then the drift watch (docs/CALIBRATION.md).
//!
//! The worker hands over every inspected part. While learning, parts are collected and their verdicts
//! carry `"learning": true`; once enough have come, learning finishes on a thread of its own (with its
//! own CPU encoder, so inspection goes on), stores the result as a new enrolment version and swaps it
//! in, unless the camera's model was replaced meanwhile. Afterwards, and for a model that does not
//! learn, the drift watch follows the scores: its state is a metric and a retained MQTT message.
//!
//! A camera with recipes has one watch per recipe ([`LineWatches`]): each product learns and drifts on
//! its own, and switching products does not restart either.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use image::RgbImage;
use tokio::sync::mpsc;

use crate::config::detect::DetectConfig;
use crate::config::engine::EngineConfig;
use crate::detect::detector::Detector;
use crate::detect::drift::{self, DriftWatch};
use crate::engine::encoder::Encoder;
use crate::enrol::calibrate;
use crate::enrol::learn::Learner;
use crate::source::intake::{CameraModel, CameraShared};
use crate::types::verdict::{self, EnrolmentRef};

/// What the drift topic carries (retained).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct DriftMessage {
    pub camera: String,
    /// The recipe the watch belongs to; null for a camera without recipes.
    #[serde(default)]
    pub product: Option<String>,
    pub drifting: bool,
    /// Shift of the moving average of the log-scores from the baseline, in spreads of the baseline.
    pub shift: f64,
    /// Median score of the baseline.
    pub baseline_median: f32,
    /// The moving window the average is worth, in parts (`drift::WINDOW`).
    pub window: usize,
    /// The enrolment the baseline belongs to.
    pub enrolment: String,
    pub at: String,
}

/// What a camera's line watches share: the camera, the settings learning runs with, and where the
/// drift state goes (the camera's topic; a recipe's watch adds `/<recipe>`).
#[derive(Clone)]
pub struct LineSetup {
    pub cam: Arc<CameraShared>,
    pub engine: EngineConfig,
    pub detect: DetectConfig,
    pub retained: mpsc::UnboundedSender<(String, String)>,
    pub drift_topic: String,
}

/// A camera's line watches, one per recipe, each made when its recipe inspects its first part.
pub struct LineWatches {
    setup: LineSetup,
    by_recipe: std::collections::HashMap<Option<String>, LineWatch>,
}

impl LineWatches {
    pub fn new(setup: LineSetup) -> Self {
        Self { setup, by_recipe: Default::default() }
    }

    /// [`LineWatch::after`] on the watch of the part's recipe.
    pub fn after(&mut self, model: &Arc<CameraModel>, img: &RgbImage, score: f32) -> bool {
        let setup = &self.setup;
        let watch = self
            .by_recipe
            .entry(model.recipe.clone())
            .or_insert_with(|| LineWatch::new(setup.clone(), model.recipe.clone()));
        watch.after(model, img, score)
    }
}

pub struct LineWatch {
    cam: Arc<CameraShared>,
    /// The recipe it watches (None: a camera without recipes); the `product` label of its metrics.
    recipe: Option<String>,
    engine: EngineConfig,
    detect: DetectConfig,
    retained: mpsc::UnboundedSender<(String, String)>,
    drift_topic: String,
    /// The enrolment id the state below belongs to.
    model_id: String,
    learner: Option<Learner>,
    /// Set while learning is under way (collecting or finishing); true once it has ended.
    learned: Option<Arc<AtomicBool>>,
    drift: DriftWatch,
    reported: bool,
}

impl LineWatch {
    /// The watch of `recipe` (None: the camera's only enrolment).
    pub fn new(setup: LineSetup, recipe: Option<String>) -> Self {
        let LineSetup { cam, engine, detect, retained, drift_topic } = setup;
        let drift_topic = match &recipe {
            Some(r) => format!("{drift_topic}/{r}"),
            None => drift_topic,
        };
        Self {
            cam,
            recipe,
            engine,
            detect,
            retained,
            drift_topic,
            model_id: String::new(),
            learner: None,
            learned: None,
            drift: DriftWatch::new(calibrate::MIN_SPREAD),
            reported: false,
        }
    }

    /// Takes one inspected part (the model it was inspected with, the frame, its score). Returns true
    /// when the part's verdict is a learning one.
    pub fn after(&mut self, model: &Arc<CameraModel>, img: &RgbImage, score: f32) -> bool {
        if model.enrolment_ref.id != self.model_id {
            self.follow(model);
        }
        if let Some(done) = &self.learned {
            if !done.load(Ordering::Acquire) {
                if let Some(l) = &mut self.learner {
                    l.add(&model.enrolment, img, score);
                    if l.is_complete() {
                        self.finish(model);
                    }
                }
                return true;
            }
            // Learning ended without a new model (too few parts passed, or it failed): watch drift.
            self.learned = None;
            self.cam.metrics.learning(&self.cam.name, self.product(), false);
        }
        if let Some(state) = self.drift.push(score) {
            self.cam.metrics.drift(&self.cam.name, self.product(), state.drifting, state.shift);
            if state.changed || !self.reported {
                self.report(state.drifting, state.shift);
            }
        }
        false
    }

    /// A new model is in use: learning starts if it learns, and the drift watch starts a new baseline.
    fn follow(&mut self, model: &CameraModel) {
        self.model_id = model.enrolment_ref.id.clone();
        self.learner = model.learn_parts.map(Learner::new);
        self.learned = self.learner.as_ref().map(|_| Arc::new(AtomicBool::new(false)));
        self.cam.metrics.learning(&self.cam.name, self.product(), self.learner.is_some());
        self.drift = DriftWatch::new(drift::unit(&model.enrolment.meta.calibration));
        self.reported = false;
        self.cam.metrics.drift(&self.cam.name, self.product(), false, 0.0);
        if let Some(n) = model.learn_parts {
            tracing::info!(camera = %self.cam.name, "line mode: learning from the next {n} parts");
        }
    }

    /// The `product` label of its metrics ("" for a camera without recipes).
    fn product(&self) -> &str {
        self.recipe.as_deref().unwrap_or("")
    }

    fn report(&mut self, drifting: bool, shift: f64) {
        self.reported = true;
        let msg = DriftMessage {
            camera: self.cam.name.clone(),
            product: self.recipe.clone(),
            drifting,
            shift,
            baseline_median: self.drift.baseline().map_or(f32::NAN, |b| b.median()),
            window: drift::WINDOW,
            enrolment: self.model_id.clone(),
            at: verdict::rfc3339(SystemTime::now()),
        };
        if drifting {
            tracing::warn!(
                camera = %self.cam.name,
                "drift: scores moved {shift:+.2} spreads from their baseline; check lighting, lens and material (nothing adapts by itself)"
            );
        } else if msg.baseline_median.is_finite() {
            tracing::info!(camera = %self.cam.name, "drift watch: scores within their baseline (shift {shift:+.2})");
        }
        let _ = self.retained.send((self.drift_topic.clone(), serde_json::to_string(&msg).unwrap_or_default()));
    }

    /// Learns on a thread of its own and swaps the result in.
    fn finish(&mut self, model: &Arc<CameraModel>) {
        let (Some(learner), Some(done)) = (self.learner.take(), self.learned.clone()) else { return };
        let (cam, engine, detect, model) = (self.cam.clone(), self.engine.clone(), self.detect.clone(), model.clone());
        let spawned = std::thread::Builder::new().name(format!("learn-{}", cam.name)).spawn(move || {
            crate::util::priority::yield_to_io();
            let outcome = learn(&cam, &engine, &detect, learner, &model);
            if let Err(e) = &outcome {
                tracing::error!(camera = %cam.name, "line mode: learning failed ({e}); the enrolment stays as it is");
                cam.metrics.learned(&cam.name, "failed", 0, 0);
            }
            done.store(true, Ordering::Release);
        });
        if let Err(e) = spawned {
            tracing::error!(camera = %self.cam.name, "line mode: cannot start learning ({e})");
            if let Some(d) = &self.learned {
                d.store(true, Ordering::Release);
            }
        }
    }
}

fn learn(
    cam: &CameraShared,
    engine: &EngineConfig,
    detect: &DetectConfig,
    learner: Learner,
    model: &CameraModel,
) -> Result<(), String> {
    let mut det = Detector::new(Encoder::load(engine).map_err(|e| e.to_string())?);
    let name = cam.name.clone();
    let (learned, report) = learner
        .finish(&mut det, &model.enrolment, detect, &mut |m| tracing::info!(camera = %name, "line mode: {m}"))
        .map_err(|e| e.to_string())?;
    // Learning leaves the enrolment as it was when too few parts pass; no part then entered.
    if report.entered == 0 {
        cam.metrics.learned(&cam.name, "unchanged", report.entered, report.refused);
        return Ok(());
    }
    let id = crate::daemon::enrolment_id(&learned);
    let mut source = model.enrolment_ref.source.clone();
    if let Some(v) = &model.versions {
        let note = format!("{} parts entered, {} refused", report.entered, report.refused);
        match v.add(&learned, &note) {
            Ok(n) => source = format!("{source} (learned version {n})"),
            Err(e) => tracing::error!(camera = %cam.name, "{e}: the learned enrolment is used but not kept"),
        }
    }
    let new = CameraModel {
        recipe: model.recipe.clone(),
        words: model.words.clone(),
        enrolment: learned,
        model: model.model.clone(),
        enrolment_ref: EnrolmentRef { id, source },
        learn_parts: None,
        versions: model.versions.clone(),
    };
    // Swap only if the camera still has the model that learned (a reload may have replaced it).
    if !cam.replace_model(&model.enrolment_ref.id, Arc::new(new)) {
        tracing::warn!(camera = %cam.name, "line mode: the model was replaced while learning; the result is not applied");
        return Ok(());
    }
    cam.metrics.learned(&cam.name, "applied", report.entered, report.refused);
    tracing::info!(
        camera = %cam.name,
        "line mode: learned from {} parts ({} refused); image threshold {:.4} -> {:.4}",
        report.entered,
        report.refused,
        report.threshold_before,
        report.threshold_after
    );
    Ok(())
}
