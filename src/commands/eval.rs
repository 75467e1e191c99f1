//! `anomalyd eval`: few-shot evaluation on MVTec-layout folders, computed the way the papers do.
//!
//! For each category and seed, the shots are `train/good` sorted by name, `[seed*K, (seed+1)*K)`. Every
//! test image is inspected with the enrolment's automatic thresholds; image AUROC, pixel AUROC, PRO
//! (to 30% FPR), image F1-max and the threshold-free accuracy are computed per seed and averaged.
//! Pixel metrics are taken at the anomaly map's resolution (the encoder input), with the ground truth
//! resized to it (nearest) and binarised at > 127.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::commands::measures::{self, ProAccumulator};
use crate::config::detect::{DetectConfig, GeometryChoice, MetricChoice, Switch};
use crate::detect::detector::Detector;
use crate::detect::enrolment::Enrolment;
use crate::detect::inspection::DetectError;
use crate::enrol::learn::Learner;
use crate::util::imageio;
use crate::util::rng::Rng;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(
        "{0} is not an MVTec-layout folder: expected <category>/train/good and <category>/test, or a folder of such categories"
    )]
    NotDataset(PathBuf),
    #[error("category {category}: train/good has {have} images, seed {seed} with {shots} shots needs {need}")]
    NotEnoughShots { category: String, have: usize, seed: u64, shots: usize, need: usize },
    #[error("category {category}: {cause}")]
    Detect { category: String, cause: DetectError },
    #[error("category {category}: cannot use shot: {cause}")]
    Shot { category: String, cause: crate::util::imageio::ImageError },
    #[error(transparent)]
    List(#[from] imageio::ListError),
}

/// Metrics of one category (or their mean), all in 0..=1 except `ms_per_image`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scores {
    pub image_auroc: f64,
    pub pixel_auroc: f64,
    pub pro: f64,
    pub f1_max: f64,
    pub accuracy: f64,
    /// Share of good images judged NG by the automatic threshold.
    pub frr: f64,
    /// Share of defective images judged OK by the automatic threshold.
    pub escape: f64,
    /// Escape rate of the best threshold in hindsight that rejects at most the false-reject target's share of the good images.
    pub best_escape: f64,
    /// Accuracy of the best threshold in hindsight.
    pub hindsight_accuracy: f64,
    pub ms_per_image: f64,
}

impl Scores {
    fn mean(all: &[Scores]) -> Scores {
        let n = all.len().max(1) as f64;
        let avg = |f: fn(&Scores) -> f64| all.iter().map(f).sum::<f64>() / n;
        Scores {
            image_auroc: avg(|s| s.image_auroc),
            pixel_auroc: avg(|s| s.pixel_auroc),
            pro: avg(|s| s.pro),
            f1_max: avg(|s| s.f1_max),
            accuracy: avg(|s| s.accuracy),
            frr: avg(|s| s.frr),
            escape: avg(|s| s.escape),
            best_escape: avg(|s| s.best_escape),
            hindsight_accuracy: avg(|s| s.hindsight_accuracy),
            ms_per_image: avg(|s| s.ms_per_image),
        }
    }
}

/// One seed's run of a category, with what calibration decided (for the record).
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub seed: u64,
    pub shots: Vec<String>,
    pub scores: Scores,
    pub geometry: String,
    pub stationarity: f32,
    pub image_threshold: f32,
    pub pixel_threshold: f32,
    pub calibration_normal: Vec<f32>,
    pub calibration_held_out: Vec<f32>,
    pub calibration_anomaly: Vec<f32>,
    /// What the image threshold was fitted on, and enrolment's warnings.
    pub evidence: String,
    pub warnings: Vec<String>,
    /// Line mode: what the warm-up held and what learning did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<LineRecord>,
    pub images: Vec<ImageRecord>,
}

