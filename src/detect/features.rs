//! Patch features: encoder maps turned into L2-normalised patch rows, the exact nearest-neighbour
//! search against a memory bank, and greedy coreset subsampling.

use crate::engine::encoder::FeatureMap;

/// How patch descriptors are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    /// Rows are L2-normalised; distance `1 - cos` (AnomalyDINO).
    Cosine,
    /// Rows keep their magnitude; Euclidean distance (PatchCore).
    L2,
}

/// Patch descriptors of one image at one layer: `h * w` rows of `dim` values, L2-normalised, row-major,
/// each with the position of its centre as a fraction of the image width and height.
#[derive(Debug, Clone, PartialEq)]
pub struct Patches {
    pub h: usize,
    pub w: usize,
    pub dim: usize,
    pub rows: Vec<f32>,
    pub pos: Vec<[f32; 2]>,
}

/// Centres of an `h x w` grid's cells as fractions of the grid, row-major.
pub fn grid_positions(h: usize, w: usize) -> Vec<[f32; 2]> {
    (0..h * w).map(|i| [((i % w) as f32 + 0.5) / w as f32, ((i / w) as f32 + 0.5) / h as f32]).collect()
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
        self.to_patches_with(k, Distance::Cosine)
    }

    /// [`Self::to_patches`], leaving rows unnormalised for [`Distance::L2`].
    pub fn to_patches_with(&self, k: usize, metric: Distance) -> Patches {
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
        if metric == Distance::Cosine {
            for row in rows.chunks_exact_mut(c) {
                normalize(row);
            }
        }
        Patches { h, w, dim: c, rows, pos: grid_positions(h, w) }
    }
}

/// Fuses the patches of several strides: each is resized (bilinear) to the finest grid, the unit rows
/// are concatenated and renormalised, so every stride weighs the same in the cosine.
pub fn concat(parts: &[&Patches]) -> Patches {
    concat_with(parts, Distance::Cosine)
}

/// [`concat`]; with [`Distance::L2`] the parts are concatenated as they are (PatchCore).
pub fn concat_with(parts: &[&Patches], metric: Distance) -> Patches {
    let finest = parts.iter().max_by_key(|p| p.len()).expect("at least one part");
    if parts.len() == 1 {
        return (*finest).clone();
    }
    let (h, w) = (finest.h, finest.w);
    let dim: usize = parts.iter().map(|p| p.dim).sum();
    let mut rows = vec![0.0f32; h * w * dim];
    let mut offset = 0;
    for p in parts {
        let (ys, xs) = (crate::detect::map::bilinear_taps(h, p.h), crate::detect::map::bilinear_taps(w, p.w));
        for (y, &(y0, y1, ty)) in ys.iter().enumerate() {
            for (x, &(x0, x1, tx)) in xs.iter().enumerate() {
                let dst = &mut rows[(y * w + x) * dim + offset..(y * w + x) * dim + offset + p.dim];
                let corners = [
                    (y0, x0, (1.0 - ty) * (1.0 - tx)),
                    (y0, x1, (1.0 - ty) * tx),
                    (y1, x0, ty * (1.0 - tx)),
                    (y1, x1, ty * tx),
                ];
                for (cy, cx, wgt) in corners {
                    if wgt == 0.0 {
                        continue;
                    }
                    let src = &p.rows[(cy * p.w + cx) * p.dim..(cy * p.w + cx + 1) * p.dim];
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += wgt * s);
                }
            }
        }
        offset += p.dim;
    }
    if metric == Distance::L2 {
        return Patches { h, w, dim, rows, pos: grid_positions(h, w) };
    }
    // Renormalise each part (interpolation shortens unit vectors), then the whole row.
    for row in rows.chunks_exact_mut(dim) {
        let mut o = 0;
        for p in parts {
            normalize(&mut row[o..o + p.dim]);
            o += p.dim;
        }
        normalize(row);
    }
    Patches { h, w, dim, rows, pos: grid_positions(h, w) }
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
    nearest_impl(queries, bank, dim, None, Distance::Cosine)
}

