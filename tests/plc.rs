//! Plant integration: recipes switched by the PLC (docs/PLC.md). Each test runs a real mosquitto and
//! `anomalyd run` on 127.0.0.1 and is bounded in time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anomalyd::source::demo::{self, Defect};
use anomalyd::types::verdict::Outcome;
use serde_json::Value;

use crate::harness::*;

/// A folder holding one good part, its pixels scaled by `gain`: a product of its own to enrol.
fn reference(dir: &Path, name: &str, gain: f32) -> std::path::PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut img = demo::part(0, Defect::None);
    img.pixels_mut().for_each(|p| p.0 = p.0.map(|c| (c as f32 * gain).round().clamp(0.0, 255.0) as u8));
    img.save(d.join("good.png")).unwrap();
    d
}

/// A folder of `good` good demo parts followed by a scratched one, for a `files` source to repeat:
/// every `good + 1`-th frame is NG.
fn part_frames(dir: &Path, good: u64) -> std::path::PathBuf {
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    for v in 1..=good {
        demo::part(v, Defect::None).save(frames.join(format!("{v:02}.png"))).unwrap();
    }
    demo::part(good + 1, Defect::Scratch).save(frames.join(format!("{:02}.png", good + 1))).unwrap();
    frames
}

#[test]
fn recipes_switch_mid_stream_and_each_part_is_judged_with_the_recipe_of_its_trigger() {
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (plate, dark) = (reference(dir.path(), "plate", 1.0), reference(dir.path(), "dark", 0.6));
    // Every seventh part is scratched: NG frames to store under either recipe.
    let frames = part_frames(dir.path(), 6);
    let http_port = free_port();
    let token = "0123456789abcdef0123456789abcdef";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = base_config(
        dir.path(),
        broker.port,
        &format!("127.0.0.1:{http_port}"),
        "p1",
        "exit_when_sources_end = false\n",
    )
    .replace("[outbox]", &format!("token_file = \"{}\"\n[outbox]", token_file.display()))
        + &format!(
            "[store]\ndir = \"{}\"\n[[camera]]\nname = \"line\"\ntrigger = \"triggered\"\ntrigger_timeout_ms = 20000\n\
             learn_parts = 0\nstart_recipe = \"plate\"\n[camera.source]\nkind = \"files\"\npath = \"{}\"\nrepeat = true\n\
             [[camera.recipe]]\nname = \"plate\"\nreference = \"{}\"\n\
             [[camera.recipe]]\nname = \"plate-dark\"\nreference = \"{}\"\nproduct = \"a dark steel plate\"\n",
            dir.path().join("flagged").display(),
            frames.display(),
            plate.display(),
            dark.display()
        );
    let sub = Sub::start(broker.port);
    let daemon = Daemon::start(dir.path(), &config);
    wait_http(http_port);
    until("the camera to be ready", Duration::from_secs(120), &daemon, || http_get(http_port, "/readyz").0 == 200);

    // In order, as a PLC sends them: five parts, a switch, five parts, a mixed-model part of the first
    // product, a part of a product the camera does not know, and a switch to it.
    let cmd = "anomalyd/p1/cmd";
    let trigger = |part: &str, product: Option<&str>| {
        let mut c = serde_json::json!({"cmd":"trigger","camera":"line","part_id":part});
        if let Some(p) = product {
            c["product"] = p.into();
        }
        broker.publish(cmd, &c.to_string());
    };
    for i in 1..=5 {
        trigger(&format!("P-{i}"), None);
    }
    broker.publish(cmd, r#"{"cmd":"recipe","camera":"line","product":"plate-dark","request_id":"switch-1"}"#);
    for i in 6..=10 {
        trigger(&format!("P-{i}"), None);
    }
    trigger("P-11", Some("plate"));
    trigger("P-12", Some("bolt"));
    broker.publish(cmd, r#"{"cmd":"recipe","camera":"line","product":"bolt","request_id":"switch-2"}"#);

    sub.wait_for_daemon("12 verdicts and 2 answers", Duration::from_secs(120), Some(&daemon), |s| {
        let answers = s.lines.lock().unwrap().iter().filter(|(t, _)| t.ends_with("/cmd/response")).count();
        s.verdicts().len() >= 12 && answers >= 2
    });
    let verdicts = sub.verdicts();
    let by_part: BTreeMap<String, _> =
        verdicts.iter().map(|v| (v.part_id.clone().unwrap_or_default(), v.clone())).collect();
    assert_eq!(verdicts.len(), 12, "one verdict per part: {verdicts:?}");
    assert_eq!(by_part.len(), 12, "every part once");
    let mut seqs: Vec<u64> = verdicts.iter().map(|v| v.seq).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>(), "no frame lost or numbered twice");

    let judged = |parts: std::ops::RangeInclusive<u32>, product: &str| -> (f32, String) {
        let vs: Vec<_> = parts.map(|i| &by_part[&format!("P-{i}")]).collect();
        for v in &vs {
            assert!(matches!(v.verdict, Outcome::Ok | Outcome::Ng), "{v:?}");
            assert_eq!(v.product.as_deref(), Some(product), "{v:?}");
        }
        let (t, e) = (vs[0].threshold.unwrap(), vs[0].enrolment.clone().unwrap().id);
        assert!(vs.iter().all(|v| v.threshold == Some(t) && v.enrolment.as_ref().unwrap().id == e), "{vs:?}");
        (t, e)
    };
    let (t_plate, e_plate) = judged(1..=5, "plate");
    let (t_dark, e_dark) = judged(6..=10, "plate-dark");
    assert_ne!(e_plate, e_dark, "two recipes, two enrolments");
    assert_ne!(t_plate, t_dark, "each recipe has its own threshold");
    assert_eq!(judged(11..=11, "plate"), (t_plate, e_plate), "a trigger's product overrides the recipe in use");

    let unknown = &by_part["P-12"];
    assert_eq!((unknown.verdict, unknown.product.as_deref()), (Outcome::Error, Some("bolt")));
    let reason = unknown.reason.as_deref().unwrap();
    assert!(reason.contains("unknown product \"bolt\"") && reason.contains("plate, plate-dark"), "{reason}");

    let answers: Vec<Value> = sub
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.ends_with("/cmd/response"))
        .map(|(_, p)| serde_json::from_str(p).unwrap())
        .collect();
    let answer = |id: &str| answers.iter().find(|a| a["request_id"] == id).unwrap_or_else(|| panic!("{answers:?}"));
    assert_eq!(
        (answer("switch-1")["accepted"].clone(), answer("switch-1")["cmd"].clone()),
        (true.into(), "recipe".into())
    );
    assert_eq!(
        (answer("switch-2")["accepted"].clone(), answer("switch-2")["reason"].clone()),
        (false.into(), "unknown".into())
    );

    let (_, m) = http_get(http_port, "/metrics");
    let m = String::from_utf8_lossy(&m);
    assert_eq!(metric(&m, r#"anomalyd_recipe_active{camera="line",product="plate-dark"}"#), 1.0, "{m}");
    assert_eq!(metric(&m, r#"anomalyd_recipe_active{camera="line",product="plate"}"#), 0.0);
    assert!(metric(&m, r#"anomalyd_recipe_bytes{camera="line",product="plate"}"#) > 0.0);
    assert_eq!(metric(&m, r#"anomalyd_recipe_switches_total{camera="line"}"#), 1.0);
    // Each command once: 12 triggers and the switch accepted, the switch to "bolt" refused (not both).
    assert_eq!(metric(&m, r#"anomalyd_commands_total{result="accepted"}"#), 13.0, "{m}");
    assert_eq!(metric(&m, r#"anomalyd_commands_total{result="unknown"}"#), 1.0);
    let judged_dark: f64 = ["OK", "NG"]
        .iter()
        .map(|v| {
            metric(
                &m,
                &format!(r#"anomalyd_product_verdicts_total{{camera="line",product="plate-dark",verdict="{v}"}}"#),
            )
        })
        .sum();
    assert_eq!(judged_dark, 5.0);
    assert!(daemon.log().contains("recipe plate loaded"), "{}", daemon.log());

    // Over HTTP: the list, and a switch back that takes effect before the next trigger.
    let (code, body) = http_get(http_port, "/v1/cameras/line/recipes");
    let listed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((code, listed["active"].clone()), (200, "plate-dark".into()), "{listed}");
    assert_eq!(listed["recipes"].as_array().unwrap().len(), 2);
    assert!(listed["recipes"][0]["bytes"].as_u64().unwrap() > 0, "{listed}");
    assert_eq!(listed["recipes"][1]["enrolment"]["id"], e_dark.as_str());
    let switch = |t: Option<&str>, body: &str| http(http_port, "POST", "/v1/cameras/line/recipe", t, body);
    assert_eq!(switch(None, r#"{"product":"plate"}"#).0, 401);
    assert_eq!(switch(Some(token), r#"{"product":"a/b"}"#).0, 400);
    let (code, why) = switch(Some(token), r#"{"product":"bolt"}"#);
    assert_eq!(code, 404);
    assert!(String::from_utf8_lossy(&why).contains("its recipes: plate, plate-dark"));
    assert_eq!(http(http_port, "POST", "/v1/cameras/nope/recipe", Some(token), r#"{"product":"plate"}"#).0, 404);
    let (code, body) = switch(Some(token), r#"{"product":"plate"}"#);
    let switched: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((code, switched["before"].clone()), (200, "plate-dark".into()));
    trigger("P-13", None);
    sub.wait_for_daemon("P-13's verdict", Duration::from_secs(60), Some(&daemon), |s| {
        s.verdicts().iter().any(|v| v.part_id.as_deref() == Some("P-13"))
    });
    let v = sub.verdicts().into_iter().find(|v| v.part_id.as_deref() == Some("P-13")).unwrap();
    assert_eq!((v.product.as_deref(), v.threshold), (Some("plate"), Some(t_plate)));

    // The stored NG frames, filtered by product: each recipe's NG parts, newest first.
    let ng = |p: &str| -> Vec<String> {
        let mut ids: Vec<(u64, String)> = sub
            .verdicts()
            .into_iter()
            .filter(|v| v.verdict == Outcome::Ng && v.product.as_deref() == Some(p))
            .map(|v| (v.seq, v.frame_id))
            .collect();
        ids.sort();
        ids.into_iter().rev().map(|(_, id)| id).collect()
    };
    let listed = |q: &str| -> Vec<String> {
        let (code, body) = http_get(http_port, &format!("/v1/frames?{q}"));
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        v["frames"].as_array().unwrap().iter().map(|f| f["frame_id"].as_str().unwrap().to_string()).collect()
    };
    until("the NG frames to be stored", Duration::from_secs(30), &daemon, || {
        listed("camera=line").len() == ng("plate").len() + ng("plate-dark").len()
    });
    assert!(!ng("plate-dark").is_empty(), "the scratched part came under the second recipe");
    assert_eq!(listed("product=plate-dark"), ng("plate-dark"));
    assert_eq!(listed("product=plate&verdict=NG"), ng("plate"));
    assert_eq!(listed("product=plate-dark&limit=1"), ng("plate-dark")[..1]);
    for bad in ["product=a/b", "verdict=MAYBE", "limit=0", "colour=red"] {
        assert_eq!(http_get(http_port, &format!("/v1/frames?{bad}")).0, 400, "{bad}");
    }
}

/// `.venv/bin/python` with pymodbus, or None (and the test skips, unless the test script installed it).
fn python_with(module: &str) -> Option<std::path::PathBuf> {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let found =
        std::process::Command::new(&py).args(["-c", &format!("import {module}")]).status().is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("ANOMALYD_REQUIRE_PLC_CLIENTS").is_none(),
            "{module} is missing from .venv (scripts/setup.sh --test installs it)"
        );
        eprintln!("skipping: {module} is not installed in .venv (scripts/setup.sh --test installs it)");
        return None;
    }
    Some(py)
}

#[test]
fn a_pymodbus_plc_runs_the_handshake_for_200_parts_and_is_refused_what_it_must_be() {
    let Some(py) = python_with("pymodbus") else { return };
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plate = reference(dir.path(), "plate", 1.0);
    let frames = part_frames(dir.path(), 5);
    let modbus_port = free_port();
    let config = base_config(dir.path(), broker.port, "", "p2", "exit_when_sources_end = false\n")
        + &format!(
            "[store]\ndir = \"\"\n[modbus]\nlisten = \"127.0.0.1:{modbus_port}\"\n\
             [[camera]]\nname = \"station\"\ntrigger = \"triggered\"\nlearn_parts = 0\n\
             [camera.source]\nkind = \"files\"\npath = \"{}\"\nrepeat = true\n\
             [[camera.recipe]]\nname = \"plate\"\nreference = \"{}\"\n",
            frames.display(),
            plate.display()
        );
    let sub = Sub::start(broker.port);
    let daemon = Daemon::start(dir.path(), &config);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plc/modbus_plc.py");
    let out = std::process::Command::new(py)
        .arg(script)
        .args(["--port", &modbus_port.to_string(), "--parts", "200"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let parts = r["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 200);
    // Every result read exactly once, in order: the result counter steps by one, each part's id is echoed.
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p["seq"], i + 1, "{p}");
        assert_eq!(p["part_id"], format!("MB-{i:04}"), "{p}");
        let v = p["verdict"].as_str().unwrap();
        assert!(v == "OK" || v == "NG", "{p}");
        assert_eq!(p["bits"]["ng"], v == "NG", "{p}");
    }
    assert!(parts.iter().any(|p| p["verdict"] == "NG"), "the scratched part comes every sixth frame");
    let c = &r["checks"];
    assert_eq!(c["busy"]["first"], true);
    assert_eq!((c["busy"]["second"].clone(), c["busy"]["refusal"].clone()), (false.into(), 1.into()), "{c}");
    assert_eq!(c["busy"]["kept_part"], "BUSY-1", "a refused trigger does not touch the latched result");
    assert_eq!(c["unknown_product"]["verdict"], "ERROR");
    assert_eq!(
        (c["unknown_product"]["product"].clone(), c["unknown_product"]["error_bit"].clone()),
        ("bolt".into(), true.into())
    );
    assert_eq!(c["select_unknown"], serde_json::json!([true, 6]));
    assert_eq!(c["select_malformed"], serde_json::json!([true, 3]));
    let e = &c["exceptions"];
    for (k, code) in [
        ("write_read_only", 2),
        ("write_outside", 2),
        ("read_outside", 2),
        ("bad_control", 3),
        ("unknown_unit", 11),
        ("unserved_function", 1),
    ] {
        assert_eq!(e[k], code, "{k}: {e}");
    }
    assert_eq!(c["still_ready"], true);
    assert_eq!(c["mirror_seq"], c["last_seq"]);

    // Over MQTT, each Modbus part has exactly one verdict, and the PLC read the same outcome.
    sub.wait_for_daemon("the verdicts of 202 Modbus parts", Duration::from_secs(60), Some(&daemon), |s| {
        s.verdicts().iter().filter(|v| v.part_id.as_deref().is_some_and(|p| p.starts_with("MB-"))).count() >= 200
    });
    let verdicts = sub.verdicts();
    for p in parts {
        let id = p["part_id"].as_str().unwrap();
        let of: Vec<_> = verdicts.iter().filter(|v| v.part_id.as_deref() == Some(id)).collect();
        assert_eq!(of.len(), 1, "{id}: {of:?}");
        assert_eq!(of[0].verdict.as_str(), p["verdict"].as_str().unwrap(), "{id}");
        assert_eq!(of[0].product.as_deref(), Some("plate"));
    }
    eprintln!(
        "Modbus handshake: {:.1} parts/s; trigger to ResultReady as the PLC saw it (2 ms scan) {}; as anomalyd measured it {}",
        r["rate_parts_per_s"].as_f64().unwrap(),
        r["trigger_to_result_ms"],
        r["server_trigger_to_result_ms"]
    );
}

#[test]
fn an_asyncua_client_logs_in_triggers_parts_and_gets_each_result_as_an_event() {
    let Some(py) = python_with("asyncua") else { return };
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plate = reference(dir.path(), "plate", 1.0);
    let dark = reference(dir.path(), "plate-dark", 0.7);
    let frames = part_frames(dir.path(), 3);
    // The client's certificate: its first session is refused and filed under the server's
    // `rejected/`; the client then trusts it as an integrator would, by moving it to `trusted/`.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plc/opcua_client.py");
    let certs = dir.path().join("client");
    let made = std::process::Command::new(&py).arg(&script).arg("make-cert").arg(&certs).status().unwrap();
    assert!(made.success());
    let pki = dir.path().join("pki");
    // A second certificate, configured as a user's: its holder logs in with it instead of a password.
    let user_cert = dir.path().join("scada");
    assert!(std::process::Command::new(&py).arg(&script).arg("make-cert").arg(&user_cert).status().unwrap().success());
    let password = dir.path().join("plc.password");
    std::fs::write(&password, "a-long-plc-password-7731\n").unwrap();
    let port = free_port();
    let config = base_config(dir.path(), broker.port, "", "ua", "exit_when_sources_end = false\n")
        + &format!(
            "[store]\ndir = \"\"\n[opcua]\nlisten = \"127.0.0.1:{port}\"\npki_dir = \"{}\"\n\
             [[opcua.user]]\nname = \"plc\"\npassword_file = \"{}\"\n\
             [[opcua.user]]\nname = \"scada\"\ncertificate = \"{}\"\n\
             [[camera]]\nname = \"station\"\ntrigger = \"triggered\"\nlearn_parts = 0\nstart_recipe = \"plate-dark\"\n\
             [camera.source]\nkind = \"files\"\npath = \"{}\"\nrepeat = true\n\
             [[camera.recipe]]\nname = \"plate\"\nreference = \"{}\"\n\
             [[camera.recipe]]\nname = \"plate-dark\"\nreference = \"{}\"\n",
            pki.display(),
            password.display(),
            user_cert.join("client_cert.der").display(),
            frames.display(),
            plate.display(),
            dark.display()
        );
    let sub = Sub::start(broker.port);
    let daemon = Daemon::start(dir.path(), &config);
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg("run")
        .args(["--url", &format!("opc.tcp://127.0.0.1:{port}/"), "--user", "plc", "--parts", "40"])
        .arg("--password-file")
        .arg(&password)
        .arg("--cert")
        .arg(certs.join("client_cert.der"))
        .arg("--key")
        .arg(certs.join("client_key.pem"))
        .arg("--pki")
        .arg(&pki)
        .arg("--user-cert")
        .arg(user_cert.join("client_cert.der"))
        .arg("--user-key")
        .arg(user_cert.join("client_key.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["cameras"], serde_json::json!(["station"]));
    assert_eq!(r["trusted_after_rejection"].as_array().map(Vec::len), Some(1), "an unknown client is refused first");
    for n in ["State", "ActiveRecipe", "Recipes", "Result", "Trigger", "SelectRecipe"] {
        assert!(r["camera_children"].as_array().unwrap().iter().any(|c| c == n), "{n}: {}", r["camera_children"]);
    }
    assert_eq!(r["recipes"], serde_json::json!(["plate", "plate-dark"]));
    assert_eq!(r["event_type_under_base"], true, "ResultReadyEventType is browsable under BaseEventType");
    let c = &r["checks"];
    assert_eq!(c["x509_user"], "", "a configured user certificate logs in: {c}");
    for refused in ["anonymous_refused", "wrong_password_refused", "unknown_user_refused", "x509_unknown_refused"] {
        assert!(c[refused].as_str().is_some_and(|e| !e.is_empty()), "{refused}: {c}");
    }
    assert_eq!(c["select_plate"], "Good:\"plate\"", "{c}");
    assert_eq!(c["active_after_select"], "plate");
    for (k, status) in [
        ("select_unknown", "BadInvalidArgument"),
        ("select_malformed", "BadInvalidArgument"),
        ("select_no_argument", "BadArgumentsMissing"),
        ("select_wrong_type", "BadTypeMismatch"),
        ("trigger_too_many", "BadTooManyArguments"),
        ("trigger_bad_part", "BadInvalidArgument"),
        ("trigger_made_id", "Good:\"UA-1\""),
    ] {
        assert_eq!(c[k], status, "{k}: {c}");
    }
    // Each part: one event, the variables read back after it agree with it, the results count up.
    let parts = r["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 40);
    for (i, p) in parts.iter().enumerate() {
        let id = format!("UA-{i:04}");
        assert_eq!(p["answer"], id.as_str(), "{p}");
        assert_eq!(p["event"]["PartId"], id.as_str(), "{p}");
        assert_eq!(p["event"], p["read"], "the Result variables hold the event's result: {p}");
        assert_eq!(p["event"]["ProductId"], "plate", "{p}");
        assert_eq!(p["source_name"], "station");
        let v = p["event"]["Verdict"].as_str().unwrap();
        assert!(v == "OK" || v == "NG", "{p}");
        assert_eq!(p["event_score"], p["read_score"]);
    }
    let seqs: Vec<u64> = parts.iter().map(|p| p["event"]["ResultSeq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(parts.iter().any(|p| p["event"]["Verdict"] == "NG"), "the scratched part comes every fourth frame");
    assert_eq!(c["unknown_product"]["verdict"], "ERROR", "{c}");
    assert_eq!(c["unknown_product"]["product"], "bolt", "{c}");

    // Over MQTT, the same parts with the same outcomes.
    sub.wait_for_daemon("the verdicts of 41 OPC UA parts", Duration::from_secs(60), Some(&daemon), |s| {
        s.verdicts().iter().filter(|v| v.part_id.as_deref().is_some_and(|p| p.starts_with("UA-"))).count() >= 41
    });
    let verdicts = sub.verdicts();
    for p in parts {
        let id = p["event"]["PartId"].as_str().unwrap();
        let of: Vec<_> = verdicts.iter().filter(|v| v.part_id.as_deref() == Some(id)).collect();
        assert_eq!(of.len(), 1, "{id}: {of:?}");
        assert_eq!(of[0].verdict.as_str(), p["event"]["Verdict"].as_str().unwrap(), "{id}");
        assert_eq!(of[0].frame_id.as_str(), p["event"]["ResultId"].as_str().unwrap(), "{id}");
    }
    let log = daemon.log();
    assert!(!log.contains("a-long-plc-password"), "the password never reaches the log");
    eprintln!("OPC UA: trigger to ResultReady event as asyncua saw it {}", r["trigger_to_event_ms"]);
}

#[test]
fn an_every_frame_camera_switched_mid_stream_changes_product_once_and_loses_no_frame() {
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (plate, dark) = (reference(dir.path(), "plate", 1.0), reference(dir.path(), "dark", 0.6));
    // The demo camera as fast as it is inspected (nothing skipped), 120 parts, then the daemon exits.
    let config = base_config(dir.path(), broker.port, "", "p3", "")
        + &format!(
            "[store]\ndir = \"\"\n[[camera]]\nname = \"line\"\nlearn_parts = 0\n\
             [camera.source]\nkind = \"demo\"\nfps = 0\nframes = 120\n\
             [[camera.recipe]]\nname = \"plate\"\nreference = \"{}\"\n\
             [[camera.recipe]]\nname = \"plate-dark\"\nreference = \"{}\"\n",
            plate.display(),
            dark.display()
        );
    let sub = Sub::start(broker.port);
    let mut daemon = Daemon::start(dir.path(), &config);
    sub.wait_for_daemon("the first verdicts", Duration::from_secs(120), Some(&daemon), |s| s.verdicts().len() >= 5);
    broker.publish("anomalyd/p3/cmd", r#"{"cmd":"recipe","camera":"line","product":"plate-dark"}"#);
    daemon.wait(Duration::from_secs(120));
    let mut verdicts = sub.verdicts();
    verdicts.sort_by_key(|v| v.seq);
    assert_eq!(verdicts.iter().map(|v| v.seq).collect::<Vec<_>>(), (1..=120).collect::<Vec<_>>(), "every frame, once");
    let products: Vec<&str> = verdicts.iter().map(|v| v.product.as_deref().unwrap()).collect();
    let switched = products.iter().position(|p| *p == "plate-dark").expect("the switch took effect");
    assert!(switched >= 5, "frames before the switch keep their recipe: {products:?}");
    assert!(products[..switched].iter().all(|p| *p == "plate"), "{products:?}");
    assert!(products[switched..].iter().all(|p| *p == "plate-dark"), "one switch, no frame back: {products:?}");
    let thresholds = |p: &str| -> Vec<f32> {
        let mut t: Vec<f32> =
            verdicts.iter().filter(|v| v.product.as_deref() == Some(p)).map(|v| v.threshold.unwrap()).collect();
        t.dedup();
        t
    };
    let (a, b) = (thresholds("plate"), thresholds("plate-dark"));
    assert_eq!((a.len(), b.len()), (1, 1), "one threshold per recipe: {a:?} {b:?}");
    assert_ne!(a, b);
}

/// Sparkplug B against a primary host written with paho-mqtt and pysparkplug (Eclipse Tahu's protobuf):
/// births wait for the host's STATE, DCMD triggers give one live DDATA each with seq in order, a rebirth
/// keeps bdSeq, the host going offline kills the node and its results come back historical, and a killed
/// daemon's will and its restart carry the bdSeq kept on disk.
#[test]
fn a_sparkplug_host_sees_births_deaths_and_each_triggered_part_once_in_seq_order() {
    let Some(py) = python_with("pysparkplug") else { return };
    let Some(mut broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plate = reference(dir.path(), "plate", 1.0);
    let frames = part_frames(dir.path(), 3);
    let token = dir.path().join("token");
    std::fs::write(&token, "sparkplug-test-token-0123456789\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let http = free_port();
    let config =
        base_config(dir.path(), broker.port, &format!("127.0.0.1:{http}"), "edge", "exit_when_sources_end = false\n")
            .replace("[mqtt]\n", &format!("[mqtt]\ncommand_token_file = \"{}\"\n", token.display()))
            + &format!(
                "[mqtt.sparkplug]\nenabled = true\ngroup_id = \"line1\"\nprimary_host_id = \"scada\"\n\
             [store]\ndir = \"\"\n[[camera]]\nname = \"station\"\ntrigger = \"triggered\"\nlearn_parts = 0\n\
             [camera.source]\nkind = \"files\"\npath = \"{}\"\nrepeat = true\n\
             [[camera.recipe]]\nname = \"plate\"\nreference = \"{}\"\n",
                frames.display(),
                plate.display()
            );
    let mut daemon = Daemon::start(dir.path(), &config);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plc/sparkplug_host.py");
    let host_log = dir.path().join("host.log");
    let mut host = std::process::Command::new(py)
        .arg(script)
        .args(["--port", &broker.port.to_string(), "--http-port", &http.to_string()])
        .args(["--group", "line1", "--node", "edge", "--camera", "station", "--host", "scada", "--parts", "60"])
        .arg("--token-file")
        .arg(&token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&host_log).unwrap())
        .spawn()
        .unwrap();
    let mut result = None;
    use std::io::BufRead;
    for line in std::io::BufReader::new(host.stdout.take().unwrap()).lines().map_while(Result::ok) {
        if line == "KILL" {
            daemon.child.kill().unwrap();
            daemon.child.wait().unwrap();
            daemon = Daemon::start(dir.path(), &config);
        } else if line == "RESTART_BROKER" {
            broker.stop();
            broker.restart();
        } else {
            result = serde_json::from_str::<Value>(&line).ok();
        }
    }
    let status = host.wait().unwrap();
    let why = || format!("host:\n{}\ndaemon log:\n{}", std::fs::read_to_string(&host_log).unwrap(), daemon.log());
    assert!(status.success(), "{}", why());
    let r = result.unwrap_or_else(|| panic!("no result line; {}", why()));
    assert_eq!(r["parts"], 60);
    assert_eq!(r["bd_seq_first"], 0, "a fresh state directory starts at bdSeq 0");
    assert_eq!(r["no_token"], "unauthorized");
    assert_eq!(r["wrong_type"], "bad_field");
    assert_eq!(r["unknown_metric"], "invalid");
    assert_eq!(r["malformed_ncmd"], "invalid");
    assert_eq!(r["rebirth_last_part"], "SP-0059", "the DBIRTH of a rebirth carries the last result");
    assert_eq!(r["offline_death_bd_seq"], 0, "the death is the connection's");
    assert_eq!(r["bd_seq_after_reconnect"], 1);
    assert_eq!(r["held"], serde_json::json!([["OFF-0", true], ["OFF-1", true], ["OFF-2", true]]));
    assert_eq!(r["will_bd_seq"], 1, "the broker published the will of the killed connection");
    assert_eq!(r["bd_seq_after_restart"], 2, "bdSeq is kept across restarts");
    assert_eq!(r["host_reconnected"], true);
    // Only the lost session's own death, if any: never one that names another bdSeq.
    assert!(r["deaths_after_broker_restart"].as_array().unwrap().iter().all(|d| d == 2), "{r}");
    // At least once: what the killed daemon had not seen acknowledged may come again, as historical data.
    assert!(
        r["replayed_after_kill"].as_array().unwrap().iter().all(|p| p.as_str().unwrap().starts_with("OFF-")),
        "{r}"
    );
    // Each connection attempt carries a will of its own, so attempts while the broker was down count too.
    let bd3 = r["bd_seq_after_broker_restart"].as_i64().unwrap();
    assert!(bd3 >= 3, "a new connection after the broker restarted, a new bdSeq: {bd3}");
    assert_eq!(r["after_broker_restart"], serde_json::json!([["BR-0", false], ["BR-1", false], ["BR-2", false]]));
    eprintln!(
        "Sparkplug B: DCMD trigger to DDATA {} ({} parts/s one at a time)",
        r["trigger_to_ddata_ms"], r["parts_per_s"]
    );
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(30));
}

/// Each recipe learns on its own line-mode versions, and `?product=` lists and rolls back that recipe's.
#[test]
fn a_recipes_learned_version_is_listed_and_rolled_back_over_http() {
    use std::os::unix::fs::PermissionsExt;
    let Some(broker) = Mosquitto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plate = reference(dir.path(), "plate", 1.0);
    let token = "0123456789abcdef0123456789abcdef";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let http_port = free_port();
    let config = base_config(dir.path(), broker.port, &format!("127.0.0.1:{http_port}"), "p5", "")
        .replace("[outbox]", &format!("token_file = \"{}\"\n[outbox]", token_file.display()))
        + &format!(
            "[store]\ndir = \"\"\n[[camera]]\nname = \"cam\"\nlearn_parts = 8\n\
             [camera.source]\nkind = \"demo\"\nfps = 0\nframes = 0\n\
             [[camera.recipe]]\nname = \"plate\"\nreference = \"{}\"\n",
            plate.display()
        );
    let sub = Sub::start(broker.port);
    let mut daemon = Daemon::start(dir.path(), &config);
    let learned = |s: &Sub| {
        s.verdicts().iter().any(|v| v.enrolment.as_ref().is_some_and(|e| e.source.contains("learned version 1")))
    };
    sub.wait_for_daemon("a verdict with the learned version", Duration::from_secs(180), Some(&daemon), learned);
    let (code, body) = http_get(http_port, "/v1/cameras/cam/enrolments?product=plate");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let listed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(listed["product"], "plate");
    assert_eq!((listed["versions"].clone(), listed["active"].clone()), (serde_json::json!([1]), serde_json::json!(1)));
    assert_eq!(http_get(http_port, "/v1/cameras/cam/enrolments").0, 404, "the camera itself has no single enrolment");
    assert_eq!(http_get(http_port, "/v1/cameras/cam/enrolments?product=bolt").0, 404);
    assert_eq!(http_get(http_port, "/v1/cameras/cam/enrolments?product=a%2Fb").0, 400);
    assert_eq!(http_get(http_port, "/v1/cameras/cam/enrolments?colour=red").0, 400);
    assert_eq!(http(http_port, "POST", "/v1/cameras/cam/rollback?product=plate", None, "").0, 401);
    let (code, body) = http(http_port, "POST", "/v1/cameras/cam/rollback?product=plate", Some(token), "");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let seen = sub.verdicts().len();
    sub.wait_for_daemon("a verdict with the base enrolment", Duration::from_secs(120), Some(&daemon), |s| {
        s.verdicts()[seen..].iter().any(|v| {
            v.enrolment.as_ref().is_some_and(|e| !e.source.contains("learned"))
                && !v.learning
                && v.product.as_deref() == Some("plate")
        })
    });
    daemon.signal("TERM");
    daemon.wait(Duration::from_secs(60));
    let history = std::fs::read_to_string(dir.path().join("enrolments/cam.plate/history.jsonl")).unwrap();
    assert!(history.contains("\"learned\"") && history.contains("\"rollback\""), "{history}");
}
