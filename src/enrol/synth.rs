//! Simulated anomalies and nuisance views of normal images, for the automatic threshold.
//!
//! As in AnomalyGPT's data generation, a defect is made by pasting something foreign into a normal
//! image with a known mask: a patch from another normal image (or another place of the same one)
//! resized and blended softly with its mean matched to the destination (an NSA-style stand-in for
//! Poisson blending); a hard cut-paste; and a Perlin-noise shaped texture defect (DRAEM). Nuisance
//! views (small shifts, exposure and noise) stand in for the variation of normal parts.

use image::{GrayImage, Luma, Rgb, RgbImage};

use crate::detect::map::reflect;
use crate::util::rng::Rng;

/// The kinds of simulated anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A patch of another normal image, resized and soft-blended (NSA).
    ForeignPatch,
    /// A rectangle of the same image pasted elsewhere with hard edges and a colour change.
    CutPaste,
    /// A Perlin-noise shaped blob filled with a transformed copy of the image.
    PerlinTexture,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::ForeignPatch, Kind::CutPaste, Kind::PerlinTexture];
}

/// A normal-looking variant: shift by up to `max_shift` of the size, exposure and contrast by up to
/// 8%, and sensor noise. The strip a shift uncovers mirrors the image's own content next to it: a
/// replicated edge pixel would paint a band of flat stripes, which on a textured part is itself an
/// anomaly, and it raised the normal evidence of streaked tiles (docs/RESULTS.md).
pub fn nuisance(img: &RgbImage, rng: &mut Rng, max_shift: f32) -> RgbImage {
    let (w, h) = img.dimensions();
    let dx = rng.range(-max_shift, max_shift) * w as f32;
    let dy = rng.range(-max_shift, max_shift) * h as f32;
    let gain = rng.range(0.92, 1.08);
    let contrast = rng.range(0.92, 1.08);
    let noise = rng.range(0.5, 2.5);
    let mean = mean_rgb(img);
    let mut out = RgbImage::new(w, h);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let sx = reflect((x as f32 - dx).round() as isize, w as usize) as u32;
        let sy = reflect((y as f32 - dy).round() as isize, h as usize) as u32;
        let s = img.get_pixel(sx, sy).0;
        let n = rng.normal() * noise;
        *px = Rgb(std::array::from_fn(|c| {
            let v = ((s[c] as f32 - mean[c]) * contrast + mean[c]) * gain + n;
            v.round().clamp(0.0, 255.0) as u8
        }));
    }
    out
}

/// Makes one simulated anomaly in `target`, taking foreign material from `donor` (another normal
/// image of the same size, or `target` itself). Returns the image and its defect mask (255 = defect).
pub fn anomaly(target: &RgbImage, donor: &RgbImage, kind: Kind, rng: &mut Rng) -> (RgbImage, GrayImage) {
    match kind {
        Kind::ForeignPatch => foreign_patch(target, donor, rng),
        Kind::CutPaste => cut_paste(target, rng),
        Kind::PerlinTexture => perlin_texture(target, rng),
    }
}

fn foreign_patch(target: &RgbImage, donor: &RgbImage, rng: &mut Rng) -> (RgbImage, GrayImage) {
    let (w, h) = target.dimensions();
    // Patch 8-25% of each side, taken at a random place of the donor, rescaled 0.75-1.33x.
    let pw = ((rng.range(0.08, 0.25) * w as f32) as u32).max(4);
    let ph = ((rng.range(0.08, 0.25) * h as f32) as u32).max(4);
    let (dw, dh) = donor.dimensions();
    let (sw, sh) = (pw.min(dw), ph.min(dh));
    let sx = rng.below(dw - sw + 1);
    let sy = rng.below(dh - sh + 1);
    let scale = rng.range(0.75, 1.33);
    let (tw, th) = (((sw as f32 * scale) as u32).clamp(4, w / 2), ((sh as f32 * scale) as u32).clamp(4, h / 2));
    let patch = image::imageops::crop_imm(donor, sx, sy, sw, sh).to_image();
    let mut patch = crate::util::imageio::resize(&patch, tw, th);
    if rng.below(2) == 1 {
        patch = image::imageops::flip_horizontal(&patch);
    }
    let tx = rng.below(w - tw + 1);
    let ty = rng.below(h - th + 1);
    // Half the time, match the patch's mean to the destination (gradient-domain look of Poisson blending).
    if rng.below(2) == 1 {
        let dest = image::imageops::crop_imm(target, tx, ty, tw, th).to_image();
        let (pm, dm) = (mean_rgb(&patch), mean_rgb(&dest));
        for px in patch.pixels_mut() {
            px.0 = std::array::from_fn(|c| (px.0[c] as f32 - pm[c] + dm[c]).round().clamp(0.0, 255.0) as u8);
        }
    }
    // Soft alpha: 1 inside, falling to 0 over the outer 25% of an ellipse.
    blend(
        target,
        tx,
        ty,
        tw,
        th,
        |x, y| {
            let nx = (x as f32 + 0.5) / tw as f32 * 2.0 - 1.0;
            let ny = (y as f32 + 0.5) / th as f32 * 2.0 - 1.0;
            let r = (nx * nx + ny * ny).sqrt();
            ((1.0 - r) / 0.25).clamp(0.0, 1.0)
        },
        |x, y| patch.get_pixel(x, y).0,
    )
}

