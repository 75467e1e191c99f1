//! The few-shot detector: enrolment of normal references into a patch memory bank, and inspection of
//! a query image into an anomaly map, an image score, a verdict and its regions.
//!
//! Inspection (the decoder): the encoder's stride-8 and stride-16 maps are pooled 3 x 3 and
//! concatenated on the stride-8 grid; each query patch's distance to its nearest bank patch (L2 on raw
//! features, or cosine) is found by blocked matrix products; the image score is the mean of the top 1%
//! of patch distances; the map is upsampled bilinearly to the input size and smoothed with a Gaussian
//! (sigma 4 px at 256 px).
//!
//! Enrolment chooses from the shots themselves how the product is seen (see [`crate::calibrate`]):
//! `aligned` products are resized to one fixed input and each patch is matched only near its own
//! place; products that look like a texture (a shifted shot matches itself as well anywhere as near
//! its place) keep each image's aspect (fitted to the pixel budget), are matched anywhere, their bank
//! holds the eight rotations and flips of the shots (AnomalyDINO), and their image score comes from a
//! cosine stride-16 layer whose bank also holds the shots at the `scale_augment` scales.

use std::time::Instant;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::calibrate::{self, Calibration, Thresholds};
use crate::engine::{Encoder, EngineError, InputSpec};
use crate::features::{self, Metric, Patches};
use crate::imageio::{self, Dihedral};
use crate::map::{self, Grid};
use crate::regions::{self, Region};

/// Alignment of the encoder input; the encoder's deepest stride.
const ALIGN: u32 = 16;

/// Detector settings, with the defaults the evaluation chose (see docs/RESULTS.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Pixel budget of the encoder input (the input keeps the reference's aspect ratio).
    pub pixels: u32,
    /// Encoder strides whose features are matched (a subset of the model's 4, 8, 16).
    pub strides: Vec<usize>,
    /// How the strides are combined: `concat` (one joint bank) or `mean` (one bank per stride).
    pub fusion: Fusion,
    /// Patch distance: `auto` (L2 for maps and aligned products' scores, cosine for a texture's
    /// score), `cosine` (unit rows) or `l2` (raw rows, PatchCore) everywhere.
    pub metric: MetricChoice,
    /// Neighbourhood pooling of patch features (PatchCore's 3 x 3).
    pub pool: usize,
    /// Aligned products: a query patch is matched only against reference patches within this
    /// fraction of the image of its own place (1 = anywhere). Textures always match anywhere.
    pub window: f32,
    /// Strides whose features give the image score; unset (`auto`): 16 for textures, the map's
    /// strides for aligned products; empty: the map's strides.
    pub score_strides: Option<Vec<usize>>,
    /// Image score = mean of this top fraction of patch scores.
    pub top_fraction: f32,
    /// Gaussian sigma of the map, in pixels at a 256 x 256 input (scaled with the input).
    pub sigma: f32,
    /// `auto` decides from the shots; `aligned` or `texture` forces the choice.
    pub geometry: GeometryChoice,
    /// Textures: whether the map's bank also holds the rotated views (the score's always does).
    pub rotate_map: bool,
    /// How a texture's images are scaled: `keep` the shot's pixel scale, `fit` each image to the pixel
    /// budget (keeping its aspect), or `squash` each to the shot's input size.
    pub texture_scale: TextureScale,
    /// Textures: extra scales at which each shot also enters the score layer's bank. Tiles of
    /// different sizes reach the encoder at different pixel scales, so their grain differs from the
    /// shot's; empty keeps the shot's scale only.
    pub scale_augment: Vec<f32>,
    /// Most rows a layer's memory bank may hold; more are reduced by greedy coreset subsampling.
    pub max_bank: usize,
    /// Smallest region reported, as a fraction of the image.
    pub min_region: f32,
    /// Mask patches of the plain background out of the score: `auto` does so for an aligned object
    /// whose shot has a plain border; `on` or `off` force it.
    pub foreground: Switch,
    /// Calibration: how many nuisance views and simulated anomalies enrolment scores.
    pub normal_views: usize,
    pub anomaly_views: usize,
    /// Seed of the simulated anomalies and views, so enrolment is reproducible.
    pub seed: u64,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            pixels: 256 * 256,
            strides: vec![8, 16],
            fusion: Fusion::Concat,
            metric: MetricChoice::Auto,
            pool: 3,
            window: 0.0625,
            score_strides: None,
            top_fraction: 0.01,
            sigma: 4.0,
            geometry: GeometryChoice::Auto,
            texture_scale: TextureScale::Fit,
            scale_augment: vec![0.75, 1.333],
            rotate_map: true,
            max_bank: 16_384,
            min_region: 0.0005,
            foreground: Switch::Auto,
            normal_views: 12,
            anomaly_views: 24,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GeometryChoice {
    Auto,
    Aligned,
    Texture,
}

impl std::str::FromStr for GeometryChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "aligned" => Ok(Self::Aligned),
            "texture" => Ok(Self::Texture),
            _ => Err(format!("geometry must be auto, aligned or texture, not `{s}`")),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricChoice {
    Auto,
    Cosine,
    L2,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    Auto,
    On,
    Off,
}

