//! Sparkplug B (Eclipse Sparkplug 3.0), an optional mode of the MQTT link (`[mqtt.sparkplug]`): the
//! edge node is the daemon (`daemon.node`), each camera is a device, and each verdict is a DDATA.
//!
//! Topics (`spBv1.0/<group>/<type>/<node>[/<camera>]`):
//! - `NBIRTH` (seq 0, `bdSeq`, `Node Control/Rebirth`) on every connect, and again on a rebirth request;
//!   `NDEATH` (the same `bdSeq`) is the connection's will and is also sent before a clean disconnect.
//! - `DBIRTH` per camera after the NBIRTH, declaring every metric with its datatype and last value.
//! - `DDATA` per verdict: `Result/Verdict`, `Result/Score`, … with the capture time as timestamp;
//!   verdicts replayed from the outbox carry `is_historical`.
//! - `NCMD` `Node Control/Rebirth` = true: births again. `DCMD` `Command/Trigger` (the part id) and
//!   `Command/Product` (a recipe switch, or the product of that trigger), with `Command/Token` when
//!   `mqtt.command_token_file` is set.
//! - With `primary_host_id` set, births wait for `spBv1.0/STATE/<id>` to say `online`; when it says
//!   `offline`, the node sends NDEATH and reconnects (verdicts wait in the outbox meanwhile).
//!
//! `bdSeq` counts connections (0–255) and is kept in `<state dir>/sparkplug-bdseq`, so that a host
//! can tell a restarted node's birth from a stale death. `seq` counts every NBIRTH/DBIRTH/DDATA of a
//! connection, 0–255, wrapping.
//!
//! The payload is the subset of Eclipse Tahu's `sparkplug_b.proto` that anomalyd writes and reads,
//! with Tahu's field numbers (fields it does not know, such as data sets and templates, are skipped
//! when a command is decoded).

use std::collections::BTreeMap;
use std::path::PathBuf;

use prost::Message as _;
use rumqttc::{LastWill, QoS};

use crate::config::daemon::SparkplugConfig;
use crate::types::command::{Command, Envelope, Refusal};
use crate::types::verdict::VerdictMessage;

/// `org.eclipse.tahu.protobuf.Payload`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// `Payload.Metric`, without metadata, properties, data sets, templates and extensions.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15, 16")]
    pub value: Option<Value>,
}

/// `Payload.Metric.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(uint32, tag = "10")]
    Int(u32),
    #[prost(uint64, tag = "11")]
    Long(u64),
    #[prost(float, tag = "12")]
    Float(f32),
    #[prost(double, tag = "13")]
    Double(f64),
    #[prost(bool, tag = "14")]
    Boolean(bool),
    #[prost(string, tag = "15")]
    String(String),
    #[prost(bytes = "vec", tag = "16")]
    Bytes(Vec<u8>),
}

/// Sparkplug's `DataType` numbers for the types used here.
pub mod datatype {
    pub const INT64: u32 = 4;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
}

pub const NAMESPACE: &str = "spBv1.0";
pub const REBIRTH: &str = "Node Control/Rebirth";
pub const BD_SEQ: &str = "bdSeq";
pub const TRIGGER: &str = "Command/Trigger";
pub const PRODUCT: &str = "Command/Product";
pub const TOKEN: &str = "Command/Token";

/// A command payload (NCMD/DCMD) over this is refused unread.
const MAX_COMMAND: usize = 16 * 1024;

/// A metric of a camera's DBIRTH and DDATA: its name, datatype, and value in a verdict.
struct Field {
    name: &'static str,
    datatype: u32,
    value: fn(&VerdictMessage) -> Option<Value>,
}

