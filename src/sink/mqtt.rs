//! The MQTT side: verdicts out, PLC commands in, availability on a retained status topic.
//!
//! Topics (under `mqtt.topic_prefix`, default `anomalyd`; `docs/MQTT.md` is the contract):
//! - `<prefix>/<node>/<camera>/verdict`: one JSON verdict per frame, QoS `mqtt.qos`.
//! - `<prefix>/<node>/status`: retained `online`; the broker publishes `offline` (last will) if the
//!   daemon vanishes; `stopped` after a clean exit.
//! - `<prefix>/<node>/cmd`: commands, e.g. `{"cmd":"trigger","camera":"cam1","part_id":"P-1"}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::daemon::config::{LogVerdicts, MqttConfig, broker_addr, read_secret};
use crate::daemon::frame::Outgoing;
use crate::daemon::message::{self, Outcome, VerdictMessage};
use crate::telemetry::Metrics;

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
    pub fn command(&self) -> String {
        format!("{}/{}/cmd", self.prefix, self.node)
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
}

/// Connection state shared with the daemon and the HTTP API.
#[derive(Debug, Default)]
pub struct MqttState {
    pub connected: AtomicBool,
    /// QoS>0 publishes the broker has not acknowledged yet.
    pub unacked: AtomicI64,
    /// Set once the publisher has sent its last message; the event loop then ends on disconnect.
    pub closing: AtomicBool,
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

/// Drives the connection: reconnects with backoff, announces `online` and subscribes to commands on
/// every connect, counts acknowledgements and forwards commands. Ends once closing and disconnected.
pub async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    topics: Topics,
    qos_level: QoS,
    state: Arc<MqttState>,
    metrics: Arc<Metrics>,
    commands: mpsc::UnboundedSender<Command>,
) {
    let mut backoff = Duration::from_millis(250);
    let mut connects = 0u64;
    let mut last_error_log: Option<Instant> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                connects += 1;
                if connects > 1 {
                    metrics.mqtt_reconnects.inc();
                }
                backoff = Duration::from_millis(250);
                state.connected.store(true, Ordering::SeqCst);
                metrics.mqtt_connected.set(1);
                tracing::info!("connected to the MQTT broker");
                let _ = client.try_publish(topics.status(), qos_level, true, "online");
                let _ = client.try_subscribe(topics.command(), QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Incoming::Publish(p))) if p.topic == topics.command() => {
                match serde_json::from_slice::<Command>(&p.payload) {
                    Ok(cmd) => {
                        metrics
                            .commands
                            .get_or_create(&crate::telemetry::ResultLabel { result: "accepted".into() })
                            .inc();
                        let _ = commands.send(cmd);
                    }
                    Err(e) => {
                        metrics
                            .commands
                            .get_or_create(&crate::telemetry::ResultLabel { result: "invalid".into() })
                            .inc();
                        tracing::warn!(
                            "ignored a command on {}: {e} (expected e.g. {{\"cmd\":\"trigger\",\"camera\":\"cam1\",\"part_id\":\"P-1\"}})",
                            topics.command()
                        );
                    }
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) if qos_level != QoS::AtMostOnce => {
                state.unacked.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Incoming::PubAck(_))) | Ok(Event::Incoming(Incoming::PubComp(_))) => {
                state.unacked.fetch_sub(1, Ordering::SeqCst);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                state.connected.store(false, Ordering::SeqCst);
                metrics.mqtt_connected.set(0);
                break;
            }
            Ok(_) => {}
            Err(e) => {
                let was = state.connected.swap(false, Ordering::SeqCst);
                metrics.mqtt_connected.set(0);
                if state.closing.load(Ordering::SeqCst) {
                    break;
                }
                if matches!(e, rumqttc::ConnectionError::RequestsDone) {
                    break;
                }
                if was {
                    metrics.publish_failures.inc();
                }
                // The client resends unacknowledged publishes after reconnecting.
                state.unacked.store(0, Ordering::SeqCst);
                if was || last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    tracing::warn!("MQTT broker unreachable: {e}; retrying in {} ms", backoff.as_millis());
                    last_error_log = Some(Instant::now());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Publishes verdicts in the order they are produced.
pub struct Publisher {
    pub client: AsyncClient,
    pub topics: Topics,
    pub qos: QoS,
    pub state: Arc<MqttState>,
    pub metrics: Arc<Metrics>,
    pub log: LogVerdicts,
    /// How long the last verdicts may take to be acknowledged at shutdown.
    pub drain: Duration,
}

impl Publisher {
    /// Publishes every verdict from `rx` in order until the channel closes, then `stopped`, waits for
    /// the broker's acknowledgements (up to `drain`) and disconnects. Returns how many were published.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Outgoing>) -> u64 {
        let Publisher { client, topics, qos: qos_level, state, metrics, log, drain } = self;
        let mut sent = 0u64;
        while let Some(Outgoing { mut msg, captured_at }) = rx.recv().await {
            metrics.publish_backlog.dec();
            let now = SystemTime::now();
            msg.published_at = message::rfc3339(now);
            msg.published_unix_ms = message::unix_ms(now);
            let total = captured_at.elapsed().as_secs_f32() * 1e3;
            msg.latency_ms.publish = (total - msg.latency_ms.total).max(0.0);
            msg.latency_ms.total = total;
            let label = metrics.camera(&msg.camera);
            metrics.stage(&msg.camera, "publish", msg.latency_ms.publish);
            metrics.latency.get_or_create(&label).observe(msg.latency_ms.total as f64 / 1e3);
            let payload = match serde_json::to_vec(&msg) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(frame = %msg.frame_id, "cannot serialise verdict: {e}");
                    continue;
                }
            };
            match log {
                LogVerdicts::All => log_verdict(&msg),
                LogVerdicts::Ng if msg.verdict != Outcome::Ok => log_verdict(&msg),
                _ => {}
            }
            if let Err(e) = client.publish(topics.verdict(&msg.camera), qos_level, false, payload).await {
                metrics.publish_failures.inc();
                tracing::error!(frame = %msg.frame_id, "MQTT client refused the verdict: {e}");
                continue;
            }
            metrics.published.get_or_create(&label).inc();
            sent += 1;
        }
        let _ = client.publish(topics.status(), qos_level, true, "stopped").await;
        let t0 = Instant::now();
        // Wait for the broker to take everything (including `stopped`), within the drain budget.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while t0.elapsed() < drain
            && (state.unacked.load(Ordering::SeqCst) > 0 || !state.connected.load(Ordering::SeqCst))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if state.unacked.load(Ordering::SeqCst) > 0 || !state.connected.load(Ordering::SeqCst) {
            tracing::warn!(
                "stopping with {} verdict(s) not acknowledged by the broker after {} ms",
                state.unacked.load(Ordering::SeqCst).max(0),
                drain.as_millis()
            );
        }
        state.closing.store(true, Ordering::SeqCst);
        let _ = client.disconnect().await;
        sent
    }
}

fn log_verdict(m: &VerdictMessage) {
    let part = m.part_id.as_deref().map(|p| format!(" part {p}")).unwrap_or_default();
    match m.verdict {
        Outcome::Ok | Outcome::Ng => tracing::info!(
            "{} {}{part}: {} score {:.3} (threshold {:.3}) {:.1} ms: {}",
            m.camera,
            m.frame_id,
            m.verdict.as_str(),
            m.score.unwrap_or(f32::NAN),
            m.threshold.unwrap_or(f32::NAN),
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
