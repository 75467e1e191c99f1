//! Heat-map overlays: the anomaly map in a colour scale over the image, with region boxes.

use image::{Rgb, RgbImage};

use crate::detect::inspection::Inspection;
use crate::detect::map::Grid;

/// Colour of `t` in 0..=1 on a blue-cyan-yellow-red scale.
fn heat(t: f32) -> [f32; 3] {
    let t = t.clamp(0.0, 1.0);
    let stops = [[0.0, 0.0, 0.5], [0.0, 0.8, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]];
    let pos = t * (stops.len() - 1) as f32;
    let i = (pos.floor() as usize).min(stops.len() - 2);
    let f = pos - i as f32;
    std::array::from_fn(|c| (stops[i][c] * (1.0 - f) + stops[i + 1][c] * f) * 255.0)
}

/// Draws the map over `img` (scaled so that the mask threshold sits at the middle of the scale) and
/// outlines each region in red when the verdict is anomalous.
pub fn render(img: &RgbImage, inspection: &Inspection) -> RgbImage {
    let (w, h) = img.dimensions();
    let map: Grid = inspection.map.resize(w as usize, h as usize);
    let t = inspection.verdict.pixel_threshold.max(1e-6);
    let mut out = img.clone();
    for (x, y, px) in out.enumerate_pixels_mut() {
        let v = map.at(x as usize, y as usize) / (2.0 * t);
        let c = heat(v);
        let a = 0.25 + 0.35 * v.clamp(0.0, 1.0);
        px.0 = std::array::from_fn(|i| (px.0[i] as f32 * (1.0 - a) + c[i] * a) as u8);
    }
    for r in &inspection.verdict.regions {
        let [x, y, bw, bh] = r.bbox;
        let (x1, y1) = ((x + bw).min(w) - 1, (y + bh).min(h) - 1);
        for t in 0..2u32 {
            for xx in x..=x1 {
                out.put_pixel(xx, (y + t).min(h - 1), Rgb([255, 0, 0]));
                out.put_pixel(xx, y1.saturating_sub(t), Rgb([255, 0, 0]));
            }
            for yy in y..=y1 {
                out.put_pixel((x + t).min(w - 1), yy, Rgb([255, 0, 0]));
                out.put_pixel(x1.saturating_sub(t), yy, Rgb([255, 0, 0]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_scale_runs_blue_to_red() {
        let (lo, hi) = (heat(0.0), heat(1.0));
        assert!(lo[2] > lo[0] && hi[0] > hi[2]);
        assert_eq!(heat(2.0), hi);
    }
}
