//! The local language model: llama.cpp in process through `llama-cpp-2`. It reads any GGUF chat model
//! and formats the conversation with the chat template embedded in the file.
//!
//! Each worker has its own context and remembers the tokens already in its KV cache. A follow-up
//! question repeats the whole conversation, but only the new part after the common prefix is read
//! again, so the second and third turns cost little more than their own words.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::config::llm::LlmConfig;
use crate::describe::llm::{Attachment, Backend, Completion, GenOptions, LlmError, Session};
use crate::describe::template::Message;

/// llama.cpp's backend: initialised once per process.
fn backend() -> Result<&'static LlamaBackend, LlmError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LlmError::Model(format!("cannot start llama.cpp: {e}")))
}

pub struct Local {
    model: LlamaModel,
    template: LlamaChatTemplate,
    name: String,
    threads: i32,
    n_ctx: u32,
    /// Time to load the file, for the bench and the log.
    pub load_ms: f32,
}

impl Local {
    pub fn load(path: &Path, cfg: &LlmConfig) -> Result<Local, LlmError> {
        let t0 = Instant::now();
        let backend = backend()?;
        let params = LlamaModelParams::default().with_n_gpu_layers(cfg.gpu_layers);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| LlmError::Model(format!("cannot load {}: {e} (is it a GGUF file?)", path.display())))?;
        // The file's own template; "chatml" (Qwen's, SmolLM's) when it carries none.
        let template = match model.chat_template(None) {
            Ok(t) => t,
            Err(_) => LlamaChatTemplate::new("chatml").map_err(|e| LlmError::Model(e.to_string()))?,
        };
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        let n_ctx = cfg.context_tokens.min(model.n_ctx_train().max(256));
        let load_ms = t0.elapsed().as_secs_f32() * 1e3;
        tracing::info!(
            "loaded {} in {load_ms:.0} ms: {} parameters, {} MB, context {n_ctx} tokens, {} thread(s)",
            path.display(),
            model.n_params(),
            model.size() / 1_000_000,
            cfg.threads
        );
        Ok(Local { model, template, name, threads: cfg.threads as i32, n_ctx, load_ms })
    }

    /// The chat template applied to these messages, ready for the assistant's answer.
    pub fn prompt(&self, messages: &[Message]) -> Result<String, LlmError> {
        let chat = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LlmError::Model(format!("message with a NUL byte: {e}")))?;
        self.model
            .apply_chat_template(&self.template, &chat, true)
            .map_err(|e| LlmError::Model(format!("chat template: {e}")))
    }
}

impl Backend for Local {
    fn name(&self) -> String {
        format!("local:{}", self.name)
    }

    fn session(&self) -> Result<Box<dyn Session + '_>, LlmError> {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.n_ctx))
            .with_n_batch(512)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let ctx = self
            .model
            .new_context(backend()?, params)
            .map_err(|e| LlmError::Model(format!("cannot create a context of {} tokens: {e}", self.n_ctx)))?;
        Ok(Box::new(LocalSession { local: self, ctx, cached: Vec::new() }))
    }
}

struct LocalSession<'a> {
    local: &'a Local,
    ctx: LlamaContext<'a>,
    /// The tokens in the KV cache, in order from position 0.
    cached: Vec<LlamaToken>,
}

