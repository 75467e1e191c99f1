//! What the daemon tests share: a real mosquitto on a free 127.0.0.1 port, `mosquitto_sub` listening,
//! `anomalyd run` as a child process, plain HTTP, and generated scenes. Without mosquitto the tests
//! that need it say "skipped" (scripts/test.sh sets ANOMALYD_REQUIRE_MOSQUITTO=1, which turns a skip
//! into a failure).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomalyd::source::demo::{self, Defect};
use anomalyd::types::verdict::VerdictMessage;
use serde_json::Value;

use crate::common::bin;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn find(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(PathBuf::from).find(|p| p.is_file()).or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|d| d.join(Path::new(names[0]).file_name().unwrap())).find(|p| p.is_file())
    })
}

/// A mosquitto broker of our own on a free port.
pub struct Mosquitto {
    pub child: Child,
    pub port: u16,
    pub exe: PathBuf,
    pub conf: PathBuf,
    pub _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// On a free port. A port found free can be taken by another test before mosquitto binds it (the
    /// tests run in parallel); mosquitto then exits, and it is started again on another port.
    pub fn start() -> Option<Mosquitto> {
        Self::start_free(false)
    }

    /// As [`Mosquitto::start`], keeping sessions and queued messages across restarts.
    pub fn persistent() -> Option<Mosquitto> {
        Self::start_free(true)
    }

    fn start_free(persistent: bool) -> Option<Mosquitto> {
        for _ in 0..4 {
            let broker = Self::launch(free_port(), persistent)?;
            if broker.port_is_ours() {
                return Some(broker);
            }
        }
        panic!("mosquitto could not bind a free port in 4 tries")
    }

    /// Whether the broker is running and answers an MQTT CONNECT on its port (not another test's server
    /// that took the port first).
    fn port_is_ours(&self) -> bool {
        mqtt_connack(self.port)
    }

    /// On `port` (which must be free); `persistent` keeps sessions and queued messages across restarts (saved on SIGTERM).
    pub fn start_on(port: u16, persistent: bool) -> Option<Mosquitto> {
        let broker = Self::launch(port, persistent)?;
        assert!(broker.port_is_ours(), "mosquitto could not bind port {port}");
        Some(broker)
    }

