//! The explainer: words for NG frames and answers to questions about them, off the frame path.
//!
//! - [`Explainer::describe`] is called by a camera's inspection worker for each NG frame and never
//!   blocks: the frame goes into a bounded queue (`llm.queue`); when the queue is full, or there is no
//!   model, the template text is published at once instead, and a metric says why.
//! - `llm.concurrency` workers take frames off the queue, at idle CPU priority (`SCHED_IDLE`), so
//!   inspection always runs first. Each call has `llm.timeout_ms`. The answer is checked against the
//!   findings; a contradicting one is replaced by the template answer and counted.
//! - Every description goes out through the [`Publish`] callback (the daemon sends it to
//!   `<prefix>/<node>/<camera>/description`), keyed by frame id.
//! - [`Explainer::chat`] answers follow-up questions about a frame, with the conversation kept per
//!   frame (bounded in turns and tokens, forgotten after `llm.conversation_ttl_s`). Chat requests are
//!   served before queued descriptions. Frames not in memory are looked up with the [`Lookup`]
//!   callback (the daemon reads its flagged-frame store).
//! - Each camera's recent NG findings are kept, so that "is this the same place as the last NG?" is
//!   answered from measurements ([`Past`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::llm::LlmConfig;
use crate::describe::llm::{Attachment, Backend, Completion, GenOptions, LlmError, estimate_tokens};
use crate::describe::template::{self, Message, Past};
use crate::telemetry::Metrics;
use crate::types::findings::Findings;
use crate::types::verdict;
use crate::util::sync;

/// The question a description answers: AnomalyGPT's.
pub const DESCRIBE_QUESTION: &str = "Is there any anomaly in the image? Answer in one or two sentences: say where \
     the defect is and how large it is.";

/// A frame the explainer can talk about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameFacts {
    pub frame_id: String,
    pub camera: String,
    pub captured_unix_ms: u64,
    pub findings: Findings,
}

/// The text of a verdict, published on `<prefix>/<node>/<camera>/description`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Description {
    pub schema: u32,
    pub node: String,
    pub camera: String,
    pub frame_id: String,
    pub text: String,
    /// `llm` (the model's checked answer) or `template`.
    pub source: String,
    /// The backend that wrote it (`template` when none did).
    pub model: String,
    /// Why the template text was used: `no_model`, `queue_full`, `timeout`, `error`, or
    /// `contradiction: …`; null when the model's answer was used.
    pub reason: Option<String>,
    /// The model's answer that was refused for contradicting the findings, for audit.
    pub refused: Option<String>,
    /// Answer tokens the model generated (0 for the template).
    pub tokens: u32,
    /// From the verdict to this text.
    pub latency_ms: f32,
    pub published_at: String,
}

/// One question and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub question: String,
    pub answer: String,
    pub source: String,
}

/// The answer to a chat question (HTTP and MQTT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatAnswer {
    pub frame_id: String,
    pub camera: String,
    pub question: String,
    pub answer: String,
    pub source: String,
    pub model: String,
    pub reason: Option<String>,
    /// The model's answer that was refused for contradicting the findings, for audit.
    pub refused: Option<String>,
    /// 1 for the first question of this conversation (the description counts as one).
    pub turn: usize,
    pub tokens: u32,
    /// Prompt tokens the model had to read for this answer; the rest of the conversation came from
    /// its cache.
    pub prompt_tokens: u32,
    pub latency_ms: f32,
}

/// A frame's conversation, as `GET /v1/frames/{id}/chat` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    pub frame: FrameFacts,
    pub turns: Vec<Turn>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChatError {
    #[error("frame {0} is not known: only NG frames can be discussed, while they are in memory or in the store")]
    UnknownFrame(String),
    #[error("the question is empty")]
    EmptyQuestion,
    #[error("the question is over 2000 characters")]
    TooLong,
    #[error("the explainer is stopping")]
    Stopping,
}

pub type Publish = Arc<dyn Fn(Description) + Send + Sync>;
pub type Lookup = Arc<dyn Fn(&str) -> Option<FrameFacts> + Send + Sync>;
/// Makes the images for a remote VLM (frame crop, heat map); called only when they will be sent.
pub type Images = Box<dyn FnOnce() -> Vec<Attachment> + Send>;

struct Conversation {
    facts: FrameFacts,
    past: Past,
    turns: Vec<Turn>,
    used: Instant,
}

struct Shared {
    cfg: LlmConfig,
    node: String,
    model: String,
    engine: Option<Arc<dyn Backend>>,
    metrics: Arc<Metrics>,
    publish: Publish,
    lookup: Option<Lookup>,
    conversations: Mutex<HashMap<String, Conversation>>,
    /// Recent NG frames per camera: (frame id, capture time, regions), oldest first.
    history: Mutex<BTreeMap<String, VecDeque<PastNg>>>,
    /// Set by [`Explainer::shutdown`].
    stop: Arc<AtomicBool>,
}