/// What one seed's warm-up held and what learning did with it.
#[derive(Debug, Clone, Serialize)]
pub struct LineRecord {
    /// Warm-up parts, and how many of them were defective.
    pub parts: usize,
    pub defective: usize,
    /// Parts that entered the model and the bank, parts the guard refused, and defective parts that entered.
    pub entered: usize,
    pub refused: usize,
    pub defective_entered: usize,
    /// The enrolment's image threshold before learning (the learned one is `image_threshold`).
    pub threshold_before: f32,
    /// Rows of the first bank layer before and after learning.
    pub bank_before: usize,
    pub bank_after: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageRecord {
    pub file: String,
    pub anomalous: bool,
    pub score: f32,
    pub verdict: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CategoryReport {
    pub name: String,
    pub mean: Scores,
    pub runs: Vec<Run>,
    /// The false-reject target the thresholds were chosen for.
    pub false_reject_target: f64,
    /// Test files that could not be read, with the reason.
    pub skipped: Vec<String>,
}

/// Test images of a category: (path, defect type, mask path if any).
struct TestItem {
    path: PathBuf,
    kind: String,
    mask: Option<PathBuf>,
}

/// Categories under `dir`: `dir` itself if it has train/good and test/, else every folder below it that
/// does (a folder of datasets, e.g. `../shared/datasets`, down to [`MAX_DEPTH`] levels), named by their
/// path below `dir` (`kolektorsdd/kos`).
pub fn categories(dir: &Path) -> Result<Vec<(String, PathBuf)>, EvalError> {
    if is_category(dir) {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "category".into());
        return Ok(vec![(name, dir.to_path_buf())]);
    }
    let mut cats = Vec::new();
    find_categories(dir, dir, 1, &mut cats)?;
    cats.sort();
    if cats.is_empty() {
        return Err(EvalError::NotDataset(dir.to_path_buf()));
    }
    Ok(cats)
}

/// How deep below the given folder `eval` looks for categories.
pub const MAX_DEPTH: usize = 4;

fn is_category(p: &Path) -> bool {
    p.join("train/good").is_dir() && p.join("test").is_dir()
}

fn find_categories(root: &Path, dir: &Path, depth: usize, out: &mut Vec<(String, PathBuf)>) -> Result<(), EvalError> {
    for p in imageio::list_dir(dir)?.into_iter().filter(|p| p.is_dir()) {
        if is_category(&p) {
            let name = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().into_owned();
            out.push((name, p));
        } else if depth < MAX_DEPTH {
            find_categories(root, &p, depth + 1, out)?;
        }
    }
    Ok(())
}

fn test_items(cat: &Path) -> Result<Vec<TestItem>, EvalError> {
    let mut items = Vec::new();
    for kind_dir in imageio::list_dir(&cat.join("test"))?.into_iter().filter(|p| p.is_dir()) {
        let kind = kind_dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        for path in imageio::image_files(&kind_dir)? {
            let stem = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            let gt = cat.join("ground_truth").join(&kind);
            let mask =
                [gt.join(format!("{stem}_mask.png")), gt.join(format!("{stem}.png")), gt.join(&stem).join("000.png")]
                    .into_iter()
                    .find(|p| p.is_file());
            items.push(TestItem { path, kind: kind.clone(), mask });
        }
    }
    Ok(items)
}

/// What to evaluate: shots per seed, the seeds, the detector settings, and line mode.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub shots: usize,
    pub seeds: &'a [u64],
    pub detect: &'a DetectConfig,
    /// Also run line mode after each enrolment.
    pub line: Option<Line>,
}

/// Line mode as `eval` simulates it: after enrolment, a warm-up stream of `parts` good parts from
/// `train/good` (those not used as shots, in a seeded order) with `contamination` of defective parts
/// taken out of the test split and mixed in; the learner sees no labels. The rest of the test split is
/// then judged with the learned enrolment.
#[derive(Debug, Clone, Copy)]
pub struct Line {
    pub parts: usize,
    pub contamination: f64,
}

/// A category's reports: enrolment only, and line mode when the plan asks for it (named `<name>@line`).
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub enrolment: CategoryReport,
    pub line: Option<CategoryReport>,
}