/// What each verdict publishes, in this order.
const RESULT: [Field; 10] = [
    Field { name: "Result/Verdict", datatype: datatype::STRING, value: |m| text(m.verdict.as_str()) },
    Field { name: "Result/Score", datatype: datatype::FLOAT, value: |m| m.score.map(Value::Float) },
    Field { name: "Result/Threshold", datatype: datatype::FLOAT, value: |m| m.threshold.map(Value::Float) },
    Field { name: "Result/PartId", datatype: datatype::STRING, value: |m| m.part_id.as_deref().and_then(text) },
    Field { name: "Result/Product", datatype: datatype::STRING, value: |m| m.product.as_deref().and_then(text) },
    Field { name: "Result/Regions", datatype: datatype::UINT32, value: |m| Some(Value::Int(m.regions.len() as u32)) },
    Field { name: "Result/FrameId", datatype: datatype::STRING, value: |m| text(&m.frame_id) },
    Field { name: "Result/Seq", datatype: datatype::UINT64, value: |m| Some(Value::Long(m.seq)) },
    Field { name: "Result/Reason", datatype: datatype::STRING, value: |m| m.reason.as_deref().and_then(text) },
    Field { name: "Result/Learning", datatype: datatype::BOOLEAN, value: |m| Some(Value::Boolean(m.learning)) },
];

fn text(s: &str) -> Option<Value> {
    Some(Value::String(s.to_string()))
}

/// The writable metrics a camera's DBIRTH declares (empty strings: nothing written yet).
const COMMANDS: [&str; 2] = [TRIGGER, PRODUCT];

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What an NCMD or DCMD asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Births again (`Node Control/Rebirth`).
    Rebirth,
    /// A command for the daemon, as the JSON command topic would carry it.
    Command(Envelope),
}

/// Why `spBv1.0/STATE/<host>` changed what the node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostChange {
    /// The primary host came online: send the births.
    Online,
    /// It went offline: send NDEATH and reconnect.
    Offline,
}

/// The edge node's Sparkplug state across connections.
#[derive(Debug)]
pub struct Node {
    pub group: String,
    pub node: String,
    primary_host: Option<String>,
    /// Where the next connection's bdSeq is kept; None: in memory only.
    bd_seq_file: Option<PathBuf>,
    /// The bdSeq of the current connection.
    bd_seq: u8,
    /// The next connection's.
    next_bd_seq: u8,
    /// The seq of the next NBIRTH/DBIRTH/DDATA.
    seq: u8,
    /// Each camera's last published verdict, for its DBIRTH (None: none yet).
    devices: BTreeMap<String, Option<VerdictMessage>>,
    /// The births of this connection were sent.
    pub born: bool,
    /// The last STATE timestamp taken, so that an older one (a stale retained message) is ignored.
    host_timestamp: u64,
    host_online: bool,
}