    fn launch(port: u16, persistent: bool) -> Option<Mosquitto> {
        let Some(exe) = find(&["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]) else {
            assert!(
                std::env::var_os("ANOMALYD_REQUIRE_MOSQUITTO").is_none(),
                "mosquitto is required (ANOMALYD_REQUIRE_MOSQUITTO is set) but not installed"
            );
            eprintln!("skipped: mosquitto is not installed (apt-get install mosquitto mosquitto-clients)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        // Started as root, mosquitto drops to its own user, which must be able to write its state here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let conf = dir.path().join("mosquitto.conf");
        let persistence = if persistent {
            format!("persistence true\npersistence_location {}/\nautosave_interval 1\n", dir.path().display())
        } else {
            "persistence false\n".to_string()
        };
        let log = format!("log_dest file {}/mosquitto.log\nlog_type all\n", dir.path().display());
        // A subscriber that falls behind on a loaded machine must not lose messages to mosquitto's
        // default queue limit (1000 per client): the tests count every message.
        let queue = "max_queued_messages 0\n";
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\n{queue}{persistence}{log}"))
            .unwrap();
        let child = Self::spawn(&exe, &conf, port);
        Some(Mosquitto { child, port, exe, conf, _dir: dir })
    }

    pub fn spawn(exe: &Path, conf: &Path, port: u16) -> Child {
        let mut child =
            Command::new(exe).arg("-c").arg(conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let t0 = Instant::now();
        while !mqtt_connack(port) {
            if child.try_wait().unwrap().is_some() {
                // It could not bind the port: the caller sees a broker whose port is not its own.
                return child;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "mosquitto did not start on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Stops the broker (SIGTERM: it saves its sessions) and waits for it to exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill").args(["-s", "TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.exe, &self.conf, self.port);
    }

    /// Adds lines to the broker's configuration and restarts it with them.
    pub fn reconfigure(&mut self, extra: &str) {
        self.stop();
        let mut conf = std::fs::read_to_string(&self.conf).unwrap();
        conf.push_str(extra);
        std::fs::write(&self.conf, conf).unwrap();
        self.restart();
    }

    pub fn publish(&self, topic: &str, payload: &str) {
        let exe = find(&["/usr/bin/mosquitto_pub"]).expect("mosquitto_pub (mosquitto-clients)");
        let st = Command::new(exe)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1", "-t", topic, "-m", payload])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// Whether an MQTT broker answers a CONNECT (MQTT 3.1.1, clean session) on 127.0.0.1:`port` with a
/// CONNACK.
fn mqtt_connack(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let client_id = b"anomalyd-test-probe";
    let mut packet = vec![0x10, (12 + client_id.len()) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10];
    packet.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    packet.extend_from_slice(client_id);
    let mut reply = [0u8; 4];
    let answered = stream.write_all(&packet).is_ok() && stream.read_exact(&mut reply).is_ok();
    let _ = stream.write_all(&[0xe0, 0]);
    answered && reply[0] == 0x20
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The topic prefix of [`Sub`]'s readiness probes.
const PROBE: &str = "anomalyd/_probe/";

/// `mosquitto_sub -v` on `anomalyd/#`, collecting (topic, payload) lines.
pub struct Sub {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<(String, String)>>>,
}

impl Sub {
    pub fn start(port: u16) -> Sub {
        Self::start_with(port, &[])
    }

    /// A subscriber with a persistent session: it reconnects after broker restarts and gets what was
    /// queued for it meanwhile.
    pub fn persistent(port: u16) -> Sub {
        Self::start_with(port, &["-c", "-i", "anomalyd-soak-subscriber"])
    }

    /// Returns once the subscription is live: a probe published on `anomalyd/_probe/...` has come back
    /// (probes are not kept in `lines`).
    pub fn start_with(port: u16, extra: &[&str]) -> Sub {
        let exe = find(&["/usr/bin/mosquitto_sub"]).expect("mosquitto_sub (mosquitto-clients)");
        let mut child = Command::new(exe)
            .args(extra)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-v", "-t", "anomalyd/#"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (probed, probe_seen) = std::sync::mpsc::channel();
        let intake = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let (topic, payload) = line.split_once(' ').unwrap_or((&line, ""));
                if topic.starts_with(PROBE) {
                    let _ = probed.send(());
                    continue;
                }
                intake.lock().unwrap().push((topic.to_string(), payload.to_string()));
            }
        });
        let pub_exe = find(&["/usr/bin/mosquitto_pub"]).expect("mosquitto_pub (mosquitto-clients)");
        let t0 = Instant::now();
        loop {
            let _ = Command::new(&pub_exe)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", &format!("{PROBE}{}", child.id())])
                .args(["-m", "probe"])
                .status();
            if probe_seen.recv_timeout(Duration::from_millis(200)).is_ok() {
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "mosquitto_sub exited: is the broker on port {port} up?");
            assert!(t0.elapsed() < Duration::from_secs(20), "mosquitto_sub on port {port} never saw its probe");
        }
        Sub { child, lines }
    }

    pub fn verdicts(&self) -> Vec<VerdictMessage> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.ends_with("/verdict"))
            .map(|(t, p)| serde_json::from_str(p).unwrap_or_else(|e| panic!("{t}: {e}: {p}")))
            .collect()
    }

    pub fn statuses(&self) -> Vec<String> {
        self.lines.lock().unwrap().iter().filter(|(t, _)| t.ends_with("/status")).map(|(_, p)| p.clone()).collect()
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Sub) -> bool) {
        self.wait_for_daemon(what, timeout, None, done)
    }

    /// As [`Sub::wait_for`], with the daemon's log in the failure message.
    pub fn wait_for_daemon(&self, what: &str, timeout: Duration, daemon: Option<&Daemon>, done: impl Fn(&Sub) -> bool) {
        let t0 = Instant::now();
        while !done(self) {
            assert!(
                t0.elapsed() < timeout,
                "timed out waiting for {what}; got {:?}\ndaemon log:\n{}",
                self.lines.lock().unwrap(),
                daemon.map(Daemon::log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `anomalyd --config <file> run` as a child, its log in `<dir>/daemon.log`, its output in `<dir>/daemon.out`.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    pub out: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, config: &str) -> Daemon {
        let cfg = dir.join("anomalyd.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join("daemon.log");
        let out = dir.join("daemon.out");
        let child = Command::new(bin())
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log, out }
    }

    /// The summary line a clean exit prints.
    pub fn summary(&self) -> Value {
        let out = std::fs::read_to_string(&self.out).unwrap_or_default();
        let line =
            out.lines().find_map(|l| l.strip_prefix("summary: ")).unwrap_or_else(|| panic!("no summary in {out}"));
        serde_json::from_str(line).unwrap()
    }

    pub fn signal(&self, sig: &str) {
        assert!(Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap().success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; its exit must be clean.
    pub fn wait(&mut self, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "daemon exited with {st}:\n{}", self.log());
                return;
            }
            assert!(t0.elapsed() < timeout, "daemon did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `done` every 50 ms until it holds; past `timeout`, fails with `what` and the daemon's log.
pub fn until(what: &str, timeout: Duration, daemon: &Daemon, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}; daemon log:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (at most 120 s) until the HTTP API accepts connections.
pub fn wait_http(port: u16) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(120), "HTTP API never came up on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn http_get(port: u16, path: &str) -> (u16, Vec<u8>) {
    http(port, "GET", path, None, "")
}

pub fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, buf[split + 4..].to_vec())
}

/// Metric value of an exact series line (`name{labels}`), 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// A reference folder (one good part) and frames: good parts, two defective ones, one corrupt file.
pub fn scene(dir: &Path) -> (PathBuf, PathBuf) {
    let reference = dir.join("ref");
    let frames = dir.join("frames");
    std::fs::create_dir_all(&reference).unwrap();
    std::fs::create_dir_all(&frames).unwrap();
    demo::part(0, Defect::None).save(reference.join("good_0.png")).unwrap();
    for (name, v, stain) in [
        ("00_good.png", 1, None),
        ("01_good.png", 2, None),
        ("03_dark.png", 3, Some(((96, 36), [15, 15, 15]))),
        ("04_good.png", 4, None),
        ("05_bright.png", 5, Some(((200, 150), [250, 240, 90]))),
        ("06_good.png", 6, None),
    ] {
        let mut img = demo::part(v, Defect::None);
        if let Some(((x, y), rgb)) = stain {
            for dy in 0..20 {
                for dx in 0..20 {
                    img.put_pixel(x + dx, y + dy, image::Rgb(rgb));
                }
            }
        }
        img.save(frames.join(name)).unwrap();
    }
    std::fs::write(frames.join("02_corrupt.png"), b"\x89PNG but not really").unwrap();
    (reference, frames)
}

/// `[engine]`, `[daemon]` (node plus `daemon` lines), `[mqtt]`, `[http]` and `[outbox]` (in `dir`) of a
/// test config.
pub fn base_config(dir: &Path, broker: u16, http: &str, node: &str, daemon: &str) -> String {
    format!(
        "[engine]\nproviders = [\"cpu\"]\n[daemon]\nnode = \"{node}\"\nenrolments = \"{}\"\n{daemon}[mqtt]\n\
         broker = \"127.0.0.1:{broker}\"\n[http]\nlisten = \"{http}\"\n[outbox]\npath = \"{}\"\n",
        dir.join("enrolments").display(),
        dir.join("outbox.redb").display()
    )
}