/// Evaluates one category over the seeds. `on_image` is called after each test image (for progress).
pub fn evaluate(
    det: &mut Detector,
    name: &str,
    dir: &Path,
    plan: &Plan,
    on_image: &mut dyn FnMut(),
    log: &mut dyn FnMut(&str),
) -> Result<Evaluated, EvalError> {
    let Plan { shots, seeds, detect: cfg, line } = *plan;
    let train = imageio::image_files(&dir.join("train/good"))?;
    let items = test_items(dir)?;
    let mut skipped = Vec::new();
    // Decode every test image once; unreadable ones are reported and left out.
    let mut tests = Vec::new();
    for it in items {
        match imageio::load_rgb(&it.path) {
            Ok(img) => tests.push((it, img)),
            Err(e) => {
                log(&format!("skipping {e}"));
                skipped.push(e.to_string());
            }
        }
    }
    let detect_err = |cause| EvalError::Detect { category: name.into(), cause };
    let mut runs = Vec::new();
    let mut line_runs = Vec::new();
    for &seed in seeds {
        let need = (seed as usize + 1) * shots;
        if train.len() < need {
            return Err(EvalError::NotEnoughShots { category: name.into(), have: train.len(), seed, shots, need });
        }
        let shot_range = seed as usize * shots..need;
        let mut refs = Vec::new();
        for p in &train[shot_range.clone()] {
            let img = imageio::load_rgb(p).map_err(|cause| EvalError::Shot { category: name.into(), cause })?;
            refs.push((p.file_name().unwrap_or_default().to_string_lossy().into_owned(), img));
        }
        let enrolment =
            det.enroll(&refs, cfg, &mut |m| log(&format!("{name} seed {seed}: {m}"))).map_err(detect_err)?;
        runs.push(run_seed(det, &enrolment, seed, &refs, &tests.iter().collect::<Vec<_>>(), on_image, name)?);
        if let Some(line) = line {
            let others: Vec<&PathBuf> =
                train.iter().enumerate().filter(|(i, _)| !shot_range.contains(i)).map(|(_, p)| p).collect();
            line_runs.push(line_seed(det, &enrolment, seed, &refs, &others, &tests, line, cfg, on_image, name, log)?);
        }
    }
    let report = |name: String, runs: Vec<Run>| {
        let mean = Scores::mean(&runs.iter().map(|r| r.scores.clone()).collect::<Vec<_>>());
        CategoryReport { name, mean, runs, false_reject_target: cfg.false_reject_target, skipped: skipped.clone() }
    };
    Ok(Evaluated {
        line: line.map(|_| report(format!("{name}@line"), line_runs)),
        enrolment: report(name.into(), runs),
    })
}

/// The plain PatchCore recipe on anomalyd's encoder, shots and pixel budget: every image squashed to
/// the first shot's input, strides 8+16 pooled 3x3 and concatenated, L2 nearest neighbour anywhere in
/// the bank (exactly), no background mask, image score = the largest patch distance.
pub fn patchcore(cfg: &DetectConfig) -> DetectConfig {
    DetectConfig {
        search_lists: 0,
        metric: MetricChoice::L2,
        window: 1.0,
        geometry: GeometryChoice::Aligned,
        foreground: Switch::Off,
        score_strides: Some(Vec::new()),
        top_fraction: 1e-9,
        scale_augment: Vec::new(),
        ..cfg.clone()
    }
}

