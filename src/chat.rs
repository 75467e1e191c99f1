//! `anomalyd chat`: a terminal conversation about one verdict.
//!
//! - [`remote`]: a frame of the running daemon, through `GET`/`POST /v1/frames/{id}/chat`; the
//!   conversation is the daemon's, so a second terminal (or the MQTT chat topic) sees the same turns.
//! - [`local`]: an image inspected here, explained by the `[llm]` backend in this process.
//!
//! Questions come from `-q` (in order, then exit) or from standard input, one per line.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::config::Config;
use crate::describe::Findings;
use crate::llm::http::{self, Url};
use crate::llm::service::{ChatAnswer, Description, Explainer, FrameFacts, Transcript};

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
        None if cfg.http.listen.is_empty() => bail!("http.listen is off in the config: give --url"),
        None => format!("http://{}", cfg.http.listen),
    };
    let base = Url::parse(&base).map_err(|e| anyhow::anyhow!("--url: {e}"))?;
    let token = match token_file {
        Some(f) => Some(crate::daemon::config::read_secret(f).with_context(|| format!("reading {}", f.display()))?),
        None => crate::daemon::config::http_token(&cfg.http).map_err(anyhow::Error::msg)?.map(|s| s.0),
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
            let t: Transcript = serde_json::from_slice(&r.body).context("the daemon's transcript")?;
            headline(&t.frame);
            for turn in &t.turns {
                println!("operator: {}\nanomalyd: {}", turn.question, turn.answer);
            }
        }
        404 => bail!("the daemon has no NG frame {frame_id} (only NG frames are kept; see its verdict's frame_url)"),
        s => bail!("the daemon answered {s}: {}", String::from_utf8_lossy(&r.body).trim()),
    }
    questions(given, |q| {
        let body = serde_json::to_vec(&serde_json::json!({ "question": q }))?;
        let r = rt.block_on(http::request("POST", &path, &headers, body, timeout))?;
        match r.status {
            200 => {
                say(&serde_json::from_slice(&r.body).context("the daemon's answer")?);
                Ok(())
            }
            401 | 403 => bail!(
                "the daemon refused the question ({}): asking needs its token (--token-file or http.token_file)",
                r.status
            ),
            s => bail!("the daemon answered {s}: {}", String::from_utf8_lossy(&r.body).trim()),
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
    let mut det = crate::detect::Detector::load(&cfg.engine)?;
    let e = crate::reference::load(&mut det, reference, &cfg.detect, &mut |m: &str| tracing::info!("{m}"))?;
    let img = crate::imageio::load_rgb(image)?;
    let ins = det.inspect(&e, &img)?;
    let v = &ins.verdict;
    let facts = FrameFacts {
        frame_id: image.file_stem().map(|s| s.to_string_lossy().replace(' ', "_")).unwrap_or_else(|| "image".into()),
        camera: "here".into(),
        captured_unix_ms: crate::daemon::message::unix_ms(std::time::SystemTime::now()),
        findings: Findings {
            anomalous: v.anomalous,
            score: v.score,
            threshold: v.threshold,
            regions: v.regions.clone(),
            product,
        },
    };
    let engine = crate::llm::open(&cfg.llm)?;
    let (tx, rx) = crossbeam_channel::unbounded::<Description>();
    let publish: crate::llm::service::Publish = std::sync::Arc::new(move |d| {
        let _ = tx.send(d);
    });
    let metrics = std::sync::Arc::new(crate::telemetry::Metrics::new());
    let ex = Explainer::start(&cfg.llm, engine, "local", metrics, publish, None)?;
    headline(&facts);
    let id = facts.frame_id.clone();
    let images: crate::llm::service::Images =
        if ex.wants_images() { Box::new(move || crate::llm::images_for(&img, &ins)) } else { Box::new(Vec::new) };
    println!("operator: {}", crate::llm::service::DESCRIBE_QUESTION);
    ex.describe(facts, images);
    let wait = Duration::from_millis(cfg.llm.timeout_ms) + Duration::from_secs(10);
    let d = rx.recv_timeout(wait).context("no description arrived")?;
    println!("anomalyd: {}{}", d.text, note(&d.source, d.reason.as_deref(), d.refused.as_deref()));
    let result = questions(given, |q| {
        say(&ex.chat(&id, q)?);
        Ok(())
    });
    ex.shutdown();
    result?;
    Ok(ExitCode::SUCCESS)
}
