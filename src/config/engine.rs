//! `[engine]`: where the ONNX Runtime library and the model are, the execution providers in order of
//! preference, and the device inspection runs on.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The configured device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("device `{s}`: use auto, cpu or cuda:N (e.g. cuda:0)")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A provider name that is none of tensorrt, cuda or cpu.
#[derive(Debug, thiserror::Error)]
#[error("unknown execution provider `{0}` (use tensorrt, cuda or cpu)")]
pub struct UnknownProvider(pub String);

/// One ONNX Runtime execution provider, in the order of preference written in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Tensorrt,
    Cuda,
    Cpu,
}

impl std::str::FromStr for Provider {
    type Err = UnknownProvider;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tensorrt" | "trt" => Ok(Self::Tensorrt),
            "cuda" => Ok(Self::Cuda),
            "cpu" => Ok(Self::Cpu),
            other => Err(UnknownProvider(other.to_string())),
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tensorrt => "tensorrt",
            Self::Cuda => "cuda",
            Self::Cpu => "cpu",
        })
    }
}

/// Settings of the encoder engine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Path to libonnxruntime.so; unset means ORT_DYLIB_PATH, then the project's `.venv`.
    pub onnxruntime: Option<PathBuf>,
    /// Encoder ONNX file with its `.json` manifest beside it; unset means the built-in EfficientNet-Lite0.
    pub model: Option<PathBuf>,
    /// Execution providers in order of preference.
    pub providers: Vec<Provider>,
    /// Intra-op threads for the CPU provider (0 = ONNX Runtime's choice: one per core).
    pub threads: usize,
    /// Whether idle intra-op threads spin-wait after a run. Unset: off. Spinning saves the encoder
    /// about half a millisecond, but the spinning threads hold the cores the decoder needs right after
    /// the encoder: on 2 cores the decoder took three times as long on average and p99 tripled
    /// (docs/RESULTS.md, "Tail latency"). `true` only where cores are spare.
    pub spin: Option<bool>,
    /// Folder for TensorRT engine caches (a subfolder per GPU model and TensorRT version).
    pub trt_cache: Option<PathBuf>,
    /// Where inspection runs: `auto` (the GPU when this build has CUDA support and a driver is
    /// present, else the CPU), `cpu`, or `cuda:N` (required: an error if that GPU cannot be used).
    pub device: DeviceChoice,
    /// Folder for the compiled GPU kernels (PTX per architecture). Unset: $CACHE_DIRECTORY,
    /// $XDG_CACHE_HOME/anomalyd, ~/.cache/anomalyd.
    pub kernel_cache: Option<PathBuf>,
    /// What runs the encoder on the GPU path: `auto` (ONNX Runtime when it runs on a GPU provider,
    /// else anomalyd's kernels), `kernels`, or `onnxruntime` (its TensorRT/CUDA provider with IO
    /// binding, so the features stay on the device; an error without such a provider).
    pub gpu_encoder: GpuEncoder,
}

/// What runs the encoder on the GPU path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuEncoder {
    #[default]
    Auto,
    Kernels,
    Onnxruntime,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            onnxruntime: None,
            model: None,
            providers: vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu],
            threads: 0,
            spin: None,
            trt_cache: None,
            device: DeviceChoice::Auto,
            kernel_cache: None,
            gpu_encoder: GpuEncoder::Auto,
        }
    }
}
