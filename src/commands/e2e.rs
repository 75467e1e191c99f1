//! `anomalyd bench --e2e`: the whole daemon measured from capture to publish. Demo cameras feed an
//! embedded broker; a subscriber counts what arrives. For 1 and 4 cameras it runs two phases:
//! - throughput: sources as fast as frames are inspected (replay mode, nothing skipped): frames/s;
//! - latency: live sources at half that rate: p50/p99 capture-to-publish; the daemon's overhead per
//!   frame (capture to publish minus the frame's preprocess + encoder + decoder time), and the part of
//!   it that is not waiting in the queue (channel hops, serialisation, hand-over to MQTT).
//!
//! The same frames are also inspected alone, as `anomalyd bench` does, for the baseline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::commands::bench::percentile;
use crate::config::Config;
use crate::config::daemon::{CameraConfig, LogVerdicts};
use crate::config::source::SourceConfig;
use crate::daemon::{Daemon, DaemonError, NoNotify};
use crate::types::verdict::{Outcome, VerdictMessage};

#[derive(Debug, Clone, Serialize)]
pub struct E2eRun {
    pub cameras: usize,
    pub phase: String,
    pub offered_fps: f64,
    pub verdicts: usize,
    pub frames_per_s: f64,
    pub skipped: usize,
    pub errors: usize,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub inspect_ms_p50: f64,
    pub inspect_ms_p99: f64,
    pub queue_ms_p99: f64,
    pub overhead_ms_p50: f64,
    pub overhead_ms_p99: f64,
    /// Overhead without the queue wait: what the daemon itself adds to a frame.
    pub pipeline_ms_p99: f64,
    pub rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    pub inspect_alone_ms_p50: f64,
    pub inspect_alone_ms_p99: f64,
    pub runs: Vec<E2eRun>,
    pub peak_rss_mib: f64,
}

impl std::fmt::Display for E2eReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "inspect alone (anomalyd bench, same frames): p50 {:.1} ms, p99 {:.1} ms",
            self.inspect_alone_ms_p50, self.inspect_alone_ms_p99
        )?;
        writeln!(
            f,
            "{:>4} {:<10} {:>8} {:>8} {:>8} {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "cams",
            "phase",
            "offer/s",
            "verdicts",
            "fps",
            "skip",
            "err",
            "e2e p50",
            "e2e p99",
            "insp p99",
            "queue p99",
            "ovh p99",
            "pipe p99",
            "RSS MiB"
        )?;
        for r in &self.runs {
            writeln!(
                f,
                "{:>4} {:<10} {:>8.1} {:>8} {:>8.1} {:>5} {:>5} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>8.0}",
                r.cameras,
                r.phase,
                r.offered_fps,
                r.verdicts,
                r.frames_per_s,
                r.skipped,
                r.errors,
                r.latency_ms_p50,
                r.latency_ms_p99,
                r.inspect_ms_p99,
                r.queue_ms_p99,
                r.overhead_ms_p99,
                r.pipeline_ms_p99,
                r.rss_mib
            )?;
        }
        write!(
            f,
            "peak RSS {:.0} MiB (e2e = capture to publish; ovh = e2e minus the frame's own inspection; pipe = ovh minus queue wait)",
            self.peak_rss_mib
        )
    }
}

