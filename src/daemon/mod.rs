//! `anomalyd run`: cameras → inspection → MQTT verdicts, with metrics, health and a flagged-frame
//! store. [`Daemon::start`] builds everything from a [`Config`]; [`Daemon::run`] serves until the
//! shutdown future resolves (or every replay source has ended), applying reloads and PLC commands as
//! they come; then it drains: sources stop, queued frames are inspected, every verdict is published,
//! `stopped` goes out, and only then does it return.
//!
//! Invariant: every frame a source offers leaves as exactly one verdict (see [`crate::source::intake::Intake`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use crate::config::Config;
use crate::config::detect::DetectConfig;
use crate::config::engine::EngineConfig;
use crate::control::broker::{self, Login};
use crate::control::http::{self, HttpState};
use crate::control::modbus::ModbusServer;
use crate::control::ui;
use crate::describe::explainer::{Description, Explainer, FrameFacts};
use crate::detect::detector::Detector;
use crate::detect::enrolment::EnrolmentMeta;
use crate::enrol::reference::{self, ReferenceError};
use crate::enrol::versions::Versions;
use crate::sink::audit::AuditLog;
use crate::sink::mqtt::{self, MqttState, Topics};
use crate::sink::outbox::{DeadLetters, Outbox};
use crate::sink::sparkplug;
use crate::sink::store::{Store, StoreJob};
use crate::source::{SourceEnd, SourceHandle};
use crate::telemetry::{Metrics, ModelLabels};
use crate::types::command::{self, Command, Refusal};
use crate::util::sync;

/// The states a camera reports on its retained state topic and in `anomalyd_camera_state`.
pub const CAMERA_STATES: [&str; 5] = ["streaming", "reconnecting", "failed", "ended", "stopped"];

pub mod line;
mod reload;
pub mod systemd;
pub mod worker;

use crate::config::daemon::{self as sections, CameraConfig};
use crate::source::intake::{self, CameraModel, CameraShared, Intake};
use crate::types::frame::Frame;
use crate::types::verdict::{self, EnrolmentRef, ModelRef, Outgoing, VerdictTx};

