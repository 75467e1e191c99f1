//! The daemon end to end: a real mosquitto on a free 127.0.0.1 port, `anomalyd run` as a child process
//! on generated images, and `mosquitto_sub` listening. Without mosquitto these tests say "skipped"
//! (scripts/test.sh installs it and sets ANOMALYD_REQUIRE_MOSQUITTO=1, which turns a skip into a failure).

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anomalyd::source::demo::{self, Defect};
use anomalyd::types::verdict::{Outcome, VerdictMessage};
use serde_json::Value;

use crate::common::bin;
use crate::harness::*;

#[test]
fn one_verdict_per_frame_matching_inspect_with_metrics_status_and_stored_frames() {
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (reference, frames) = scene(dir.path());
    let http = free_port();
    let sub = Sub::start(broker.port);
    let config = base_config(
        dir.path(),
        broker.port,
        &format!("127.0.0.1:{http}"),
        "t1",
        "exit_when_sources_end = false\n",
    ) + &format!(
        "[store]\ndir = \"{}\"\n[[camera]]\nname = \"line\"\nreference = \"{}\"\n[camera.source]\nkind = \"files\"\npath = \"{}\"\n",
        dir.path().join("store").display(),
        reference.display(),
        frames.display()
    );
    let mut daemon = Daemon::start(dir.path(), &config);
    sub.wait_for("7 verdicts", Duration::from_secs(180), |s| s.verdicts().len() >= 7);
    std::thread::sleep(Duration::from_millis(300));
    let verdicts = sub.verdicts();
    assert_eq!(verdicts.len(), 7, "exactly one verdict per frame");
    let seqs: Vec<u64> = verdicts.iter().map(|v| v.seq).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    let ids: BTreeSet<&str> = verdicts.iter().map(|v| v.frame_id.as_str()).collect();
    assert_eq!(ids.len(), 7, "frame ids are unique");
    for v in &verdicts {
        assert_eq!((v.schema, v.node.as_str(), v.camera.as_str()), (1, "t1", "line"));
        assert!(!v.captured_at.is_empty() && !v.published_at.is_empty() && v.published_unix_ms >= v.captured_unix_ms);
        assert!(!v.model.sha256.is_empty() && v.enrolment.is_some());
        assert!(v.latency_ms.total >= v.latency_ms.encoder);
    }
    // The corrupt file (third in order) is an ERROR with the decoder's reason; the rest are inspected.
    assert_eq!(verdicts[2].verdict, Outcome::Error, "{:?}", verdicts[2]);
    assert!(verdicts[2].reason.as_deref().unwrap().contains("decode"), "{:?}", verdicts[2].reason);

    // Same verdicts and scores as `anomalyd inspect` on the same files.
    let mut files: Vec<PathBuf> = std::fs::read_dir(&frames).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let out = Command::new(bin())
        .args(["inspect", "--providers", "cpu", "--reference"])
        .arg(&reference)
        .arg("--out")
        .arg(dir.path().join("overlays"))
        .args(&files)
        .output()
        .unwrap();
    let inspected: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let daemon_inspected: Vec<&VerdictMessage> = verdicts.iter().filter(|v| v.verdict != Outcome::Error).collect();
    assert_eq!(inspected.len(), daemon_inspected.len());
    for (i, v) in inspected.iter().zip(&daemon_inspected) {
        let ng = i["anomalous"].as_bool().unwrap();
        assert_eq!(ng, v.verdict == Outcome::Ng, "{} vs {:?}", i["image"], v);
        let score = i["score"].as_f64().unwrap();
        assert!((score - v.score.unwrap() as f64).abs() < 1e-3 * score.abs().max(1.0), "{score} vs {:?}", v.score);
    }
    let ng: Vec<&&VerdictMessage> = daemon_inspected.iter().filter(|v| v.verdict == Outcome::Ng).collect();
    assert_eq!(ng.len(), 2, "the two stained parts are NG, the good parts OK: {daemon_inspected:?}");
    assert!(ng.iter().all(|v| !v.regions.is_empty() && v.answer.as_deref().unwrap().starts_with("Yes")));

    // /metrics agrees with the messages.
    let (st, body) = http_get(http, "/metrics");
    assert_eq!(st, 200);
    let text = String::from_utf8(body).unwrap();
    for (verdict, n) in [("OK", 4.0), ("NG", 2.0), ("ERROR", 1.0)] {
        let series = format!("anomalyd_frames_total{{camera=\"line\",verdict=\"{verdict}\"}}");
        assert_eq!(metric(&text, &series), n, "{series} in\n{text}");
    }
    assert_eq!(metric(&text, "anomalyd_verdicts_published_total{camera=\"line\"}"), 7.0);
    assert_eq!(metric(&text, "anomalyd_mqtt_connected"), 1.0);
    assert_eq!(metric(&text, "anomalyd_stage_seconds_count{camera=\"line\",stage=\"encoder\"}"), 6.0, "{text}");
    assert_eq!(metric(&text, "anomalyd_frame_latency_seconds_count{camera=\"line\"}"), 7.0, "{text}");
    assert!(text.contains("anomalyd_model_info{camera=\"line\""), "{text}");
    assert_eq!(http_get(http, "/healthz").0, 200);
    assert_eq!(http_get(http, "/readyz").0, 200);

    // NG frames are stored and served; ids that are not frame ids are refused.
    let url = ng[0].frame_url.clone().expect("NG frames carry their URL");
    let t0 = Instant::now();
    while http_get(http, &url).0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(10), "stored frame {url} never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, json) = http_get(http, &url);
    let stored: VerdictMessage = serde_json::from_slice(&json).unwrap();
    assert_eq!(stored.frame_id, ng[0].frame_id);
    for part in ["image", "overlay"] {
        let (st, jpeg) = http_get(http, &format!("{url}/{part}"));
        assert_eq!((st, &jpeg[..2]), (200, &[0xFF, 0xD8][..]), "{part}");
    }
    assert_eq!(http_get(http, "/v1/frames/..%2F..%2Fetc%2Fpasswd").0, 400);
    assert_eq!(http_get(http, "/v1/frames/line-0-999").0, 404);

    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30));
    sub.wait_for("stopped", Duration::from_secs(5), |s| s.statuses().last().map(String::as_str) == Some("stopped"));
    let statuses = sub.statuses();
    assert_eq!(statuses.first().map(String::as_str), Some("online"), "{statuses:?}");
    assert_eq!(sub.verdicts().len(), 7, "nothing more after the drain");
}