impl Node {
    /// `bd_seq_file` holds the next connection's bdSeq (a missing file starts at 0; an unreadable
    /// one too, with a warning).
    pub fn new(cfg: &SparkplugConfig, node: &str, cameras: &[String], bd_seq_file: Option<PathBuf>) -> Node {
        let next_bd_seq = bd_seq_file
            .as_ref()
            .and_then(|p| match std::fs::read_to_string(p) {
                Ok(s) => match s.trim().parse::<u8>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        tracing::warn!("{}: not a bdSeq (0-255): {:?}; starting at 0", p.display(), s.trim());
                        None
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    tracing::warn!("cannot read {}: {e}; bdSeq starts at 0", p.display());
                    None
                }
            })
            .unwrap_or(0);
        Node {
            group: cfg.group_id.clone(),
            node: node.to_string(),
            primary_host: Some(cfg.primary_host_id.clone()).filter(|h| !h.is_empty()),
            bd_seq_file,
            bd_seq: next_bd_seq,
            next_bd_seq,
            seq: 0,
            devices: cameras.iter().map(|c| (c.clone(), None)).collect(),
            born: false,
            host_timestamp: 0,
            host_online: false,
        }
    }

    pub fn bd_seq(&self) -> u8 {
        self.bd_seq
    }

    fn topic(&self, kind: &str, device: Option<&str>) -> String {
        match device {
            Some(d) => format!("{NAMESPACE}/{}/{kind}/{}/{d}", self.group, self.node),
            None => format!("{NAMESPACE}/{}/{kind}/{}", self.group, self.node),
        }
    }

    pub fn ncmd_topic(&self) -> String {
        self.topic("NCMD", None)
    }

    /// The filter for every camera's DCMD.
    pub fn dcmd_filter(&self) -> String {
        self.topic("DCMD", Some("+"))
    }

    /// Whether `topic` is a DCMD of one of this node's devices.
    pub fn is_dcmd(&self, topic: &str) -> bool {
        let prefix = self.topic("DCMD", Some(""));
        topic.strip_prefix(&prefix).is_some_and(|d| !d.is_empty() && !d.contains('/'))
    }

    pub fn state_topic(&self) -> Option<String> {
        self.primary_host.as_ref().map(|h| format!("{NAMESPACE}/STATE/{h}"))
    }

    /// Whether births wait for the primary host.
    pub fn waits_for_host(&self) -> bool {
        self.primary_host.is_some()
    }

    /// Starts a connection: takes the next bdSeq (and keeps the one after it on disk before the
    /// connection is made, so that a crash cannot reuse it) and returns the NDEATH will (QoS 1, not
    /// retained, as Sparkplug asks).
    pub fn connecting(&mut self) -> LastWill {
        self.bd_seq = self.next_bd_seq;
        self.next_bd_seq = self.bd_seq.wrapping_add(1);
        if let Some(p) = &self.bd_seq_file
            && let Err(e) = write_atomically(p, format!("{}\n", self.next_bd_seq).as_bytes())
        {
            tracing::warn!("cannot keep the Sparkplug bdSeq in {}: {e}; it is kept in memory", p.display());
        }
        self.born = false;
        self.host_online = false;
        self.host_timestamp = 0;
        let death = self.ndeath();
        LastWill::new(death.topic, death.payload, QoS::AtLeastOnce, false)
    }

    /// The NDEATH of this connection (its will, and what a clean disconnect sends first).
    pub fn ndeath(&self) -> Publish {
        let payload = Payload {
            timestamp: Some(now_ms()),
            metrics: vec![metric(BD_SEQ, datatype::INT64, Some(Value::Long(self.bd_seq as u64)), None, false)],
            ..Default::default()
        };
        Publish { topic: self.topic("NDEATH", None), payload: payload.encode_to_vec() }
    }

    /// NBIRTH (seq 0) and one DBIRTH per camera; the caller publishes them in order and then calls
    /// [`Node::births_sent`].
    pub fn births(&self) -> Vec<Publish> {
        let t = now_ms();
        let node = Payload {
            timestamp: Some(t),
            seq: Some(0),
            metrics: vec![
                metric(BD_SEQ, datatype::INT64, Some(Value::Long(self.bd_seq as u64)), Some(t), false),
                metric(REBIRTH, datatype::BOOLEAN, Some(Value::Boolean(false)), Some(t), false),
            ],
            ..Default::default()
        };
        let mut out = vec![Publish { topic: self.topic("NBIRTH", None), payload: node.encode_to_vec() }];
        for (i, camera) in self.devices.keys().enumerate() {
            out.push(self.dbirth(camera, (i + 1) as u8, t));
        }
        out
    }

    /// The births were handed to the client: DDATA follow from seq = cameras + 1.
    pub fn births_sent(&mut self) {
        self.seq = (self.devices.len() + 1) as u8;
        self.born = true;
    }

    fn dbirth(&self, camera: &str, seq: u8, t: u64) -> Publish {
        let last = self.devices.get(camera).and_then(Option::as_ref);
        let mut metrics: Vec<Metric> = RESULT
            .iter()
            .map(|f| metric(f.name, f.datatype, last.and_then(|m| (f.value)(m)), Some(t), false))
            .collect();
        metrics.extend(COMMANDS.iter().map(|n| metric(n, datatype::STRING, text(""), Some(t), false)));
        let payload = Payload { timestamp: Some(t), seq: Some(seq as u64), metrics, ..Default::default() };
        Publish { topic: self.topic("DBIRTH", Some(camera)), payload: payload.encode_to_vec() }
    }

    /// A camera this node has not announced (added by a reload): its DBIRTH, to send before its
    /// first DDATA, then [`Node::sent`].
    pub fn unborn(&self, camera: &str) -> Option<Publish> {
        (!self.devices.contains_key(camera)).then(|| self.dbirth(camera, self.seq, now_ms()))
    }

    /// A verdict as DDATA with the next seq (historical when it is a replay). Nothing changes until
    /// [`Node::sent`].
    pub fn ddata(&self, msg: &VerdictMessage) -> Publish {
        let metrics = RESULT
            .iter()
            .map(|f| metric(f.name, f.datatype, (f.value)(msg), Some(msg.captured_unix_ms), msg.replayed))
            .collect();
        let payload = Payload {
            timestamp: Some(msg.published_unix_ms.max(1)),
            seq: Some(self.seq as u64),
            metrics,
            ..Default::default()
        };
        Publish { topic: self.topic("DDATA", Some(&msg.camera)), payload: payload.encode_to_vec() }
    }

    /// A DBIRTH or DDATA was handed to the client: the seq moves on, and a verdict's values become
    /// the camera's last ones.
    pub fn sent(&mut self, camera: &str, verdict: Option<&VerdictMessage>) {
        self.seq = self.seq.wrapping_add(1);
        let last = self.devices.entry(camera.to_string()).or_default();
        if let Some(v) = verdict {
            *last = Some(v.clone());
        }
    }

    /// A message on the primary host's STATE topic (`{"online":…,"timestamp":…}`): what to do about
    /// it, if anything. An older timestamp than the last one taken is ignored, as Sparkplug asks.
    pub fn on_state(&mut self, payload: &[u8]) -> Option<HostChange> {
        #[derive(serde::Deserialize)]
        struct State {
            online: bool,
            timestamp: u64,
        }
        let s: State = match serde_json::from_slice(payload) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("ignored a STATE message that is not Sparkplug 3.0's {{\"online\",\"timestamp\"}}: {e}");
                return None;
            }
        };
        if s.timestamp < self.host_timestamp {
            return None;
        }
        self.host_timestamp = s.timestamp;
        let was = std::mem::replace(&mut self.host_online, s.online);
        match (was, s.online) {
            (false, true) => Some(HostChange::Online),
            (true, false) => Some(HostChange::Offline),
            _ => None,
        }
    }

    /// An NCMD: only `Node Control/Rebirth` = true is taken.
    pub fn parse_ncmd(&self, payload: &[u8]) -> Result<Request, Refusal> {
        let p = decode(payload)?;
        let mut rebirth = false;
        for m in &p.metrics {
            match (m.name.as_deref(), &m.value) {
                (Some(REBIRTH), Some(Value::Boolean(b))) => rebirth |= *b,
                (Some(REBIRTH), _) => {
                    return Err(Refusal::Field { field: "Node Control/Rebirth", why: "must be a Boolean".into() });
                }
                (name, _) => return Err(unknown_metric(name, "NCMD")),
            }
        }
        if rebirth {
            Ok(Request::Rebirth)
        } else {
            Err(Refusal::Invalid("an NCMD without Node Control/Rebirth = true".into()))
        }
    }

    /// A DCMD on `spBv1.0/<group>/DCMD/<node>/<camera>`: `Command/Trigger` = part id (with an optional
    /// `Command/Product`), or `Command/Product` alone (a recipe switch); `Command/Token` carries the
    /// command token. The command is checked against the same bounds as a JSON one.
    pub fn parse_dcmd(&self, topic: &str, payload: &[u8]) -> Result<Envelope, Refusal> {
        let camera = topic.rsplit('/').next().unwrap_or_default().to_string();
        let p = decode(payload)?;
        let (mut part, mut product, mut token) = (None, None, None);
        for m in &p.metrics {
            let name = m.name.as_deref();
            let field = match name {
                Some(TRIGGER) => TRIGGER,
                Some(PRODUCT) => PRODUCT,
                Some(TOKEN) => TOKEN,
                _ => return Err(unknown_metric(name, "DCMD")),
            };
            let Some(Value::String(s)) = &m.value else {
                return Err(Refusal::Field { field, why: "must be a String".into() });
            };
            match field {
                TRIGGER => part = Some(s.clone()),
                PRODUCT => product = Some(s.clone()),
                _ => token = Some(s.clone()),
            }
        }
        let command = match (part, product) {
            (Some(part_id), product) => Command::Trigger { camera, part_id, product },
            (None, Some(product)) => Command::Recipe { camera, product, request_id: None },
            (None, None) => return Err(Refusal::Invalid(format!("a DCMD without {TRIGGER} or {PRODUCT}"))),
        };
        command.check()?;
        Ok(Envelope { command, request_id: None, token })
    }
}

