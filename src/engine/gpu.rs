//! The GPU path (feature `cuda`): anomalyd's own CUDA kernels (`kernels/*.cu`), compiled at start-up
//! by NVRTC for the GPU's architecture and cached as PTX, run through cudarc. Every CUDA library is
//! loaded at run time, so this builds where no CUDA is installed; [`crate::engine::device`] decides whether
//! it is used. [`crate::detect::gpu::Pipeline`] is the encoder and decoder on the device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg, result as dres, sys};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error(
        "NVRTC (libnvrtc.so) could not be loaded: install the CUDA toolkit's NVRTC (or the \
         nvidia-cuda-nvrtc wheel) and put its lib folder on LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    #[error("compiling kernels/*.cu for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("GPU encoder: {0}")]
    Plan(#[from] crate::engine::netplan::PlanError),
    #[error("GPU path: {0}")]
    Unsupported(String),
}

impl From<dres::DriverError> for GpuError {
    fn from(e: dres::DriverError) -> Self {
        GpuError::Driver(e.to_string())
    }
}

const COMMON: &str = include_str!("../../kernels/common.cuh");
const SOURCES: [(&str, &str); 4] = [
    ("preprocess.cu", include_str!("../../kernels/preprocess.cu")),
    ("encoder.cu", include_str!("../../kernels/encoder.cu")),
    ("knn.cu", include_str!("../../kernels/knn.cu")),
    ("map.cu", include_str!("../../kernels/map.cu")),
];

/// Every kernel the module must export.
const KERNELS: [&str; 19] = [
    "resize_v",
    "resize_h",
    "to_nchw",
    "conv_direct",
    "gemm_tiled",
    "box_pool",
    "normalize_positions",
    "gather_part",
    "normalize_segments",
    "column_sq",
    "knn_partial",
    "knn_merge",
    "knn_finish",
    "mask_background",
    "mask_cells",
    "grid_resize",
    "divide",
    "blur",
    "top_mean",
];

/// The kernel sources as one NVRTC program, with `#line` directives naming each file in errors.
pub fn program_source() -> String {
    let mut s = format!("#line 1 \"common.cuh\"\n{COMMON}\n");
    for (name, text) in SOURCES {
        s.push_str(&format!("#line 1 \"{name}\"\n{text}\n"));
    }
    s
}

/// Compiles the kernels to PTX for compute capability `major.minor` with NVRTC.
pub fn compile(arch: (i32, i32)) -> Result<String, GpuError> {
    // SAFETY: only tries to dlopen the library by its candidate names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError::NoNvrtc);
    }
    let target = format!("compute_{}{}", arch.0, arch.1);
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={target}")],
        name: Some("anomalyd.cu".into()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(program_source(), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
            Err(GpuError::Compile { arch: target, log: log.to_string_lossy().trim().to_string() })
        }
        Err(e) => Err(GpuError::Compile { arch: target, log: format!("{e:?}") }),
    }
}

/// The PTX for `arch`, from the cache folder when this source was compiled there before.
/// Returns the PTX and whether it was a cache hit.
fn cached_ptx(arch: (i32, i32), cache: Option<&Path>) -> Result<(String, bool), GpuError> {
    let key: String = Sha256::digest(program_source().as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let path = cache.map(|c| c.join(format!("kernels-{key}-sm{}{}.ptx", arch.0, arch.1)));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok((text, true));
    }
    let ptx = compile(arch)?;
    if let Some(p) = &path {
        let tmp = p.with_extension("tmp");
        let written = std::fs::create_dir_all(p.parent().unwrap_or(Path::new(".")))
            .and_then(|_| std::fs::write(&tmp, &ptx))
            .and_then(|_| std::fs::rename(&tmp, p));
        if let Err(e) = written {
            tracing::warn!(path = %p.display(), "could not cache the compiled kernels: {e}");
        }
    }
    Ok((ptx, false))
}

/// The default folder for compiled kernels: `kernels` in [`crate::engine::encoder::cache_base`].
pub fn default_cache_dir() -> PathBuf {
    crate::engine::encoder::cache_base().join("kernels")
}

/// A kernel argument: a device pointer, an int, a 64-bit int or a float.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

/// One GPU: its context, the stream this pipeline runs on, the kernels and cuBLAS when present.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    blas: Option<cudarc::cublas::CudaBlas>,
    pub name: String,
    pub arch: (i32, i32),
    /// Whether the kernels came from the PTX cache.
    pub ptx_cached: bool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("name", &self.name).field("arch", &self.arch).finish()
    }
}

impl Gpu {
    /// Opens GPU `ordinal`. The caller has checked that the driver library loads.
    pub fn open(ordinal: usize, cache: Option<&Path>) -> Result<Gpu, GpuError> {
        let count = CudaContext::device_count()?;
        if ordinal as i32 >= count {
            return Err(GpuError::Unsupported(format!("cuda:{ordinal} requested but this machine has {count} GPU(s)")));
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream per pipeline, synchronised explicitly: no per-buffer event bookkeeping.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let name = ctx.name()?;
        let arch = ctx.compute_capability()?;
        let (ptx, ptx_cached) = cached_ptx(arch, cache)?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx))?;
        let mut funcs = HashMap::new();
        for k in KERNELS {
            funcs.insert(k, module.load_function(k)?);
        }
        // SAFETY: only tries to dlopen the library by its candidate names.
        let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
            match cudarc::cublas::CudaBlas::new(stream.clone()) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(
                        "cuBLAS could not start ({e}); the nearest-neighbour GEMM uses anomalyd's own kernel"
                    );
                    None
                }
            }
        } else {
            tracing::info!("cuBLAS not found; the nearest-neighbour GEMM uses anomalyd's own kernel");
            None
        };
        Ok(Gpu { ctx, stream, funcs, blas, name, arch, ptx_cached })
    }

    pub fn has_blas(&self) -> bool {
        self.blas.is_some()
    }

    /// Launches kernel `name` on this pipeline's stream.
    pub fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &[Arg]) -> Result<(), GpuError> {
        let f = self.funcs.get(name).ok_or_else(|| GpuError::Unsupported(format!("no kernel `{name}`")))?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::L(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument lists match the kernels' signatures (kernels/*.cu), and every pointer is
        // a live allocation of this context at least as large as the kernel indexes.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Launches a one-thread-per-element kernel over `n` elements.
    pub fn launch_n(&self, name: &str, n: usize, args: &[Arg]) -> Result<(), GpuError> {
        if n == 0 {
            return Ok(());
        }
        self.launch(name, (n.div_ceil(256) as u32, 1, 1), 256, args)
    }

    /// `C (m x n) = A (m x k) * B (k x n)`, all row-major device matrices, on cuBLAS when present.
    pub fn matmul(&self, a: u64, b: u64, c: u64, m: usize, n: usize, k: usize) -> Result<(), GpuError> {
        match &self.blas {
            Some(blas) => {
                // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS with the operands swapped.
                let (alpha, beta) = (1.0f32, 0.0f32);
                let op = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
                // SAFETY: the pointers are device allocations of the stated shapes on this stream.
                unsafe {
                    cudarc::cublas::result::sgemm(
                        *blas.handle(),
                        op,
                        op,
                        n as i32,
                        m as i32,
                        k as i32,
                        &alpha,
                        b as *const f32,
                        n as i32,
                        a as *const f32,
                        k as i32,
                        &beta,
                        c as *mut f32,
                        n as i32,
                    )
                }
                .map_err(|e| GpuError::Blas(e.to_string()))
            }
            None => self.gemm(a, b, c, m, n, k, 1, [0, 0, 0], None, None, (0, 0.0, 0.0)),
        }
    }

    /// anomalyd's tiled GEMM with the fused epilogue (bias per row, clip, residual); `batch` matrices
    /// with element strides `[a, b, c]`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        a: u64,
        b: u64,
        c: u64,
        m: usize,
        n: usize,
        k: usize,
        batch: usize,
        strides: [usize; 3],
        bias: Option<u64>,
        residual: Option<u64>,
        (act, lo, hi): (i32, f32, f32),
    ) -> Result<(), GpuError> {
        let grid = (n.div_ceil(64) as u32, m.div_ceil(64) as u32, batch as u32);
        self.launch(
            "gemm_tiled",
            grid,
            256,
            &[
                Arg::P(a),
                Arg::P(b),
                Arg::P(c),
                Arg::P(bias.unwrap_or(0)),
                Arg::P(residual.unwrap_or(0)),
                Arg::I(m as i32),
                Arg::I(n as i32),
                Arg::I(k as i32),
                Arg::L(strides[0] as i64),
                Arg::L(strides[1] as i64),
                Arg::L(strides[2] as i64),
                Arg::I(act),
                Arg::F(lo),
                Arg::F(hi),
            ],
        )
    }

    pub fn sync(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// A timing event recorded on the stream now.
    pub fn mark(&self) -> Result<cudarc::driver::CudaEvent, GpuError> {
        Ok(self.stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?)
    }
}

/// A grow-only device allocation (raw, so that copies into its prefix need no view bookkeeping).
pub struct DevBuf {
    ptr: u64,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DevBuf {
    pub fn empty(gpu: &Gpu) -> DevBuf {
        DevBuf { ptr: 0, bytes: 0, ctx: gpu.ctx.clone() }
    }

    /// A buffer holding `data`.
    pub fn from_slice<T: Copy>(gpu: &Gpu, data: &[T]) -> Result<DevBuf, GpuError> {
        let mut b = DevBuf::empty(gpu);
        b.upload(gpu, data)?;
        Ok(b)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Makes room for `bytes`, keeping nothing; waits for queued work before freeing.
    pub fn ensure(&mut self, gpu: &Gpu, bytes: usize) -> Result<(), GpuError> {
        if bytes <= self.bytes {
            return Ok(());
        }
        gpu.sync()?;
        self.ctx.bind_to_thread()?;
        if self.ptr != 0 {
            // SAFETY: allocated by malloc_sync below, and no queued work uses it (synchronised above).
            unsafe { dres::free_sync(self.ptr) }?;
            self.ptr = 0;
            self.bytes = 0;
        }
        let size = bytes.next_multiple_of(256);
        // SAFETY: a plain device allocation in the bound context.
        self.ptr = unsafe { dres::malloc_sync(size) }?;
        self.bytes = size;
        Ok(())
    }

    /// Copies `data` to the start of the buffer, growing it if needed.
    pub fn upload<T: Copy>(&mut self, gpu: &Gpu, data: &[T]) -> Result<(), GpuError> {
        self.ensure(gpu, std::mem::size_of_val(data).max(4))?;
        // SAFETY: the buffer holds at least `data`'s bytes (ensured above).
        unsafe { upload(gpu, self.ptr, data) }
    }

    /// Copies the buffer's first `out.len()` elements to `out` and waits for them.
    pub fn download<T: Copy>(&self, gpu: &Gpu, out: &mut [T]) -> Result<(), GpuError> {
        if std::mem::size_of_val(out) > self.bytes {
            return Err(GpuError::Unsupported("download larger than its buffer".into()));
        }
        // SAFETY: the buffer holds at least `out`'s bytes (checked above).
        unsafe { download(gpu, self.ptr, out) }
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 && self.ctx.bind_to_thread().is_ok() {
            // Work queued on the buffer must finish before it is freed.
            let _ = self.ctx.synchronize();
            // SAFETY: allocated by malloc_sync; nothing uses it any more.
            let _ = unsafe { dres::free_sync(self.ptr) };
        }
    }
}

/// Copies `data` to device memory at `dst`, on the GPU's stream.
///
/// # Safety
/// `dst` must be device memory of this context with room for `data`'s bytes.
pub unsafe fn upload<T: Copy>(gpu: &Gpu, dst: u64, data: &[T]) -> Result<(), GpuError> {
    gpu.ctx.bind_to_thread()?;
    if !data.is_empty() {
        // SAFETY: the caller's contract; pageable sources are staged before return.
        unsafe { dres::memcpy_htod_async(dst, data, gpu.stream.cu_stream()) }?;
    }
    Ok(())
}

/// Copies `out.len()` elements from device memory at `src` to `out` and waits for them.
///
/// # Safety
/// `src` must be device memory of this context holding at least `out`'s bytes.
pub unsafe fn download<T: Copy>(gpu: &Gpu, src: u64, out: &mut [T]) -> Result<(), GpuError> {
    gpu.ctx.bind_to_thread()?;
    if !out.is_empty() {
        // SAFETY: the caller's contract; synchronised before `out` is read.
        unsafe { dres::memcpy_dtoh_async(out, src, gpu.stream.cu_stream()) }?;
    }
    gpu.sync()
}

/// Device-to-device copy of `bytes`.
pub fn copy(gpu: &Gpu, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
    if bytes > 0 {
        gpu.ctx.bind_to_thread()?;
        // SAFETY: both are device allocations of at least `bytes`.
        unsafe { dres::memcpy_dtod_async(dst, src, bytes, gpu.stream.cu_stream()) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_defined_in_the_sources() {
        let src = program_source();
        for k in KERNELS {
            assert!(src.contains(&format!("void {k}(")), "kernel {k} missing from kernels/*.cu");
        }
    }

    /// NVRTC works without a GPU: when the library is present (the test command installs it),
    /// the kernels must compile for the Jetson Orin, Ampere and Hopper architectures.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to dlopen the library by its candidate names.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: NVRTC (libnvrtc.so) is not on the library path");
            return;
        }
        for arch in [(8, 7), (8, 0), (9, 0)] {
            let ptx = compile(arch).unwrap_or_else(|e| panic!("{e}"));
            for k in KERNELS {
                assert!(ptx.contains(&format!(".entry {k}(")), "{k} not in the PTX for {arch:?}");
            }
        }
    }
}
