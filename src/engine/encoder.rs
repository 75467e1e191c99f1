//! The encoder: an ONNX model run by ONNX Runtime, loaded at run time (`ort` with `load-dynamic`).
//!
//! The library is looked up in this order: the path in config, `ORT_DYLIB_PATH`, then the project's
//! own venv (`.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*`, searched from the
//! working directory and from the executable's folders upwards). Execution providers are tried in the
//! configured order; the first that builds a session runs, and one log line names it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::ep::{self, ExecutionProvider as _};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{IoBinding, Session};
use ort::value::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::engine::{DeviceChoice, EngineConfig, Provider};

/// The default encoder, compiled into the binary so that a fresh clone needs no model download.
const DEFAULT_MODEL: &[u8] = include_bytes!("../../models/efficientnet_lite0_s16.onnx");
const DEFAULT_MANIFEST: &str = include_str!("../../models/efficientnet_lite0_s16.json");

const INSTALL_HINT: &str = "install it with `python3 -m venv .venv && .venv/bin/pip install onnxruntime` \
     in the project folder, or set ORT_DYLIB_PATH (or `engine.onnxruntime` in config) to a libonnxruntime.so";

/// One encoder output, CHW (batch 1).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMap {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("ONNX Runtime library not found (looked in: {searched}); {INSTALL_HINT}")]
    RuntimeNotFound { searched: String },
    #[error("could not load ONNX Runtime from {path}: {reason}; {INSTALL_HINT}")]
    RuntimeLoad { path: PathBuf, reason: String },
    #[error("cannot read encoder model {path}: {cause}")]
    ModelRead { path: PathBuf, cause: std::io::Error },
    #[error("encoder manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("no execution provider could run the encoder: {0}")]
    NoProvider(String),
    #[error("encoder inference failed: {0}")]
    Inference(String),
}

/// What the model's `.json` manifest says about its input and outputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub sha256: String,
    pub input: InputSpec,
    pub outputs: Vec<OutputSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputSpec {
    pub name: String,
    pub scale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputSpec {
    pub name: String,
    pub stride: usize,
    pub channels: usize,
}

/// Finds libonnxruntime: config, then `ORT_DYLIB_PATH`, then the project's `.venv`.
pub fn find_onnxruntime(configured: Option<&Path>) -> Result<PathBuf, EngineError> {
    if let Some(p) = configured {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in &roots {
        if let Some(found) = venv_library(&root.join(".venv")) {
            return Ok(found);
        }
    }
    Err(EngineError::RuntimeNotFound {
        searched: "engine.onnxruntime, ORT_DYLIB_PATH, .venv in the working directory and the executable's folders"
            .into(),
    })
}

fn venv_library(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    for py in lib.flatten() {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut libs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib")
            })
            .collect();
        libs.sort();
        if let Some(l) = libs.pop() {
            return Some(l);
        }
    }
    None
}

static RUNTIME: OnceLock<Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

/// Loads ONNX Runtime once per process. Later calls reuse the first result.
fn init_runtime(configured: Option<&Path>) -> Result<(), EngineError> {
    let path = find_onnxruntime(configured)?;
    let result = RUNTIME.get_or_init(|| {
        if !path.exists() {
            return Err(format!("{} does not exist", path.display()));
        }
        let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
        let env = builder.with_name("anomalyd").build().map_err(|e| e.to_string())?;
        tracing::debug!(path = %path.display(), "loaded ONNX Runtime");
        Ok((path.clone(), env))
    });
    match result {
        Ok(_) => Ok(()),
        Err(reason) => Err(EngineError::RuntimeLoad { path, reason: reason.clone() }),
    }
}

/// The encoder: image tensor in, feature maps at several strides out.
pub struct Encoder {
    session: Session,
    manifest: Manifest,
    provider: Provider,
    model_sha256: String,
    model: Vec<u8>,
    engine_cache: EngineCache,
    /// The IO binding of [`Encoder::run_bound`], made at its first use.
    bound: Option<Bound>,
}

/// Memory that a bound run's input and outputs live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    Host,
    Cuda(usize),
}

/// One encoder output of a bound run, in the run's memory: its data pointer and NCHW shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundOutput {
    pub ptr: u64,
    pub shape: [usize; 4],
}

/// ONNX Runtime's IO binding of the encoder: the input tensor (allocated by the session's allocator
/// for that memory, so it is bound without a copy) and every output bound to that memory.
struct Bound {
    memory: Memory,
    io: IoBinding,
    input: ([usize; 4], Tensor<f32>),
}

