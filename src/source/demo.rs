//! The built-in demo: a procedurally drawn machined part (brushed plate, bolt holes, a printed label),
//! its normal variants and two defective ones, so that `anomalyd run`, the tests and the benches work on
//! a fresh machine with no dataset; and the `demo` source, which delivers those parts, every
//! `defect_every`-th one defective (scratch and blob in turn), at `fps` frames per second (0 = as fast
//! as inspected). Parts are drawn once and replayed in a cycle of [`CYCLE`], so that drawing does not
//! compete with inspection for CPU, as a real camera would not.

use std::time::{Duration, Instant, SystemTime};

use image::{Rgb, RgbImage};

use super::{SourceEnd, pace};
use crate::source::intake::Intake;
use crate::util::rng::Rng;

pub const WIDTH: u32 = 320;
pub const HEIGHT: u32 = 240;

/// The name the built-in reference part is enrolled under.
pub const REFERENCE_NAME: &str = "demo-reference";

/// The built-in reference: one good part, named [`REFERENCE_NAME`].
pub fn reference() -> Vec<(String, RgbImage)> {
    vec![(REFERENCE_NAME.to_string(), part(0, Defect::None))]
}

/// A defect drawn into a demo part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    None,
    /// A dark diagonal scratch in the top-left third.
    Scratch,
    /// A bright contamination blob in the bottom-right third.
    Blob,
}

/// Draws one part; `variant` changes the brushing noise, exposure and a sub-pixel-ish shift the way
/// two good parts differ.
pub fn part(variant: u64, defect: Defect) -> RgbImage {
    let mut rng = Rng::new(variant.wrapping_mul(7919).wrapping_add(17));
    let shift = (rng.range(-2.0, 2.0), rng.range(-2.0, 2.0));
    let gain = rng.range(0.95, 1.05);
    let streaks: Vec<f32> = (0..HEIGHT).map(|_| rng.range(-10.0, 10.0)).collect();
    let holes = [(60.0, 60.0), (260.0, 60.0), (60.0, 180.0), (260.0, 180.0)];
    let mut img = RgbImage::new(WIDTH, HEIGHT);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32 - shift.0, y as f32 - shift.1);
        // Brushed steel: horizontal streaks over a soft vertical gradient.
        let mut v = 120.0 + 30.0 * (fy / HEIGHT as f32) + streaks[(fy.max(0.0) as u32).min(HEIGHT - 1) as usize];
        v += 6.0 * ((fx * 0.7).sin() * (fy * 0.05).cos());
        let mut rgb = [v, v * 1.02, v * 1.05];
        for (hx, hy) in holes {
            let d = ((fx - hx).powi(2) + (fy - hy).powi(2)).sqrt();
            if d < 14.0 {
                rgb = [25.0; 3];
            } else if d < 18.0 {
                rgb = [200.0; 3];
            }
        }
        // Printed label with three dark bars.
        if (110.0..210.0).contains(&fx) && (95.0..145.0).contains(&fy) {
            rgb = [235.0, 230.0, 215.0];
            if ((fy - 105.0) as i32).rem_euclid(12) < 4 && fx > 120.0 && fx < 200.0 {
                rgb = [40.0, 40.0, 60.0];
            }
        }
        px.0 = std::array::from_fn(|c| (rgb[c] * gain + rng.normal() * 2.0).round().clamp(0.0, 255.0) as u8);
    }
    match defect {
        Defect::None => {}
        Defect::Scratch => {
            for t in 0..60 {
                let (x, y) = (40 + t, 20 + t / 2);
                for d in 0..3 {
                    img.put_pixel(x, y + d, Rgb([30, 28, 26]));
                }
            }
        }
        Defect::Blob => {
            let (cx, cy) = (245.0f32, 200.0f32);
            for y in 185..216u32 {
                for x in 228..262u32 {
                    let r = (((x as f32 - cx) / 16.0).powi(2) + ((y as f32 - cy) / 11.0).powi(2)).sqrt();
                    if r < 1.0 {
                        img.put_pixel(x, y, Rgb([190, 150, 60]));
                    }
                }
            }
        }
    }
    img
}

/// Distinct parts before the sequence repeats.
pub const CYCLE: u64 = 24;

pub fn run(fps: f32, frames: u64, defect_every: u64, intake: Intake) -> SourceEnd {
    let mut drawn: Vec<Option<image::RgbImage>> = vec![None; CYCLE as usize];
    let period = if fps > 0.0 { Some(Duration::from_secs_f64(1.0 / fps as f64)) } else { None };
    let start = Instant::now();
    let mut n = 0u64;
    while frames == 0 || n < frames {
        if let Some(p) = period
            && !pace(start + p.mul_f64(n as f64), &intake)
        {
            return SourceEnd::Stopped;
        }
        if intake.stopping() {
            return SourceEnd::Stopped;
        }
        if period.is_none() && !intake.wants_frame() {
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
                part(k, defect)
            })
            .clone();
        intake.offer(Ok(img), SystemTime::now(), Instant::now());
    }
    SourceEnd::Eos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_vary_and_defects_are_local() {
        let (a, b) = (part(1, Defect::None), part(2, Defect::None));
        assert_ne!(a, b);
        assert_eq!(part(1, Defect::None), a);
        let s = part(1, Defect::Scratch);
        let changed: Vec<(u32, u32)> =
            a.enumerate_pixels().filter(|(x, y, p)| s.get_pixel(*x, *y) != *p).map(|(x, y, _)| (x, y)).collect();
        assert!(!changed.is_empty());
        assert!(changed.iter().all(|&(x, y)| x < WIDTH / 3 + 10 && y < HEIGHT / 3));
    }
}
