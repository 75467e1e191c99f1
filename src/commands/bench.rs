//! Speed measurement shared by `anomalyd bench` and the criterion bench: per-stage milliseconds,
//! frames/s, p50/p99 latency and peak resident memory.

use image::RgbImage;
use serde::Serialize;

use crate::detect::detector::Detector;
use crate::detect::enrolment::Enrolment;
use crate::detect::inspection::DetectError;

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub frames: usize,
    pub input: String,
    pub provider: String,
    /// Where inspection ran (`cpu (onnxruntime cpu)`, `cuda:0 NVIDIA H200`).
    pub device: String,
    /// Frames per inspection call; the stage and total figures are per call.
    pub batch: usize,
    pub preprocess_ms: f64,
    pub encoder_ms: f64,
    pub decoder_ms: f64,
    /// p50 and p99 of each stage per call (preprocess, encoder, decoder): where the tail comes from.
    pub stage_ms_p50: [f64; 3],
    pub stage_ms_p99: [f64; 3],
    pub total_ms_mean: f64,
    pub total_ms_p50: f64,
    pub total_ms_p99: f64,
    pub frames_per_s: f64,
    pub peak_rss_mib: f64,
}

/// Inspects `frames` in turn (cycling), after `warmup` untimed inspections.
pub fn run(
    det: &mut Detector,
    enrolment: &Enrolment,
    frames: &[RgbImage],
    count: usize,
    warmup: usize,
) -> Result<BenchReport, DetectError> {
    run_batched(det, enrolment, frames, count, warmup, 1)
}

/// [`run`] with `batch` frames per inspection call: latency is per call, frames/s over all frames.
pub fn run_batched(
    det: &mut Detector,
    enrolment: &Enrolment,
    frames: &[RgbImage],
    count: usize,
    warmup: usize,
    batch: usize,
) -> Result<BenchReport, DetectError> {
    let batch = batch.max(1);
    let mut cycle = frames.iter().cycle();
    let mut next_batch = || -> Vec<RgbImage> { cycle.by_ref().take(batch).cloned().collect() };
    for _ in 0..warmup.div_ceil(batch) {
        det.inspect_batch(enrolment, &next_batch())?;
    }
    let calls = count.div_ceil(batch).max(1);
    let mut totals = Vec::with_capacity(calls);
    let mut stages: [Vec<f64>; 3] = Default::default();
    let mut input = String::new();
    let mut wall = 0.0f64;
    for _ in 0..calls {
        let imgs = next_batch();
        let t = std::time::Instant::now();
        let ins = det.inspect_batch(enrolment, &imgs)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        wall += ms / 1e3;
        totals.push(ms);
        // GPU timings are per batch (every frame carries them); CPU ones are per frame.
        let gpu = det.on_gpu();
        let per_call = |f: fn(&crate::detect::inspection::Timings) -> f32| -> f64 {
            let mut v = ins.iter().map(|i| f(&i.verdict.timings) as f64);
            if gpu { v.next().unwrap_or(0.0) } else { v.sum() }
        };
        stages[0].push(per_call(|t| t.preprocess_ms));
        stages[1].push(per_call(|t| t.encoder_ms));
        stages[2].push(per_call(|t| t.decoder_ms));
        if let Some(i) = ins.first() {
            input = format!("{}x{}", i.map.w, i.map.h);
        }
    }
    let n = calls as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let (pre, enc, dec) = (mean(&stages[0]), mean(&stages[1]), mean(&stages[2]));
    let quantile = |q: f64| stages.clone().map(|mut v| percentile(&mut v, q));
    Ok(BenchReport {
        frames: calls * batch,
        input,
        provider: det.encoder().provider().to_string(),
        device: det.device(),
        batch,
        preprocess_ms: pre,
        encoder_ms: enc,
        decoder_ms: dec,
        stage_ms_p50: quantile(0.5),
        stage_ms_p99: quantile(0.99),
        total_ms_mean: totals.iter().sum::<f64>() / n,
        total_ms_p50: percentile(&mut totals, 0.5),
        total_ms_p99: percentile(&mut totals, 0.99),
        frames_per_s: (calls * batch) as f64 / wall,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Peak resident set size of this process (VmHWM), in MiB; NaN where /proc is absent.
pub fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM:")
}

/// Current resident set size of this process (VmRSS), in MiB; NaN where /proc is absent.
pub fn rss_mib() -> f64 {
    proc_status_mib("VmRSS:")
}

/// A kB field of /proc/self/status, in MiB.
fn proc_status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The `q` quantile (nearest rank) of `v`, which it sorts; NaN when empty.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN)
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "frames          {} at input {} on {}, batch {}",
            self.frames, self.input, self.device, self.batch
        )?;
        let stage = |f: &mut std::fmt::Formatter<'_>, name: &str, mean: f64, i: usize| {
            writeln!(f, "{name:<16}{mean:.2}  (p50 {:.2}  p99 {:.2})", self.stage_ms_p50[i], self.stage_ms_p99[i])
        };
        stage(f, "preprocess ms", self.preprocess_ms, 0)?;
        stage(f, "encoder ms", self.encoder_ms, 1)?;
        stage(f, "decoder ms", self.decoder_ms, 2)?;
        writeln!(
            f,
            "total ms        mean {:.2}  p50 {:.2}  p99 {:.2}",
            self.total_ms_mean, self.total_ms_p50, self.total_ms_p99
        )?;
        writeln!(f, "frames/s        {:.1}", self.frames_per_s)?;
        write!(f, "peak RSS MiB    {:.0}", self.peak_rss_mib)
    }
}