impl Memory {
    fn info(self) -> ort::Result<MemoryInfo<'static>> {
        match self {
            Memory::Host => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default),
            Memory::Cuda(n) => {
                MemoryInfo::new(AllocationDevice::CUDA, n as i32, AllocatorType::Device, MemoryType::Default)
            }
        }
    }
}

/// Whether a compiled engine (TensorRT's, or the GPU kernels) came from its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineCache {
    /// Nothing is compiled ahead (the CPU provider).
    None,
    Hit,
    Miss,
}

impl std::fmt::Display for EngineCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Hit => "hit",
            Self::Miss => "miss",
        })
    }
}

/// Where TensorRT engines of one model are cached: a folder per GPU model and TensorRT version (an
/// engine only runs where it was built), files prefixed by the model's sha256.
#[derive(Debug, Clone, PartialEq)]
pub struct TrtCache {
    pub dir: PathBuf,
    pub prefix: String,
}

impl TrtCache {
    pub fn for_model(cfg: &EngineConfig, sha: &str) -> TrtCache {
        let base = cfg.trt_cache.clone().unwrap_or_else(|| cache_base().join("trt"));
        let dir = base.join(sanitize(&gpu_model())).join(format!("trt-{}", tensorrt_version()));
        TrtCache { dir, prefix: format!("anomalyd_{}", &sha[..sha.len().min(16)]) }
    }

    /// Whether an engine for this model is already in the folder.
    pub fn is_warm(&self) -> bool {
        std::fs::read_dir(&self.dir).is_ok_and(|d| {
            d.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.starts_with(&self.prefix) && n.ends_with(".engine")
            })
        })
    }
}

/// The cache base: systemd's `$CACHE_DIRECTORY`, `$XDG_CACHE_HOME/anomalyd`, `~/.cache/anomalyd`,
/// else the temporary folder.
pub fn cache_base() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("CACHE_DIRECTORY")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("anomalyd")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/anomalyd")))
        .unwrap_or_else(|| std::env::temp_dir().join("anomalyd"))
}

/// The GPU's model name from the NVIDIA driver (x86) or the device tree (Jetson); `gpu` if unknown.
pub fn gpu_model() -> String {
    if let Ok(dirs) = std::fs::read_dir("/proc/driver/nvidia/gpus") {
        for d in dirs.flatten() {
            if let Ok(info) = std::fs::read_to_string(d.path().join("information"))
                && let Some(model) = info.lines().find_map(|l| l.strip_prefix("Model:"))
            {
                return model.trim().to_string();
            }
        }
    }
    std::fs::read_to_string("/proc/device-tree/model")
        .map(|m| m.trim_matches(char::from(0)).trim().to_string())
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "gpu".into())
}

/// TensorRT's version from `libnvinfer` (`getInferLibVersion`), e.g. `10.3.0`; `unknown` if absent.
pub fn tensorrt_version() -> String {
    for name in ["libnvinfer.so", "libnvinfer.so.10", "libnvinfer.so.8"] {
        // SAFETY: loading TensorRT runs its initialisers only; the symbol is a plain C function.
        let Ok(lib) = (unsafe { libloading::Library::new(name) }) else { continue };
        let Ok(f) = (unsafe { lib.get::<unsafe extern "C" fn() -> i32>(b"getInferLibVersion\0") }) else { continue };
        let v = unsafe { f() };
        // 8.x encodes major*1000 + minor*100 + patch; 10.x major*10000 + minor*100 + patch.
        let (major, rest) = if v >= 10000 { (v / 10000, v % 10000) } else { (v / 1000, v % 1000) };
        return format!("{major}.{}.{}", rest / 100, rest % 100);
    }
    "unknown".into()
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("model", &self.manifest.name).field("provider", &self.provider).finish()
    }
}

