//! The few-shot detector: enrolment of normal references into a patch memory bank, and inspection of
//! a query image into an anomaly map, an image score, a verdict and its regions.
//!
//! Inspection (the decoder): the encoder's stride-8 and stride-16 maps are pooled 3 x 3 and
//! concatenated on the stride-8 grid; each query patch's distance to its nearest bank patch (L2 on raw
//! features, or cosine) is found by blocked matrix products; the image score is the mean of the top 1%
//! of patch distances; the map is upsampled bilinearly to the input size and smoothed with a Gaussian
//! (sigma 4 px at 256 px).
//!
//! Enrolment chooses from the shots themselves how the product is seen (see [`crate::enrol::calibrate`]):
//! `aligned` products are resized to one fixed input and each patch is matched only near its own
//! place; products that look like a texture (a shifted shot matches itself as well anywhere as near
//! its place) keep each image's aspect (fitted to the pixel budget), are matched anywhere, their bank
//! holds the eight rotations and flips of the shots (AnomalyDINO), and their image score comes from a
//! cosine stride-16 layer whose bank also holds the shots at the `scale_augment` scales.

use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;

use crate::config::engine::EngineConfig;
use crate::detect::enrolment::{ALIGN, Bank, Enrolment, EnrolmentMeta};
use crate::detect::features::{self, Distance, Patches};
use crate::detect::inspection::{DetectError, Inspection, Scored, Timings, verdict};
use crate::detect::ivf::Ivf;
use crate::detect::map::{self, Grid};
use crate::detect::{background, classes};
use crate::engine::encoder::Encoder;
use crate::util::imageio::{self, Dihedral};

