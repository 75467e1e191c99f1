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

#[path = "common/bank.rs"]
mod bank;

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
    let (bank, queries) = bank::generated();
    let (bank, queries, dim) = (&bank[..], &queries[..], bank::DIM);
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
