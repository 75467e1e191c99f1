//! How well labelled regions name the defect class of new ones on a real category whose test split is
//! sorted by defect type (magnetic_tile: blowhole, break, crack, fray, uneven). Enrols `shots` good
//! images, inspects every defective test image, and takes its strongest region (as the verdict would
//! outline it). Then, for each seed, `k` regions of each type are the operator's labels and the others
//! are labelled from them ([`anomalyd::detect::classes`]): it prints the share labelled right, the share
//! left without a label, and the share a guess of the commonest type would get right.
//!
//! With `deep` as a fourth argument, each region is described instead by the encoder's mean feature over
//! a crop around it (unit length, scaled to the distance bound): a trial of a learned descriptor.
//!
//!     cargo run --release --example classes_eval -- ../shared/datasets/magnetic_tile/magnetic_tile 4 1,3,5,10 [deep]

use std::collections::BTreeMap;

use anomalyd::config::detect::DetectConfig;
use anomalyd::config::engine::{EngineConfig, Provider};
use anomalyd::detect::classes::{self, Example};
use anomalyd::detect::detector::Detector;
use anomalyd::detect::regions;
use anomalyd::util::imageio;
use anomalyd::util::rng::Rng;

fn images(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| imageio::is_image(p)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).expect("usage: classes_eval CATEGORY_DIR [shots] [k,...] [deep]"));
    let shots: usize = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let ks: Vec<usize> = args.get(3).map_or("1,3,5", |s| s).split(',').map(|p| p.parse()).collect::<Result<_, _>>()?;
    let deep = args.get(4).is_some_and(|a| a == "deep");
    let mut det = Detector::load(&EngineConfig { providers: vec![Provider::Cpu], ..EngineConfig::default() })?;
    let refs = images(&dir.join("train/good"))
        .into_iter()
        .take(shots)
        .map(|p| Ok((p.display().to_string(), imageio::load_rgb(&p)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = DetectConfig::default();
    let e = det.enroll(&refs, &cfg, &mut |_| {})?;
    let pixel = e.meta.thresholds.pixel;
    // The strongest region of every defective test image, by type.
    let mut by_type: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
    let mut without = 0usize;
    for t in std::fs::read_dir(dir.join("test"))?.filter_map(|d| d.ok()).map(|d| d.path()) {
        let name = t.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name == "good" || !t.is_dir() {
            continue;
        }
        for p in images(&t) {
            let img = imageio::load_rgb(&p)?;
            let ins = det.inspect(&e, &img)?;
            let mut found = regions::find(&ins.map, pixel, e.meta.min_region, img.width(), img.height());
            if found.is_empty() {
                // As the verdict outlines an anomalous image with no pixel over the mask threshold.
                let peak = ins.map.max();
                let mean = ins.map.data.iter().sum::<f32>() / ins.map.data.len().max(1) as f32;
                found = regions::find(&ins.map, 0.5 * (peak + mean), e.meta.min_region, img.width(), img.height());
            }
            match found.first() {
                Some(r) if deep => {
                    // Trial: the encoder's mean feature over a crop around the region, unit length.
                    let [x, y, w, h] = r.bbox;
                    let pad = (w.max(h) / 2).max(16);
                    let (x0, y0) = (x.saturating_sub(pad), y.saturating_sub(pad));
                    let (x1, y1) = ((x + w + pad).min(img.width()), (y + h + pad).min(img.height()));
                    let crop = image::imageops::crop_imm(&img, x0, y0, x1 - x0, y1 - y0).to_image();
                    let crop = imageio::resize(&crop, 96, 96);
                    let p = det.patches(&crop, &e.meta.groups[..1], e.meta.pool, &e.meta.distances[..1])?.remove(0);
                    let n = (p.rows.len() / p.dim) as f32;
                    let mut v: Vec<f32> =
                        (0..p.dim).map(|c| p.rows.iter().skip(c).step_by(p.dim).sum::<f32>() / n).collect();
                    let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-6);
                    v.iter_mut().for_each(|a| *a = *a / norm * 3.0);
                    by_type.entry(name.clone()).or_default().push(v)
                }
                Some(r) => by_type.entry(name.clone()).or_default().push(classes::describe(&img, &ins.map, r, pixel)),
                None => without += 1,
            }
        }
        eprintln!("{name}: {} regions", by_type.get(&name).map_or(0, Vec::len));
    }
    let total: usize = by_type.values().map(Vec::len).sum();
    println!(
        "{}: {shots} shot(s), {total} defect regions of {} types ({without} images without a region)",
        dir.display(),
        by_type.len()
    );
    println!("k labelled per type | labelled right | left without a label | commonest type's share of the queries");
    for &k in &ks {
        let (mut right, mut unlabelled, mut queries, mut commonest) = (0usize, 0usize, 0usize, 0usize);
        for seed in 0..3u64 {
            let mut rng = Rng::new(seed);
            let mut library: Vec<Example> = Vec::new();
            let mut asked: Vec<(&str, &Vec<f32>)> = Vec::new();
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for (t, ds) in &by_type {
                let mut order: Vec<usize> = (0..ds.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i as u32 + 1) as usize);
                }
                for (n, &i) in order.iter().enumerate() {
                    if n < k {
                        let descriptor = ds[i].clone();
                        library.push(Example {
                            label: t.clone(),
                            descriptor,
                            frame_id: String::new(),
                            by: String::new(),
                        });
                    } else {
                        asked.push((t, &ds[i]));
                        *counts.entry(t).or_default() += 1;
                    }
                }
            }
            for (t, d) in &asked {
                match classes::classify(&library, d) {
                    Some((label, _)) if label == *t => right += 1,
                    Some(_) => {}
                    None => unlabelled += 1,
                }
            }
            queries += asked.len();
            commonest += counts.values().max().copied().unwrap_or(0);
        }
        let pct = |n: usize| 100.0 * n as f64 / queries.max(1) as f64;
        println!("{k} | {:.1}% | {:.1}% | {:.1}%", pct(right), pct(unlabelled), pct(commonest));
    }
    Ok(())
}