/// Every problem of a configuration on this machine: its values ([`Config::validate_all`]) and what
/// the machine lacks to run its cameras' sources ([`crate::source::check`]).
pub fn problems(cfg: &Config) -> Vec<String> {
    let mut p = cfg.validate_all();
    for (i, c) in cfg.camera.iter().enumerate() {
        p.extend(crate::source::check(&c.source, &format!("camera[{i}].source")));
    }
    p
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error("camera {camera}: {cause}")]
    Reference { camera: String, cause: ReferenceError },
    #[error("camera {camera}: {cause}")]
    Engine { camera: String, cause: crate::detect::inspection::DetectError },
    #[error(transparent)]
    Broker(#[from] crate::control::broker::BrokerError),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error(transparent)]
    Store(#[from] crate::sink::store::StoreError),
    #[error(transparent)]
    Outbox(#[from] crate::sink::outbox::OutboxError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Http(#[from] http::BindError),
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("camera {camera}: loading panicked")]
    LoadPanicked { camera: String },
    #[error("the daemon is stopping")]
    Stopping,
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("[llm]: {0}")]
    Llm(#[from] crate::describe::llm::LlmError),
    #[error(transparent)]
    Modbus(#[from] crate::control::modbus::BindError),
    #[cfg(feature = "opcua")]
    #[error(transparent)]
    OpcUa(#[from] crate::control::opcua::OpcUaError),
}

/// A running camera: its source thread, its queue's worker and the stop flag they share.
struct CameraRuntime {
    cfg: CameraConfig,
    stop: Arc<AtomicBool>,
    source: Option<SourceHandle>,
    worker: std::thread::JoinHandle<()>,
    /// How the source ended, once it has.
    ended: Option<SourceEnd>,
    restart_at: Option<Instant>,
    backoff: Duration,
    /// Restarts in a row that did not stream for long: 5 make the camera `failed`.
    failures: u32,
    started_at: Instant,
    queue_tx: crossbeam_channel::Sender<Frame>,
}

/// Why [`Daemon::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    SourcesEnded,
}

/// What a finished run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Verdicts the broker acknowledged.
    pub published: u64,
    /// Frames (verdicts produced) per camera.
    pub frames: BTreeMap<String, u64>,
    /// Most verdicts waiting in the outbox at once.
    pub max_backlog: u64,
    /// Broker reconnections.
    pub reconnects: u64,
    /// Verdicts the broker would not take, moved to the dead letters.
    pub dead_lettered: u64,
}

/// Notifications to the service manager (systemd); no-ops elsewhere.
pub trait Notifier: Send + Sync {
    fn ready(&self) {}
    fn reloading(&self) {}
    fn stopping(&self) {}
    fn watchdog(&self) {}
    fn status(&self, _msg: &str) {}
}

/// For runs outside systemd and tests.
#[derive(Debug, Default)]
pub struct NoNotify;
impl Notifier for NoNotify {}

/// What the HTTP server (and the operator station on it) is given at start.
struct HttpParts {
    store: Option<Arc<Store>>,
    commands: mpsc::UnboundedSender<Command>,
    mqtt_state: Arc<MqttState>,
    loaded: Arc<AtomicBool>,
    dead_letters: DeadLetters,
    /// Where audit entries are published: the notes channel and the audit topic.
    audit_notes: ui::AuditNotes,
}

/// The running HTTP API: its task and the signal that stops it.
struct HttpServer {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

/// Where a detector runs: the execution provider, the device and whether its engine came from a cache.
#[derive(Debug, Clone, Default)]
struct Placement {
    provider: String,
    device: String,
    engine_cache: String,
}

pub struct Daemon {
    cfg: Config,
    boot: String,
    metrics: Arc<Metrics>,
    verdict_tx: Option<VerdictTx>,
    publisher: tokio::task::JoinHandle<mqtt::LinkSummary>,
    states: StateReporter,
    commands: mpsc::UnboundedReceiver<Command>,
    shared: Arc<std::sync::Mutex<BTreeMap<String, Arc<CameraShared>>>>,
    cameras: BTreeMap<String, CameraRuntime>,
    store_tx: Option<crossbeam_channel::Sender<StoreJob>>,
    store_thread: Option<std::thread::JoinHandle<()>>,
    http: Option<HttpServer>,
    http_addr: Option<SocketAddr>,
    broker_addr: Option<SocketAddr>,
    loaded: Arc<AtomicBool>,
    /// Where the last loaded detector runs, for `anomalyd_model_info`.
    placement: Placement,
    /// The file reload commands read again (as SIGHUP does).
    config_path: Option<std::path::PathBuf>,
    model_labels: BTreeMap<String, ModelLabels>,
    /// Words for NG frames and the chat about them.
    explainer: Arc<Explainer>,
    /// Descriptions and chat answers to publish (topic, payload).
    notes_tx: mpsc::UnboundedSender<(String, Vec<u8>)>,
    /// A reload being built off the main loop, and requests waiting for it.
    reloading: reload::Reloading,
    /// When a refused trigger was last logged.
    trigger_flood_logged: Option<Instant>,
    /// The Modbus TCP server (`[modbus]`), when it is on, and its task.
    modbus: Option<(Arc<ModbusServer>, tokio::task::JoinHandle<()>)>,
    modbus_addr: Option<SocketAddr>,
    /// The OPC UA server (`[opcua]`), when it is on.
    #[cfg(feature = "opcua")]
    opcua: Option<Arc<crate::control::opcua::OpcUaServer>>,
}

impl Daemon {
    /// Starts the broker (if embedded), MQTT, the store, the HTTP API and every camera. Call from
    /// inside a multi-threaded tokio runtime.
    pub async fn start(cfg: Config) -> Result<Daemon, DaemonError> {
        let problems = problems(&cfg);
        if !problems.is_empty() {
            return Err(DaemonError::Invalid(problems));
        }
        let metrics = Arc::new(Metrics::new());
        let boot = format!("{:x}", verdict::unix_ms(SystemTime::now()));
        let (embedded, local_port, login) = start_broker(&cfg).await?;
        let node = cfg.daemon.node.clone();
        let embedded_login = local_port.zip(login).map(|(port, l)| (port, l.username, l.password));
        let options = mqtt::options(&cfg.mqtt, &node, embedded_login)?;
        let topics = Topics { prefix: cfg.mqtt.topic_prefix.clone(), node: node.clone() };
        let mqtt_state = Arc::new(MqttState::default());
        // Unbounded on purpose (docs/ARCHITECTURE.md, "Channels"): the frame path never waits for the
        // network. Verdicts and notes are drained by the link on every turn, connected or not, into the
        // byte-bounded outbox and the bounded note queue; commands and states come a few per operator
        // action or camera event and are consumed as they come.
        let (cmd_tx, commands) = mpsc::unbounded_channel();
        let http_commands = cmd_tx.clone();
        let (retained_tx, retained_rx) = mpsc::unbounded_channel();
        let (verdict_tx, verdict_rx) = mpsc::unbounded_channel::<Outgoing>();
        let (notes_tx, notes_rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let (outbox_path, outbox_max, outbox_metrics) =
            (cfg.outbox.path.clone(), cfg.outbox.max_bytes, metrics.clone());
        let outbox =
            tokio::task::spawn_blocking(move || Outbox::open(&outbox_path, outbox_max, outbox_metrics)).await??;
        let dead_letters = outbox.dead_letters();
        let mut command_token =
            sections::command_token(&cfg.mqtt).map_err(|e| DaemonError::Invalid(vec![e.to_string()]))?;
        if command_token.is_none() && embedded.is_some() {
            let (token, path) = broker::command_token(&state_dir(&cfg))?;
            tracing::info!("commands on the embedded broker carry \"token\": the first line of {}", path.display());
            command_token = Some(token);
        }
        let link = mqtt::Link {
            options,
            topics: topics.clone(),
            qos: mqtt::qos(cfg.mqtt.qos),
            state: mqtt_state.clone(),
            metrics: metrics.clone(),
            log: cfg.daemon.log_verdicts,
            drain: Duration::from_millis(cfg.daemon.drain_timeout_ms),
            outbox,
            commands: cmd_tx,
            command_token,
            retained: retained_rx,
            notes: notes_rx,
            sparkplug: cfg.mqtt.sparkplug.enabled.then(|| {
                let cameras: Vec<String> = cfg.camera.iter().map(|c| c.name.clone()).collect();
                sparkplug::Node::new(
                    &cfg.mqtt.sparkplug,
                    &node,
                    &cameras,
                    Some(state_dir(&cfg).join("sparkplug-bdseq")),
                )
            }),
        };
        let publisher = tokio::spawn(link.run(verdict_rx));

        let (store, store_tx, store_thread) = if cfg.store.dir.as_os_str().is_empty() {
            (None, None, None)
        } else {
            let store = Arc::new(Store::open(&cfg.store, metrics.clone())?);
            let (tx, th) = store.spawn_writer(16)?;
            (Some(store), Some(tx), Some(th))
        };

        let explainer = Arc::new(start_explainer(&cfg, &topics, &metrics, &notes_tx, store.clone()).await?);

        let shared: Arc<std::sync::Mutex<BTreeMap<String, Arc<CameraShared>>>> = Arc::default();
        let loaded = Arc::new(AtomicBool::new(false));
        let mut daemon = Daemon {
            cfg: cfg.clone(),
            boot,
            metrics: metrics.clone(),
            verdict_tx: Some(verdict_tx),
            publisher,
            states: StateReporter {
                metrics: metrics.clone(),
                retained: retained_tx,
                topics,
                #[cfg(feature = "opcua")]
                opcua: Default::default(),
            },
            commands,
            shared: shared.clone(),
            cameras: BTreeMap::new(),
            store_tx,
            store_thread,
            http: None,
            http_addr: None,
            broker_addr: embedded,
            loaded: loaded.clone(),
            placement: Placement::default(),
            config_path: None,
            model_labels: BTreeMap::new(),
            explainer: explainer.clone(),
            notes_tx,
            reloading: Default::default(),
            trigger_flood_logged: None,
            modbus: None,
            modbus_addr: None,
            #[cfg(feature = "opcua")]
            opcua: None,
        };

        if !cfg.http.listen.is_empty() {
            let audit_notes = (daemon.notes_tx.downgrade(), daemon.states.topics.audit());
            let parts = HttpParts { store, commands: http_commands, mqtt_state, loaded, dead_letters, audit_notes };
            daemon.start_http(&cfg, parts).await?;
        }

        // A PLC may connect while the cameras load: their units read not Ready until then.
        if !cfg.modbus.listen.is_empty()
            && let Err(e) = daemon.start_modbus(&cfg).await
        {
            daemon.abort().await;
            return Err(e);
        }
        #[cfg(feature = "opcua")]
        if !cfg.opcua.listen.is_empty()
            && let Err(e) = daemon.start_opcua(&cfg).await
        {
            daemon.abort().await;
            return Err(e);
        }
        for cam in cfg.camera.clone() {
            if let Err(e) = daemon.start_camera(cam, None).await {
                daemon.abort().await;
                return Err(e);
            }
        }
        daemon.loaded.store(true, Ordering::SeqCst);
        Ok(daemon)
    }

    /// Starts the Modbus TCP server on `modbus.listen`: unit `i + 1` is the `i`-th camera.
    async fn start_modbus(&mut self, cfg: &Config) -> Result<(), DaemonError> {
        let units: Vec<String> = cfg.camera.iter().map(|c| c.name.clone()).collect();
        let server = ModbusServer::new(&cfg.modbus, units.clone(), self.shared.clone(), self.metrics.clone());
        let (addr, task) = server.serve(&cfg.modbus).await?;
        let list: Vec<String> = units.iter().enumerate().map(|(i, n)| format!("{} = {n}", i + 1)).collect();
        tracing::info!("Modbus TCP on {addr} (units: {})", list.join(", "));
        self.modbus = Some((server, task));
        self.modbus_addr = Some(addr);
        Ok(())
    }

    pub fn modbus_addr(&self) -> Option<SocketAddr> {
        self.modbus_addr
    }

    /// Starts the OPC UA server on `opcua.listen`; each camera's nodes appear as it loads.
    #[cfg(feature = "opcua")]
    async fn start_opcua(&mut self, cfg: &Config) -> Result<(), DaemonError> {
        let pki = cfg.opcua.pki_dir.clone().unwrap_or_else(|| state_dir(cfg).join("opcua-pki"));
        let server = crate::control::opcua::OpcUaServer::start(
            &cfg.opcua,
            &cfg.daemon.node,
            &pki,
            self.shared.clone(),
            self.metrics.clone(),
        )
        .await?;
        tracing::info!("OPC UA on opc.tcp://{} (certificates in {})", server.addr(), pki.display());
        let _ = self.states.opcua.set(server.clone());
        self.opcua = Some(server);
        Ok(())
    }

    /// The OPC UA server's address, when it is on.
    #[cfg(feature = "opcua")]
    pub fn opcua_addr(&self) -> Option<SocketAddr> {
        self.opcua.as_ref().map(|o| o.addr())
    }

    #[cfg(feature = "opcua")]
    fn stop_opcua(&mut self) {
        if let Some(o) = self.opcua.take() {
            o.stop();
        }
    }

    /// After a reload: the Modbus units follow the cameras' order in the new configuration.
    fn modbus_follow(&self) {
        if let Some((m, _)) = &self.modbus {
            m.set_units(self.cfg.camera.iter().map(|c| c.name.clone()).collect());
        }
    }

    /// Starts the HTTP API on `http.listen`: metrics, health and readiness (cameras loaded, broker
    /// connected, no stalled worker), frames, and the commands that need the token.
    async fn start_http(&mut self, cfg: &Config, parts: HttpParts) -> Result<(), DaemonError> {
        let HttpParts { store, commands: http_commands, mqtt_state, loaded, dead_letters, audit_notes } = parts;
        let (listener, addr) = http::bind(&cfg.http.listen).await?;
        let ready_shared = self.shared.clone();
        let ready: http::ReadyFn = Arc::new(move || {
            let mut why = Vec::new();
            if !loaded.load(Ordering::SeqCst) {
                why.push("cameras are still loading their enrolments".to_string());
            }
            if !mqtt_state.connected.load(Ordering::SeqCst) {
                why.push("not connected to the MQTT broker".into());
            }
            if mqtt_state.outbox_down.load(Ordering::SeqCst) {
                why.push("the outbox is not writable (disk full or failing); verdicts wait in memory".into());
            }
            for (name, cam) in sync::lock(&ready_shared).iter() {
                let age = cam.worker_silent_ms();
                if age > intake::WORKER_STALL_MS {
                    why.push(format!("camera {name}'s inspection worker has not responded for {age} ms"));
                }
            }
            if why.is_empty() { Ok(()) } else { Err(why) }
        });
        let token = sections::http_token(&cfg.http).map_err(|e| DaemonError::Invalid(vec![e.to_string()]))?;
        let mut router = http::router(HttpState {
            metrics: self.metrics.clone(),
            store: store.clone(),
            ready,
            commands: http_commands.clone(),
            token,
            protect_reads: cfg.http.protect_reads,
            explainer: self.explainer.clone(),
            enrolments: cfg.daemon.enrolments.clone(),
            dead_letters,
            cameras: self.shared.clone(),
        });
        // Live pages end their streams when the server stops, so that the graceful shutdown does not wait.
        let (pages_stop, pages_stopped) = tokio::sync::watch::channel(false);
        if cfg.ui.enabled {
            let audit_path = cfg.ui.audit.clone().unwrap_or_else(|| state_dir(cfg).join("audit.jsonl"));
            let audit = AuditLog::open(&audit_path).map_err(|e| DaemonError::Invalid(vec![e.to_string()]))?;
            let station = ui::Ui::new(
                &cfg.ui,
                ui::UiParts {
                    node: cfg.daemon.node.clone(),
                    metrics: self.metrics.clone(),
                    protect_reads: cfg.http.protect_reads,
                    cameras: self.shared.clone(),
                    store,
                    explainer: self.explainer.clone(),
                    audit,
                    notes: Some(audit_notes),
                    commands: http_commands,
                    teacher: ui::teach::Teacher::new(cfg.engine.clone(), cfg.detect.clone()),
                    enrolments: cfg.daemon.enrolments.clone(),
                    stop: pages_stopped.clone(),
                },
            );
            tokio::spawn(station.board.clone().run(self.shared.clone(), pages_stopped));
            if cfg.ui.operator.is_empty() {
                tracing::warn!("the operator station is read-only: no [[ui.operator]] is configured (anomalyd passwd)");
            }
            router = router.merge(ui::router(station));
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = stop_rx.await;
                let _ = pages_stop.send(true);
            });
            if let Err(e) = serve.await {
                tracing::error!("HTTP API stopped: {e}");
            }
        });
        tracing::info!("HTTP API on http://{addr} (/metrics, /healthz, /readyz, /v1/frames/ID, /v1/frames/ID/chat)");
        if cfg.ui.enabled {
            tracing::info!("operator station on http://{addr}/ui/");
        }
        self.http = Some(HttpServer { task, stop: stop_tx });
        self.http_addr = Some(addr);
        Ok(())
    }

    /// The configuration file that reload commands (MQTT, HTTP) read again, as SIGHUP does.
    pub fn set_config_path(&mut self, path: Option<std::path::PathBuf>) {
        self.config_path = path;
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.broker_addr
    }

    /// Loads a camera's detector and model (off the async threads), then starts its worker and source.
    /// `existing` keeps the frame numbering of a camera restarted by a reload.
    async fn start_camera(
        &mut self,
        cam: CameraConfig,
        existing: Option<Arc<CameraShared>>,
    ) -> Result<(), DaemonError> {
        let (engine, detect) = (self.cfg.engine.clone(), self.cfg.detect.clone());
        let enrolments = self.cfg.daemon.enrolments.clone();
        let (detector, models) = build_camera(engine, detect, enrolments, cam.clone()).await?;
        self.launch_camera(cam, existing, detector, models).await
    }

    /// Starts a camera whose detector and model are built: its worker, then its source.
    async fn launch_camera(
        &mut self,
        cam: CameraConfig,
        existing: Option<Arc<CameraShared>>,
        detector: Detector,
        models: Vec<Arc<CameraModel>>,
    ) -> Result<(), DaemonError> {
        let Some(first) = models.first().cloned() else {
            return Err(DaemonError::Invalid(vec![format!("camera {} has no enrolment", cam.name)]));
        };
        self.placement = Placement {
            provider: detector.encoder().provider().to_string(),
            device: detector.device(),
            engine_cache: detector.engine_cache().to_string(),
        };
        let Some(verdict_tx) = self.verdict_tx.clone() else {
            return Err(DaemonError::Stopping);
        };
        let start = cam.start_recipe.as_deref();
        let shared = match existing {
            Some(s) => {
                s.set_models(models, start);
                s
            }
            None => {
                let s = Arc::new(CameraShared::new(
                    &cam.name,
                    &self.cfg.daemon.node,
                    &self.boot,
                    first,
                    verdict_tx,
                    self.metrics.clone(),
                ));
                s.set_models(models, start);
                if let Some(r) = start {
                    let _ = s.select_recipe(r);
                }
                s
            }
        };
        self.recipe_metrics(&shared);
        shared.set_trigger(cam.trigger, Duration::from_millis(cam.trigger_timeout_ms));
        sync::lock(&self.shared).insert(cam.name.clone(), shared.clone());
        #[cfg(feature = "opcua")]
        if let Some(o) = &self.opcua {
            o.attach(&shared);
        }
        self.metrics.queue_capacity(&cam.name, cam.queue);
        let (queue_tx, queue_rx) = crossbeam_channel::bounded(cam.queue);
        let worker = worker::Worker {
            cam: shared.clone(),
            rx: queue_rx,
            detector,
            max_age: Duration::from_millis(cam.max_age_ms),
            delay: Duration::from_millis(self.cfg.daemon.inspect_delay_ms),
            store: self.store_tx.clone(),
            explainer: self.explainer.clone(),
            line: line::LineWatches::new(line::LineSetup {
                cam: shared.clone(),
                engine: self.cfg.engine.clone(),
                detect: self.cfg.detect.clone(),
                retained: self.states.retained.clone(),
                drift_topic: self.states.topics.drift(&cam.name),
            }),
        }
        .spawn()?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut rt = CameraRuntime {
            cfg: cam.clone(),
            stop: stop.clone(),
            source: None,
            worker,
            ended: None,
            restart_at: None,
            backoff: Duration::from_millis(500),
            failures: 0,
            started_at: Instant::now(),
            queue_tx,
        };
        match self.start_source(&mut rt, &shared) {
            Ok(()) => {}
            Err(e) => {
                // Nothing has entered yet: stop the worker and report.
                drop(rt.queue_tx);
                let _ = tokio::task::spawn_blocking(move || rt.worker.join()).await;
                return Err(e);
            }
        }
        tracing::info!(
            camera = %cam.name,
            "camera {} started: source {}, trigger {:?}, queue {}",
            cam.name,
            cam.source.kind(),
            cam.trigger,
            cam.queue
        );
        self.cameras.insert(cam.name.clone(), rt);
        Ok(())
    }

    fn start_source(&self, rt: &mut CameraRuntime, shared: &Arc<CameraShared>) -> Result<(), DaemonError> {
        let intake = Intake::new(shared.clone(), rt.queue_tx.clone(), rt.cfg.source.is_live(), rt.stop.clone());
        let handle = rt.cfg.source.start(intake)?;
        self.metrics.camera_up(&rt.cfg.name, true);
        rt.source = Some(handle);
        rt.ended = None;
        rt.started_at = Instant::now();
        self.states.set(&rt.cfg.name, "streaming");
        Ok(())
    }

    /// A camera's recipes: the memory each takes, which one is in use, and the model metric of that one.
    fn recipe_metrics(&mut self, cam: &CameraShared) {
        let active = cam.model();
        for m in cam.models() {
            if let Some(r) = &m.recipe {
                let on = Arc::ptr_eq(&m, &active);
                self.metrics.recipe(&cam.name, r, m.enrolment.bytes(), on);
            }
        }
        self.model_metric(&cam.name, &active);
    }

    fn model_metric(&mut self, camera: &str, m: &CameraModel) {
        let labels = ModelLabels {
            camera: camera.into(),
            model: m.model.name.clone(),
            sha256: m.model.sha256.clone(),
            provider: self.placement.provider.clone(),
            device: self.placement.device.clone(),
            engine_cache: self.placement.engine_cache.clone(),
            enrolment: m.enrolment_ref.id.clone(),
        };
        let old = self.model_labels.insert(camera.into(), labels.clone());
        self.metrics.model_in_use(&labels, old.as_ref());
    }

    /// Line mode swaps a camera's model by itself when learning ends: the model metric follows.
    fn follow_learned_models(&mut self) {
        let cams: Vec<(String, Arc<CameraModel>)> =
            sync::lock(&self.shared).iter().map(|(n, c)| (n.clone(), c.model())).collect();
        for (name, model) in cams {
            if self.model_labels.get(&name).is_some_and(|l| l.enrolment != model.enrolment_ref.id) {
                self.model_metric(&name, &model);
            }
        }
    }

    /// Serves until `shutdown` resolves or (with `daemon.exit_when_sources_end`) every source has
    /// ended; each message on `reloads` (SIGHUP) reads the configuration file again and applies it, as
    /// a reload command does. Then drains and returns.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
        mut reloads: mpsc::Receiver<()>,
        notifier: &dyn Notifier,
    ) -> (StopReason, Summary) {
        notifier.ready();
        notifier.status("inspecting");
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tokio::pin!(shutdown);
        let reason = loop {
            tokio::select! {
                _ = &mut shutdown => break StopReason::Signal,
                Some(()) = reloads.recv() => {
                    notifier.reloading();
                    self.request_reload("SIGHUP");
                    if !self.reload_building() {
                        notifier.ready();
                    }
                }
                Some(cmd) = self.commands.recv() => self.command(cmd).await,
                built = reload::built(&mut self.reloading) => {
                    self.finish_reload(built).await;
                    notifier.ready();
                }
                _ = tick.tick() => {
                    if self.healthy() {
                        notifier.watchdog();
                    }
                    self.follow_learned_models();
                    self.reload_if_due();
                    if self.poll_sources() {
                        tracing::info!("every source has ended; draining and stopping");
                        break StopReason::SourcesEnded;
                    }
                }
            }
        };
        notifier.stopping();
        notifier.status("draining");
        let summary = self.shutdown().await;
        (reason, summary)
    }

    fn healthy(&self) -> bool {
        sync::lock(&self.shared).values().all(|c| c.worker_silent_ms() <= intake::WORKER_STALL_MS)
    }

    fn reload_failed(&self, why: &str) {
        self.metrics.reload("failed");
        tracing::error!("reload refused, keeping the running configuration: {why}");
    }

    /// A trigger beyond [`intake::MAX_PENDING_TRIGGERS`]: no verdict (it would only be an ERROR), a
    /// reply on the command response topic, and a log line at most every 10 s.
    fn trigger_refused(&mut self, camera: &str, part_id: &str) {
        let refusal = Refusal::RateLimited(format!(
            "{} triggers already wait for a frame on camera {camera}",
            intake::MAX_PENDING_TRIGGERS
        ));
        let mut body = command::reply(None, Some("trigger"), Some(&refusal));
        body["part_id"] = part_id.into();
        let _ =
            self.notes_tx.send((self.states.topics.command_response(), serde_json::to_vec(&body).unwrap_or_default()));
        self.metrics.command(refusal.kind());
        if self.trigger_flood_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!(
                camera = %camera,
                "trigger refused: {} triggers already wait for a frame (a flood, or the camera delivers no frames)",
                intake::MAX_PENDING_TRIGGERS
            );
            self.trigger_flood_logged = Some(Instant::now());
        }
    }

    /// A recipe switch: from the camera's next frame on, `product`'s recipe judges its parts. Answered
    /// on the command response topic, accepted or refused (an unknown camera or product).
    fn select_recipe(&mut self, camera: &str, product: &str, request_id: Option<String>) {
        let cam = sync::lock(&self.shared).get(camera).cloned();
        let outcome = match &cam {
            None => Err(Refusal::Unknown(format!("no camera {camera:?} is configured"))),
            Some(c) => c.switch_recipe(product).map_err(|e| Refusal::Unknown(e.to_string())),
        };
        match (&outcome, &cam) {
            (Ok(_), Some(c)) => {
                self.metrics.command("accepted");
                self.model_metric(camera, &c.model());
            }
            (Err(r), _) => {
                self.metrics.command(r.kind());
                tracing::warn!("recipe switch refused: {r}");
            }
            _ => {}
        }
        let body = command::reply(request_id.as_deref(), Some("recipe"), outcome.as_ref().err());
        let _ =
            self.notes_tx.send((self.states.topics.command_response(), serde_json::to_vec(&body).unwrap_or_default()));
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Trigger { camera, part_id, product } => {
                let cam = sync::lock(&self.shared).get(&camera).cloned();
                match cam {
                    Some(c) if c.trigger_mode() == sections::Trigger::Triggered => {
                        if c.trigger(part_id.clone(), product) == intake::Triggered::Full {
                            self.trigger_refused(&camera, &part_id);
                        }
                    }
                    Some(_) => tracing::warn!("trigger for camera {camera} ignored: its trigger mode is every-frame"),
                    None => tracing::warn!("trigger for unknown camera {camera:?} ignored"),
                }
            }
            Command::Recipe { camera, product, request_id } => self.select_recipe(&camera, &product, request_id),
            Command::Reload => self.request_reload("reload requested"),
            Command::Chat { frame_id, question, request_id } => {
                let (explainer, notes, topic) =
                    (self.explainer.clone(), self.notes_tx.clone(), self.states.topics.chat_response());
                tokio::spawn(async move {
                    let id = frame_id.clone();
                    let answer = tokio::task::spawn_blocking(move || explainer.chat(&id, &question)).await;
                    let mut body = match answer {
                        Ok(Ok(a)) => serde_json::to_value(&a).unwrap_or_default(),
                        Ok(Err(e)) => serde_json::json!({"frame_id": frame_id, "error": e.to_string()}),
                        Err(e) => serde_json::json!({"frame_id": frame_id, "error": format!("internal error: {e}")}),
                    };
                    body["request_id"] = serde_json::json!(request_id);
                    let _ = notes.send((topic, serde_json::to_vec(&body).unwrap_or_default()));
                });
            }
        }
    }

    /// Checks finished sources and restarts failed live ones with exponential backoff (and jitter).
    /// Returns true when every camera's source has ended for good.
    fn poll_sources(&mut self) -> bool {
        for shared in sync::lock(&self.shared).values() {
            shared.expire_triggers();
        }
        let names: Vec<String> = self.cameras.keys().cloned().collect();
        for name in names {
            let Some(rt) = self.cameras.get_mut(&name) else { continue };
            if let Some(h) = rt.source.take_if(|h| h.thread.is_finished()) {
                let end = h.thread.join().unwrap_or_else(|_| SourceEnd::Failed("source thread panicked".into()));
                self.metrics.camera_up(&name, false);
                if rt.started_at.elapsed() > Duration::from_secs(10) {
                    // It streamed for a while: this is a new fault, not the same one again.
                    rt.failures = 0;
                    rt.backoff = Duration::from_millis(500);
                }
                match &end {
                    SourceEnd::Eos if rt.cfg.source.ends_by_itself() => {
                        tracing::info!(camera = %name, "source finished");
                        self.states.set(&name, "ended");
                    }
                    SourceEnd::Stopped => {}
                    other => {
                        rt.failures += 1;
                        self.states.set(&name, if rt.failures >= 5 { "failed" } else { "reconnecting" });
                        let jitter = 0.8
                            + 0.4
                                * (SystemTime::now()
                                    .duration_since(SystemTime::UNIX_EPOCH)
                                    .unwrap_or_default()
                                    .subsec_nanos() as f64
                                    / 1e9);
                        let wait = rt.backoff.mul_f64(jitter);
                        tracing::warn!(camera = %name, "source ended ({other:?}); restarting in {} ms", wait.as_millis());
                        rt.restart_at = Some(Instant::now() + wait);
                        rt.backoff = (rt.backoff * 2).min(Duration::from_secs(30));
                    }
                }
                rt.ended = Some(end);
            }
            if rt.restart_at.is_some_and(|t| Instant::now() >= t) {
                rt.restart_at = None;
                let shared = sync::lock(&self.shared).get(&name).cloned();
                if let (Some(shared), Some(mut rt)) = (shared, self.cameras.remove(&name)) {
                    if let Err(e) = self.start_source(&mut rt, &shared) {
                        tracing::warn!(camera = %name, "restart failed: {e}");
                        rt.failures += 1;
                        self.states.set(&name, if rt.failures >= 5 { "failed" } else { "reconnecting" });
                        rt.restart_at = Some(Instant::now() + rt.backoff);
                        rt.backoff = (rt.backoff * 2).min(Duration::from_secs(30));
                    }
                    self.cameras.insert(name, rt);
                }
            }
        }
        self.cfg.daemon.exit_when_sources_end
            && !self.cameras.is_empty()
            && self.cameras.values().all(|c| c.source.is_none() && c.restart_at.is_none() && c.ended.is_some())
    }

    /// Stops sources, inspects what is queued, publishes every verdict and `stopped`, closes MQTT,
    /// the store and the HTTP API.
    pub async fn shutdown(mut self) -> Summary {
        // The PLC's handshake stops first: a trigger it took now could not be answered.
        self.stop_modbus();
        let frames = self.stop_frame_path().await;
        // OPC UA after the frame path, so the drained frames' results are shown.
        #[cfg(feature = "opcua")]
        self.stop_opcua();
        let link = (&mut self.publisher).await.unwrap_or_default();
        let published = link.acked;
        drop(self.store_tx.take());
        if let Some(t) = self.store_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.stop_http(Some(Duration::from_secs(2))).await;
        tracing::info!("stopped after publishing {published} verdict(s)");
        Summary {
            published,
            frames,
            max_backlog: link.max_backlog,
            reconnects: link.reconnects,
            dead_lettered: link.dead_lettered,
        }
    }

    /// Tears down after a failed start: the same steps as [`Daemon::shutdown`] up to the publisher,
    /// which a failed start may not have.
    async fn abort(&mut self) {
        self.stop_modbus();
        #[cfg(feature = "opcua")]
        self.stop_opcua();
        self.stop_frame_path().await;
        self.stop_http(None).await;
    }

    /// The frame path, stopped in order: every source at once, then each camera's worker empties its
    /// queue (state `stopped`), then the explainer gives every NG frame its description, and only then
    /// is the verdict channel closed, so the publisher sees every verdict. Returns each camera's frame
    /// count.
    async fn stop_frame_path(&mut self) -> BTreeMap<String, u64> {
        for rt in self.cameras.values() {
            rt.stop.store(true, Ordering::SeqCst);
        }
        let cams: Vec<CameraRuntime> = std::mem::take(&mut self.cameras).into_values().collect();
        for rt in cams {
            let name = rt.cfg.name.clone();
            stop_camera(rt).await;
            self.states.set(&name, "stopped");
        }
        let frames: BTreeMap<String, u64> =
            sync::lock(&self.shared).iter().map(|(n, c)| (n.clone(), c.frames())).collect();
        sync::lock(&self.shared).clear();
        let explainer = self.explainer.clone();
        let _ = tokio::task::spawn_blocking(move || explainer.shutdown()).await;
        drop(self.verdict_tx.take());
        frames
    }

    fn stop_modbus(&mut self) {
        if let Some((_, task)) = self.modbus.take() {
            task.abort();
        }
    }

    /// Stops the HTTP API, waiting up to `wait` for it to finish.
    async fn stop_http(&mut self, wait: Option<Duration>) {
        if let Some(HttpServer { task, stop }) = self.http.take() {
            let _ = stop.send(());
            if let Some(w) = wait {
                let _ = tokio::time::timeout(w, task).await;
            }
        }
    }
}