enum Job {
    Describe {
        frame_id: String,
        images: Images,
        queued: Instant,
    },
    Chat {
        frame_id: String,
        question: String,
        queued: Instant,
        reply: crossbeam_channel::Sender<ChatAnswer>,
        pieces: Option<Pieces>,
    },
}

/// What a model call is for (`describe`, `chat`), and where its answer goes as it is generated.
#[derive(Clone, Copy)]
struct Call<'a> {
    kind: &'a str,
    pieces: Option<&'a Pieces>,
}

/// Where a chat answer goes as it is generated ([`GenOptions::pieces`]).
pub type Pieces = tokio::sync::mpsc::Sender<String>;

/// An earlier NG frame of a camera: frame id, capture time (Unix ms), regions.
type PastNg = (String, u64, Vec<crate::types::findings::Region>);

/// Most NG frames remembered per camera for comparisons.
const HISTORY: usize = 64;

pub struct Explainer {
    shared: Arc<Shared>,
    describe_tx: Mutex<Option<crossbeam_channel::Sender<Job>>>,
    chat_tx: Mutex<Option<crossbeam_channel::Sender<Job>>>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Explainer {
    /// Starts the workers of `engine` (none: template answers only, on the caller's thread).
    pub fn start(
        cfg: &LlmConfig,
        engine: Option<Arc<dyn Backend>>,
        node: &str,
        metrics: Arc<Metrics>,
        publish: Publish,
        lookup: Option<Lookup>,
    ) -> std::io::Result<Explainer> {
        let model = engine.as_ref().map(|e| e.name()).unwrap_or_else(|| "template".into());
        metrics.llm_started(&model, cfg.queue);
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            node: node.into(),
            model,
            engine,
            metrics,
            publish,
            lookup,
            conversations: Mutex::default(),
            history: Mutex::default(),
            stop: Arc::new(AtomicBool::new(false)),
        });
        let ex = Explainer {
            shared: shared.clone(),
            describe_tx: Mutex::new(None),
            chat_tx: Mutex::new(None),
            workers: Mutex::default(),
        };
        if let Some(engine) = shared.engine.clone() {
            let (dtx, drx) = crossbeam_channel::bounded::<Job>(cfg.queue);
            let (ctx, crx) = crossbeam_channel::bounded::<Job>(cfg.queue);
            let mut workers = Vec::new();
            for i in 0..cfg.concurrency {
                let (shared, engine, drx, crx) = (shared.clone(), engine.clone(), drx.clone(), crx.clone());
                workers.push(std::thread::Builder::new().name(format!("llm-{i}")).spawn(move || {
                    idle_priority();
                    worker(&shared, engine.as_ref(), &drx, &crx)
                })?);
            }
            *sync::lock(&ex.workers) = workers;
            *sync::lock(&ex.describe_tx) = Some(dtx);
            *sync::lock(&ex.chat_tx) = Some(ctx);
        }
        Ok(ex)
    }

    /// Adds an earlier NG frame (e.g. from the flagged-frame store, after a restart) to its camera's
    /// history, so that questions about the previous NG can be answered; it starts no conversation.
    pub fn remember_past(&self, facts: &FrameFacts) {
        record_past(sync::lock(&self.shared.history).entry(facts.camera.clone()).or_default(), facts);
    }

    /// The backend's name (`template` when there is none).
    pub fn model(&self) -> &str {
        &self.shared.model
    }

    /// True when a backend writes the text (not only the template).
    pub fn has_model(&self) -> bool {
        self.shared.engine.is_some()
    }

    /// True when the backend looks at images: the caller should pass them to [`Explainer::describe`].
    pub fn wants_images(&self) -> bool {
        self.shared.engine.as_ref().is_some_and(|e| e.takes_images())
    }

    /// Queues a description of an NG frame; never blocks. The template text goes out at once when
    /// there is no model or the queue is full.
    pub fn describe(&self, facts: FrameFacts, images: Images) {
        let s = &self.shared;
        let frame_id = facts.frame_id.clone();
        s.remember(facts);
        let Some(tx) = sync::lock(&self.describe_tx).clone() else {
            let why = if s.engine.is_some() { "shutdown" } else { "no_model" };
            return s.fallback(&frame_id, why, Instant::now());
        };
        match tx.try_send(Job::Describe { frame_id: frame_id.clone(), images, queued: Instant::now() }) {
            Ok(()) => {
                s.metrics.llm_queue_depth(tx.len());
            }
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                tracing::debug!(frame = %frame_id, "description queue full: template text");
                s.fallback(&frame_id, "queue_full", Instant::now())
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => s.fallback(&frame_id, "error", Instant::now()),
        }
    }

    /// Answers a question about a frame, keeping the conversation. Blocks up to `llm.timeout_ms` (plus
    /// the time waiting behind other questions); call it off async threads.
    pub fn chat(&self, frame_id: &str, question: &str) -> Result<ChatAnswer, ChatError> {
        self.chat_streaming(frame_id, question, None)
    }

    /// [`Explainer::chat`], with the model's answer also sent to `pieces` as it is generated (a piece per
    /// token; none when a template answers). The returned answer is the checked one: it may replace what
    /// was streamed.
    pub fn chat_streaming(
        &self,
        frame_id: &str,
        question: &str,
        pieces: Option<Pieces>,
    ) -> Result<ChatAnswer, ChatError> {
        let question = question.trim();
        if question.is_empty() {
            return Err(ChatError::EmptyQuestion);
        }
        if question.chars().count() > 2000 {
            return Err(ChatError::TooLong);
        }
        let s = &self.shared;
        if !s.known(frame_id) {
            return Err(ChatError::UnknownFrame(frame_id.into()));
        }
        let t0 = Instant::now();
        let answer = match sync::lock(&self.chat_tx).clone() {
            None if s.engine.is_some() => return Err(ChatError::Stopping),
            None => s.answer(frame_id, question, None, t0).ok_or_else(|| ChatError::UnknownFrame(frame_id.into()))?,
            Some(tx) => {
                let (reply, rx) = crossbeam_channel::bounded(1);
                let job = Job::Chat { frame_id: frame_id.into(), question: question.into(), queued: t0, reply, pieces };
                if tx.try_send(job).is_err() {
                    s.metrics.llm_fallback("chat_queue_full");
                    s.answer(frame_id, question, Some("queue_full".into()), t0).ok_or(ChatError::Stopping)?
                } else {
                    // The worker answers within its timeout once it takes the job; bound the wait behind others.
                    let wait =
                        Duration::from_millis(s.cfg.timeout_ms) * (s.cfg.queue as u32 + 1) + Duration::from_secs(5);
                    rx.recv_timeout(wait).map_err(|_| ChatError::Stopping)?
                }
            }
        };
        s.metrics.llm_chat(&answer.source);
        Ok(answer)
    }

    /// The conversation about a frame so far.
    pub fn transcript(&self, frame_id: &str) -> Option<Transcript> {
        let s = &self.shared;
        if !s.known(frame_id) {
            return None;
        }
        let convs = sync::lock(&s.conversations);
        convs.get(frame_id).map(|c| Transcript { frame: c.facts.clone(), turns: c.turns.clone() })
    }

    /// Stops the workers: a call in progress gives up, and every description still queued goes out as
    /// the template text (reason `shutdown`), so no NG frame is left without one. Blocks until done.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        sync::lock(&self.describe_tx).take();
        sync::lock(&self.chat_tx).take();
        let workers = std::mem::take(&mut *sync::lock(&self.workers));
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Shared {
    /// Records an NG frame: its conversation and the camera's history.
    fn remember(&self, facts: FrameFacts) {
        let past = {
            let mut h = sync::lock(&self.history);
            let list = h.entry(facts.camera.clone()).or_default();
            let past = past_of(&facts, list);
            record_past(list, &facts);
            past
        };
        self.insert(facts, past);
    }

    fn insert(&self, facts: FrameFacts, past: Past) {
        let mut convs = sync::lock(&self.conversations);
        let ttl = Duration::from_secs(self.cfg.conversation_ttl_s);
        convs.retain(|_, c| c.used.elapsed() < ttl);
        while convs.len() >= self.cfg.max_conversations {
            let Some(oldest) = convs.iter().min_by_key(|(_, c)| c.used).map(|(k, _)| k.clone()) else { break };
            convs.remove(&oldest);
        }
        let id = facts.frame_id.clone();
        convs.insert(id, Conversation { facts, past, turns: Vec::new(), used: Instant::now() });
        self.metrics.llm_conversations(convs.len());
    }

    /// True when the frame has a conversation, or can get one from the store.
    fn known(&self, frame_id: &str) -> bool {
        let ttl = Duration::from_secs(self.cfg.conversation_ttl_s);
        {
            let mut convs = sync::lock(&self.conversations);
            if let Some(c) = convs.get_mut(frame_id) {
                if c.used.elapsed() < ttl {
                    c.used = Instant::now();
                    return true;
                }
                convs.remove(frame_id);
            }
        }
        let Some(facts) = self.lookup.as_ref().and_then(|l| l(frame_id)) else { return false };
        let past = {
            let h = sync::lock(&self.history);
            h.get(&facts.camera).map(|l| past_of(&facts, l)).unwrap_or(Past::First { camera: facts.camera.clone() })
        };
        self.insert(facts, past);
        true
    }

    /// The prompt for a question: the findings, the comparison, the kept turns, the question.
    fn messages(&self, frame_id: &str, question: &str) -> Option<(Vec<Message>, FrameFacts, Past, usize)> {
        let convs = sync::lock(&self.conversations);
        let c = convs.get(frame_id)?;
        let mut findings = c.facts.findings.clone();
        findings.product = findings.product.or_else(|| Some("the inspected part (no description configured)".into()));
        let mut msgs = vec![template::prompt(&findings, Some(&c.past))];
        // The most recent turns that fit the history budget, in order.
        let mut budget = self.cfg.max_history_tokens as i64;
        let kept: Vec<&Turn> = c
            .turns
            .iter()
            .rev()
            .take_while(|t| {
                budget -= i64::from(estimate_tokens(&t.question) + estimate_tokens(&t.answer) + 8);
                budget >= 0
            })
            .collect();
        for t in kept.into_iter().rev() {
            msgs.push(Message { role: "user".into(), content: t.question.clone() });
            msgs.push(Message { role: "assistant".into(), content: t.answer.clone() });
        }
        msgs.push(Message { role: "user".into(), content: question.into() });
        Some((msgs, c.facts.clone(), c.past.clone(), c.turns.len() + 1))
    }

    fn push_turn(&self, frame_id: &str, turn: Turn) -> usize {
        let mut convs = sync::lock(&self.conversations);
        let Some(c) = convs.get_mut(frame_id) else { return 0 };
        c.turns.push(turn);
        let over = c.turns.len().saturating_sub(self.cfg.max_turns);
        c.turns.drain(..over);
        c.used = Instant::now();
        c.turns.len()
    }

    /// The template answer to a question, kept as the frame's next turn.
    fn answer(&self, frame_id: &str, question: &str, why: Option<String>, t0: Instant) -> Option<ChatAnswer> {
        let (_, facts, past, _) = self.messages(frame_id, question)?;
        let text = template::reply(question, &facts.findings, Some(&past));
        let said = Said { text, source: "template", reason: why, refused: None, tokens: 0, prompt_tokens: 0 };
        Some(self.record_answer(&facts, question, said, t0))
    }

    /// Keeps what was said as the frame's next turn, and the answer to send back.
    fn record_answer(&self, facts: &FrameFacts, question: &str, said: Said, t0: Instant) -> ChatAnswer {
        let turn = Turn { question: question.into(), answer: said.text.clone(), source: said.source.into() };
        let turn = self.push_turn(&facts.frame_id, turn);
        ChatAnswer {
            frame_id: facts.frame_id.clone(),
            camera: facts.camera.clone(),
            question: question.into(),
            answer: said.text,
            source: said.source.into(),
            model: if said.source == "llm" { self.model.clone() } else { "template".into() },
            reason: said.reason,
            refused: said.refused,
            turn,
            tokens: said.tokens,
            prompt_tokens: said.prompt_tokens,
            latency_ms: t0.elapsed().as_secs_f32() * 1e3,
        }
    }

    /// Publishes the template description of a frame.
    fn fallback(&self, frame_id: &str, why: &str, t0: Instant) {
        self.metrics.llm_fallback(why);
        let Some(facts) = self.facts(frame_id) else { return };
        let text = facts.findings.answer_text();
        self.push_turn(
            frame_id,
            Turn { question: DESCRIBE_QUESTION.into(), answer: text.clone(), source: "template".into() },
        );
        let said =
            Said { text, source: "template", reason: Some(why.into()), refused: None, tokens: 0, prompt_tokens: 0 };
        self.emit(&facts, said, t0);
    }

    fn facts(&self, frame_id: &str) -> Option<FrameFacts> {
        sync::lock(&self.conversations).get(frame_id).map(|c| c.facts.clone())
    }

    fn emit(&self, facts: &FrameFacts, said: Said, t0: Instant) {
        let now = SystemTime::now();
        let d = Description {
            schema: verdict::SCHEMA,
            node: self.node.clone(),
            camera: facts.camera.clone(),
            frame_id: facts.frame_id.clone(),
            text: said.text,
            source: said.source.into(),
            model: if said.source == "llm" { self.model.clone() } else { "template".into() },
            reason: said.reason,
            refused: said.refused,
            tokens: said.tokens,
            latency_ms: t0.elapsed().as_secs_f32() * 1e3,
            published_at: verdict::rfc3339(now),
        };
        (self.publish)(d);
    }

    /// One model call, checked: the answer, or the template's with the reason.
    fn ask(
        &self,
        session: &mut dyn crate::describe::llm::Session,
        msgs: &[Message],
        images: &[Attachment],
        facts: &FrameFacts,
        template: impl FnOnce() -> String,
        call: Call<'_>,
    ) -> Said {
        let kind = call.kind;
        let question = msgs.last().map(|m| m.content.as_str()).unwrap_or_default();
        let cfg = &self.cfg;
        let opts = GenOptions {
            max_tokens: cfg.max_tokens,
            temperature: cfg.temperature,
            seed: cfg.seed,
            deadline: Instant::now() + Duration::from_millis(cfg.timeout_ms),
            cancel: Some(self.stop.clone()),
            pieces: call.pieces.cloned(),
        };
        let m = &self.metrics;
        let result: Result<Completion, LlmError> = session.complete(msgs, images, &opts);
        match result {
            Ok(c) if !c.text.is_empty() => {
                m.llm_call(kind, c.tokens, c.total_ms);
                let (tokens, prompt_tokens) = (c.tokens, c.prompt_tokens);
                match template::check(&c.text, &facts.findings, question) {
                    Ok(()) => Said { text: c.text, source: "llm", reason: None, refused: None, tokens, prompt_tokens },
                    Err(d) => {
                        m.llm_replaced(d.label());
                        tracing::info!(frame = %facts.frame_id, "model answer replaced by the template: {d}: {:?}", c.text);
                        let reason = Some(format!("contradiction: {d}"));
                        Said {
                            text: template(),
                            source: "template",
                            reason,
                            refused: Some(c.text),
                            tokens,
                            prompt_tokens,
                        }
                    }
                }
            }
            Ok(_) => Said::fallback(m, template(), "empty"),
            Err(LlmError::Timeout(_)) if self.stop.load(Ordering::SeqCst) => Said::fallback(m, template(), "shutdown"),
            Err(LlmError::Timeout(ms)) => {
                tracing::warn!(frame = %facts.frame_id, "language model gave no answer within {ms} ms: template text");
                Said::fallback(m, template(), "timeout")
            }
            Err(e) => {
                tracing::warn!(frame = %facts.frame_id, "language model failed: {e}; template text");
                let mut s = Said::fallback(m, template(), "error");
                s.reason = Some(format!("error: {e}"));
                s
            }
        }
    }
}

