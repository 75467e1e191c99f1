//! Speed measurement shared by `anomalyd bench` and the criterion bench: per-stage milliseconds,
//! frames/s, p50/p99 latency and peak resident memory.

use image::RgbImage;
use serde::Serialize;

use crate::detect::{DetectError, Detector, Enrolment};

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
    let (mut pre, mut enc, mut dec) = (0.0f64, 0.0f64, 0.0f64);
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
        let per_call = |f: fn(&crate::detect::Timings) -> f32| -> f64 {
            let mut v = ins.iter().map(|i| f(&i.verdict.timings) as f64);
            if gpu { v.next().unwrap_or(0.0) } else { v.sum() }
        };
        pre += per_call(|t| t.preprocess_ms);
        enc += per_call(|t| t.encoder_ms);
        dec += per_call(|t| t.decoder_ms);
        if let Some(i) = ins.first() {
            input = format!("{}x{}", i.map.w, i.map.h);
        }
    }
    let n = calls as f64;
    Ok(BenchReport {
        frames: calls * batch,
        input,
        provider: det.encoder().provider().to_string(),
        device: det.device(),
        batch,
        preprocess_ms: pre / n,
        encoder_ms: enc / n,
        decoder_ms: dec / n,
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
        writeln!(f, "preprocess ms   {:.2}", self.preprocess_ms)?;
        writeln!(f, "encoder ms      {:.2}", self.encoder_ms)?;
        writeln!(f, "decoder ms      {:.2}", self.decoder_ms)?;
        writeln!(
            f,
            "total ms        mean {:.2}  p50 {:.2}  p99 {:.2}",
            self.total_ms_mean, self.total_ms_p50, self.total_ms_p99
        )?;
        writeln!(f, "frames/s        {:.1}", self.frames_per_s)?;
        write!(f, "peak RSS MiB    {:.0}", self.peak_rss_mib)
    }
}