/// Reports camera states: a retained `<prefix>/<node>/<camera>/state` message and the metric.
struct StateReporter {
    metrics: Arc<Metrics>,
    retained: mpsc::UnboundedSender<(String, String)>,
    topics: Topics,
    /// The OPC UA server, once it has started: its `State` variables follow.
    #[cfg(feature = "opcua")]
    opcua: std::sync::OnceLock<Arc<crate::control::opcua::OpcUaServer>>,
}

impl StateReporter {
    fn set(&self, camera: &str, state: &str) {
        self.metrics.camera_state(camera, state, &CAMERA_STATES);
        let _ = self.retained.send((self.topics.camera_state(camera), state.to_string()));
        #[cfg(feature = "opcua")]
        if let Some(o) = self.opcua.get() {
            o.set_state(camera, state);
        }
    }
}

/// Starts the embedded broker when `mqtt.broker = "embedded"`: its address, the local port to publish
/// to, and the login it accepts. Its port taken by something else is an error (name that broker in
/// `mqtt.broker` to publish there).
async fn start_broker(cfg: &Config) -> Result<(Option<SocketAddr>, Option<u16>, Option<Login>), DaemonError> {
    if cfg.mqtt.broker != "embedded" {
        return Ok((None, None, None));
    }
    let port = cfg.mqtt.embedded_port;
    let login = broker::login(&cfg.mqtt, &state_dir(cfg))?;
    let l = login.clone();
    let addr = tokio::task::spawn_blocking(move || broker::start(port, &l)).await??;
    Ok((Some(addr), Some(port), Some(login)))
}

