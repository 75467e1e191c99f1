//! Words and dialogue: the OpenAI-compatible client against an HTTP server of the test's own that
//! checks what it is sent, and (feature `llm`) the real local model on a real flagged frame.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomalyd::config::llm::{BackendChoice, LlmConfig};
use anomalyd::describe::explainer::{Description, Explainer, FrameFacts};
use anomalyd::describe::llm::{self, Backend, GenOptions, LlmError};
use anomalyd::describe::template::Message;
use anomalyd::source::demo::{self, Defect};
use anomalyd::telemetry::Metrics;
use anomalyd::types::findings::Findings;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::common::detector;

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
    body: Value,
}

/// An HTTP server answering each request with `reply` after `delay`; returns its port and what it saw.
fn server(delay: Duration, status: u16, reply: Value) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in l.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                headers.push((k.trim().to_lowercase(), v.trim().to_string()));
            }
            let len: usize = headers.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            log.lock().unwrap().push(Seen {
                line: line.trim_end().into(),
                headers,
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            });
            std::thread::sleep(delay);
            let text = reply.to_string();
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (port, seen)
}

fn completion(text: &str) -> Value {
    json!({"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
        "content": text}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 200, "completion_tokens": 12}})
}

/// A real flagged frame: the demo part with a scratch, inspected against the demo reference.
fn flagged() -> (image::RgbImage, anomalyd::detect::inspection::Inspection) {
    let mut det = detector();
    let refs = vec![("ref".to_string(), demo::part(0, Defect::None))];
    let e = det.enroll(&refs, &anomalyd::config::detect::DetectConfig::default(), &mut |_: &str| {}).unwrap();
    let img = demo::part(2, Defect::Scratch);
    let ins = det.inspect(&e, &img).unwrap();
    assert!(ins.verdict.anomalous, "the scratched demo part must be flagged");
    (img, ins)
}

fn facts_of(id: &str, ins: &anomalyd::detect::inspection::Inspection) -> FrameFacts {
    let v = &ins.verdict;
    FrameFacts {
        frame_id: id.into(),
        camera: "cam1".into(),
        captured_unix_ms: 1_000,
        findings: Findings {
            anomalous: v.anomalous,
            score: v.score,
            threshold: v.threshold,
            regions: v.regions.clone(),
            product: Some("a machined steel plate".into()),
            classes: Vec::new(),
        },
    }
}

fn explainer(cfg: &LlmConfig, engine: Arc<dyn Backend>) -> (Explainer, crossbeam_channel::Receiver<Description>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let publish: anomalyd::describe::explainer::Publish = Arc::new(move |d| {
        let _ = tx.send(d);
    });
    (Explainer::start(cfg, Some(engine), "t", Arc::new(Metrics::new()), publish, None).unwrap(), rx)
}

