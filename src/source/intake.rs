//! Frames and the door they enter by. A [`Intake`] is what a source pushes frames into: it numbers
//! each frame, applies the camera's trigger mode and puts it on the bounded inspection queue. A live
//! frame that finds the queue full leaves at once as a SKIPPED verdict: nothing is dropped silently.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;

use crate::config::daemon::Trigger;
use crate::detect::enrolment::Enrolment;
use crate::enrol::versions::Versions;
use crate::telemetry::Metrics;
use crate::types::frame::Frame;
use crate::types::verdict::{
    self, EnrolmentRef, Latency, ModelRef, Outcome, Outgoing, SCHEMA, VerdictMessage, VerdictTx,
};
use crate::util::sync;

/// The product model a camera inspects against; swapped whole on reload.
#[derive(Debug)]
pub struct CameraModel {
    pub enrolment: Enrolment,
    pub model: ModelRef,
    pub enrolment_ref: EnrolmentRef,
    /// Line mode: how many parts this model still learns from (None: it does not learn).
    pub learn_parts: Option<usize>,
    /// Where what this camera learns is kept (None: not kept).
    pub versions: Option<Versions>,
}

/// A PLC trigger waiting for its frame.
#[derive(Debug, Clone)]
pub struct PendingTrigger {
    pub part_id: String,
    pub at: Instant,
    pub at_wall: SystemTime,
}

/// Per-camera state shared by its source, its worker, the command handler and the HTTP API. It lives
/// as long as the camera's name is configured, across reloads, so frame numbers never repeat.
#[derive(Debug)]
pub struct CameraShared {
    pub name: String,
    pub node: String,
    /// Daemon start time (hex ms): makes frame ids unique across restarts.
    pub boot: String,
    seq: AtomicU64,
    pub trigger: RwLock<Trigger>,
    pub trigger_timeout: RwLock<Duration>,
    triggers: Mutex<VecDeque<PendingTrigger>>,
    pub model: RwLock<Arc<CameraModel>>,
    pub verdicts: VerdictTx,
    pub metrics: Arc<Metrics>,
    /// Unix ms of the worker's last sign of life (for the watchdog).
    pub heartbeat: AtomicU64,
}

/// Most triggers that may wait for a frame at once, per camera: a PLC is never this many parts ahead
/// of its camera, so more is a flood (or a fault), and each would end as an ERROR verdict.
pub const MAX_PENDING_TRIGGERS: usize = 256;

/// A worker silent for longer than this is stalled: not ready, and the watchdog stops being fed.
pub const WORKER_STALL_MS: u64 = 10_000;