impl Encoder {
    /// Loads ONNX Runtime and the encoder, trying each configured execution provider in turn.
    pub fn load(cfg: &EngineConfig) -> Result<Self, EngineError> {
        init_runtime(cfg.onnxruntime.as_deref())?;
        let (bytes, manifest) = read_model(cfg.model.as_deref())?;
        let model_sha256 = hex(&Sha256::digest(&bytes));
        if !manifest.sha256.eq_ignore_ascii_case(&model_sha256) {
            return Err(EngineError::Manifest {
                path: cfg.model.clone().unwrap_or_else(|| "built-in".into()),
                reason: format!("model sha256 {model_sha256} differs from manifest {}", manifest.sha256),
            });
        }
        let mut failures = Vec::new();
        let providers = if cfg.providers.is_empty() { vec![Provider::Cpu] } else { cfg.providers.clone() };
        for provider in providers {
            match build_session(&bytes, provider, cfg, &model_sha256, &manifest.input.name) {
                Ok(session) => {
                    let mut enc = Self {
                        session,
                        manifest,
                        provider,
                        model_sha256,
                        model: bytes,
                        engine_cache: EngineCache::None,
                        bound: None,
                    };
                    if provider == Provider::Tensorrt {
                        enc.engine_cache = enc.build_trt_engine(cfg)?;
                    }
                    tracing::info!(
                        provider = %provider,
                        model = %enc.manifest.name,
                        engine_cache = %enc.engine_cache,
                        "encoder runs on {provider}"
                    );
                    return Ok(enc);
                }
                Err(reason) => {
                    tracing::debug!(provider = %provider, %reason, "execution provider unavailable, trying the next");
                    failures.push(format!("{provider}: {reason}"));
                }
            }
        }
        Err(EngineError::NoProvider(failures.join("; ")))
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Whether the TensorRT engine came from its cache (`none` for the other providers).
    pub fn engine_cache(&self) -> EngineCache {
        self.engine_cache
    }

    /// TensorRT builds its engine at the first inference: do it now, at the default input, with a
    /// progress line every 20 s, so that the first frame is not minutes late.
    fn build_trt_engine(&mut self, cfg: &EngineConfig) -> Result<EngineCache, EngineError> {
        let key = TrtCache::for_model(cfg, &self.model_sha256);
        let warm = key.is_warm();
        if !warm {
            tracing::info!(
                cache = %key.dir.display(),
                "building the TensorRT engine for this GPU, TensorRT version and model (first start; this can \
                 take minutes, later starts load it from the cache)"
            );
        }
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = (!warm).then(|| {
            let done = done.clone();
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                let mut next = 20;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                    if t.elapsed().as_secs() >= next {
                        tracing::info!("still building the TensorRT engine: {next} s");
                        next += 20;
                    }
                }
            })
        });
        let t = std::time::Instant::now();
        let result = self.run(vec![0.0; 3 * 224 * 288], 224, 288, &[0]);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = ticker {
            let _ = h.join();
        }
        result?;
        if !warm {
            tracing::info!("TensorRT engine built in {:.1} s and cached", t.elapsed().as_secs_f64());
        }
        Ok(if warm { EngineCache::Hit } else { EngineCache::Miss })
    }

    /// The ONNX file itself (the GPU path builds its own kernels' plan from it).
    pub fn model_bytes(&self) -> &[u8] {
        &self.model
    }

    /// sha256 of the ONNX file, recorded in enrolments so that a mismatched model is refused.
    pub fn model_sha256(&self) -> &str {
        &self.model_sha256
    }

    /// Runs one normalised NCHW image (batch 1) and returns the requested outputs, in that order.
    pub fn run(
        &mut self,
        chw: Vec<f32>,
        height: usize,
        width: usize,
        outputs: &[usize],
    ) -> Result<Vec<FeatureMap>, EngineError> {
        let input =
            Tensor::from_array(([1usize, 3, height, width], chw)).map_err(|e| EngineError::Inference(e.to_string()))?;
        let name = self.manifest.input.name.clone();
        let result = self
            .session
            .run(ort::inputs![name.as_str() => input])
            .map_err(|e| EngineError::Inference(e.to_string()))?;
        let mut maps = Vec::with_capacity(outputs.len());
        for &i in outputs {
            let spec = self
                .manifest
                .outputs
                .get(i)
                .ok_or_else(|| EngineError::Inference(format!("model has no output #{i}")))?;
            let value = result
                .get(spec.name.as_str())
                .ok_or_else(|| EngineError::Inference(format!("model returned no `{}`", spec.name)))?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| EngineError::Inference(e.to_string()))?;
            if shape.len() != 4 || shape[0] != 1 || shape[1] as usize != spec.channels {
                return Err(EngineError::Inference(format!("`{}` has shape {shape:?}", spec.name)));
            }
            maps.push(FeatureMap {
                c: shape[1] as usize,
                h: shape[2] as usize,
                w: shape[3] as usize,
                data: data.to_vec(),
            });
        }
        Ok(maps)
    }
}

impl Encoder {
    /// Whether the encoder runs on a GPU provider (TensorRT or CUDA) of ONNX Runtime.
    pub fn on_gpu_provider(&self) -> bool {
        matches!(self.provider, Provider::Tensorrt | Provider::Cuda)
    }

