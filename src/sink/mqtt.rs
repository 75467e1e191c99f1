//! The MQTT side: verdicts out, PLC commands in, availability on a retained status topic.
//!
//! Topics (under `mqtt.topic_prefix`, default `anomalyd`; `docs/MQTT.md` is the contract):
//! - `<prefix>/<node>/<camera>/verdict`: one JSON verdict per frame, QoS `mqtt.qos`.
//! - `<prefix>/<node>/status`: retained `online`; the broker publishes `offline` (last will) if the
//!   daemon vanishes; `stopped` after a clean exit.
//! - `<prefix>/<node>/cmd`: commands, e.g. `{"cmd":"trigger","camera":"cam1","part_id":"P-1"}`
//!   (`types::command` gives the bounds); refusals, and acceptances that carry a `request_id`, are
//!   answered on `<prefix>/<node>/cmd/response`.
//! - `<prefix>/<node>/<camera>/description`: the words for each NG frame, after its verdict, keyed by
//!   frame id (`describe::explainer::Description`).
//! - `<prefix>/<node>/chat/request` → `<prefix>/<node>/chat/response`: questions about a frame,
//!   `{"frame_id":"…","question":"…","request_id":"…"}`, answered with the same `request_id`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions, NetworkOptions, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use crate::config::daemon::{LogVerdicts, MqttConfig, Secret, broker_addr, read_secret};
use crate::sink::inflight::{Inflight, Tag};
use crate::sink::outbox::{Class, Outbox};
use crate::sink::sparkplug::{self, HostChange, Request};
use crate::telemetry::Metrics;
use crate::types::command::{self, Command, Envelope, Refusal};
use crate::types::verdict::{self, Outcome, Outgoing, VerdictMessage};
use crate::util::text::escaped;

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
    pub fn command_response(&self) -> String {
        format!("{}/{}/cmd/response", self.prefix, self.node)
    }
    pub fn description(&self, camera: &str) -> String {
        format!("{}/{}/{camera}/description", self.prefix, self.node)
    }
    /// Operator actions on the station (docs/MQTT.md), one message each, not retained.
    pub fn audit(&self) -> String {
        format!("{}/{}/audit", self.prefix, self.node)
    }
    pub fn chat_request(&self) -> String {
        format!("{}/{}/chat/request", self.prefix, self.node)
    }
    pub fn chat_response(&self) -> String {
        format!("{}/{}/chat/response", self.prefix, self.node)
    }
}

/// Notes (descriptions, chat answers) kept in memory while the broker is away; the oldest are dropped
/// beyond this, counted in `anomalyd_notes_dropped_total`.
const MAX_PENDING_NOTES: usize = 1024;

/// Verdicts kept in memory while the outbox is not writable (a disk failure); beyond this they are
/// dropped in the outbox's eviction order (ERROR and SKIPPED, then OK, then NG), counted in
/// `anomalyd_outbox_memory_dropped_total`.
pub const MEMORY_VERDICTS: usize = 4096;

/// Times the broker may drop the connection while the same verdict is the oldest unacknowledged one
/// before that verdict is dead-lettered (after the first, it is sent alone, so no other verdict is
/// blamed).
const POISON_STRIKES: u8 = 3;

/// How long a connect (TCP, TLS handshake and CONNACK) or a write may take before it is given up.
const NETWORK_TIMEOUT_S: u64 = 10;

/// Connection state shared with the daemon and the HTTP API.
#[derive(Debug, Default)]
pub struct MqttState {
    pub connected: AtomicBool,
    /// Set while the outbox is closed by a disk failure (readiness fails).
    pub outbox_down: AtomicBool,
}

pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Largest packet sent or taken; a verdict over it is dead-lettered before it is sent.
pub const MAX_PACKET: usize = 1 << 20;

