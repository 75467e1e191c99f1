//! The MQTT side: verdicts out, PLC commands in, availability on a retained status topic.
//!
//! Topics (under `mqtt.topic_prefix`, default `anomalyd`; `docs/MQTT.md` is the contract):
//! - `<prefix>/<node>/<camera>/verdict`: one JSON verdict per frame, QoS `mqtt.qos`.
//! - `<prefix>/<node>/status`: retained `online`; the broker publishes `offline` (last will) if the
//!   daemon vanishes; `stopped` after a clean exit.
//! - `<prefix>/<node>/cmd`: commands, e.g. `{"cmd":"trigger","camera":"cam1","part_id":"P-1"}`.
//! - `<prefix>/<node>/<camera>/description`: the words for each NG frame, after its verdict, keyed by
//!   frame id (`describe::explainer::Description`).
//! - `<prefix>/<node>/chat/request` → `<prefix>/<node>/chat/response`: questions about a frame,
//!   `{"frame_id":"…","question":"…","request_id":"…"}`, answered with the same `request_id`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, Event, Incoming, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::config::daemon::{LogVerdicts, MqttConfig, broker_addr, read_secret};
use crate::sink::outbox::Outbox;
use crate::telemetry::Metrics;
use crate::types::verdict::{self, Outcome, Outgoing, VerdictMessage};

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt.broker = {0:?}: use \"embedded\" or \"host:port\"")]
    Address(String),
    #[error("cannot read {what} {path}: {cause}")]
    Read { what: &'static str, path: std::path::PathBuf, cause: std::io::Error },
}

/// Topic names of one node.
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
    pub node: String,
}

impl Topics {
    pub fn verdict(&self, camera: &str) -> String {
        format!("{}/{}/{camera}/verdict", self.prefix, self.node)
    }
    pub fn status(&self) -> String {
        format!("{}/{}/status", self.prefix, self.node)
    }
    pub fn camera_state(&self, camera: &str) -> String {
        format!("{}/{}/{camera}/state", self.prefix, self.node)
    }
    pub fn drift(&self, camera: &str) -> String {
        format!("{}/{}/{camera}/drift", self.prefix, self.node)
    }
    pub fn command(&self) -> String {
        format!("{}/{}/cmd", self.prefix, self.node)
    }
    pub fn description(&self, camera: &str) -> String {
        format!("{}/{}/{camera}/description", self.prefix, self.node)
    }
    pub fn chat_request(&self) -> String {
        format!("{}/{}/chat/request", self.prefix, self.node)
    }
    pub fn chat_response(&self) -> String {
        format!("{}/{}/chat/response", self.prefix, self.node)
    }
}

/// A command received on the command topic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Inspect the camera's next frame under this part id.
    Trigger { camera: String, part_id: String },
    /// Reload the configuration and enrolments (as SIGHUP does).
    Reload,
    /// A question about a frame; the answer goes to the chat response topic with the same request id.
    Chat {
        frame_id: String,
        question: String,
        #[serde(default)]
        request_id: Option<String>,
    },
}

/// A question on the chat request topic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    frame_id: String,
    question: String,
    #[serde(default)]
    request_id: Option<String>,
}

/// Notes (descriptions, chat answers) kept in memory while the broker is away; the oldest are dropped
/// beyond this, counted in `anomalyd_notes_dropped_total`.
const MAX_PENDING_NOTES: usize = 1024;

/// Connection state shared with the daemon and the HTTP API.
#[derive(Debug, Default)]
pub struct MqttState {
    pub connected: AtomicBool,
}

pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Builds the client options: broker address, client id, credentials, TLS and last will.
pub fn options(cfg: &MqttConfig, node: &str, embedded: Option<u16>) -> Result<MqttOptions, MqttError> {
    let (host, port) = match embedded {
        Some(p) => ("127.0.0.1".to_string(), p),
        None => broker_addr(&cfg.broker).ok_or_else(|| MqttError::Address(cfg.broker.clone()))?,
    };
    let id = cfg.client_id.clone().unwrap_or_else(|| format!("anomalyd-{node}"));
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(cfg.keep_alive_s));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_request_channel_capacity(1024);
    let topics = Topics { prefix: cfg.topic_prefix.clone(), node: node.into() };
    o.set_last_will(LastWill::new(topics.status(), "offline", qos(cfg.qos), true));
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_file {
            Some(p) => read_secret(p).map_err(|cause| MqttError::Read {
                what: "mqtt.password_file",
                path: p.clone(),
                cause,
            })?,
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if let Some(ca) = &cfg.ca_file {
        let read = |what, p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|cause| MqttError::Read { what, path: p.clone(), cause })
        };
        let ca = read("mqtt.ca_file", ca)?;
        let client_auth = match (&cfg.cert_file, &cfg.key_file) {
            (Some(c), Some(k)) => Some((read("mqtt.cert_file", c)?, read("mqtt.key_file", k)?)),
            _ => None,
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth }));
    }
    Ok(o)
}