/// What a model call came to, after the check.
struct Said {
    text: String,
    /// `llm` or `template`.
    source: &'static str,
    reason: Option<String>,
    refused: Option<String>,
    tokens: u32,
    prompt_tokens: u32,
}

impl Said {
    fn fallback(m: &Metrics, text: String, why: &str) -> Said {
        m.llm_fallback(why);
        Said { text, source: "template", reason: Some(why.into()), refused: None, tokens: 0, prompt_tokens: 0 }
    }
}

/// Adds an NG frame to its camera's history, in capture order, once, keeping the last [`HISTORY`].
fn record_past(list: &mut VecDeque<PastNg>, facts: &FrameFacts) {
    if list.iter().any(|(id, _, _)| *id == facts.frame_id) {
        return;
    }
    let at = list.iter().position(|(_, t, _)| *t > facts.captured_unix_ms).unwrap_or(list.len());
    list.insert(at, (facts.frame_id.clone(), facts.captured_unix_ms, facts.findings.regions.clone()));
    while list.len() > HISTORY {
        list.pop_front();
    }
}

/// The comparison of `facts` with the latest earlier NG in `list` of the same camera.
fn past_of(facts: &FrameFacts, list: &VecDeque<PastNg>) -> Past {
    let prev = list.iter().rev().find(|(id, t, _)| *id != facts.frame_id && *t <= facts.captured_unix_ms);
    match prev {
        Some((id, t, regions)) => Past::compare(
            &facts.camera,
            id,
            (facts.captured_unix_ms - t) as f64 / 1e3,
            regions,
            &facts.findings.regions,
        ),
        None => Past::First { camera: facts.camera.clone() },
    }
}

