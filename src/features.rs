//! Patch features: encoder maps turned into L2-normalised patch rows, the exact nearest-neighbour
//! search against a memory bank, and greedy coreset subsampling.

/// One encoder output, CHW (batch 1).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMap {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

/// Patch descriptors of one image at one layer: `h * w` rows of `dim` values, L2-normalised, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Patches {
    pub h: usize,
    pub w: usize,
    pub dim: usize,
    pub rows: Vec<f32>,
}

impl Patches {
    pub fn len(&self) -> usize {
        self.h * self.w
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FeatureMap {
    /// Averages each position's `k x k` neighbourhood (PatchCore's local aggregation, edges replicated),
    /// transposes to rows and L2-normalises each row.
    pub fn to_patches(&self, k: usize) -> Patches {
        let (c, h, w) = (self.c, self.h, self.w);
        let r = (k / 2) as isize;
        let mut rows = vec![0.0f32; h * w * c];
        let mut tmp = vec![0.0f32; h * w];
        for ch in 0..c {
            let plane = &self.data[ch * h * w..(ch + 1) * h * w];
            // Separable box filter with replicated edges: rows, then columns.
            for y in 0..h {
                for x in 0..w {
                    let mut s = 0.0;
                    for dx in -r..=r {
                        let xx = (x as isize + dx).clamp(0, w as isize - 1) as usize;
                        s += plane[y * w + xx];
                    }
                    tmp[y * w + x] = s;
                }
            }
            let norm = 1.0 / ((2 * r + 1) * (2 * r + 1)) as f32;
            for y in 0..h {
                for x in 0..w {
                    let mut s = 0.0;
                    for dy in -r..=r {
                        let yy = (y as isize + dy).clamp(0, h as isize - 1) as usize;
                        s += tmp[yy * w + x];
                    }
                    rows[(y * w + x) * c + ch] = s * norm;
                }
            }
        }
        for row in rows.chunks_exact_mut(c) {
            normalize(row);
        }
        Patches { h, w, dim: c, rows }
    }
}

fn normalize(row: &mut [f32]) {
    let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
    if n > 1e-12 {
        let inv = 1.0 / n;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Queries per block in [`nearest`]; with 4096 bank rows per block the scratch stays at 2 MiB.
const QUERY_BLOCK: usize = 128;
const BANK_BLOCK: usize = 4096;

/// For each query row, the cosine distance `1 - max_j <q, b_j>` to its nearest bank row and that row's
/// index. Rows must be L2-normalised. Computed as blocked matrix products, never per patch pair.
pub fn nearest(queries: &[f32], bank: &[f32], dim: usize) -> (Vec<f32>, Vec<u32>) {
    let nq = queries.len() / dim;
    let nb = bank.len() / dim;
    let mut best = vec![f32::NEG_INFINITY; nq];
    let mut arg = vec![0u32; nq];
    if nb == 0 {
        return (vec![1.0; nq], arg);
    }
    let mut sims = vec![0.0f32; QUERY_BLOCK * BANK_BLOCK];
    for q0 in (0..nq).step_by(QUERY_BLOCK) {
        let m = QUERY_BLOCK.min(nq - q0);
        for b0 in (0..nb).step_by(BANK_BLOCK) {
            let n = BANK_BLOCK.min(nb - b0);
            // sims[m x n] = Q[m x dim] * B^T[dim x n]; B is row-major, so B^T has row stride 1.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    dim,
                    n,
                    1.0,
                    queries[q0 * dim..].as_ptr(),
                    dim as isize,
                    1,
                    bank[b0 * dim..].as_ptr(),
                    1,
                    dim as isize,
                    0.0,
                    sims.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            for i in 0..m {
                let row = &sims[i * n..(i + 1) * n];
                let (mut bi, mut bv) = (0usize, f32::NEG_INFINITY);
                for (j, &v) in row.iter().enumerate() {
                    if v > bv {
                        bv = v;
                        bi = j;
                    }
                }
                if bv > best[q0 + i] {
                    best[q0 + i] = bv;
                    arg[q0 + i] = (b0 + bi) as u32;
                }
            }
        }
    }
    let dist = best.iter().map(|s| (1.0 - s).max(0.0)).collect();
    (dist, arg)
}

/// Greedy k-centre coreset (PatchCore): picks `target` rows so that every row is close to a picked one.
/// Distances are measured on the full rows; the first pick is row 0 so the result is deterministic.
pub fn coreset(
    rows: &[f32],
    dim: usize,
    target: usize,
    mut progress: impl FnMut(usize, usize),
) -> Vec<u32> {
    let n = rows.len() / dim;
    if target >= n {
        return (0..n as u32).collect();
    }
    let mut picked = Vec::with_capacity(target);
    let mut min_dist = vec![f32::INFINITY; n];
    let mut current = 0usize;
    for step in 0..target {
        picked.push(current as u32);
        let c = &rows[current * dim..(current + 1) * dim];
        let mut far = (0usize, f32::NEG_INFINITY);
        for (i, md) in min_dist.iter_mut().enumerate() {
            let r = &rows[i * dim..(i + 1) * dim];
            // Rows are unit vectors: squared L2 = 2 - 2 cos.
            let d = 2.0 - 2.0 * dot(c, r);
            if d < *md {
                *md = d;
            }
            if *md > far.1 {
                far = (i, *md);
            }
        }
        current = far.0;
        if step % 256 == 0 {
            progress(step, target);
        }
    }
    picked
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg_rows(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut v: Vec<f32> = (0..n * dim)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        v.chunks_exact_mut(dim).for_each(normalize);
        v
    }

    #[test]
    fn nearest_matches_brute_force_across_block_edges() {
        let dim = 19;
        // Sizes straddle both block sizes so that partial blocks are exercised.
        let q = lcg_rows(QUERY_BLOCK + 37, dim, 1);
        let b = lcg_rows(BANK_BLOCK + 501, dim, 2);
        let (dist, arg) = nearest(&q, &b, dim);
        for (i, qr) in q.chunks_exact(dim).enumerate() {
            let (mut bj, mut bs) = (0, f32::NEG_INFINITY);
            for (j, br) in b.chunks_exact(dim).enumerate() {
                let s = dot(qr, br);
                if s > bs {
                    bs = s;
                    bj = j;
                }
            }
            assert!((dist[i] - (1.0 - bs).max(0.0)).abs() < 1e-5, "row {i}");
            assert_eq!(arg[i] as usize, bj, "row {i}");
        }
    }

    #[test]
    fn nearest_of_a_bank_member_is_itself() {
        let b = lcg_rows(50, 8, 3);
        let (dist, arg) = nearest(&b[8 * 7..8 * 8], &b, 8);
        assert!(dist[0] < 1e-6);
        assert_eq!(arg[0], 7);
    }

    #[test]
    fn pooling_averages_neighbourhood_and_normalises() {
        // One channel: pooling a constant plane keeps it constant; two channels normalise to unit rows.
        let fm = FeatureMap {
            c: 2,
            h: 3,
            w: 3,
            data: [vec![1.0; 9], (0..9).map(|v| v as f32).collect()].concat(),
        };
        let p = fm.to_patches(3);
        assert_eq!((p.h, p.w, p.dim), (3, 3, 2));
        for row in p.rows.chunks_exact(2) {
            assert!((row[0] * row[0] + row[1] * row[1] - 1.0).abs() < 1e-5);
        }
        // Centre of channel 1 pools to the mean of 0..9 = 4; channel 0 to 1.
        let centre = &p.rows[4 * 2..5 * 2];
        assert!((centre[1] / centre[0] - 4.0).abs() < 1e-5);
    }

    #[test]
    fn coreset_covers_clusters() {
        // Three tight clusters of 30 rows: a 3-point coreset takes one from each.
        let dim = 4;
        let mut rows = Vec::new();
        for c in 0..3 {
            for i in 0..30 {
                let mut r = vec![0.01 * (i as f32 % 3.0); dim];
                r[c] = 1.0;
                normalize(&mut r);
                rows.extend(r);
            }
        }
        let picked = coreset(&rows, dim, 3, |_, _| {});
        let mut clusters: Vec<_> = picked.iter().map(|&i| i / 30).collect();
        clusters.sort();
        assert_eq!(clusters, vec![0, 1, 2]);
    }
}
