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
    for f in frames.iter().cycle().take(warmup) {
        det.inspect(enrolment, f)?;
    }
    let mut totals = Vec::with_capacity(count);
    let (mut pre, mut enc, mut dec) = (0.0f64, 0.0f64, 0.0f64);
    let start = std::time::Instant::now();
    let mut input = String::new();
    for f in frames.iter().cycle().take(count) {
        let t = std::time::Instant::now();
        let ins = det.inspect(enrolment, f)?;
        totals.push(t.elapsed().as_secs_f64() * 1e3);
        let tm = ins.verdict.timings;
        pre += tm.preprocess_ms as f64;
        enc += tm.encoder_ms as f64;
        dec += tm.decoder_ms as f64;
        input = format!("{}x{}", ins.map.w, ins.map.h);
    }
    let wall = start.elapsed().as_secs_f64();
    let n = count.max(1) as f64;
    Ok(BenchReport {
        frames: count,
        input,
        provider: det.encoder().provider().to_string(),
        preprocess_ms: pre / n,
        encoder_ms: enc / n,
        decoder_ms: dec / n,
        total_ms_mean: totals.iter().sum::<f64>() / n,
        total_ms_p50: percentile(&mut totals, 0.5),
        total_ms_p99: percentile(&mut totals, 0.99),
        frames_per_s: count as f64 / wall,
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
        writeln!(f, "frames          {} at input {} on {}", self.frames, self.input, self.provider)?;
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