    /// The input tensor of a bound run, shaped `[n, 3, h, w]`, in `memory`: its data pointer, which the
    /// caller fills (on the host, or with device kernels) before [`Encoder::run_bound`]. The tensor is
    /// kept and reused while the shape stays the same.
    pub fn bound_input(&mut self, memory: Memory, shape: [usize; 4]) -> Result<u64, EngineError> {
        let fail = |e: ort::Error| EngineError::Inference(format!("IO binding on {memory:?}: {e}"));
        // A new shape needs a new binding: outputs bound to a device keep their first allocation,
        // and ONNX Runtime refuses a run whose outputs would have another shape.
        if self.bound.as_ref().is_none_or(|b| b.memory != memory || b.input.0 != shape) {
            self.bound = None;
            let mut io = self.session.create_binding().map_err(fail)?;
            let info = memory.info().map_err(fail)?;
            for o in &self.manifest.outputs {
                io.bind_output_to_device(o.name.as_str(), &info).map_err(fail)?;
            }
            let tensor = match memory {
                Memory::Host => Tensor::<f32>::new(self.session.allocator(), shape),
                Memory::Cuda(_) => Tensor::<f32>::new(&Allocator::new(&self.session, info).map_err(fail)?, shape),
            }
            .map_err(fail)?;
            self.bound = Some(Bound { memory, io, input: (shape, tensor) });
        }
        let b = self.bound.as_mut().expect("made above");
        let (_, tensor) = &mut b.input;
        Ok(tensor.data_ptr_mut() as u64)
    }

    /// Runs the encoder on the input of [`Encoder::bound_input`]; returns every manifest output (in
    /// manifest order) where ONNX Runtime left it, in the binding's memory. The pointers stay valid
    /// until the next bound run or until the encoder is dropped. Device work that fills the input must
    /// have finished; ONNX Runtime has finished its own when this returns.
    pub fn run_bound(&mut self) -> Result<Vec<BoundOutput>, EngineError> {
        let Some(b) = self.bound.as_mut() else {
            return Err(EngineError::Inference("run_bound before bound_input".into()));
        };
        let memory = b.memory;
        let fail = |e: ort::Error| EngineError::Inference(format!("IO binding on {memory:?}: {e}"));
        let (shape, input) = &b.input;
        let batch = shape[0];
        b.io.bind_input(self.manifest.input.name.as_str(), input).map_err(fail)?;
        let outputs = self.session.run_binding(&b.io).map_err(fail)?;
        let mut found = Vec::with_capacity(self.manifest.outputs.len());
        for spec in &self.manifest.outputs {
            let value = outputs
                .get(spec.name.as_str())
                .ok_or_else(|| EngineError::Inference(format!("model returned no `{}`", spec.name)))?;
            let tensor = value
                .view()
                .downcast::<ort::value::DynTensorValueType>()
                .map_err(|e| EngineError::Inference(format!("`{}`: {e}", spec.name)))?;
            let dims: Vec<usize> = tensor.shape().iter().map(|&d| d.max(0) as usize).collect();
            if dims.len() != 4 || dims[0] != batch || dims[1] != spec.channels {
                return Err(EngineError::Inference(format!("`{}` has shape {dims:?}", spec.name)));
            }
            found.push(BoundOutput { ptr: tensor.data_ptr() as u64, shape: [dims[0], dims[1], dims[2], dims[3]] });
        }
        Ok(found)
    }
}

fn read_model(path: Option<&Path>) -> Result<(Vec<u8>, Manifest), EngineError> {
    let Some(path) = path else {
        let manifest = serde_json::from_str(DEFAULT_MANIFEST)
            .map_err(|e| EngineError::Manifest { path: "built-in".into(), reason: e.to_string() })?;
        return Ok((DEFAULT_MODEL.to_vec(), manifest));
    };
    let bytes = std::fs::read(path).map_err(|cause| EngineError::ModelRead { path: path.into(), cause })?;
    let manifest_path = path.with_extension("json");
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| EngineError::Manifest {
        path: manifest_path.clone(),
        reason: format!("{e}; every model needs its manifest beside it (see models/)"),
    })?;
    let manifest = serde_json::from_str(&text)
        .map_err(|e| EngineError::Manifest { path: manifest_path, reason: e.to_string() })?;
    Ok((bytes, manifest))
}

