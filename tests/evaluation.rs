//! `eval` on a generated MVTec-layout category: metrics in range, perfect on easy defects, JSON schema.

use std::path::Path;

use anomalyd::commands::eval;
use anomalyd::config::detect::DetectConfig;
use anomalyd::source::demo::{self, Defect};
use image::{GrayImage, Luma};

fn write_category(root: &Path) {
    for d in ["train/good", "test/good", "test/scratch", "test/blob", "ground_truth/scratch", "ground_truth/blob"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // Shots for two seeds, and the rest for line mode's warm-up.
    for i in 0..10 {
        demo::part(i, Defect::None).save(root.join(format!("train/good/{i:03}.png"))).unwrap();
    }
    for i in 0..3u64 {
        demo::part(10 + i, Defect::None).save(root.join(format!("test/good/{i:03}.png"))).unwrap();
        for (kind, defect, variant) in [("scratch", Defect::Scratch, 20 + i), ("blob", Defect::Blob, 30 + i)] {
            let bad = demo::part(variant, defect);
            let good = demo::part(variant, Defect::None);
            bad.save(root.join(format!("test/{kind}/{i:03}.png"))).unwrap();
            // The mask marks exactly the pixels the defect changed.
            let mask = GrayImage::from_fn(bad.width(), bad.height(), |x, y| {
                Luma([if bad.get_pixel(x, y) != good.get_pixel(x, y) { 255 } else { 0 }])
            });
            mask.save(root.join(format!("ground_truth/{kind}/{i:03}_mask.png"))).unwrap();
        }
    }
    // A corrupt test file is reported and skipped, not fatal.
    std::fs::write(root.join("test/good/corrupt.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
}

#[test]
fn eval_on_a_generated_category() {
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("parts");
    write_category(&cat);
    let cats = eval::categories(dir.path()).unwrap();
    assert_eq!(cats.len(), 1);
    let mut det = crate::common::detector();
    let mut seen = 0;
    let detect = DetectConfig::default();
    let plan = eval::Plan { shots: 1, seeds: &[0, 1], detect: &detect, line: None };
    let report = eval::evaluate(&mut det, "parts", &cat, &plan, &mut || seen += 1, &mut |_| {}).unwrap();
    assert!(report.line.is_none());
    let report = report.enrolment;
    assert_eq!(seen, 2 * 9);
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    let m = &report.mean;
    assert_eq!(m.image_auroc, 1.0, "{m:?}");
    assert!(m.pixel_auroc > 0.9 && m.pixel_auroc <= 1.0, "{m:?}");
    assert!(m.pro > 0.5 && m.pro <= 1.0, "{m:?}");
    // 9 images a seed; thin scratches can fall under the automatic threshold (see the detection tests).
    assert!(m.accuracy >= 7.0 / 9.0 - 1e-9, "{m:?}");
    let json = eval::report_json(&[report]);
    assert_eq!(json["false_reject_target"], detect.false_reject_target);
    for key in
        ["image_auroc", "pixel_auroc", "pro", "f1_max", "accuracy", "frr", "escape", "best_escape", "ms_per_image"]
    {
        assert!(json["categories"]["parts"][key].is_number(), "{key}: {json}");
        assert!(json["mean"][key].is_number(), "{key}");
    }
}

#[test]
fn eval_runs_line_mode_on_a_contaminated_warm_up_and_judges_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("parts");
    write_category(&cat);
    let mut det = crate::common::detector();
    let detect = DetectConfig::default();
    // 9 unused good parts and, at 20% contamination, 2 defective ones from the test split.
    let line = eval::Line { parts: 50, contamination: 0.2 };
    let plan = eval::Plan { shots: 1, seeds: &[0], detect: &detect, line: Some(line) };
    let mut seen = 0;
    let e = eval::evaluate(&mut det, "parts", &cat, &plan, &mut || seen += 1, &mut |_| {}).unwrap();
    let line = e.line.expect("a line-mode report");
    assert_eq!(line.name, "parts@line");
    let run = &line.runs[0];
    let rec = run.line.as_ref().unwrap();
    assert_eq!((rec.parts, rec.defective), (11, 2), "{rec:?}");
    assert_eq!(rec.entered + rec.refused, rec.parts);
    // The two defects that went into the warm-up are not judged again.
    assert_eq!(run.images.len(), e.enrolment.runs[0].images.len() - 2);
    assert_eq!(seen, 2 * 9 - 2);
    let json = eval::report_json(&[e.enrolment, line]);
    assert!(json["runs"]["parts@line"][0]["line"]["entered"].is_number(), "{json}");
    assert!(json["categories"]["parts@line"]["frr"].is_number());
}

#[test]
fn a_folder_of_datasets_is_walked_to_every_category() {
    let dir = tempfile::tempdir().unwrap();
    for cat in ["mvtec/bottle", "mvtec/cable", "kolektorsdd/kos", "deep/a/b/c"] {
        std::fs::create_dir_all(dir.path().join(cat).join("train/good")).unwrap();
        std::fs::create_dir_all(dir.path().join(cat).join("test/good")).unwrap();
    }
    // A category's own test folders are not searched for more categories, nor are folders too deep.
    std::fs::create_dir_all(dir.path().join("too/deep/to/be/found/train/good")).unwrap();
    std::fs::create_dir_all(dir.path().join("too/deep/to/be/found/test")).unwrap();
    let names: Vec<String> = eval::categories(dir.path()).unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["deep/a/b/c", "kolektorsdd/kos", "mvtec/bottle", "mvtec/cable"]);
}

#[test]
fn eval_refuses_a_folder_that_is_not_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let err = eval::categories(dir.path()).unwrap_err().to_string();
    assert!(err.contains("MVTec-layout"), "{err}");
}