#[test]
fn overload_and_corrupt_frames_still_give_exactly_one_verdict_each() {
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    demo::part(0, Defect::None).save(dir.path().join("ref.png")).unwrap();
    for i in 0..16u64 {
        if i == 7 {
            std::fs::write(frames.join(format!("{i:02}.png")), b"garbage").unwrap();
        } else {
            demo::part(i + 1, Defect::None).save(frames.join(format!("{i:02}.png"))).unwrap();
        }
    }
    let sub = Sub::start(broker.port);
    // A camera at 40 frames/s, an engine made slow (200 ms per frame), a queue of 1.
    let config = base_config(dir.path(), broker.port, "", "t2", "inspect_delay_ms = 200\n")
        + &format!(
            "[store]\ndir = \"\"\n[[camera]]\nname = \"fast\"\nreference = \"{}\"\nqueue = 1\n[camera.source]\nkind = \"files\"\npath = \"{}\"\nfps = 40\n",
            dir.path().join("ref.png").display(),
            frames.display()
        );
    let mut daemon = Daemon::start(dir.path(), &config);
    daemon.wait(Duration::from_secs(180));
    sub.wait_for("stopped", Duration::from_secs(5), |s| s.statuses().last().map(String::as_str) == Some("stopped"));
    let v = sub.verdicts();
    let seqs: Vec<u64> = v.iter().map(|m| m.seq).collect::<BTreeSet<_>>().into_iter().collect();
    assert_eq!(v.len(), 16, "one verdict per frame: {v:?}");
    assert_eq!(seqs, (1..=16).collect::<Vec<_>>());
    let skipped: Vec<_> = v.iter().filter(|m| m.verdict == Outcome::Skipped).collect();
    assert!(!skipped.is_empty(), "an overloaded camera must produce SKIPPED verdicts");
    assert!(
        skipped.iter().all(|m| m.reason.as_deref().is_some_and(|r| r.contains("queue full") || r.contains("stale")))
    );
    assert!(v.iter().any(|m| m.verdict == Outcome::Ok), "some frames are still inspected");
    let corrupt = v.iter().find(|m| m.seq == 8).unwrap();
    assert!(matches!(corrupt.verdict, Outcome::Error | Outcome::Skipped), "{corrupt:?}");
}

#[test]
fn sighup_swaps_the_enrolment_without_losing_a_frame_and_refuses_a_broken_config() {
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.enrol"), dir.path().join("b.enrol"));
    for (file, variant) in [(&a, 0u64), (&b, 40)] {
        let refdir = dir.path().join(format!("ref{variant}"));
        std::fs::create_dir_all(&refdir).unwrap();
        demo::part(variant, Defect::None).save(refdir.join("good.png")).unwrap();
        let st = Command::new(bin())
            .args(["enroll", "--providers", "cpu", "--reference"])
            .arg(&refdir)
            .arg("--out")
            .arg(file)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    }
    let sub = Sub::start(broker.port);
    let config = |reference: &Path| {
        base_config(dir.path(), broker.port, "", "t3", "")
            + &format!(
                "[store]\ndir = \"\"\n[[camera]]\nname = \"cam\"\nreference = \"{}\"\n[camera.source]\nkind = \"demo\"\nfps = 6\nframes = 0\n",
                reference.display()
            )
    };
    let mut daemon = Daemon::start(dir.path(), &config(&a));
    sub.wait_for("verdicts with enrolment A", Duration::from_secs(120), |s| s.verdicts().len() >= 4);
    std::fs::write(dir.path().join("anomalyd.toml"), config(&b)).unwrap();
    daemon.signal("HUP");
    let is_b = |m: &VerdictMessage| m.enrolment.as_ref().is_some_and(|e| e.source.ends_with("b.enrol"));
    sub.wait_for("verdicts with enrolment B", Duration::from_secs(60), |s| {
        s.verdicts().iter().filter(|m| is_b(m)).count() >= 3
    });
    std::fs::write(dir.path().join("anomalyd.toml"), config(&b) + "[detect]\nbogus_key = 1\n").unwrap();
    daemon.signal("HUP");
    let before = sub.verdicts().len();
    sub.wait_for("verdicts after the refused reload", Duration::from_secs(30), |s| s.verdicts().len() >= before + 4);
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30));
    sub.wait_for("stopped", Duration::from_secs(5), |s| s.statuses().last().map(String::as_str) == Some("stopped"));
    let v = sub.verdicts();
    // A frame SKIPPED on a busy machine leaves at once and may overtake frames still being inspected.
    let mut seqs: Vec<u64> = v.iter().map(|m| m.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=v.len() as u64).collect::<Vec<_>>(), "no frame lost or repeated across reloads");
    assert!(v.iter().all(|m| m.verdict != Outcome::Error), "{v:?}");
    let first_b = v.iter().position(is_b).unwrap();
    assert!(v[first_b..].iter().all(is_b), "after the swap every verdict uses B");
    assert!(v.last().is_some_and(is_b), "the broken config did not replace B");
    let ids: BTreeSet<&str> = v.iter().filter_map(|m| m.enrolment.as_ref().map(|e| e.id.as_str())).collect();
    assert_eq!(ids.len(), 2, "two enrolments, two ids");
    assert!(daemon.log().contains("reload refused"), "{}", daemon.log());
}