/// Most verdicts handed to the broker and not yet acknowledged, per connection.
const WINDOW: usize = 64;

/// The MQTT link: one task owns the connection, the outbox and the order of publication.
///
/// Verdicts arrive on a channel (the frame path never waits), are appended to the [`Outbox`] in one
/// durable transaction per batch, and are published from the outbox in key order with at most
/// [`WINDOW`] unacknowledged. Acknowledgements arrive in publication order (MQTT 3.1.1, 4.6), so each
/// PUBACK retires the oldest in-flight key. When the connection drops, the client is discarded (so
/// nothing is retransmitted behind the outbox's back), and after reconnecting, with backoff, every
/// verdict still in the outbox is published again, marked `replayed`. `online` is announced on every
/// connect, and the cameras' retained states are re-sent.
pub struct Link {
    pub options: MqttOptions,
    pub topics: Topics,
    pub qos: QoS,
    pub state: Arc<MqttState>,
    pub metrics: Arc<Metrics>,
    pub log: LogVerdicts,
    /// How long the last verdicts may take to be acknowledged at shutdown.
    pub drain: Duration,
    pub outbox: Outbox,
    pub commands: mpsc::UnboundedSender<Command>,
    /// Retained (topic, payload) pairs to publish, e.g. camera states.
    pub retained: mpsc::UnboundedReceiver<(String, String)>,
    /// Verdicts the outbox could not take (a disk failure): published from memory, never dropped.
    pub unlogged: VecDeque<VerdictMessage>,
    /// (topic, payload) notes to publish once, not retained: descriptions and chat answers.
    pub notes: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    /// Notes waiting for the connection.
    pub pending_notes: VecDeque<(String, Vec<u8>)>,
    /// Most verdicts waiting in the outbox at once (reported at exit).
    pub max_backlog: u64,
}

/// `first` and whatever else is already waiting, up to 256: one outbox transaction's worth.
fn take_batch(first: Outgoing, rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Vec<Outgoing> {
    let mut batch = vec![first];
    while batch.len() < 256
        && let Ok(o) = rx.try_recv()
    {
        batch.push(o);
    }
    batch
}

/// What the link did over the daemon's life.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkSummary {
    /// Verdicts the broker acknowledged.
    pub acked: u64,
    /// Most verdicts waiting in the outbox at once.
    pub max_backlog: u64,
    /// Connections after the first.
    pub reconnects: u64,
}

/// The link's bookkeeping across connections.
struct Session {
    /// Verdicts the broker acknowledged so far.
    acked_total: u64,
    backoff: Duration,
    /// False once the frame path has closed the verdict channel.
    receiving: bool,
    retained_open: bool,
    notes_open: bool,
    /// When the drain at shutdown gives up.
    deadline: Option<Instant>,
    /// When each unpublished verdict was captured, for its latency.
    born: HashMap<u64, Instant>,
    /// Keys below this were handed to an earlier connection: sending them again is a replay.
    resend_below: u64,
    connects: u64,
    last_error_log: Option<Instant>,
    /// The retained states to announce again on every connect.
    states: BTreeMap<String, String>,
    /// Acknowledged keys not yet removed from the outbox.
    acked: Vec<u64>,
}

impl Session {
    fn new() -> Self {
        Session {
            acked_total: 0,
            backoff: Duration::from_millis(250),
            receiving: true,
            retained_open: true,
            notes_open: true,
            deadline: None,
            born: HashMap::new(),
            resend_below: 0,
            connects: 0,
            last_error_log: None,
            states: BTreeMap::new(),
            acked: Vec::new(),
        }
    }
}