impl std::str::FromStr for Switch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(format!("use auto, on or off, not `{s}`")),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TextureScale {
    Keep,
    Fit,
    Squash,
}

/// How query images are brought to the encoder.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Geometry {
    /// Every image is resized to exactly this input.
    Aligned { width: u32, height: u32 },
    /// Each image keeps its aspect ratio and is scaled by `scale` (capped at 4x the pixel budget).
    Texture { scale: f64, max_pixels: u32 },
    /// Each image keeps its aspect ratio and is resized to about `pixels` pixels.
    Fit { pixels: u32 },
}

impl Geometry {
    pub fn input_size(&self, w: u32, h: u32) -> (u32, u32) {
        match *self {
            Geometry::Aligned { width, height } => (width, height),
            Geometry::Fit { pixels } => imageio::fit_pixels(w, h, pixels, ALIGN),
            Geometry::Texture { scale, max_pixels } => {
                let s = scale.min((max_pixels as f64 / (w as f64 * h as f64)).sqrt());
                imageio::scaled(w, h, s, ALIGN)
            }
        }
    }
}

/// One layer of the memory bank: the patches of one group of encoder outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Bank {
    /// Stride of the grid the patches sit on (the finest output of the group).
    pub stride: usize,
    pub dim: usize,
    pub rows: Vec<f32>,
    /// Position of each row's patch in its reference (fractions of width and height).
    pub pos: Vec<[f32; 2]>,
}

/// How the features of several strides are combined.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// One bank per stride; the distance maps are averaged (each layer may match a different patch).
    Mean,
    /// The strides' unit-normalised features are concatenated on the finest grid into one bank, so a
    /// query patch must match one reference patch at every scale at once (PatchCore).
    Concat,
}

impl Bank {
    pub fn len(&self) -> usize {
        self.rows.len() / self.dim.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Plain-background model for foreground masking: the border colour and a distance that separates it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Background {
    pub rgb: [f32; 3],
    pub tolerance: f32,
}

/// Everything enrolment decided, stored in the enrolment file's header.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentMeta {
    pub model_name: String,
    pub model_sha256: String,
    pub input: InputSpec,
    pub geometry: Geometry,
    pub augment: Vec<Dihedral>,
    /// The views each bank layer holds (a subset of `augment`).
    pub group_augment: Vec<Vec<Dihedral>>,
    /// Encoder outputs of each bank layer (fused when a group has several).
    pub groups: Vec<Vec<usize>>,
    pub pool: usize,
    /// Positional matching window actually used (1 for textures).
    pub window: f32,
    /// Bank layer whose distances give the image score (None: the map's).
    pub score_group: Option<usize>,
    /// Extra scales of each shot in the score layer's bank (textures).
    #[serde(default)]
    pub score_scales: Vec<f32>,
    /// Patch distance of each bank layer.
    pub metrics: Vec<Metric>,
    pub top_fraction: f32,
    pub sigma: f32,
    pub min_region: f32,
    pub background: Option<Background>,
    pub thresholds: Thresholds,
    pub calibration: Calibration,
    pub references: Vec<String>,
    pub created_unix: u64,
}

/// A product's enrolment: decisions plus the memory bank.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrolment {
    pub meta: EnrolmentMeta,
    pub banks: Vec<Bank>,
    /// Identity of this enrolment's bank in this process (a GPU uploads each bank once). Make a new
    /// enrolment with [`Enrolment::new`] rather than editing `banks` in place.
    pub bank_id: BankId,
}

impl Enrolment {
    pub fn new(meta: EnrolmentMeta, banks: Vec<Bank>) -> Self {
        Self { meta, banks, bank_id: BankId::fresh() }
    }
}

/// A process-unique number per enrolment bank; clones share it (their banks are equal). It takes no
/// part in equality, which compares content.
#[derive(Debug, Clone, Copy)]
pub struct BankId(pub u64);

impl BankId {
    pub fn fresh() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        BankId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl PartialEq for BankId {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("bank layer {0} was given no views to learn from (its augmentation list is empty)")]
    EmptyLayer(usize),
    #[error("no reference images given: enrolment needs at least one normal image of the product")]
    NoReferences,
    #[error("encoder has no stride-{0} output (model strides: {1:?})")]
    NoStride(usize, Vec<usize>),
    #[error(
        "reference {name} is {w}x{h} but {first} is {fw}x{fh}: an aligned product needs references of one \
         size and framing (use geometry = \"texture\" for surfaces that vary in size)"
    )]
    SizeMismatch { name: String, w: u32, h: u32, first: String, fw: u32, fh: u32 },
    #[error(
        "reference {name} does not look like the other references (its score {score:.3} is above the \
         simulated-defect median {limit:.3}): is it the same product, framed the same way?"
    )]
    Outlier { name: String, score: f32, limit: f32 },
    #[error("enrolment was made with model {enrolled} but the encoder is {running}; enrol again with this model")]
    ModelMismatch { enrolled: String, running: String },
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[cfg(feature = "cuda")]
    #[error("{0}")]
    Gpu(#[from] crate::gpu::GpuError),
}

