//! Defect classes taught by labelling regions: the next similar defect carries the label, a different
//! one does not take it, and the library survives the enrolment file.

use anomalyd::config::detect::DetectConfig;
use anomalyd::enrol::teach;
use anomalyd::source::demo::{self, Defect};

use crate::common::detector;

#[test]
fn a_labelled_region_labels_the_next_similar_defect_and_not_a_different_one() {
    let mut det = detector();
    let cfg = DetectConfig::default();
    let e = det.enroll(&demo::reference(), &cfg, &mut |_| {}).unwrap();
    // Before any label, regions carry none.
    let first_blob = demo::part(6, Defect::Blob);
    let ins = det.inspect(&e, &first_blob).unwrap();
    assert!(ins.verdict.regions.iter().all(|r| r.label.is_none() && r.label_confidence.is_none()));
    // An operator labels the blob a stain and a scratch a scratch, each on one frame.
    let stain = &ins.verdict.regions[0];
    let e = teach::label(&mut det, &e, &first_blob, stain, "Stain", "cam-1-6", "anna").unwrap();
    // A scratch is like no stain: with only stains in the library it takes no label.
    let first_scratch = demo::part(5, Defect::Scratch);
    let scratch = det.inspect(&e, &first_scratch).unwrap().verdict.regions[0].clone();
    assert_eq!(scratch.label, None, "a scratch is not a stain: {scratch:?}");
    let e = teach::label(&mut det, &e, &first_scratch, &scratch, "scratch", "cam-1-5", "anna").unwrap();
    assert_eq!(anomalyd::detect::classes::known_labels(&e.meta.classes), ["stain", "scratch"]);
    // New parts: each defect takes its own class.
    for (v, defect, want) in [
        (9, Defect::Blob, "stain"),
        (12, Defect::Blob, "stain"),
        (7, Defect::Scratch, "scratch"),
        (11, Defect::Scratch, "scratch"),
    ] {
        let ins = det.inspect(&e, &demo::part(v, defect)).unwrap();
        let r = &ins.verdict.regions[0];
        eprintln!("part {v} ({defect:?}): {:?} {:?}", r.label, r.label_confidence);
        assert_eq!(r.label.as_deref(), Some(want), "part {v}: {:?}", ins.verdict.regions);
        assert!(r.label_confidence.unwrap() > 0.5, "{r:?}");
    }
    // The library is part of the enrolment: saved and loaded with it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.enrol");
    anomalyd::enrol::file::save(&e, &path).unwrap();
    assert_eq!(anomalyd::enrol::file::load(&path).unwrap().meta.classes, e.meta.classes);
    // A bad label is refused with the reason, and nothing is made.
    let err = teach::label(&mut det, &e, &first_blob, stain, "<b>oops</b>", "cam-1-6", "anna").unwrap_err();
    assert!(err.to_string().contains("a label is 1 to 40 letters"), "{err}");
}
