//! An inverted-file (IVF) index for the decoder's nearest-neighbour search on large banks: the bank is
//! split into k-means lists, and each query is compared only with the rows of the `probe` lists whose
//! centroids score best for it. Approximate: a query whose true neighbour sits in a list it does not
//! probe gets a farther row, so its distance can only grow. Exact search
//! ([`features::nearest_within`](super::features::nearest_within)) stays the reference.

use super::features::{Distance, dot, finish, gemm};
use crate::util::rng::Rng;

/// Queries compared with one list at a time.
const QUERY_BLOCK: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Ivf {
    dim: usize,
    metric: Distance,
    centroids: Vec<f32>,
    centroid_sq: Vec<f32>,
    /// List `l` holds rows `offsets[l]..offsets[l + 1]` of `rows`, which are bank rows `ids[..]`.
    offsets: Vec<usize>,
    ids: Vec<u32>,
    rows: Vec<f32>,
    rows_sq: Vec<f32>,
}

/// What the search maximises for a dot product `s` with a row of squared norm `sq`: `s` for cosine
/// (unit rows), `2 s - |b|^2` for L2 (the query's own norm is common to all rows).
fn similarity(metric: Distance, s: f32, sq: f32) -> f32 {
    match metric {
        Distance::Cosine => s,
        Distance::L2 => 2.0 * s - sq,
    }
}