fn worker(
    s: &Shared,
    engine: &dyn Backend,
    describe_rx: &crossbeam_channel::Receiver<Job>,
    chat_rx: &crossbeam_channel::Receiver<Job>,
) {
    let mut session = match engine.session() {
        Ok(sess) => Some(sess),
        Err(e) => {
            tracing::error!("language model worker cannot start: {e}; template text only");
            None
        }
    };
    let (mut describe_open, mut chat_open) = (true, true);
    while describe_open || chat_open {
        // Questions from an operator first, then queued descriptions.
        let job = match chat_rx.try_recv() {
            Ok(j) => j,
            Err(_) => {
                let mut sel = crossbeam_channel::Select::new();
                let c = chat_open.then(|| sel.recv(chat_rx));
                let d = describe_open.then(|| sel.recv(describe_rx));
                let op = sel.select();
                let i = op.index();
                let rx = if Some(i) == c { chat_rx } else { describe_rx };
                match op.recv(rx) {
                    Ok(j) => j,
                    Err(_) => {
                        if Some(i) == c {
                            chat_open = false;
                        } else if Some(i) == d {
                            describe_open = false;
                        }
                        continue;
                    }
                }
            }
        };
        s.metrics.llm_queue_depth(describe_rx.len());
        match job {
            Job::Describe { frame_id, images, queued } => {
                if s.stop.load(Ordering::SeqCst) {
                    s.fallback(&frame_id, "shutdown", queued);
                    continue;
                }
                let Some(sess) = session.as_deref_mut() else {
                    s.fallback(&frame_id, "error", queued);
                    continue;
                };
                let Some((msgs, facts, _, _)) = s.messages(&frame_id, DESCRIBE_QUESTION) else { continue };
                let images = if engine.takes_images() { images() } else { Vec::new() };
                let said = s.ask(
                    sess,
                    &msgs,
                    &images,
                    &facts,
                    || facts.findings.answer_text(),
                    Call { kind: "describe", pieces: None },
                );
                let turn =
                    Turn { question: DESCRIBE_QUESTION.into(), answer: said.text.clone(), source: said.source.into() };
                s.push_turn(&frame_id, turn);
                s.metrics.llm_described(said.source, queued.elapsed().as_secs_f64());
                s.emit(&facts, said, queued);
            }
            Job::Chat { frame_id, question, queued, reply, pieces } => {
                let answer = match session.as_deref_mut() {
                    None => s.answer(&frame_id, &question, Some("error".into()), queued),
                    Some(sess) => s.messages(&frame_id, &question).map(|(msgs, facts, past, _)| {
                        let said = s.ask(
                            sess,
                            &msgs,
                            &[],
                            &facts,
                            || template::reply(&question, &facts.findings, Some(&past)),
                            Call { kind: "chat", pieces: pieces.as_ref() },
                        );
                        s.record_answer(&facts, &question, said, queued)
                    }),
                };
                if let Some(a) = answer {
                    let _ = reply.send(a);
                }
            }
        }
    }
}