/// `anomalyd bench --llm`: the language model's cost, and proof that it leaves the frame path alone.
#[derive(Debug, Clone, Serialize)]
pub struct LlmReport {
    pub model: String,
    pub threads: usize,
    pub load_ms: f64,
    /// One description of an NG demo frame, called directly: prompt read, first token, generation.
    pub prompt_tokens: u32,
    pub first_token_ms: f64,
    pub answer_tokens: u32,
    pub tokens_per_s: f64,
    /// From handing an NG verdict to the explainer to its description (queue, call, check).
    pub first_answer_ms: f64,
    pub description: String,
    /// Two follow-up questions in the same conversation (the prompt prefix is reused).
    pub follow_up_ms: Vec<f64>,
    /// Frames inspected per phase, a third of them NG.
    pub frames: usize,
    /// Frame-path frames/s without the model, and with it busy describing every NG frame (the mean
    /// of two runs each, alternated).
    pub fps_without: f64,
    pub fps_with: f64,
    pub fps_change_pct: f64,
    /// During the busy runs: NG frames handed to the explainer, descriptions the model wrote, and NG
    /// frames that found its queue full (they got the template text at once).
    pub ng_frames: u64,
    pub described_by_model: u64,
    pub queue_full: u64,
    pub peak_rss_mib: f64,
}