fn cut_paste(target: &RgbImage, rng: &mut Rng) -> (RgbImage, GrayImage) {
    let (w, h) = target.dimensions();
    let pw = ((rng.range(0.06, 0.2) * w as f32) as u32).max(4);
    let ph = ((rng.range(0.06, 0.2) * h as f32) as u32).max(4);
    let (sx, sy) = (rng.below(w - pw + 1), rng.below(h - ph + 1));
    let (tx, ty) = (rng.below(w - pw + 1), rng.below(h - ph + 1));
    let gain: [f32; 3] = std::array::from_fn(|_| rng.range(0.75, 1.25));
    let offset = rng.range(-25.0, 25.0);
    blend(
        target,
        tx,
        ty,
        pw,
        ph,
        |_, _| 1.0,
        |x, y| {
            let s = target.get_pixel(sx + x, sy + y).0;
            std::array::from_fn(|c| (s[c] as f32 * gain[c] + offset).round().clamp(0.0, 255.0) as u8)
        },
    )
}

fn perlin_texture(target: &RgbImage, rng: &mut Rng) -> (RgbImage, GrayImage) {
    let (w, h) = target.dimensions();
    // Foreign texture: the image rotated 180 degrees, shifted and with its exposure changed.
    let rotated = image::imageops::rotate180(target);
    let (ox, oy) = (rng.below(w), rng.below(h));
    let gain = if rng.below(2) == 1 { rng.range(0.4, 0.75) } else { rng.range(1.3, 1.8) };
    let opacity = rng.range(0.5, 1.0);
    // Perlin blob: noise at a random scale, kept inside a random ellipse so the defect is local.
    let cells = 2.0f32.powi(rng.below(3) as i32 + 2);
    let noise = Perlin::new(rng.next_u64());
    let (cx, cy) = (rng.range(0.15, 0.85) * w as f32, rng.range(0.15, 0.85) * h as f32);
    let (rx, ry) = (rng.range(0.06, 0.2) * w as f32, rng.range(0.06, 0.2) * h as f32);
    let (x0, y0) = ((cx - rx).max(0.0) as u32, (cy - ry).max(0.0) as u32);
    let (x1, y1) = (((cx + rx) as u32).min(w - 1), ((cy + ry) as u32).min(h - 1));
    let (bw, bh) = ((x1 - x0 + 1).max(1), (y1 - y0 + 1).max(1));
    blend(
        target,
        x0,
        y0,
        bw,
        bh,
        |x, y| {
            let (gx, gy) = ((x + x0) as f32, (y + y0) as f32);
            let e = ((gx - cx) / rx).powi(2) + ((gy - cy) / ry).powi(2);
            let window = (1.0 - e).clamp(0.0, 1.0);
            let n = noise.at(gx / w as f32 * cells, gy / h as f32 * cells);
            if n * window > 0.02 { opacity } else { 0.0 }
        },
        |x, y| {
            let s = rotated.get_pixel((x + x0 + ox) % w, (y + y0 + oy) % h).0;
            std::array::from_fn(|c| (s[c] as f32 * gain).round().clamp(0.0, 255.0) as u8)
        },
    )
}

/// Blends `source(x, y)` into `target` over the box at `(tx, ty)` with `alpha(x, y)`; the mask marks
/// pixels whose alpha reaches 0.5.
fn blend(
    target: &RgbImage,
    tx: u32,
    ty: u32,
    bw: u32,
    bh: u32,
    alpha: impl Fn(u32, u32) -> f32,
    source: impl Fn(u32, u32) -> [u8; 3],
) -> (RgbImage, GrayImage) {
    let mut out = target.clone();
    let mut mask = GrayImage::new(target.width(), target.height());
    for y in 0..bh.min(target.height() - ty) {
        for x in 0..bw.min(target.width() - tx) {
            let a = alpha(x, y);
            if a <= 0.0 {
                continue;
            }
            let s = source(x, y);
            let d = out.get_pixel_mut(tx + x, ty + y);
            d.0 = std::array::from_fn(|c| (d.0[c] as f32 * (1.0 - a) + s[c] as f32 * a).round() as u8);
            if a >= 0.5 {
                mask.put_pixel(tx + x, ty + y, Luma([255]));
            }
        }
    }
    (out, mask)
}

fn mean_rgb(img: &RgbImage) -> [f32; 3] {
    let mut s = [0.0f64; 3];
    for px in img.pixels() {
        for (acc, v) in s.iter_mut().zip(px.0) {
            *acc += v as f64;
        }
    }
    let n = (img.width() as f64 * img.height() as f64).max(1.0);
    std::array::from_fn(|c| (s[c] / n) as f32)
}