/// Puts the calling thread (and the threads it starts, such as llama.cpp's) in `SCHED_IDLE`: it runs
/// only when no inspection thread wants the CPU.
fn idle_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_setscheduler with pid 0 changes the calling thread only; the param struct is
        // valid for the call. SCHED_IDLE needs no privilege. On failure, fall back to the lowest nice.
        unsafe {
            let param = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, 19);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::describe::llm::Session;
    use crate::types::findings::{Cell, Region};

    /// Answers from a script, recording every prompt it was given.
    struct Scripted {
        answers: Vec<&'static str>,
        prompts: Arc<Mutex<Vec<Vec<Message>>>>,
        delay: Duration,
    }

    impl Backend for Scripted {
        fn name(&self) -> String {
            "scripted".into()
        }
        fn session(&self) -> Result<Box<dyn Session + '_>, LlmError> {
            Ok(Box::new(ScriptedSession { engine: self, next: 0 }))
        }
    }

    struct ScriptedSession<'a> {
        engine: &'a Scripted,
        next: usize,
    }

    impl Session for ScriptedSession<'_> {
        fn complete(&mut self, m: &[Message], _: &[Attachment], o: &GenOptions) -> Result<Completion, LlmError> {
            sync::lock(&self.engine.prompts).push(m.to_vec());
            let t0 = Instant::now();
            while t0.elapsed() < self.engine.delay {
                if o.expired() {
                    return Err(LlmError::Timeout(0));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let text = self.engine.answers.get(self.next).copied().unwrap_or("It is at the bottom right.");
            self.next += 1;
            Ok(Completion { text: text.into(), tokens: 7, ..Completion::default() })
        }
    }

    fn facts(id: &str, t: u64, bbox: [u32; 4], cell: Cell) -> FrameFacts {
        FrameFacts {
            frame_id: id.into(),
            camera: "cam1".into(),
            captured_unix_ms: t,
            findings: Findings {
                anomalous: true,
                score: 45.0,
                threshold: 40.0,
                regions: vec![Region { bbox, area_pct: 2.0, cell, peak: 50.0, label: None, label_confidence: None }],
                product: Some("a steel plate".into()),
                classes: Vec::new(),
            },
        }
    }

    type Prompts = Arc<Mutex<Vec<Vec<Message>>>>;

    fn explainer(
        answers: Vec<&'static str>,
        delay: Duration,
        cfg: LlmConfig,
    ) -> (Explainer, crossbeam_channel::Receiver<Description>, Prompts, Arc<Metrics>) {
        let prompts: Arc<Mutex<Vec<Vec<Message>>>> = Arc::default();
        let engine: Arc<dyn Backend> = Arc::new(Scripted { answers, prompts: prompts.clone(), delay });
        let (tx, rx) = crossbeam_channel::unbounded();
        let publish: Publish = Arc::new(move |d| {
            let _ = tx.send(d);
        });
        let metrics = Arc::new(Metrics::new());
        let ex = Explainer::start(&cfg, Some(engine), "n1", metrics.clone(), publish, None).unwrap();
        (ex, rx, prompts, metrics)
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_contradicting_description_is_replaced_and_counted_and_the_chat_keeps_its_turns() {
        let (ex, rx, prompts, metrics) = explainer(
            vec![
                "No, there is no anomaly in the image.",
                "At the bottom right, near the edge.",
                "About 2% of the part.",
            ],
            Duration::ZERO,
            LlmConfig::default(),
        );
        ex.describe(facts("cam1-a-1", 1000, [200, 150, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        let d = rx.recv_timeout(WAIT).unwrap();
        assert_eq!((d.frame_id.as_str(), d.source.as_str(), d.node.as_str()), ("cam1-a-1", "template", "n1"));
        assert!(d.reason.as_deref().unwrap().starts_with("contradiction"), "{d:?}");
        assert!(d.text.starts_with("Yes, there is an anomaly in the image, at the bottom right"), "{}", d.text);
        let refused = metrics.sample(r#"anomalyd_llm_replaced_total{reason="denies_anomaly"}"#).unwrap_or(0.0) as u64;
        assert_eq!(refused, 1);

        let a2 = ex.chat("cam1-a-1", "Where exactly?").unwrap();
        assert_eq!(
            (a2.answer.as_str(), a2.source.as_str(), a2.turn),
            ("At the bottom right, near the edge.", "llm", 2)
        );
        let a3 = ex.chat("cam1-a-1", "How large is it?").unwrap();
        assert_eq!((a3.source.as_str(), a3.turn), ("llm", 3));
        // The third prompt carries the findings, both earlier turns and the new question, in order.
        let p = sync::lock(&prompts)[2].clone();
        let roles: Vec<&str> = p.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user", "assistant", "user"]);
        assert!(p[0].content.contains("bottom right") && p[0].content.contains("a steel plate"));
        assert!(p[2].content.starts_with("Yes, there is an anomaly"), "the replaced answer is what the model sees");
        assert_eq!(
            (p[3].content.as_str(), p[4].content.as_str()),
            ("Where exactly?", "At the bottom right, near the edge.")
        );
        assert_eq!(p[5].content, "How large is it?");
        let t = ex.transcript("cam1-a-1").unwrap();
        assert_eq!(t.turns.len(), 3);
        assert_eq!(ex.chat("nope", "hi"), Err(ChatError::UnknownFrame("nope".into())));
        assert_eq!(ex.chat("cam1-a-1", "  "), Err(ChatError::EmptyQuestion));
        ex.shutdown();
    }

    #[test]
    fn a_wrong_place_in_chat_is_replaced_by_the_template_reply() {
        let (ex, rx, _, metrics) = explainer(
            vec!["A scratch at the bottom right.", "It is at the top left."],
            Duration::ZERO,
            LlmConfig::default(),
        );
        ex.describe(facts("f1", 1000, [200, 150, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        assert_eq!(rx.recv_timeout(WAIT).unwrap().source, "llm");
        let a = ex.chat("f1", "Where exactly?").unwrap();
        assert_eq!(a.source, "template");
        assert_eq!(a.answer, "The region at the bottom right spans x 200 to 240 and y 150 to 180 pixels.");
        assert_eq!(metrics.sample(r#"anomalyd_llm_replaced_total{reason="wrong_place"}"#).unwrap_or(0.0) as u64, 1);
        ex.shutdown();
    }

    #[test]
    fn a_full_queue_and_a_timeout_fall_back_to_the_template_at_once() {
        let cfg = LlmConfig { queue: 1, timeout_ms: 300, ..LlmConfig::default() };
        let (ex, rx, _, metrics) = explainer(vec![], Duration::from_secs(3), cfg);
        for i in 0..5 {
            if i == 1 {
                // The worker takes the first frame; the second waits in the queue; the rest find it full.
                std::thread::sleep(Duration::from_millis(100));
            }
            ex.describe(facts(&format!("f{i}"), 1000 + i, [200, 150, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        }
        let t0 = Instant::now();
        let mut got: Vec<Description> = Vec::new();
        while got.len() < 5 {
            got.push(rx.recv_timeout(WAIT).unwrap());
        }
        assert!(t0.elapsed() < Duration::from_secs(3), "nobody waited for the slow model");
        assert!(got.iter().all(|d| d.source == "template"));
        let full = got.iter().filter(|d| d.reason.as_deref() == Some("queue_full")).count();
        let late = got.iter().filter(|d| d.reason.as_deref() == Some("timeout")).count();
        assert_eq!((full, late), (3, 2), "{got:?}");
        assert_eq!(metrics.sample(r#"anomalyd_llm_fallback_total{reason="queue_full"}"#).unwrap_or(0.0) as u64, 3);
        assert_eq!(metrics.sample(r#"anomalyd_llm_fallback_total{reason="timeout"}"#).unwrap_or(0.0) as u64, 2);
        ex.shutdown();
    }

    #[test]
    fn shutdown_gives_every_queued_frame_its_template_text() {
        let cfg = LlmConfig { queue: 4, ..LlmConfig::default() };
        let (ex, rx, _, _) = explainer(vec![], Duration::from_secs(30), cfg);
        for i in 0..4 {
            ex.describe(facts(&format!("f{i}"), 1000 + i, [200, 150, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        }
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        ex.shutdown();
        assert!(t0.elapsed() < Duration::from_secs(5), "the call in progress was cancelled");
        let got: Vec<Description> = rx.try_iter().collect();
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|d| d.reason.as_deref() == Some("shutdown")), "{got:?}");
    }

    #[test]
    fn the_previous_ng_of_the_camera_is_in_the_prompt_and_answers_the_same_place_question() {
        let ex = Explainer::start(&LlmConfig::default(), None, "n1", Arc::new(Metrics::new()), Arc::new(|_| {}), None)
            .unwrap();
        ex.describe(facts("f1", 1_000, [200, 150, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        ex.describe(facts("f2", 31_000, [205, 155, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        ex.describe(facts("f3", 32_000, [10, 10, 20, 20], Cell::TopLeft), Box::new(Vec::new));
        let a = ex.chat("f2", "Is this the same place as the last NG on this camera?").unwrap();
        assert!(a.answer.contains("frame f1, 30 seconds earlier") && a.answer.contains("same place"), "{}", a.answer);
        let a = ex.chat("f3", "Is this the same place as the last NG on this camera?").unwrap();
        assert!(a.answer.contains("frame f2") && a.answer.contains("different place"), "{}", a.answer);
        let a = ex.chat("f1", "Was it there before?").unwrap();
        assert!(a.answer.contains("first NG part on camera cam1"), "{}", a.answer);
        assert_eq!(a.source, "template");
        // After a restart, the camera's history comes from the store.
        let ex = Explainer::start(&LlmConfig::default(), None, "n1", Arc::new(Metrics::new()), Arc::new(|_| {}), None)
            .unwrap();
        ex.remember_past(&facts("f0", 500, [10, 10, 20, 20], Cell::TopLeft));
        ex.describe(facts("f4", 40_500, [12, 12, 20, 20], Cell::TopLeft), Box::new(Vec::new));
        let a = ex.chat("f4", "Same place as the previous NG?").unwrap();
        assert!(a.answer.contains("frame f0, 40 seconds earlier") && a.answer.contains("same place"), "{}", a.answer);
    }

    #[test]
    fn conversations_are_bounded_in_turns_count_and_age() {
        let cfg = LlmConfig { max_turns: 2, max_conversations: 2, ..LlmConfig::default() };
        let ex = Explainer::start(&cfg, None, "n1", Arc::new(Metrics::new()), Arc::new(|_| {}), None).unwrap();
        ex.describe(facts("f1", 1, [200, 150, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        for q in ["Where?", "How large?", "How many?"] {
            ex.chat("f1", q).unwrap();
        }
        let t = ex.transcript("f1").unwrap();
        assert_eq!(t.turns.iter().map(|t| t.question.as_str()).collect::<Vec<_>>(), ["How large?", "How many?"]);
        ex.describe(facts("f2", 2, [200, 150, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        ex.describe(facts("f3", 3, [200, 150, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        assert!(ex.transcript("f1").is_none(), "the least recently used conversation is forgotten");
        assert!(ex.transcript("f2").is_some() && ex.transcript("f3").is_some());
        let cfg = LlmConfig { conversation_ttl_s: 0, ..LlmConfig::default() };
        let ex = Explainer::start(&cfg, None, "n1", Arc::new(Metrics::new()), Arc::new(|_| {}), None).unwrap();
        ex.describe(facts("f1", 1, [200, 150, 40, 30], Cell::BottomRight), Box::new(Vec::new));
        assert!(ex.transcript("f1").is_none(), "expired");
    }
}