/// [`nearest`] restricted to bank rows whose position lies within `window` (a fraction of the image
/// per axis) of the query's: for aligned products, a patch must look like the reference at its place.
/// A query with no bank row in its window falls back to the whole bank.
pub fn nearest_within(
    queries: &[f32],
    qpos: &[[f32; 2]],
    bank: &[f32],
    bpos: &[[f32; 2]],
    dim: usize,
    window: f32,
    metric: Distance,
) -> (Vec<f32>, Vec<u32>) {
    let window = if window >= 1.0 { None } else { Some((qpos, bpos, window)) };
    nearest_impl(queries, bank, dim, window, metric)
}

type Window<'a> = Option<(&'a [[f32; 2]], &'a [[f32; 2]], f32)>;

fn nearest_impl(queries: &[f32], bank: &[f32], dim: usize, window: Window, metric: Distance) -> (Vec<f32>, Vec<u32>) {
    let nq = queries.len() / dim;
    let nb = bank.len() / dim;
    // L2: maximise 2 q.b - |b|^2, then d = sqrt(|q|^2 - max). Cosine: maximise q.b.
    let bank_sq: Vec<f32> = match metric {
        Distance::L2 => bank.chunks_exact(dim).map(|r| dot(r, r)).collect(),
        Distance::Cosine => Vec::new(),
    };
    let mut best = vec![f32::NEG_INFINITY; nq];
    let mut arg = vec![0u32; nq];
    if nb == 0 {
        return (vec![1.0; nq], arg);
    }
    let mut sims = vec![0.0f32; QUERY_BLOCK * BANK_BLOCK];
    // With a window and a bank sorted by y, a query block can only match the bank rows whose y lies
    // within the window of the block's y range: a contiguous band, found by binary search.
    let sorted_by_y = window.is_some_and(|(_, bpos, _)| bpos.windows(2).all(|p| p[0][1] <= p[1][1]));
    for q0 in (0..nq).step_by(QUERY_BLOCK) {
        let m = QUERY_BLOCK.min(nq - q0);
        let (lo, hi) = match window {
            Some((qpos, bpos, r)) if sorted_by_y => {
                let ys = qpos[q0..q0 + m].iter().map(|p| p[1]);
                let (ymin, ymax) = ys.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
                (bpos.partition_point(|p| p[1] < ymin - r), bpos.partition_point(|p| p[1] <= ymax + r))
            }
            _ => (0, nb),
        };
        for b0 in (lo..hi).step_by(BANK_BLOCK) {
            let n = BANK_BLOCK.min(hi - b0);
            // sims[m x n] = Q[m x dim] * B^T[dim x n].
            gemm(&queries[q0 * dim..], m, &bank[b0 * dim..], n, dim, &mut sims);
            if metric == Distance::L2 {
                for i in 0..m {
                    for (v, bsq) in sims[i * n..(i + 1) * n].iter_mut().zip(&bank_sq[b0..b0 + n]) {
                        *v = 2.0 * *v - bsq;
                    }
                }
            }
            for i in 0..m {
                let row = &sims[i * n..(i + 1) * n];
                let (mut bi, mut bv) = (0usize, f32::NEG_INFINITY);
                match window {
                    None => {
                        for (j, &v) in row.iter().enumerate() {
                            if v > bv {
                                bv = v;
                                bi = j;
                            }
                        }
                    }
                    Some((qpos, bpos, r)) => {
                        let [qx, qy] = qpos[q0 + i];
                        for (j, &v) in row.iter().enumerate() {
                            let [bx, by] = bpos[b0 + j];
                            if v > bv && (bx - qx).abs() <= r && (by - qy).abs() <= r {
                                bv = v;
                                bi = j;
                            }
                        }
                    }
                }
                if bv > best[q0 + i] {
                    best[q0 + i] = bv;
                    arg[q0 + i] = (b0 + bi) as u32;
                }
            }
        }
    }
    if window.is_some() && best.contains(&f32::NEG_INFINITY) {
        // Queries whose window held no bank row: search the whole bank for them.
        let (gd, ga) = nearest_impl(queries, bank, dim, None, metric);
        let mut dist = finish(&best, queries, dim, metric);
        for i in 0..nq {
            if best[i] == f32::NEG_INFINITY {
                dist[i] = gd[i];
                arg[i] = ga[i];
            }
        }
        return (dist, arg);
    }
    (finish(&best, queries, dim, metric), arg)
}

