//! Criterion benches of the inspection path on the built-in demo part (1 shot, default settings):
//! the whole inspection, and the decoder's nearest-neighbour search alone. Benchmarks, not timed tests.

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

criterion_group!(benches, inspect);
criterion_main!(benches);
