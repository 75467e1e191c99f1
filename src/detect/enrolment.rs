//! What an enrolment holds and the detector applies: how images reach the encoder ([`Geometry`]), the
//! memory banks, the background model, the thresholds and the calibration evidence behind them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::detect::features::Distance;
use crate::detect::ivf::Ivf;
use crate::detect::map::quantile;
use crate::detect::normal::NormalModel;
use crate::engine::encoder::InputSpec;
use crate::util::imageio;
use crate::util::imageio::Dihedral;

/// Alignment of the encoder input; the encoder's deepest stride.
pub const ALIGN: u32 = 16;

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
    #[serde(rename = "metrics")]
    pub distances: Vec<Distance>,
    pub top_fraction: f32,
    /// Approximate search on large banks of textures (`detect.search_lists`; 0: exact, as before).
    #[serde(default)]
    pub search: Search,
    pub sigma: f32,
    pub min_region: f32,
    pub background: Option<Background>,
    /// Regions an operator set to ignore or to inspect ([`crate::detect::zones`]); left out of the file
    /// when there are none, so that an enrolment's identity does not change with this field's arrival.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<crate::detect::zones::Zone>,
    /// Regions an operator labelled with a defect class ([`crate::detect::classes`]); left out when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<crate::detect::classes::Example>,
    pub thresholds: Thresholds,
    pub calibration: Calibration,
    pub references: Vec<String>,
    pub created_unix: u64,
}

/// A product's enrolment: decisions plus the memory bank.
/// The decoder's nearest-neighbour search on a bank searched whole (textures): exact (`lists` 0), or an
/// inverted file of `lists` k-means lists of which each patch probes `probe` ([`Ivf`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Search {
    pub lists: usize,
    pub probe: usize,
}

/// Banks smaller than this are searched exactly whatever [`Search`] says: they are fast already.
pub const MIN_INDEXED_ROWS: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct Enrolment {
    pub meta: EnrolmentMeta,
    pub banks: Vec<Bank>,
    /// Identity of this enrolment's bank in this process (a GPU uploads each bank once). Make a new
    /// enrolment with [`Enrolment::new`] rather than editing `banks` in place.
    pub bank_id: BankId,
    /// Each bank's approximate-search index, where `meta.search` asks for one (CPU path only).
    pub index: Vec<Option<Arc<Ivf>>>,
}

impl Enrolment {
    pub fn new(meta: EnrolmentMeta, banks: Vec<Bank>) -> Self {
        let index = Self::index_for(&meta, &banks);
        Self { meta, banks, bank_id: BankId::fresh(), index }
    }

    /// The search index of each bank layer the meta's search settings ask for (None: searched exactly).
    pub fn index_for(meta: &EnrolmentMeta, banks: &[Bank]) -> Vec<Option<Arc<Ivf>>> {
        banks
            .iter()
            .zip(&meta.distances)
            .map(|(b, &metric)| {
                let wanted = meta.search.lists > 0 && meta.window >= 1.0 && b.len() >= MIN_INDEXED_ROWS;
                wanted.then(|| Arc::new(Ivf::build(&b.rows, b.dim, metric, meta.search.lists, 8, 0x1f)))
            })
            .collect()
    }

    /// Memory its banks take (patch features and positions).
    pub fn bytes(&self) -> usize {
        self.banks.iter().map(|b| (b.rows.len() + 2 * b.pos.len()) * std::mem::size_of::<f32>()).sum()
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

/// The thresholds stored with an enrolment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    /// Image score at or above which the verdict is NG.
    pub image: f32,
    /// Map value at or above which a pixel belongs to a defect region.
    pub pixel: f32,
    /// How they were chosen: `auto` or `user`.
    pub source: String,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self { image: f32::INFINITY, pixel: f32::INFINITY, source: "auto".into() }
    }
}

/// What calibration measured, kept in the enrolment so that every threshold can be explained.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    /// Scores of nuisance views of the shots.
    pub normal: Vec<f32>,
    /// Held-out normal scores: leave-one-out references, or the halves of a single texture shot.
    pub held_out: Vec<f32>,
    /// Scores of simulated anomalies.
    pub anomaly: Vec<f32>,
    /// Positional over anywhere matching distance of the circularly shifted first shot (low = texture).
    pub stationarity: f32,
    /// Whether `held_out` holds leave-one-out scores of whole references (one per reference).
    pub leave_one_out: bool,
    /// The share of good parts the threshold was chosen to reject.
    #[serde(default)]
    pub false_reject_target: f64,
    /// The normal-variation model the image threshold came from, and what it was fitted on.
    #[serde(default)]
    pub model: Option<NormalModel>,
    #[serde(default)]
    pub evidence: String,
    /// Share of the simulated anomalies the image threshold passes as good.
    #[serde(default)]
    pub simulated_escape: f32,
    /// What enrolment or learning found worth a look (a reference unlike the others, a high expected
    /// escape rate), each with its evidence.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Line mode: parts the thresholds and bank learned from, and parts the guard refused.
    #[serde(default)]
    pub learned_parts: usize,
    #[serde(default)]
    pub refused_parts: usize,
}

impl Calibration {
    pub fn anomaly_median(&self) -> f32 {
        quantile(&self.anomaly, 0.5)
    }
}