#[test]
fn plc_triggers_tag_frames_with_part_ids_and_a_trigger_without_frame_is_an_error() {
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (reference, frames) = scene(dir.path());
    std::fs::remove_file(frames.join("02_corrupt.png")).unwrap();
    for f in ["04_good.png", "05_bright.png", "06_good.png"] {
        std::fs::remove_file(frames.join(f)).unwrap();
    }
    let sub = Sub::start(broker.port);
    let config = base_config(dir.path(), broker.port, "", "t4", "exit_when_sources_end = false\n")
        + &format!(
            "[store]\ndir = \"\"\n[[camera]]\nname = \"station\"\nreference = \"{}\"\ntrigger = \"triggered\"\ntrigger_timeout_ms = 800\n[camera.source]\nkind = \"files\"\npath = \"{}\"\n",
            reference.display(),
            frames.display()
        );
    let mut daemon = Daemon::start(dir.path(), &config);
    sub.wait_for("online", Duration::from_secs(120), |s| s.statuses().iter().any(|x| x == "online"));
    std::thread::sleep(Duration::from_millis(300));
    for p in ["P-1", "P-2", "P-3"] {
        broker
            .publish("anomalyd/t4/cmd", &format!("{{\"cmd\":\"trigger\",\"camera\":\"station\",\"part_id\":\"{p}\"}}"));
        sub.wait_for(p, Duration::from_secs(60), |s| s.verdicts().iter().any(|m| m.part_id.as_deref() == Some(p)));
    }
    broker.publish("anomalyd/t4/cmd", "{\"cmd\":\"format-disk\"}");
    broker.publish("anomalyd/t4/cmd", "{\"cmd\":\"trigger\",\"camera\":\"station\",\"part_id\":\"P-4\"}");
    sub.wait_for("P-4", Duration::from_secs(30), |s| s.verdicts().iter().any(|m| m.part_id.as_deref() == Some("P-4")));
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30));
    let v = sub.verdicts();
    let parts: Vec<(&str, Outcome)> = v.iter().map(|m| (m.part_id.as_deref().unwrap_or("-"), m.verdict)).collect();
    assert_eq!(
        parts,
        [("P-1", Outcome::Ok), ("P-2", Outcome::Ok), ("P-3", Outcome::Ng), ("P-4", Outcome::Error)],
        "{v:?}"
    );
    assert!(v[3].reason.as_deref().unwrap().contains("no frame arrived"), "{:?}", v[3].reason);
}

#[test]
fn mqtt_contract_examples_parse() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/MQTT.md")).unwrap();
    let blocks: Vec<&str> = doc.split("```json").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    let (mut verdicts, mut commands, mut notes) = (0, 0, 0);
    for b in blocks {
        let v: Value = serde_json::from_str(b).unwrap_or_else(|e| panic!("{e}: {b}"));
        if v.get("verdict").is_some() {
            let m: VerdictMessage = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}: {b}"));
            assert_eq!(m.schema, anomalyd::types::verdict::SCHEMA);
            assert!(anomalyd::types::verdict::valid_frame_id(&m.frame_id));
            verdicts += 1;
        } else if v.get("text").is_some() {
            let _: anomalyd::describe::explainer::Description =
                serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}: {b}"));
            notes += 1;
        } else if v.get("answer").is_some() {
            let _: anomalyd::describe::explainer::ChatAnswer =
                serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}: {b}"));
            notes += 1;
        } else if v.get("drifting").is_some() {
            let _: anomalyd::daemon::line::DriftMessage =
                serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}: {b}"));
            notes += 1;
        } else if v.get("question").is_some() {
            anomalyd::types::command::parse_chat(b.as_bytes()).unwrap_or_else(|e| panic!("{e}: {b}"));
            notes += 1;
        } else if v.get("action").is_some() {
            let _: anomalyd::sink::audit::AuditEntry = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}: {b}"));
            notes += 1;
        } else if v.get("accepted").is_some() {
            assert!(v.get("request_id").is_some() && v.get("reason").is_some(), "{b}");
            notes += 1;
        } else {
            anomalyd::types::command::parse_command(b.as_bytes()).unwrap_or_else(|e| panic!("{e}: {b}"));
            commands += 1;
        }
    }
    assert_eq!((verdicts, commands, notes), (5, 3, 6));
}

