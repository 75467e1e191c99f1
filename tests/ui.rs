//! The operator station in a real browser: Debian's headless Chromium, driven over WebDriver
//! (chromedriver) by the fantoccini client, against a running daemon with a real broker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anomalyd::source::demo::{self, Defect};
use anomalyd::types::verdict::{Outcome, VerdictMessage};
use fantoccini::actions::{InputSource, MOUSE_BUTTON_LEFT, MouseActions, PointerAction};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::harness::*;

const PASSWORD: &str = "correct horse battery";

/// Chromium and chromedriver, or None (skip) when they are missing and not required.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
    let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            assert!(
                std::env::var_os("ANOMALYD_REQUIRE_BROWSER").is_none(),
                "chromium and chromium-driver are missing (scripts/setup.sh --test installs them)"
            );
            eprintln!("skipping: chromium or chromedriver is missing (scripts/setup.sh --test installs them)");
            None
        }
    }
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect(chromium: &Path, driver: &Path) -> (Driver, Client) {
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let guard = Driver(child);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,800", "--hide-scrollbars"],
        }),
    );
    let t0 = Instant::now();
    loop {
        let mut b = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        b.capabilities(caps.clone());
        match b.connect(&format!("http://127.0.0.1:{port}")).await {
            Ok(c) => return (guard, c),
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(30), "chromedriver did not take a session: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Where screenshots go: `ANOMALYD_UI_SHOTS` (docs/ui when refreshing the committed ones), else a
/// folder of the test's own.
fn shots(dir: &Path) -> PathBuf {
    let d = std::env::var_os("ANOMALYD_UI_SHOTS").map(PathBuf::from).unwrap_or_else(|| dir.join("shots"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn text(c: &Client, css: &str) -> String {
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css(css)).await.unwrap().text().await.unwrap()
}

/// Polls `done` (a JavaScript expression) in the page until it is true.
async fn until_js(c: &Client, what: &str, expr: &str, timeout: Duration) {
    let t0 = Instant::now();
    loop {
        let v = c.execute(&format!("return !!({expr});"), vec![]).await.unwrap();
        if v == Value::Bool(true) {
            return;
        }
        assert!(t0.elapsed() < timeout, "timed out waiting for {what} ({expr})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A POST from the page (with its session cookie), returning the status.
async fn post_from_page(c: &Client, path: &str, body: &str) -> u64 {
    let v = c
        .execute(
            "return fetch(arguments[0], {method: 'POST', body: new URLSearchParams(arguments[1])}).then(r => r.status);",
            vec![json!(path), json!(body)],
        )
        .await
        .unwrap();
    v.as_u64().unwrap()
}

/// A POST from the page with its session cookie and CSRF token, returning the status and the page's
/// message.
async fn post_form(c: &Client, path: &str, fields: Value) -> (u64, String) {
    let v = c
        .execute(
            "const body = new URLSearchParams(arguments[1]); \
             body.set('csrf', document.querySelector('meta[name=csrf]').content); \
             return fetch(arguments[0], {method: 'POST', body}).then(async r => [r.status, await r.text()]);",
            vec![json!(path), fields],
        )
        .await
        .unwrap();
    (v[0].as_u64().unwrap(), v[1].as_str().unwrap().to_string())
}

/// A tap at fractions of the width and height of the element `css` (in view), as a finger (or a
/// mouse) would: moved to that point of the viewport, pressed and released.
async fn tap(c: &Client, css: &str, fx: f64, fy: f64) {
    let r = c
        .execute(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect(); \
             return [r.left, r.top, r.width, r.height];",
            vec![json!(css)],
        )
        .await
        .unwrap();
    let r: Vec<f64> = r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let (x, y) = ((r[0] + fx * r[2]).round(), (r[1] + fy * r[3]).round());
    let finger = MouseActions::new("finger".into())
        .then(PointerAction::MoveTo { duration: None, x, y })
        .then(PointerAction::Down { button: MOUSE_BUTTON_LEFT })
        .then(PointerAction::Up { button: MOUSE_BUTTON_LEFT });
    c.perform_actions(finger).await.unwrap();
}

/// The scene: a good part as the reference, and a line that shows a good part and a marked one in turn.
fn line_scene(dir: &Path) -> (PathBuf, PathBuf) {
    let reference = dir.join("ref");
    let frames = dir.join("frames");
    std::fs::create_dir_all(&reference).unwrap();
    std::fs::create_dir_all(&frames).unwrap();
    demo::part(0, Defect::None).save(reference.join("good_0.png")).unwrap();
    demo::part(1, Defect::None).save(frames.join("00_good.png")).unwrap();
    let mut marked = demo::part(2, Defect::None);
    for dy in 0..22 {
        for dx in 0..22 {
            marked.put_pixel(200 + dx, 150 + dy, image::Rgb([250, 240, 90]));
        }
    }
    marked.save(frames.join("01_marked.png")).unwrap();
    (reference, frames)
}

/// The `[ui]` section with the audit log in `dir` and the operator `anna`.
fn operator(dir: &Path) -> String {
    let hash = anomalyd::control::ui::auth::hash_password(PASSWORD);
    format!(
        "[ui]\naudit = \"{}\"\n[[ui.operator]]\nname = \"anna\"\npassword_hash = \"{hash}\"\n",
        dir.join("audit.jsonl").display()
    )
}

/// A camera's source section: the line scene's `frames`, replayed at 4 frames/s.
fn replayed(frames: &Path) -> String {
    format!("[camera.source]\nkind = \"files\"\npath = \"{}\"\nfps = 4\nrepeat = true\n", frames.display())
}

/// Starts the daemon with `config` and waits for its HTTP server.
fn start_station(dir: &Path, config: &str, http_port: u16) -> Daemon {
    let daemon = Daemon::start(dir, config);
    until("the HTTP server", Duration::from_secs(120), &daemon, || {
        std::net::TcpStream::connect(("127.0.0.1", http_port)).is_ok()
    });
    daemon
}

/// Whether a verdict was judged with a camera's enrolment version `n` made by a lesson (`word`:
/// `taught`, `labelled`, `zones`).
fn judged_with(m: &VerdictMessage, word: &str, n: u32) -> bool {
    m.enrolment.as_ref().is_some_and(|e| e.source.ends_with(&format!("({word} version {n})")))
}

/// Applies the preview on the page, checks that version `n` is active, and returns the next 6
/// verdicts judged with it.
async fn apply_and_replay(c: &Client, sub: &Sub, daemon: &Daemon, n: u32, word: &str) -> Vec<VerdictMessage> {
    c.find(Locator::Css("#apply")).await.unwrap().click().await.unwrap();
    let applied = text(c, "#message").await;
    assert!(applied.starts_with(&format!("Version {n} is active on cam")), "{applied}");
    let seen = sub.verdicts().len();
    sub.wait_for_daemon(&format!("6 verdicts with version {n}"), Duration::from_secs(60), Some(daemon), |s| {
        s.verdicts()[seen..].iter().filter(|m| judged_with(m, word, n)).count() >= 6
    });
    sub.verdicts()[seen..].iter().filter(|m| judged_with(m, word, n)).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_watches_reviews_teaches_a_false_reject_rolls_back_labels_ignores_a_region_and_asks() {
    let Some((chromium, driver)) = browser() else { return };
    let Some(broker) = Mosquitto::start() else { return };
    let sub = Sub::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let (reference, frames) = line_scene(dir.path());
    let http_port = free_port();
    // The small real model when it is there (test.sh fetches it), so that answers stream token by token.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llm/smollm2-135m-instruct-q4_1.gguf");
    let llm = if cfg!(feature = "llm") && model.is_file() {
        format!("backend = \"local\"\nmodel = \"{}\"\nthreads = 1\nmax_tokens = 24\nqueue = 1", model.display())
    } else {
        "backend = \"off\"".to_string()
    };
    let config = base_config(dir.path(), broker.port, &format!("127.0.0.1:{http_port}"), "station", "")
        + &format!(
            "[store]\ndir = \"{}\"\n[llm]\n{llm}\n{}[[camera]]\nname = \"cam\"\nreference = \"{}\"\n\
             learn_parts = 0\n{}",
            dir.path().join("store").display(),
            operator(dir.path()),
            reference.display(),
            replayed(&frames)
        );
    let daemon = start_station(dir.path(), &config, http_port);
    let shots = shots(dir.path());
    let (_driver, c) = connect(&chromium, &driver).await;
    let base = format!("http://127.0.0.1:{http_port}");

    // 1. Log in: a wrong password is refused, the right one opens the line page.
    c.goto(&format!("{base}/ui/login")).await.unwrap();
    c.find(Locator::Css("#name")).await.unwrap().send_keys("anna").await.unwrap();
    c.find(Locator::Css("#password")).await.unwrap().send_keys("wrong password").await.unwrap();
    c.find(Locator::Css("#login")).await.unwrap().click().await.unwrap();
    assert_eq!(text(&c, "#error").await, "Wrong name or password.");
    shot(&c, &shots, "login").await;
    c.find(Locator::Css("#password")).await.unwrap().send_keys(PASSWORD).await.unwrap();
    c.find(Locator::Css("#login")).await.unwrap().click().await.unwrap();
    assert_eq!(text(&c, "#user").await, "anna");
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/"));
    // The station's metrics count the refused and the accepted login.
    let (_, m) = http_get(http_port, "/metrics");
    let m = String::from_utf8_lossy(&m);
    assert_eq!(metric(&m, "anomalyd_ui_actions_total{action=\"login\",result=\"refused\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "anomalyd_ui_actions_total{action=\"login\",result=\"ok\"}"), 1.0);
    let cookies = c.get_all_cookies().await.unwrap();
    let session = cookies.iter().find(|k| k.name() == "anomalyd_ui").expect("the session cookie");
    assert_eq!(session.http_only(), Some(true), "no script may read the session cookie");

    // 2. A live NG arrives on the line page without a reload.
    // The page is made again once the camera is running (its first event names a camera it lacks).
    c.wait().at_most(Duration::from_secs(120)).for_element(Locator::Css("#tile-cam")).await.unwrap();
    // The NG the page was rendered with (if any) does not count: a new one must arrive.
    c.execute("window.firstNg = document.getElementById('tile-cam').dataset.lastNg || '';", vec![]).await.unwrap();
    until_js(
        &c,
        "a live NG on the tile",
        "(document.getElementById('tile-cam').dataset.lastNg || '') !== window.firstNg",
        Duration::from_secs(120),
    )
    .await;
    let ng_id: String = c
        .execute("return document.getElementById('tile-cam').dataset.lastNg;", vec![])
        .await
        .unwrap()
        .as_str()
        .unwrap()
        .into();
    until_js(&c, "the NG picture", "document.querySelector('#tile-cam img').naturalWidth > 0", Duration::from_secs(20))
        .await;
    let update_ms =
        c.execute("return Number(document.getElementById('tile-cam').dataset.updateMs);", vec![]).await.unwrap();
    eprintln!("verdict to tile update: {update_ms} ms");
    shot(&c, &shots, "line").await;

    // 3. Open it.
    c.find(Locator::Css("#tile-cam a[data-f=link]")).await.unwrap().click().await.unwrap();
    assert_eq!(text(&c, "#verdict").await, "NG");
    assert!(c.current_url().await.unwrap().path().ends_with(&ng_id));
    assert!(!c.find_all(Locator::Css("#view rect.region")).await.unwrap().is_empty(), "region boxes");
    c.find(Locator::Css("#toggle-heat")).await.unwrap().click().await.unwrap();
    let src = c.find(Locator::Css("#picture")).await.unwrap().attr("src").await.unwrap().unwrap();
    assert!(src.ends_with("/image"), "the heat map toggles off: {src}");
    shot(&c, &shots, "frame").await;

    // An action without the CSRF token is refused, and nothing changes.
    assert_eq!(post_from_page(&c, &format!("/ui/frames/{ng_id}/false-reject"), "").await, 403);
    assert_eq!(post_from_page(&c, "/ui/frames/nope-1-1/false-reject", "").await, 403);
    let (_, m) = http_get(http_port, "/metrics");
    let m = String::from_utf8_lossy(&m);
    assert_eq!(metric(&m, "anomalyd_ui_actions_total{action=\"csrf\",result=\"refused\"}"), 2.0);
    // The line page's stream ends once the browser has left it (noticed at the next event).
    until("the line page's stream to end", Duration::from_secs(20), &daemon, || {
        metric(&String::from_utf8_lossy(&http_get(http_port, "/metrics").1), "anomalyd_ui_streams") == 0.0
    });

    // 4. Mark it a false reject: the preview says what would change; apply; the part comes back OK.
    c.find(Locator::Css("#false-reject")).await.unwrap().click().await.unwrap();
    let before: f64 = text(&c, "#th-before").await.parse().unwrap();
    let after: f64 = text(&c, "#th-after").await.parse().unwrap();
    let part_after = text(&c, "#score-after").await;
    assert!(part_after.contains("(OK)"), "the part itself passes after the lesson: {part_after}");
    assert!(after >= before, "a good part's evidence does not lower the threshold: {before} -> {after}");
    shot(&c, &shots, "preview").await;
    let replayed = apply_and_replay(&c, &sub, &daemon, 1, "taught").await;
    assert!(
        replayed.iter().all(|m| m.verdict == Outcome::Ok),
        "after the lesson, the marked part comes back OK on replay: {:?}",
        replayed.iter().map(|m| (m.verdict, m.score)).collect::<Vec<_>>()
    );

    // 5. Roll back: the marked part is NG again.
    c.goto(&format!("{base}/ui/cameras/cam")).await.unwrap();
    assert_eq!(text(&c, ".active-version").await, "1");
    shot(&c, &shots, "camera").await;
    c.find(Locator::Css("button.rollback")).await.unwrap().click().await.unwrap();
    let rolled = text(&c, "#message").await;
    assert!(rolled.starts_with("Version 0 is active on cam"), "{rolled}");
    let n_rolled = sub.verdicts().len();
    sub.wait_for_daemon("an NG after the rollback", Duration::from_secs(60), Some(&daemon), |s| {
        s.verdicts()[n_rolled..].iter().any(|m| !judged_with(m, "taught", 1) && m.verdict == Outcome::Ng)
    });

    // 6. Label the mark's region a stain: the next marked part carries the label.
    c.goto(&format!("{base}/ui/frames/{ng_id}")).await.unwrap();
    assert_eq!(
        c.find(Locator::Css("#regions li")).await.unwrap().attr("data-label").await.unwrap().as_deref(),
        Some("")
    );
    // Bad labels first: on a frame that is not stored, text that is no class, a region that is not there.
    let label_path = format!("/ui/frames/{ng_id}/label");
    let (status, page) = post_form(&c, "/ui/frames/cam-0-999999/label", json!({"region": "0", "label": "stain"})).await;
    assert_eq!(status, 404, "{page}");
    assert!(page.contains("is not stored"), "{page}");
    let (status, page) = post_form(&c, &label_path, json!({"region": "0", "label": "<img src=x>"})).await;
    assert_eq!(status, 400);
    assert!(page.contains("a label is 1 to 40 letters"), "{page}");
    let (status, page) = post_form(&c, &label_path, json!({"region": "7", "label": "stain"})).await;
    assert_eq!(status, 400);
    assert!(page.contains("numbered from 0"), "{page}");
    c.find(Locator::Css("#label-0")).await.unwrap().send_keys("Stain").await.unwrap();
    shot(&c, &shots, "label").await;
    c.find(Locator::Css("#label-0-button")).await.unwrap().click().await.unwrap();
    let applied = text(&c, "#message").await;
    assert!(applied.starts_with("Version 2 is active on cam"), "{applied}");
    let n_labelled = sub.verdicts().len();
    sub.wait_for_daemon("an NG with the label", Duration::from_secs(60), Some(&daemon), |s| {
        s.verdicts()[n_labelled..].iter().any(|m| judged_with(m, "labelled", 2) && m.verdict == Outcome::Ng)
    });
    let next = sub.verdicts()[n_labelled..]
        .iter()
        .find(|m| judged_with(m, "labelled", 2) && m.verdict == Outcome::Ng)
        .cloned()
        .unwrap();
    assert_eq!(next.regions[0].label.as_deref(), Some("stain"), "the next marked part: {:?}", next.regions);
    assert!(next.regions[0].label_confidence.unwrap() > 0.5, "{:?}", next.regions);
    // Its page shows the class, and the review gallery filters by it.
    until("the labelled frame in the store", Duration::from_secs(20), &daemon, || {
        http_get(http_port, &format!("/ui/frames/{}", next.frame_id)).0 == 200
    });
    c.goto(&format!("{base}/ui/frames/{}", next.frame_id)).await.unwrap();
    assert_eq!(text(&c, "#regions .label").await, "stain");
    c.goto(&format!("{base}/ui/review?label=stain")).await.unwrap();
    c.find(Locator::Css(&format!("#gallery a[data-frame='{}']", next.frame_id))).await.unwrap();
    assert!(c.find_all(Locator::Css(&format!("#gallery a[data-frame='{ng_id}']"))).await.unwrap().is_empty());

    // 7. Draw an ignore region around the mark: the marked part comes back OK on replay.
    c.goto(&format!("{base}/ui/frames/{ng_id}")).await.unwrap();
    c.find(Locator::Css("#draw-zones")).await.unwrap().click().await.unwrap();
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("#canvas")).await.unwrap();
    // Bad regions are refused with the reason, and nothing changes.
    let zones_path = format!("/ui/frames/{ng_id}/zones");
    let outside = r#"[{"kind":"ignore","points":[[0.5,0.5],[1.4,0.5],[1.4,0.9]]}]"#;
    let (status, page) = post_form(&c, &zones_path, json!({"zones": outside})).await;
    assert_eq!(status, 400);
    assert!(page.contains("lies outside the image"), "{page}");
    let (status, page) = post_form(&c, &zones_path, json!({"zones": "a circle, please"})).await;
    assert_eq!(status, 400);
    assert!(page.contains("could not be read"), "{page}");
    let (status, page) = post_form(&c, "/ui/frames/cam-0-999999/zones", json!({"zones": "[]"})).await;
    assert_eq!(status, 404, "a region on a frame that is not stored: {page}");
    // The mark lies at x 200-222, y 150-172 of the 320 x 240 part: tap the corners of a region around it.
    for (fx, fy) in [(0.58, 0.57), (0.75, 0.57), (0.75, 0.79), (0.58, 0.79)] {
        tap(&c, "#canvas", fx, fy).await;
    }
    assert_eq!(text(&c, "#corners").await, "4");
    c.find(Locator::Css("#close-ignore")).await.unwrap().click().await.unwrap();
    let drawn = c.find(Locator::Css("#zones")).await.unwrap().prop("value").await.unwrap().unwrap();
    let drawn: Value = serde_json::from_str(&drawn).unwrap();
    assert_eq!(drawn.as_array().unwrap().len(), 1, "{drawn}");
    assert_eq!(drawn[0]["kind"], "ignore");
    let (x0, y2) = (drawn[0]["points"][0][0].as_f64().unwrap(), drawn[0]["points"][2][1].as_f64().unwrap());
    assert!((x0 - 0.58).abs() < 0.01 && (y2 - 0.79).abs() < 0.01, "the taps landed where they were aimed: {drawn}");
    assert_eq!(c.find_all(Locator::Css("#canvas polygon.zone-ignore")).await.unwrap().len(), 1);
    shot(&c, &shots, "zones").await;
    c.find(Locator::Css("#preview-zones")).await.unwrap().click().await.unwrap();
    let frame_after = text(&c, "#score-after").await;
    assert!(frame_after.contains("(OK)"), "the marked frame passes with the region ignored: {frame_after}");
    shot(&c, &shots, "zones-preview").await;
    let replayed = apply_and_replay(&c, &sub, &daemon, 3, "zones").await;
    assert!(
        replayed.iter().all(|m| m.verdict == Outcome::Ok),
        "with the region ignored, the marked part comes back OK on replay: {:?}",
        replayed.iter().map(|m| (m.verdict, m.score)).collect::<Vec<_>>()
    );
    let (_, m) = http_get(http_port, "/metrics");
    let m = String::from_utf8_lossy(&m);
    assert_eq!(metric(&m, "anomalyd_ui_actions_total{action=\"zones\",result=\"refused\"}"), 3.0, "{m}");
    assert_eq!(metric(&m, "anomalyd_ui_actions_total{action=\"zones\",result=\"ok\"}"), 1.0);

    // 9. Ask about the frame: the answer arrives on the page.
    c.goto(&format!("{base}/ui/frames/{ng_id}")).await.unwrap();
    c.find(Locator::Css("#question")).await.unwrap().send_keys("Where is the defect?").await.unwrap();
    c.find(Locator::Css("#ask button")).await.unwrap().click().await.unwrap();
    let answer = c
        .wait()
        .at_most(Duration::from_secs(60))
        .for_element(Locator::Css("#chat li.answered .answer"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!answer.is_empty() && answer != "…", "an answer: {answer}");
    let li = c.find(Locator::Css("#chat li.answered")).await.unwrap();
    let (source, pieces) = (li.attr("data-source").await.unwrap(), li.attr("data-pieces").await.unwrap());
    eprintln!("answer from {source:?} in {pieces:?} pieces: {answer}");
    if source.as_deref() == Some("llm") {
        let n: u32 = pieces.expect("a model's answer streams").parse().unwrap();
        assert!(n >= 2, "the answer arrived token by token, not whole");
    }
    shot(&c, &shots, "ask").await;

    // Review: the gallery holds the NG frame.
    c.goto(&format!("{base}/ui/review?camera=cam")).await.unwrap();
    c.find(Locator::Css(&format!("#gallery a[data-frame='{ng_id}']"))).await.unwrap();
    shot(&c, &shots, "review").await;
    c.goto(&format!("{base}/ui/review?since=yesterday")).await.unwrap();
    assert!(c.source().await.unwrap().contains("since: use YYYY-MM-DDTHH:MM"));
    c.goto(&format!("{base}/ui/frames/cam-0-999999")).await.unwrap();
    assert!(text(&c, "#message").await.contains("is not stored"));

    // The audit log: on the page, on disk and on MQTT.
    c.goto(&format!("{base}/ui/audit")).await.unwrap();
    let audit = text(&c, "#audit").await;
    for action in ["login_refused", "login", "false_reject", "rollback", "label", "zones"] {
        assert!(audit.contains(action), "{action} in the audit page:\n{audit}");
    }
    assert!(
        audit.contains("0 → 1") && audit.contains("1 → 0") && audit.contains("0 → 2") && audit.contains("2 → 3"),
        "versions before and after:\n{audit}"
    );
    shot(&c, &shots, "audit").await;
    let on_mqtt: Vec<Value> = sub
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t == "anomalyd/station/audit")
        .map(|(_, p)| serde_json::from_str(p).unwrap())
        .collect();
    let actions: Vec<&str> = on_mqtt.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["login_refused", "login", "false_reject", "rollback", "label", "zones"], "{on_mqtt:?}");
    assert!(!daemon.log().contains(PASSWORD) && !daemon.log().contains("wrong password"), "no password in the log");

    // Log out: the session is gone, and actions are refused.
    c.find(Locator::Css(".who button")).await.unwrap().click().await.unwrap();
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("#login")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/ui/login"));
    assert_eq!(post_from_page(&c, &format!("/ui/frames/{ng_id}/false-reject"), "").await, 401);
    c.close().await.unwrap();
}

/// Logs `anna` in on the station at `base`.
async fn log_in(c: &Client, base: &str) {
    c.goto(&format!("{base}/ui/login")).await.unwrap();
    c.find(Locator::Css("#name")).await.unwrap().send_keys("anna").await.unwrap();
    c.find(Locator::Css("#password")).await.unwrap().send_keys(PASSWORD).await.unwrap();
    c.find(Locator::Css("#login")).await.unwrap().click().await.unwrap();
    assert_eq!(text(c, "#user").await, "anna");
}

/// An upload from the page (multipart, with the session's CSRF token in the query): `files` are
/// (name, size in bytes, text to repeat) made in the page, or (name, 0, base64 of the bytes). Returns the
/// status and the page.
async fn upload(c: &Client, fields: Value, files: Value) -> (u64, String) {
    let v = c
        .execute(
            "const form = new FormData(); \
             for (const [k, v] of Object.entries(arguments[0])) form.append(k, v); \
             for (const [name, size, fill] of arguments[1]) { \
               const bytes = size === 0 ? Uint8Array.from(atob(fill), (ch) => ch.charCodeAt(0)) \
                 : fill.repeat(Math.ceil(size / fill.length)).slice(0, size); \
               form.append('images', new Blob([bytes]), name); } \
             const url = '/ui/products?csrf=' + document.querySelector('meta[name=csrf]').content; \
             return fetch(url, {method: 'POST', body: form}).then(async r => [r.status, await r.text()]);",
            vec![fields, files],
        )
        .await
        .unwrap();
    (v[0].as_u64().unwrap(), v[1].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_enrols_a_new_product_from_uploaded_images_and_the_plc_selects_it() {
    let Some((chromium, driver)) = browser() else { return };
    let Some(broker) = Mosquitto::start() else { return };
    let sub = Sub::start(broker.port);
    let dir = tempfile::tempdir().unwrap();
    let (reference, frames) = line_scene(dir.path());
    let http_port = free_port();
    let config = base_config(dir.path(), broker.port, &format!("127.0.0.1:{http_port}"), "newprod", "")
        + &format!(
            "[llm]\nbackend = \"off\"\n{}[[camera]]\nname = \"cam\"\nlearn_parts = 0\n[[camera.recipe]]\n\
             name = \"plate\"\nreference = \"{}\"\n{}",
            operator(dir.path()),
            reference.display(),
            replayed(&frames)
        );
    let daemon = start_station(dir.path(), &config, http_port);
    let shots = shots(dir.path());
    let (_driver, c) = connect(&chromium, &driver).await;
    let base = format!("http://127.0.0.1:{http_port}");
    log_in(&c, &base).await;
    c.wait().at_most(Duration::from_secs(120)).for_element(Locator::Css("#tile-cam")).await.unwrap();
    c.find(Locator::Css("#new-product")).await.unwrap().click().await.unwrap();
    c.wait().at_most(Duration::from_secs(20)).for_element(Locator::Css("#images")).await.unwrap();

    // Bad uploads are refused with the reason, and nothing is kept.
    let fields = json!({"camera": "cam", "name": "bracket"});
    let (status, page) = upload(&c, fields.clone(), json!([["notes.txt", 64, "not a picture "]])).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("notes.txt is not an image this station reads"), "{page}");
    let (status, page) = upload(&c, fields.clone(), json!([["huge.png", 17 << 20, "x"]])).await;
    assert_eq!(status, 413, "{page}");
    assert!(page.contains("huge.png is 17 MiB; an image may be 16 MiB at most"), "{page}");
    let (status, page) = upload(&c, json!({"camera": "cam", "name": "a/b"}), json!([["notes.txt", 8, "x"]])).await;
    assert_eq!(status, 400, "{page}");
    let (status, page) = upload(&c, json!({"camera": "cam", "name": "plate"}), json!([])).await;
    assert_eq!(status, 400, "no image: {page}");
    let products = dir.path().join("enrolments/products");
    assert!(!products.exists(), "nothing was kept of a refused upload");

    // The new product: two good parts, turned upside down (another product's layout), uploaded from the form.
    let mut files = Vec::new();
    for v in [30, 31] {
        let p = dir.path().join(format!("bracket_{v}.png"));
        image::imageops::rotate180(&demo::part(v, Defect::None)).save(&p).unwrap();
        files.push(p.display().to_string());
    }
    c.find(Locator::Css("#name")).await.unwrap().send_keys("bracket").await.unwrap();
    c.find(Locator::Css("#words")).await.unwrap().send_keys("a turned bracket").await.unwrap();
    c.find(Locator::Css("#images")).await.unwrap().send_keys(&files.join("\n")).await.unwrap();
    shot(&c, &shots, "product").await;
    c.find(Locator::Css("#enrol")).await.unwrap().click().await.unwrap();
    // The job's page follows the enrolment (it reloads itself while it runs) until it is done.
    let state = c
        .wait()
        .at_most(Duration::from_secs(120))
        .for_element(Locator::Css("#state[data-state=done], #state[data-state=failed]"))
        .await
        .unwrap();
    let said = state.text().await.unwrap();
    assert_eq!(state.attr("data-state").await.unwrap().as_deref(), Some("done"), "{said}");
    let progress = text(&c, "#progress").await;
    assert!(progress.contains("encoding reference 2/2") && progress.contains("thresholds"), "{progress}");
    shot(&c, &shots, "product-enrolled").await;
    assert!(products.join("cam/bracket/product.json").is_file());

    // The daemon reloaded: the product is a recipe of the camera, and the PLC selects it.
    until("the new recipe", Duration::from_secs(120), &daemon, || {
        let (_, body) = http_get(http_port, "/v1/cameras/cam/recipes");
        String::from_utf8_lossy(&body).contains("\"bracket\"")
    });
    let (_, body) = http_get(http_port, "/v1/cameras/cam/recipes");
    let recipes: Value = serde_json::from_slice(&body).unwrap();
    let bracket = recipes["recipes"].as_array().unwrap().iter().find(|r| r["name"] == "bracket").unwrap().clone();
    assert_eq!(bracket["product"], "a turned bracket", "{recipes}");
    broker.publish("anomalyd/newprod/cmd", r#"{"cmd":"recipe","camera":"cam","product":"bracket"}"#);
    sub.wait_for_daemon("a verdict of the new product", Duration::from_secs(60), Some(&daemon), |s| {
        s.verdicts().iter().any(|m| m.product.as_deref() == Some("bracket"))
    });
    c.goto(&format!("{base}/ui/audit")).await.unwrap();
    assert!(text(&c, "#audit").await.contains("cam/bracket"));
    // A second product of the same name is refused.
    c.goto(&format!("{base}/ui/products/new")).await.unwrap();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&files[0]).unwrap());
    let (status, page) = upload(&c, json!({"camera": "cam", "name": "bracket"}), json!([["b.png", 0, png]])).await;
    assert_eq!(status, 409, "{page}");
    assert!(page.contains("has a product named bracket already"), "{page}");
    // An unknown camera takes none.
    let (status, page) = upload(&c, json!({"camera": "nope", "name": "other"}), json!([["b.png", 0, png]])).await;
    assert_eq!(status, 409, "{page}");
    assert!(page.contains("No camera &quot;nope&quot; is running"), "{page}");
    c.close().await.unwrap();
}