impl Ivf {
    /// `lists` k-means lists (at most one per row) after `iters` Lloyd iterations, seeded from
    /// rows drawn with `seed`.
    pub fn build(bank: &[f32], dim: usize, metric: Distance, lists: usize, iters: usize, seed: u64) -> Ivf {
        let n = bank.len() / dim;
        let k = lists.clamp(1, n.max(1));
        let mut rng = Rng::new(seed);
        let mut picks: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + rng.below((n - i) as u32) as usize;
            picks.swap(i, j);
        }
        let mut centroids: Vec<f32> =
            picks[..k.min(n)].iter().flat_map(|&i| bank[i * dim..(i + 1) * dim].to_vec()).collect();
        let mut assign = vec![0u32; n];
        for _ in 0..iters.max(1) {
            Self::assign(bank, dim, metric, &centroids, &mut assign);
            let mut sums = vec![0.0f64; k * dim];
            let mut counts = vec![0usize; k];
            for (i, &c) in assign.iter().enumerate() {
                counts[c as usize] += 1;
                for (s, v) in
                    sums[c as usize * dim..(c as usize + 1) * dim].iter_mut().zip(&bank[i * dim..(i + 1) * dim])
                {
                    *s += *v as f64;
                }
            }
            for c in 0..k {
                if counts[c] == 0 {
                    continue; // an empty list keeps its centroid
                }
                let mean: Vec<f32> =
                    sums[c * dim..(c + 1) * dim].iter().map(|s| (s / counts[c] as f64) as f32).collect();
                let norm = match metric {
                    Distance::Cosine => dot(&mean, &mean).sqrt().max(1e-12),
                    Distance::L2 => 1.0,
                };
                for (d, v) in centroids[c * dim..(c + 1) * dim].iter_mut().zip(&mean) {
                    *d = v / norm;
                }
            }
        }
        Self::assign(bank, dim, metric, &centroids, &mut assign);
        let mut ids: Vec<u32> = (0..n as u32).collect();
        ids.sort_by_key(|&i| assign[i as usize]);
        let mut offsets = vec![0usize; k + 1];
        for &a in &assign {
            offsets[a as usize + 1] += 1;
        }
        for c in 0..k {
            offsets[c + 1] += offsets[c];
        }
        let rows: Vec<f32> =
            ids.iter().flat_map(|&i| bank[i as usize * dim..(i as usize + 1) * dim].to_vec()).collect();
        let rows_sq = rows.chunks_exact(dim).map(|r| dot(r, r)).collect();
        let centroid_sq = centroids.chunks_exact(dim).map(|r| dot(r, r)).collect();
        Ivf { dim, metric, centroids, centroid_sq, offsets, ids, rows, rows_sq }
    }

    /// Each row's best-scoring centroid.
    fn assign(bank: &[f32], dim: usize, metric: Distance, centroids: &[f32], assign: &mut [u32]) {
        let k = centroids.len() / dim;
        let csq: Vec<f32> = centroids.chunks_exact(dim).map(|r| dot(r, r)).collect();
        let mut sims = vec![0.0f32; QUERY_BLOCK * k];
        for r0 in (0..assign.len()).step_by(QUERY_BLOCK) {
            let m = QUERY_BLOCK.min(assign.len() - r0);
            gemm(&bank[r0 * dim..], m, centroids, k, dim, &mut sims);
            for i in 0..m {
                let row = &sims[i * k..(i + 1) * k];
                let best = (0..k)
                    .max_by(|&a, &b| similarity(metric, row[a], csq[a]).total_cmp(&similarity(metric, row[b], csq[b])))
                    .unwrap_or(0);
                assign[r0 + i] = best as u32;
            }
        }
    }

    pub fn lists(&self) -> usize {
        self.offsets.len() - 1
    }

    /// For each query row, the distance to the nearest row among its `probe` best lists, and that
    /// row's index in the bank the index was built from (as [`features::nearest`](super::features::nearest)).
    pub fn search(&self, queries: &[f32], probe: usize) -> (Vec<f32>, Vec<u32>) {
        let (dim, k) = (self.dim, self.lists());
        let nq = queries.len() / dim;
        let probe = probe.clamp(1, k);
        // The lists each query probes, then the queries of each list.
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); k];
        let mut sims = vec![0.0f32; QUERY_BLOCK * k];
        let mut order: Vec<usize> = (0..k).collect();
        for q0 in (0..nq).step_by(QUERY_BLOCK) {
            let m = QUERY_BLOCK.min(nq - q0);
            gemm(&queries[q0 * dim..], m, &self.centroids, k, dim, &mut sims);
            for i in 0..m {
                let row = &sims[i * k..(i + 1) * k];
                let score = |c: usize| similarity(self.metric, row[c], self.centroid_sq[c]);
                order.select_nth_unstable_by(probe - 1, |&a, &b| score(b).total_cmp(&score(a)));
                for &c in &order[..probe] {
                    members[c].push((q0 + i) as u32);
                }
            }
        }
        let mut best = vec![f32::NEG_INFINITY; nq];
        let mut arg = vec![0u32; nq];
        let mut gathered = Vec::new();
        let mut block = Vec::new();
        for (c, qs) in members.iter().enumerate() {
            let (lo, hi) = (self.offsets[c], self.offsets[c + 1]);
            let n = hi - lo;
            if n == 0 {
                continue;
            }
            for chunk in qs.chunks(QUERY_BLOCK) {
                gathered.clear();
                for &q in chunk {
                    gathered.extend_from_slice(&queries[q as usize * dim..(q as usize + 1) * dim]);
                }
                block.resize(chunk.len() * n, 0.0);
                gemm(&gathered, chunk.len(), &self.rows[lo * dim..hi * dim], n, dim, &mut block);
                for (i, &q) in chunk.iter().enumerate() {
                    let row = &block[i * n..(i + 1) * n];
                    for (j, &s) in row.iter().enumerate() {
                        let v = similarity(self.metric, s, self.rows_sq[lo + j]);
                        if v > best[q as usize] {
                            best[q as usize] = v;
                            arg[q as usize] = self.ids[lo + j];
                        }
                    }
                }
            }
        }
        (finish(&best, queries, dim, self.metric), arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::features::nearest_within;

    /// `clusters` tight clusters of unit rows in `dim` dimensions: `per` rows of each for the bank and
    /// `held` more (its held-out neighbours) for the queries.
    fn clustered(clusters: usize, per: usize, held: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(1);
        let (mut bank, mut queries) = (Vec::new(), Vec::new());
        for _ in 0..clusters {
            let centre: Vec<f32> = (0..dim).map(|_| rng.normal()).collect();
            for i in 0..per + held {
                let mut r: Vec<f32> = centre.iter().map(|c| c + 0.35 * rng.normal()).collect();
                let norm = dot(&r, &r).sqrt();
                r.iter_mut().for_each(|v| *v /= norm);
                if i < per { bank.extend(r) } else { queries.extend(r) }
            }
        }
        (bank, queries)
    }

    /// Recall@1 against the exact search, and the largest distance the index added.
    fn recall(metric: Distance, probe: usize) -> (f32, f32) {
        let dim = 48;
        let (bank, queries) = clustered(64, 60, 8, dim);
        let ivf = Ivf::build(&bank, dim, metric, 64, 8, 7);
        let (d_exact, a_exact) = nearest_within(&queries, &[], &bank, &[], dim, 1.0, metric);
        let (d_ivf, a_ivf) = ivf.search(&queries, probe);
        let hits = a_exact.iter().zip(&a_ivf).filter(|(a, b)| a == b).count();
        let worst = d_exact.iter().zip(&d_ivf).map(|(e, i)| i - e).fold(0.0f32, f32::max);
        assert!(d_exact.iter().zip(&d_ivf).all(|(e, i)| i + 1e-4 >= *e), "an approximate distance is never shorter");
        (hits as f32 / a_exact.len() as f32, worst)
    }

    #[test]
    fn probing_every_list_is_exact_and_a_few_lists_find_almost_every_neighbour() {
        for metric in [Distance::Cosine, Distance::L2] {
            let (all, worst) = recall(metric, 64);
            assert_eq!(all, 1.0, "{metric:?}: probing every list is the exact search");
            assert!(worst < 1e-4, "{metric:?}: {worst}");
            let (few, _) = recall(metric, 4);
            assert!(few >= 0.95, "{metric:?}: recall@1 {few} with 4 of 64 lists");
            let (one, _) = recall(metric, 1);
            assert!(one <= few, "{metric:?}: more lists never find fewer");
        }
    }
}