#[test]
fn validate_reports_every_problem_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(
        &f,
        "[mqtt]\nqos = 7\n[mqtt.sparkplug]\nenabled = true\ngroup_id = \"plant/a\"\nprimary_host_id = \"scada#1\"\n[http]\nlisten = \"nowhere\"\n[[camera]]\nname = \"a b\"\nreference = \"/no/such\"\n[camera.source]\nkind = \"files\"\npath = \"/no/such/*.png\"\n",
    )
    .unwrap();
    let out = Command::new(bin()).arg("validate").arg(&f).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for key in [
        "mqtt.qos",
        "mqtt.sparkplug.group_id",
        "mqtt.sparkplug.primary_host_id",
        "http.listen",
        "camera[0].name",
        "camera[0].reference",
        "camera[0].source.path",
    ] {
        assert!(err.contains(key), "{key} missing:\n{err}");
    }
    // Environment overrides go through the same validation, named by their key.
    let env = Command::new(bin())
        .arg("validate")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/anomalyd.toml"))
        .env("ANOMALYD__DAEMON__NODE", "bad name")
        .env("ANOMALYD__MQTT__QOS", "5")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&env.stderr);
    assert_eq!(env.status.code(), Some(2), "{err}");
    assert!(err.contains("daemon.node") && err.contains("mqtt.qos"), "{err}");
    let ok = Command::new(bin())
        .arg("validate")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/anomalyd.toml"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

/// Frames a source delivers into a test camera within `timeout` (until the source ends).
fn frames_from(
    source: anomalyd::config::source::SourceConfig,
    timeout: Duration,
) -> (Vec<image::RgbImage>, anomalyd::source::SourceEnd) {
    use anomalyd::source::intake::Intake;
    let t = Intake::new_test("gst", 64, true, anomalyd::config::daemon::Trigger::EveryFrame);
    let h = source.start(t.intake.clone()).unwrap();
    let t0 = Instant::now();
    while !h.thread.is_finished() && t0.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(20));
    }
    t.intake.stop_flag().store(true, std::sync::atomic::Ordering::SeqCst);
    let end = h.thread.join().unwrap();
    let frames = t.queue.try_iter().map(|f| f.image.unwrap()).collect();
    (frames, end)
}

#[cfg(feature = "gstreamer")]
#[test]
fn gstreamer_test_source_delivers_rgb_frames_copied_by_stride() {
    use anomalyd::config::source::SourceConfig;
    use anomalyd::source::SourceEnd;
    // 90 px rows are 270 bytes, padded to 272 by GStreamer: the copy must follow the stride.
    let src = SourceConfig::Test { pattern: "red".into(), width: 90, height: 60, fps: 30, frames: 5 };
    let (frames, end) = frames_from(src, Duration::from_secs(20));
    assert_eq!(end, SourceEnd::Eos);
    assert_eq!(frames.len(), 5);
    for f in &frames {
        assert_eq!(f.dimensions(), (90, 60));
        for p in [f.get_pixel(0, 0), f.get_pixel(89, 59), f.get_pixel(45, 30)] {
            assert!(p[0] > 200 && p[1] < 50 && p[2] < 50, "not red: {p:?}");
        }
    }
    let desc =
        "videotestsrc num-buffers=3 pattern=green ! video/x-raw,width=50,height=40 ! videoconvert ! appsink name=sink";
    let (frames, end) = frames_from(SourceConfig::Pipeline { description: desc.into() }, Duration::from_secs(20));
    assert_eq!((frames.len(), end), (3, SourceEnd::Eos));
    assert!(frames.iter().all(|f| f.dimensions() == (50, 40) && f.get_pixel(10, 10)[1] > 200));
}

#[cfg(feature = "gstreamer")]
#[test]
fn gstreamer_faults_are_reported_not_panics() {
    use anomalyd::config::source::SourceConfig;
    use anomalyd::source::SourceEnd;
    let (_, end) = frames_from(SourceConfig::Uri { uri: "file:///no/such/video.mp4".into() }, Duration::from_secs(20));
    assert!(
        matches!(end, SourceEnd::Failed(ref why) if why.to_lowercase().contains("not") || why.contains("exist")),
        "{end:?}"
    );
    let bad = SourceConfig::Pipeline { description: "videotestsrc ! appsink name=other".into() };
    let (_, end) = frames_from(bad, Duration::from_secs(5));
    assert!(matches!(end, SourceEnd::Failed(ref why) if why.contains("appsink name=sink")), "{end:?}");
    let problems = SourceConfig::Aravis { camera: None }.validate("camera[0].source");
    if !problems.is_empty() {
        assert!(problems[0].contains("aravissrc") && problems[0].contains("install"), "{problems:?}");
    }
}

