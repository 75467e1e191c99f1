//! The plain-backdrop model: a product shot on a plain background is only inspected where the
//! product is, so dust on the backdrop is never a defect.

use image::RgbImage;

use crate::detect::map::quantile;

/// The plain-background model of a reference: the median border colour, and a tolerance half-way to
/// the typical foreground distance (at least 25 grey levels).
pub fn background(img: &RgbImage) -> crate::detect::enrolment::Background {
    let (w, h) = img.dimensions();
    let mut border: Vec<[u8; 3]> = Vec::new();
    for x in 0..w {
        border.push(img.get_pixel(x, 0).0);
        border.push(img.get_pixel(x, h - 1).0);
    }
    for y in 0..h {
        border.push(img.get_pixel(0, y).0);
        border.push(img.get_pixel(w - 1, y).0);
    }
    let rgb: [f32; 3] = std::array::from_fn(|c| {
        let mut v: Vec<f32> = border.iter().map(|p| p[c] as f32).collect();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    });
    let dist: Vec<f32> = img.pixels().map(|p| colour_distance(p.0, rgb)).collect();
    let tolerance = (0.5 * quantile(&dist, 0.75)).max(25.0);
    crate::detect::enrolment::Background { rgb, tolerance }
}

/// The background model of a shot whose border is plain: at least 90% of its border pixels lie within
/// the tolerance of the median border colour and the object covers 5-90% of the frame. `None` otherwise.
pub fn plain_background(img: &RgbImage) -> Option<crate::detect::enrolment::Background> {
    let bg = background(img);
    let (w, h) = img.dimensions();
    let border = (0..w).flat_map(|x| [(x, 0), (x, h - 1)]).chain((0..h).flat_map(|y| [(0, y), (w - 1, y)]));
    let (mut plain, mut total) = (0usize, 0usize);
    for (x, y) in border {
        total += 1;
        if colour_distance(img.get_pixel(x, y).0, bg.rgb) <= bg.tolerance {
            plain += 1;
        }
    }
    let fg = foreground(img, &bg);
    let share = fg.iter().filter(|&&f| f).count() as f32 / fg.len().max(1) as f32;
    (plain as f32 >= 0.9 * total as f32 && (0.05..=0.9).contains(&share)).then_some(bg)
}

/// Per-pixel foreground flags of `img` under a background model.
pub fn foreground(img: &RgbImage, bg: &crate::detect::enrolment::Background) -> Vec<bool> {
    img.pixels().map(|p| colour_distance(p.0, bg.rgb) > bg.tolerance).collect()
}

fn colour_distance(p: [u8; 3], c: [f32; 3]) -> f32 {
    (0..3).map(|i| (p[i] as f32 - c[i]).powi(2)).sum::<f32>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_of_dark_frame_is_dark_and_object_is_foreground() {
        let img = RgbImage::from_fn(40, 40, |x, y| {
            if (10..30).contains(&x) && (10..30).contains(&y) {
                image::Rgb([200, 180, 50])
            } else {
                image::Rgb([5, 5, 5])
            }
        });
        let bg = background(&img);
        assert!(bg.rgb.iter().all(|v| *v < 10.0));
        let fg = foreground(&img, &bg);
        assert!(fg[20 * 40 + 20] && !fg[0]);
        assert!(plain_background(&img).is_some());
        // A frame filled edge to edge with texture has no plain background.
        let tex = RgbImage::from_fn(40, 40, |x, y| image::Rgb([((x * 37 + y * 91) % 256) as u8, 90, 40]));
        assert!(plain_background(&tex).is_none());
    }
}
