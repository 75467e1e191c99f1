//! The encoder and where it runs: ONNX Runtime's session ([`encoder`]), the choice of CPU or GPU
//! ([`device`]), the ONNX graph read into fused layers ([`onnx`], [`netplan`]) and, with feature
//! `cuda`, anomalyd's own kernels on the GPU ([`gpu`]).

pub mod device;
pub mod encoder;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod netplan;
pub mod onnx;
