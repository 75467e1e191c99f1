//! The few-shot detector: enrolment of normal references into a patch memory bank, and inspection of
//! a query image into an anomaly map, an image score, a verdict and its regions.
//!
//! Inspection (the decoder): the encoder's stride-8 and stride-16 maps are pooled 3 x 3 and
//! L2-normalised; each query patch's cosine distance to its nearest bank patch is found by blocked
//! matrix products; the layers' distance grids are averaged on the stride-8 grid; the image score is
//! the mean of the top 1% of patch distances; the map is upsampled bilinearly to the input size and
//! smoothed with a Gaussian (sigma 4 px at 256 px).
//!
//! Enrolment chooses from the shots themselves how the product is seen (see [`crate::calibrate`]):
//! `aligned` products are resized to one fixed input and matched without augmentation; products
//! that look like a texture (stationary: one half of a shot predicts the other) keep each image's
//! aspect and scale, and their bank holds the eight rotations and flips of the shots (AnomalyDINO).

use std::time::Instant;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::calibrate::{self, Calibration, Thresholds};
use crate::engine::{Encoder, EngineError, InputSpec};
use crate::features::{self, Patches};
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
    /// Neighbourhood pooling of patch features (PatchCore's 3 x 3).
    pub pool: usize,
    /// Image score = mean of this top fraction of patch scores.
    pub top_fraction: f32,
    /// Gaussian sigma of the map, in pixels at a 256 x 256 input (scaled with the input).
    pub sigma: f32,
    /// `auto` decides from the shots; `aligned` or `texture` forces the choice.
    pub geometry: GeometryChoice,
    /// Most rows a layer's memory bank may hold; more are reduced by greedy coreset subsampling.
    pub max_bank: usize,
    /// Smallest region reported, as a fraction of the image.
    pub min_region: f32,
    /// Mask patches of the plain background out of the score (objects on a plain background).
    pub foreground: bool,
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
            pool: 3,
            top_fraction: 0.01,
            sigma: 4.0,
            geometry: GeometryChoice::Auto,
            max_bank: 16_384,
            min_region: 0.0005,
            foreground: false,
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
            _ => Err(format!(
                "geometry must be auto, aligned or texture, not `{s}`"
            )),
        }
    }
}

/// How query images are brought to the encoder.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Geometry {
    /// Every image is resized to exactly this input.
    Aligned { width: u32, height: u32 },
    /// Each image keeps its aspect ratio and is scaled by `scale` (capped at 4x the pixel budget).
    Texture { scale: f64, max_pixels: u32 },
}

impl Geometry {
    pub fn input_size(&self, w: u32, h: u32) -> (u32, u32) {
        match *self {
            Geometry::Aligned { width, height } => (width, height),
            Geometry::Texture { scale, max_pixels } => {
                let s = scale.min((max_pixels as f64 / (w as f64 * h as f64)).sqrt());
                imageio::scaled(w, h, s, ALIGN)
            }
        }
    }
}

/// One layer of the memory bank.
#[derive(Debug, Clone, PartialEq)]
pub struct Bank {
    pub stride: usize,
    /// Index of the encoder output.
    pub output: usize,
    pub dim: usize,
    pub rows: Vec<f32>,
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
    pub pool: usize,
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
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("no reference images given: enrolment needs at least one normal image of the product")]
    NoReferences,
    #[error("encoder has no stride-{0} output (model strides: {1:?})")]
    NoStride(usize, Vec<usize>),
    #[error(
        "reference {name} is {w}x{h} but {first} is {fw}x{fh}: an aligned product needs references of one \
         size and framing (use geometry = \"texture\" for surfaces that vary in size)"
    )]
    SizeMismatch {
        name: String,
        w: u32,
        h: u32,
        first: String,
        fw: u32,
        fh: u32,
    },
    #[error(
        "reference {name} does not look like the other references (its score {score:.3} is above the \
         simulated-defect median {limit:.3}): is it the same product, framed the same way?"
    )]
    Outlier {
        name: String,
        score: f32,
        limit: f32,
    },
    #[error(
        "enrolment was made with model {enrolled} but the encoder is {running}; enrol again with this model"
    )]
    ModelMismatch { enrolled: String, running: String },
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

/// The encoder plus the decoder logic; one per thread.
#[derive(Debug)]
pub struct Detector {
    encoder: Encoder,
}

