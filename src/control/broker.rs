//! The embedded MQTT broker (rumqttd) that `mqtt.broker = "embedded"` starts on 127.0.0.1, so that
//! `anomalyd run` works on a box with nothing else installed. Plain MQTT 3.1.1, loopback only.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot start the embedded MQTT broker on {addr}: {cause} (another broker running? set mqtt.embedded_port, \
         or point mqtt.broker at it)"
    )]
    Bind { addr: SocketAddr, cause: std::io::Error },
    #[error("embedded MQTT broker: {0}")]
    Start(String),
    #[error("this anomalyd was built without the `embedded-broker` feature: set mqtt.broker = \"host:port\"")]
    NotBuilt,
}

/// Starts the broker on `127.0.0.1:port` and waits until it accepts connections. It lives as long
/// as the process.
#[cfg(feature = "embedded-broker")]
pub fn start(port: u16) -> Result<SocketAddr, BrokerError> {
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // rumqttd only logs a failed bind; probe first so the operator gets the reason.
    drop(TcpListener::bind(addr).map_err(|cause| BrokerError::Bind { addr, cause })?);
    let toml = format!(
        r#"id = 0
[router]
id = 0
max_connections = 256
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "anomalyd-embedded"
listen = "{addr}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 1048576
max_inflight_count = 500
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&toml).map_err(|e| BrokerError::Start(e.to_string()))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    let t0 = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if t0.elapsed() > Duration::from_secs(5) {
            return Err(BrokerError::Start(format!("not accepting connections on {addr} after 5 s")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(
        "embedded MQTT broker listening on {addr} (watch: mosquitto_sub -h 127.0.0.1 -p {port} -t 'anomalyd/#' -v)"
    );
    Ok(addr)
}

#[cfg(not(feature = "embedded-broker"))]
pub fn start(_port: u16) -> Result<SocketAddr, BrokerError> {
    Err(BrokerError::NotBuilt)
}
