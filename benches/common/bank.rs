//! The generated bank the search benches share: 16,384 unit rows of 152 dimensions in 512 clusters (a
//! texture-sized bank, `detect.max_bank`), every 17th row held out as a query (a neighbour the bank has
//! not seen), 1,008 queries.

pub const DIM: usize = 152;

/// `(bank, queries)`, row-major, `DIM` values a row.
pub fn generated() -> (Vec<f32>, Vec<f32>) {
    let (clusters, per) = (512, 34);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut normal = move || {
        // Sum of uniforms: close enough to Gaussian for a benchmark's data.
        (0..4)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .sum::<f32>()
    };
    let mut rows = Vec::new();
    for _ in 0..clusters {
        let centre: Vec<f32> = (0..DIM).map(|_| normal()).collect();
        for _ in 0..per {
            let mut r: Vec<f32> = centre.iter().map(|c| c + 0.4 * normal()).collect();
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.iter_mut().for_each(|v| *v /= n);
            rows.extend(r);
        }
    }
    let (mut bank, mut queries) = (Vec::new(), Vec::new());
    for (i, r) in rows.chunks_exact(DIM).enumerate() {
        if i % 17 == 16 { queries.extend_from_slice(r) } else { bank.extend_from_slice(r) }
    }
    queries.truncate(1008 * DIM);
    (bank, queries)
}