impl Detector {
    pub fn new(encoder: Encoder) -> Self {
        Self { encoder }
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    fn output_for(&self, stride: usize) -> Result<usize, DetectError> {
        let outs = &self.encoder.manifest().outputs;
        outs.iter()
            .position(|o| o.stride == stride)
            .ok_or_else(|| DetectError::NoStride(stride, outs.iter().map(|o| o.stride).collect()))
    }

    /// Patches of an image already at its encoder-input size, one set per requested output.
    pub fn patches(
        &mut self,
        img: &RgbImage,
        outputs: &[usize],
        pool: usize,
    ) -> Result<Vec<Patches>, DetectError> {
        let spec = &self.encoder.manifest().input;
        let t = imageio::to_tensor(img, spec.scale, spec.mean, spec.std);
        let maps = self
            .encoder
            .run(t, img.height() as usize, img.width() as usize, outputs)?;
        Ok(maps.iter().map(|m| m.to_patches(pool)).collect())
    }

    /// Scores an image already brought to its encoder-input size against `banks`.
    pub fn score_prepared(
        &mut self,
        meta: &EnrolmentMeta,
        banks: &[Bank],
        img: &RgbImage,
    ) -> Result<Scored, DetectError> {
        let t0 = Instant::now();
        let outputs: Vec<usize> = banks.iter().map(|b| b.output).collect();
        let spec = &self.encoder.manifest().input;
        let tensor = imageio::to_tensor(img, spec.scale, spec.mean, spec.std);
        let t1 = Instant::now();
        let maps = self.encoder.run(
            tensor,
            img.height() as usize,
            img.width() as usize,
            &outputs,
        )?;
        let t2 = Instant::now();
        let patches: Vec<Patches> = maps.iter().map(|m| m.to_patches(meta.pool)).collect();
        let grid = decode(&patches, banks);
        let grid = match &meta.background {
            Some(bg) => mask_background(&grid, img, bg),
            None => grid,
        };
        let score = map::top_mean(&grid.data, meta.top_fraction);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let sigma = meta.sigma * ((w * h) as f32).sqrt() / 256.0;
        let map = grid.resize(w, h).gaussian(sigma);
        let t3 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f32() * 1e3;
        Ok(Scored {
            patch_grid: grid,
            map,
            score,
            timings: Timings {
                preprocess_ms: ms(t0, t1),
                encoder_ms: ms(t1, t2),
                decoder_ms: ms(t2, t3),
            },
        })
    }

    /// Checks that an enrolment was made with this detector's encoder.
    pub fn check(&self, enrolment: &Enrolment) -> Result<(), DetectError> {
        if enrolment.meta.model_sha256 != self.encoder.model_sha256() {
            return Err(DetectError::ModelMismatch {
                enrolled: format!(
                    "{} ({})",
                    enrolment.meta.model_name,
                    short(&enrolment.meta.model_sha256)
                ),
                running: format!(
                    "{} ({})",
                    self.encoder.manifest().name,
                    short(self.encoder.model_sha256())
                ),
            });
        }
        Ok(())
    }

    /// Inspects one image: score, verdict with the enrolment's thresholds, regions and answer text.
    pub fn inspect(
        &mut self,
        enrolment: &Enrolment,
        img: &RgbImage,
    ) -> Result<Inspection, DetectError> {
        self.check(enrolment)?;
        let t0 = Instant::now();
        let (w, h) = enrolment
            .meta
            .geometry
            .input_size(img.width(), img.height());
        let prepared = imageio::resize(img, w, h);
        let resize_ms = t0.elapsed().as_secs_f32() * 1e3;
        let mut scored = self.score_prepared(&enrolment.meta, &enrolment.banks, &prepared)?;
        scored.timings.preprocess_ms += resize_ms;
        let th = &enrolment.meta.thresholds;
        Ok(verdict(
            scored,
            th,
            enrolment.meta.min_region,
            img.width(),
            img.height(),
        ))
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
        let outputs = cfg
            .strides
            .iter()
            .map(|&s| self.output_for(s))
            .collect::<Result<Vec<_>, _>>()?;
        let (aw, ah) = imageio::fit_pixels(first.width(), first.height(), cfg.pixels, ALIGN);
        let aligned_first = imageio::resize(first, aw, ah);

        // Geometry: aligned object or texture, decided from the first shot unless configured.
        let stationarity =
            calibrate::stationarity(self, &aligned_first, outputs[0], cfg.pool, cfg.seed)?;
        let texture = match cfg.geometry {
            GeometryChoice::Auto => stationarity < calibrate::TEXTURE_RATIO,
            GeometryChoice::Aligned => false,
            GeometryChoice::Texture => true,
        };
        progress(&format!(
            "product looks {} (stationarity {stationarity:.2}; texture below {})",
            if texture {
                "like a texture: keeping aspect, 8 rotations/flips"
            } else {
                "aligned: fixed input, no rotation"
            },
            calibrate::TEXTURE_RATIO
        ));
        let geometry = if texture {
            let scale = (cfg.pixels as f64 / (first.width() as f64 * first.height() as f64)).sqrt();
            Geometry::Texture {
                scale,
                max_pixels: cfg.pixels.saturating_mul(4),
            }
        } else {
            Geometry::Aligned {
                width: aw,
                height: ah,
            }
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
        let augment = if texture {
            Dihedral::all()
        } else {
            vec![Dihedral::IDENTITY]
        };
        let prepared: Vec<RgbImage> = references
            .iter()
            .map(|(_, img)| {
                let (w, h) = geometry.input_size(img.width(), img.height());
                imageio::resize(img, w, h)
            })
            .collect();

        // Memory bank: every reference under every augmentation, per layer, then coreset-bounded.
        let mut per_ref: Vec<Vec<Patches>> = Vec::new();
        for (i, img) in prepared.iter().enumerate() {
            progress(&format!(
                "encoding reference {}/{} ({} views)",
                i + 1,
                prepared.len(),
                augment.len()
            ));
            let mut views: Vec<Patches> = Vec::new();
            for d in &augment {
                let p = self.patches(&d.apply(img), &outputs, cfg.pool)?;
                if views.is_empty() {
                    views = p;
                } else {
                    for (acc, new) in views.iter_mut().zip(p) {
                        acc.rows.extend_from_slice(&new.rows);
                    }
                }
            }
            per_ref.push(views);
        }
        let banks = build_banks(
            &per_ref,
            &cfg.strides,
            &outputs,
            None,
            cfg.max_bank,
            progress,
        );

        let background = if cfg.foreground {
            Some(calibrate::background(&prepared[0]))
        } else {
            None
        };
        let mut meta = EnrolmentMeta {
            model_name: self.encoder.manifest().name.clone(),
            model_sha256: self.encoder.model_sha256().to_string(),
            input: self.encoder.manifest().input.clone(),
            geometry,
            augment,
            pool: cfg.pool,
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
        meta.calibration.stationarity = stationarity;
        let (thresholds, calibration) = calibrate::calibrate(
            self, &mut meta, &banks, &per_ref, &prepared, &outputs, cfg, progress,
        )?;
        if let Some((i, score)) = calibration.outlier() {
            return Err(DetectError::Outlier {
                name: references[i].0.clone(),
                score,
                limit: calibration.anomaly_median(),
            });
        }
        meta.thresholds = thresholds;
        meta.calibration = calibration;
        Ok(Enrolment { meta, banks })
    }
}

/// Builds the per-layer banks from each reference's patches, leaving out reference `skip`.
pub(crate) fn build_banks(
    per_ref: &[Vec<Patches>],
    strides: &[usize],
    outputs: &[usize],
    skip: Option<usize>,
    max_bank: usize,
    progress: &mut dyn FnMut(&str),
) -> Vec<Bank> {
    (0..outputs.len())
        .map(|l| {
            let dim = per_ref[0][l].dim;
            let mut rows = Vec::new();
            for (i, views) in per_ref.iter().enumerate() {
                if Some(i) != skip {
                    rows.extend_from_slice(&views[l].rows);
                }
            }
            let n = rows.len() / dim;
            if n > max_bank {
                progress(&format!(
                    "coreset: stride {} bank {} -> {} patches",
                    strides[l], n, max_bank
                ));
                let keep = features::coreset(&rows, dim, max_bank, |_, _| {});
                rows = keep
                    .iter()
                    .flat_map(|&i| rows[i as usize * dim..(i as usize + 1) * dim].to_vec())
                    .collect();
            }
            Bank {
                stride: strides[l],
                output: outputs[l],
                dim,
                rows,
            }
        })
        .collect()
}

/// The decoder: nearest-neighbour distances per layer, averaged on the finest layer's grid.
pub fn decode(patches: &[Patches], banks: &[Bank]) -> Grid {
    let finest = patches
        .iter()
        .max_by_key(|p| p.len())
        .expect("at least one layer");
    let (w, h) = (finest.w, finest.h);
    let mut acc = vec![0.0f32; w * h];
    for (p, bank) in patches.iter().zip(banks) {
        let (dist, _) = features::nearest(&p.rows, &bank.rows, bank.dim);
        let g = Grid::new(p.w, p.h, dist).resize(w, h);
        acc.iter_mut().zip(&g.data).for_each(|(a, v)| *a += v);
    }
    let n = patches.len() as f32;
    acc.iter_mut().for_each(|a| *a /= n);
    Grid::new(w, h, acc)
}

/// Zeroes patch scores where the image shows only the plain background.
fn mask_background(grid: &Grid, img: &RgbImage, bg: &Background) -> Grid {
    let fg = calibrate::foreground(img, bg);
    // A patch counts as foreground if any pixel of its cell (dilated by one cell) is.
    let (cw, ch) = (
        img.width() as f32 / grid.w as f32,
        img.height() as f32 / grid.h as f32,
    );
    let mut out = grid.clone();
    for gy in 0..grid.h {
        for gx in 0..grid.w {
            let x0 = ((gx as f32 - 1.0) * cw).max(0.0) as u32;
            let y0 = ((gy as f32 - 1.0) * ch).max(0.0) as u32;
            let x1 = (((gx + 2) as f32 * cw) as u32).min(img.width());
            let y1 = (((gy + 2) as f32 * ch) as u32).min(img.height());
            let any = (y0..y1).any(|y| (x0..x1).any(|x| fg[(y * img.width() + x) as usize]));
            if !any {
                out.data[gy * grid.w + gx] = 0.0;
            }
        }
    }
    out
}

/// Applies thresholds to a scored image and extracts regions (boxes in original-image pixels).
pub fn verdict(
    scored: Scored,
    th: &Thresholds,
    min_region: f32,
    orig_w: u32,
    orig_h: u32,
) -> Inspection {
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

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}
