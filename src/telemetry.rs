//! Prometheus metrics of the daemon, all named `anomalyd_*`. Each event that changes a metric is one
//! method here (the fields are private, so no other file can move a metric by hand), grouped by the
//! part of the pipeline that reports it. `docs/METRICS.md` lists them.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::types::verdict::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CameraLabel {
    pub camera: String,
}

/// A camera's recipe: `product` is its name, "" for a camera without recipes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProductLabels {
    pub camera: String,
    pub product: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProductVerdictLabels {
    pub camera: String,
    pub product: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub camera: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub camera: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub camera: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub camera: String,
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub camera: String,
    pub model: String,
    pub sha256: String,
    pub provider: String,
    /// Where inspection runs: `cpu (onnxruntime cpu)`, `cuda:0 NVIDIA H200`.
    pub device: String,
    /// Whether the compiled engine (TensorRT's, or the GPU kernels) came from its cache: hit, miss, none.
    pub engine_cache: String,
    pub enrolment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub camera: String,
    pub method: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmInfoLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmKindLabels {
    pub kind: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn llm_histogram() -> Histogram {
    // 50 ms .. ~7 min.
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    frames: Family<VerdictLabels, Counter>,
    skipped: Family<ReasonLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    stage: HistFamily<StageLabels>,
    latency: HistFamily<CameraLabel>,
    queue_depth: Family<CameraLabel, Gauge>,
    queue_capacity: Family<CameraLabel, Gauge>,
    last_frame: Family<CameraLabel, Gauge<f64, AtomicU64>>,
    camera_up: Family<CameraLabel, Gauge>,
    idle_frames: Family<CameraLabel, Counter>,
    published: Family<CameraLabel, Counter>,
    publish_failures: Counter,
    publish_backlog: Gauge,
    mqtt_connected: Gauge,
    mqtt_reconnects: Counter,
    model_info: Family<ModelLabels, Gauge>,
    triggers: Family<ReasonLabels, Counter>,
    commands: Family<ResultLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    store_bytes: Gauge,
    store_files: Gauge,
    store_evicted: Counter,
    store_failures: Counter,
    outbox_bytes: Gauge,
    outbox_verdicts: Gauge,
    outbox_evicted: Counter,
    outbox_writable: Gauge,
    outbox_failures: Counter,
    outbox_corrupt: Counter,
    outbox_memory: Gauge,
    outbox_memory_dropped: Counter,
    dead_letters: Gauge,
    dead_lettered: Counter,
    replayed: Counter,
    camera_state: Family<StateLabels, Gauge>,
    llm_info: Family<LlmInfoLabels, Gauge>,
    llm_queue_depth: Gauge,
    llm_queue_capacity: Gauge,
    llm_descriptions: Family<LlmKindLabels, Counter>,
    llm_fallback: Family<LlmReasonLabels, Counter>,
    llm_replaced: Family<LlmReasonLabels, Counter>,
    llm_tokens: Counter,
    llm_call_seconds: HistFamily<LlmKindLabels>,
    llm_first_answer: Histogram,
    llm_conversations: Gauge,
    llm_chats: Family<LlmKindLabels, Counter>,
    notes_dropped: Counter,
    drift: Family<ProductLabels, Gauge>,
    drift_shift: Family<ProductLabels, Gauge<f64, AtomicU64>>,
    learning: Family<ProductLabels, Gauge>,
    recipe_active: Family<ProductLabels, Gauge>,
    recipe_bytes: Family<ProductLabels, Gauge>,
    recipe_switches: Family<CameraLabel, Counter>,
    product_verdicts: Family<ProductVerdictLabels, Counter>,
    modbus_connections: Family<ResultLabel, Counter>,
    modbus_triggers: Family<ReasonLabels, Counter>,
    modbus_exceptions: Family<ResultLabel, Counter>,
    modbus_result_seconds: HistFamily<CameraLabel>,
    opcua_calls: Family<MethodLabels, Counter>,
    opcua_sessions: Family<ResultLabel, Counter>,
    opcua_results_missed: Family<CameraLabel, Counter>,
    sparkplug_births: Family<ResultLabel, Counter>,
    sparkplug_host_online: Gauge,
    ui_streams: Gauge,
    ui_events_skipped: Counter,
    ui_actions: Family<ActionLabels, Counter>,
    learned_parts: Family<ReasonLabels, Counter>,
    learn_runs: Family<ReasonLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("anomalyd"),
            frames: Family::default(),
            skipped: Family::default(),
            errors: Family::default(),
            stage: Family::new_with_constructor(latency_histogram),
            latency: Family::new_with_constructor(latency_histogram),
            queue_depth: Family::default(),
            queue_capacity: Family::default(),
            last_frame: Family::default(),
            camera_up: Family::default(),
            idle_frames: Family::default(),
            published: Family::default(),
            publish_failures: Counter::default(),
            publish_backlog: Gauge::default(),
            mqtt_connected: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            model_info: Family::default(),
            triggers: Family::default(),
            commands: Family::default(),
            reloads: Family::default(),
            store_bytes: Gauge::default(),
            store_files: Gauge::default(),
            store_evicted: Counter::default(),
            store_failures: Counter::default(),
            outbox_bytes: Gauge::default(),
            outbox_verdicts: Gauge::default(),
            outbox_evicted: Counter::default(),
            outbox_writable: Gauge::default(),
            outbox_failures: Counter::default(),
            outbox_corrupt: Counter::default(),
            outbox_memory: Gauge::default(),
            outbox_memory_dropped: Counter::default(),
            dead_letters: Gauge::default(),
            dead_lettered: Counter::default(),
            replayed: Counter::default(),
            camera_state: Family::default(),
            llm_info: Family::default(),
            llm_queue_depth: Gauge::default(),
            llm_queue_capacity: Gauge::default(),
            llm_descriptions: Family::default(),
            llm_fallback: Family::default(),
            llm_replaced: Family::default(),
            llm_tokens: Counter::default(),
            llm_call_seconds: Family::new_with_constructor(llm_histogram),
            llm_first_answer: llm_histogram(),
            llm_conversations: Gauge::default(),
            llm_chats: Family::default(),
            notes_dropped: Counter::default(),
            drift: Family::default(),
            drift_shift: Family::default(),
            learning: Family::default(),
            recipe_active: Family::default(),
            recipe_bytes: Family::default(),
            recipe_switches: Family::default(),
            product_verdicts: Family::default(),
            modbus_connections: Family::default(),
            modbus_triggers: Family::default(),
            modbus_exceptions: Family::default(),
            modbus_result_seconds: Family::new_with_constructor(latency_histogram),
            opcua_calls: Family::default(),
            opcua_sessions: Family::default(),
            opcua_results_missed: Family::default(),
            ui_streams: Gauge::default(),
            ui_events_skipped: Counter::default(),
            ui_actions: Family::default(),
            sparkplug_births: Family::default(),
            sparkplug_host_online: Gauge::default(),
            learned_parts: Family::default(),
            learn_runs: Family::default(),
        };
        let r = &mut m.registry;
        r.register(
            "frames",
            "Frames that left the pipeline, by camera and verdict (OK, NG, SKIPPED, ERROR)",
            m.frames.clone(),
        );
        r.register("skipped", "SKIPPED verdicts by camera and reason", m.skipped.clone());
        r.register("errors", "ERROR verdicts by camera and reason", m.errors.clone());
        r.register(
            "stage_seconds",
            "Latency of each stage (queue, preprocess, encoder, decoder, publish)",
            m.stage.clone(),
        );
        r.register("frame_latency_seconds", "Capture to publish, per frame", m.latency.clone());
        r.register("queue_depth", "Frames waiting for inspection", m.queue_depth.clone());
        r.register("queue_capacity", "Size of the inspection queue", m.queue_capacity.clone());
        r.register(
            "camera_last_frame_timestamp_seconds",
            "Unix time of the camera's latest frame",
            m.last_frame.clone(),
        );
        r.register("camera_up", "1 while the camera's source is streaming", m.camera_up.clone());
        r.register(
            "idle_frames",
            "Frames of a triggered camera that arrived with no trigger pending (not parts)",
            m.idle_frames.clone(),
        );
        r.register("verdicts_published", "Verdicts handed to the MQTT broker", m.published.clone());
        r.register(
            "mqtt_publish_failures",
            "Publishes the MQTT client refused or lost a connection on",
            m.publish_failures.clone(),
        );
        r.register("publish_backlog", "Verdicts waiting to be published", m.publish_backlog.clone());
        r.register("mqtt_connected", "1 while connected to the MQTT broker", m.mqtt_connected.clone());
        r.register("mqtt_reconnects", "Connections made to the broker after the first", m.mqtt_reconnects.clone());
        r.register("model_info", "Encoder model, execution provider, device, engine cache hit or miss and enrolment in use, per camera (value 1)", m.model_info.clone());
        r.register("triggers", "PLC triggers by camera and result (inspected, timeout)", m.triggers.clone());
        r.register(
            "commands",
            "Commands (MQTT command and chat topics) by result: accepted or why refused",
            m.commands.clone(),
        );
        r.register("reloads", "Configuration reloads by result", m.reloads.clone());
        r.register("store_bytes", "Bytes held by the flagged-frame store", m.store_bytes.clone());
        r.register("store_frames", "Frames held by the flagged-frame store", m.store_files.clone());
        r.register("store_evicted", "Flagged frames deleted to stay under the byte budget", m.store_evicted.clone());
        r.register("store_failures", "Flagged frames that could not be written", m.store_failures.clone());
        r.register(
            "outbox_bytes",
            "Bytes of verdicts logged but not yet acknowledged by the broker",
            m.outbox_bytes.clone(),
        );
        r.register(
            "outbox_verdicts",
            "Verdicts logged but not yet acknowledged by the broker",
            m.outbox_verdicts.clone(),
        );
        r.register(
            "outbox_evicted",
            "Unpublished verdicts evicted or dropped to keep the outbox under its byte bound (ERROR and SKIPPED \
             first, then OK, then NG; oldest first)",
            m.outbox_evicted.clone(),
        );
        r.register(
            "outbox_writable",
            "1 while the outbox takes writes; 0 after a disk failure, until it reopens",
            m.outbox_writable.clone(),
        );
        r.register(
            "outbox_failures",
            "Outbox reads and writes that failed (disk full, I/O error)",
            m.outbox_failures.clone(),
        );
        r.register(
            "outbox_corrupt",
            "Unreadable outbox files moved aside at start (their verdicts are not republished)",
            m.outbox_corrupt.clone(),
        );
        r.register(
            "outbox_memory_verdicts",
            "Verdicts held in memory while the outbox is not writable",
            m.outbox_memory.clone(),
        );
        r.register(
            "outbox_memory_dropped",
            "Verdicts dropped past the memory bound while the outbox was not writable",
            m.outbox_memory_dropped.clone(),
        );
        r.register("dead_letters", "Verdicts the broker would not take, kept in the outbox", m.dead_letters.clone());
        r.register("dead_lettered", "Verdicts moved to the dead letters", m.dead_lettered.clone());
        r.register(
            "verdicts_replayed",
            "Verdicts published again after a broker outage or a restart",
            m.replayed.clone(),
        );
        r.register(
            "camera_state",
            "1 for the camera's current state: streaming, reconnecting, failed, ended, stopped",
            m.camera_state.clone(),
        );
        r.register(
            "llm_info",
            "The backend writing descriptions and answers (local:FILE, remote:MODEL@HOST, template)",
            m.llm_info.clone(),
        );
        r.register("llm_queue_depth", "NG frames waiting for a description", m.llm_queue_depth.clone());
        r.register("llm_queue_capacity", "Size of the description queue (llm.queue)", m.llm_queue_capacity.clone());
        r.register(
            "llm_descriptions",
            "Descriptions published by the model's queue, by source (llm, template)",
            m.llm_descriptions.clone(),
        );
        r.register(
            "llm_fallback",
            "Template text used instead of the model, by reason (no_model, queue_full, chat_queue_full, timeout, error, empty, shutdown)",
            m.llm_fallback.clone(),
        );
        r.register(
            "llm_replaced",
            "Model answers refused for contradicting the findings, by reason (denies_anomaly, claims_anomaly, wrong_place, wrong_class, wrong_score)",
            m.llm_replaced.clone(),
        );
        r.register("llm_tokens", "Answer tokens generated by the language model", m.llm_tokens.clone());
        r.register(
            "llm_call_seconds",
            "Duration of one model call, by kind (describe, chat)",
            m.llm_call_seconds.clone(),
        );
        r.register("llm_first_answer_seconds", "From an NG verdict to its description", m.llm_first_answer.clone());
        r.register("llm_conversations", "Frame conversations held in memory", m.llm_conversations.clone());
        r.register("llm_chats", "Chat questions answered, by source (llm, template)", m.llm_chats.clone());
        r.register(
            "notes_dropped",
            "Descriptions and chat answers not published because the broker was away and the memory queue was full",
            m.notes_dropped.clone(),
        );
        r.register(
            "drift",
            "1 while the scores of a camera's recipe have moved away from their baseline (docs/CALIBRATION.md), else 0",
            m.drift.clone(),
        );
        r.register(
            "drift_shift",
            "Shift of the moving average of a camera's recipe's scores from its baseline, in spreads of the baseline",
            m.drift_shift.clone(),
        );
        r.register(
            "learning",
            "1 while line mode learns from the first parts of a camera's recipe",
            m.learning.clone(),
        );
        r.register(
            "recipe_active",
            "1 for the recipe a camera inspects with now, 0 for its others",
            m.recipe_active.clone(),
        );
        r.register("recipe_bytes", "Memory of a recipe's enrolment bank", m.recipe_bytes.clone());
        r.register("recipe_switches", "Switches of a camera's recipe in use", m.recipe_switches.clone());
        r.register(
            "modbus_connections",
            "Modbus TCP connections: accepted, refused (not in modbus.allow) or limit (too many open)",
            m.modbus_connections.clone(),
        );
        r.register(
            "modbus_triggers",
            "Modbus triggers by camera and reason: accepted, or refused as busy, bad_part_id, bad_product, not_triggerable, queue_full",
            m.modbus_triggers.clone(),
        );
        r.register("modbus_exceptions", "Modbus exception responses by exception code", m.modbus_exceptions.clone());
        r.register(
            "opcua_calls",
            "OPC UA method calls by camera, method (Trigger, SelectRecipe) and result: good, or the status code's name",
            m.opcua_calls.clone(),
        );
        r.register(
            "opcua_sessions",
            "OPC UA session activations: accepted, or refused (anonymous, bad user or password, unknown certificate)",
            m.opcua_sessions.clone(),
        );
        r.register(
            "opcua_results_missed",
            "Verdicts the OPC UA server fell too far behind to show (its last result and event skip them)",
            m.opcua_results_missed.clone(),
        );
        r.register(
            "ui_streams",
            "Operator-station pages following the line live (server-sent event streams)",
            m.ui_streams.clone(),
        );
        r.register(
            "ui_events_skipped",
            "Live line-page events skipped because a page (or the station's view of a camera) fell behind",
            m.ui_events_skipped.clone(),
        );
        r.register(
            "ui_actions",
            "Operator-station actions by action (login, false_reject_preview, false_reject, rollback, chat, csrf) and result (ok, refused, failed)",
            m.ui_actions.clone(),
        );
        r.register(
            "sparkplug_births",
            "Sparkplug B births sent, by reason: connect, host_online (the primary host came online), rebirth (an NCMD asked) or new_camera",
            m.sparkplug_births.clone(),
        );
        r.register(
            "sparkplug_primary_host_online",
            "1 while the Sparkplug primary host's STATE says online (0 without one configured)",
            m.sparkplug_host_online.clone(),
        );
        r.register(
            "modbus_result_seconds",
            "From an accepted Modbus trigger to its latched result (ResultReady)",
            m.modbus_result_seconds.clone(),
        );
        r.register(
            "product_verdicts",
            "Verdicts of cameras with recipes, by camera, product and verdict",
            m.product_verdicts.clone(),
        );
        r.register(
            "learned_parts",
            "Line-mode parts by camera and reason: entered (learned from) or refused (by the poisoning guard)",
            m.learned_parts.clone(),
        );
        r.register(
            "learn_runs",
            "Line-mode learning runs by camera and reason: applied, unchanged (too few parts passed) or failed",
            m.learn_runs.clone(),
        );
        m
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The value of one exposed series, e.g. `anomalyd_skipped_total{camera="c",reason="queue_full"}`
    /// (labels in declaration order); `None` when it was never set. For tests and the benches.
    pub fn sample(&self, series: &str) -> Option<f64> {
        self.encode().lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

fn camera(camera: &str) -> CameraLabel {
    CameraLabel { camera: camera.into() }
}

fn result(r: &str) -> ResultLabel {
    ResultLabel { result: r.into() }
}

fn llm_kind(kind: &str) -> LlmKindLabels {
    LlmKindLabels { kind: kind.into() }
}

fn llm_reason(reason: &str) -> LlmReasonLabels {
    LlmReasonLabels { reason: reason.into() }
}

/// The frame path: intake, triggers, inspection, verdicts.
impl Metrics {
    /// A camera delivered a frame captured at `unix_s`.
    pub fn frame_captured(&self, cam: &str, unix_s: f64) {
        self.last_frame.get_or_create(&camera(cam)).set(unix_s);
    }

    /// A triggered camera's frame arrived with no trigger pending: not a part.
    pub fn idle_frame(&self, cam: &str) {
        self.idle_frames.get_or_create(&camera(cam)).inc();
    }

    /// A PLC trigger ended: `inspected` (its frame came) or `timeout`.
    pub fn trigger(&self, cam: &str, outcome: &str) {
        self.triggers.get_or_create(&ReasonLabels { camera: cam.into(), reason: outcome.into() }).inc();
    }

    /// A camera's inspection queue: its size when the camera starts, its depth as frames come and go.
    pub fn queue_capacity(&self, cam: &str, capacity: usize) {
        self.queue_capacity.get_or_create(&camera(cam)).set(capacity as i64);
    }

    pub fn queue_depth(&self, cam: &str, depth: usize) {
        self.queue_depth.get_or_create(&camera(cam)).set(depth as i64);
    }

    /// Time one stage of a frame took.
    pub fn stage(&self, camera: &str, stage: &str, ms: f32) {
        self.stage.get_or_create(&StageLabels { camera: camera.into(), stage: stage.into() }).observe(ms as f64 / 1e3);
    }

    /// A verdict left the frame path for the publisher; `reason` labels a SKIPPED or ERROR one.
    pub fn verdict_emitted(&self, cam: &str, product: Option<&str>, verdict: Outcome, reason: &str) {
        self.frames.get_or_create(&VerdictLabels { camera: cam.into(), verdict: verdict.as_str().into() }).inc();
        if let Some(p) = product {
            let l = ProductVerdictLabels { camera: cam.into(), product: p.into(), verdict: verdict.as_str().into() };
            self.product_verdicts.get_or_create(&l).inc();
        }
        let labels = ReasonLabels { camera: cam.into(), reason: reason.into() };
        match verdict {
            Outcome::Skipped => self.skipped.get_or_create(&labels).inc(),
            Outcome::Error => self.errors.get_or_create(&labels).inc(),
            Outcome::Ok | Outcome::Ng => 0,
        };
        self.publish_backlog.inc();
    }
}

/// The daemon: cameras, models, reloads and commands.
impl Metrics {
    /// A camera's source started (true) or stopped (false).
    pub fn camera_up(&self, cam: &str, up: bool) {
        self.camera_up.get_or_create(&camera(cam)).set(i64::from(up));
    }

    /// A camera is now in `state`, one of `states`.
    pub fn camera_state(&self, cam: &str, state: &str, states: &[&str]) {
        for s in states {
            self.camera_state
                .get_or_create(&StateLabels { camera: cam.into(), state: (*s).into() })
                .set(i64::from(*s == state));
        }
    }

    /// A camera's drift watch: whether it alarms, and the shift it measured.
    pub fn drift(&self, cam: &str, product: &str, drifting: bool, shift: f64) {
        let l = ProductLabels { camera: cam.into(), product: product.into() };
        self.drift.get_or_create(&l).set(i64::from(drifting));
        self.drift_shift.get_or_create(&l).set(shift);
    }

    /// A camera's recipe started (true) or stopped (false) learning from its first parts.
    pub fn learning(&self, cam: &str, product: &str, on: bool) {
        self.learning.get_or_create(&ProductLabels { camera: cam.into(), product: product.into() }).set(i64::from(on));
    }

    /// A camera's recipe is loaded: its memory, and whether it is the one in use.
    pub fn recipe(&self, cam: &str, product: &str, bytes: usize, active: bool) {
        let l = ProductLabels { camera: cam.into(), product: product.into() };
        self.recipe_bytes.get_or_create(&l).set(bytes as i64);
        self.recipe_active.get_or_create(&l).set(i64::from(active));
    }

    /// Sparkplug B births were sent (`connect`, `host_online` or `rebirth`).
    pub fn sparkplug_births(&self, reason: &str) {
        self.sparkplug_births.get_or_create(&result(reason)).inc();
    }

    /// The Sparkplug primary host's STATE changed.
    pub fn sparkplug_host_online(&self, online: bool) {
        self.sparkplug_host_online.set(i64::from(online));
    }

    /// A Modbus client connected: `accepted`, `refused` or `limit`.
    pub fn modbus_connection(&self, outcome: &str) {
        self.modbus_connections.get_or_create(&result(outcome)).inc();
    }

    /// A Modbus trigger: `accepted`, or the reason it was refused.
    pub fn modbus_trigger(&self, cam: &str, outcome: &str) {
        self.modbus_triggers.get_or_create(&ReasonLabels { camera: cam.into(), reason: outcome.into() }).inc();
    }

    /// A Modbus request was answered with this exception code.
    pub fn modbus_exception(&self, code: u8) {
        self.modbus_exceptions.get_or_create(&result(&code.to_string())).inc();
    }

    /// A Modbus part's result was latched, this long after its trigger.
    pub fn modbus_result(&self, cam: &str, seconds: f64) {
        self.modbus_result_seconds.get_or_create(&camera(cam)).observe(seconds);
    }

    /// An OPC UA method call on a camera, and its result (`good` or a status code's name).
    pub fn opcua_call(&self, cam: &str, method: &str, outcome: &str) {
        let labels = MethodLabels { camera: cam.into(), method: method.into(), result: outcome.into() };
        self.opcua_calls.get_or_create(&labels).inc();
    }

    /// An OPC UA session tried to activate: `accepted` or `refused`.
    pub fn opcua_session(&self, outcome: &str) {
        self.opcua_sessions.get_or_create(&result(outcome)).inc();
    }

    /// The OPC UA server's view of a camera skipped `n` verdicts (it fell behind the stream).
    pub fn opcua_results_missed(&self, cam: &str, n: u64) {
        self.opcua_results_missed.get_or_create(&camera(cam)).inc_by(n);
    }

    /// An operator-station page started (`true`) or stopped following the line live.
    pub fn ui_stream(&self, open: bool) {
        if open {
            self.ui_streams.inc();
        } else {
            self.ui_streams.dec();
        }
    }

    /// The station skipped `n` live events (a page or its view of a camera fell behind).
    pub fn ui_events_skipped(&self, n: u64) {
        self.ui_events_skipped.inc_by(n);
    }

    /// An operator-station action and its result (`ok`, `refused`, `failed`).
    pub fn ui_action(&self, action: &str, outcome: &str) {
        self.ui_actions.get_or_create(&ActionLabels { action: action.into(), result: outcome.into() }).inc();
    }

    /// A camera switched its recipe in use from `from` to `to`.
    pub fn recipe_switched(&self, cam: &str, from: Option<&str>, to: &str) {
        if let Some(f) = from {
            self.recipe_active.get_or_create(&ProductLabels { camera: cam.into(), product: f.into() }).set(0);
        }
        self.recipe_active.get_or_create(&ProductLabels { camera: cam.into(), product: to.into() }).set(1);
        self.recipe_switches.get_or_create(&camera(cam)).inc();
    }

    /// A learning run ended (`applied`, `unchanged`, `failed`) with parts entered and refused.
    pub fn learned(&self, cam: &str, outcome: &str, entered: usize, refused: usize) {
        let label = |reason: &str| ReasonLabels { camera: cam.into(), reason: reason.into() };
        self.learn_runs.get_or_create(&label(outcome)).inc();
        self.learned_parts.get_or_create(&label("entered")).inc_by(entered as u64);
        self.learned_parts.get_or_create(&label("refused")).inc_by(refused as u64);
    }

    /// A camera now inspects with `labels`' model; `old` is what it used before.
    pub fn model_in_use(&self, labels: &ModelLabels, old: Option<&ModelLabels>) {
        if let Some(old) = old {
            self.model_info.remove(old);
        }
        self.model_info.get_or_create(labels).set(1);
    }

    /// A reload ended: `applied`, `partial` or `failed`.
    pub fn reload(&self, outcome: &str) {
        self.reloads.get_or_create(&result(outcome)).inc();
    }

    /// A command arrived: `accepted`, or refused as `invalid`, `too_large`, `bad_field`, `unauthorized`
    /// or `rate_limited`.
    pub fn command(&self, outcome: &str) {
        self.commands.get_or_create(&result(outcome)).inc();
    }
}

/// The MQTT link and its outbox.
impl Metrics {
    /// The link connected (true) or lost its connection (false).
    pub fn mqtt_connected(&self, up: bool) {
        self.mqtt_connected.set(i64::from(up));
    }

    /// A connection made after the first.
    pub fn mqtt_reconnected(&self) {
        self.mqtt_reconnects.inc();
    }

    /// Publishes lost with a connection.
    pub fn publishes_lost(&self, n: u64) {
        self.publish_failures.inc_by(n);
    }

    /// Verdicts taken from the frame path into the outbox.
    pub fn verdicts_logged(&self, n: usize) {
        self.publish_backlog.dec_by(n as i64);
    }

    /// A verdict handed to the broker: the first time with its capture-to-publish latency, or again.
    pub fn verdict_published(&self, cam: &str, replayed: bool, publish_ms: f32, total_ms: f32) {
        if replayed {
            self.replayed.inc();
        } else {
            self.stage(cam, "publish", publish_ms);
            self.latency.get_or_create(&camera(cam)).observe(total_ms as f64 / 1e3);
        }
    }

    /// The broker took a verdict's publish.
    pub fn verdict_handed_over(&self, cam: &str) {
        self.published.get_or_create(&camera(cam)).inc();
    }

    /// A description or chat answer dropped: the broker was away and the memory queue full.
    pub fn note_dropped(&self) {
        self.notes_dropped.inc();
    }

    /// The outbox now holds `verdicts` verdicts in `bytes` bytes.
    pub fn outbox_size(&self, bytes: u64, verdicts: u64) {
        self.outbox_bytes.set(bytes as i64);
        self.outbox_verdicts.set(verdicts as i64);
    }

    /// Unpublished verdicts evicted to stay under the outbox's bound.
    pub fn outbox_evicted(&self, n: u64) {
        self.outbox_evicted.inc_by(n);
    }

    /// The outbox became writable (true) or was closed by a disk failure (false).
    pub fn outbox_writable(&self, up: bool) {
        self.outbox_writable.set(i64::from(up));
    }

    /// An outbox read or write failed.
    pub fn outbox_failure(&self) {
        self.outbox_failures.inc();
    }

    /// An unreadable outbox file was moved aside at start.
    pub fn outbox_corrupt(&self) {
        self.outbox_corrupt.inc();
    }

    /// Verdicts waiting in memory for the outbox, and how many were dropped past the bound just now.
    pub fn outbox_memory(&self, held: usize, dropped: u64) {
        self.outbox_memory.set(held as i64);
        self.outbox_memory_dropped.inc_by(dropped);
    }

    /// A verdict moved to the dead letters.
    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    /// The dead letters kept now.
    pub fn dead_letters(&self, n: usize) {
        self.dead_letters.set(n as i64);
    }
}

/// The flagged-frame store.
impl Metrics {
    /// A flagged frame that could not be written (or was not queued: the store was behind).
    pub fn store_failure(&self) {
        self.store_failures.inc();
    }

    /// A stored frame deleted to stay under the byte budget.
    pub fn store_evicted(&self) {
        self.store_evicted.inc();
    }

    /// The store now holds `frames` frames in `bytes` bytes.
    pub fn store_size(&self, bytes: u64, frames: usize) {
        self.store_bytes.set(bytes as i64);
        self.store_files.set(frames as i64);
    }
}

/// The language model.
impl Metrics {
    /// The backend in use (`local:FILE`, `remote:MODEL@HOST`, `template`) and the queue's size.
    pub fn llm_started(&self, model: &str, queue: usize) {
        self.llm_info.get_or_create(&LlmInfoLabels { model: model.into() }).set(1);
        self.llm_queue_capacity.set(queue as i64);
    }

    /// NG frames waiting for a description.
    pub fn llm_queue_depth(&self, depth: usize) {
        self.llm_queue_depth.set(depth as i64);
    }

    /// NG frames waiting for a description now (the bench waits for it to drain).
    pub fn llm_queued(&self) -> i64 {
        self.llm_queue_depth.get()
    }

    /// The template answered instead of the model, and why.
    pub fn llm_fallback(&self, why: &str) {
        self.llm_fallback.get_or_create(&llm_reason(why)).inc();
    }

    /// A model answer refused for contradicting the findings, and how.
    pub fn llm_replaced(&self, why: &str) {
        self.llm_replaced.get_or_create(&llm_reason(why)).inc();
    }

    /// One model call of `kind` (describe, chat) that gave `tokens` tokens in `ms`.
    pub fn llm_call(&self, kind: &str, tokens: u32, ms: f32) {
        self.llm_tokens.inc_by(u64::from(tokens));
        self.llm_call_seconds.get_or_create(&llm_kind(kind)).observe(ms as f64 / 1e3);
    }

    /// A description published `seconds` after its NG verdict, by source (llm, template).
    pub fn llm_described(&self, source: &str, seconds: f64) {
        self.llm_first_answer.observe(seconds);
        self.llm_descriptions.get_or_create(&llm_kind(source)).inc();
    }

    /// A chat question answered, by source (llm, template).
    pub fn llm_chat(&self, source: &str) {
        self.llm_chats.get_or_create(&llm_kind(source)).inc();
    }

    /// Frame conversations held in memory.
    pub fn llm_conversations(&self, n: usize) {
        self.llm_conversations.set(n as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series name the exposition can hold: counters with `_total`, histograms with their suffixes.
    fn exposed_names() -> std::collections::BTreeSet<String> {
        let text = Metrics::new().encode();
        let mut names = std::collections::BTreeSet::new();
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
            match kind {
                "counter" => names.insert(format!("{name}_total")),
                "histogram" => ["", "_bucket", "_sum", "_count"].iter().all(|s| names.insert(format!("{name}{s}"))),
                _ => names.insert(name.to_string()),
            };
        }
        names
    }

    #[test]
    fn dashboards_alerts_and_docs_name_only_metrics_that_exist() {
        let names = exposed_names();
        for (file, text) in [
            ("deploy/prometheus/alerts.yml", include_str!("../deploy/prometheus/alerts.yml")),
            ("deploy/grafana/anomalyd.json", include_str!("../deploy/grafana/anomalyd.json")),
            ("docs/METRICS.md", include_str!("../docs/METRICS.md")),
        ] {
            let mut seen = 0;
            for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("anomalyd_") && word.len() > "anomalyd_".len() {
                    assert!(names.contains(word), "{file} names {word}, which anomalyd does not export: {names:?}");
                    seen += 1;
                }
            }
            assert!(seen > 3, "{file} names no metrics");
        }
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for n in exposed_names() {
            assert!(n.starts_with("anomalyd_"), "{n}");
        }
        let text = Metrics::new().encode();
        assert!(text.contains("# TYPE anomalyd_stage_seconds histogram"));
        assert!(text.contains("# TYPE anomalyd_frames counter"));
    }
}
