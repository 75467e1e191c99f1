//! Regions an operator ignores or inspects: a defect inside an ignore zone passes, one outside is still
//! found; calibration scores with the zones and places its simulated defects where they inspect; the
//! lesson from the station calibrates exactly as an enrolment with the zones.

use anomalyd::config::detect::DetectConfig;
use anomalyd::detect::zones::{Zone, ZoneKind};
use anomalyd::source::demo::{self, Defect};

use crate::common::detector;

fn rect(kind: ZoneKind, x0: f32, y0: f32, x1: f32, y1: f32) -> Zone {
    Zone { kind, points: vec![[x0, y0], [x1, y0], [x1, y1], [x0, y1]] }
}

/// Around the demo's blob (x 228-262, y 185-216 of 320 x 240), with a margin.
fn around_blob() -> Zone {
    rect(ZoneKind::Ignore, 0.68, 0.72, 0.86, 0.95)
}

#[test]
fn an_ignore_zone_passes_a_defect_inside_it_and_still_finds_one_outside() {
    let mut det = detector();
    let cfg = DetectConfig::default();
    let refs = [("ref".to_string(), demo::part(0, Defect::None))];
    let plain = det.enroll(&refs, &cfg, &mut |_| {}).unwrap();
    let zoned = det.enroll_with_zones(&refs, &[around_blob()], &cfg, &mut |_| {}).unwrap();
    assert_eq!(zoned.meta.zones, vec![around_blob()]);
    for v in [6, 9] {
        let blob = demo::part(v, Defect::Blob);
        assert!(det.inspect(&plain, &blob).unwrap().verdict.anomalous, "blob part {v} is NG without the zone");
        let ins = det.inspect(&zoned, &blob).unwrap();
        assert!(!ins.verdict.anomalous, "blob part {v} passes inside the ignore zone: {:?}", ins.verdict);
    }
    for v in [5, 7] {
        let ins = det.inspect(&zoned, &demo::part(v, Defect::Scratch)).unwrap();
        assert!(ins.verdict.anomalous, "scratch part {v}, outside the zone, is still NG");
        assert!(!ins.verdict.regions.is_empty());
    }
    for v in 1..4 {
        assert!(!det.inspect(&zoned, &demo::part(v, Defect::None)).unwrap().verdict.anomalous, "good part {v}");
    }
    // The zones change no identity of an enrolment without them (the field is left out of the file).
    let bytes = anomalyd::enrol::file::encode(&plain.meta, &plain.banks);
    assert!(!String::from_utf8_lossy(&bytes[..4096.min(bytes.len())]).contains("zones"));
}

#[test]
fn an_inspect_zone_limits_inspection_and_simulated_defects_land_inside_it() {
    let mut det = detector();
    let cfg = DetectConfig::default();
    let refs = [("ref".to_string(), demo::part(0, Defect::None))];
    // Only the left half is inspected: the scratch (top left) is found, the blob (bottom right) is not.
    let left = rect(ZoneKind::Inspect, 0.0, 0.0, 0.5, 1.0);
    let e = det.enroll_with_zones(&refs, std::slice::from_ref(&left), &cfg, &mut |_| {}).unwrap();
    assert!(det.inspect(&e, &demo::part(5, Defect::Scratch)).unwrap().verdict.anomalous);
    assert!(!det.inspect(&e, &demo::part(6, Defect::Blob)).unwrap().verdict.anomalous);
    // Simulated defects are placed where the zone inspects: half of them would land in the right half
    // otherwise and pass, and enrolment would warn that this product's defects may pass.
    let cal = &e.meta.calibration;
    eprintln!("simulated escape with an inspect zone over half the frame: {}", cal.simulated_escape);
    assert!(cal.simulated_escape < 0.25, "{}: {:?}", cal.simulated_escape, cal.warnings);
}

#[test]
fn the_zones_lesson_calibrates_as_an_enrolment_with_the_zones_would() {
    let mut det = detector();
    let cfg = DetectConfig::default();
    let reference = demo::part(0, Defect::None);
    let refs = [("ref".to_string(), reference.clone())];
    let plain = det.enroll(&refs, &cfg, &mut |_| {}).unwrap();
    let zoned = det.enroll_with_zones(&refs, &[around_blob()], &cfg, &mut |_| {}).unwrap();
    let blob = demo::part(6, Defect::Blob);
    let lesson = anomalyd::enrol::teach::zones(
        &mut det,
        &plain,
        &blob,
        &[around_blob()],
        Some(std::slice::from_ref(&reference)),
        &cfg,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(lesson.enrolment.meta.thresholds.image, zoned.meta.thresholds.image);
    assert_eq!(lesson.enrolment.meta.calibration.anomaly, zoned.meta.calibration.anomaly);
    assert_eq!(lesson.enrolment.meta.thresholds.source, "zones");
    assert!(lesson.part_passes(), "the blob part passes: {} against {}", lesson.score_after, lesson.threshold_after);
    assert!(lesson.score_after < lesson.score_before);
    // Without the reference images the thresholds are kept, and a warning says why.
    let kept =
        anomalyd::enrol::teach::zones(&mut det, &plain, &blob, &[around_blob()], None, &cfg, &mut |_| {}).unwrap();
    assert_eq!(kept.threshold_after, kept.threshold_before);
    assert!(kept.enrolment.meta.calibration.warnings.iter().any(|w| w.contains("thresholds are kept")));
    assert!(kept.part_passes());
    // Bad zones are refused with the reason, and nothing is made.
    let outside = rect(ZoneKind::Ignore, 0.5, 0.5, 1.5, 0.9);
    let e = anomalyd::enrol::teach::zones(&mut det, &plain, &blob, &[outside], None, &cfg, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("outside the image"), "{e}");
}
