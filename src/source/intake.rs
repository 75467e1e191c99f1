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
use crate::util::text::escaped;

/// The product model a camera inspects against; swapped whole on reload.
#[derive(Debug)]
pub struct CameraModel {
    /// The recipe (`[[camera.recipe]]` name) it belongs to; None for a camera without recipes.
    pub recipe: Option<String>,
    /// The product in the operator's words, for the language model's prompt.
    pub words: Option<String>,
    pub enrolment: Enrolment,
    pub model: ModelRef,
    pub enrolment_ref: EnrolmentRef,
    /// Line mode: how many parts this model still learns from (None: it does not learn).
    pub learn_parts: Option<usize>,
    /// Where what this camera learns is kept (None: not kept).
    pub versions: Option<Versions>,
}

/// The models of a camera's recipes (one, without recipes), and the one in use.
#[derive(Debug, Clone)]
struct Models {
    all: Vec<Arc<CameraModel>>,
    active: usize,
}

impl Models {
    fn find(&self, recipe: &str) -> Option<usize> {
        self.all.iter().position(|m| m.recipe.as_deref() == Some(recipe))
    }
}

/// Why a product cannot be inspected on a camera.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown product {product:?} on camera {camera} (its recipes: {known})")]
pub struct UnknownProduct {
    pub camera: String,
    pub product: String,
    pub known: String,
}

/// A PLC trigger waiting for its frame.
#[derive(Debug, Clone)]
pub struct PendingTrigger {
    pub part_id: String,
    /// The recipe the part is to be judged with (a mixed-model line); None: the one in use.
    pub product: Option<String>,
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
    models: RwLock<Models>,
    pub verdicts: VerdictTx,
    pub metrics: Arc<Metrics>,
    /// Unix ms of the worker's last sign of life (for the watchdog).
    pub heartbeat: AtomicU64,
    /// Whoever waits for the verdict of a part id (the Modbus handshake): at most one per part.
    part_waiters: Mutex<std::collections::HashMap<String, tokio::sync::oneshot::Sender<VerdictMessage>>>,
    /// Every verdict, for the readers that show the last result (the OPC UA server). Bounded: a reader
    /// that falls [`RESULT_BACKLOG`] behind skips ahead, and the frame path never waits for it.
    results: tokio::sync::broadcast::Sender<Arc<VerdictMessage>>,
}

/// Verdicts a [`CameraShared::results`] reader may lag behind before it skips.
pub const RESULT_BACKLOG: usize = 256;

/// What became of a PLC trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Triggered {
    /// Waiting for the camera's next frame.
    Queued,
    /// [`MAX_PENDING_TRIGGERS`] already wait: nothing was queued and no verdict will come.
    Full,
    /// The trigger named a product the camera has no recipe for: its ERROR verdict has gone out.
    UnknownProduct,
}