/// Dimension rows are projected to before the coreset search (PatchCore's Johnson-Lindenstrauss step).
const CORESET_DIM: usize = 64;

/// Distances from the best similarity values of [`nearest_impl`].
pub(crate) fn finish(best: &[f32], queries: &[f32], dim: usize, metric: Distance) -> Vec<f32> {
    match metric {
        Distance::Cosine => best.iter().map(|s| (1.0 - s).max(0.0)).collect(),
        Distance::L2 => {
            best.iter().zip(queries.chunks_exact(dim)).map(|(s, q)| (dot(q, q) - s).max(0.0).sqrt()).collect()
        }
    }
}

/// Greedy k-centre coreset (PatchCore): picks `target` rows so that every row is close to a picked one.
/// Rows wider than 64 values are first projected by a fixed seeded Gaussian matrix, which keeps
/// distances approximately (Johnson-Lindenstrauss) at a fraction of the cost. The first pick is row 0,
/// so the result is deterministic.
pub fn coreset(rows: &[f32], dim: usize, target: usize, mut progress: impl FnMut(usize, usize)) -> Vec<u32> {
    let n = rows.len() / dim;
    if target >= n {
        return (0..n as u32).collect();
    }
    let (proj, pd) =
        if dim > CORESET_DIM { (project(rows, dim, CORESET_DIM), CORESET_DIM) } else { (rows.to_vec(), dim) };
    let sq: Vec<f32> = proj.chunks_exact(pd).map(|r| dot(r, r)).collect();
    let mut picked = Vec::with_capacity(target);
    let mut min_dist = vec![f32::INFINITY; n];
    let mut current = 0usize;
    for step in 0..target {
        picked.push(current as u32);
        let c = &proj[current * pd..(current + 1) * pd];
        let mut far = (0usize, f32::NEG_INFINITY);
        for (i, md) in min_dist.iter_mut().enumerate() {
            let d = sq[current] + sq[i] - 2.0 * dot(c, &proj[i * pd..(i + 1) * pd]);
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

/// `rows` (n x dim) times a seeded Gaussian matrix (dim x out) scaled by 1/sqrt(out).
fn project(rows: &[f32], dim: usize, out: usize) -> Vec<f32> {
    let mut rng = crate::util::rng::Rng::new(0xC0DE);
    let scale = 1.0 / (out as f32).sqrt();
    let m: Vec<f32> = (0..dim * out).map(|_| rng.normal() * scale).collect();
    let n = rows.len() / dim;
    let mut p = vec![0.0f32; n * out];
    unsafe {
        matrixmultiply::sgemm(
            n,
            dim,
            out,
            1.0,
            rows.as_ptr(),
            dim as isize,
            1,
            m.as_ptr(),
            out as isize,
            1,
            0.0,
            p.as_mut_ptr(),
            out as isize,
            1,
        );
    }
    p
}

/// `out[i * n + j] = a_i . b_j` for `m` rows of `a` and `n` rows of `b`, both row-major of width `dim`:
/// one matrix product (matrixmultiply's SIMD sgemm).
pub(crate) fn gemm(a: &[f32], m: usize, b: &[f32], n: usize, dim: usize, out: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= m * dim && b.len() >= n * dim && out.len() >= m * n);
    // SAFETY: the bounds are checked above; the strides describe row-major A (m x dim), B^T (dim x n,
    // B row-major, so B^T has row stride 1) and C (m x n).
    unsafe {
        matrixmultiply::sgemm(
            m,
            dim,
            n,
            1.0,
            a.as_ptr(),
            dim as isize,
            1,
            b.as_ptr(),
            1,
            dim as isize,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg_rows(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut v: Vec<f32> = (0..n * dim)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
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
    fn windowed_search_matches_brute_force_within_the_window() {
        let dim = 7;
        let q = lcg_rows(300, dim, 4);
        let b = lcg_rows(5000, dim, 5);
        let qpos = grid_positions(15, 20);
        let bpos = grid_positions(50, 100);
        let (dist, arg) = nearest_within(&q, &qpos, &b, &bpos, dim, 0.1, Distance::Cosine);
        for (i, qr) in q.chunks_exact(dim).enumerate() {
            let [qx, qy] = qpos[i];
            let mut bs = f32::NEG_INFINITY;
            for (j, br) in b.chunks_exact(dim).enumerate() {
                let [bx, by] = bpos[j];
                if (bx - qx).abs() <= 0.1 && (by - qy).abs() <= 0.1 {
                    bs = bs.max(dot(qr, br));
                }
            }
            assert!((dist[i] - (1.0 - bs).max(0.0)).abs() < 1e-5, "row {i}");
            let [bx, by] = bpos[arg[i] as usize];
            assert!((bx - qx).abs() <= 0.1 && (by - qy).abs() <= 0.1);
        }
        // The same search over the bank in shuffled order (no y-band shortcut) gives the same distances.
        let perm: Vec<usize> = (0..5000).map(|i| (i * 2654435761usize) % 5000).collect();
        assert_eq!(
            {
                let mut p = perm.clone();
                p.sort();
                p
            },
            (0..5000).collect::<Vec<_>>()
        );
        let shuffled: Vec<f32> = perm.iter().flat_map(|&i| b[i * dim..(i + 1) * dim].to_vec()).collect();
        let spos: Vec<[f32; 2]> = perm.iter().map(|&i| bpos[i]).collect();
        let (sd, _) = nearest_within(&q, &qpos, &shuffled, &spos, dim, 0.1, Distance::Cosine);
        assert!(sd.iter().zip(&dist).all(|(a, b)| (a - b).abs() < 1e-6));
        // An empty window falls back to the global nearest.
        let far = [[5.0f32, 5.0]];
        let (d, _) = nearest_within(&q[..dim], &far, &b, &bpos, dim, 0.1, Distance::Cosine);
        assert_eq!(d, nearest(&q[..dim], &b, dim).0);
    }

    #[test]
    fn l2_search_matches_brute_force_euclidean() {
        let dim = 5;
        let q: Vec<f32> = lcg_rows(70, dim, 8).iter().map(|v| v * 3.0).collect();
        let b: Vec<f32> = lcg_rows(300, dim, 9).iter().enumerate().map(|(i, v)| v * (1.0 + (i % 7) as f32)).collect();
        let pos = grid_positions(1, 300);
        let (dist, arg) = nearest_within(&q, &pos[..70], &b, &pos, dim, 1.0, Distance::L2);
        for (i, qr) in q.chunks_exact(dim).enumerate() {
            let (bj, bd) = b
                .chunks_exact(dim)
                .map(|br| qr.iter().zip(br).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt())
                .enumerate()
                .min_by(|x, y| x.1.total_cmp(&y.1))
                .unwrap();
            assert!((dist[i] - bd).abs() < 1e-3, "row {i}: {} vs {bd}", dist[i]);
            assert_eq!(arg[i] as usize, bj);
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
        let fm = FeatureMap { c: 2, h: 3, w: 3, data: [vec![1.0; 9], (0..9).map(|v| v as f32).collect()].concat() };
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
    fn concat_fuses_onto_the_finest_grid_with_equal_weights() {
        let fine = FeatureMap { c: 1, h: 4, w: 4, data: vec![1.0; 16] }.to_patches(1);
        let coarse = FeatureMap { c: 2, h: 2, w: 2, data: [vec![1.0; 4], vec![0.0; 4]].concat() }.to_patches(1);
        let f = concat(&[&fine, &coarse]);
        assert_eq!((f.h, f.w, f.dim), (4, 4, 3));
        let s = std::f32::consts::FRAC_1_SQRT_2;
        for row in f.rows.chunks_exact(3) {
            assert!((row[0] - s).abs() < 1e-6 && (row[1] - s).abs() < 1e-6 && row[2].abs() < 1e-6, "{row:?}");
        }
        assert_eq!(concat(&[&fine]), fine);
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