impl LocalSession<'_> {
    /// Decodes a batch; on failure the cache is emptied, so the next call starts clean.
    fn decode(&mut self, batch: &mut LlamaBatch, what: &str) -> Result<(), LlmError> {
        self.ctx.decode(batch).map_err(|e| {
            self.ctx.clear_kv_cache();
            self.cached.clear();
            LlmError::Model(format!("decoding {what} failed: {e}"))
        })
    }

    /// Makes the cache hold `tokens`: keeps the common prefix, reads the rest. Returns how many were read.
    fn feed(&mut self, tokens: &[LlamaToken], opts: &GenOptions, limit_ms: u64) -> Result<usize, LlmError> {
        let mut keep = self.cached.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        // The last prompt token must be decoded again to get its logits.
        keep = keep.min(tokens.len() - 1);
        if keep < self.cached.len() {
            let cleared = self.ctx.clear_kv_cache_seq(Some(0), Some(keep as u32), None).unwrap_or(false);
            if !cleared {
                self.ctx.clear_kv_cache();
                keep = 0;
            }
        }
        self.cached.truncate(keep);
        let n_batch = self.ctx.n_batch() as usize;
        let mut batch = LlamaBatch::new(n_batch, 1);
        for (c, chunk) in tokens[keep..].chunks(n_batch).enumerate() {
            if opts.expired() {
                return Err(LlmError::Timeout(limit_ms));
            }
            batch.clear();
            let start = keep + c * n_batch;
            for (i, t) in chunk.iter().enumerate() {
                let pos = start + i;
                batch.add(*t, pos as i32, &[0], pos == tokens.len() - 1).map_err(|e| LlmError::Model(e.to_string()))?;
            }
            self.decode(&mut batch, "the prompt")?;
            self.cached.extend_from_slice(chunk);
        }
        Ok(tokens.len() - keep)
    }
}

impl Session for LocalSession<'_> {
    fn complete(
        &mut self,
        messages: &[Message],
        _images: &[Attachment],
        opts: &GenOptions,
    ) -> Result<Completion, LlmError> {
        let t0 = Instant::now();
        let limit_ms = opts.deadline.saturating_duration_since(t0).as_millis() as u64;
        let prompt = self.local.prompt(messages)?;
        let model = &self.local.model;
        let tokens = model.vocab().tokenize(prompt.as_bytes(), true, true);
        let limit = self.local.n_ctx as usize;
        if tokens.is_empty() || tokens.len() + opts.max_tokens as usize > limit {
            return Err(LlmError::PromptTooLong { tokens: tokens.len() + opts.max_tokens as usize, limit });
        }
        let read = self.feed(&tokens, opts, limit_ms)?;
        let mut sampler = if opts.temperature <= 0.0 {
            LlamaSampler::greedy()
        } else {
            LlamaSampler::chain_simple([
                LlamaSampler::top_k(40),
                LlamaSampler::top_p(0.95, 1),
                LlamaSampler::temp(opts.temperature),
                LlamaSampler::dist(opts.seed),
            ])
        };
        let vocab = model.vocab();
        let mut bytes = Vec::new();
        // Bytes of the answer already sent as pieces.
        let mut sent = 0usize;
        let mut generated = 0u32;
        let mut first_token_ms = 0.0;
        let mut batch = LlamaBatch::new(1, 1);
        while generated < opts.max_tokens {
            let token = sampler.sample(&self.ctx, -1);
            sampler.accept(token);
            if generated == 0 {
                first_token_ms = t0.elapsed().as_secs_f32() * 1e3;
            }
            if vocab.is_eog(token) {
                break;
            }
            generated += 1;
            bytes.extend(vocab.token_to_piece(token, false, None));
            if let Some(tx) = &opts.pieces {
                // Whole characters only: a token may end inside one.
                let valid = match std::str::from_utf8(&bytes[sent..]) {
                    Ok(s) => s.len(),
                    Err(e) => e.valid_up_to(),
                };
                if valid > 0 {
                    let _ = tx.try_send(String::from_utf8_lossy(&bytes[sent..sent + valid]).into_owned());
                    sent += valid;
                }
            }
            if generated == opts.max_tokens {
                break;
            }
            if opts.expired() {
                return Err(LlmError::Timeout(limit_ms));
            }
            batch.clear();
            batch.add(token, self.cached.len() as i32, &[0], true).map_err(|e| LlmError::Model(e.to_string()))?;
            self.decode(&mut batch, "the answer")?;
            self.cached.push(token);
        }
        Ok(Completion {
            text: String::from_utf8_lossy(&bytes).trim().to_string(),
            prompt_tokens: read as u32,
            tokens: generated,
            first_token_ms,
            total_ms: t0.elapsed().as_secs_f32() * 1e3,
        })
    }
}
