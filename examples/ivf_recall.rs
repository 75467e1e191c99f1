//! How the approximate search (`detect.search_lists`, an inverted file) compares with the exact one on
//! a real category: enrols one shot, then scores test images both ways and prints the share of patch
//! distances it found exactly (recall@1 of the distance grid), how much farther the others are, how the
//! image score moves, and the decoder's time.
//!
//!     cargo run --release --example ivf_recall -- ../shared/datasets/mvtec_ad/magnetic_tile 128 4,8,16

use anomalyd::config::detect::DetectConfig;
use anomalyd::config::engine::{EngineConfig, Provider};
use anomalyd::detect::detector::Detector;
use anomalyd::util::imageio;

fn images(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).expect("usage: ivf_recall CATEGORY_DIR [lists] [probes]"));
    let lists: usize = args.get(2).map_or(Ok(128), |s| s.parse())?;
    let probes: Vec<usize> =
        args.get(3).map_or("4,8,16", |s| s).split(',').map(|p| p.parse()).collect::<Result<_, _>>()?;
    let mut det = Detector::load(&EngineConfig { providers: vec![Provider::Cpu], ..EngineConfig::default() })?;
    let shot = images(&dir.join("train/good")).into_iter().next().expect("train/good holds an image");
    let refs = vec![(shot.display().to_string(), imageio::load_rgb(&shot)?)];
    let cfg = DetectConfig { search_lists: lists, search_probe: probes[0], ..DetectConfig::default() };
    let e = det.enroll(&refs, &cfg, &mut |_| {})?;
    let indexed = e.index.iter().filter(|i| i.is_some()).count();
    println!(
        "{}: {} bank layer(s), rows {:?}, {indexed} indexed ({lists} lists)",
        dir.display(),
        e.banks.len(),
        e.banks.iter().map(|b| b.len()).collect::<Vec<_>>()
    );
    if indexed == 0 {
        println!("nothing indexed (an aligned product, or a bank under 4096 rows): the search stays exact");
        return Ok(());
    }
    let mut tests: Vec<_> =
        std::fs::read_dir(dir.join("test"))?.filter_map(|d| d.ok()).flat_map(|d| images(&d.path())).collect();
    tests.sort();
    let step = (tests.len() / 40).max(1);
    let tests: Vec<_> = tests.into_iter().step_by(step).collect();
    println!(
        "{} test images; probe | distances found exactly | mean extra distance (others) | image score change: mean, largest | decoder ms (exact)",
        tests.len()
    );
    let mut rows: Vec<(usize, f64, f64, f64, f64, f64, f64)> =
        probes.iter().map(|&p| (p, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)).collect();
    let mut n_extra = vec![0usize; probes.len()];
    for path in &tests {
        let img = imageio::load_rgb(path)?;
        let (w, h) = e.meta.geometry.input_size(img.width(), img.height());
        let prepared = imageio::resize(&img, w, h);
        let exact = det.score_prepared(&e.meta, &e.banks, &prepared)?;
        for (k, &p) in probes.iter().enumerate() {
            let mut meta = e.meta.clone();
            meta.search.probe = p;
            let approx = det.score_indexed(&meta, &e.banks, &e.index, &prepared)?;
            let (a, b) = (&exact.patch_grid.data, &approx.patch_grid.data);
            let same = a.iter().zip(b).filter(|(x, y)| (*x - *y).abs() <= 1e-6 * x.abs().max(1e-3)).count();
            let extra: Vec<f64> = a
                .iter()
                .zip(b)
                .filter(|(x, y)| (*x - *y).abs() > 1e-6 * x.abs().max(1e-3))
                .map(|(x, y)| ((y - x) / x.max(1e-6)) as f64)
                .collect();
            let change = ((approx.score - exact.score) / exact.score.abs().max(1e-6)) as f64;
            let r = &mut rows[k];
            r.1 += same as f64 / a.len() as f64;
            r.2 += extra.iter().sum::<f64>();
            n_extra[k] += extra.len();
            r.3 += change;
            r.4 = r.4.max(change.abs());
            r.5 += approx.timings.decoder_ms as f64;
            r.6 += exact.timings.decoder_ms as f64;
        }
    }
    let n = tests.len() as f64;
    for (k, r) in rows.iter().enumerate() {
        println!(
            "probe {:>3} | {:.4} | {:+.2}% | {:+.3}%, {:.3}% | {:.1} ({:.1})",
            r.0,
            r.1 / n,
            100.0 * r.2 / n_extra[k].max(1) as f64,
            100.0 * r.3 / n,
            100.0 * r.4,
            r.5 / n,
            r.6 / n
        );
    }
    Ok(())
}
