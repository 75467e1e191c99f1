//! A camera's inspection worker: takes frames off the camera's queue in order and turns each into
//! exactly one verdict (OK, NG, SKIPPED when it waited too long, ERROR when decoding or inference
//! failed). It owns its detector, so cameras never wait on each other's encoder session.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::daemon::line::LineWatches;
use crate::describe::explainer::{Explainer, FrameFacts};
use crate::detect::detector::Detector;
use crate::sink::store::StoreJob;
use crate::source::intake::CameraShared;
use crate::types::frame::Frame;
use crate::types::verdict::{self, Outcome};
use crate::util::priority;

pub struct Worker {
    pub cam: Arc<CameraShared>,
    pub rx: crossbeam_channel::Receiver<Frame>,
    pub detector: Detector,
    pub max_age: Duration,
    pub delay: Duration,
    pub store: Option<crossbeam_channel::Sender<StoreJob>>,
    /// Writes the words for NG frames, off this thread.
    pub explainer: Arc<Explainer>,
    /// Line mode: learning from the first parts, then the drift watch (per recipe).
    pub line: LineWatches,
}

impl Worker {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name(format!("inspect-{}", self.cam.name)).spawn(move || {
            priority::yield_to_io();
            self.run()
        })
    }

    /// Runs until the queue's senders are gone and the queue is empty.
    fn run(mut self) {
        loop {
            self.cam.heartbeat.store(verdict::unix_ms(SystemTime::now()), Ordering::Relaxed);
            match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(frame) => {
                    self.cam.metrics.queue_depth(&self.cam.name, self.rx.len());
                    self.handle(frame);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.cam.metrics.queue_depth(&self.cam.name, 0);
    }

    fn handle(&mut self, f: Frame) {
        let cam = self.cam.clone();
        let waited = f.captured_at.elapsed();
        let mut msg = cam.skeleton(f.seq, f.id.clone(), f.part_id.clone(), f.captured, f.recipe.as_deref());
        msg.latency_ms.queue = waited.as_secs_f32() * 1e3;
        cam.metrics.stage(&cam.name, "queue", msg.latency_ms.queue);
        let img = match f.image {
            Err(reason) => {
                msg.verdict = Outcome::Error;
                msg.reason = Some(format!("frame could not be decoded: {reason}"));
                return cam.emit(msg, f.captured_at, "decode");
            }
            Ok(img) => img,
        };
        msg.width = Some(img.width());
        msg.height = Some(img.height());
        if waited > self.max_age {
            msg.verdict = Outcome::Skipped;
            msg.reason = Some(format!(
                "stale: waited {} ms for inspection, more than max_age_ms = {}",
                waited.as_millis(),
                self.max_age.as_millis()
            ));
            return cam.emit(msg, f.captured_at, "stale");
        }
        if img.width() < 16 || img.height() < 16 {
            msg.verdict = Outcome::Error;
            msg.reason =
                Some(format!("frame is {}x{}: too small to inspect (at least 16x16)", img.width(), img.height()));
            return cam.emit(msg, f.captured_at, "frame_size");
        }
        // The recipe the frame was captured under (a reload may have removed it since).
        let model = match cam.recipe_model(f.recipe.as_deref()) {
            Ok(m) => m,
            Err(unknown) => {
                msg.enrolment = None;
                msg.reason = Some(unknown.to_string());
                return cam.emit(msg, f.captured_at, "unknown_product");
            }
        };
        let detector = &mut self.detector;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| detector.inspect(&model.enrolment, &img)));
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let ins = match result {
            Ok(Ok(ins)) => ins,
            Ok(Err(e)) => {
                msg.verdict = Outcome::Error;
                msg.reason = Some(format!("inspection failed: {e}"));
                return cam.emit(msg, f.captured_at, "inspect");
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                tracing::error!(camera = %cam.name, frame = %f.id, "inspection panicked: {what}");
                msg.verdict = Outcome::Error;
                msg.reason = Some(format!("internal error during inspection: {what}"));
                return cam.emit(msg, f.captured_at, "internal");
            }
        };
        let v = &ins.verdict;
        let t = v.timings;
        for (stage, ms) in [("preprocess", t.preprocess_ms), ("encoder", t.encoder_ms), ("decoder", t.decoder_ms)] {
            cam.metrics.stage(&cam.name, stage, ms);
        }
        msg.latency_ms.preprocess = t.preprocess_ms;
        msg.latency_ms.encoder = t.encoder_ms;
        msg.latency_ms.decoder = t.decoder_ms;
        msg.verdict = if v.anomalous { Outcome::Ng } else { Outcome::Ok };
        msg.score = Some(v.score);
        msg.threshold = Some(v.threshold);
        msg.learning = self.line.after(&model, &img, v.score);
        msg.regions = v.regions.clone();
        let findings = crate::types::findings::Findings {
            anomalous: v.anomalous,
            score: v.score,
            threshold: v.threshold,
            regions: v.regions.clone(),
            product: model.words.clone(),
            classes: crate::detect::classes::known_labels(&model.enrolment.meta.classes),
        };
        msg.answer = Some(v.answer.clone());
        let mut description = None;
        if v.anomalous {
            // The verdict goes out now; the model's words follow on the description topic.
            let images: crate::describe::explainer::Images = if self.explainer.wants_images() {
                let (img, ins) = (img.clone(), ins.clone());
                Box::new(move || crate::describe::llm::images_for(&img, &ins))
            } else {
                Box::new(Vec::new)
            };
            let facts = FrameFacts {
                frame_id: msg.frame_id.clone(),
                camera: cam.name.clone(),
                captured_unix_ms: msg.captured_unix_ms,
                findings,
            };
            description = Some((facts, images));
        }
        if v.anomalous
            && let Some(store) = &self.store
        {
            msg.frame_url = Some(format!("/v1/frames/{}", msg.frame_id));
            let job = StoreJob { msg: msg.clone(), image: img, inspection: ins };
            if store.try_send(job).is_err() {
                msg.frame_url = None;
                cam.metrics.store_failure();
                tracing::warn!(camera = %cam.name, frame = %msg.frame_id, "flagged-frame store is behind; this frame is not kept");
            }
        }
        cam.emit(msg, f.captured_at, "");
        if let Some((facts, images)) = description {
            self.explainer.describe(facts, images);
        }
    }
}