#[test]
fn openai_client_sends_messages_images_model_and_key_and_uses_the_answer() {
    let (img, ins) = flagged();
    let cell = ins.verdict.regions[0].cell.words();
    let answer = format!("A dark scratch at the {cell} of the plate.");
    let (port, seen) = server(Duration::ZERO, 200, completion(&answer));
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sk-test-123\n").unwrap();
    let cfg = LlmConfig {
        backend: BackendChoice::Remote,
        url: format!("http://127.0.0.1:{port}/v1"),
        remote_model: "llava:7b".into(),
        api_key_file: Some(key),
        max_tokens: 64,
        ..LlmConfig::default()
    };
    let engine = llm::open(&cfg).unwrap().expect("remote backend");
    assert!(engine.takes_images());
    let (ex, rx) = explainer(&cfg, engine);
    let imgs = Box::new(move || llm::images_for(&img, &ins));
    let (_, ins2) = flagged();
    ex.describe(facts_of("cam1-x-1", &ins2), imgs);
    let d = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!((d.text.as_str(), d.source.as_str(), d.tokens), (answer.as_str(), "llm", 12));
    let a = ex.chat("cam1-x-1", "Where exactly?").unwrap();
    assert_eq!(a.source, "llm");
    ex.shutdown();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let first = &seen[0];
    assert_eq!(first.line, "POST /v1/chat/completions HTTP/1.1");
    let header = |k: &str| first.headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.clone());
    assert_eq!(header("authorization").as_deref(), Some("Bearer sk-test-123"));
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    assert_eq!(header("host").as_deref(), Some(format!("127.0.0.1:{port}").as_str()));
    let b = &first.body;
    assert_eq!(
        (b["model"].as_str(), b["max_tokens"].as_u64(), b["stream"].as_bool()),
        (Some("llava:7b"), Some(64), Some(false))
    );
    let msgs = b["messages"].as_array().unwrap();
    assert_eq!(msgs.iter().map(|m| m["role"].as_str().unwrap()).collect::<Vec<_>>(), ["system", "user"]);
    let system = msgs[0]["content"].as_str().unwrap();
    assert!(
        system.contains("defective (NG)") && system.contains(cell) && system.contains("machined steel plate"),
        "{system}"
    );
    // The question's text, then each image's caption and the image as a JPEG data URL.
    let parts = msgs[1]["content"].as_array().unwrap();
    assert_eq!(parts[0]["type"], "text");
    let urls: Vec<&str> =
        parts.iter().filter(|p| p["type"] == "image_url").map(|p| p["image_url"]["url"].as_str().unwrap()).collect();
    assert_eq!(urls.len(), 2, "the crop around the defect and the heat-map overlay");
    for u in urls {
        let b64 = u.strip_prefix("data:image/jpeg;base64,").expect("a JPEG data URL");
        let jpeg = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        let decoded = image::load_from_memory(&jpeg).unwrap();
        assert!(decoded.width() >= 32 && decoded.width() <= 512 && decoded.height() <= 512);
    }
    // The follow-up carries the first exchange as text; images go with the first question only.
    let follow = seen[1].body["messages"].as_array().unwrap();
    let roles: Vec<&str> = follow.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(follow[2]["content"], answer.as_str());
    assert_eq!(follow[3]["content"], "Where exactly?");
}

#[test]
fn openai_client_times_out_and_reports_http_errors() {
    let (port, _) = server(Duration::from_secs(3), 200, completion("late"));
    let cfg = LlmConfig { url: format!("http://127.0.0.1:{port}/v1"), ..LlmConfig::default() };
    let remote = llm::remote::Remote::new(&cfg).unwrap();
    let mut s = remote.session().unwrap();
    let msgs = [Message { role: "user".into(), content: "hi".into() }];
    let opts = |ms| GenOptions {
        max_tokens: 8,
        temperature: 0.0,
        seed: 1,
        deadline: Instant::now() + Duration::from_millis(ms),
        cancel: None,
        pieces: None,
    };
    let t0 = Instant::now();
    assert!(matches!(s.complete(&msgs, &[], &opts(300)), Err(LlmError::Timeout(_))));
    assert!(t0.elapsed() < Duration::from_secs(2), "gave up at the deadline");
    let (port, _) = server(Duration::ZERO, 500, json!({"error": "model not loaded"}));
    let cfg = LlmConfig { url: format!("http://127.0.0.1:{port}/v1"), ..LlmConfig::default() };
    let remote = llm::remote::Remote::new(&cfg).unwrap();
    let e = remote.session().unwrap().complete(&msgs, &[], &opts(5000)).unwrap_err().to_string();
    assert!(e.contains("500") && e.contains("model not loaded"), "{e}");
    let cfg = LlmConfig { url: format!("http://127.0.0.1:{}/v1", free_port()), ..LlmConfig::default() };
    let remote = llm::remote::Remote::new(&cfg).unwrap();
    let e = remote.session().unwrap().complete(&msgs, &[], &opts(5000)).unwrap_err().to_string();
    assert!(e.contains("cannot connect"), "{e}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The small real model the tests run: `scripts/fetch_llm.py smollm2-135m-instruct-q4_1` (test.sh does).
#[cfg(feature = "llm")]
fn test_model() -> Option<std::path::PathBuf> {
    let p = std::env::var_os("ANOMALYD_TEST_LLM").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/llm/smollm2-135m-instruct-q4_1.gguf")
    });
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var_os("ANOMALYD_REQUIRE_LLM").is_none(),
        "{} is required (ANOMALYD_REQUIRE_LLM is set): python3 scripts/fetch_llm.py smollm2-135m-instruct-q4_1",
        p.display()
    );
    eprintln!("skipped: {} is absent (python3 scripts/fetch_llm.py smollm2-135m-instruct-q4_1)", p.display());
    None
}

