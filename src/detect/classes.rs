//! Defect classes taught by an operator: a labelled region ("scratch", "stain", ...) becomes an example
//! in the product's small library, and a new defect region takes the label of the examples it is
//! nearest to (k nearest neighbours), with a confidence, or no label when it is like none of them.
//!
//! A region is described by what an inspector would tell classes apart by, measured on the frame and
//! its anomaly map, so it is the same whichever device inspected the frame:
//! - **shape**: its size (log of its share of the frame), elongation (the ratio of the axes of its
//!   pixels' spread, log) and fill (share of its box it covers);
//! - **appearance**: its mean colour against the ring around it (darker, brighter, another hue), and
//!   how much its brightness varies inside;
//! - **strength**: its peak against the mask threshold (log).
//!
//! Each is divided by a fixed unit, about the difference that tells two defects apart at a glance (40
//! grey levels of colour, a factor e of size, a quarter of the box's fill), so that no feature dominates
//! and the distance means the same for every product: there is nothing to fit on a handful of examples.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::types::findings::Region;

/// Length of a region's descriptor.
pub const DIM: usize = 8;

/// The unit of each descriptor feature (see the module text).
const UNITS: [f32; DIM] = [1.0, 0.5, 0.25, 40.0, 40.0, 40.0, 20.0, 0.5];

/// Neighbours that vote.
pub const K: usize = 3;

/// A region farther than this (in units) from every example takes no label.
pub const MAX_DISTANCE: f32 = 3.0;

/// Most examples one product's library holds.
pub const MAX_EXAMPLES: usize = 256;

/// Longest label.
pub const MAX_LABEL: usize = 40;

/// One labelled region.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub label: String,
    /// The region's descriptor, in units ([`describe`]).
    pub descriptor: Vec<f32>,
    /// The frame it was labelled on, and by whom.
    pub frame_id: String,
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClassError {
    #[error("a label is 1 to {MAX_LABEL} letters, digits, spaces, '-' or '_' (got {0:?})")]
    BadLabel(String),
    #[error("the product's library holds {MAX_EXAMPLES} labelled regions already: roll back a labelling first")]
    Full,
}

/// The label as stored: trimmed, lower case, one space between words; refused unless it is 1 to
/// [`MAX_LABEL`] letters, digits, spaces, '-' or '_'.
pub fn clean_label(label: &str) -> Result<String, ClassError> {
    let clean = label.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let ok = !clean.is_empty()
        && clean.chars().count() <= MAX_LABEL
        && clean.chars().all(|c| c.is_alphanumeric() || c == ' ' || c == '-' || c == '_');
    if ok { Ok(clean) } else { Err(ClassError::BadLabel(label.chars().take(60).collect())) }
}