fn free_port() -> Result<u16, DaemonError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh folder for one phase's outbox.
fn tempfile_dir() -> Result<std::path::PathBuf, DaemonError> {
    let d = std::env::temp_dir().join(format!("anomalyd-e2e-{}-{}", std::process::id(), free_port()?));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

pub async fn run(base: &Config, seconds: f64) -> Result<E2eReport, DaemonError> {
    let (alone50, alone99) = {
        let (engine, detect) = (base.engine.clone(), base.detect.clone());
        tokio::task::spawn_blocking(move || -> Result<(f64, f64), DaemonError> {
            let mut det = crate::daemon::load_detector(&engine, "bench")?;
            let refs = crate::source::demo::reference();
            let err = |e| DaemonError::Reference {
                camera: "bench".into(),
                cause: crate::enrol::reference::ReferenceError::Detect(e),
            };
            let e = det.enroll(&refs, &detect, &mut |_| {}).map_err(err)?;
            let frames: Vec<_> =
                (1..=12).map(|v| crate::source::demo::part(v, crate::source::demo::Defect::None)).collect();
            let r = crate::commands::bench::run(&mut det, &e, &frames, 100, 10).map_err(err)?;
            Ok((r.total_ms_p50, r.total_ms_p99))
        })
        .await??
    };
    let mut runs = Vec::new();
    for cameras in [1usize, 4] {
        let through = phase(base, cameras, 0.0, seconds).await?;
        let rate = (through.frames_per_s * 0.5 / cameras as f64).max(0.5) as f32;
        runs.push(through);
        runs.push(phase(base, cameras, rate, seconds).await?);
    }
    Ok(E2eReport {
        inspect_alone_ms_p50: alone50,
        inspect_alone_ms_p99: alone99,
        runs,
        peak_rss_mib: crate::commands::bench::peak_rss_mib(),
    })
}

/// One phase: `cameras` demo cameras at `fps` each (0 = as fast as inspected) for `seconds`.
async fn phase(base: &Config, cameras: usize, fps: f32, seconds: f64) -> Result<E2eRun, DaemonError> {
    let mut cfg = base.clone();
    cfg.mqtt.broker = "embedded".into();
    cfg.mqtt.embedded_port = free_port()?;
    cfg.http.listen = String::new();
    cfg.store.dir = "".into();
    let outbox_dir = tempfile_dir()?;
    cfg.outbox.path = outbox_dir.join("outbox.redb");
    cfg.daemon.log_verdicts = LogVerdicts::None;
    cfg.daemon.exit_when_sources_end = false;
    cfg.daemon.enrolments = "".into();
    cfg.camera = (0..cameras)
        .map(|i| CameraConfig {
            name: format!("cam{i}"),
            source: SourceConfig::Demo { fps, frames: 0, defect_every: 3 },
            // Steady state: no learning in the background while measuring.
            learn_parts: 0,
            ..CameraConfig::demo()
        })
        .collect();
    let daemon = Daemon::start(cfg.clone()).await?;
    let got: Arc<Mutex<Vec<VerdictMessage>>> = Arc::default();
    let login = crate::control::broker::login(&cfg.mqtt, &outbox_dir)?;
    let sub = subscribe(cfg.mqtt.embedded_port, &login, got.clone()).await;
    // Let the cameras' first frames (cold caches) pass before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let start_count = got.lock().map(|g| g.len()).unwrap_or(0);
    let (_, _) = daemon
        .run(tokio::time::sleep(Duration::from_secs_f64(seconds)), tokio::sync::mpsc::channel(1).1, &NoNotify)
        .await;
    let wall = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&outbox_dir);
    tokio::time::sleep(Duration::from_millis(300)).await;
    sub.abort();
    let all = got.lock().map(|g| g[start_count..].to_vec()).unwrap_or_default();
    let ok: Vec<&VerdictMessage> = all.iter().filter(|m| matches!(m.verdict, Outcome::Ok | Outcome::Ng)).collect();
    let mut lat: Vec<f64> = ok.iter().map(|m| m.latency_ms.total as f64).collect();
    let inspect = |m: &&VerdictMessage| (m.latency_ms.preprocess + m.latency_ms.encoder + m.latency_ms.decoder) as f64;
    let mut ins: Vec<f64> = ok.iter().map(inspect).collect();
    let mut queue: Vec<f64> = ok.iter().map(|m| m.latency_ms.queue as f64).collect();
    let mut ovh: Vec<f64> = ok.iter().map(|m| m.latency_ms.total as f64 - inspect(m)).collect();
    let mut pipe: Vec<f64> =
        ok.iter().map(|m| m.latency_ms.total as f64 - inspect(m) - m.latency_ms.queue as f64).collect();
    Ok(E2eRun {
        cameras,
        phase: if fps == 0.0 { "throughput".into() } else { "latency".into() },
        offered_fps: fps as f64 * cameras as f64,
        verdicts: all.len(),
        frames_per_s: all.len() as f64 / wall,
        skipped: all.iter().filter(|m| m.verdict == Outcome::Skipped).count(),
        errors: all.iter().filter(|m| m.verdict == Outcome::Error).count(),
        latency_ms_p50: percentile(&mut lat, 0.5),
        latency_ms_p99: percentile(&mut lat, 0.99),
        inspect_ms_p50: percentile(&mut ins, 0.5),
        inspect_ms_p99: percentile(&mut ins, 0.99),
        queue_ms_p99: percentile(&mut queue, 0.99),
        overhead_ms_p50: percentile(&mut ovh, 0.5),
        overhead_ms_p99: percentile(&mut ovh, 0.99),
        pipeline_ms_p99: percentile(&mut pipe, 0.99),
        rss_mib: crate::commands::bench::rss_mib(),
    })
}

async fn subscribe(
    port: u16,
    login: &crate::control::broker::Login,
    into: Arc<Mutex<Vec<VerdictMessage>>>,
) -> tokio::task::JoinHandle<()> {
    let mut o = rumqttc::MqttOptions::new(format!("bench-{port}"), "127.0.0.1", port);
    o.set_credentials(login.username.clone(), login.password.0.clone());
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
    let _ = client.subscribe("anomalyd/+/+/verdict", rumqttc::QoS::AtLeastOnce).await;
    let handle = tokio::spawn(async move {
        let _client = client;
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p))) => {
                    if let Ok(m) = serde_json::from_slice::<VerdictMessage>(&p.payload)
                        && let Ok(mut g) = into.lock()
                    {
                        g.push(m);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    // Wait for the subscription to be in place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle
}