/// Stage timings of one inspection, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    pub preprocess_ms: f32,
    pub encoder_ms: f32,
    pub decoder_ms: f32,
}

/// A scored image: the patch grid, the smoothed map at the encoder-input size, and the image score.
#[derive(Debug, Clone)]
pub struct Scored {
    pub patch_grid: Grid,
    pub map: Grid,
    pub score: f32,
    pub timings: Timings,
}

/// The verdict on one image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub anomalous: bool,
    pub score: f32,
    pub threshold: f32,
    pub pixel_threshold: f32,
    pub regions: Vec<Region>,
    pub answer: String,
    pub timings: Timings,
}

/// A verdict plus the anomaly map (encoder-input size) it came from.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub verdict: Verdict,
    pub map: Grid,
}

/// The encoder plus the decoder logic; one per thread. Inspection runs on the GPU pipeline when one
/// was started ([`Detector::load`] with `engine.device`), else on the CPU; enrolment and calibration
/// always run on the CPU reference.
#[derive(Debug)]
pub struct Detector {
    encoder: Encoder,
    #[cfg(feature = "cuda")]
    gpu: Option<Box<crate::gpu::pipeline::Pipeline>>,
}

/// Largest relative difference the GPU encoder may show against ONNX Runtime at start-up.
#[cfg(feature = "cuda")]
pub const GPU_ENCODER_TOLERANCE: f32 = 1e-3;

/// The same for TensorRT in fp16 through IO binding, held against its own ordinary run (fp16 has a
/// relative precision of about 1e-3, and TensorRT may pick other kernels per input shape).
#[cfg(feature = "cuda")]
pub const GPU_ENCODER_TOLERANCE_FP16: f32 = 1e-2;