/// The descriptor of `region` on the frame `img` (original size) with its anomaly `map` (encoder-input
/// size), the region's pixels being those of its box at or above `pixel_threshold` on the map.
pub fn describe(img: &RgbImage, map: &crate::detect::map::Grid, region: &Region, pixel_threshold: f32) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let [bx, by, bw, bh] = region.bbox;
    let (x1, y1) = ((bx + bw).min(w), (by + bh).min(h));
    let (bx, by) = (bx.min(x1.saturating_sub(1)), by.min(y1.saturating_sub(1)));
    let at_map = |x: u32, y: u32| {
        let mx = ((x as f32 + 0.5) * map.w as f32 / w as f32) as usize;
        let my = ((y as f32 + 0.5) * map.h as f32 / h as f32) as usize;
        map.at(mx.min(map.w - 1), my.min(map.h - 1))
    };
    let mut inside: Vec<(u32, u32)> = (by..y1)
        .flat_map(|y| (bx..x1).map(move |x| (x, y)))
        .filter(|&(x, y)| at_map(x, y) >= pixel_threshold)
        .collect();
    if inside.is_empty() {
        inside = (by..y1).flat_map(|y| (bx..x1).map(move |x| (x, y))).collect();
    }
    let n = inside.len().max(1) as f32;
    // Shape: the covariance of the pixels' positions.
    let (mx, my) = inside.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x as f32, b + y as f32));
    let (mx, my) = (mx / n, my / n);
    let (mut sxx, mut syy, mut sxy) = (0.0f32, 0.0f32, 0.0f32);
    for &(x, y) in &inside {
        let (dx, dy) = (x as f32 - mx, y as f32 - my);
        sxx += dx * dx;
        syy += dy * dy;
        sxy += dx * dy;
    }
    let (sxx, syy, sxy) = (sxx / n + 1.0 / 12.0, syy / n + 1.0 / 12.0, sxy / n);
    let tr = sxx + syy;
    let disc = ((sxx - syy).powi(2) / 4.0 + sxy * sxy).sqrt();
    let elongation = (((tr / 2.0 + disc) / (tr / 2.0 - disc).max(1e-3)).sqrt()).ln();
    let fill = inside.len() as f32 / ((x1 - bx).max(1) * (y1 - by).max(1)) as f32;
    // Appearance: the region against the ring around its box.
    let mean = |pts: &mut dyn Iterator<Item = (u32, u32)>| {
        let (mut acc, mut count) = ([0.0f32; 3], 0usize);
        for (x, y) in pts {
            let p = img.get_pixel(x, y).0;
            (0..3).for_each(|c| acc[c] += p[c] as f32);
            count += 1;
        }
        acc.map(|v| v / count.max(1) as f32)
    };
    let inner = mean(&mut inside.iter().copied());
    let pad = (bw.max(bh) / 2).max(4);
    let (rx0, ry0, rx1, ry1) = (bx.saturating_sub(pad), by.saturating_sub(pad), (x1 + pad).min(w), (y1 + pad).min(h));
    let mut ring = (ry0..ry1)
        .flat_map(|y| (rx0..rx1).map(move |x| (x, y)))
        .filter(|&(x, y)| x < bx || x >= x1 || y < by || y >= y1);
    let outer = mean(&mut ring);
    let luma = |(x, y): (u32, u32)| {
        let p = img.get_pixel(x, y).0;
        0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32
    };
    let lm = inside.iter().map(|&p| luma(p)).sum::<f32>() / n;
    let spread = (inside.iter().map(|&p| (luma(p) - lm).powi(2)).sum::<f32>() / n).sqrt();
    let strength = (region.peak.max(1e-6) / pixel_threshold.max(1e-6)).ln();
    let raw = [
        region.area_pct.max(1e-3).ln(),
        elongation,
        fill,
        inner[0] - outer[0],
        inner[1] - outer[1],
        inner[2] - outer[2],
        spread,
        strength,
    ];
    raw.iter().zip(UNITS).map(|(v, u)| v / u).collect()
}

/// The label of the examples nearest to `descriptor` and its confidence (the share of the neighbours'
/// kernel weight that votes for it); `None` with no examples, or when the nearest is farther than
/// [`MAX_DISTANCE`].
pub fn classify(library: &[Example], descriptor: &[f32]) -> Option<(String, f32)> {
    let mut near: Vec<(f32, &str)> = library
        .iter()
        .map(|e| {
            let d2: f32 = e.descriptor.iter().zip(descriptor).map(|(a, b)| (a - b).powi(2)).sum();
            (d2.sqrt(), e.label.as_str())
        })
        .collect();
    near.sort_by(|a, b| a.0.total_cmp(&b.0));
    near.truncate(K);
    if near.first()?.0 > MAX_DISTANCE {
        return None;
    }
    let weight = |d: f32| (-0.5 * d * d).exp();
    let total: f32 = near.iter().map(|&(d, _)| weight(d)).sum();
    let mut votes: Vec<(&str, f32)> = Vec::new();
    for &(d, label) in &near {
        match votes.iter_mut().find(|(l, _)| *l == label) {
            Some(v) => v.1 += weight(d),
            None => votes.push((label, weight(d))),
        }
    }
    let (label, w) = votes.into_iter().max_by(|a, b| a.1.total_cmp(&b.1))?;
    Some((label.to_string(), if total > 0.0 { w / total } else { 0.0 }))
}

