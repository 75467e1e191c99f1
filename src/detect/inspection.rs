//! What one inspection produces: stage timings, the scored map, and the verdict with its regions;
//! [`verdict`] applies an enrolment's thresholds to a scored image.

use serde::{Deserialize, Serialize};

use crate::detect::enrolment::Thresholds;
use crate::detect::map::Grid;
use crate::detect::regions;
use crate::engine::encoder::EngineError;
use crate::types::findings::{Findings, Region};

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
    #[error("enrolment was made with model {enrolled} but the encoder is {running}; enrol again with this model")]
    ModelMismatch { enrolled: String, running: String },
    #[error(transparent)]
    Zones(#[from] crate::detect::zones::ZoneError),
    #[error(transparent)]
    Classes(#[from] crate::detect::classes::ClassError),
    #[error(transparent)]
    Device(#[from] crate::engine::device::DeviceError),
    #[cfg(feature = "cuda")]
    #[error("{0}")]
    Gpu(#[from] crate::engine::gpu::GpuError),
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
    let answer = Findings {
        anomalous,
        score: scored.score,
        threshold: th.image,
        regions: regions.clone(),
        product: None,
        classes: Vec::new(),
    }
    .answer_text();
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
