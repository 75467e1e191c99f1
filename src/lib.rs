//! # anomalyd
//!
//! Few-shot industrial anomaly detection: from one (or a few) normal images of a product, decide for
//! every new image whether it is defective, where, and say so in words. No threshold is set by hand.
//!
//! # Layout
//! - [`engine`]: the encoder, an ONNX model run by ONNX Runtime (providers TensorRT > CUDA > CPU).
//! - [`device`]: the one place that picks the CPU or a GPU (`engine.device`); [`gpu`] (feature
//!   `cuda`): the encoder and decoder as anomalyd's own CUDA kernels, held to the CPU path by tests;
//!   [`netplan`] reads the encoder's ONNX graph ([`onnx`]) into the layers those kernels run.
//! - [`features`]: patch features, the blocked-GEMM nearest-neighbour search, greedy coreset.
//! - [`detect`]: enrolment (memory bank, geometry and augmentation chosen from the shots) and
//!   inspection (the decoder: map, score, verdict).
//! - [`calibrate`]: the automatic image and mask thresholds from nuisance views, held-out shots and
//!   simulated anomalies ([`synth`]).
//! - [`map`], [`regions`]: map operations; connected regions, 3 x 3 grid cells and the answer text.
//! - [`enrolment`]: the versioned, checksummed enrolment file.
//! - [`eval`], [`metrics`]: MVTec-layout evaluation (AUROC, PRO, F1-max, accuracy).
//! - [`bench`]: speed and memory measurement; [`demo`]: built-in demo parts; [`overlay`]: heat maps.
//! - [`daemon`]: `anomalyd run`: cameras ([`source`]) → per-camera queue and inspection worker →
//!   verdicts ([`sink`]: MQTT, flagged-frame store, HTTP API), metrics in [`telemetry`].
//! - [`llm`]: words for NG frames and multi-turn questions about them: a local GGUF model (feature
//!   `llm`) or an OpenAI-compatible endpoint, checked against the findings ([`describe`]), off the
//!   frame path.
//! - [`reference`]: an enrolment file or a folder of normal images, for the commands and the daemon.
//! - [`config`], [`cli`], [`app`]: configuration and the command line; [`chat`]: `anomalyd chat`.

pub mod app;
pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod describe;
pub mod detect;
pub mod device;
pub mod engine;
pub mod enrolment;
pub mod eval;
pub mod features;
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod imageio;
pub mod llm;
pub mod map;
pub mod metrics;
pub mod netplan;
pub mod onnx;
pub mod overlay;
pub mod reference;
pub mod regions;
pub mod sink;
pub mod source;
pub mod synth;
pub mod telemetry;
