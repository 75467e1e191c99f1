//! Criterion benches of the inspection path on the built-in demo part (1 shot, default settings):
//! the whole inspection, and the decoder's nearest-neighbour search alone, exact and approximate (an
//! inverted file) on a texture-sized bank. Benchmarks, not timed tests.

use anomalyd::config::detect::DetectConfig;
use anomalyd::config::engine::{EngineConfig, Provider};
use anomalyd::detect::detector::Detector;
use anomalyd::detect::features;
use anomalyd::engine::encoder::Encoder;
use anomalyd::source::demo::{self, Defect};
use criterion::{Criterion, criterion_group, criterion_main};

fn inspect(c: &mut Criterion) {
    let cfg = EngineConfig { providers: vec![Provider::Cpu], ..EngineConfig::default() };
    let encoder = match Encoder::load(&cfg) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    let mut det = Detector::new(encoder);
    let refs = vec![("ref".to_string(), demo::part(0, Defect::None))];
    let enrolment = det.enroll(&refs, &DetectConfig::default(), &mut |_| {}).expect("demo part enrols");
    let frame = demo::part(1, Defect::Scratch);
    c.bench_function("inspect demo part (1 shot, default size)", |b| {
        b.iter(|| det.inspect(&enrolment, &frame).expect("inspects"))
    });

    // The decoder's search at the default size: a 36 x 28 grid of 152-dim patches against one shot.
    let bank = &enrolment.banks[0];
    let q = bank.rows.clone();
    c.bench_function("nearest: 1008 queries x 1008 bank x 152", |b| {
        b.iter(|| features::nearest(std::hint::black_box(&q), &bank.rows, bank.dim))
    });
}

/// The search on a bank the size of a texture's (16,384 rows, `detect.max_bank`) of 152-dim unit rows in
/// 512 clusters, for 1,008 queries: exact, and through an inverted file of 128 lists probing 8 and 16.
fn search(c: &mut Criterion) {
    use anomalyd::detect::features::{Distance, nearest};
    use anomalyd::detect::ivf::Ivf;
    let (dim, clusters, per) = (152, 512, 34);
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
        let centre: Vec<f32> = (0..dim).map(|_| normal()).collect();
        for _ in 0..per {
            let mut r: Vec<f32> = centre.iter().map(|c| c + 0.4 * normal()).collect();
            let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.iter_mut().for_each(|v| *v /= n);
            rows.extend(r);
        }
    }
    // Every 17th row is a query (a held-out neighbour of the bank's), the rest the bank.
    let (mut bank, mut queries) = (Vec::new(), Vec::new());
    for (i, r) in rows.chunks_exact(dim).enumerate() {
        if i % 17 == 16 { queries.extend_from_slice(r) } else { bank.extend_from_slice(r) }
    }
    let (bank, queries) = (&bank[..], &queries[..1008 * dim]);
    let ivf = Ivf::build(bank, dim, Distance::Cosine, 128, 8, 0x1f);
    // Recall@1 beside the times: the share of queries whose nearest row the index finds.
    let (_, exact) = nearest(queries, bank, dim);
    for probe in [8, 16] {
        let (_, found) = ivf.search(queries, probe);
        let hits = exact.iter().zip(&found).filter(|(a, b)| a == b).count();
        eprintln!("ivf 128 lists, probe {probe}: recall@1 {:.3}", hits as f32 / exact.len() as f32);
    }
    let mut g = c.benchmark_group("search 1008 queries x 16384 bank x 152");
    g.sample_size(20);
    g.bench_function("exact", |b| b.iter(|| nearest(std::hint::black_box(queries), bank, dim)));
    for probe in [8, 16] {
        g.bench_function(format!("ivf 128 lists, probe {probe}"), |b| {
            b.iter(|| ivf.search(std::hint::black_box(queries), probe))
        });
    }
    g.finish();
}

criterion_group!(benches, inspect, search);
criterion_main!(benches);
