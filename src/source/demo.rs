//! The `demo` source: generated parts from [`crate::demo`], every `defect_every`-th one defective
//! (scratch and blob in turn), at `fps` frames per second (0 = as fast as inspected). Parts are drawn
//! once and replayed in a cycle of [`CYCLE`], so that drawing does not compete with inspection for CPU
//! as a real camera would not.

use std::time::{Duration, Instant, SystemTime};

use super::{SourceEnd, pace};
use crate::daemon::frame::FrameSink;
use crate::demo::{self, Defect};

/// Distinct parts before the sequence repeats.
pub const CYCLE: u64 = 24;

pub fn run(fps: f32, frames: u64, defect_every: u64, sink: FrameSink) -> SourceEnd {
    let mut drawn: Vec<Option<image::RgbImage>> = vec![None; CYCLE as usize];
    let period = if fps > 0.0 { Some(Duration::from_secs_f64(1.0 / fps as f64)) } else { None };
    let start = Instant::now();
    let mut n = 0u64;
    while frames == 0 || n < frames {
        if let Some(p) = period
            && !pace(start + p.mul_f64(n as f64), &sink)
        {
            return SourceEnd::Stopped;
        }
        if sink.stopping() {
            return SourceEnd::Stopped;
        }
        if period.is_none() && !sink.wants_frame() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        n += 1;
        let k = (n - 1) % CYCLE + 1;
        let img = drawn[(k - 1) as usize]
            .get_or_insert_with(|| {
                let defect = match (k.is_multiple_of(defect_every.max(1)), (k / defect_every.max(1)) % 2) {
                    (false, _) => Defect::None,
                    (true, 0) => Defect::Scratch,
                    (true, _) => Defect::Blob,
                };
                // Variants past 0 (the reference) so that every part differs from it as real parts do.
                demo::part(k, defect)
            })
            .clone();
        sink.offer(Ok(img), SystemTime::now(), Instant::now());
    }
    SourceEnd::Eos
}
