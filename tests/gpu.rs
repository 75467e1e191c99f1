//! The GPU path against the CPU reference. One body runs every case on the CPU and, where a CUDA
//! driver is present (build with `--features cuda`), on GPU 0, and compares the GPU's maps, scores
//! and verdicts with the CPU's. Without a GPU these tests say why they skip and pass.
//!
//! The encoder's plan (`netplan`, the layers the GPU kernels run) is checked against ONNX Runtime
//! on the CPU everywhere.

use anomalyd::config::detect::{DetectConfig, GeometryChoice};
use anomalyd::config::engine::{GpuEncoder, Provider};
use anomalyd::detect::detector::Detector;
use anomalyd::detect::enrolment::Enrolment;
use anomalyd::detect::inspection::Inspection;
use anomalyd::detect::zones::{Zone, ZoneKind};
use anomalyd::engine::encoder::{Manifest, Memory};
use anomalyd::engine::netplan::Plan;
use anomalyd::source::demo::{self, Defect};
use anomalyd::util::imageio;
use image::{Rgb, RgbImage};

use crate::common;

/// Relative errors allowed between the GPU and the CPU: the score, of the larger of the threshold
/// and the score; the map, of the CPU map's range.
const SCORE_TOL: f32 = 1e-3;
const MAP_TOL: f32 = 1e-3;

/// The encoder plan in plain Rust equals ONNX Runtime, at the default input and at sizes that are
/// not multiples of 16 (SAME padding then differs before and after).
#[test]
fn encoder_plan_matches_onnxruntime() {
    let mut det = common::detector();
    let plan = Plan::from_onnx(det.encoder().model_bytes()).unwrap();
    let manifest: Manifest = det.encoder().manifest().clone();
    for (w, h) in [(96, 64), (100, 76)] {
        let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x * 3) as u8, (y * 5 + x) as u8, ((x ^ y) * 7) as u8]));
        let t = imageio::to_tensor(&img, manifest.input.scale, manifest.input.mean, manifest.input.std);
        let outputs: Vec<usize> = (0..manifest.outputs.len()).collect();
        let ort = det.encoder_mut().run(t.clone(), h as usize, w as usize, &outputs).unwrap();
        let ours = plan.run_cpu(&t, h as usize, w as usize).unwrap();
        let ours: Vec<anomalyd::engine::encoder::FeatureMap> = manifest
            .outputs
            .iter()
            .map(|o| {
                let j = plan.outputs.iter().position(|(n, _)| *n == o.name).unwrap();
                let m = ort.iter().find(|m| m.c == o.channels).unwrap();
                anomalyd::engine::encoder::FeatureMap { c: m.c, h: m.h, w: m.w, data: ours[j].clone() }
            })
            .collect();
        let err = anomalyd::engine::encoder::relative_error(&ort, &ours);
        eprintln!("encoder plan vs onnxruntime at {w}x{h}: max error {err:.2e} of the feature range");
        assert!(err < 1e-4, "{w}x{h}: {err}");
    }
}

/// A frame set of one case: the reference, a good part and two defective ones.
struct Case {
    name: &'static str,
    reference: RgbImage,
    frames: Vec<RgbImage>,
    cfg: DetectConfig,
    /// Regions to ignore or inspect (the same cell flags on both paths).
    zones: Vec<Zone>,
}

/// The demo part on a plain border, so that foreground masking is chosen.
fn on_plain_background(part: &RgbImage) -> RgbImage {
    let mut canvas = RgbImage::from_pixel(384, 288, Rgb([40, 42, 45]));
    image::imageops::overlay(&mut canvas, part, 32, 24);
    canvas
}

/// A stationary texture (woven stripes with seeded noise), with a bright blot in one copy.
fn texture(seed: u64, blot: bool) -> RgbImage {
    let mut rng = anomalyd::util::rng::Rng::new(seed);
    RgbImage::from_fn(192, 160, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let mut v = 120.0 + 35.0 * (fx * 0.8).sin() * (fy * 0.55).cos() + rng.range(-12.0, 12.0);
        if blot && (fx - 130.0).powi(2) + (fy - 50.0).powi(2) < 120.0 {
            v = 235.0;
        }
        let v = v.clamp(0.0, 255.0) as u8;
        Rgb([v, v.saturating_add(4), v.saturating_sub(6)])
    })
}