/// Builds the client options: broker address, client id, credentials, TLS and last will. `embedded`:
/// the embedded broker's port and the (username, password) it accepts.
pub fn options(
    cfg: &MqttConfig,
    node: &str,
    embedded: Option<(u16, String, Secret)>,
) -> Result<MqttOptions, MqttError> {
    let (host, port) = match &embedded {
        Some((p, _, _)) => ("127.0.0.1".to_string(), *p),
        None => broker_addr(&cfg.broker).ok_or_else(|| MqttError::Address(cfg.broker.clone()))?,
    };
    let id = cfg.client_id.clone().unwrap_or_else(|| format!("anomalyd-{node}"));
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(cfg.keep_alive_s));
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o.set_request_channel_capacity(1024);
    let topics = Topics { prefix: cfg.topic_prefix.clone(), node: node.into() };
    o.set_last_will(LastWill::new(topics.status(), "offline", qos(cfg.qos), true));
    if let Some((_, user, password)) = embedded {
        o.set_credentials(user, password.0);
    } else if let Some(user) = &cfg.username {
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
/// - Verdicts arrive on a channel (the frame path never waits), are appended to the [`Outbox`] in one
///   durable transaction per batch, and are published from it in key order with at most [`WINDOW`]
///   unacknowledged.
/// - The client's event loop runs in a task of its own that is never cancelled ([`pump`]): connects,
///   TLS handshakes and writes run to completion or time out on their own clock
///   ([`NETWORK_TIMEOUT_S`]). The link reads its events from a channel.
/// - Each acknowledgement retires the verdict with its packet id ([`Inflight`]).
/// - When the connection drops, the client is discarded (so nothing is retransmitted behind the
///   outbox's back); after reconnecting, with backoff, every verdict still in the outbox is published
///   again, marked `replayed`. `online` is announced on every connect, and retained states re-sent.
/// - A verdict the broker will not take is dead-lettered ([`Outbox::dead_letter`]): one over
///   [`MAX_PACKET`] before it is sent, and one the broker drops the connection on [`POISON_STRIKES`]
///   times. The link never loops on it.
/// - While the outbox is not writable, verdicts wait in memory (at most [`MEMORY_VERDICTS`]) and are
///   published from there; the outbox is reopened with backoff and takes them back.
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
    /// When set, every command must carry it (`"token"`), compared in constant time.
    pub command_token: Option<Secret>,
    /// Retained (topic, payload) pairs to publish, e.g. camera states.
    pub retained: mpsc::UnboundedReceiver<(String, String)>,
    /// (topic, payload) notes to publish once, not retained: descriptions and chat answers.
    pub notes: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    /// Sparkplug B mode (`[mqtt.sparkplug]`): verdicts go out as DDATA, after the births.
    pub sparkplug: Option<sparkplug::Node>,
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
    /// Most verdicts waiting in the outbox (and memory) at once.
    pub max_backlog: u64,
    /// Connections after the first.
    pub reconnects: u64,
    /// Verdicts dead-lettered.
    pub dead_lettered: u64,
}

/// A verdict waiting in memory for the outbox.
struct Held {
    msg: VerdictMessage,
    captured_at: Instant,
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
    /// Verdicts waiting in memory while the outbox is not writable, by arrival.
    memory: BTreeMap<u64, Held>,
    next_memory: u64,
    /// Notes waiting for the connection.
    pending_notes: std::collections::VecDeque<(String, Vec<u8>)>,
    /// Connections the broker dropped while this verdict was the oldest unacknowledged one.
    strikes: HashMap<u64, u8>,
    max_backlog: u64,
    dead_lettered: u64,
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
            memory: BTreeMap::new(),
            next_memory: 0,
            pending_notes: Default::default(),
            strikes: HashMap::new(),
            max_backlog: 0,
            dead_lettered: 0,
        }
    }
}

/// How serving one connection ended.
enum Served {
    /// Everything is acknowledged (or the drain time is up): close and return.
    Finished,
    /// The connection failed (or was closed on purpose: [`Conn::leaving`]), for this reason.
    Lost(String),
}

/// One connection: the client, the events of its loop, and what was handed to it.
struct Conn {
    client: AsyncClient,
    events: mpsc::Receiver<Result<Event, ConnectionError>>,
    pump: tokio::task::JoinHandle<()>,
    connected: bool,
    inflight: Inflight,
    /// Next outbox key to hand over.
    cursor: u64,
    /// A verdict sent alone after a strike: nothing else goes out until it is acknowledged.
    isolating: Option<u64>,
    stopped_sent: bool,
    /// Closing on purpose (the Sparkplug primary host went offline): no verdict is to blame.
    leaving: bool,
    /// The purposeful close has been written: serve returns.
    left: bool,
}

/// Runs the client's event loop in a task of its own, never cancelled: each event (or the error that
/// ends the connection) goes to the link over a channel. The task ends after the error, or when the
/// link drops the receiver.
fn pump(mut eventloop: EventLoop) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<Result<Event, ConnectionError>>) {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(async move {
        loop {
            let ev = eventloop.poll().await;
            let end = ev.is_err();
            if tx.send(ev).await.is_err() || end {
                return;
            }
        }
    });
    (task, rx)
}