/// How serving one connection ended.
enum Served {
    /// Everything is acknowledged (or the drain time is up): close and return.
    Finished,
    /// The connection failed.
    Lost(rumqttc::ConnectionError),
}

/// One connection's bookkeeping.
struct Conn {
    client: AsyncClient,
    connected: bool,
    /// Keys handed to this connection, oldest first; `None` for status messages.
    inflight: VecDeque<Option<u64>>,
    /// Next outbox key to hand over.
    cursor: u64,
    stopped_sent: bool,
}

impl Link {
    /// Runs until the verdict channel closes and everything is acknowledged (or the drain time is up,
    /// leaving the rest in the outbox for the next start). Returns how many verdicts were acknowledged.
    ///
    /// Each turn connects, serves the connection until it fails ([`Link::serve`]), counts the loss
    /// ([`Link::connection_lost`]) and keeps logging verdicts while it backs off ([`Link::back_off`]).
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Outgoing>) -> LinkSummary {
        let mut s = Session::new();
        loop {
            let (client, mut eventloop) = AsyncClient::new(self.options.clone(), 1024);
            let mut c = Conn { client, connected: false, inflight: VecDeque::new(), cursor: 0, stopped_sent: false };
            let failure = match self.serve(&mut s, &mut c, &mut eventloop, &mut rx).await {
                Served::Finished => return self.close(c, &mut eventloop, s.acked_total, s.connects).await,
                Served::Lost(e) => e,
            };
            self.connection_lost(&mut s, &c, &failure);
            if let Some(summary) = self.back_off(&mut s, &mut rx).await {
                return summary;
            }
        }
    }

    /// Serves one connection: verdicts into the outbox and from it to the broker, acknowledgements,
    /// commands, notes and retained states, until the connection fails or the link has finished.
    async fn serve(
        &mut self,
        s: &mut Session,
        c: &mut Conn,
        eventloop: &mut rumqttc::EventLoop,
        rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    ) -> Served {
        loop {
            if self.finished(s, c) {
                return Served::Finished;
            }
            tokio::select! {
                ev = eventloop.poll() => match ev {
                    Ok(ev) => self.on_event(s, c, ev),
                    Err(e) => return Served::Lost(e),
                },
                m = rx.recv(), if s.receiving => self.on_verdicts(s, c.connected, m, rx),
                n = self.notes.recv(), if s.notes_open => self.on_note(s, c.connected, n, rx),
                r = self.retained.recv(), if s.retained_open => match r {
                    Some((topic, payload)) => {
                        if c.connected {
                            self.status(c, &topic, &payload);
                        }
                        s.states.insert(topic, payload);
                    }
                    None => s.retained_open = false,
                },
                _ = tokio::time::sleep(Duration::from_millis(100)), if !s.receiving => {}
            }
            if c.connected {
                s.acked_total += self.fill(c, s.resend_below, &mut s.born);
                self.send_notes(c);
            }
        }
    }

    /// The bookkeeping before each wait: retire acknowledged keys, and once the frame path has closed,
    /// collect the last notes and send `stopped`. True when the link is done: `stopped` acknowledged,
    /// or the drain time is up.
    fn finished(&mut self, s: &mut Session, c: &mut Conn) -> bool {
        if !s.acked.is_empty() && (!s.receiving || c.inflight.len() < WINDOW / 2) {
            s.acked_total += self.retire(&std::mem::take(&mut s.acked), &mut s.born);
        }
        if !s.receiving {
            while let Ok(n) = self.notes.try_recv() {
                self.pending_notes.push_back(n);
            }
        }
        if !s.receiving
            && self.outbox.is_empty()
            && self.unlogged.is_empty()
            && self.pending_notes.is_empty()
            && c.connected
            && !c.stopped_sent
        {
            if c.client.try_publish(self.topics.status(), self.qos, true, "stopped").is_ok()
                && self.qos != QoS::AtMostOnce
            {
                c.inflight.push_back(None);
            }
            c.stopped_sent = true;
        }
        if c.stopped_sent && c.inflight.is_empty() {
            return true;
        }
        if s.deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::warn!(
                "stopping with {} verdict(s) not acknowledged by the broker after {} ms; they stay in \
                 the outbox and are published at the next start",
                self.outbox.len(),
                self.drain.as_millis()
            );
            return true;
        }
        false
    }

    /// One event from the broker: a connection, an acknowledgement, a command or a chat request.
    fn on_event(&mut self, s: &mut Session, c: &mut Conn, ev: Event) {
        match ev {
            Event::Incoming(Incoming::ConnAck(_)) => {
                s.connects += 1;
                if s.connects > 1 {
                    self.metrics.mqtt_reconnected();
                }
                s.backoff = Duration::from_millis(250);
                c.connected = true;
                self.state.connected.store(true, Ordering::SeqCst);
                self.metrics.mqtt_connected(true);
                tracing::info!("connected to the MQTT broker");
                self.status(c, &self.topics.status(), "online");
                for (topic, payload) in &s.states {
                    self.status(c, topic, payload);
                }
                let _ = c.client.try_subscribe(self.topics.command(), QoS::AtLeastOnce);
                let _ = c.client.try_subscribe(self.topics.chat_request(), QoS::AtLeastOnce);
            }
            Event::Incoming(Incoming::PubAck(_)) | Event::Incoming(Incoming::PubComp(_)) => {
                if let Some(Some(k)) = c.inflight.pop_front() {
                    s.acked.push(k);
                }
                // Retire in batches: one outbox transaction per burst of acknowledgements.
                if s.acked.len() >= WINDOW / 2 || c.inflight.is_empty() {
                    s.acked_total += self.retire(&std::mem::take(&mut s.acked), &mut s.born);
                }
            }
            Event::Incoming(Incoming::Publish(p)) if p.topic == self.topics.command() => self.command(&p.payload),
            Event::Incoming(Incoming::Publish(p)) if p.topic == self.topics.chat_request() => {
                self.chat_request(&p.payload)
            }
            _ => {}
        }
    }

    /// Verdicts from the frame path (`None`: it has closed, and the drain time starts).
    fn on_verdicts(
        &mut self,
        s: &mut Session,
        connected: bool,
        m: Option<Outgoing>,
        rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    ) {
        match m {
            Some(first) => {
                let mut batch = take_batch(first, rx);
                self.log_batch(&mut batch, connected, &mut s.born);
            }
            None => {
                s.receiving = false;
                s.deadline = Some(Instant::now() + self.drain);
            }
        }
    }

    /// A description or chat answer to publish, after any verdict that is already waiting.
    fn on_note(
        &mut self,
        s: &mut Session,
        connected: bool,
        n: Option<(String, Vec<u8>)>,
        rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    ) {
        let Some(n) = n else {
            s.notes_open = false;
            return;
        };
        // A frame's verdict was sent before its note: log it first, so it is published first.
        if s.receiving
            && let Ok(first) = rx.try_recv()
        {
            let mut batch = take_batch(first, rx);
            self.log_batch(&mut batch, connected, &mut s.born);
        }
        self.pending_notes.push_back(n);
        while self.pending_notes.len() > MAX_PENDING_NOTES {
            self.pending_notes.pop_front();
            self.metrics.note_dropped();
        }
    }

    /// The connection failed (or never came up): count it and say so, at most every 30 s while down.
    fn connection_lost(&mut self, s: &mut Session, c: &Conn, failure: &rumqttc::ConnectionError) {
        s.resend_below = s.resend_below.max(c.cursor);
        let was = c.connected;
        self.state.connected.store(false, Ordering::SeqCst);
        self.metrics.mqtt_connected(false);
        if was {
            self.metrics.publishes_lost(c.inflight.iter().flatten().count().max(1) as u64);
        }
        if was || s.last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            tracing::warn!(
                "MQTT broker unreachable: {failure}; {} verdict(s) kept in the outbox; retrying in {} ms",
                self.outbox.len(),
                s.backoff.as_millis()
            );
            s.last_error_log = Some(Instant::now());
        }
    }

    /// Waits out the backoff while still logging verdicts durably. Returns the summary when the drain
    /// time ran out with the broker away (what is left stays in the outbox for the next start).
    async fn back_off(&mut self, s: &mut Session, rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Option<LinkSummary> {
        let wait = tokio::time::sleep(s.backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                m = rx.recv(), if s.receiving => self.on_verdicts(s, false, m, rx),
            }
        }
        if s.deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::warn!(
                "stopping while the broker is unreachable: {} verdict(s) stay in the outbox for the next start",
                self.outbox.len()
            );
            if let Err(e) = self.outbox.sync() {
                tracing::error!("{e}");
            }
            return Some(self.summary(s.acked_total, s.connects));
        }
        s.backoff = (s.backoff * 2).min(Duration::from_secs(10));
        None
    }

    fn summary(&self, acked: u64, connects: u64) -> LinkSummary {
        LinkSummary { acked, max_backlog: self.max_backlog, reconnects: connects.saturating_sub(1) }
    }

    async fn close(&mut self, c: Conn, eventloop: &mut rumqttc::EventLoop, acked: u64, connects: u64) -> LinkSummary {
        if let Err(e) = self.outbox.sync() {
            tracing::error!("{e}");
        }
        if c.connected && c.client.try_disconnect().is_ok() {
            let flushed = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            });
            let _ = flushed.await;
        }
        self.state.connected.store(false, Ordering::SeqCst);
        self.metrics.mqtt_connected(false);
        self.summary(acked, connects)
    }

    fn status(&self, c: &mut Conn, topic: &str, payload: &str) {
        if c.client.try_publish(topic, self.qos, true, payload.as_bytes().to_vec()).is_ok()
            && self.qos != QoS::AtMostOnce
        {
            c.inflight.push_back(None);
        }
    }

    /// Hands waiting notes to the client, within the window.
    fn send_notes(&mut self, c: &mut Conn) {
        while c.inflight.len() < WINDOW
            && let Some((topic, payload)) = self.pending_notes.pop_front()
        {
            if c.client.try_publish(topic.clone(), self.qos, false, payload.clone()).is_err() {
                self.pending_notes.push_front((topic, payload));
                return;
            }
            if self.qos != QoS::AtMostOnce {
                c.inflight.push_back(None);
            }
        }
    }

    fn chat_request(&self, payload: &[u8]) {
        match serde_json::from_slice::<ChatRequest>(payload) {
            Ok(r) => {
                self.metrics.command("accepted");
                let _ = self.commands.send(Command::Chat {
                    frame_id: r.frame_id,
                    question: r.question,
                    request_id: r.request_id,
                });
            }
            Err(e) => {
                self.metrics.command("invalid");
                tracing::warn!(
                    "ignored a chat request on {}: {e} (expected {{\"frame_id\":\"…\",\"question\":\"…\",\"request_id\":\"…\"}})",
                    self.topics.chat_request()
                );
            }
        }
    }

    fn command(&self, payload: &[u8]) {
        match serde_json::from_slice::<Command>(payload) {
            Ok(cmd) => {
                self.metrics.command("accepted");
                let _ = self.commands.send(cmd);
            }
            Err(e) => {
                self.metrics.command("invalid");
                tracing::warn!(
                    "ignored a command on {}: {e} (expected e.g. {{\"cmd\":\"trigger\",\"camera\":\"cam1\",\"part_id\":\"P-1\"}})",
                    self.topics.command()
                );
            }
        }
    }

    /// Writes a batch of new verdicts to the outbox (one durable transaction) and logs them.
    fn log_batch(&mut self, batch: &mut [Outgoing], connected: bool, born: &mut HashMap<u64, Instant>) {
        self.metrics.verdicts_logged(batch.len());
        for o in batch.iter_mut() {
            // Written while the broker is away: it will go out as part of the backlog.
            o.msg.replayed = !connected;
            match self.log {
                LogVerdicts::All => log_verdict(&o.msg),
                LogVerdicts::Ng if o.msg.verdict != Outcome::Ok => log_verdict(&o.msg),
                _ => {}
            }
        }
        let msgs: Vec<VerdictMessage> = batch.iter().map(|o| o.msg.clone()).collect();
        match self.outbox.append(&msgs) {
            Ok(keys) => {
                self.max_backlog = self.max_backlog.max(self.outbox.len());
                for (k, o) in keys.into_iter().zip(batch.iter()) {
                    born.insert(k, o.captured_at);
                }
            }
            Err(e) => {
                // The disk failed: never lose the verdicts; publish them from memory instead.
                tracing::error!("{e}; publishing {} verdict(s) from memory, without the durable copy", msgs.len());
                self.unlogged.extend(msgs);
            }
        }
    }

    /// Hands outbox verdicts to the client until the window is full; returns verdicts retired at once
    /// (QoS 0 needs no acknowledgement).
    fn fill(&mut self, c: &mut Conn, resend_below: u64, born: &mut HashMap<u64, Instant>) -> u64 {
        let mut retired = 0;
        while c.inflight.len() < WINDOW
            && let Some(mut msg) = self.unlogged.pop_front()
        {
            let now = SystemTime::now();
            msg.published_at = verdict::rfc3339(now);
            msg.published_unix_ms = verdict::unix_ms(now);
            let payload = serde_json::to_vec(&msg).unwrap_or_default();
            if c.client.try_publish(self.topics.verdict(&msg.camera), self.qos, false, payload).is_err() {
                self.unlogged.push_front(msg);
                return retired;
            }
            if self.qos != QoS::AtMostOnce {
                c.inflight.push_back(None);
            }
        }
        while c.inflight.len() < WINDOW {
            let entries = match self.outbox.from_key(c.cursor, WINDOW - c.inflight.len()) {
                Ok(e) if !e.is_empty() => e,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!("{e}");
                    break;
                }
            };
            for e in entries {
                let Ok(mut msg) = serde_json::from_slice::<VerdictMessage>(&e.json) else {
                    tracing::error!("outbox entry {} is not a verdict; dropping it", e.key);
                    let _ = self.outbox.remove(&[e.key]);
                    c.cursor = e.key + 1;
                    continue;
                };
                let again = msg.replayed || e.key < resend_below || self.outbox.from_earlier_run(e.key);
                msg.replayed = again;
                let now = SystemTime::now();
                msg.published_at = verdict::rfc3339(now);
                msg.published_unix_ms = verdict::unix_ms(now);
                if let Some(t0) = born.get(&e.key) {
                    let total = t0.elapsed().as_secs_f32() * 1e3;
                    msg.latency_ms.publish = (total - msg.latency_ms.total).max(0.0);
                    msg.latency_ms.total = total;
                }
                self.metrics.verdict_published(&msg.camera, again, msg.latency_ms.publish, msg.latency_ms.total);
                let payload = serde_json::to_vec(&msg).unwrap_or_default();
                if c.client.try_publish(self.topics.verdict(&msg.camera), self.qos, false, payload).is_err() {
                    return retired;
                }
                self.metrics.verdict_handed_over(&msg.camera);
                c.cursor = e.key + 1;
                if self.qos == QoS::AtMostOnce {
                    retired += self.retire(&[e.key], born);
                } else {
                    c.inflight.push_back(Some(e.key));
                }
            }
        }
        retired
    }

    /// Removes acknowledged verdicts from the outbox.
    fn retire(&mut self, keys: &[u64], born: &mut HashMap<u64, Instant>) -> u64 {
        if keys.is_empty() {
            return 0;
        }
        for k in keys {
            born.remove(k);
        }
        if let Err(e) = self.outbox.remove(keys) {
            tracing::error!("{e}");
        }
        keys.len() as u64
    }
}

fn log_verdict(m: &VerdictMessage) {
    let part = m.part_id.as_deref().map(|p| format!(" part {p}")).unwrap_or_default();
    match m.verdict {
        Outcome::Ok | Outcome::Ng => tracing::info!(
            "{} {}{part}: {} in {:.1} ms: {}",
            m.camera,
            m.frame_id,
            m.verdict.as_str(),
            m.latency_ms.total,
            m.answer.as_deref().unwrap_or("")
        ),
        _ => tracing::warn!(
            "{} {}{part}: {}: {}",
            m.camera,
            m.frame_id,
            m.verdict.as_str(),
            m.reason.as_deref().unwrap_or("")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_unknown_ones_are_refused() {
        let c: Command = serde_json::from_str(r#"{"cmd":"trigger","camera":"c1","part_id":"P-7"}"#).unwrap();
        assert_eq!(c, Command::Trigger { camera: "c1".into(), part_id: "P-7".into() });
        assert_eq!(serde_json::from_str::<Command>(r#"{"cmd":"reload"}"#).unwrap(), Command::Reload);
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"format-disk"}"#).is_err());
        assert!(serde_json::from_str::<Command>(r#"{"cmd":"trigger","camera":"c1"}"#).is_err());
    }
}
