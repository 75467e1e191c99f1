//! Regions an operator drew on the product: areas to **ignore** (a label printed differently on every
//! part, a clamp of the fixture, a known harmless mark) and areas to **inspect** (only there).
//!
//! A zone is a polygon in fractions of the frame (x of its width, y of its height), so it holds for
//! every image of the product whatever size the encoder sees it at. Zones act on the decoder's patch
//! grids, before the image score and the map: a cell that is not inspected scores 0, exactly as the
//! plain background does. A cell is inspected when its centre lies inside an inspect zone (or there is
//! none) and no closer than one cell to an ignore zone: a defect's features spread about one cell
//! past its edge (the 3 x 3 pooling), so an ignore zone drawn around a mark keeps its whole mark out.
//! The CPU and the GPU apply the same cell flags ([`cell_mask`]).

use serde::{Deserialize, Serialize};

use crate::detect::map::Grid;

/// Most zones one enrolment holds.
pub const MAX_ZONES: usize = 32;
/// Most corners of one zone.
pub const MAX_POINTS: usize = 64;
/// Smallest zone, as a share of the frame (a zone smaller than this is a slip of the finger).
pub const MIN_AREA: f32 = 1e-4;

/// What a zone does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ZoneKind {
    /// Nothing inside is ever a defect.
    Ignore,
    /// Only what lies inside inspect zones is inspected.
    Inspect,
}

/// One polygon, its corners in fractions of the frame's width and height (0 to 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub kind: ZoneKind,
    pub points: Vec<[f32; 2]>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ZoneError {
    #[error("{0} zones given; at most {MAX_ZONES}")]
    TooMany(usize),
    #[error("zone {zone} has {n} corners; a zone needs 3 to {MAX_POINTS}")]
    Corners { zone: usize, n: usize },
    #[error(
        "zone {zone}, corner {corner} ({x}, {y}) lies outside the image: corners are fractions of the width and \
         height, from 0 to 1"
    )]
    Outside { zone: usize, corner: usize, x: f32, y: f32 },
    #[error("zone {zone} encloses no area (its corners lie on a line, or it covers under 0.01% of the frame)")]
    NoArea { zone: usize },
    #[error("the zones leave nothing of the frame to inspect")]
    NothingInspected,
}

/// Checks zones as given by a user: counts, corners inside the image, an area, and something left to
/// inspect.
pub fn check(zones: &[Zone]) -> Result<(), ZoneError> {
    if zones.len() > MAX_ZONES {
        return Err(ZoneError::TooMany(zones.len()));
    }
    for (zone, z) in zones.iter().enumerate() {
        if !(3..=MAX_POINTS).contains(&z.points.len()) {
            return Err(ZoneError::Corners { zone, n: z.points.len() });
        }
        for (corner, &[x, y]) in z.points.iter().enumerate() {
            if !(0.0..=1.0).contains(&x) || !(0.0..=1.0).contains(&y) {
                return Err(ZoneError::Outside { zone, corner, x, y });
            }
        }
        if area(&z.points) < MIN_AREA {
            return Err(ZoneError::NoArea { zone });
        }
    }
    if cell_mask(zones, 64, 64).is_some_and(|m| m.iter().all(|&k| k == 0)) {
        return Err(ZoneError::NothingInspected);
    }
    Ok(())
}

/// The polygon's area (shoelace), in shares of the frame.
fn area(points: &[[f32; 2]]) -> f32 {
    let n = points.len();
    let twice: f32 = (0..n)
        .map(|i| {
            let ([x0, y0], [x1, y1]) = (points[i], points[(i + 1) % n]);
            x0 * y1 - x1 * y0
        })
        .sum();
    twice.abs() / 2.0
}