fn decode(payload: &[u8]) -> Result<Payload, Refusal> {
    if payload.len() > MAX_COMMAND {
        return Err(Refusal::TooLarge(payload.len()));
    }
    Payload::decode(payload).map_err(|e| Refusal::Invalid(format!("not a Sparkplug B payload: {e}")))
}

fn unknown_metric(name: Option<&str>, kind: &str) -> Refusal {
    match name {
        Some(n) => {
            Refusal::Invalid(format!("{kind} metric {:?} is not one anomalyd takes", crate::util::text::escaped(n, 64)))
        }
        None => Refusal::Invalid(format!("{kind} metric without a name (aliases are not used by anomalyd)")),
    }
}

fn metric(name: &str, datatype: u32, value: Option<Value>, timestamp: Option<u64>, historical: bool) -> Metric {
    Metric {
        name: Some(name.to_string()),
        timestamp,
        datatype: Some(datatype),
        is_historical: historical.then_some(true),
        is_null: value.is_none().then_some(true),
        value,
        ..Default::default()
    }
}

fn now_ms() -> u64 {
    crate::types::verdict::unix_ms(std::time::SystemTime::now())
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::daemon::Trigger;
    use crate::types::verdict::Outcome;

    fn verdict(camera: &str, seq: u64) -> VerdictMessage {
        let cam = crate::source::intake::Intake::new_test(camera, 1, true, Trigger::Triggered).intake.camera;
        let mut m =
            cam.skeleton(seq, format!("{camera}-0-{seq}"), Some("P-7".into()), std::time::SystemTime::now(), None);
        m.verdict = Outcome::Ng;
        m.score = Some(41.5);
        m.threshold = Some(33.25);
        m
    }

    fn node(dir: &std::path::Path) -> Node {
        let cfg = SparkplugConfig { enabled: true, group_id: "line1".into(), primary_host_id: String::new() };
        Node::new(&cfg, "edge", &["a".into(), "b".into()], Some(dir.join("bdseq")))
    }

    fn value<'a>(p: &'a Payload, name: &str) -> &'a Metric {
        p.metrics.iter().find(|m| m.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn births_then_data_count_seq_from_zero_and_wrap_after_255() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = node(dir.path());
        let _ = n.connecting();
        let births = n.births();
        let topics: Vec<&str> = births.iter().map(|b| b.topic.as_str()).collect();
        assert_eq!(topics, ["spBv1.0/line1/NBIRTH/edge", "spBv1.0/line1/DBIRTH/edge/a", "spBv1.0/line1/DBIRTH/edge/b"]);
        let decoded: Vec<Payload> = births.iter().map(|b| Payload::decode(&b.payload[..]).unwrap()).collect();
        assert_eq!(decoded.iter().map(|p| p.seq).collect::<Vec<_>>(), [Some(0), Some(1), Some(2)]);
        assert_eq!(value(&decoded[0], BD_SEQ).value, Some(Value::Long(0)));
        assert_eq!(value(&decoded[0], REBIRTH).value, Some(Value::Boolean(false)));
        // Before any verdict, a camera's results are declared null with their datatype.
        let score = value(&decoded[1], "Result/Score");
        assert_eq!((score.datatype, score.is_null, &score.value), (Some(datatype::FLOAT), Some(true), &None));
        assert_eq!(value(&decoded[1], TRIGGER).datatype, Some(datatype::STRING));
        n.births_sent();

        let mut m = verdict("a", 1);
        let d = Payload::decode(&n.ddata(&m).payload[..]).unwrap();
        assert_eq!(d.seq, Some(3));
        assert_eq!(value(&d, "Result/Verdict").value, Some(Value::String("NG".into())));
        assert_eq!(value(&d, "Result/Score").value, Some(Value::Float(41.5)));
        assert_eq!(value(&d, "Result/PartId").value, Some(Value::String("P-7".into())));
        assert_eq!(value(&d, "Result/Product").is_null, Some(true));
        assert_eq!(value(&d, "Result/Score").timestamp, Some(m.captured_unix_ms));
        assert_eq!(value(&d, "Result/Score").is_historical, None);
        n.sent("a", Some(&m));
        m.replayed = true;
        let d = Payload::decode(&n.ddata(&m).payload[..]).unwrap();
        assert_eq!((d.seq, value(&d, "Result/Score").is_historical), (Some(4), Some(true)), "a replay is historical");
        for _ in 4..=255 {
            n.sent("a", Some(&m));
        }
        assert_eq!(Payload::decode(&n.ddata(&m).payload[..]).unwrap().seq, Some(0), "seq wraps after 255");

        // A rebirth's DBIRTH carries the camera's last values.
        let again = n.births();
        let a = Payload::decode(&again[1].payload[..]).unwrap();
        assert_eq!(value(&a, "Result/Score").value, Some(Value::Float(41.5)));
        assert_eq!(Payload::decode(&again[0].payload[..]).unwrap().seq, Some(0));
        // A camera added by a reload is born before its first data.
        assert!(n.unborn("a").is_none());
        let c = n.unborn("c").expect("a DBIRTH for the new camera");
        assert_eq!(c.topic, "spBv1.0/line1/DBIRTH/edge/c");
    }

    #[test]
    fn bd_seq_counts_connections_across_restarts_and_the_will_carries_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = node(dir.path());
        let will = n.connecting();
        assert_eq!(will.topic, "spBv1.0/line1/NDEATH/edge");
        assert!(!will.retain);
        assert_eq!(will.qos, QoS::AtLeastOnce);
        assert_eq!(value(&Payload::decode(&will.message[..]).unwrap(), BD_SEQ).value, Some(Value::Long(0)));
        let _ = n.connecting();
        assert_eq!(n.bd_seq(), 1);
        let death = Payload::decode(&n.ndeath().payload[..]).unwrap();
        assert_eq!(value(&death, BD_SEQ).value, Some(Value::Long(1)));
        assert_eq!(death.seq, None, "NDEATH has no seq");
        drop(n);
        let mut restarted = node(dir.path());
        let _ = restarted.connecting();
        assert_eq!(restarted.bd_seq(), 2, "kept across restarts");
        std::fs::write(dir.path().join("bdseq"), "255\n").unwrap();
        let mut n = node(dir.path());
        let _ = n.connecting();
        let _ = n.connecting();
        assert_eq!(n.bd_seq(), 0, "wraps after 255");
        std::fs::write(dir.path().join("bdseq"), "garbage").unwrap();
        let mut n = node(dir.path());
        let _ = n.connecting();
        assert_eq!(n.bd_seq(), 0, "an unreadable file starts again at 0");
    }

    #[test]
    fn the_primary_host_state_gates_births_and_stale_messages_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SparkplugConfig { enabled: true, group_id: "g".into(), primary_host_id: "scada".into() };
        let mut n = Node::new(&cfg, "edge", &["a".into()], Some(dir.path().join("bdseq")));
        assert_eq!(n.state_topic().as_deref(), Some("spBv1.0/STATE/scada"));
        let _ = n.connecting();
        assert_eq!(n.on_state(br#"{"online":false,"timestamp":10}"#), None);
        assert_eq!(n.on_state(br#"{"online":true,"timestamp":20}"#), Some(HostChange::Online));
        assert_eq!(n.on_state(br#"{"online":true,"timestamp":25}"#), None, "no change");
        assert_eq!(n.on_state(br#"{"online":false,"timestamp":15}"#), None, "older than the last one taken");
        assert_eq!(n.on_state(b"ONLINE"), None, "Sparkplug 2.2's plain text is not 3.0's JSON");
        assert_eq!(n.on_state(br#"{"online":false,"timestamp":30}"#), Some(HostChange::Offline));
        let _ = n.connecting();
        assert_eq!(
            n.on_state(br#"{"online":true,"timestamp":5}"#),
            Some(HostChange::Online),
            "a new connection starts over"
        );
    }

    fn cmd(metrics: Vec<Metric>) -> Vec<u8> {
        Payload { timestamp: Some(1), metrics, ..Default::default() }.encode_to_vec()
    }

    fn string(name: &str, v: &str) -> Metric {
        metric(name, datatype::STRING, text(v), None, false)
    }

    #[test]
    fn commands_are_read_from_ncmd_and_dcmd_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        assert!(n.is_dcmd("spBv1.0/line1/DCMD/edge/a"));
        assert!(!n.is_dcmd("spBv1.0/line1/DCMD/edge/a/b"));
        assert!(!n.is_dcmd("spBv1.0/line1/DCMD/other/a"));
        let rebirth = cmd(vec![metric(REBIRTH, datatype::BOOLEAN, Some(Value::Boolean(true)), None, false)]);
        assert_eq!(n.parse_ncmd(&rebirth), Ok(Request::Rebirth));
        let no = cmd(vec![metric(REBIRTH, datatype::BOOLEAN, Some(Value::Boolean(false)), None, false)]);
        assert!(n.parse_ncmd(&no).is_err());
        assert_eq!(n.parse_ncmd(&cmd(vec![string("Node Control/Reboot", "x")])).unwrap_err().kind(), "invalid");

        let topic = "spBv1.0/line1/DCMD/edge/a";
        let e = n.parse_dcmd(topic, &cmd(vec![string(TRIGGER, "P-9"), string(TOKEN, "secret")])).unwrap();
        assert_eq!(e.command, Command::Trigger { camera: "a".into(), part_id: "P-9".into(), product: None });
        assert_eq!(e.token.as_deref(), Some("secret"));
        let e = n.parse_dcmd(topic, &cmd(vec![string(TRIGGER, "P-9"), string(PRODUCT, "lid")])).unwrap();
        assert_eq!(
            e.command,
            Command::Trigger { camera: "a".into(), part_id: "P-9".into(), product: Some("lid".into()) }
        );
        let e = n.parse_dcmd(topic, &cmd(vec![string(PRODUCT, "lid")])).unwrap();
        assert_eq!(e.command, Command::Recipe { camera: "a".into(), product: "lid".into(), request_id: None });

        let wrong_type = cmd(vec![metric(TRIGGER, datatype::UINT32, Some(Value::Int(9)), None, false)]);
        assert_eq!(n.parse_dcmd(topic, &wrong_type).unwrap_err().kind(), "bad_field");
        assert_eq!(n.parse_dcmd(topic, &cmd(vec![string("Result/Score", "1")])).unwrap_err().kind(), "invalid");
        assert_eq!(n.parse_dcmd(topic, &cmd(vec![])).unwrap_err().kind(), "invalid");
        assert_eq!(n.parse_dcmd(topic, &cmd(vec![string(TRIGGER, &"x".repeat(500))])).unwrap_err().kind(), "bad_field");
        assert_eq!(n.parse_dcmd(topic, b"\xff\xff\xff").unwrap_err().kind(), "invalid");
        assert_eq!(n.parse_dcmd(topic, &vec![0; MAX_COMMAND + 1]).unwrap_err().kind(), "too_large");
    }
}
