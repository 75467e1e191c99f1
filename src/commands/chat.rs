//! `anomalyd chat`: a terminal conversation about one verdict.
//!
//! - [`remote`]: a frame of the running daemon, through `GET`/`POST /v1/frames/{id}/chat`; the
//!   conversation is the daemon's, so a second terminal (or the MQTT chat topic) sees the same turns.
//! - [`local`]: an image inspected here, explained by the `[llm]` backend in this process.
//!
//! Questions come from `-q` (in order, then exit) or from standard input, one per line.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::describe::explainer::{ChatAnswer, Description, Explainer, FrameFacts, Transcript};
use crate::describe::llm::http;
use crate::types::findings::Findings;
use crate::util::url::{BadUrl, Url};

/// Why a conversation could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ChatCommandError {
    #[error("http.listen is off in the config: give --url")]
    NoUrl,
    #[error("--url: {0}")]
    Url(BadUrl),
    #[error("reading {path}: {cause}")]
    TokenFile { path: PathBuf, cause: std::io::Error },
    #[error(transparent)]
    Token(#[from] crate::config::daemon::TokenError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("{what}: {cause}")]
    Json { what: &'static str, cause: serde_json::Error },
    #[error("the daemon has no NG frame {0} (only NG frames are kept; see its verdict's frame_url)")]
    NoFrame(String),
    #[error("the daemon refused the question ({0}): asking needs its token (--token-file or http.token_file)")]
    Refused(u16),
    #[error("the daemon answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error(transparent)]
    Reference(#[from] crate::enrol::reference::ReferenceError),
    #[error(transparent)]
    Detect(#[from] crate::detect::inspection::DetectError),
    #[error(transparent)]
    Image(#[from] crate::util::imageio::ImageError),
    #[error(transparent)]
    Llm(#[from] crate::describe::llm::LlmError),
    #[error(transparent)]
    Chat(#[from] crate::describe::explainer::ChatError),
    #[error("no description arrived")]
    NoDescription,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T, E = ChatCommandError> = std::result::Result<T, E>;

fn status(status: u16, body: &[u8]) -> ChatCommandError {
    ChatCommandError::Status { status, body: String::from_utf8_lossy(body).trim().to_string() }
}

/// Questions from `-q`, or read one per line from standard input (with a prompt on a terminal).
fn questions(given: &[String], mut ask: impl FnMut(&str) -> Result<()>) -> Result<()> {
    if !given.is_empty() {
        for q in given {
            println!("operator: {q}");
            ask(q)?;
        }
        return Ok(());
    }
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    if tty {
        eprintln!("(ask about this part; an empty line or Ctrl-D ends)");
    }
    loop {
        if tty {
            eprint!("operator> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        ask(line.trim())?;
    }
}

fn say(a: &ChatAnswer) {
    println!("anomalyd: {}{}", a.answer, note(a.source.as_str(), a.reason.as_deref(), a.refused.as_deref()));
}

/// Why the template answered, and what the model said that was refused.
fn note(source: &str, reason: Option<&str>, refused: Option<&str>) -> String {
    let refused = refused.map(|r| format!("; the model said: {r:?}")).unwrap_or_default();
    match (reason, source) {
        (Some(r), _) => format!("  [template: {r}{refused}]"),
        (None, "template") => "  [template]".into(),
        _ => String::new(),
    }
}

fn headline(f: &FrameFacts) {
    let v = &f.findings;
    println!(
        "frame {} on camera {}: {}, score {:.2} against the automatic threshold {:.2}, {} region(s)",
        f.frame_id,
        f.camera,
        if v.anomalous { "NG" } else { "OK" },
        v.score,
        v.threshold,
        v.regions.len()
    );
}

/// Talks to the daemon's HTTP API about one of its frames.
pub fn remote(
    cfg: &Config,
    frame_id: &str,
    url: Option<&str>,
    token_file: Option<&Path>,
    given: &[String],
) -> Result<ExitCode> {
    let base = match url {
        Some(u) => u.to_string(),
        None if cfg.http.listen.is_empty() => return Err(ChatCommandError::NoUrl),
        None => format!("http://{}", cfg.http.listen),
    };
    let base = Url::parse(&base).map_err(ChatCommandError::Url)?;
    let token = match token_file {
        Some(f) => Some(
            crate::config::daemon::read_secret(f)
                .map_err(|cause| ChatCommandError::TokenFile { path: f.into(), cause })?,
        ),
        None => crate::config::daemon::http_token(&cfg.http)?.map(|s| s.0),
    };
    let mut headers = vec![("content-type", "application/json".to_string())];
    if let Some(t) = &token {
        headers.push(("authorization", format!("Bearer {t}")));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let path = base.join(&format!("/v1/frames/{frame_id}/chat"));
    // Waiting behind a local model can take a while; the daemon bounds each call itself.
    let timeout = Duration::from_millis(cfg.llm.timeout_ms) * 3 + Duration::from_secs(10);
    let r = rt.block_on(http::request("GET", &path, &headers, Vec::new(), timeout))?;
    match r.status {
        200 => {
            let t: Transcript = serde_json::from_slice(&r.body)
                .map_err(|cause| ChatCommandError::Json { what: "the daemon's transcript", cause })?;
            headline(&t.frame);
            for turn in &t.turns {
                println!("operator: {}\nanomalyd: {}", turn.question, turn.answer);
            }
        }
        404 => return Err(ChatCommandError::NoFrame(frame_id.into())),
        s => return Err(status(s, &r.body)),
    }
    questions(given, |q| {
        let body = serde_json::json!({ "question": q }).to_string().into_bytes();
        let r = rt.block_on(http::request("POST", &path, &headers, body, timeout))?;
        match r.status {
            200 => {
                say(&serde_json::from_slice(&r.body)
                    .map_err(|cause| ChatCommandError::Json { what: "the daemon's answer", cause })?);
                Ok(())
            }
            401 | 403 => Err(ChatCommandError::Refused(r.status)),
            s => Err(status(s, &r.body)),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Inspects an image here and talks about it with the `[llm]` backend in this process.
pub fn local(
    cfg: &Config,
    image: &Path,
    reference: &Path,
    product: Option<String>,
    given: &[String],
) -> Result<ExitCode> {
    let mut det = crate::detect::detector::Detector::load(&cfg.engine)?;
    let e = crate::enrol::reference::load(&mut det, reference, &cfg.detect, &mut |m: &str| tracing::info!("{m}"))?;
    let img = crate::util::imageio::load_rgb(image)?;
    let ins = det.inspect(&e, &img)?;
    let v = &ins.verdict;
    let facts = FrameFacts {
        frame_id: image.file_stem().map(|s| s.to_string_lossy().replace(' ', "_")).unwrap_or_else(|| "image".into()),
        camera: "here".into(),
        captured_unix_ms: crate::types::verdict::unix_ms(std::time::SystemTime::now()),
        findings: Findings {
            anomalous: v.anomalous,
            score: v.score,
            threshold: v.threshold,
            regions: v.regions.clone(),
            product,
            classes: crate::detect::classes::known_labels(&e.meta.classes),
        },
    };
    let engine = crate::describe::llm::open(&cfg.llm)?;
    let (tx, rx) = crossbeam_channel::unbounded::<Description>();
    let publish: crate::describe::explainer::Publish = std::sync::Arc::new(move |d| {
        let _ = tx.send(d);
    });
    let metrics = std::sync::Arc::new(crate::telemetry::Metrics::new());
    let ex = Explainer::start(&cfg.llm, engine, "local", metrics, publish, None)?;
    headline(&facts);
    let id = facts.frame_id.clone();
    let images: crate::describe::explainer::Images = if ex.wants_images() {
        Box::new(move || crate::describe::llm::images_for(&img, &ins))
    } else {
        Box::new(Vec::new)
    };
    println!("operator: {}", crate::describe::explainer::DESCRIBE_QUESTION);
    ex.describe(facts, images);
    let wait = Duration::from_millis(cfg.llm.timeout_ms) + Duration::from_secs(10);
    let d = rx.recv_timeout(wait).map_err(|_| ChatCommandError::NoDescription)?;
    println!("anomalyd: {}{}", d.text, note(&d.source, d.reason.as_deref(), d.refused.as_deref()));
    let result = questions(given, |q| {
        say(&ex.chat(&id, q)?);
        Ok(())
    });
    ex.shutdown();
    result?;
    Ok(ExitCode::SUCCESS)
}