/// Whether a point lies inside a polygon (even-odd rule).
fn inside(points: &[[f32; 2]], x: f32, y: f32) -> bool {
    let n = points.len();
    let mut odd = false;
    let mut j = n - 1;
    for i in 0..n {
        let ([xi, yi], [xj, yj]) = (points[i], points[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            odd = !odd;
        }
        j = i;
    }
    odd
}

/// Distance from a point to a polygon's edges, with x measured in units of `sx` and y in units of `sy`.
fn edge_distance(points: &[[f32; 2]], x: f32, y: f32, sx: f32, sy: f32) -> f32 {
    let n = points.len();
    (0..n)
        .map(|i| {
            let ([ax, ay], [bx, by]) = (points[i], points[(i + 1) % n]);
            let (ax, ay, bx, by, px, py) = (ax / sx, ay / sy, bx / sx, by / sy, x / sx, y / sy);
            let (dx, dy) = (bx - ax, by - ay);
            let len2 = dx * dx + dy * dy;
            let t = if len2 > 0.0 { (((px - ax) * dx + (py - ay) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
            ((ax + t * dx - px).powi(2) + (ay + t * dy - py).powi(2)).sqrt()
        })
        .fold(f32::INFINITY, f32::min)
}

/// Whether the point (fractions of the frame) is inspected: inside an inspect zone when there is one,
/// and neither inside an ignore zone nor within `margin` of one (`margin` in units of `sx` by `sy`).
fn inspected(zones: &[Zone], x: f32, y: f32, margin: f32, (sx, sy): (f32, f32)) -> bool {
    let mut inspects = zones.iter().filter(|z| z.kind == ZoneKind::Inspect).peekable();
    if inspects.peek().is_some() && !inspects.any(|z| inside(&z.points, x, y)) {
        return false;
    }
    !zones
        .iter()
        .filter(|z| z.kind == ZoneKind::Ignore)
        .any(|z| inside(&z.points, x, y) || (margin > 0.0 && edge_distance(&z.points, x, y, sx, sy) <= margin))
}

/// The inspected cells of a `gw` x `gh` grid over the frame (row-major, 1 = inspected); `None` without
/// zones. An ignore zone also takes the cells whose centre is within one cell of it.
pub fn cell_mask(zones: &[Zone], gw: usize, gh: usize) -> Option<Vec<u8>> {
    if zones.is_empty() {
        return None;
    }
    let cell = (1.0 / gw as f32, 1.0 / gh as f32);
    let mut keep = Vec::with_capacity(gw * gh);
    for gy in 0..gh {
        for gx in 0..gw {
            let (x, y) = ((gx as f32 + 0.5) * cell.0, (gy as f32 + 0.5) * cell.1);
            keep.push(u8::from(inspected(zones, x, y, 1.0, cell)));
        }
    }
    Some(keep)
}

/// Zeroes the cells of `grid` the zones leave out.
pub fn mask(grid: &mut Grid, zones: &[Zone]) {
    if let Some(keep) = cell_mask(zones, grid.w, grid.h) {
        grid.data.iter_mut().zip(&keep).filter(|(_, k)| **k == 0).for_each(|(v, _)| *v = 0.0);
    }
}

/// The share of a defect mask's pixels (255 = defect, over the whole frame) that lie where the zones
/// inspect (pixel centres, no margin); 1 without zones or without defect pixels.
pub fn share_inspected(zones: &[Zone], defect: &image::GrayImage) -> f32 {
    if zones.is_empty() {
        return 1.0;
    }
    let (w, h) = (defect.width() as f32, defect.height() as f32);
    let (mut total, mut kept) = (0usize, 0usize);
    for (x, y, p) in defect.enumerate_pixels() {
        if p.0[0] > 127 {
            total += 1;
            kept += usize::from(inspected(zones, (x as f32 + 0.5) / w, (y as f32 + 0.5) / h, 0.0, (1.0, 1.0)));
        }
    }
    if total == 0 { 1.0 } else { kept as f32 / total as f32 }
}

/// A short stable key of a set of zones (the GPU keeps one cell table per zones and grid).
pub fn key(zones: &[Zone]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for z in zones {
        (z.kind as u8).hash(&mut h);
        for p in &z.points {
            p[0].to_bits().hash(&mut h);
            p[1].to_bits().hash(&mut h);
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(kind: ZoneKind, x0: f32, y0: f32, x1: f32, y1: f32) -> Zone {
        Zone { kind, points: vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1]] }
    }

    #[test]
    fn an_ignore_zone_takes_its_cells_and_one_cell_around() {
        let z = [square(ZoneKind::Ignore, 0.4, 0.4, 0.6, 0.6)];
        let keep = cell_mask(&z, 10, 10).unwrap();
        let at = |x: usize, y: usize| keep[y * 10 + x];
        // Cells 4 and 5 have their centres inside; 3 and 6 are within one cell; 2 and 7 are not.
        for c in 3..=6 {
            assert_eq!(at(c, 5), 0, "cell {c}");
        }
        assert_eq!(at(2, 5), 1);
        assert_eq!(at(7, 5), 1);
        assert_eq!(at(0, 0), 1);
        assert!(cell_mask(&[], 10, 10).is_none());
    }

    #[test]
    fn inspect_zones_keep_only_their_inside_and_ignore_wins() {
        let z = [square(ZoneKind::Inspect, 0.0, 0.0, 0.5, 1.0), square(ZoneKind::Ignore, 0.0, 0.0, 0.1, 0.1)];
        let keep = cell_mask(&z, 10, 10).unwrap();
        assert_eq!(keep[5 * 10 + 2], 1, "inside the inspect zone");
        assert_eq!(keep[5 * 10 + 7], 0, "outside every inspect zone");
        assert_eq!(keep[0], 0, "inside an ignore zone");
        let mut g = Grid::new(10, 10, vec![1.0; 100]);
        mask(&mut g, &z);
        assert_eq!(g.data.iter().filter(|v| **v == 1.0).count(), keep.iter().filter(|k| **k == 1).count());
    }

    #[test]
    fn a_triangle_is_inside_where_it_should_be() {
        let t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]];
        assert!(inside(&t, 0.2, 0.2));
        assert!(!inside(&t, 0.8, 0.8));
        assert!((area(&t) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn bad_zones_are_refused_with_the_reason() {
        assert_eq!(
            check(&[Zone { kind: ZoneKind::Ignore, points: vec![[0.1, 0.1], [0.2, 0.2]] }]),
            Err(ZoneError::Corners { zone: 0, n: 2 })
        );
        let e = check(&[square(ZoneKind::Ignore, 0.5, 0.5, 1.2, 0.9)]).unwrap_err();
        assert!(matches!(e, ZoneError::Outside { zone: 0, corner: 1, .. }), "{e}");
        assert!(e.to_string().contains("outside the image"));
        let line = Zone { kind: ZoneKind::Ignore, points: vec![[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]] };
        assert_eq!(check(&[line]), Err(ZoneError::NoArea { zone: 0 }));
        let nan = Zone { kind: ZoneKind::Ignore, points: vec![[f32::NAN, 0.1], [0.2, 0.2], [0.3, 0.1]] };
        assert!(matches!(check(&[nan]), Err(ZoneError::Outside { .. })));
        assert_eq!(check(&[square(ZoneKind::Ignore, 0.0, 0.0, 1.0, 1.0)]), Err(ZoneError::NothingInspected));
        assert_eq!(check(&vec![square(ZoneKind::Ignore, 0.1, 0.1, 0.2, 0.2); 33]), Err(ZoneError::TooMany(33)));
        assert_eq!(check(&[square(ZoneKind::Ignore, 0.1, 0.1, 0.3, 0.3)]), Ok(()));
    }

    #[test]
    fn the_inspected_share_of_a_defect_counts_its_pixels() {
        let mut m = image::GrayImage::new(10, 10);
        for x in 0..4 {
            m.put_pixel(x, 0, image::Luma([255]));
        }
        // The ignore zone covers x < 0.2: pixels 0 and 1 of 4.
        let z = [square(ZoneKind::Ignore, 0.0, 0.0, 0.2, 1.0)];
        assert_eq!(share_inspected(&z, &m), 0.5);
        assert_eq!(share_inspected(&[], &m), 1.0);
    }
}