impl Detector {
    /// A CPU detector around an encoder.
    pub fn new(encoder: Encoder) -> Self {
        Self {
            encoder,
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// Loads the encoder and the device `cfg.device` chooses. With `auto`, a GPU that cannot start
    /// leaves the detector on the CPU with one log line; with `cuda:N` it is an error.
    pub fn load(cfg: &crate::engine::EngineConfig) -> Result<Self, DetectError> {
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let mut det = Detector::new(Encoder::load(cfg)?);
        match crate::device::select(cfg.device)? {
            crate::device::Selected::Cpu => {}
            #[cfg(feature = "cuda")]
            crate::device::Selected::Cuda(n) => match det.start_gpu(n, cfg) {
                Ok(()) => {}
                Err(e) if cfg.device == crate::device::DeviceChoice::Auto => {
                    tracing::warn!("device auto: the GPU could not start ({e}); inspecting on the CPU")
                }
                Err(e) => return Err(e),
            },
            #[cfg(not(feature = "cuda"))]
            crate::device::Selected::Cuda(n) => return Err(crate::device::DeviceError::NotBuilt(n).into()),
        }
        Ok(det)
    }

    /// Starts the GPU pipeline on GPU `ordinal` and checks its encoder against ONNX Runtime.
    #[cfg(feature = "cuda")]
    pub fn start_gpu(&mut self, ordinal: usize, cfg: &crate::engine::EngineConfig) -> Result<(), DetectError> {
        use crate::engine::GpuEncoder;
        use crate::gpu::pipeline::{DeviceEncoder, Pipeline};
        let cache = cfg.kernel_cache.clone().unwrap_or_else(crate::gpu::default_cache_dir);
        let t = Instant::now();
        let gpu = crate::gpu::Gpu::open(ordinal, Some(&cache))?;
        let (name, arch, cached, blas) = (gpu.name.clone(), gpu.arch, gpu.ptx_cached, gpu.has_blas());
        let provider = self.encoder.provider();
        let which = match (cfg.gpu_encoder, self.encoder.on_gpu_provider()) {
            (GpuEncoder::Kernels, _) | (GpuEncoder::Auto, false) => DeviceEncoder::Kernels,
            (GpuEncoder::Onnxruntime | GpuEncoder::Auto, true) => DeviceEncoder::Onnxruntime,
            (GpuEncoder::Onnxruntime, false) => {
                return Err(crate::gpu::GpuError::Unsupported(format!(
                    "engine.gpu_encoder = \"onnxruntime\" but ONNX Runtime runs the encoder on its {provider} \
                     provider; install onnxruntime-gpu (or JetPack's) and list \"tensorrt\" or \"cuda\" in \
                     engine.providers, or use gpu_encoder = \"kernels\""
                ))
                .into());
            }
        };
        let encoder = match which {
            DeviceEncoder::Kernels => "anomalyd kernels".to_string(),
            DeviceEncoder::Onnxruntime => format!("onnxruntime {provider} with IO binding"),
        };
        let mut pipe = Pipeline::new(gpu, self.encoder.model_bytes(), self.encoder.manifest(), which)?;
        let err = self.gpu_encoder_error(&mut pipe)?;
        // TensorRT runs in fp16, and the reference it is held against is the same session's ordinary
        // run; anything else is checked against fp32.
        let limit = if which == DeviceEncoder::Onnxruntime && provider == crate::engine::Provider::Tensorrt {
            GPU_ENCODER_TOLERANCE_FP16
        } else {
            GPU_ENCODER_TOLERANCE
        };
        if err.is_nan() || err > limit {
            return Err(crate::gpu::GpuError::Unsupported(format!(
                "the GPU encoder ({encoder}) differs from ONNX Runtime by {err:.2e} of the feature range (limit \
                 {limit:.0e}); this model is not supported on the GPU path"
            ))
            .into());
        }
        tracing::info!(
            device = %format!("cuda:{ordinal}"),
            gpu = %name,
            encoder = %encoder,
            kernels = if cached { "cache hit" } else { "compiled (cache miss)" },
            "inspection runs on cuda:{ordinal} ({name}, sm_{}{}): encoder on {encoder}, decoder on anomalyd \
             kernels, {}, encoder within {err:.1e} of ONNX Runtime; ready in {:.0} ms",
            arch.0,
            arch.1,
            if blas { "cuBLAS GEMM" } else { "own GEMM" },
            t.elapsed().as_secs_f64() * 1e3
        );
        self.gpu = Some(Box::new(pipe));
        Ok(())
    }

    /// Largest difference between the GPU encoder's outputs and ONNX Runtime's on a probe image,
    /// relative to the largest feature magnitude.
    #[cfg(feature = "cuda")]
    pub fn gpu_encoder_error(&mut self, pipe: &mut crate::gpu::pipeline::Pipeline) -> Result<f32, DetectError> {
        let probe =
            RgbImage::from_fn(128, 96, |x, y| image::Rgb([(x * 2) as u8, (y * 2 + x) as u8, ((x * y) % 251) as u8]));
        let spec = &self.encoder.manifest().input;
        let t = imageio::to_tensor(&probe, spec.scale, spec.mean, spec.std);
        let outputs: Vec<usize> = (0..self.encoder.manifest().outputs.len()).collect();
        let cpu = self.encoder.run(t.clone(), 96, 128, &outputs)?;
        let gpu = pipe.encode(&mut self.encoder, &t, 96, 128, &outputs)?;
        Ok(relative_error(&cpu, &gpu))
    }

    /// Whether inspection runs on a GPU pipeline now (a GPU fault turns this off for good).
    pub fn on_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.gpu.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Where inspection runs, in words (e.g. `cpu (onnxruntime cpu)`, `cuda:0 NVIDIA H200`).
    pub fn device(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.gpu {
            return format!("cuda:{} {}", p.gpu().ctx.ordinal(), p.gpu().name);
        }
        format!("cpu (onnxruntime {})", self.encoder.provider())
    }

    /// Whether the engine that runs inspection came from its cache: TensorRT's engine when it runs
    /// the encoder, else the GPU kernels' PTX on a GPU; `none` on the CPU provider.
    pub fn engine_cache(&self) -> crate::engine::EngineCache {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.gpu
            && p.encoder() == crate::gpu::pipeline::DeviceEncoder::Kernels
        {
            return if p.gpu().ptx_cached { crate::engine::EngineCache::Hit } else { crate::engine::EngineCache::Miss };
        }
        self.encoder.engine_cache()
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.encoder
    }

    fn output_for(&self, stride: usize) -> Result<usize, DetectError> {
        let outs = &self.encoder.manifest().outputs;
        outs.iter()
            .position(|o| o.stride == stride)
            .ok_or_else(|| DetectError::NoStride(stride, outs.iter().map(|o| o.stride).collect()))
    }

    /// Patches of an image already at its encoder-input size, one set per group of outputs.
    pub fn patches(
        &mut self,
        img: &RgbImage,
        groups: &[Vec<usize>],
        pool: usize,
        metrics: &[Metric],
    ) -> Result<Vec<Patches>, DetectError> {
        let outputs = union(groups);
        let spec = &self.encoder.manifest().input;
        let t = imageio::to_tensor(img, spec.scale, spec.mean, spec.std);
        let maps = self.encoder.run(t, img.height() as usize, img.width() as usize, &outputs)?;
        Ok(group_patches(&maps, &outputs, groups, pool, metrics))
    }

    /// The patches of every augmented view of an image, concatenated per group (rows and positions).
    /// `augment[g]` lists the views group `g` takes; each view is encoded once for all groups taking it.
    pub fn augmented_patches(
        &mut self,
        img: &RgbImage,
        augment: &[Vec<Dihedral>],
        groups: &[Vec<usize>],
        pool: usize,
        metrics: &[Metric],
    ) -> Result<Vec<Patches>, DetectError> {
        let mut out: Vec<Option<Patches>> = vec![None; groups.len()];
        for d in Dihedral::all() {
            let takers: Vec<usize> = (0..groups.len()).filter(|&g| augment[g].contains(&d)).collect();
            if takers.is_empty() {
                continue;
            }
            let sub: Vec<Vec<usize>> = takers.iter().map(|&g| groups[g].clone()).collect();
            let sub_metrics: Vec<Metric> = takers.iter().map(|&g| metrics[g]).collect();
            for (p, &g) in self.patches(&d.apply(img), &sub, pool, &sub_metrics)?.into_iter().zip(&takers) {
                match &mut out[g] {
                    None => out[g] = Some(p),
                    Some(acc) => {
                        acc.rows.extend_from_slice(&p.rows);
                        acc.pos.extend_from_slice(&p.pos);
                    }
                }
            }
        }
        out.into_iter().enumerate().map(|(g, p)| p.ok_or(DetectError::EmptyLayer(g))).collect()
    }

    /// A reference's bank patches per layer: its augmented views, and for a texture's score layer the
    /// same views at the enrolment's extra scales.
    pub fn reference_patches(&mut self, meta: &EnrolmentMeta, img: &RgbImage) -> Result<Vec<Patches>, DetectError> {
        let mut views = self.augmented_patches(img, &meta.group_augment, &meta.groups, meta.pool, &meta.metrics)?;
        let Some(g) = meta.score_group else {
            return Ok(views);
        };
        for &s in &meta.score_scales {
            let (w, h) = imageio::scaled(img.width(), img.height(), s as f64, ALIGN);
            let scaled = imageio::resize(img, w, h);
            let extra = self.augmented_patches(
                &scaled,
                std::slice::from_ref(&meta.group_augment[g]),
                std::slice::from_ref(&meta.groups[g]),
                meta.pool,
                &meta.metrics[g..=g],
            )?;
            let extra = extra.into_iter().next().ok_or(DetectError::EmptyLayer(g))?;
            views[g].rows.extend_from_slice(&extra.rows);
            views[g].pos.extend_from_slice(&extra.pos);
        }
        Ok(views)
    }

    /// Scores an image already brought to its encoder-input size against `banks`.
    pub fn score_prepared(
        &mut self,
        meta: &EnrolmentMeta,
        banks: &[Bank],
        img: &RgbImage,
    ) -> Result<Scored, DetectError> {
        let t0 = Instant::now();
        let outputs = union(&meta.groups);
        let spec = &self.encoder.manifest().input;
        let tensor = imageio::to_tensor(img, spec.scale, spec.mean, spec.std);
        let t1 = Instant::now();
        let maps = self.encoder.run(tensor, img.height() as usize, img.width() as usize, &outputs)?;
        let t2 = Instant::now();
        let patches = group_patches(&maps, &outputs, &meta.groups, meta.pool, &meta.metrics);
        let mut grids = distances(&patches, banks, meta.window, &meta.metrics);
        if let Some(bg) = &meta.background {
            let fg = calibrate::foreground(img, bg);
            grids = grids.iter().map(|g| mask_background(g, img.width(), img.height(), &fg)).collect();
        }
        let score_grid = meta.score_group.and_then(|i| grids.get(i).cloned());
        let grid = average(grids.into_iter().enumerate().filter(|(i, _)| Some(*i) != meta.score_group).map(|(_, g)| g));
        let score = map::top_mean(&score_grid.as_ref().unwrap_or(&grid).data, meta.top_fraction);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let sigma = meta.sigma * ((w * h) as f32).sqrt() / 256.0;
        let map = grid.resize(w, h).gaussian(sigma);
        let t3 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f32() * 1e3;
        Ok(Scored {
            patch_grid: grid,
            map,
            score,
            timings: Timings { preprocess_ms: ms(t0, t1), encoder_ms: ms(t1, t2), decoder_ms: ms(t2, t3) },
        })
    }

    /// Checks that an enrolment was made with this detector's encoder.
    pub fn check(&self, enrolment: &Enrolment) -> Result<(), DetectError> {
        if enrolment.meta.model_sha256 != self.encoder.model_sha256() {
            return Err(DetectError::ModelMismatch {
                enrolled: format!("{} ({})", enrolment.meta.model_name, short(&enrolment.meta.model_sha256)),
                running: format!("{} ({})", self.encoder.manifest().name, short(self.encoder.model_sha256())),
            });
        }
        Ok(())
    }

    /// Inspects one image: score, verdict with the enrolment's thresholds, regions and answer text.
    pub fn inspect(&mut self, enrolment: &Enrolment, img: &RgbImage) -> Result<Inspection, DetectError> {
        let mut v = self.inspect_batch(enrolment, std::slice::from_ref(img))?;
        Ok(v.remove(0))
    }

    /// Inspects several images at once: one batch on the GPU (runs of equal input size), one by one
    /// on the CPU. A GPU fault moves this detector to the CPU for good, with an error in the log.
    pub fn inspect_batch(&mut self, enrolment: &Enrolment, imgs: &[RgbImage]) -> Result<Vec<Inspection>, DetectError> {
        self.check(enrolment)?;
        #[cfg(feature = "cuda")]
        if let Some(pipe) = &mut self.gpu {
            let meta = &enrolment.meta;
            let size = |i: &RgbImage| meta.geometry.input_size(i.width(), i.height());
            let mut out = Vec::with_capacity(imgs.len());
            let mut failed = None;
            for run in imgs.chunk_by(|a, b| size(a) == size(b)) {
                let refs: Vec<&RgbImage> = run.iter().collect();
                match pipe.score(&mut self.encoder, meta, &enrolment.banks, enrolment.bank_id.0, &refs) {
                    Ok(scored) => out.extend(
                        scored
                            .into_iter()
                            .zip(run)
                            .map(|(s, i)| verdict(s, &meta.thresholds, meta.min_region, i.width(), i.height())),
                    ),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => return Ok(out),
                Some(e) => {
                    tracing::error!("GPU inspection failed ({e}); this camera continues on the CPU");
                    self.gpu = None;
                }
            }
        }
        imgs.iter().map(|img| self.inspect_cpu(enrolment, img)).collect()
    }

    /// The CPU reference of [`Self::inspect`].
    pub fn inspect_cpu(&mut self, enrolment: &Enrolment, img: &RgbImage) -> Result<Inspection, DetectError> {
        self.check(enrolment)?;
        let t0 = Instant::now();
        let (w, h) = enrolment.meta.geometry.input_size(img.width(), img.height());
        let prepared = imageio::resize(img, w, h);
        let resize_ms = t0.elapsed().as_secs_f32() * 1e3;
        let mut scored = self.score_prepared(&enrolment.meta, &enrolment.banks, &prepared)?;
        scored.timings.preprocess_ms += resize_ms;
        let th = &enrolment.meta.thresholds;
        Ok(verdict(scored, th, enrolment.meta.min_region, img.width(), img.height()))
    }

    /// Enrols normal reference images (name, image) of one product.
    pub fn enroll(
        &mut self,
        references: &[(String, RgbImage)],
        cfg: &DetectConfig,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Enrolment, DetectError> {
        let Some((first_name, first)) = references.first() else {
            return Err(DetectError::NoReferences);
        };
        let outputs = cfg.strides.iter().map(|&s| self.output_for(s)).collect::<Result<Vec<_>, _>>()?;
        // Bank layers: one joint group, or one per stride; each layer sits on its finest stride's grid.
        let (mut groups, mut bank_strides): (Vec<Vec<usize>>, Vec<usize>) = match cfg.fusion {
            Fusion::Concat => (vec![outputs.clone()], vec![*cfg.strides.iter().min().unwrap_or(&8)]),
            Fusion::Mean => (outputs.iter().map(|&o| vec![o]).collect(), cfg.strides.clone()),
        };
        let (aw, ah) = imageio::fit_pixels(first.width(), first.height(), cfg.pixels, ALIGN);
        let aligned_first = imageio::resize(first, aw, ah);

        // Geometry: aligned object or texture, decided from the first shot unless configured.
        let stationarity = calibrate::stationarity(self, &aligned_first, &groups[..1], cfg.pool)?;
        let texture = match cfg.geometry {
            GeometryChoice::Auto => stationarity < calibrate::TEXTURE_RATIO,
            GeometryChoice::Aligned => false,
            GeometryChoice::Texture => true,
        };
        progress(&format!(
            "product looks {} (stationarity {stationarity:.2}; texture below {})",
            if texture {
                "like a texture: 8 rotations/flips, matched anywhere"
            } else {
                "aligned: fixed input, matched near its own place"
            },
            calibrate::TEXTURE_RATIO
        ));
        let geometry = if texture {
            let scale = (cfg.pixels as f64 / (first.width() as f64 * first.height() as f64)).sqrt();
            match cfg.texture_scale {
                TextureScale::Keep => Geometry::Texture { scale, max_pixels: cfg.pixels.saturating_mul(4) },
                TextureScale::Fit => Geometry::Fit { pixels: cfg.pixels },
                TextureScale::Squash => Geometry::Aligned { width: aw, height: ah },
            }
        } else {
            Geometry::Aligned { width: aw, height: ah }
        };
        if !texture {
            for (name, img) in &references[1..] {
                let rel = |a: u32, b: u32| (a as f32 / b as f32 - 1.0).abs();
                let aspect = rel(img.width() * first.height(), img.height() * first.width());
                if aspect > 0.05 {
                    return Err(DetectError::SizeMismatch {
                        name: name.clone(),
                        w: img.width(),
                        h: img.height(),
                        first: first_name.clone(),
                        fw: first.width(),
                        fh: first.height(),
                    });
                }
            }
        }
        // The image score may come from its own (coarser, more semantic) layer than the map. `auto`:
        // textures score on stride 16, whose features shrug off normal texture variation; aligned
        // products score on the map's layers, whose positional matching catches misplaced parts.
        let mut score_strides = match &cfg.score_strides {
            Some(s) => s.clone(),
            None if texture => vec![16],
            None => Vec::new(),
        };
        score_strides.sort_unstable();
        let mut map_strides = cfg.strides.clone();
        map_strides.sort_unstable();
        let score_group = if score_strides.is_empty() || score_strides == map_strides {
            None
        } else {
            let outs = score_strides.iter().map(|&s| self.output_for(s)).collect::<Result<Vec<_>, _>>()?;
            groups.push(outs);
            bank_strides.push(score_strides[0]);
            Some(groups.len() - 1)
        };
        let augment = if texture { Dihedral::all() } else { vec![Dihedral::IDENTITY] };
        // Distances: raw-feature L2 keeps the magnitude of a local change, which localises defects and
        // separates misplaced parts; a texture's verdict needs invariance to tile-to-tile contrast, so its
        // score layer compares directions (cosine). Measured in docs/RESULTS.md.
        let metrics: Vec<Metric> = (0..groups.len())
            .map(|g| match cfg.metric {
                MetricChoice::Cosine => Metric::Cosine,
                MetricChoice::L2 => Metric::L2,
                MetricChoice::Auto if texture && Some(g) == score_group => Metric::Cosine,
                MetricChoice::Auto => Metric::L2,
            })
            .collect();
        // Textures: the score layer always holds every rotation (the verdict must not depend on how a
        // tile lies); the map layers hold them too unless `rotate_map = false`, which halves the
        // decoder's time at a small cost in localisation (docs/RESULTS.md).
        let group_augment: Vec<Vec<Dihedral>> = (0..groups.len())
            .map(|g| {
                if Some(g) == score_group || cfg.rotate_map || score_group.is_none() {
                    augment.clone()
                } else {
                    vec![Dihedral::IDENTITY]
                }
            })
            .collect();
        let prepared: Vec<RgbImage> = references
            .iter()
            .map(|(_, img)| {
                let (w, h) = geometry.input_size(img.width(), img.height());
                imageio::resize(img, w, h)
            })
            .collect();

        let background = match cfg.foreground {
            Switch::On => Some(calibrate::background(&prepared[0])),
            Switch::Off => None,
            Switch::Auto if texture => None,
            Switch::Auto => calibrate::plain_background(&prepared[0]),
        };
        if let Some(bg) = &background {
            progress(&format!(
                "plain background {:?}: its patches are left out of the score",
                bg.rgb.map(|v| v.round())
            ));
        }
        let mut meta = EnrolmentMeta {
            model_name: self.encoder.manifest().name.clone(),
            model_sha256: self.encoder.model_sha256().to_string(),
            input: self.encoder.manifest().input.clone(),
            geometry,
            augment,
            group_augment,
            groups,
            pool: cfg.pool,
            window: if texture { 1.0 } else { cfg.window },
            score_group,
            score_scales: if texture && score_group.is_some() { cfg.scale_augment.clone() } else { Vec::new() },
            metrics,
            top_fraction: cfg.top_fraction,
            sigma: cfg.sigma,
            min_region: cfg.min_region,
            background,
            thresholds: Thresholds::default(),
            calibration: Calibration::default(),
            references: references.iter().map(|(n, _)| n.clone()).collect(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        // Memory bank: every reference under every augmentation, per layer, then coreset-bounded.
        let mut per_ref: Vec<Vec<Patches>> = Vec::new();
        for (i, img) in prepared.iter().enumerate() {
            progress(&format!("encoding reference {}/{} ({} views)", i + 1, prepared.len(), meta.augment.len()));
            per_ref.push(self.reference_patches(&meta, img)?);
        }
        let banks = build_banks(&per_ref, &bank_strides, None, cfg.max_bank, progress);
        let (thresholds, mut calibration) =
            calibrate::calibrate(self, &meta, &banks, &per_ref, &prepared, cfg, progress)?;
        calibration.stationarity = stationarity;
        if let Some((i, score)) = calibration.outlier() {
            return Err(DetectError::Outlier {
                name: references[i].0.clone(),
                score,
                limit: calibration.anomaly_median(),
            });
        }
        meta.thresholds = thresholds;
        meta.calibration = calibration;
        Ok(Enrolment::new(meta, banks))
    }
}

/// Sorted encoder outputs used by any group.
fn union(groups: &[Vec<usize>]) -> Vec<usize> {
    let mut outputs: Vec<usize> = groups.iter().flatten().copied().collect();
    outputs.sort_unstable();
    outputs.dedup();
    outputs
}

/// Pools the encoder maps into patches and fuses each group (maps are in `outputs` order).
fn group_patches(
    maps: &[features::FeatureMap],
    outputs: &[usize],
    groups: &[Vec<usize>],
    pool: usize,
    metrics: &[Metric],
) -> Vec<Patches> {
    groups
        .iter()
        .zip(metrics)
        .map(|(g, &metric)| {
            let parts: Vec<Patches> = g
                .iter()
                .filter_map(|o| outputs.iter().position(|x| x == o))
                .map(|i| maps[i].to_patches_with(pool, metric))
                .collect();
            features::concat_with(&parts.iter().collect::<Vec<_>>(), metric)
        })
        .collect()
}

/// Builds the per-layer banks from each reference's patches, leaving out reference `skip`.
pub(crate) fn build_banks(
    per_ref: &[Vec<Patches>],
    strides: &[usize],
    skip: Option<usize>,
    max_bank: usize,
    progress: &mut dyn FnMut(&str),
) -> Vec<Bank> {
    (0..strides.len())
        .map(|l| {
            let dim = per_ref[0][l].dim;
            let (mut rows, mut pos) = (Vec::new(), Vec::new());
            for (i, views) in per_ref.iter().enumerate() {
                if Some(i) != skip {
                    rows.extend_from_slice(&views[l].rows);
                    pos.extend_from_slice(&views[l].pos);
                }
            }
            let n = rows.len() / dim;
            if n > max_bank {
                progress(&format!("coreset: stride {} bank {n} -> {max_bank} patches", strides[l]));
                let keep = features::coreset(&rows, dim, max_bank, |_, _| {});
                rows = keep.iter().flat_map(|&i| rows[i as usize * dim..(i as usize + 1) * dim].to_vec()).collect();
                pos = keep.iter().map(|&i| pos[i as usize]).collect();
            }
            // Rows sorted by y let the positional search skip rows out of a query block's reach.
            let mut order: Vec<usize> = (0..pos.len()).collect();
            order.sort_by(|&a, &b| pos[a][1].total_cmp(&pos[b][1]));
            let rows = order.iter().flat_map(|&i| rows[i * dim..(i + 1) * dim].to_vec()).collect();
            let pos = order.iter().map(|&i| pos[i]).collect();
            Bank { stride: strides[l], dim, rows, pos }
        })
        .collect()
}

/// The decoder's search: each bank layer's nearest-neighbour distance grid (within `window` of each
/// patch's place when it is below 1).
pub fn distances(patches: &[Patches], banks: &[Bank], window: f32, metrics: &[Metric]) -> Vec<Grid> {
    patches
        .iter()
        .zip(banks)
        .zip(metrics)
        .map(|((p, bank), &metric)| {
            let (dist, _) = features::nearest_within(&p.rows, &p.pos, &bank.rows, &bank.pos, bank.dim, window, metric);
            Grid::new(p.w, p.h, dist)
        })
        .collect()
}

/// The mean of distance grids on the finest one's grid.
pub fn average(grids: impl IntoIterator<Item = Grid>) -> Grid {
    let grids: Vec<Grid> = grids.into_iter().collect();
    let finest = grids.iter().max_by_key(|g| g.w * g.h).expect("at least one layer");
    let (w, h) = (finest.w, finest.h);
    let mut acc = vec![0.0f32; w * h];
    for g in &grids {
        let g = g.resize(w, h);
        acc.iter_mut().zip(&g.data).for_each(|(a, v)| *a += v);
    }
    let n = grids.len() as f32;
    acc.iter_mut().for_each(|a| *a /= n);
    Grid::new(w, h, acc)
}

/// Zeroes patch scores where the image shows only the plain background.
/// `fg` holds the image's per-pixel foreground flags (`w x h`, row-major).
fn mask_background(grid: &Grid, w: u32, h: u32, fg: &[bool]) -> Grid {
    // A patch counts as foreground if any pixel of its cell (dilated by one cell) is.
    let (cw, ch) = (w as f32 / grid.w as f32, h as f32 / grid.h as f32);
    let mut out = grid.clone();
    for gy in 0..grid.h {
        for gx in 0..grid.w {
            let x0 = ((gx as f32 - 1.0) * cw).max(0.0) as u32;
            let y0 = ((gy as f32 - 1.0) * ch).max(0.0) as u32;
            let x1 = (((gx + 2) as f32 * cw) as u32).min(w);
            let y1 = (((gy + 2) as f32 * ch) as u32).min(h);
            let any = (y0..y1).any(|y| (x0..x1).any(|x| fg[(y * w + x) as usize]));
            if !any {
                out.data[gy * grid.w + gx] = 0.0;
            }
        }
    }
    out
}

/// Applies thresholds to a scored image and extracts regions (boxes in original-image pixels).
pub fn verdict(scored: Scored, th: &Thresholds, min_region: f32, orig_w: u32, orig_h: u32) -> Inspection {
    let anomalous = scored.score >= th.image;
    let regions = if anomalous {
        let mut r = regions::find(&scored.map, th.pixel, min_region, orig_w, orig_h);
        if r.is_empty() {
            // The image is anomalous but no pixel passes the mask threshold: outline the hottest area.
            let peak = scored.map.max();
            let mean = scored.map.data.iter().sum::<f32>() / scored.map.data.len().max(1) as f32;
            r = regions::find(&scored.map, 0.5 * (peak + mean), min_region, orig_w, orig_h);
            r.truncate(1);
        }
        r
    } else {
        Vec::new()
    };
    let answer = regions::answer(anomalous, &regions);
    Inspection {
        verdict: Verdict {
            anomalous,
            score: scored.score,
            threshold: th.image,
            pixel_threshold: th.pixel,
            regions,
            answer,
            timings: scored.timings,
        },
        map: scored.map,
    }
}

/// Largest absolute difference between two lists of feature maps, relative to the largest magnitude
/// in `reference` (infinite when the shapes differ).
pub fn relative_error(reference: &[features::FeatureMap], other: &[features::FeatureMap]) -> f32 {
    if reference.len() != other.len() {
        return f32::INFINITY;
    }
    let mut worst = 0.0f32;
    for (a, b) in reference.iter().zip(other) {
        if (a.c, a.h, a.w) != (b.c, b.h, b.w) {
            return f32::INFINITY;
        }
        let scale = a.data.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = a.data.iter().zip(&b.data).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(diff / scale);
    }
    worst
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}