fn cases() -> Vec<Case> {
    let part = |v, d| demo::part(v, d);
    vec![
        Case {
            name: "aligned part (L2, positional window)",
            reference: part(0, Defect::None),
            frames: vec![part(1, Defect::None), part(2, Defect::Scratch), part(3, Defect::Blob), part(4, Defect::None)],
            cfg: DetectConfig::default(),
            zones: Vec::new(),
        },
        Case {
            name: "part on a plain background (foreground mask, resized frames)",
            reference: on_plain_background(&part(0, Defect::None)),
            frames: vec![
                on_plain_background(&part(5, Defect::Blob)),
                on_plain_background(&part(6, Defect::None)),
                on_plain_background(&part(7, Defect::Scratch)),
            ],
            cfg: DetectConfig::default(),
            zones: Vec::new(),
        },
        Case {
            name: "texture (8 rotations, cosine score layer)",
            reference: texture(1, false),
            frames: vec![texture(2, false), texture(3, true), texture(4, true)],
            // The GPU searches exactly: so does the CPU here, without the inverted file it uses by default.
            cfg: DetectConfig { geometry: GeometryChoice::Texture, search_lists: 0, ..DetectConfig::default() },
            zones: Vec::new(),
        },
        Case {
            name: "aligned part with an ignore zone over the blob and an inspect zone (zone masking)",
            reference: part(0, Defect::None),
            frames: vec![part(3, Defect::Blob), part(2, Defect::Scratch), part(4, Defect::None)],
            cfg: DetectConfig::default(),
            zones: vec![
                Zone { kind: ZoneKind::Ignore, points: vec![[0.68, 0.72], [0.86, 0.72], [0.86, 0.95], [0.68, 0.95]] },
                Zone { kind: ZoneKind::Inspect, points: vec![[0.02, 0.02], [0.98, 0.02], [0.5, 0.98]] },
            ],
        },
    ]
}

/// Why the GPU tests cannot run here, if they cannot.
fn no_gpu() -> Option<&'static str> {
    if !cfg!(feature = "cuda") {
        return Some("built without the cuda feature");
    }
    if !anomalyd::engine::device::cuda_driver_present() {
        return Some("no CUDA driver");
    }
    None
}

/// A detector on GPU 0 with the encoder on `encoder` and ONNX Runtime on `provider`.
fn load_on_gpu(provider: Provider, encoder: GpuEncoder) -> Result<Detector, anomalyd::detect::inspection::DetectError> {
    let cfg = anomalyd::config::engine::EngineConfig {
        providers: vec![provider],
        device: anomalyd::config::engine::DeviceChoice::Cuda(0),
        gpu_encoder: encoder,
        ..Default::default()
    };
    Detector::load(&cfg)
}

/// The GPU detector with anomalyd's encoder kernels, or why there is none.
fn gpu_detector() -> Result<Detector, String> {
    if let Some(why) = no_gpu() {
        return Err(why.into());
    }
    load_on_gpu(Provider::Cpu, GpuEncoder::Kernels)
        .map_err(|e| panic!("a CUDA driver is present but the GPU path failed to start: {e}"))
}

/// The GPU detector whose encoder is ONNX Runtime's CUDA provider through IO binding, or why there
/// is none (the usual reason: this ONNX Runtime is the CPU-only build, not onnxruntime-gpu).
fn gpu_onnxruntime_detector() -> Result<Detector, String> {
    if let Some(why) = no_gpu() {
        return Err(why.into());
    }
    load_on_gpu(Provider::Cuda, GpuEncoder::Onnxruntime)
        .map_err(|e| format!("ONNX Runtime's CUDA provider is not usable here ({e})"))
}

/// Inspects every frame on one detector: one by one, and (on a GPU) also as one batch.
fn inspect_all(det: &mut Detector, e: &Enrolment, frames: &[RgbImage]) -> (Vec<Inspection>, Vec<Inspection>) {
    let single: Vec<Inspection> = frames.iter().map(|f| det.inspect(e, f).unwrap()).collect();
    let batch = det.inspect_batch(e, frames).unwrap();
    (single, batch)
}

fn map_error(a: &Inspection, b: &Inspection) -> f32 {
    let (lo, hi) = a.map.data.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), v| (l.min(*v), h.max(*v)));
    let diff = a.map.data.iter().zip(&b.map.data).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / (hi - lo).max(1e-6)
}

#[test]
fn gpu_inspections_match_the_cpu() {
    match gpu_detector() {
        Ok(mut gpu) => parity(&mut gpu, "anomalyd kernels"),
        Err(why) => eprintln!("skipped: {why}; the GPU parity tests need a CUDA GPU"),
    }
}

/// The same cases with the encoder on ONNX Runtime's CUDA provider, its outputs bound to the device.
#[test]
fn gpu_onnxruntime_encoder_inspections_match_the_cpu() {
    match gpu_onnxruntime_detector() {
        Ok(mut gpu) => parity(&mut gpu, "onnxruntime cuda, IO binding"),
        Err(why) => eprintln!("skipped: {why}"),
    }
}