impl CameraShared {
    /// A camera in every-frame mode; [`CameraShared::set_trigger`] changes that.
    pub fn new(
        name: &str,
        node: &str,
        boot: &str,
        model: Arc<CameraModel>,
        verdicts: VerdictTx,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name: name.into(),
            node: node.into(),
            boot: boot.into(),
            seq: AtomicU64::new(0),
            trigger: RwLock::new(Trigger::EveryFrame),
            trigger_timeout: RwLock::new(Duration::from_secs(2)),
            triggers: Mutex::new(VecDeque::new()),
            model: RwLock::new(model),
            verdicts,
            metrics,
            heartbeat: AtomicU64::new(verdict::unix_ms(SystemTime::now())),
        }
    }

    /// Milliseconds since the inspection worker last showed a sign of life.
    pub fn worker_silent_ms(&self) -> u64 {
        verdict::unix_ms(SystemTime::now()).saturating_sub(self.heartbeat.load(Ordering::Relaxed))
    }

    pub fn model(&self) -> Arc<CameraModel> {
        sync::read(&self.model).clone()
    }

    pub fn set_model(&self, m: Arc<CameraModel>) {
        *sync::write(&self.model) = m;
    }

    pub fn set_trigger(&self, mode: Trigger, timeout: Duration) {
        *sync::write(&self.trigger) = mode;
        *sync::write(&self.trigger_timeout) = timeout;
    }

    pub fn trigger_mode(&self) -> Trigger {
        *sync::read(&self.trigger)
    }

    /// Frames numbered so far (the last sequence number).
    pub fn frames(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Numbers a new frame: (sequence, frame id).
    pub fn next_id(&self) -> (u64, String) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        (seq, format!("{}-{}-{seq}", self.name, self.boot))
    }

    /// Queues a PLC trigger; the camera's next frame is inspected under its part id. Refused (false,
    /// counted as `refused`) when [`MAX_PENDING_TRIGGERS`] already wait.
    pub fn push_trigger(&self, part_id: String) -> bool {
        let t = PendingTrigger { part_id, at: Instant::now(), at_wall: SystemTime::now() };
        let mut q = sync::lock(&self.triggers);
        if q.len() >= MAX_PENDING_TRIGGERS {
            drop(q);
            self.metrics.trigger(&self.name, "refused");
            return false;
        }
        q.push_back(t);
        true
    }

    pub fn trigger_pending(&self) -> bool {
        !sync::lock(&self.triggers).is_empty()
    }

    fn pop_trigger(&self) -> Option<PendingTrigger> {
        sync::lock(&self.triggers).pop_front()
    }

    /// Triggers that waited past the timeout leave as ERROR verdicts with their part ids.
    pub fn expire_triggers(&self) {
        let timeout = *sync::read(&self.trigger_timeout);
        let expired: Vec<PendingTrigger> = {
            let mut q = sync::lock(&self.triggers);
            let mut out = Vec::new();
            while q.front().is_some_and(|t| t.at.elapsed() > timeout) {
                out.extend(q.pop_front());
            }
            out
        };
        for t in expired {
            let (seq, id) = self.next_id();
            let mut msg = self.skeleton(seq, id, Some(t.part_id.clone()), t.at_wall);
            msg.verdict = Outcome::Error;
            msg.reason = Some(format!("no frame arrived within {} ms of the trigger", timeout.as_millis()));
            self.metrics.trigger(&self.name, "timeout");
            self.emit(msg, t.at, "trigger_timeout");
        }
    }

    /// A verdict message with identity and model filled in, verdict ERROR until set.
    pub fn skeleton(
        &self,
        seq: u64,
        frame_id: String,
        part_id: Option<String>,
        captured: SystemTime,
    ) -> VerdictMessage {
        let m = self.model();
        VerdictMessage {
            schema: SCHEMA,
            node: self.node.clone(),
            camera: self.name.clone(),
            frame_id,
            seq,
            part_id,
            captured_at: verdict::rfc3339(captured),
            captured_unix_ms: verdict::unix_ms(captured),
            published_at: String::new(),
            published_unix_ms: 0,
            verdict: Outcome::Error,
            reason: None,
            score: None,
            threshold: None,
            regions: Vec::new(),
            answer: None,
            width: None,
            height: None,
            model: m.model.clone(),
            enrolment: Some(m.enrolment_ref.clone()),
            latency_ms: Latency::default(),
            frame_url: None,
            replayed: false,
            learning: false,
        }
    }

    /// Counts a verdict and hands it to the publisher. `reason_label` names the SKIPPED/ERROR cause.
    pub fn emit(&self, mut msg: VerdictMessage, captured_at: Instant, reason_label: &str) {
        msg.latency_ms.total = captured_at.elapsed().as_secs_f32() * 1e3;
        self.metrics.verdict_emitted(&self.name, msg.verdict, reason_label);
        if self.verdicts.send(Outgoing { msg, captured_at }).is_err() {
            // Only after the publisher has finished, which happens after every camera has stopped.
            tracing::error!(camera = %self.name, "verdict produced after the publisher stopped");
        }
    }
}

/// What happened to an offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Left at once as a SKIPPED verdict (queue full, or shutting down).
    Skipped,
    /// A triggered camera's frame with no trigger pending: not a part, not a verdict.
    Idle,
}

/// Where a source delivers frames.
#[derive(Debug, Clone)]
pub struct Intake {
    pub camera: Arc<CameraShared>,
    tx: crossbeam_channel::Sender<Frame>,
    /// Live sources cannot wait: a full queue means SKIPPED. Replayed files wait for room instead.
    live: bool,
    stop: Arc<AtomicBool>,
}