/// Classic 2D gradient noise with a seeded permutation; values roughly in [-0.7, 0.7].
struct Perlin {
    perm: [u8; 512],
}

impl Perlin {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut p: Vec<u8> = (0..=255).collect();
        for i in (1..256).rev() {
            p.swap(i, rng.below(i as u32 + 1) as usize);
        }
        Self { perm: std::array::from_fn(|i| p[i % 256]) }
    }

    fn at(&self, x: f32, y: f32) -> f32 {
        let fade = |t: f32| t * t * t * (t * (t * 6.0 - 15.0) + 10.0);
        let (xi, yi) = (x.floor() as i32 & 255, y.floor() as i32 & 255);
        let (xf, yf) = (x - x.floor(), y - y.floor());
        let grad = |h: u8, x: f32, y: f32| match h & 3 {
            0 => x + y,
            1 => -x + y,
            2 => x - y,
            _ => -x - y,
        };
        let p = |i: i32| self.perm[i as usize & 511] as i32;
        let aa = p(p(xi) + yi) as u8;
        let ab = p(p(xi) + yi + 1) as u8;
        let ba = p(p(xi + 1) + yi) as u8;
        let bb = p(p(xi + 1) + yi + 1) as u8;
        let (u, v) = (fade(xf), fade(yf));
        let lerp = |a: f32, b: f32, t: f32| a + t * (b - a);
        lerp(
            lerp(grad(aa, xf, yf), grad(ba, xf - 1.0, yf), u),
            lerp(grad(ab, xf, yf - 1.0), grad(bb, xf - 1.0, yf - 1.0), u),
            v,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn textured(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([((x * 7 + y * 3) % 200) as u8 + 20, (y % 50) as u8 + 100, 90]))
    }

    #[test]
    fn every_kind_changes_pixels_inside_its_mask_only() {
        let img = textured(128, 96);
        let mut rng = Rng::new(7);
        for kind in Kind::ALL {
            for _ in 0..10 {
                let (out, mask) = anomaly(&img, &img, kind, &mut rng);
                let masked = mask.pixels().filter(|p| p.0[0] > 0).count();
                assert!(masked > 0, "{kind:?} made an empty mask");
                assert!(masked < 128 * 96 / 2, "{kind:?} covered {masked} px");
                // Far from any masked pixel (alpha < 0.5 can still touch neighbours), nothing changes.
                for (x, y, p) in out.enumerate_pixels() {
                    let near = (x.saturating_sub(40)..(x + 40).min(128))
                        .any(|xx| (y.saturating_sub(40)..(y + 40).min(96)).any(|yy| mask.get_pixel(xx, yy).0[0] > 0));
                    if !near {
                        assert_eq!(p, img.get_pixel(x, y), "{kind:?} changed ({x},{y}) far from its mask");
                    }
                }
            }
        }
    }

    #[test]
    fn nuisance_views_stay_close_to_the_original() {
        let img = textured(64, 64);
        let v = nuisance(&img, &mut Rng::new(1), 0.03);
        let diff: f64 = img.as_raw().iter().zip(v.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>()
            / img.as_raw().len() as f64;
        assert!(diff < 40.0, "mean abs diff {diff}");
        assert_ne!(v, img);
    }

    #[test]
    fn a_shifted_view_mirrors_the_strip_it_uncovers() {
        // Neighbouring columns (and rows) of these stripes always differ by 37 grey levels or more. A
        // replicated edge pixel would show as a band of equal neighbours; a mirrored edge shows one
        // equal pair at most, at the seam.
        let (w, h) = (64u32, 48u32);
        let img = RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 37 % 97 + y * 53 % 89) as u8;
            Rgb([v, v, v])
        });
        for seed in 0..8 {
            let view = nuisance(&img, &mut Rng::new(seed), 0.2);
            let mean = |pixels: Vec<(u32, u32)>| {
                pixels.iter().map(|&(x, y)| view.get_pixel(x, y).0[0] as f32).sum::<f32>() / pixels.len() as f32
            };
            let cols: Vec<f32> = (0..w).map(|x| mean((0..h).map(|y| (x, y)).collect())).collect();
            let rows: Vec<f32> = (0..h).map(|y| mean((0..w).map(|x| (x, y)).collect())).collect();
            let flat = |m: &[f32]| m.windows(2).filter(|p| (p[0] - p[1]).abs() < 8.0).count();
            assert!(
                flat(&cols) <= 1 && flat(&rows) <= 1,
                "seed {seed}: {} flat column pairs, {} flat row pairs",
                flat(&cols),
                flat(&rows)
            );
        }
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        for _ in 0..1000 {
            let x = a.range(2.0, 5.0);
            assert_eq!(x, b.range(2.0, 5.0));
            assert!((2.0..5.0).contains(&x));
            assert!(a.below(7) < 7 && b.below(7) < 7);
        }
    }
}
