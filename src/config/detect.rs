//! `[detect]`: how enrolment sees a product and how inspection scores it. Defaults are the ones the
//! evaluation chose (docs/RESULTS.md); enrolment records what it decided, so an enrolment scores the
//! same way after a config change.

use serde::{Deserialize, Serialize};

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
    /// Approximate nearest-neighbour search for textures' banks of 4096 rows or more (CPU path; the GPU
    /// searches exactly): an inverted file of this many k-means lists (default 128); 0 searches exactly.
    /// Measured in docs/RESULTS.md ("Approximate search").
    pub search_lists: usize,
    /// With `search_lists`: the lists each patch is compared with.
    pub search_probe: usize,
    /// Smallest region reported, as a fraction of the image.
    pub min_region: f32,
    /// Mask patches of the plain background out of the score: `auto` does so for an aligned object
    /// whose shot has a plain border; `on` or `off` force it.
    pub foreground: Switch,
    /// The share of good parts the line may reject: the automatic threshold is the score good parts
    /// exceed this often under the product's normal-variation model (docs/CALIBRATION.md).
    pub false_reject_target: f64,
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
            search_lists: 128,
            search_probe: 8,
            min_region: 0.0005,
            foreground: Switch::Auto,
            false_reject_target: 0.05,
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