/// One seed of line mode: the warm-up stream is learned from, then the test split less the defects
/// that went into the stream is judged with the learned enrolment.
#[allow(clippy::too_many_arguments)]
fn line_seed(
    det: &mut Detector,
    enrolment: &Enrolment,
    seed: u64,
    refs: &[(String, image::RgbImage)],
    others: &[&PathBuf],
    tests: &[(TestItem, image::RgbImage)],
    line: Line,
    cfg: &DetectConfig,
    on_image: &mut dyn FnMut(),
    name: &str,
    log: &mut dyn FnMut(&str),
) -> Result<Run, EvalError> {
    let detect_err = |cause| EvalError::Detect { category: name.into(), cause };
    let mut rng = Rng::new(seed ^ 0x11AE);
    let mut goods: Vec<&PathBuf> = others.to_vec();
    shuffle(&mut goods, &mut rng);
    goods.truncate(line.parts);
    let defects: Vec<usize> = {
        let mut d: Vec<usize> = (0..tests.len()).filter(|&i| tests[i].0.kind != "good").collect();
        shuffle(&mut d, &mut rng);
        let want = (goods.len() as f64 * line.contamination / (1.0 - line.contamination)).round() as usize;
        d.truncate(want);
        d
    };
    // The stream, in a seeded order: (image, defective).
    let mut stream: Vec<(image::RgbImage, bool)> = Vec::new();
    for p in &goods {
        let img = imageio::load_rgb(p).map_err(|cause| EvalError::Shot { category: name.into(), cause })?;
        stream.push((img, false));
    }
    stream.extend(defects.iter().map(|&i| (tests[i].1.clone(), true)));
    shuffle(&mut stream, &mut rng);
    log(&format!(
        "{name} seed {seed}: line mode: {} warm-up parts ({} good, {} defective)",
        stream.len(),
        goods.len(),
        defects.len()
    ));
    let mut learner = Learner::new(stream.len());
    for (img, _) in &stream {
        let score = det.inspect(enrolment, img).map_err(detect_err)?.verdict.score;
        learner.add(enrolment, img, score);
    }
    let (learned, report) =
        learner.finish(det, enrolment, cfg, &mut |m| log(&format!("{name} seed {seed}: {m}"))).map_err(detect_err)?;
    let judged: Vec<&(TestItem, image::RgbImage)> =
        tests.iter().enumerate().filter(|(i, _)| !defects.contains(i)).map(|(_, t)| t).collect();
    let mut run = run_seed(det, &learned, seed, refs, &judged, on_image, name)?;
    let defective_entered = stream.iter().zip(&report.kept).filter(|((_, bad), kept)| *bad && **kept).count();
    run.line = Some(LineRecord {
        parts: report.parts,
        defective: defects.len(),
        entered: report.entered,
        refused: report.refused,
        defective_entered,
        threshold_before: report.threshold_before,
        bank_before: report.bank_before,
        bank_after: report.bank_after,
    });
    Ok(run)
}

/// Fisher-Yates with the project's seeded generator.
fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u32 + 1) as usize);
    }
}

fn run_seed(
    det: &mut Detector,
    enrolment: &Enrolment,
    seed: u64,
    refs: &[(String, image::RgbImage)],
    tests: &[&(TestItem, image::RgbImage)],
    on_image: &mut dyn FnMut(),
    name: &str,
) -> Result<Run, EvalError> {
    let mut scores = Vec::new();
    let mut labels = Vec::new();
    let mut verdicts = Vec::new();
    let mut pixel_scores: Vec<f32> = Vec::new();
    let mut pixel_labels: Vec<bool> = Vec::new();
    let mut pro = ProAccumulator::default();
    let mut records = Vec::new();
    let mut total_ms = 0.0f64;
    for (it, img) in tests.iter().map(|t| (&t.0, &t.1)) {
        let t = Instant::now();
        let ins = det.inspect(enrolment, img).map_err(|cause| EvalError::Detect { category: name.into(), cause })?;
        total_ms += t.elapsed().as_secs_f64() * 1e3;
        let anomalous = it.kind != "good";
        scores.push(ins.verdict.score);
        labels.push(anomalous);
        verdicts.push(ins.verdict.anomalous);
        records.push(ImageRecord {
            file: format!("{}/{}", it.kind, it.path.file_name().unwrap_or_default().to_string_lossy()),
            anomalous,
            score: ins.verdict.score,
            verdict: ins.verdict.anomalous,
        });
        // Pixel metrics: normal images count as all-normal; defects without a mask are left out.
        let (mw, mh) = (ins.map.w, ins.map.h);
        let mask: Option<Vec<bool>> = if !anomalous {
            Some(vec![false; mw * mh])
        } else {
            it.mask.as_ref().and_then(|p| imageio::load_mask(p).ok()).map(|m| {
                let m = image::imageops::resize(&m, mw as u32, mh as u32, image::imageops::FilterType::Nearest);
                m.pixels().map(|p| p.0[0] > 127).collect()
            })
        };
        if let Some(mask) = mask {
            pixel_scores.extend_from_slice(&ins.map.data);
            pixel_labels.extend_from_slice(&mask);
            pro.add(&ins.map.data, &mask, mw);
        }
        on_image();
    }
    let m = &enrolment.meta;
    let op = measures::operating_point(&scores, &verdicts, &labels, m.calibration.false_reject_target);
    Ok(Run {
        seed,
        shots: refs.iter().map(|(n, _)| n.clone()).collect(),
        scores: Scores {
            image_auroc: measures::auroc(&scores, &labels),
            pixel_auroc: measures::auroc(&pixel_scores, &pixel_labels),
            pro: pro.aupro(0.3, 300),
            f1_max: measures::f1_max(&scores, &labels),
            accuracy: measures::accuracy(&verdicts, &labels),
            frr: op.frr,
            escape: op.escape,
            best_escape: op.best_escape,
            hindsight_accuracy: op.hindsight_accuracy,
            ms_per_image: total_ms / tests.len().max(1) as f64,
        },
        geometry: match m.geometry {
            crate::detect::enrolment::Geometry::Aligned { width, height } => {
                format!("aligned {width}x{height}")
            }
            crate::detect::enrolment::Geometry::Texture { scale, .. } => format!("texture x{scale:.3}"),
            crate::detect::enrolment::Geometry::Fit { pixels } => format!("fit {pixels} px"),
        },
        stationarity: m.calibration.stationarity,
        image_threshold: m.thresholds.image,
        pixel_threshold: m.thresholds.pixel,
        calibration_normal: m.calibration.normal.clone(),
        calibration_held_out: m.calibration.held_out.clone(),
        calibration_anomaly: m.calibration.anomaly.clone(),
        evidence: m.calibration.evidence.clone(),
        warnings: m.calibration.warnings.clone(),
        line: None,
        images: records,
    })
}

