//! The memory banks of an enrolment: each layer's patch rows from the references, coreset-bounded.

use crate::detect::enrolment::Bank;
use crate::detect::features::{self, Patches};

/// Builds the per-layer banks from each reference's patches, leaving out reference `skip`.
pub(crate) fn build_banks(
    per_ref: &[Vec<Patches>],
    strides: &[usize],
    skip: Option<usize>,
    max_bank: usize,
    progress: &mut dyn FnMut(&str),
) -> Vec<Bank> {
    (0..strides.len())
        .map(|l| {
            let dim = per_ref[0][l].dim;
            let (mut rows, mut pos) = (Vec::new(), Vec::new());
            for (i, views) in per_ref.iter().enumerate() {
                if Some(i) != skip {
                    rows.extend_from_slice(&views[l].rows);
                    pos.extend_from_slice(&views[l].pos);
                }
            }
            let n = rows.len() / dim;
            if n > max_bank {
                progress(&format!("coreset: stride {} bank {n} -> {max_bank} patches", strides[l]));
                let keep = features::coreset(&rows, dim, max_bank, |_, _| {});
                rows = keep.iter().flat_map(|&i| rows[i as usize * dim..(i as usize + 1) * dim].to_vec()).collect();
                pos = keep.iter().map(|&i| pos[i as usize]).collect();
            }
            sorted(strides[l], dim, rows, pos)
        })
        .collect()
}

/// A bank layer with its rows sorted by y, which lets the positional search skip rows out of a query
/// block's reach.
pub(crate) fn sorted(stride: usize, dim: usize, rows: Vec<f32>, pos: Vec<[f32; 2]>) -> Bank {
    let mut order: Vec<usize> = (0..pos.len()).collect();
    order.sort_by(|&a, &b| pos[a][1].total_cmp(&pos[b][1]));
    let rows = order.iter().flat_map(|&i| rows[i * dim..(i + 1) * dim].to_vec()).collect();
    let pos = order.iter().map(|&i| pos[i]).collect();
    Bank { stride, dim, rows, pos }
}

/// Grows each layer of `banks` by the patches of new good parts (`parts[i][layer]`), bounded at
/// `max_bank` rows a layer: each part adds its `budget` patches that lie farthest from the bank as it
/// stands (greedy farthest-first, the online form of the k-centre coreset enrolment uses), so the
/// bank covers what the line shows that the shots did not, at a fixed size.
pub(crate) fn grow(
    banks: &[Bank],
    parts: &[Vec<Patches>],
    window: f32,
    distances: &[features::Distance],
    max_bank: usize,
) -> Vec<Bank> {
    banks
        .iter()
        .enumerate()
        .map(|(l, bank)| {
            let room = max_bank.saturating_sub(bank.len());
            if parts.is_empty() || room == 0 {
                return bank.clone();
            }
            let budget = (room / parts.len()).max(1);
            let (mut rows, mut pos) = (bank.rows.clone(), bank.pos.clone());
            for part in parts {
                let p = &part[l];
                let (dist, _) = features::nearest_within(&p.rows, &p.pos, &rows, &pos, bank.dim, window, distances[l]);
                let mut order: Vec<usize> = (0..dist.len()).collect();
                order.sort_by(|&a, &b| dist[b].total_cmp(&dist[a]));
                for &i in order.iter().take(budget.min(max_bank.saturating_sub(pos.len()))) {
                    rows.extend_from_slice(&p.rows[i * p.dim..(i + 1) * p.dim]);
                    pos.push(p.pos[i]);
                }
            }
            sorted(bank.stride, bank.dim, rows, pos)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patches(rows: Vec<f32>, dim: usize) -> Patches {
        let n = rows.len() / dim;
        Patches { h: 1, w: n, dim, rows, pos: features::grid_positions(1, n) }
    }

    #[test]
    fn growth_adds_the_farthest_patches_and_stops_at_the_bound() {
        let bank = sorted(8, 2, vec![0.0, 0.0, 1.0, 0.0], vec![[0.25, 0.5], [0.75, 0.5]]);
        // A part with one patch near the bank and one far from it: with room for one, the far one joins.
        let part = vec![patches(vec![0.05, 0.0, 5.0, 5.0], 2)];
        let grown = grow(std::slice::from_ref(&bank), std::slice::from_ref(&part), 1.0, &[features::Distance::L2], 3);
        assert_eq!(grown[0].len(), 3);
        assert!(grown[0].rows.chunks(2).any(|r| r == [5.0, 5.0]), "{:?}", grown[0].rows);
        // A full bank stays as it is.
        let same = grow(std::slice::from_ref(&bank), &[part], 1.0, &[features::Distance::L2], 2);
        assert_eq!(same[0], bank);
    }
}