/// Labels each region found on the frame `img` (its anomaly `map`, mask threshold `pixel_threshold`)
/// from the product's library; nothing without examples.
pub fn label_regions(
    library: &[Example],
    img: &RgbImage,
    map: &crate::detect::map::Grid,
    pixel_threshold: f32,
    regions: &mut [Region],
) {
    if library.is_empty() {
        return;
    }
    for r in regions {
        let d = describe(img, map, r, pixel_threshold);
        if let Some((label, confidence)) = classify(library, &d) {
            r.label = Some(label);
            r.label_confidence = Some((confidence * 1000.0).round() / 1000.0);
        }
    }
}

/// The labels a library knows, each once, in the order first taught.
pub fn known_labels(library: &[Example]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in library {
        if !out.contains(&e.label) {
            out.push(e.label.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(label: &str, d: [f32; DIM]) -> Example {
        Example { label: label.into(), descriptor: d.to_vec(), frame_id: "f".into(), by: "anna".into() }
    }

    #[test]
    fn the_nearest_examples_vote_and_a_region_unlike_all_gets_no_label() {
        let lib = [ex("scratch", [0.0; DIM]), ex("scratch", [0.2; DIM]), ex("stain", [1.5; DIM])];
        let (label, conf) = classify(&lib, &[0.1; DIM]).unwrap();
        assert_eq!(label, "scratch");
        assert!(conf > 0.9, "{conf}");
        let (label, _) = classify(&lib, &[1.4; DIM]).unwrap();
        assert_eq!(label, "stain");
        assert!(classify(&lib, &[9.0; DIM]).is_none(), "far from every example");
        assert!(classify(&[], &[0.0; DIM]).is_none());
    }

    #[test]
    fn labels_are_cleaned_or_refused() {
        assert_eq!(clean_label("  Oil   Stain ").unwrap(), "oil stain");
        assert_eq!(clean_label("burr_2").unwrap(), "burr_2");
        for bad in ["", "   ", "<script>", "a/b", &"x".repeat(41)] {
            assert!(matches!(clean_label(bad), Err(ClassError::BadLabel(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_dark_line_and_a_bright_blob_are_described_apart() {
        let mut img = RgbImage::from_pixel(100, 100, image::Rgb([120, 120, 120]));
        let mut map = crate::detect::map::Grid::new(100, 100, vec![0.0; 100 * 100]);
        for x in 10..50 {
            img.put_pixel(x, 20, image::Rgb([20, 20, 20]));
            map.data[20 * 100 + x as usize] = 2.0;
        }
        for y in 60..80 {
            for x in 60..80 {
                img.put_pixel(x, y, image::Rgb([230, 200, 60]));
                map.data[(y * 100 + x) as usize] = 2.0;
            }
        }
        let line = Region {
            bbox: [10, 20, 40, 1],
            area_pct: 0.4,
            cell: crate::types::findings::Cell::TopLeft,
            peak: 2.0,
            label: None,
            label_confidence: None,
        };
        let blob = Region { bbox: [60, 60, 20, 20], area_pct: 4.0, ..line.clone() };
        let (dl, db) = (describe(&img, &map, &line, 1.0), describe(&img, &map, &blob, 1.0));
        assert!(dl[1] > 2.0 * db[1].max(0.1), "the line is elongated: {dl:?} {db:?}");
        assert!(dl[3] < 0.0 && db[3] > 0.0, "the line is darker than around it, the blob brighter");
        let lib = [ex("scratch", dl.clone().try_into().unwrap()), ex("stain", db.clone().try_into().unwrap())];
        assert_eq!(classify(&lib, &dl).unwrap().0, "scratch");
        assert_eq!(classify(&lib, &db).unwrap().0, "stain");
    }
}