/// Measures the `[llm]` backend on the built-in demo part; needs a model (local or remote).
/// Why `bench --llm` could not measure.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("no language model to measure: fetch one with `python3 scripts/fetch_llm.py` or set llm.url")]
    NoModel,
    #[error("the defective demo part was not flagged; nothing to describe")]
    NotFlagged,
    #[error("no description within {0} ms")]
    NoDescription(u128),
    #[error("the frame-path thread panicked")]
    Panicked,
    #[error(transparent)]
    Llm(#[from] crate::describe::llm::LlmError),
    #[error(transparent)]
    Detect(#[from] crate::detect::inspection::DetectError),
    #[error(transparent)]
    Chat(#[from] crate::describe::explainer::ChatError),
    #[error("cannot start the explainer: {0}")]
    Io(#[from] std::io::Error),
}

pub fn llm(cfg: &crate::config::Config, frames: usize, seconds: f64) -> Result<LlmReport, BenchError> {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::describe::template::{self, Message};

    use crate::describe::explainer::{DESCRIBE_QUESTION, Description, Explainer, FrameFacts};
    use crate::types::findings::Findings;

    let t0 = Instant::now();
    let engine = crate::describe::llm::open(&cfg.llm)?.ok_or(BenchError::NoModel)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut det = Detector::load(&cfg.engine)?;
    let refs = crate::source::demo::reference();
    let e = det.enroll(&refs, &cfg.detect, &mut |m: &str| tracing::info!("{m}"))?;
    // Like the demo camera: every third part defective, scratches and blobs in turn.
    let stream: Vec<RgbImage> = (0..12u64)
        .map(|i| {
            let defect = match (i % 3, (i / 3) % 2) {
                (2, 0) => crate::source::demo::Defect::Scratch,
                (2, _) => crate::source::demo::Defect::Blob,
                _ => crate::source::demo::Defect::None,
            };
            crate::source::demo::part(i + 1, defect)
        })
        .collect();
    let ng_img = crate::source::demo::part(2, crate::source::demo::Defect::Scratch);
    let ins = det.inspect(&e, &ng_img)?;
    let v = &ins.verdict;
    let findings = Findings {
        anomalous: v.anomalous,
        score: v.score,
        threshold: v.threshold,
        regions: v.regions.clone(),
        product: cfg
            .camera
            .first()
            .and_then(|c| c.product.clone())
            .or_else(|| crate::config::daemon::CameraConfig::demo().product),
        classes: Vec::new(),
    };
    if !v.anomalous {
        return Err(BenchError::NotFlagged);
    }

    // One call, straight to the model.
    let options = |secs: u64| crate::describe::llm::GenOptions {
        max_tokens: cfg.llm.max_tokens,
        temperature: cfg.llm.temperature,
        seed: cfg.llm.seed,
        deadline: Instant::now() + Duration::from_secs(secs),
        cancel: None,
        pieces: None,
    };
    let msgs =
        vec![template::prompt(&findings, None), Message { role: "user".into(), content: DESCRIBE_QUESTION.into() }];
    let c = {
        let mut session = engine.session()?;
        session.complete(&msgs, &[], &options(cfg.llm.timeout_ms / 1000 + 1))?
    };

    // The explainer, as the daemon runs it.
    let (tx, rx) = crossbeam_channel::unbounded::<Description>();
    let publish: crate::describe::explainer::Publish = Arc::new(move |d| {
        let _ = tx.send(d);
    });
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let ex = Explainer::start(&cfg.llm, Some(engine.clone()), "bench", metrics.clone(), publish, None)?;
    let facts = |id: String| FrameFacts {
        frame_id: id,
        camera: "bench".into(),
        captured_unix_ms: crate::types::verdict::unix_ms(std::time::SystemTime::now()),
        findings: findings.clone(),
    };
    ex.describe(facts("bench-ng-0".into()), Box::new(Vec::new));
    let wait = Duration::from_millis(cfg.llm.timeout_ms) + Duration::from_secs(10);
    let d = rx.recv_timeout(wait).map_err(|_| BenchError::NoDescription(wait.as_millis()))?;
    let mut follow_up_ms = Vec::new();
    for q in ["Where exactly is it?", "How large is it?"] {
        let a = ex.chat("bench-ng-0", q)?;
        follow_up_ms.push(a.latency_ms as f64);
    }

    // The frame path with and without the model busy on every NG frame, at inspection priority.
    let run = |det: &mut Detector, busy: bool, n: &mut u64| -> Result<f64, BenchError> {
        let start = Instant::now();
        let mut done = 0usize;
        while done < frames || start.elapsed().as_secs_f64() < seconds {
            let img = &stream[done % stream.len()];
            let ins = det.inspect(&e, img)?;
            if busy && ins.verdict.anomalous {
                *n += 1;
                ex.describe(facts(format!("bench-{n}")), Box::new(Vec::new));
            }
            done += 1;
        }
        Ok(done as f64 / start.elapsed().as_secs_f64())
    };
    let mut fps = (Vec::new(), Vec::new());
    let mut n = 0u64;
    let count = |series: &str| metrics.sample(series).unwrap_or(0.0) as u64;
    let (described, full) =
        (r#"anomalyd_llm_descriptions_total{kind="llm"}"#, r#"anomalyd_llm_fallback_total{reason="queue_full"}"#);
    let (described_before, full_before) = (count(described), count(full));
    std::thread::scope(|s| -> Result<(), BenchError> {
        s.spawn(|| -> Result<(), BenchError> {
            crate::util::priority::yield_to_io();
            for busy in [false, true, false, true] {
                let f = run(&mut det, busy, &mut n)?;
                if busy {
                    fps.1.push(f)
                } else {
                    fps.0.push(f)
                };
                // Let the queue drain between runs, so each busy run starts alike.
                while busy && metrics.llm_queued() > 0 {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(())
        })
        .join()
        .map_err(|_| BenchError::Panicked)?
    })?;
    let described_by_model = count(described) - described_before;
    let queue_full = count(full) - full_before;
    ex.shutdown();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (fps_without, fps_with) = (mean(&fps.0), mean(&fps.1));
    Ok(LlmReport {
        model: engine.name(),
        threads: cfg.llm.threads,
        load_ms,
        prompt_tokens: c.prompt_tokens,
        first_token_ms: c.first_token_ms as f64,
        answer_tokens: c.tokens,
        tokens_per_s: c.tokens_per_s() as f64,
        first_answer_ms: d.latency_ms as f64,
        description: d.text,
        follow_up_ms,
        frames,
        fps_without,
        fps_with,
        fps_change_pct: 100.0 * (fps_with - fps_without) / fps_without,
        ng_frames: n,
        described_by_model,
        queue_full,
        peak_rss_mib: peak_rss_mib(),
    })
}

impl std::fmt::Display for LlmReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "model            {} ({} thread(s))", self.model, self.threads)?;
        writeln!(f, "load ms          {:.0}", self.load_ms)?;
        writeln!(
            f,
            "one description  {} prompt tokens, first token {:.0} ms, {} tokens at {:.1} tok/s",
            self.prompt_tokens, self.first_token_ms, self.answer_tokens, self.tokens_per_s
        )?;
        writeln!(f, "first answer ms  {:.0} (NG verdict to checked description)", self.first_answer_ms)?;
        let fu: Vec<String> = self.follow_up_ms.iter().map(|m| format!("{m:.0}")).collect();
        writeln!(f, "follow-ups ms    {}", fu.join(", "))?;
        writeln!(f, "description      {}", self.description)?;
        writeln!(
            f,
            "frame path fps   {:.2} without the model, {:.2} with it busy on every NG ({:+.1}%)",
            self.fps_without, self.fps_with, self.fps_change_pct
        )?;
        writeln!(
            f,
            "while busy       {} NG frames: {} described by the model, {} found the queue full (template text)",
            self.ng_frames, self.described_by_model, self.queue_full
        )?;
        write!(f, "peak RSS MiB     {:.0}", self.peak_rss_mib)
    }
}
