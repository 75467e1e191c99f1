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
            // Rows sorted by y let the positional search skip rows out of a query block's reach.
            let mut order: Vec<usize> = (0..pos.len()).collect();
            order.sort_by(|&a, &b| pos[a][1].total_cmp(&pos[b][1]));
            let rows = order.iter().flat_map(|&i| rows[i * dim..(i + 1) * dim].to_vec()).collect();
            let pos = order.iter().map(|&i| pos[i]).collect();
            Bank { stride: strides[l], dim, rows, pos }
        })
        .collect()
}