impl Intake {
    pub fn new(
        camera: Arc<CameraShared>,
        tx: crossbeam_channel::Sender<Frame>,
        live: bool,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self { camera, tx, live, stop }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// For sources that can wait (files): true when the next frame would be taken as a part.
    pub fn wants_frame(&self) -> bool {
        self.camera.trigger_mode() == Trigger::EveryFrame || self.camera.trigger_pending()
    }

    /// Offers one captured frame.
    pub fn offer(&self, image: Result<RgbImage, String>, captured: SystemTime, captured_at: Instant) -> Offer {
        let cam = &self.camera;
        cam.metrics.frame_captured(&cam.name, verdict::unix_ms(captured) as f64 / 1e3);
        let part_id = match cam.trigger_mode() {
            Trigger::EveryFrame => None,
            Trigger::Triggered => match cam.pop_trigger() {
                Some(t) => {
                    cam.metrics.trigger(&cam.name, "inspected");
                    Some(t.part_id)
                }
                None => {
                    cam.metrics.idle_frame(&cam.name);
                    return Offer::Idle;
                }
            },
        };
        let (seq, id) = cam.next_id();
        let frame = Frame { seq, id, part_id, captured, captured_at, image };
        let result = if self.live {
            self.tx.try_send(frame).map_err(|e| match e {
                crossbeam_channel::TrySendError::Full(f) => (f, "queue_full"),
                crossbeam_channel::TrySendError::Disconnected(f) => (f, "shutdown"),
            })
        } else {
            self.wait_send(frame).map_or(Ok(()), Err)
        };
        cam.metrics.queue_depth(&cam.name, self.tx.len());
        match result {
            Ok(()) => Offer::Queued,
            Err((f, why)) => {
                let mut msg = cam.skeleton(f.seq, f.id, f.part_id, f.captured);
                msg.verdict = Outcome::Skipped;
                msg.reason = Some(match why {
                    "queue_full" => format!(
                        "inspection queue full ({} frames): the camera delivers faster than frames are inspected",
                        self.tx.capacity().unwrap_or(0)
                    ),
                    _ => "the camera was shutting down".into(),
                });
                if let Ok(img) = &f.image {
                    msg.width = Some(img.width());
                    msg.height = Some(img.height());
                }
                cam.emit(msg, f.captured_at, why);
                Offer::Skipped
            }
        }
    }

    /// Blocks until the queue has room; on shutdown gives the frame back (with the reason).
    fn wait_send(&self, mut frame: Frame) -> Option<(Frame, &'static str)> {
        loop {
            match self.tx.send_timeout(frame, Duration::from_millis(50)) {
                Ok(()) => return None,
                Err(crossbeam_channel::SendTimeoutError::Timeout(f)) => frame = f,
                Err(crossbeam_channel::SendTimeoutError::Disconnected(f)) => return Some((f, "shutdown")),
            }
            if self.stopping() {
                return Some((frame, "shutdown"));
            }
        }
    }
}

/// A camera with no detector behind it, for tests of sources and sinks: its frames are read from the
/// returned queue and its verdicts from the returned receiver.
pub struct TestCamera {
    pub intake: Intake,
    pub queue: crossbeam_channel::Receiver<Frame>,
    pub verdicts: tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
}

impl Intake {
    pub fn new_test(name: &str, queue: usize, live: bool, trigger: Trigger) -> TestCamera {
        use crate::types::verdict::{EnrolmentRef, ModelRef};
        let (vtx, verdicts) = tokio::sync::mpsc::unbounded_channel();
        let model = Arc::new(CameraModel {
            enrolment: crate::enrol::file::sample_for_tests(),
            model: ModelRef { name: "test".into(), sha256: "0".into() },
            enrolment_ref: EnrolmentRef { id: "0".into(), source: "test".into() },
            learn_parts: None,
            versions: None,
        });
        let cam = CameraShared::new(name, "node", "0", model, vtx, Arc::new(Metrics::new()));
        cam.set_trigger(trigger, Duration::from_millis(50));
        let (tx, queue) = crossbeam_channel::bounded(queue);
        TestCamera { intake: Intake::new(Arc::new(cam), tx, live, Arc::new(AtomicBool::new(false))), queue, verdicts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Result<RgbImage, String> {
        Ok(RgbImage::new(32, 24))
    }

    #[test]
    fn a_live_frame_finding_the_queue_full_leaves_as_skipped() {
        let mut t = Intake::new_test("c", 2, true, Trigger::EveryFrame);
        let offers: Vec<Offer> = (0..5).map(|_| t.intake.offer(frame(), SystemTime::now(), Instant::now())).collect();
        assert_eq!(offers, [Offer::Queued, Offer::Queued, Offer::Skipped, Offer::Skipped, Offer::Skipped]);
        let mut skipped = Vec::new();
        while let Ok(o) = t.verdicts.try_recv() {
            skipped.push(o.msg);
        }
        assert_eq!(skipped.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert!(
            skipped
                .iter()
                .all(|m| m.verdict == Outcome::Skipped && m.reason.as_deref().unwrap().contains("queue full"))
        );
        assert_eq!(t.queue.len(), 2);
        let m = &t.intake.camera.metrics;
        assert_eq!(m.sample(r#"anomalyd_skipped_total{camera="c",reason="queue_full"}"#), Some(3.0));
    }

    #[test]
    fn replay_waits_for_room_and_gives_the_frame_back_on_shutdown() {
        let t = Intake::new_test("c", 1, false, Trigger::EveryFrame);
        assert_eq!(t.intake.offer(frame(), SystemTime::now(), Instant::now()), Offer::Queued);
        let intake = t.intake.clone();
        let h = std::thread::spawn(move || intake.offer(frame(), SystemTime::now(), Instant::now()));
        std::thread::sleep(Duration::from_millis(100));
        assert!(t.queue.recv().is_ok(), "first frame");
        assert_eq!(h.join().unwrap(), Offer::Queued, "the second waited for room instead of being skipped");
        assert_eq!(t.queue.recv().unwrap().seq, 2);
    }

    #[test]
    fn triggers_tag_the_next_frame_and_expire_as_errors() {
        let mut t = Intake::new_test("c", 4, true, Trigger::Triggered);
        assert_eq!(t.intake.offer(frame(), SystemTime::now(), Instant::now()), Offer::Idle, "no trigger: not a part");
        t.intake.camera.push_trigger("P-9".into());
        assert_eq!(t.intake.offer(frame(), SystemTime::now(), Instant::now()), Offer::Queued);
        assert_eq!(t.queue.recv().unwrap().part_id.as_deref(), Some("P-9"));
        t.intake.camera.push_trigger("P-10".into());
        std::thread::sleep(Duration::from_millis(80));
        t.intake.camera.expire_triggers();
        let m = t.verdicts.try_recv().unwrap().msg;
        assert_eq!((m.verdict, m.part_id.as_deref()), (Outcome::Error, Some("P-10")));
        assert!(!t.intake.camera.trigger_pending());
    }
}
