//! `[llm]`: the language model that words NG verdicts and answers questions about them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::util::url::Url;

/// Which backend writes the descriptions and answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The local model when its file is present, else `url` when set, else the template answers only.
    #[default]
    Auto,
    Local,
    Remote,
    /// Template answers only.
    Off,
}

/// The `[llm]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    pub backend: BackendChoice,
    /// GGUF file of the local model; empty: `models/llm/<DEFAULT_MODEL_FILE>` in the working directory
    /// or beside the executable, or `ANOMALYD_LLM_MODEL`.
    pub model: PathBuf,
    /// CPU threads of the local model (they run at idle priority).
    pub threads: usize,
    /// Layers offloaded to the GPU (feature `llm-cuda`); 0 keeps the model on the CPU.
    pub gpu_layers: u32,
    /// Context window of the local model, in tokens.
    pub context_tokens: u32,
    /// Most tokens of one answer.
    pub max_tokens: u32,
    /// 0 is greedy decoding (the same answer every time); above 0, sampled with `seed`.
    pub temperature: f32,
    pub seed: u32,
    /// NG frames that may wait for a description; when full, the template text is published instead.
    pub queue: usize,
    /// Model calls at once (local: contexts; remote: requests in flight).
    pub concurrency: usize,
    /// Most time one call may take; after it, the template answer is used.
    pub timeout_ms: u64,
    /// OpenAI-compatible endpoint base, e.g. `http://127.0.0.1:11434/v1`; `/chat/completions` is appended.
    pub url: String,
    /// The model name the endpoint serves.
    pub remote_model: String,
    /// File holding the endpoint's API key (sent as a bearer token).
    pub api_key_file: Option<PathBuf>,
    /// Send the frame crop around the defects and the heat-map overlay to the endpoint (for a VLM).
    pub send_images: bool,
    /// Question-answer pairs kept per frame's conversation (older ones are dropped first).
    pub max_turns: usize,
    /// Most estimated tokens of history in one prompt (older turns are dropped first).
    pub max_history_tokens: u32,
    /// A conversation unused this long is forgotten.
    pub conversation_ttl_s: u64,
    /// Conversations kept at once (the least recently used is forgotten first).
    pub max_conversations: usize,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            backend: BackendChoice::Auto,
            model: PathBuf::new(),
            threads: 1,
            gpu_layers: 0,
            context_tokens: 2048,
            max_tokens: 96,
            temperature: 0.0,
            seed: 42,
            queue: 8,
            concurrency: 1,
            timeout_ms: 60_000,
            url: String::new(),
            remote_model: String::new(),
            api_key_file: None,
            send_images: true,
            max_turns: 6,
            max_history_tokens: 1024,
            conversation_ttl_s: 3600,
            max_conversations: 256,
        }
    }
}

impl LlmConfig {
    /// Problems of the section, each naming its key and the fix.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.threads == 0 || self.threads > 64 {
            p.push(format!("llm.threads = {}: use 1 to 64", self.threads));
        }
        if !(256..=32768).contains(&self.context_tokens) {
            p.push(format!("llm.context_tokens = {}: use 256 to 32768", self.context_tokens));
        }
        if self.max_tokens == 0 || self.max_tokens >= self.context_tokens / 2 {
            p.push(format!("llm.max_tokens = {}: use 1 to half of llm.context_tokens", self.max_tokens));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            p.push(format!("llm.temperature = {}: use 0 (greedy) to 2", self.temperature));
        }
        if self.queue == 0 || self.concurrency == 0 || self.concurrency > 16 {
            p.push(format!(
                "llm.queue = {} and llm.concurrency = {}: use a queue of at least 1 and 1 to 16 calls at once",
                self.queue, self.concurrency
            ));
        }
        if self.timeout_ms < 100 {
            p.push(format!("llm.timeout_ms = {}: use at least 100", self.timeout_ms));
        }
        if self.backend == BackendChoice::Remote && self.url.is_empty() {
            p.push("llm.backend = \"remote\" needs llm.url (e.g. \"http://127.0.0.1:11434/v1\")".into());
        }
        if !self.url.is_empty() && Url::parse(&self.url).is_err() {
            p.push(format!("llm.url = {:?}: use http://host:port/path or https://…", self.url));
        }
        if self.max_turns == 0 || self.max_conversations == 0 {
            p.push("llm.max_turns and llm.max_conversations must be at least 1".into());
        }
        p
    }
}