/// Every case on the CPU reference and on `gpu`, one by one and as a batch: scores, maps, verdicts.
fn parity(gpu: &mut Detector, encoder: &str) {
    eprintln!("parity on {} (encoder: {encoder})", gpu.device());
    let mut worst = (0.0f32, 0.0f32);
    for case in cases() {
        let (enrolment, cpu) = {
            let mut cpu = common::detector();
            let refs = [("ref".to_string(), case.reference.clone())];
            let e = cpu.enroll_with_zones(&refs, &case.zones, &case.cfg, &mut |_| {}).unwrap();
            let single: Vec<Inspection> = case.frames.iter().map(|f| cpu.inspect_cpu(&e, f).unwrap()).collect();
            (e, single)
        };
        let (single, batch) = inspect_all(gpu, &enrolment, &case.frames);
        assert!(gpu.device().starts_with("cuda"), "{}: the GPU fell back to the CPU", case.name);
        for (i, c) in cpu.iter().enumerate() {
            for (how, g) in [("single", &single[i]), ("batch", &batch[i])] {
                let scale = c.verdict.threshold.abs().max(c.verdict.score.abs()).max(1e-6);
                let score_err = (c.verdict.score - g.verdict.score).abs() / scale;
                let map_err = map_error(c, g);
                eprintln!(
                    "parity | {} | frame {i} {how} | score cpu {:.5} gpu {:.5} | score err {score_err:.2e} | map err {map_err:.2e}",
                    case.name, c.verdict.score, g.verdict.score
                );
                assert_eq!((c.map.w, c.map.h), (g.map.w, g.map.h));
                assert!(score_err <= SCORE_TOL, "{}: frame {i} ({how}) score error {score_err}", case.name);
                assert!(map_err <= MAP_TOL, "{}: frame {i} ({how}) map error {map_err}", case.name);
                let margin = (c.verdict.score - c.verdict.threshold).abs() / scale;
                if margin > SCORE_TOL {
                    assert_eq!(c.verdict.anomalous, g.verdict.anomalous, "{}: frame {i} verdict", case.name);
                    assert_eq!(c.verdict.regions.len(), g.verdict.regions.len(), "{}: frame {i} regions", case.name);
                }
                worst = (worst.0.max(score_err), worst.1.max(map_err));
            }
        }
    }
    eprintln!("parity worst ({encoder}): score err {:.2e}, map err {:.2e}", worst.0, worst.1);
}

/// The GPU encoder alone against ONNX Runtime at the default input size.
#[test]
fn gpu_encoder_matches_onnxruntime() {
    let gpu = match gpu_detector() {
        Ok(d) => d,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    drop(gpu);
    #[cfg(feature = "cuda")]
    {
        let mut det = common::detector();
        let mut pipe = {
            let g = anomalyd::engine::gpu::Gpu::open(0, None).unwrap();
            let kernels = anomalyd::detect::gpu::DeviceEncoder::Kernels;
            anomalyd::detect::gpu::Pipeline::new(
                g,
                det.encoder().model_bytes(),
                &det.encoder().manifest().clone(),
                kernels,
            )
            .unwrap()
        };
        let err = anomalyd::detect::gpu::encoder_error(det.encoder_mut(), &mut pipe).unwrap();
        eprintln!("GPU encoder vs onnxruntime: max error {err:.2e} of the feature range");
        assert!(err <= anomalyd::detect::gpu::GPU_ENCODER_TOLERANCE, "{err}");
    }
}

/// ONNX Runtime's IO binding (the path whose outputs feed the GPU kernels) gives the same features
/// as its ordinary run. Bound to host memory here, so it runs on every machine; on a GPU the same
/// code binds device memory (`gpu_onnxruntime_encoder_inspections_match_the_cpu`).
#[test]
fn bound_encoder_run_matches_the_ordinary_run() {
    let mut det = common::detector();
    let manifest: Manifest = det.encoder().manifest().clone();
    let outputs: Vec<usize> = (0..manifest.outputs.len()).collect();
    // Two sizes, then the first again: the bound input is remade when its shape changes.
    for (w, h) in [(96u32, 64u32), (100, 76), (96, 64)] {
        let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x * 5) as u8, (y * 3 + x) as u8, ((x ^ y) * 9) as u8]));
        let t = imageio::to_tensor(&img, manifest.input.scale, manifest.input.mean, manifest.input.std);
        let (hu, wu) = (h as usize, w as usize);
        let ordinary = det.encoder_mut().run(t.clone(), hu, wu, &outputs).unwrap();
        let enc = det.encoder_mut();
        let input = enc.bound_input(Memory::Host, [1, 3, hu, wu]).unwrap();
        // SAFETY: a host tensor of exactly 3 * h * w f32 values, owned by the encoder's binding.
        unsafe { std::slice::from_raw_parts_mut(input as *mut f32, t.len()) }.copy_from_slice(&t);
        let bound = enc.run_bound().unwrap();
        assert_eq!(bound.len(), ordinary.len());
        let bound: Vec<anomalyd::engine::encoder::FeatureMap> = bound
            .iter()
            .map(|o| {
                let [n, c, bh, bw] = o.shape;
                assert_eq!(n, 1);
                // SAFETY: ONNX Runtime's host output of that shape, valid until the next bound run.
                let data = unsafe { std::slice::from_raw_parts(o.ptr as *const f32, c * bh * bw) }.to_vec();
                anomalyd::engine::encoder::FeatureMap { c, h: bh, w: bw, data }
            })
            .collect();
        for (a, b) in ordinary.iter().zip(&bound) {
            assert_eq!((a.c, a.h, a.w), (b.c, b.h, b.w));
        }
        let err = anomalyd::engine::encoder::relative_error(&ordinary, &bound);
        eprintln!("bound vs ordinary run at {w}x{h}: max error {err:.2e} of the feature range");
        assert!(err < 1e-6, "{w}x{h}: {err}");
    }
}