/// Most parts whose verdicts are waited for at once, per camera.
pub const MAX_PART_WAITERS: usize = 64;

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
            models: RwLock::new(Models { all: vec![model], active: 0 }),
            verdicts,
            metrics,
            heartbeat: AtomicU64::new(verdict::unix_ms(SystemTime::now())),
            part_waiters: Mutex::new(Default::default()),
            results: tokio::sync::broadcast::channel(RESULT_BACKLOG).0,
        }
    }

    /// Every verdict of this camera from now on, in order.
    pub fn results(&self) -> tokio::sync::broadcast::Receiver<Arc<VerdictMessage>> {
        self.results.subscribe()
    }

    /// Milliseconds since the inspection worker last showed a sign of life.
    pub fn worker_silent_ms(&self) -> u64 {
        verdict::unix_ms(SystemTime::now()).saturating_sub(self.heartbeat.load(Ordering::Relaxed))
    }

    /// The model of the recipe in use.
    pub fn model(&self) -> Arc<CameraModel> {
        let m = sync::read(&self.models);
        m.all[m.active].clone()
    }

    /// Every recipe's model (one, for a camera without recipes).
    pub fn models(&self) -> Vec<Arc<CameraModel>> {
        sync::read(&self.models).all.clone()
    }

    /// Replaces every model (a reload). The recipe in use stays in use where it still exists; otherwise
    /// `start` (or the first) takes over. `all` must not be empty.
    pub fn set_models(&self, all: Vec<Arc<CameraModel>>, start: Option<&str>) {
        if all.is_empty() {
            return;
        }
        let mut m = sync::write(&self.models);
        let current = m.all[m.active].recipe.clone();
        let next = Models { all, active: 0 };
        let active = current
            .as_deref()
            .and_then(|r| next.find(r))
            .or_else(|| {
                if let Some(r) = &current {
                    tracing::warn!(camera = %self.name, "recipe {r} is no longer configured; switching to the start recipe");
                }
                start.and_then(|s| next.find(s))
            })
            .unwrap_or(0);
        *m = Models { active, ..next };
    }

    /// The model a frame of `recipe` is judged with (None: the recipe in use).
    pub fn recipe_model(&self, recipe: Option<&str>) -> Result<Arc<CameraModel>, UnknownProduct> {
        let m = sync::read(&self.models);
        match recipe {
            None => Ok(m.all[m.active].clone()),
            Some(r) => m.find(r).map(|i| m.all[i].clone()).ok_or_else(|| self.unknown(&m, r)),
        }
    }

    /// A PLC's recipe switch: [`CameraShared::select_recipe`], counted and logged.
    pub fn switch_recipe(&self, recipe: &str) -> Result<Option<String>, UnknownProduct> {
        let before = self.select_recipe(recipe)?;
        self.metrics.recipe_switched(&self.name, before.as_deref(), recipe);
        tracing::info!(
            camera = %self.name,
            "recipe {} -> {recipe}: frames captured and parts triggered from now on are judged with it",
            before.as_deref().unwrap_or("(none)")
        );
        Ok(before)
    }

    /// Makes `recipe` the one in use; returns the one it replaces.
    pub fn select_recipe(&self, recipe: &str) -> Result<Option<String>, UnknownProduct> {
        let mut m = sync::write(&self.models);
        let i = m.find(recipe).ok_or_else(|| self.unknown(&m, recipe))?;
        let before = m.all[m.active].recipe.clone();
        m.active = i;
        Ok(before)
    }

    /// Puts `new` in place of the model whose enrolment id is `old_id` (line mode's learned model).
    /// False when no model has that id any more (a reload replaced it meanwhile).
    pub fn replace_model(&self, old_id: &str, new: Arc<CameraModel>) -> bool {
        let mut m = sync::write(&self.models);
        match m.all.iter().position(|x| x.enrolment_ref.id == old_id) {
            Some(i) => {
                m.all[i] = new;
                true
            }
            None => false,
        }
    }

    fn unknown(&self, m: &Models, product: &str) -> UnknownProduct {
        let known: Vec<&str> = m.all.iter().filter_map(|x| x.recipe.as_deref()).collect();
        UnknownProduct {
            camera: self.name.clone(),
            product: product.into(),
            known: if known.is_empty() { "none".into() } else { known.join(", ") },
        }
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

    /// Queues a PLC trigger; the camera's next frame is inspected under its part id, with the recipe
    /// of `product` when given, else the one in use now (a switch after the trigger does not change
    /// it). Refused (false, counted as `refused`) when [`MAX_PENDING_TRIGGERS`] already wait.
    pub fn push_trigger(&self, part_id: String, product: Option<String>) -> bool {
        let product = product.or_else(|| self.model().recipe.clone());
        let t = PendingTrigger { part_id, product, at: Instant::now(), at_wall: SystemTime::now() };
        let mut q = sync::lock(&self.triggers);
        if q.len() >= MAX_PENDING_TRIGGERS {
            drop(q);
            self.metrics.trigger(&self.name, "refused");
            return false;
        }
        q.push_back(t);
        true
    }

    /// A PLC trigger, from any protocol: a part of an unknown product gets its ERROR verdict at once;
    /// otherwise it is queued ([`CameraShared::push_trigger`]).
    pub fn trigger(&self, part_id: String, product: Option<String>) -> Triggered {
        if let Some(Err(unknown)) = product.as_deref().map(|p| self.recipe_model(Some(p))) {
            tracing::warn!(camera = %self.name, "trigger for part {}: {unknown}", escaped(&part_id, 64));
            self.refuse_part(Some(part_id), &unknown);
            return Triggered::UnknownProduct;
        }
        if self.push_trigger(part_id, product) { Triggered::Queued } else { Triggered::Full }
    }

    /// The verdict of `part_id`, when it comes. Register before triggering the part. None when
    /// [`MAX_PART_WAITERS`] already wait.
    pub fn watch_part(&self, part_id: &str) -> Option<tokio::sync::oneshot::Receiver<VerdictMessage>> {
        let mut w = sync::lock(&self.part_waiters);
        w.retain(|_, tx| !tx.is_closed());
        if w.len() >= MAX_PART_WAITERS {
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        w.insert(part_id.to_string(), tx);
        Some(rx)
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
            let mut msg = self.skeleton(seq, id, Some(t.part_id.clone()), t.at_wall, t.product.as_deref());
            msg.verdict = Outcome::Error;
            msg.reason = Some(format!("no frame arrived within {} ms of the trigger", timeout.as_millis()));
            self.metrics.trigger(&self.name, "timeout");
            self.emit(msg, t.at, "trigger_timeout");
        }
    }

    /// A part that cannot be inspected because its product is unknown: an ERROR verdict at once,
    /// carrying its part id and the product asked for.
    pub fn refuse_part(&self, part_id: Option<String>, why: &UnknownProduct) {
        let (seq, id) = self.next_id();
        let now = SystemTime::now();
        let mut msg = self.skeleton(seq, id, part_id, now, None);
        msg.product = Some(why.product.clone());
        msg.enrolment = None;
        msg.reason = Some(why.to_string());
        self.emit(msg, Instant::now(), "unknown_product");
    }

    /// A verdict message with identity and model filled in (those of `recipe`, or of the recipe in
    /// use), verdict ERROR until set.
    pub fn skeleton(
        &self,
        seq: u64,
        frame_id: String,
        part_id: Option<String>,
        captured: SystemTime,
        recipe: Option<&str>,
    ) -> VerdictMessage {
        let m = self.recipe_model(recipe).unwrap_or_else(|_| self.model());
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
            product: recipe.map(str::to_string).or_else(|| m.recipe.clone()),
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
        self.metrics.verdict_emitted(&self.name, msg.product.as_deref(), msg.verdict, reason_label);
        if let Some(part) = &msg.part_id {
            let waiter = sync::lock(&self.part_waiters).remove(part);
            if let Some(tx) = waiter {
                let _ = tx.send(msg.clone());
            }
        }
        if self.results.receiver_count() > 0 {
            let _ = self.results.send(Arc::new(msg.clone()));
        }
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
        // The frame is judged with the recipe in use now (a trigger's: when it came), whatever is
        // switched later.
        let (part_id, recipe) = match cam.trigger_mode() {
            Trigger::EveryFrame => (None, cam.model().recipe.clone()),
            Trigger::Triggered => match cam.pop_trigger() {
                Some(t) => {
                    cam.metrics.trigger(&cam.name, "inspected");
                    (Some(t.part_id), t.product)
                }
                None => {
                    cam.metrics.idle_frame(&cam.name);
                    return Offer::Idle;
                }
            },
        };
        let (seq, id) = cam.next_id();
        let frame = Frame { seq, id, part_id, recipe, captured, captured_at, image };
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
                let mut msg = cam.skeleton(f.seq, f.id, f.part_id, f.captured, f.recipe.as_deref());
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
            recipe: None,
            words: None,
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
        t.intake.camera.push_trigger("P-9".into(), None);
        assert_eq!(t.intake.offer(frame(), SystemTime::now(), Instant::now()), Offer::Queued);
        assert_eq!(t.queue.recv().unwrap().part_id.as_deref(), Some("P-9"));
        t.intake.camera.push_trigger("P-10".into(), None);
        std::thread::sleep(Duration::from_millis(80));
        t.intake.camera.expire_triggers();
        let m = t.verdicts.try_recv().unwrap().msg;
        assert_eq!((m.verdict, m.part_id.as_deref()), (Outcome::Error, Some("P-10")));
        assert!(!t.intake.camera.trigger_pending());
    }
}