#[cfg(feature = "llm")]
#[test]
fn the_real_local_model_keeps_context_over_three_turns_and_a_contradiction_is_replaced() {
    let Some(model) = test_model() else { return };
    let cfg =
        LlmConfig { backend: BackendChoice::Local, model, threads: 2, max_tokens: 24, seed: 7, ..LlmConfig::default() };
    let engine = llm::open(&cfg).unwrap().expect("local backend");
    assert!(engine.name().starts_with("local:smollm2"));
    let (ex, rx) = explainer(&cfg, engine);
    let (_, ins) = flagged();
    ex.describe(facts_of("cam1-real-1", &ins), Box::new(Vec::new));
    let d = rx.recv_timeout(Duration::from_secs(120)).unwrap();
    assert!(!d.text.is_empty());
    assert!(d.source == "llm" || d.reason.as_deref().unwrap_or("").starts_with("contradiction"), "{d:?}");
    // Asked with a stream: the model's words arrive a token at a time, and add up to what it said.
    let (tx, mut pieces) = tokio::sync::mpsc::channel(1024);
    let a2 = ex.chat_streaming("cam1-real-1", "How large is the defect?", Some(tx)).unwrap();
    let mut streamed = Vec::new();
    while let Ok(p) = pieces.try_recv() {
        streamed.push(p);
    }
    let said = streamed.concat();
    assert!(
        streamed.len() >= 2 && streamed.len() as u32 <= a2.tokens,
        "{} pieces for {} tokens",
        streamed.len(),
        a2.tokens
    );
    match (&a2.source[..], &a2.refused) {
        ("llm", _) => assert_eq!(said.trim(), a2.answer),
        (_, Some(refused)) => assert_eq!(said.trim(), refused),
        _ => panic!("the model answered neither in time nor at all: {a2:?}"),
    }
    let a3 = ex.chat("cam1-real-1", "Say exactly this sentence: No, there is no anomaly in the image.").unwrap();
    // Three turns, in order, in one conversation; each later turn read only its new tokens.
    let t = ex.transcript("cam1-real-1").unwrap();
    assert_eq!(t.turns.len(), 3);
    assert_eq!((a2.turn, a3.turn), (2, 3));
    assert_eq!(t.turns[1].answer, a2.answer);
    assert!(a2.prompt_tokens > 0 && a2.tokens > 0, "{a2:?}");
    let whole =
        anomalyd::describe::llm::estimate_tokens(&format!("{}{}{}", t.turns[0].question, t.turns[0].answer, a2.answer));
    assert!(a3.prompt_tokens < whole, "turn 3 reused the cached conversation: read {} tokens", a3.prompt_tokens);
    // The model repeated the denial it was asked for: the check refused it and the template answered.
    assert_eq!(a3.source, "template", "{a3:?}");
    assert!(a3.reason.as_deref().unwrap().contains("denies the anomaly"), "{a3:?}");
    assert!(anomalyd::describe::template::check(&a3.answer, &t.frame.findings, &a3.question).is_ok(), "{}", a3.answer);
    ex.shutdown();
}
