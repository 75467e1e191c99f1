//! The command line as a user meets it: clear messages and non-zero exits on bad input.

use std::process::Command;

use anomalyd::source::demo::{self, Defect};

use crate::common::bin;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().expect("anomalyd runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn enroll_then_inspect_prints_json_text_and_writes_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let refs = dir.path().join("refs");
    std::fs::create_dir(&refs).unwrap();
    demo::part(0, Defect::None).save(refs.join("a.png")).unwrap();
    let q = dir.path().join("blob.png");
    demo::part(3, Defect::Blob).save(&q).unwrap();
    // 16-bit grayscale input is converted, not refused.
    let g16 = dir.path().join("gray16.png");
    let gray = image::DynamicImage::ImageRgb8(demo::part(4, Defect::None)).to_luma16();
    gray.save(&g16).unwrap();
    let enrol = dir.path().join("p.enrol");
    let (code, stdout, stderr) =
        run(&["enroll", "--reference", refs.to_str().unwrap(), "--out", enrol.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("enrolled 1 reference"), "{stdout}");
    let out = dir.path().join("out");
    let (code, stdout, stderr) = run(&[
        "inspect",
        q.to_str().unwrap(),
        g16.to_str().unwrap(),
        "--reference",
        enrol.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(json["anomalous"], true);
    assert_eq!(json["regions"][0]["cell"], "bottom_right");
    assert!(stdout.contains("Yes, there is an anomaly in the image, at the bottom right of the image."), "{stdout}");
    assert!(out.join("blob_overlay.png").is_file() && out.join("gray16_overlay.png").is_file());
}

#[test]
fn bad_inputs_give_clear_messages_and_nonzero_exits() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, _, err) = run(&["enroll", "--reference", empty.to_str().unwrap(), "--out", "/tmp/x.enrol"]);
    assert_ne!(code, 0);
    assert!(err.contains("holds no images"), "{err}");

    let tiny = dir.path().join("tiny.png");
    image::RgbImage::new(20, 20).save(&tiny).unwrap();
    let (code, _, err) = run(&["enroll", "--reference", tiny.to_str().unwrap(), "--out", "/tmp/x.enrol"]);
    assert_ne!(code, 0);
    assert!(err.contains("20x20") && err.contains("at least"), "{err}");

    let corrupt = dir.path().join("corrupt.enrol");
    std::fs::write(&corrupt, b"ANOMALYD-ENROL\0\0garbage").unwrap();
    let img = dir.path().join("q.png");
    demo::part(1, Defect::None).save(&img).unwrap();
    let (code, _, err) = run(&["inspect", img.to_str().unwrap(), "--reference", corrupt.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("corrupt") || err.contains("version"), "{err}");

    let (code, _, err) = run(&["inspect", img.to_str().unwrap(), "--reference", "/nonexistent/refs"]);
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[detect]\npixles = 5\n").unwrap();
    let (code, _, err) =
        run(&["--config", cfg.to_str().unwrap(), "demo", "--out", dir.path().join("d").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("pixles"), "{err}");
}

#[test]
fn unreadable_query_is_reported_and_the_rest_still_inspected() {
    let dir = tempfile::tempdir().unwrap();
    let refs = dir.path().join("refs");
    std::fs::create_dir(&refs).unwrap();
    demo::part(0, Defect::None).save(refs.join("a.png")).unwrap();
    let broken = dir.path().join("broken.jpg");
    std::fs::write(&broken, b"\xff\xd8\xff\xe0 truncated").unwrap();
    let good = dir.path().join("good.png");
    demo::part(1, Defect::None).save(&good).unwrap();
    let (code, stdout, err) = run(&[
        "inspect",
        broken.to_str().unwrap(),
        good.to_str().unwrap(),
        "--reference",
        refs.to_str().unwrap(),
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("broken.jpg"), "{err}");
    assert!(stdout.contains("good.png: No, there is no anomaly"), "{stdout}");
}

#[test]
fn enroll_with_a_zones_file_ignores_what_it_says_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let refs = dir.path().join("refs");
    std::fs::create_dir(&refs).unwrap();
    demo::part(0, Defect::None).save(refs.join("a.png")).unwrap();
    let enrol = dir.path().join("p.enrol");
    let enroll = |zones: &std::path::Path| {
        run(&[
            "enroll",
            "--reference",
            refs.to_str().unwrap(),
            "--zones",
            zones.to_str().unwrap(),
            "--out",
            enrol.to_str().unwrap(),
        ])
    };
    // A corner outside the image, and a file that is not zones: refused with the reason, nothing written.
    let outside = dir.path().join("outside.json");
    std::fs::write(&outside, r#"[{"kind": "ignore", "points": [[0.5, 0.5], [1.5, 0.5], [1.0, 0.9]]}]"#).unwrap();
    let (code, _, err) = enroll(&outside);
    assert_ne!(code, 0);
    assert!(err.contains("outside.json") && err.contains("corner 1 (1.5, 0.5) lies outside the image"), "{err}");
    let not_zones = dir.path().join("not.json");
    std::fs::write(&not_zones, "{\"ignore\": true}").unwrap();
    let (code, _, err) = enroll(&not_zones);
    assert_ne!(code, 0);
    assert!(err.contains("not.json") && err.contains("expected a sequence"), "{err}");
    assert!(!enrol.exists());
    // Around the blob (bottom right): the blob part passes, the scratch part (top left) does not.
    let zones = dir.path().join("zones.json");
    std::fs::write(
        &zones,
        r#"[{"kind": "ignore", "points": [[0.68, 0.72], [0.86, 0.72], [0.86, 0.95], [0.68, 0.95]]}]"#,
    )
    .unwrap();
    let (code, out, err) = enroll(&zones);
    assert_eq!(code, 0, "{out}{err}");
    let (blob, scratch) = (dir.path().join("blob.png"), dir.path().join("scratch.png"));
    demo::part(3, Defect::Blob).save(&blob).unwrap();
    demo::part(2, Defect::Scratch).save(&scratch).unwrap();
    let (code, out, err) = run(&[
        "inspect",
        blob.to_str().unwrap(),
        scratch.to_str().unwrap(),
        "--reference",
        enrol.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let verdicts: Vec<serde_json::Value> = out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(verdicts.len(), 2, "{out}");
    assert_eq!(verdicts[0]["anomalous"], false, "the blob lies in the ignored region: {}", verdicts[0]);
    assert_eq!(verdicts[1]["anomalous"], true, "the scratch does not: {}", verdicts[1]);
}
