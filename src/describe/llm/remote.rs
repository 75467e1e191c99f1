//! Any OpenAI-compatible chat endpoint: llama.cpp's server, Ollama, vLLM, or a hosted VLM.
//!
//! `POST <llm.url>/chat/completions` with `{"model", "messages", "max_tokens", "temperature", "seed",
//! "stream": false}`. With `llm.send_images`, the last user message carries the images as content
//! parts (`{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,…"}}`) after its text,
//! the form vision-language endpoints take. The API key, read from `llm.api_key_file`, goes in
//! `Authorization: Bearer`. Each call has `llm.timeout_ms` in all; `llm.concurrency` calls run at once.

use std::time::Instant;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::config::llm::LlmConfig;
use crate::describe::llm::http::HttpError;
use crate::describe::llm::{Attachment, Backend, Completion, GenOptions, LlmError, Session, http};
use crate::describe::template::Message;
use crate::util::url::Url;

pub struct Remote {
    url: Url,
    model: String,
    key: Option<String>,
    send_images: bool,
}

impl Remote {
    pub fn new(cfg: &LlmConfig) -> Result<Remote, LlmError> {
        let url = Url::parse(&cfg.url).map_err(HttpError::from)?.join("/chat/completions");
        let key = match &cfg.api_key_file {
            Some(p) => Some(
                crate::config::daemon::read_secret(p).map_err(|cause| LlmError::ApiKey { path: p.clone(), cause })?,
            ),
            None => None,
        };
        Ok(Remote { url, model: cfg.remote_model.clone(), key, send_images: cfg.send_images })
    }

    /// The request body for these messages and images.
    pub fn body(&self, messages: &[Message], images: &[Attachment], opts: &GenOptions) -> Value {
        let last_user = messages.iter().rposition(|m| m.role == "user");
        let msgs: Vec<Value> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if Some(i) == last_user && self.send_images && !images.is_empty() {
                    let mut parts = vec![json!({"type": "text", "text": m.content})];
                    for a in images {
                        parts.push(json!({"type": "text", "text": format!("Image: {}.", a.caption)}));
                        let b64 = base64::engine::general_purpose::STANDARD.encode(&a.jpeg);
                        parts.push(
                            json!({"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{b64}")}}),
                        );
                    }
                    json!({"role": m.role, "content": parts})
                } else {
                    json!({"role": m.role, "content": m.content})
                }
            })
            .collect();
        let mut body = json!({
            "messages": msgs,
            "max_tokens": opts.max_tokens,
            "temperature": opts.temperature,
            "seed": opts.seed,
            "stream": false,
        });
        if !self.model.is_empty() {
            body["model"] = json!(self.model);
        }
        body
    }
}

impl Backend for Remote {
    fn name(&self) -> String {
        let model = if self.model.is_empty() { "default" } else { &self.model };
        format!("remote:{model}@{}:{}", self.url.host, self.url.port)
    }

    fn takes_images(&self) -> bool {
        self.send_images
    }

    fn session(&self) -> Result<Box<dyn Session + '_>, LlmError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LlmError::Model(format!("cannot start the HTTP client's runtime: {e}")))?;
        Ok(Box::new(RemoteSession { remote: self, rt }))
    }
}

struct RemoteSession<'a> {
    remote: &'a Remote,
    rt: tokio::runtime::Runtime,
}

impl Session for RemoteSession<'_> {
    fn complete(
        &mut self,
        messages: &[Message],
        images: &[Attachment],
        opts: &GenOptions,
    ) -> Result<Completion, LlmError> {
        let t0 = Instant::now();
        let left = opts.deadline.saturating_duration_since(t0);
        if left.is_zero() {
            return Err(LlmError::Timeout(0));
        }
        let r = self.remote;
        let body = serde_json::to_vec(&r.body(messages, images, opts)).unwrap_or_default();
        let mut headers = vec![("content-type", "application/json".to_string())];
        if let Some(k) = &r.key {
            headers.push(("authorization", format!("Bearer {k}")));
        }
        let resp = self.rt.block_on(http::request("POST", &r.url, &headers, body, left)).map_err(|e| match e {
            http::HttpError::Timeout { .. } => LlmError::Timeout(left.as_millis() as u64),
            other => LlmError::Http(other),
        })?;
        if resp.status != 200 {
            let text = String::from_utf8_lossy(&resp.body);
            return Err(LlmError::Remote { status: resp.status, body: text.chars().take(300).collect() });
        }
        let v: Value = serde_json::from_slice(&resp.body).map_err(|e| LlmError::Protocol(e.to_string()))?;
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| LlmError::Protocol("no choices[0].message.content".into()))?
            .trim()
            .to_string();
        let total_ms = t0.elapsed().as_secs_f32() * 1e3;
        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32;
        Ok(Completion {
            text,
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32,
            tokens,
            // Not streamed: the first token arrives with the last.
            first_token_ms: total_ms,
            total_ms,
        })
    }
}