#[test]
fn state_changing_endpoints_need_the_token_and_frame_ids_cannot_traverse_paths() {
    use std::os::unix::fs::PermissionsExt;
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef0123456789abcdef";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let http_port = free_port();
    let config = base_config(dir.path(), broker.port, &format!("127.0.0.1:{http_port}"), "t5", "")
        .replace("[outbox]", &format!("token_file = \"{}\"\n[outbox]", token_file.display()))
        + "[store]\ndir = \"\"\n[[camera]]\nname = \"cam\"\ntrigger = \"triggered\"\n[camera.source]\nkind = \"demo\"\nfps = 5\nframes = 0\n";
    // A token file others can read is refused before anything starts.
    std::fs::write(dir.path().join("anomalyd.toml"), &config).unwrap();
    let out = Command::new(bin()).arg("validate").arg(dir.path().join("anomalyd.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let sub = Sub::start(broker.port);
    let mut daemon = Daemon::start(dir.path(), &config);
    wait_http(http_port);
    sub.wait_for("online", Duration::from_secs(120), |s| s.statuses().iter().any(|x| x == "online"));
    let trigger = r#"{"camera":"cam","part_id":"HTTP-1"}"#;
    assert_eq!(http(http_port, "POST", "/v1/trigger", None, trigger).0, 401);
    assert_eq!(http(http_port, "POST", "/v1/trigger", Some("0123456789abcdef0123456789abcdeX"), trigger).0, 401);
    assert_eq!(http(http_port, "POST", "/v1/reload", None, "").0, 401);
    assert_eq!(http(http_port, "POST", "/v1/trigger", Some(token), "{\"camera\":1}").0, 400);
    assert_eq!(http(http_port, "POST", "/v1/trigger", Some(token), trigger).0, 202);
    sub.wait_for("the HTTP trigger's verdict", Duration::from_secs(30), |s| {
        s.verdicts().iter().any(|m| m.part_id.as_deref() == Some("HTTP-1"))
    });
    assert_eq!(http(http_port, "POST", "/v1/reload", Some(token), "").0, 202);
    // Read-only endpoints are open by default; the probes always are.
    assert_eq!(http_get(http_port, "/metrics").0, 200);
    assert_eq!(http_get(http_port, "/healthz").0, 200);
    for bad in
        ["/v1/frames/..%2F..%2Fetc%2Fpasswd", "/v1/frames/%2Fetc%2Fshadow", "/v1/frames/.hidden", "/v1/frames/a%00b"]
    {
        assert_eq!(http_get(http_port, bad).0, 400, "{bad}");
    }
    let t0 = Instant::now();
    while !(daemon.log().contains("configuration reloaded") && daemon.log().contains("reload requested: reading")) {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30));
    let log = daemon.log();
    assert!(!log.contains(token), "the token must never be logged");
}

/// Frame ids grouped by the daemon start they came from: `<camera>-<start>-<seq>`.
fn boot_of(frame_id: &str) -> &str {
    frame_id.rsplit('-').nth(1).unwrap()
}

#[test]
fn verdicts_logged_before_a_crash_are_published_after_the_restart() {
    let port = free_port();
    if find(&["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]).is_none() {
        assert!(std::env::var_os("ANOMALYD_REQUIRE_MOSQUITTO").is_none(), "mosquitto is required");
        eprintln!("skipped: mosquitto is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (reference, frames) = scene(dir.path());
    std::fs::remove_file(frames.join("02_corrupt.png")).unwrap();
    let http_port = free_port();
    // The broker is down: every verdict waits in the outbox.
    let config = base_config(
        dir.path(),
        port,
        &format!("127.0.0.1:{http_port}"),
        "t6",
        "exit_when_sources_end = false\n",
    ) + &format!(
        "[store]\ndir = \"\"\n[[camera]]\nname = \"cam\"\nreference = \"{}\"\n[camera.source]\nkind = \"files\"\npath = \"{}\"\n",
        reference.display(),
        frames.display()
    );
    let mut first = Daemon::start(dir.path(), &config);
    wait_http(http_port);
    let t0 = Instant::now();
    loop {
        let text = String::from_utf8(http_get(http_port, "/metrics").1).unwrap();
        if metric(&text, "anomalyd_outbox_verdicts") == 6.0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "verdicts never reached the outbox:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let Some(_broker) = Mosquitto::start_on(port, false) else { return };
    let sub = Sub::start(port);
    let mut second = Daemon::start(dir.path(), &config);
    sub.wait_for("12 verdicts", Duration::from_secs(120), |s| s.verdicts().len() >= 12);
    second.signal("TERM");
    second.wait(Duration::from_secs(30));
    let v = sub.verdicts();
    let boots: BTreeSet<&str> = v.iter().map(|m| boot_of(&m.frame_id)).collect();
    assert_eq!(boots.len(), 2, "{boots:?}");
    let before_crash: Vec<&VerdictMessage> = v.iter().filter(|m| m.replayed).collect();
    let seqs: BTreeSet<u64> = before_crash.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=6).collect(), "every verdict logged before SIGKILL arrives, marked replayed: {v:?}");
    assert_eq!(before_crash.iter().map(|m| boot_of(&m.frame_id)).collect::<BTreeSet<_>>().len(), 1);
    assert_eq!(v.iter().filter(|m| !m.replayed).count(), 6, "the second run's own frames");
}

#[test]
fn soak_broker_restarts_and_camera_unplugs_lose_no_verdict() {
    let secs: u64 = std::env::var("ANOMALYD_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(40).max(40);
    let Some(mut broker) = Mosquitto::persistent() else { return };
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir_all(&share).unwrap();
    for v in 1..=3 {
        demo::part(v, Defect::None).save(share.join(format!("{v}.png"))).unwrap();
    }
    let sub = Sub::persistent(broker.port);
    let config = base_config(
        dir.path(),
        broker.port,
        "",
        "soak",
        "log_verdicts = \"ng\"\nexit_when_sources_end = false\n",
    ) + &format!(
        "[store]\ndir = \"\"\n\
             [[camera]]\nname = \"line\"\n[camera.source]\nkind = \"demo\"\nfps = 6\nframes = 0\n\
             [[camera]]\nname = \"share\"\nreference = \"{}\"\n[camera.source]\nkind = \"files\"\npath = \"{}\"\nfps = 5\nrepeat = true\n",
        share.join("1.png").display(),
        share.display()
    );
    let mut daemon = Daemon::start(dir.path(), &config);
    sub.wait_for("the first verdicts", Duration::from_secs(120), |s| s.verdicts().len() >= 5);
    let t0 = Instant::now();
    let step = secs as f64 / 10.0;
    let at = |k: f64| t0 + Duration::from_secs_f64(k * step);
    let until = |t: Instant| std::thread::sleep(t.saturating_duration_since(Instant::now()));
    let (mut broker_restarts, mut unplugs) = (0, 0);
    let off = dir.path().join("share.unplugged");
    for round in 0..3 {
        let base = round as f64 * 3.0;
        until(at(base + 1.0));
        broker.stop();
        until(at(base + 1.8));
        broker.restart();
        broker_restarts += 1;
        if round < 2 {
            until(at(base + 2.2));
            std::fs::rename(&share, &off).unwrap();
            until(at(base + 3.0));
            std::fs::rename(&off, &share).unwrap();
            unplugs += 1;
        }
    }
    until(at(10.0));
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(60));
    let summary = daemon.summary();
    let frames = summary["frames"].as_object().unwrap().clone();
    let total: u64 = frames.values().map(|v| v.as_u64().unwrap()).sum();
    let t1 = Instant::now();
    while (sub.verdicts().iter().map(|m| m.frame_id.clone()).collect::<BTreeSet<_>>().len() as u64) < total
        && t1.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = sub.verdicts();
    let mut missing = Vec::new();
    for (camera, n) in &frames {
        let seen: BTreeSet<u64> = v.iter().filter(|m| &m.camera == camera).map(|m| m.seq).collect();
        missing.extend((1..=n.as_u64().unwrap()).filter(|s| !seen.contains(s)).map(|s| format!("{camera}#{s}")));
    }
    let distinct = v.iter().map(|m| m.frame_id.as_str()).collect::<BTreeSet<_>>().len();
    let states: Vec<String> =
        sub.lines.lock().unwrap().iter().filter(|(t, _)| t.ends_with("/share/state")).map(|(_, p)| p.clone()).collect();
    eprintln!(
        "soak: {secs} s, frames {total} ({frames:?}), broker restarts {broker_restarts}, camera unplugs {unplugs}, \
         messages {}, duplicates {}, missing {}, replayed {}, max outbox backlog {}, reconnects {}",
        v.len(),
        v.len() - distinct,
        missing.len(),
        v.iter().filter(|m| m.replayed).count(),
        summary["max_backlog"],
        summary["reconnects"]
    );
    let blog = std::fs::read_to_string(broker._dir.path().join("mosquitto.log")).unwrap_or_default();
    let interesting: Vec<&str> = blog.lines().filter(|l| !l.contains("PUBLISH") && !l.contains("PUBACK")).collect();
    assert!(missing.is_empty(), "missing verdicts: {missing:?}\n{}\nbroker:\n{}", daemon.log(), interesting.join("\n"));
    assert!(summary["reconnects"].as_u64().unwrap() >= 3, "{summary}");
    // A duplicate is a verdict the broker took but whose acknowledgement the outage swallowed: at most
    // the window of unacknowledged publishes (64) per connection lost.
    let bound = 64 * summary["reconnects"].as_u64().unwrap();
    assert!((v.len() - distinct) as u64 <= bound, "{} duplicates, over the bound of {bound}", v.len() - distinct);
    assert!(states.iter().filter(|s| *s == "reconnecting").count() >= 2, "camera states: {states:?}");
    assert!(v.iter().any(|m| m.replayed), "verdicts held during the outages go out marked replayed");
    assert!(total > 50, "{total}");
}

#[test]
fn mqtt_over_tls_with_username_and_password() {
    let Some(openssl) = find(&["/usr/bin/openssl"]) else {
        eprintln!("skipped: openssl is not installed");
        return;
    };
    let Some(passwd) = find(&["/usr/bin/mosquitto_passwd"]) else {
        assert!(std::env::var_os("ANOMALYD_REQUIRE_MOSQUITTO").is_none(), "mosquitto_passwd is required");
        eprintln!("skipped: mosquitto is not installed");
        return;
    };
    let Some(exe) = find(&["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new(&openssl).args(args).current_dir(d).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=anomalyd test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    let secret = "s3cret-pa55word-for-the-test";
    let st = Command::new(passwd).args(["-b", "-c"]).arg(d.join("passwd")).args(["plant", secret]).status().unwrap();
    assert!(st.success());
    std::fs::write(d.join("mqtt.password"), format!("{secret}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["server.key", "passwd"] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let port = free_port();
    let conf = d.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {0}/passwd\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\n",
            d.display()
        ),
    )
    .unwrap();
    let mut broker =
        Command::new(exe).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "TLS mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = base_config(d, port, "", "tls", "").replace(
        "[http]",
        &format!(
            "ca_file = \"{0}/ca.pem\"\nusername = \"plant\"\npassword_file = \"{0}/mqtt.password\"\n[http]",
            d.display()
        ),
    ) + "[store]\ndir = \"\"\n[[camera]]\nname = \"cam\"\n[camera.source]\nkind = \"demo\"\nfps = 0\nframes = 3\n";
    let mut daemon = Daemon::start(d, &config);
    daemon.wait(Duration::from_secs(120));
    let _ = broker.kill();
    let _ = broker.wait();
    let log = daemon.log();
    assert_eq!(daemon.summary()["published"], 3, "{log}");
    assert!(!log.contains("unreachable"), "{log}");
    assert!(!log.contains(secret), "the password must never be logged");
}

/// The `[llm]` lines of a test daemon: the small real model when this build has it and it is fetched,
/// else template text only.
fn llm_config() -> (String, &'static str) {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/llm/smollm2-135m-instruct-q4_1.gguf");
    if cfg!(feature = "llm") && model.is_file() {
        (format!("[llm]\nbackend = \"local\"\nmodel = \"{}\"\nmax_tokens = 24\nthreads = 1\n", model.display()), "llm")
    } else {
        eprintln!("note: [llm] backend off in this run (build with --features llm and fetch smollm2 for the model)");
        ("[llm]\nbackend = \"off\"\n".into(), "template")
    }
}

#[test]
fn ng_frames_get_a_description_after_their_verdict_and_chat_works_over_http_and_mqtt() {
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (reference, frames) = scene(dir.path());
    let http_port = free_port();
    let token = "0123456789abcdef0123456789abcdef";
    let (llm, source) = llm_config();
    let sub = Sub::start(broker.port);
    let config = base_config(
        dir.path(),
        broker.port,
        &format!("127.0.0.1:{http_port}"),
        "t9",
        "exit_when_sources_end = false\n",
    )
    .replace("[outbox]", &format!("token = \"{token}\"\n[outbox]"))
        + &llm
        + &format!(
            "[store]\ndir = \"{}\"\n[[camera]]\nname = \"line\"\nreference = \"{}\"\nproduct = \"a steel plate\"\n\
             [camera.source]\nkind = \"files\"\npath = \"{}\"\n",
            dir.path().join("store").display(),
            reference.display(),
            frames.display()
        );
    let mut daemon = Daemon::start(dir.path(), &config);
    let descriptions = |s: &Sub| -> Vec<(usize, Value)> {
        let lines = s.lines.lock().unwrap();
        lines
            .iter()
            .enumerate()
            .filter(|(_, (t, _))| t == "anomalyd/t9/line/description")
            .map(|(i, (_, p))| (i, serde_json::from_str(p).unwrap()))
            .collect()
    };
    sub.wait_for("7 verdicts", Duration::from_secs(180), |s| s.verdicts().len() >= 7);
    let ng: Vec<VerdictMessage> = sub.verdicts().into_iter().filter(|v| v.verdict == Outcome::Ng).collect();
    assert!(!ng.is_empty(), "the scene has defective parts");
    sub.wait_for("a description per NG frame", Duration::from_secs(180), |s| descriptions(s).len() >= ng.len());
    let lines = sub.lines.lock().unwrap().clone();
    for (at, d) in descriptions(&sub) {
        let id = d["frame_id"].as_str().unwrap();
        assert!(ng.iter().any(|v| v.frame_id == id), "descriptions are for NG frames only: {d}");
        let verdict_at = lines.iter().position(|(t, p)| t.ends_with("/verdict") && p.contains(id)).unwrap();
        assert!(verdict_at < at, "the verdict goes out first, the text follows");
        assert!(!d["text"].as_str().unwrap().is_empty());
        assert!(d["source"] == source || d["reason"].as_str().unwrap_or("").starts_with("contradiction"), "{d}");
    }

    // HTTP: asking needs the token; the conversation is kept per frame.
    let id = &ng[0].frame_id;
    let path = format!("/v1/frames/{id}/chat");
    let q = r#"{"question":"Where exactly?"}"#;
    assert_eq!(http(http_port, "POST", &path, None, q).0, 401);
    assert_eq!(http(http_port, "POST", &path, Some(token), "{\"q\":1}").0, 400);
    assert_eq!(http(http_port, "POST", "/v1/frames/line-0-999/chat", Some(token), q).0, 404);
    let (status, body) = http(http_port, "POST", &path, Some(token), q);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let a: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((a["frame_id"].as_str(), a["turn"].as_u64()), (Some(id.as_str()), Some(2)));
    let (status, body) = http_get(http_port, &path);
    assert_eq!(status, 200);
    let t: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(t["turns"].as_array().unwrap().len(), 2, "{t}");

    // MQTT: a request on chat/request is answered on chat/response with its request id.
    broker.publish(
        "anomalyd/t9/chat/request",
        &format!(r#"{{"frame_id":"{id}","question":"Is this the same place as the last NG on this camera?","request_id":"r-42"}}"#),
    );
    sub.wait_for("the chat response", Duration::from_secs(120), |s| {
        s.lines.lock().unwrap().iter().any(|(t, p)| t == "anomalyd/t9/chat/response" && p.contains("r-42"))
    });
    let resp: Value = sub
        .lines
        .lock()
        .unwrap()
        .iter()
        .find(|(t, _)| t == "anomalyd/t9/chat/response")
        .map(|(_, p)| serde_json::from_str(p).unwrap())
        .unwrap();
    assert_eq!((resp["turn"].as_u64(), resp["frame_id"].as_str()), (Some(3), Some(id.as_str())), "{resp}");

    // The terminal client sees the same conversation.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let out = Command::new(bin())
        .args(["chat", id, "--url", &format!("http://127.0.0.1:{http_port}"), "-q", "How large is it?", "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(&format!("frame {id} on camera line: NG")) && text.contains("operator: Where exactly?"),
        "{text}"
    );
    assert_eq!(text.matches("anomalyd: ").count(), 4, "three turns so far and the new answer: {text}");

    let m = String::from_utf8_lossy(&http_get(http_port, "/metrics").1).to_string();
    assert!(m.contains("anomalyd_llm_info{model="), "{m}");
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(60));
}

#[test]
fn line_mode_learns_from_the_first_parts_keeps_the_version_watches_drift_and_rolls_back() {
    use std::os::unix::fs::PermissionsExt;
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef0123456789abcdef";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let http_port = free_port();
    // A demo line (a cycle of 24 parts, every third defective), learning from its first cycle.
    let config = base_config(dir.path(), broker.port, &format!("127.0.0.1:{http_port}"), "t9", "")
        .replace("[outbox]", &format!("token_file = \"{}\"\n[outbox]", token_file.display()))
        + "[store]\ndir = \"\"\n[[camera]]\nname = \"cam\"\nlearn_parts = 24\n[camera.source]\nkind = \"demo\"\nfps = 0\nframes = 0\n";
    let sub = Sub::start(broker.port);
    let mut daemon = Daemon::start(dir.path(), &config);
    let drift = |s: &Sub| s.lines.lock().unwrap().iter().any(|(t, _)| t == "anomalyd/t9/cam/drift");
    // The drift watch's baseline: 128 parts after learning, then a state with every part.
    sub.wait_for("the drift state", Duration::from_secs(240), drift);
    let verdicts = sub.verdicts();
    assert!(verdicts[..24].iter().all(|v| v.learning), "the first 24 parts are learning verdicts");
    let first = &verdicts[0].enrolment.as_ref().unwrap().id;
    let last = verdicts.last().unwrap();
    assert!(!last.learning);
    assert_ne!(&last.enrolment.as_ref().unwrap().id, first, "the learned enrolment is in use");
    assert!(last.enrolment.as_ref().unwrap().source.contains("learned version 1"), "{last:?}");
    let lines = sub.lines.lock().unwrap().clone();
    let (_, payload) = lines.iter().find(|(t, _)| t == "anomalyd/t9/cam/drift").unwrap();
    let d: Value = serde_json::from_str(payload).unwrap();
    // The demo replays a cycle of 24 identical images, which learning put in the bank: its scores are
    // not a line's, so only the message itself is checked here (tests/line.rs checks the watch).
    let d: anomalyd::daemon::line::DriftMessage = serde_json::from_value(d).unwrap();
    assert_eq!((d.camera.as_str(), d.window), ("cam", anomalyd::detect::drift::WINDOW));
    assert!(d.shift.is_finite() && d.baseline_median > 0.0, "{d:?}");
    let (_, metrics) = http_get(http_port, "/metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.contains("anomalyd_learn_runs_total{camera=\"cam\",reason=\"applied\"} 1"), "{metrics}");
    assert!(metrics.contains("anomalyd_drift_shift{camera=\"cam\",product=\"\"}"), "{metrics}");

    // The version is kept and listed; rolling back needs the token, then the base enrolment is used again.
    let (code, body) = http_get(http_port, "/v1/cameras/cam/enrolments");
    assert_eq!(code, 200);
    let listed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((listed["versions"].clone(), listed["active"].clone()), (serde_json::json!([1]), serde_json::json!(1)));
    assert_eq!(http(http_port, "POST", "/v1/cameras/cam/rollback", None, "").0, 401);
    assert_eq!(http(http_port, "POST", "/v1/cameras/..%2Fx/rollback", Some(token), "").0, 400);
    assert_eq!(http(http_port, "POST", "/v1/cameras/cam/rollback", Some(token), "{\"version\":7}").0, 409);
    assert_eq!(http(http_port, "POST", "/v1/cameras/cam/rollback", Some(token), "").0, 200);
    let seen = sub.verdicts().len();
    // The demo part is enrolled again at the reload (a new id); it is the base, not learned, and does not learn.
    sub.wait_for("a verdict with the base enrolment", Duration::from_secs(120), |s| {
        s.verdicts()[seen..].iter().any(|v| v.enrolment.as_ref().unwrap().source == "built-in demo part" && !v.learning)
    });
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(60));
    let history = std::fs::read_to_string(dir.path().join("enrolments/cam/history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 2, "{history}");
    assert!(history.contains("\"learned\"") && history.contains("\"rollback\""), "{history}");
}
