//! Findings: the anomaly mask split into connected regions, each placed in a 3 x 3 grid cell, and the
//! verdict written in AnomalyGPT's answer format.

use crate::detect::map::Grid;
use crate::types::findings::{Cell, Region};

/// Connected components (8-neighbourhood) of `map >= threshold`, largest peak first. Regions smaller
/// than `min_area` of the map (a fraction) are dropped. Boxes are scaled to `orig_w x orig_h`.
pub fn find(map: &Grid, threshold: f32, min_area: f32, orig_w: u32, orig_h: u32) -> Vec<Region> {
    let (w, h) = (map.w, map.h);
    let mut label = vec![0u32; w * h];
    let mut regions = Vec::new();
    let mut stack = Vec::new();
    let min_px = ((min_area * (w * h) as f32).ceil() as usize).max(1);
    let sx = orig_w as f32 / w as f32;
    let sy = orig_h as f32 / h as f32;
    let mut next = 0u32;
    for start in 0..w * h {
        if label[start] != 0 || map.data[start] < threshold {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
        let (mut count, mut peak, mut peak_at) = (0usize, f32::NEG_INFINITY, start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            count += 1;
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            if map.data[i] > peak {
                (peak, peak_at) = (map.data[i], i);
            }
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let (nx, ny) = (x as isize + dx, y as isize + dy);
                    if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if label[j] == 0 && map.data[j] >= threshold {
                        label[j] = next;
                        stack.push(j);
                    }
                }
            }
        }
        if count < min_px {
            continue;
        }
        let (px, py) = ((peak_at % w) as f32 + 0.5, (peak_at / w) as f32 + 0.5);
        regions.push(Region {
            bbox: [
                (x0 as f32 * sx) as u32,
                (y0 as f32 * sy) as u32,
                (((x1 + 1 - x0) as f32 * sx).round() as u32).max(1),
                (((y1 + 1 - y0) as f32 * sy).round() as u32).max(1),
            ],
            area_pct: 100.0 * count as f32 / (w * h) as f32,
            cell: Cell::of(px, py, w as f32, h as f32),
            peak,
            label: None,
            label_confidence: None,
        });
    }
    regions.sort_by(|a, b| b.peak.total_cmp(&a.peak));
    regions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::findings::answer;

    fn grid_with(w: usize, h: usize, hot: &[(usize, usize)]) -> Grid {
        let mut d = vec![0.0; w * h];
        for &(x, y) in hot {
            d[y * w + x] = 1.0 + (x + y) as f32 * 0.01;
        }
        Grid::new(w, h, d)
    }

    #[test]
    fn cells_cover_the_grid() {
        assert_eq!(Cell::of(0.0, 0.0, 9.0, 9.0), Cell::TopLeft);
        assert_eq!(Cell::of(4.5, 4.5, 9.0, 9.0), Cell::Center);
        assert_eq!(Cell::of(8.9, 0.5, 9.0, 9.0), Cell::TopRight);
        assert_eq!(Cell::of(9.0, 9.0, 9.0, 9.0), Cell::BottomRight);
        assert_eq!(Cell::of(1.0, 5.0, 9.0, 9.0), Cell::Left);
    }

    #[test]
    fn components_are_eight_connected_with_boxes_in_original_pixels() {
        // A diagonal pair (one region, 8-connected) at the top left, a 2x2 block at the bottom right.
        let g = grid_with(9, 9, &[(0, 0), (1, 1), (7, 7), (8, 7), (7, 8), (8, 8)]);
        let r = find(&g, 0.5, 0.0, 90, 180);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].cell, Cell::BottomRight);
        assert_eq!(r[0].bbox, [70, 140, 20, 40]);
        assert!((r[0].area_pct - 400.0 / 81.0).abs() < 1e-4);
        assert_eq!(r[1].cell, Cell::TopLeft);
        assert_eq!(r[1].bbox, [0, 0, 20, 40]);
    }

    #[test]
    fn small_regions_are_dropped() {
        let g = grid_with(10, 10, &[(0, 0), (5, 5), (5, 6), (6, 5)]);
        let r = find(&g, 0.5, 0.02, 10, 10);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].cell, Cell::Center);
    }

    #[test]
    fn answers_follow_anomalygpt_format() {
        assert_eq!(answer(false, &[]), "No, there is no anomaly in the image.");
        let g = grid_with(9, 9, &[(0, 0)]);
        let one = find(&g, 0.5, 0.0, 9, 9);
        assert_eq!(answer(true, &one), "Yes, there is an anomaly in the image, at the top left of the image.");
        let g = grid_with(9, 9, &[(0, 0), (8, 8), (4, 0)]);
        let three = find(&g, 0.5, 0.0, 9, 9);
        assert_eq!(
            answer(true, &three),
            "Yes, there are 3 anomalies in the image, they are at the top left, top and bottom right of the image."
        );
    }
}