fn build_session(
    model: &[u8],
    provider: Provider,
    cfg: &EngineConfig,
    sha: &str,
    input: &str,
) -> Result<Session, String> {
    // The GPU providers run on the GPU that `engine.device` names (GPU 0 for `auto`), the one the
    // GPU path's kernels use, so that bound outputs can feed them.
    let gpu = match cfg.device {
        DeviceChoice::Cuda(n) => n as i32,
        _ => 0,
    };
    let dispatch = match provider {
        Provider::Cpu => ep::CPU::default().build(),
        Provider::Cuda => {
            if !ep::CUDA::is_available().unwrap_or(false) {
                return Err("this ONNX Runtime build has no CUDA provider (install onnxruntime-gpu)".into());
            }
            // TF32 off: the CUDA provider's features then match the CPU reference to fp32 precision.
            ep::CUDA::default().with_device_id(gpu).with_tf32(false).build()
        }
        Provider::Tensorrt => {
            if !ep::TensorRT::is_available().unwrap_or(false) {
                return Err(
                    "this ONNX Runtime build has no TensorRT provider (onnxruntime-gpu with TensorRT, or JetPack's)"
                        .into(),
                );
            }
            let key = TrtCache::for_model(cfg, sha);
            let _ = std::fs::create_dir_all(&key.dir);
            // One optimisation profile covers every input anomalyd makes (batch 1-8, 64-2048 px, the
            // default 288 x 224 as the optimum), so no input size triggers a rebuild.
            ep::TensorRT::default()
                .with_device_id(gpu)
                .with_fp16(true)
                .with_engine_cache(true)
                .with_engine_cache_path(key.dir.display())
                .with_engine_cache_prefix(&key.prefix)
                .with_timing_cache(true)
                .with_timing_cache_path(key.dir.display())
                .with_profile_min_shapes(format!("{input}:1x3x64x64"))
                .with_profile_opt_shapes(format!("{input}:1x3x224x288"))
                .with_profile_max_shapes(format!("{input}:8x3x2048x2048"))
                .build()
        }
    };
    let env = match RUNTIME.get() {
        Some(Ok((_, env))) => env,
        _ => return Err("ONNX Runtime is not loaded".into()),
    };
    let mut builder = Session::builder(env).map_err(|e| e.to_string())?;
    builder = builder
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| e.to_string())?
        .with_execution_providers([dispatch.error_on_failure()])
        .map_err(|e| e.to_string())?;
    if cfg.threads > 0 {
        builder = builder.with_intra_threads(cfg.threads).map_err(|e| e.to_string())?;
    }
    // Off unless asked for: threads spinning after the encoder hold the cores the decoder needs next.
    builder = builder.with_intra_op_spinning(cfg.spin.unwrap_or(false)).map_err(|e| e.to_string())?;
    builder.commit_from_memory(model).map_err(|e| e.to_string())
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Largest absolute difference between two lists of feature maps, relative to the largest magnitude
/// in `reference` (infinite when the shapes differ).
pub fn relative_error(reference: &[FeatureMap], other: &[FeatureMap]) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_parse_and_reject_unknown() {
        assert_eq!("TensorRT".parse::<Provider>().unwrap(), Provider::Tensorrt);
        assert_eq!(" cpu ".parse::<Provider>().unwrap(), Provider::Cpu);
        let err = "npu".parse::<Provider>().unwrap_err().to_string();
        assert!(err.contains("npu") && err.contains("tensorrt, cuda or cpu"), "{err}");
    }

    #[test]
    fn built_in_manifest_matches_built_in_model() {
        let (bytes, manifest) = read_model(None).unwrap();
        assert_eq!(hex(&Sha256::digest(&bytes)), manifest.sha256);
        assert_eq!(manifest.outputs.iter().map(|o| o.stride).collect::<Vec<_>>(), vec![4, 8, 16]);
    }

    #[test]
    fn trt_cache_is_keyed_by_gpu_tensorrt_version_and_model() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = EngineConfig { trt_cache: Some(dir.path().to_path_buf()), ..EngineConfig::default() };
        let sha = "0123456789abcdef0123456789abcdef";
        let key = TrtCache::for_model(&cfg, sha);
        let rel = key.dir.strip_prefix(dir.path()).unwrap();
        assert_eq!(rel.components().count(), 2, "{rel:?}");
        assert!(rel.to_string_lossy().contains(&format!("trt-{}", tensorrt_version())), "{rel:?}");
        assert_eq!(key.prefix, "anomalyd_0123456789abcdef");
        assert!(!key.is_warm());
        std::fs::create_dir_all(&key.dir).unwrap();
        std::fs::write(key.dir.join(format!("{}_sm90.engine", key.prefix)), b"x").unwrap();
        assert!(key.is_warm());
        assert_ne!(TrtCache::for_model(&cfg, &"f".repeat(32)).prefix, key.prefix);
    }

    #[test]
    fn configured_runtime_path_wins() {
        let p = find_onnxruntime(Some(Path::new("/opt/ort/libonnxruntime.so"))).unwrap();
        assert_eq!(p, Path::new("/opt/ort/libonnxruntime.so"));
    }

    #[test]
    fn missing_venv_library_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(venv_library(&dir.path().join(".venv")).is_none());
    }
}