/// The `--json` report: `{"false_reject_target": f, "categories": {name: scores}, "mean": scores,
/// "runs": {name: [...]}}`; each run keeps its per-image records (`images`: file, anomalous, score, verdict).
pub fn report_json(reports: &[CategoryReport]) -> serde_json::Value {
    let mean = Scores::mean(&reports.iter().map(|r| r.mean.clone()).collect::<Vec<_>>());
    serde_json::json!({
        "false_reject_target": reports.first().map(|r| r.false_reject_target),
        "categories": reports.iter().map(|r| (r.name.clone(), serde_json::to_value(&r.mean).unwrap_or_default())).collect::<serde_json::Map<_, _>>(),
        "mean": mean,
        "runs": reports.iter().map(|r| (r.name.clone(), serde_json::to_value(&r.runs).unwrap_or_default())).collect::<serde_json::Map<_, _>>(),
        "skipped": reports.iter().flat_map(|r| r.skipped.clone()).collect::<Vec<_>>(),
    })
}

/// The printed table.
pub fn table(reports: &[CategoryReport]) -> String {
    let target = format!("best@{:.0}%", reports.first().map_or(0.0, |r| r.false_reject_target) * 100.0);
    let w = reports.iter().map(|r| r.name.len()).max().unwrap_or(0).max(20);
    let mut s = format!(
        "{:<w$} {:>9} {:>9} {:>7} {:>7} {:>9} {:>6} {:>6} {:>8} {:>9} {:>9}\n",
        "category",
        "img AUROC",
        "pix AUROC",
        "PRO",
        "F1-max",
        "accuracy",
        "FRR",
        "escape",
        target,
        "hindsight",
        "ms/image"
    );
    let row = |name: &str, m: &Scores| {
        format!(
            "{:<w$} {:>9.3} {:>9.3} {:>7.3} {:>7.3} {:>9.3} {:>6.2} {:>6.2} {:>8.2} {:>9.3} {:>9.1}\n",
            name,
            m.image_auroc,
            m.pixel_auroc,
            m.pro,
            m.f1_max,
            m.accuracy,
            m.frr,
            m.escape,
            m.best_escape,
            m.hindsight_accuracy,
            m.ms_per_image
        )
    };
    for r in reports {
        s += &row(&r.name, &r.mean);
    }
    if reports.len() > 1 {
        s += &row("mean", &Scores::mean(&reports.iter().map(|r| r.mean.clone()).collect::<Vec<_>>()));
    }
    s
}
