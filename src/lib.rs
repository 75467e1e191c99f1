//! # anomalyd
//!
//! Few-shot industrial anomaly detection: from one (or a few) normal images of a product, decide for
//! every new image whether it is defective, where, and say so in words. No threshold is set by hand.
//!
//! # Layout
//! The modules are layers of the pipeline, listed from the bottom up. A module uses only the layers
//! listed before it (`tests/layering.rs` checks this from the `use` lines).
//! - [`util`], [`types`], [`config`], [`telemetry`]: helpers (image files, seeded random numbers,
//!   locks, URLs); the values every stage passes on (frame, findings and their answer text, the
//!   verdict message); the TOML file, one section per file; every Prometheus metric as typed events.
//! - [`engine`]: the encoder (ONNX Runtime: TensorRT > CUDA > CPU), the one place that picks the
//!   device, the ONNX graph as fused layers, and anomalyd's own CUDA kernels (feature `cuda`).
//! - [`detect`]: the decoder: patch features and nearest-neighbour search, anomaly map, score,
//!   regions, background mask, verdict; the same on the GPU.
//! - [`enrol`]: from normal shots to an enrolment: geometry, banks, automatic thresholds from
//!   simulated anomalies and nuisance views, the enrolment file, references; line mode and operators'
//!   lessons, kept as versions.
//! - [`describe`]: words: template answers, the answer check, language-model back ends and the
//!   explainer that runs them off the frame path.
//! - [`source`]: cameras and replay, and the intake every frame enters by.
//! - [`sink`]: where verdicts go: the MQTT link and its outbox, the flagged-frame store, the audit log.
//! - [`control`]: what steers the daemon: the HTTP API, the PLC servers, the embedded MQTT broker and
//!   the operator station's pages.
//! - [`daemon`]: `anomalyd run`: wiring, inspection workers, reload, shutdown, systemd.
//! - [`commands`]: `eval`, `bench`, `chat`.
//! - [`cli`], [`app`]: the command line and its glue (the only place with `anyhow`).

pub mod app;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod describe;
pub mod detect;
pub mod engine;
pub mod enrol;
#[doc(hidden)]
pub mod fuzzing;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod types;
pub mod util;