/// The encoder plus the decoder logic; one per thread. Inspection runs on the GPU pipeline when one
/// was started ([`Detector::load`] with `engine.device`), else on the CPU; enrolment and calibration
/// always run on the CPU reference.
#[derive(Debug)]
pub struct Detector {
    pub(crate) encoder: Encoder,
    #[cfg(feature = "cuda")]
    gpu: Option<Box<crate::detect::gpu::Pipeline>>,
}

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
    pub fn load(cfg: &EngineConfig) -> Result<Self, DetectError> {
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let mut det = Detector::new(Encoder::load(cfg)?);
        match crate::engine::device::select(cfg.device)? {
            crate::engine::device::Selected::Cpu => {}
            #[cfg(feature = "cuda")]
            crate::engine::device::Selected::Cuda(n) => match det.start_gpu(n, cfg) {
                Ok(()) => {}
                Err(e) if cfg.device == crate::config::engine::DeviceChoice::Auto => {
                    tracing::warn!("device auto: the GPU could not start ({e}); inspecting on the CPU")
                }
                Err(e) => return Err(e),
            },
            #[cfg(not(feature = "cuda"))]
            crate::engine::device::Selected::Cuda(n) => {
                return Err(crate::engine::device::DeviceError::NotBuilt(n).into());
            }
        }
        Ok(det)
    }

    /// Starts the GPU pipeline on GPU `ordinal` and checks its encoder against ONNX Runtime.
    #[cfg(feature = "cuda")]
    pub fn start_gpu(&mut self, ordinal: usize, cfg: &EngineConfig) -> Result<(), DetectError> {
        self.gpu = Some(Box::new(crate::detect::gpu::start(&mut self.encoder, ordinal, cfg)?));
        Ok(())
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
    pub fn engine_cache(&self) -> crate::engine::encoder::EngineCache {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.gpu
            && p.encoder() == crate::detect::gpu::DeviceEncoder::Kernels
        {
            return if p.gpu().ptx_cached {
                crate::engine::encoder::EngineCache::Hit
            } else {
                crate::engine::encoder::EngineCache::Miss
            };
        }
        self.encoder.engine_cache()
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.encoder
    }

    pub(crate) fn output_for(&self, stride: usize) -> Result<usize, DetectError> {
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
        distances: &[Distance],
    ) -> Result<Vec<Patches>, DetectError> {
        let outputs = union(groups);
        let spec = &self.encoder.manifest().input;
        let t = imageio::to_tensor(img, spec.scale, spec.mean, spec.std);
        let maps = self.encoder.run(t, img.height() as usize, img.width() as usize, &outputs)?;
        Ok(group_patches(&maps, &outputs, groups, pool, distances))
    }

    /// The patches of every augmented view of an image, concatenated per group (rows and positions).
    /// `augment[g]` lists the views group `g` takes; each view is encoded once for all groups taking it.
    pub fn augmented_patches(
        &mut self,
        img: &RgbImage,
        augment: &[Vec<Dihedral>],
        groups: &[Vec<usize>],
        pool: usize,
        distances: &[Distance],
    ) -> Result<Vec<Patches>, DetectError> {
        let mut out: Vec<Option<Patches>> = vec![None; groups.len()];
        for d in Dihedral::all() {
            let takers: Vec<usize> = (0..groups.len()).filter(|&g| augment[g].contains(&d)).collect();
            if takers.is_empty() {
                continue;
            }
            let sub: Vec<Vec<usize>> = takers.iter().map(|&g| groups[g].clone()).collect();
            let sub_distances: Vec<Distance> = takers.iter().map(|&g| distances[g]).collect();
            for (p, &g) in self.patches(&d.apply(img), &sub, pool, &sub_distances)?.into_iter().zip(&takers) {
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
        let mut views = self.augmented_patches(img, &meta.group_augment, &meta.groups, meta.pool, &meta.distances)?;
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
                &meta.distances[g..=g],
            )?;
            let extra = extra.into_iter().next().ok_or(DetectError::EmptyLayer(g))?;
            views[g].rows.extend_from_slice(&extra.rows);
            views[g].pos.extend_from_slice(&extra.pos);
        }
        Ok(views)
    }

    /// Scores an image already brought to its encoder-input size against `banks` (searched exactly).
    pub fn score_prepared(
        &mut self,
        meta: &EnrolmentMeta,
        banks: &[Bank],
        img: &RgbImage,
    ) -> Result<Scored, DetectError> {
        self.score_indexed(meta, banks, &[], img)
    }

    /// [`Detector::score_prepared`], searching a bank through its index where `index` holds one.
    pub fn score_indexed(
        &mut self,
        meta: &EnrolmentMeta,
        banks: &[Bank],
        index: &[Option<Arc<Ivf>>],
        img: &RgbImage,
    ) -> Result<Scored, DetectError> {
        let t0 = Instant::now();
        let outputs = union(&meta.groups);
        let spec = &self.encoder.manifest().input;
        let tensor = imageio::to_tensor(img, spec.scale, spec.mean, spec.std);
        let t1 = Instant::now();
        let maps = self.encoder.run(tensor, img.height() as usize, img.width() as usize, &outputs)?;
        let t2 = Instant::now();
        let patches = group_patches(&maps, &outputs, &meta.groups, meta.pool, &meta.distances);
        let mut grids = distances(&patches, banks, index, meta);
        if let Some(bg) = &meta.background {
            let fg = background::foreground(img, bg);
            grids = grids.iter().map(|g| mask_background(g, img.width(), img.height(), &fg)).collect();
        }
        grids.iter_mut().for_each(|g| crate::detect::zones::mask(g, &meta.zones));
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
                    Ok(scored) => out.extend(scored.into_iter().zip(run).map(|(s, i)| {
                        let mut ins = verdict(s, &meta.thresholds, meta.min_region, i.width(), i.height());
                        let pixel = ins.verdict.pixel_threshold;
                        classes::label_regions(&meta.classes, i, &ins.map, pixel, &mut ins.verdict.regions);
                        ins
                    })),
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
        let mut scored = self.score_indexed(&enrolment.meta, &enrolment.banks, &enrolment.index, &prepared)?;
        scored.timings.preprocess_ms += resize_ms;
        let th = &enrolment.meta.thresholds;
        let mut ins = verdict(scored, th, enrolment.meta.min_region, img.width(), img.height());
        let pixel = ins.verdict.pixel_threshold;
        classes::label_regions(&enrolment.meta.classes, img, &ins.map, pixel, &mut ins.verdict.regions);
        Ok(ins)
    }
}

/// Sorted encoder outputs used by any group.
pub(crate) fn union(groups: &[Vec<usize>]) -> Vec<usize> {
    let mut outputs: Vec<usize> = groups.iter().flatten().copied().collect();
    outputs.sort_unstable();
    outputs.dedup();
    outputs
}

/// Pools the encoder maps into patches and fuses each group (maps are in `outputs` order).
pub(crate) fn group_patches(
    maps: &[crate::engine::encoder::FeatureMap],
    outputs: &[usize],
    groups: &[Vec<usize>],
    pool: usize,
    distances: &[Distance],
) -> Vec<Patches> {
    groups
        .iter()
        .zip(distances)
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

/// The decoder's search: each bank layer's nearest-neighbour distance grid (within `meta.window` of
/// each patch's place when it is below 1), through the layer's index when `index` has one.
pub fn distances(patches: &[Patches], banks: &[Bank], index: &[Option<Arc<Ivf>>], meta: &EnrolmentMeta) -> Vec<Grid> {
    patches
        .iter()
        .zip(banks)
        .zip(&meta.distances)
        .enumerate()
        .map(|(l, ((p, bank), &metric))| {
            let (dist, _) = match index.get(l) {
                Some(Some(ivf)) => ivf.search(&p.rows, meta.search.probe),
                _ => features::nearest_within(&p.rows, &p.pos, &bank.rows, &bank.pos, bank.dim, meta.window, metric),
            };
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

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}