/// The folder of the daemon's own state: the outbox's.
pub fn state_dir(cfg: &Config) -> std::path::PathBuf {
    cfg.outbox.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// Opens the `[llm]` backend (off the async threads: a model takes seconds to load) and starts the
/// explainer, whose descriptions go to `<prefix>/<node>/<camera>/description`. Frames not in memory are
/// read back from the flagged-frame store for chat.
async fn start_explainer(
    cfg: &Config,
    topics: &Topics,
    metrics: &Arc<Metrics>,
    notes: &mpsc::UnboundedSender<(String, Vec<u8>)>,
    store: Option<Arc<Store>>,
) -> Result<Explainer, DaemonError> {
    let llm = cfg.llm.clone();
    let engine = tokio::task::spawn_blocking(move || crate::describe::llm::open(&llm)).await??;
    let (tx, t) = (notes.clone(), topics.clone());
    let publish: crate::describe::explainer::Publish = Arc::new(move |d: Description| {
        let _ = tx.send((t.description(&d.camera), serde_json::to_vec(&d).unwrap_or_default()));
    });
    let products: BTreeMap<String, Option<String>> =
        cfg.camera.iter().map(|c| (c.name.clone(), c.product.clone())).collect();
    let stored = store.clone();
    let lookup: Option<crate::describe::explainer::Lookup> = store.map(|store| {
        let f: crate::describe::explainer::Lookup = Arc::new(move |id: &str| stored_facts(&store, id, &products));
        f
    });
    let explainer = Explainer::start(&cfg.llm, engine, &cfg.daemon.node, metrics.clone(), publish, lookup)?;
    // The cameras' earlier NG frames (from before a restart) answer "same place as the last NG?".
    if let Some(store) = stored {
        let recent = tokio::task::spawn_blocking(move || {
            store.recent(256).iter().filter_map(|id| stored_facts(&store, id, &BTreeMap::new())).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for f in &recent {
            explainer.remember_past(f);
        }
    }
    Ok(explainer)
}

/// An NG frame's findings, read back from the flagged-frame store.
fn stored_facts(store: &Store, id: &str, products: &BTreeMap<String, Option<String>>) -> Option<FrameFacts> {
    let bytes = store.get(id, crate::sink::store::Part::Verdict)?;
    let m: verdict::VerdictMessage = serde_json::from_slice(&bytes).ok()?;
    if m.verdict != verdict::Outcome::Ng {
        return None;
    }
    Some(FrameFacts {
        frame_id: m.frame_id,
        captured_unix_ms: m.captured_unix_ms,
        findings: crate::types::findings::Findings {
            anomalous: true,
            score: m.score.unwrap_or_default(),
            threshold: m.threshold.unwrap_or_default(),
            regions: m.regions,
            // A recipe camera's words are its recipe's; the name stands in for them here.
            product: products.get(&m.camera).cloned().flatten().or(m.product),
            // The regions' own labels are the classes known here.
            classes: Vec::new(),
        },
        camera: m.camera,
    })
}

/// Same source, trigger mode and queue: the camera keeps running and only its model is swapped.
fn same_pipeline(a: &CameraConfig, b: &CameraConfig) -> bool {
    a.source == b.source && a.trigger == b.trigger && a.queue == b.queue && a.max_age_ms == b.max_age_ms
}

/// Stops a camera's source, then lets its worker inspect what is queued and finish.
async fn stop_camera(rt: CameraRuntime) {
    rt.stop.store(true, Ordering::SeqCst);
    let CameraRuntime { source, worker, queue_tx, cfg, .. } = rt;
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(h) = source {
            let _ = h.thread.join();
        }
        drop(queue_tx);
        let _ = worker.join();
    })
    .await;
    tracing::info!(camera = %cfg.name, "camera stopped");
}

/// A camera's detector and model, built on a thread of its own at inspection priority (the encoder
/// threads it starts inherit it).
async fn build_camera(
    engine: EngineConfig,
    detect: DetectConfig,
    enrolments: std::path::PathBuf,
    cam: CameraConfig,
) -> Result<(Detector, Vec<Arc<CameraModel>>), DaemonError> {
    let name = cam.name.clone();
    let joined = tokio::task::spawn_blocking(move || -> Result<(Detector, Vec<Arc<CameraModel>>), DaemonError> {
        let camera = cam.name.clone();
        let loader = std::thread::Builder::new().name(format!("load-{camera}")).spawn(move || {
            crate::util::priority::yield_to_io();
            let mut det = load_detector(&engine, &cam.name)?;
            let models = build_models(&mut det, &cam, &detect, &enrolments)?;
            Ok((det, models))
        })?;
        loader.join().map_err(|_| DaemonError::LoadPanicked { camera })?
    })
    .await;
    joined.map_err(|_| DaemonError::LoadPanicked { camera: name })?
}

pub(crate) fn load_detector(engine: &EngineConfig, camera: &str) -> Result<Detector, DaemonError> {
    Detector::load(engine).map_err(|cause| DaemonError::Engine { camera: camera.into(), cause })
}

/// A camera's models: one per `[[camera.recipe]]`, all loaded now (each is reported with its memory),
/// then one per product enrolled from the operator station ([`crate::enrol::products`]); or the one of
/// its reference. The first failure of a configured recipe refuses them all.
pub(crate) fn build_models(
    det: &mut Detector,
    cam: &CameraConfig,
    detect: &DetectConfig,
    enrolments: &Path,
) -> Result<Vec<Arc<CameraModel>>, DaemonError> {
    if cam.recipe.is_empty() {
        return Ok(vec![Arc::new(build_model(det, cam, None, detect, enrolments)?)]);
    }
    let mut models = Vec::with_capacity(cam.recipe.len());
    for r in &cam.recipe {
        let m = build_model(det, cam, Some(r), detect, enrolments)?;
        tracing::info!(
            camera = %cam.name,
            "recipe {} loaded: enrolment {}, {:.1} MiB",
            r.name,
            m.enrolment_ref.id,
            m.enrolment.bytes() as f64 / (1 << 20) as f64
        );
        models.push(Arc::new(m));
    }
    // Products enrolled from the operator station: a folder that no longer enrols is reported and left
    // out, so that it never keeps the camera from starting.
    if !enrolments.as_os_str().is_empty() {
        for r in crate::enrol::products::list(enrolments, &cam.name) {
            if cam.recipe.iter().any(|c| c.name == r.name) {
                tracing::warn!(camera = %cam.name, "station product {} has the name of a configured recipe: skipped", r.name);
                continue;
            }
            match build_model(det, cam, Some(&r), detect, enrolments) {
                Ok(m) => {
                    tracing::info!(camera = %cam.name, "station product {} loaded: enrolment {}", r.name, m.enrolment_ref.id);
                    models.push(Arc::new(m));
                }
                Err(e) => tracing::error!(camera = %cam.name, "station product {} left out: {e}", r.name),
            }
        }
    }
    Ok(models)
}

/// One enrolment of a camera: the recipe's reference, the camera's (file or folder), or the built-in
/// demo part; then, where line mode has learned from this reference before, the active learned version
/// (`daemon.enrolments`).
fn build_model(
    det: &mut Detector,
    cam: &CameraConfig,
    recipe: Option<&sections::RecipeConfig>,
    detect: &DetectConfig,
    enrolments: &Path,
) -> Result<CameraModel, DaemonError> {
    let err = |cause| DaemonError::Reference { camera: cam.name.clone(), cause };
    let name = cam.name.clone();
    let mut progress = move |m: &str| tracing::info!(camera = %name, "{m}");
    let reference = recipe.map(|r| &r.reference).or(cam.reference.as_ref());
    let (enrolment, source) = match reference {
        Some(r) => (reference::load(det, r, detect, &mut progress).map_err(err)?, r.display().to_string()),
        None => {
            let refs = crate::source::demo::reference();
            let e = det.enroll(&refs, detect, &mut progress).map_err(|e| err(ReferenceError::Detect(e)))?;
            (e, "built-in demo part".into())
        }
    };
    let base_id = enrolment_id(&enrolment);
    // The versions belong to the reference, which a folder re-enrols at every start and reload: its
    // identity leaves out the moment of enrolment.
    let reference_id = crate::enrol::file::id_of(&crate::enrol::file::encode(
        &EnrolmentMeta { created_unix: 0, ..enrolment.meta.clone() },
        &enrolment.banks,
    ));
    let enc = det.encoder();
    let mut model = CameraModel {
        recipe: recipe.map(|r| r.name.clone()),
        words: recipe.and_then(|r| r.product.clone()).or_else(|| cam.product.clone()),
        enrolment,
        model: ModelRef { name: enc.manifest().name.clone(), sha256: enc.model_sha256().to_string() },
        enrolment_ref: EnrolmentRef { id: base_id.clone(), source },
        learn_parts: (cam.learn_parts > 0).then_some(cam.learn_parts),
        versions: None,
    };
    if enrolments.as_os_str().is_empty() {
        return Ok(model);
    }
    // A recipe's versions are kept apart from the other recipes' of the camera.
    let key = recipe.map_or_else(|| cam.name.clone(), |r| format!("{}.{}", cam.name, r.name));
    let versions = match Versions::open(enrolments, &key, &reference_id) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(camera = %cam.name, "{e}: what this camera learns will not be kept");
            return Ok(model);
        }
    };
    match versions.active() {
        Ok(None) => {}
        Ok(Some(0)) => {
            tracing::info!(camera = %cam.name, "the base enrolment is active (rolled back): not learning");
            model.learn_parts = None;
        }
        Ok(Some(n)) => match versions.load(n) {
            Ok(e) => {
                det.check(&e).map_err(|e| err(ReferenceError::Detect(e)))?;
                tracing::info!(camera = %cam.name, "learned enrolment version {n} in use");
                model.enrolment_ref = EnrolmentRef {
                    id: enrolment_id(&e),
                    source: format!("{} (learned version {n})", model.enrolment_ref.source),
                };
                model.enrolment = e;
                model.learn_parts = None;
            }
            Err(e) => {
                tracing::error!(camera = %cam.name, "{e}: inspecting with the base enrolment, not learning");
                model.learn_parts = None;
            }
        },
        Err(e) => {
            tracing::error!(camera = %cam.name, "{e}: inspecting with the base enrolment, not learning");
            model.learn_parts = None;
        }
    }
    model.versions = Some(versions);
    Ok(model)
}

/// First 16 hex digits of an enrolment's sha256: changes whenever the enrolment does.
pub fn enrolment_id(e: &crate::detect::enrolment::Enrolment) -> String {
    crate::enrol::file::id(e)
}