impl Link {
    /// Runs until the verdict channel closes and everything is acknowledged (or the drain time is up,
    /// leaving the rest in the outbox for the next start).
    ///
    /// Each turn connects, serves the connection until it fails ([`Link::serve`]), counts the loss
    /// ([`Link::connection_lost`]) and keeps logging verdicts while it backs off ([`Link::back_off`]).
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Outgoing>) -> LinkSummary {
        let mut s = Session::new();
        loop {
            let mut options = self.options.clone();
            if let Some(sp) = &mut self.sparkplug {
                options.set_last_will(sp.connecting());
            }
            let (client, mut eventloop) = AsyncClient::new(options, 1024);
            let mut network = NetworkOptions::new();
            network.set_connection_timeout(NETWORK_TIMEOUT_S);
            eventloop.set_network_options(network);
            let (pump, events) = pump(eventloop);
            let mut c = Conn {
                client,
                events,
                pump,
                connected: false,
                inflight: Inflight::default(),
                cursor: 0,
                isolating: None,
                stopped_sent: false,
                leaving: false,
                left: false,
            };
            let failure = match self.serve(&mut s, &mut c, &mut rx).await {
                Served::Finished => return self.close(c, &mut s).await,
                Served::Lost(e) => e,
            };
            self.connection_lost(&mut s, &mut c, &failure);
            if let Some(summary) = self.back_off(&mut s, &mut rx).await {
                return summary;
            }
        }
    }

    /// Serves one connection: verdicts into the outbox and from it to the broker, acknowledgements,
    /// commands, notes and retained states, until the connection fails or the link has finished.
    async fn serve(&mut self, s: &mut Session, c: &mut Conn, rx: &mut mpsc::UnboundedReceiver<Outgoing>) -> Served {
        loop {
            if self.finished(s, c) {
                return Served::Finished;
            }
            if c.left {
                return Served::Lost("closed on purpose: the Sparkplug primary host is offline".into());
            }
            let ticking = !s.receiving || !self.outbox.writable();
            tokio::select! {
                ev = c.events.recv() => match ev {
                    Some(Ok(ev)) => self.on_event(s, c, ev),
                    Some(Err(e)) => return Served::Lost(e.to_string()),
                    None => return Served::Lost(ConnectionError::RequestsDone.to_string()),
                },
                m = rx.recv(), if s.receiving => self.on_verdicts(s, c.connected, m, rx),
                // Connected, notes wait in their channel while the memory queue is full (they go out
                // as acknowledgements come); only with the broker away are the oldest dropped.
                n = self.notes.recv(), if s.notes_open && (!c.connected || s.pending_notes.len() < MAX_PENDING_NOTES) => {
                    self.on_note(s, c.connected, n, rx)
                }
                r = self.retained.recv(), if s.retained_open => match r {
                    Some((topic, payload)) => {
                        if c.connected {
                            self.status(c, &topic, &payload);
                        }
                        s.states.insert(topic, payload);
                    }
                    None => s.retained_open = false,
                },
                _ = tokio::time::sleep(Duration::from_millis(100)), if ticking => {}
            }
            self.mend_outbox(s);
            if c.connected {
                self.fill(s, c);
                self.send_notes(s, c);
            }
        }
    }

    /// The bookkeeping before each wait: retire acknowledged keys, and once the frame path has closed,
    /// collect the last notes and send `stopped`. True when the link is done: `stopped` acknowledged,
    /// or the drain time is up.
    fn finished(&mut self, s: &mut Session, c: &mut Conn) -> bool {
        if !s.acked.is_empty() && (!s.receiving || c.inflight.len() < WINDOW / 2) {
            self.retire(s);
        }
        if !s.receiving {
            while let Ok(n) = self.notes.try_recv() {
                s.pending_notes.push_back(n);
            }
        }
        if !s.receiving
            && self.outbox.is_empty()
            && s.memory.is_empty()
            && s.pending_notes.is_empty()
            && c.inflight.verdicts() == 0
            && c.connected
            && !c.stopped_sent
        {
            self.status(c, &self.topics.status(), "stopped");
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

    /// One event from the broker or the client: a connection, a written publish, an
    /// acknowledgement, a command or a chat request.
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
                // Subscribed before `online` is announced: the broker takes them in order, so a client
                // that commands on seeing `online` is never lost to a subscription not yet made.
                let _ = c.client.try_subscribe(self.topics.command(), QoS::AtLeastOnce);
                let _ = c.client.try_subscribe(self.topics.chat_request(), QoS::AtLeastOnce);
                if let Some(sp) = &self.sparkplug {
                    let _ = c.client.try_subscribe(sp.ncmd_topic(), QoS::AtLeastOnce);
                    let _ = c.client.try_subscribe(sp.dcmd_filter(), QoS::AtLeastOnce);
                    // Births wait for the host's retained STATE.
                    if let Some(state) = sp.state_topic() {
                        let _ = c.client.try_subscribe(state, QoS::AtLeastOnce);
                    }
                }
                self.status(c, &self.topics.status(), "online");
                for (topic, payload) in &s.states {
                    self.status(c, topic, payload);
                }
                if self.sparkplug.as_ref().is_some_and(|sp| !sp.waits_for_host()) {
                    self.births(c, "connect");
                }
            }
            Event::Outgoing(rumqttc::Outgoing::Disconnect) if c.leaving => c.left = true,
            Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => {
                if let Some(tag) = c.inflight.written(pkid) {
                    self.done(s, c, tag);
                }
            }
            Event::Outgoing(rumqttc::Outgoing::AwaitAck(pkid)) => c.inflight.held_back(pkid),
            Event::Incoming(Incoming::PubAck(rumqttc::PubAck { pkid, .. }))
            | Event::Incoming(Incoming::PubComp(rumqttc::PubComp { pkid, .. })) => {
                if let Some(tag) = c.inflight.acked(pkid) {
                    self.done(s, c, tag);
                }
            }
            Event::Incoming(Incoming::Publish(p)) if p.topic == self.topics.command() => {
                let parsed = command::parse_command(&p.payload);
                self.command(s, &p.payload, parsed);
            }
            Event::Incoming(Incoming::Publish(p)) if p.topic == self.topics.chat_request() => {
                let parsed = command::parse_chat(&p.payload);
                self.command(s, &p.payload, parsed);
            }
            Event::Incoming(Incoming::Publish(p)) if self.sparkplug.is_some() => self.sparkplug_in(s, c, &p),
            _ => {}
        }
    }

    /// A publish was acknowledged (or, at QoS 0, written).
    fn done(&mut self, s: &mut Session, c: &mut Conn, tag: Tag) {
        match tag {
            Tag::Verdict(k) => {
                s.strikes.remove(&k);
                if c.isolating == Some(k) {
                    c.isolating = None;
                }
                s.acked.push(k);
                // Retire in batches: one outbox transaction per burst of acknowledgements.
                if s.acked.len() >= WINDOW / 2 || c.inflight.verdicts() == 0 {
                    self.retire(s);
                }
            }
            Tag::Memory(..) => s.acked_total += 1,
            Tag::Other => {}
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
                self.log_batch(s, &mut batch, connected);
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
            self.log_batch(s, &mut batch, connected);
        }
        self.note(s, n);
    }

    fn note(&self, s: &mut Session, n: (String, Vec<u8>)) {
        s.pending_notes.push_back(n);
        while s.pending_notes.len() > MAX_PENDING_NOTES {
            s.pending_notes.pop_front();
            self.metrics.note_dropped();
        }
    }

    /// The connection failed (or never came up): count it and say so, at most every 30 s while down.
    /// The oldest unacknowledged verdict takes a strike; at [`POISON_STRIKES`] it is dead-lettered.
    /// Verdicts in flight from memory go back to the memory queue.
    fn connection_lost(&mut self, s: &mut Session, c: &mut Conn, failure: &str) {
        s.resend_below = s.resend_below.max(c.cursor);
        let was = c.connected;
        self.state.connected.store(false, Ordering::SeqCst);
        self.metrics.mqtt_connected(false);
        if was && !c.leaving {
            self.metrics.publishes_lost(c.inflight.verdicts().max(1) as u64);
            if let Some(k) = c.inflight.oldest_written() {
                let n = s.strikes.entry(k).or_insert(0);
                *n += 1;
                if *n >= POISON_STRIKES {
                    let why = format!(
                        "the broker closed the connection {n} times while this verdict was the oldest \
                         unacknowledged one, the last time sent alone ({failure}); over the broker's packet \
                         limit or refused by its access rules?"
                    );
                    s.strikes.remove(&k);
                    self.dead_letter_key(s, k, &why);
                }
            }
        }
        for tag in c.inflight.take_all() {
            if let Tag::Memory(seq, msg) = tag {
                s.memory.insert(seq, Held { msg: *msg, captured_at: Instant::now() });
            }
        }
        if c.leaving {
            tracing::info!(
                "disconnected from the MQTT broker: {failure}; {} verdict(s) wait in the outbox; reconnecting in {} ms",
                self.outbox.len() + s.memory.len() as u64,
                s.backoff.as_millis()
            );
        } else if was || s.last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            tracing::warn!(
                "MQTT broker unreachable: {failure}; {} verdict(s) kept in the outbox; retrying in {} ms",
                self.outbox.len() + s.memory.len() as u64,
                s.backoff.as_millis()
            );
            s.last_error_log = Some(Instant::now());
        }
        c.pump.abort();
    }

    fn dead_letter_key(&mut self, s: &mut Session, key: u64, why: &str) {
        let json = match self.outbox.from_key(key, 1) {
            Ok(e) if e.first().is_some_and(|e| e.key == key) => e[0].json.clone(),
            _ => return,
        };
        self.outbox.dead_letter(Some(key), &json, why);
        s.born.remove(&key);
        s.dead_lettered += 1;
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
                _ = tokio::time::sleep(Duration::from_millis(100)), if !self.outbox.writable() => {}
            }
            self.mend_outbox(s);
        }
        if s.deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::warn!(
                "stopping while the broker is unreachable: {} verdict(s) stay in the outbox for the next start",
                self.outbox.len()
            );
            self.last_words(s);
            return Some(self.summary(s));
        }
        s.backoff = (s.backoff * 2).min(Duration::from_secs(10));
        None
    }

    /// At exit: make the outbox durable, and say what only memory held.
    fn last_words(&mut self, s: &mut Session) {
        self.mend_outbox(s);
        if let Err(e) = self.outbox.sync() {
            tracing::error!("{e}");
        }
        if !s.memory.is_empty() {
            tracing::error!(
                "stopping with {} verdict(s) held only in memory (the outbox was not writable): they are lost",
                s.memory.len()
            );
        }
    }

    fn summary(&self, s: &Session) -> LinkSummary {
        LinkSummary {
            acked: s.acked_total,
            max_backlog: s.max_backlog,
            reconnects: s.connects.saturating_sub(1),
            dead_lettered: s.dead_lettered,
        }
    }

    async fn close(&mut self, mut c: Conn, s: &mut Session) -> LinkSummary {
        self.last_words(s);
        if c.connected
            && let Some(sp) = &self.sparkplug
        {
            // A clean disconnect fires no will: the host learns of the death from this.
            let death = sp.ndeath();
            let _ = c.client.try_publish(death.topic, QoS::AtLeastOnce, false, death.payload);
        }
        if c.connected && c.client.try_disconnect().is_ok() {
            let flushed = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(ev) = c.events.recv().await {
                    if matches!(ev, Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)) {
                        break;
                    }
                }
            });
            let _ = flushed.await;
        }
        c.pump.abort();
        self.state.connected.store(false, Ordering::SeqCst);
        self.metrics.mqtt_connected(false);
        self.summary(s)
    }

    /// Publishes a retained status or state (QoS as configured).
    fn status(&self, c: &mut Conn, topic: &str, payload: &str) {
        if c.client.try_publish(topic, self.qos, true, payload.as_bytes().to_vec()).is_ok() {
            c.inflight.handed(Tag::Other);
        }
    }

    /// Hands waiting notes to the client, within the window.
    fn send_notes(&mut self, s: &mut Session, c: &mut Conn) {
        while c.inflight.len() < WINDOW
            && let Some((topic, payload)) = s.pending_notes.pop_front()
        {
            if c.client.try_publish(topic.clone(), self.qos, false, payload.clone()).is_err() {
                s.pending_notes.push_front((topic, payload));
                return;
            }
            c.inflight.handed(Tag::Other);
        }
    }

    /// A command or chat request: refused (with the reason, escaped, in the log, a metric and a reply
    /// on the response topic), or passed to the daemon.
    fn command(&mut self, s: &mut Session, payload: &[u8], parsed: Result<Envelope, Refusal>) {
        let checked = parsed.and_then(|e| match &self.command_token {
            Some(t) if !e.token.as_deref().is_some_and(|g| t.matches(g)) => Err(Refusal::Unauthorized),
            _ => Ok(e),
        });
        match checked {
            Ok(e) => {
                // A recipe switch is counted by the daemon, which alone knows whether the product exists.
                if !matches!(e.command, Command::Recipe { .. }) {
                    self.metrics.command("accepted");
                }
                // Chat and recipe commands are answered by the daemon, once it has acted on them.
                if e.request_id.is_some() && !matches!(e.command, Command::Chat { .. } | Command::Recipe { .. }) {
                    self.reply(s, e.request_id.as_deref(), Some(e.command.name()), None);
                }
                let _ = self.commands.send(e.command);
            }
            Err(r) => {
                self.metrics.command(r.kind());
                let head = String::from_utf8_lossy(&payload[..payload.len().min(160)]).into_owned();
                tracing::warn!(
                    "refused a command ({} bytes): {}; it began {}",
                    payload.len(),
                    escaped(&r.to_string(), 200),
                    escaped(&head, 120)
                );
                self.reply(s, command::request_id_of(payload).as_deref(), None, Some(&r));
            }
        }
    }

    /// [`command::reply`] on the command response topic.
    fn reply(&self, s: &mut Session, request_id: Option<&str>, cmd: Option<&str>, refusal: Option<&Refusal>) {
        let body = command::reply(request_id, cmd, refusal);
        self.note(s, (self.topics.command_response(), serde_json::to_vec(&body).unwrap_or_default()));
    }

    /// Writes a batch of new verdicts to the outbox (one durable transaction) and logs them; while the
    /// outbox is not writable, to the bounded memory queue.
    fn log_batch(&mut self, s: &mut Session, batch: &mut [Outgoing], connected: bool) {
        self.metrics.verdicts_logged(batch.len());
        // Written while the broker is away (or, in Sparkplug mode, while the node is not born): it will
        // go out as part of the backlog.
        let live = connected && self.sparkplug.as_ref().is_none_or(|sp| sp.born);
        for o in batch.iter_mut() {
            o.msg.replayed = !live;
            match self.log {
                LogVerdicts::All => log_verdict(&o.msg),
                LogVerdicts::Ng if o.msg.verdict != Outcome::Ok => log_verdict(&o.msg),
                _ => {}
            }
        }
        let msgs: Vec<VerdictMessage> = batch.iter().map(|o| o.msg.clone()).collect();
        if self.outbox.writable() && s.memory.is_empty() {
            match self.outbox.append(&msgs) {
                Ok(keys) => {
                    for (k, o) in keys.into_iter().zip(batch.iter()) {
                        if let Some(k) = k {
                            s.born.insert(k, o.captured_at);
                        }
                    }
                    s.max_backlog = s.max_backlog.max(self.outbox.len());
                    return;
                }
                Err(e) => tracing::error!("{e}"),
            }
        }
        self.state.outbox_down.store(!self.outbox.writable(), Ordering::SeqCst);
        self.hold(s, batch.iter().map(|o| Held { msg: o.msg.clone(), captured_at: o.captured_at }));
    }

    /// Keeps verdicts in memory, within [`MEMORY_VERDICTS`], dropping in the outbox's eviction order.
    fn hold(&self, s: &mut Session, verdicts: impl Iterator<Item = Held>) {
        let mut dropped = 0;
        for h in verdicts {
            if s.memory.len() >= MEMORY_VERDICTS {
                let class = Class::of(h.msg.verdict);
                let victim = (0..=class as usize).find_map(|c| {
                    s.memory.iter().find(|(_, m)| Class::of(m.msg.verdict) as usize == c).map(|(k, _)| *k)
                });
                match victim {
                    Some(k) => {
                        s.memory.remove(&k);
                    }
                    None => {
                        dropped += 1;
                        continue;
                    }
                }
                dropped += 1;
            }
            s.memory.insert(s.next_memory, h);
            s.next_memory += 1;
        }
        if dropped > 0 {
            tracing::error!(
                "the outbox is not writable and {MEMORY_VERDICTS} verdicts already wait in memory: dropped {dropped}"
            );
        }
        self.metrics.outbox_memory(s.memory.len(), dropped);
        s.max_backlog = s.max_backlog.max(self.outbox.len() + s.memory.len() as u64);
    }

    /// While the outbox is not writable: reopen it when due, then move the memory queue into it.
    fn mend_outbox(&mut self, s: &mut Session) {
        if s.memory.is_empty() && self.outbox.writable() {
            return;
        }
        if !self.outbox.reopen() {
            self.state.outbox_down.store(true, Ordering::SeqCst);
            return;
        }
        let held: Vec<Held> = std::mem::take(&mut s.memory).into_values().collect();
        let msgs: Vec<VerdictMessage> = held.iter().map(|h| h.msg.clone()).collect();
        match self.outbox.append(&msgs) {
            Ok(keys) => {
                for (k, h) in keys.into_iter().zip(&held) {
                    if let Some(k) = k {
                        s.born.insert(k, h.captured_at);
                    }
                }
                self.state.outbox_down.store(false, Ordering::SeqCst);
                self.metrics.outbox_memory(0, 0);
            }
            Err(e) => {
                tracing::error!("{e}");
                self.hold(s, held.into_iter());
            }
        }
    }

    /// Stamps a verdict for publication and gives its topic and payload: JSON on the verdict topic, or
    /// a Sparkplug DDATA. Err (the caller dead-letters it) when it can never be sent.
    fn wire(&self, msg: &mut VerdictMessage) -> Result<(String, Vec<u8>), String> {
        let now = SystemTime::now();
        msg.published_at = verdict::rfc3339(now);
        msg.published_unix_ms = verdict::unix_ms(now);
        let (topic, payload) = match &self.sparkplug {
            Some(sp) => {
                let p = sp.ddata(msg);
                (p.topic, p.payload)
            }
            None => (self.topics.verdict(&msg.camera), serde_json::to_vec(&msg).unwrap_or_default()),
        };
        // Fixed header (at most 5), topic length (2), topic, packet id (2), payload.
        let size = 9 + topic.len() + payload.len();
        if size > MAX_PACKET {
            return Err(format!("a packet of {size} bytes is over the limit of {MAX_PACKET} bytes"));
        }
        Ok((topic, payload))
    }

    /// In Sparkplug mode, a camera's DBIRTH before its first DDATA when the births did not include it
    /// (a camera added by a reload). False when the client would not take it: try again later.
    fn device_born(&mut self, c: &mut Conn, camera: &str) -> bool {
        let Some(sp) = &mut self.sparkplug else { return true };
        let Some(birth) = sp.unborn(camera) else { return true };
        if c.client.try_publish(birth.topic, self.qos, false, birth.payload).is_err() {
            return false;
        }
        c.inflight.handed(Tag::Other);
        sp.sent(camera, None);
        self.metrics.sparkplug_births("new_camera");
        true
    }

    /// The Sparkplug births (NBIRTH, then each camera's DBIRTH), for `reason` (the metric's label).
    fn births(&mut self, c: &mut Conn, reason: &str) {
        let Some(sp) = &mut self.sparkplug else { return };
        for b in sp.births() {
            if c.client.try_publish(b.topic, self.qos, false, b.payload).is_err() {
                tracing::warn!(
                    "the MQTT client would not take the Sparkplug births; they are sent on the next connect"
                );
                return;
            }
            c.inflight.handed(Tag::Other);
        }
        sp.births_sent();
        self.metrics.sparkplug_births(reason);
        tracing::info!("Sparkplug births sent ({reason}, bdSeq {})", sp.bd_seq());
    }

    /// A message on a Sparkplug topic: the primary host's STATE, an NCMD or a DCMD.
    fn sparkplug_in(&mut self, s: &mut Session, c: &mut Conn, p: &rumqttc::Publish) {
        let Some(sp) = &mut self.sparkplug else { return };
        if sp.state_topic().is_some_and(|t| t == p.topic) {
            match sp.on_state(&p.payload) {
                Some(HostChange::Online) => {
                    self.metrics.sparkplug_host_online(true);
                    self.births(c, "host_online");
                }
                Some(HostChange::Offline) => {
                    self.metrics.sparkplug_host_online(false);
                    if sp.born && !c.leaving {
                        // Sparkplug 3.0: the node dies and comes back once the host is online again.
                        let death = sp.ndeath();
                        tracing::warn!("the Sparkplug primary host went offline: NDEATH, and reconnecting");
                        let _ = c.client.try_publish(death.topic, QoS::AtLeastOnce, false, death.payload);
                        c.leaving = c.client.try_disconnect().is_ok();
                    }
                }
                None => {}
            }
            return;
        }
        let parsed = if p.topic == sp.ncmd_topic() {
            sp.parse_ncmd(&p.payload)
        } else if sp.is_dcmd(&p.topic) {
            sp.parse_dcmd(&p.topic, &p.payload).map(Request::Command)
        } else {
            return;
        };
        match parsed {
            Ok(Request::Rebirth) => {
                self.metrics.command("accepted");
                if c.connected && sp.born {
                    self.births(c, "rebirth");
                }
            }
            Ok(Request::Command(e)) => self.command(s, &p.payload, Ok(e)),
            Err(r) => self.command(s, &p.payload, Err(r)),
        }
    }

    /// Hands verdicts to the client until the window is full: the outbox's first, in key order, then
    /// those held in memory.
    fn fill(&mut self, s: &mut Session, c: &mut Conn) {
        if self.sparkplug.as_ref().is_some_and(|sp| !sp.born) || c.leaving {
            // Waiting for the primary host (or leaving): verdicts wait in the outbox.
            return;
        }
        while c.inflight.len() < WINDOW && c.isolating.is_none() {
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
                    self.outbox.dead_letter(Some(e.key), &e.json, "the stored entry is not a verdict");
                    s.dead_lettered += 1;
                    c.cursor = e.key + 1;
                    continue;
                };
                let struck = s.strikes.contains_key(&e.key);
                if struck && c.inflight.verdicts() > 0 {
                    // Sent alone, so that a further drop is its own.
                    return;
                }
                let again = msg.replayed || e.key < s.resend_below || self.outbox.from_earlier_run(e.key);
                msg.replayed = again;
                if let Some(t0) = s.born.get(&e.key) {
                    let total = t0.elapsed().as_secs_f32() * 1e3;
                    msg.latency_ms.publish = (total - msg.latency_ms.total).max(0.0);
                    msg.latency_ms.total = total;
                }
                if !self.device_born(c, &msg.camera) {
                    return;
                }
                let (topic, payload) = match self.wire(&mut msg) {
                    Ok(w) => w,
                    Err(why) => {
                        self.dead_letter_key(s, e.key, &why);
                        c.cursor = e.key + 1;
                        continue;
                    }
                };
                if c.client.try_publish(topic, self.qos, false, payload).is_err() {
                    return;
                }
                if let Some(sp) = &mut self.sparkplug {
                    sp.sent(&msg.camera, Some(&msg));
                }
                self.metrics.verdict_published(&msg.camera, again, msg.latency_ms.publish, msg.latency_ms.total);
                self.metrics.verdict_handed_over(&msg.camera);
                c.inflight.handed(Tag::Verdict(e.key));
                c.cursor = e.key + 1;
                if struck {
                    c.isolating = Some(e.key);
                    return;
                }
            }
        }
        while c.inflight.len() < WINDOW
            && c.isolating.is_none()
            && let Some((seq, mut held)) = s.memory.pop_first()
        {
            if !self.device_born(c, &held.msg.camera) {
                s.memory.insert(seq, held);
                break;
            }
            let (topic, payload) = match self.wire(&mut held.msg) {
                Ok(w) => w,
                Err(why) => {
                    let json = serde_json::to_vec(&held.msg).unwrap_or_default();
                    self.outbox.dead_letter(None, &json, &why);
                    s.dead_lettered += 1;
                    continue;
                }
            };
            if c.client.try_publish(topic, self.qos, false, payload).is_err() {
                s.memory.insert(seq, held);
                break;
            }
            if let Some(sp) = &mut self.sparkplug {
                sp.sent(&held.msg.camera, Some(&held.msg));
            }
            self.metrics.verdict_handed_over(&held.msg.camera);
            c.inflight.handed(Tag::Memory(seq, Box::new(held.msg)));
        }
        self.metrics.outbox_memory(s.memory.len(), 0);
    }

    /// Removes acknowledged verdicts from the outbox.
    fn retire(&mut self, s: &mut Session) {
        let keys = std::mem::take(&mut s.acked);
        if keys.is_empty() {
            return;
        }
        for k in &keys {
            s.born.remove(k);
        }
        if let Err(e) = self.outbox.remove(&keys) {
            tracing::error!("{e}");
        }
        s.acked_total += keys.len() as u64;
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
