//! The embedded MQTT broker (rumqttd) that `mqtt.broker = "embedded"` starts on 127.0.0.1, so that
//! `anomalyd run` works on a box with nothing else installed. Plain MQTT 3.1.1, loopback only, and
//! never anonymous: clients log in with `mqtt.username` and `mqtt.password_file`, or else as
//! `anomalyd` with a password generated at the first start and kept next to the outbox
//! ([`login`]). rumqttd cannot restrict topics per user, so commands on it must also carry a token:
//! `mqtt.command_token_file`'s, or else one generated next to the password ([`command_token`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::daemon::{MqttConfig, Secret, read_secret};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot start the embedded MQTT broker on {addr}: {cause} (another broker running? set mqtt.embedded_port, \
         or point mqtt.broker at it)"
    )]
    Bind { addr: SocketAddr, cause: std::io::Error },
    #[error("embedded MQTT broker: {0}")]
    Start(String),
    #[error("embedded MQTT broker secret {path}: {cause}")]
    Password { path: PathBuf, cause: std::io::Error },
    #[error("this anomalyd was built without the `embedded-broker` feature: set mqtt.broker = \"host:port\"")]
    NotBuilt,
}

/// The one login the embedded broker accepts.
#[derive(Debug, Clone)]
pub struct Login {
    pub username: String,
    pub password: Secret,
    /// Where the generated password is kept (None when it comes from `mqtt.password_file`).
    pub generated: Option<PathBuf>,
}

/// File name of the generated password, in the outbox's folder.
pub const PASSWORD_FILE: &str = "mqtt-embedded.password";

/// The embedded broker's login: `mqtt.username` with `mqtt.password_file`, or else `anomalyd` with the
/// password in `<state_dir>/mqtt-embedded.password`, generated (128 random bits, mode 0600) when absent.
pub fn login(m: &MqttConfig, state_dir: &Path) -> Result<Login, BrokerError> {
    if let Some(user) = &m.username {
        let password = match &m.password_file {
            Some(p) => read_secret(p).map_err(|cause| BrokerError::Password { path: p.clone(), cause })?,
            None => String::new(),
        };
        return Ok(Login { username: user.clone(), password: Secret(password), generated: None });
    }
    let path = state_dir.join(PASSWORD_FILE);
    let password = generated_secret(&path)?;
    Ok(Login { username: "anomalyd".into(), password: Secret(password), generated: Some(path) })
}

/// File name of the generated command token, in the outbox's folder.
pub const COMMAND_TOKEN_FILE: &str = "mqtt-embedded.command-token";

/// The token commands on the embedded broker must carry when `mqtt.command_token_file` is unset:
/// rumqttd cannot restrict who publishes on the command topics, so its password alone is not enough.
/// Generated once into `<state_dir>/mqtt-embedded.command-token` (mode 0600).
pub fn command_token(state_dir: &Path) -> Result<(Secret, PathBuf), BrokerError> {
    let path = state_dir.join(COMMAND_TOKEN_FILE);
    Ok((Secret(generated_secret(&path)?), path))
}

/// The secret in `path`, or a new one (128 random bits, hex) written there with mode 0600.
fn generated_secret(path: &Path) -> Result<String, BrokerError> {
    let err = |cause| BrokerError::Password { path: path.to_path_buf(), cause };
    if let Ok(p) = read_secret(path)
        && p.len() >= 16
    {
        return Ok(p);
    }
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).map_err(err)?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(err)?;
    writeln!(f, "{secret}").map_err(err)?;
    Ok(secret)
}

/// Starts the broker on `127.0.0.1:port`, accepting only `login`, and waits until it accepts
/// connections. It lives as long as the process. A port already taken is an error, never a reason to
/// publish to whatever listens there.
#[cfg(feature = "embedded-broker")]
pub fn start(port: u16, login: &Login) -> Result<SocketAddr, BrokerError> {
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
    let mut config: rumqttd::Config = toml::from_str(&toml).map_err(|e| BrokerError::Start(e.to_string()))?;
    for server in config.v4.iter_mut().flat_map(|v| v.values_mut()) {
        server.connections.auth = Some([(login.username.clone(), login.password.0.clone())].into_iter().collect());
    }
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
    let password = match &login.generated {
        Some(p) => format!("\"$(cat {})\"", p.display()),
        None => "<mqtt.password_file>".into(),
    };
    tracing::info!(
        "embedded MQTT broker listening on {addr}; watch: mosquitto_sub -h 127.0.0.1 -p {port} -u {} -P {password} \
         -t 'anomalyd/#' -v",
        login.username
    );
    Ok(addr)
}

#[cfg(not(feature = "embedded-broker"))]
pub fn start(_port: u16, _login: &Login) -> Result<SocketAddr, BrokerError> {
    Err(BrokerError::NotBuilt)
}
