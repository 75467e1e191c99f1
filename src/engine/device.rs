//! The one place that chooses where inspection runs: `engine.device = "auto" | "cpu" | "cuda:N"`.
//!
//! `auto` probes for the CUDA driver library before touching a context (creating one without a
//! driver would abort the process) and falls back to the CPU with one log line. `cuda:N` is a
//! requirement: if that GPU cannot be used, loading fails with the reason.

use crate::config::engine::DeviceChoice;

/// Where inspection will run, once the choice met the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selected {
    Cpu,
    Cuda(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("engine.device = \"cuda:{0}\" but this build has no GPU support (build with `--features cuda`)")]
    NotBuilt(usize),
    #[error("engine.device = \"cuda:{0}\" but no CUDA driver library (libcuda.so) could be loaded")]
    NoDriver(usize),
}

/// Whether the CUDA driver library can be loaded (never creates a context).
pub fn cuda_driver_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to dlopen the library by its candidate names.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Resolves a choice: `auto` takes GPU 0 when this build has GPU support and a driver is present.
pub fn select(choice: DeviceChoice) -> Result<Selected, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(Selected::Cpu),
        DeviceChoice::Cuda(n) if !cfg!(feature = "cuda") => Err(DeviceError::NotBuilt(n)),
        DeviceChoice::Cuda(n) if !cuda_driver_present() => Err(DeviceError::NoDriver(n)),
        DeviceChoice::Cuda(n) => Ok(Selected::Cuda(n)),
        DeviceChoice::Auto if cfg!(feature = "cuda") && cuda_driver_present() => Ok(Selected::Cuda(0)),
        DeviceChoice::Auto => {
            let why = if cfg!(feature = "cuda") { "no CUDA driver found" } else { "built without the cuda feature" };
            tracing::info!("device auto: {why}; inspecting on the CPU");
            Ok(Selected::Cpu)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        for (s, c) in [("auto", DeviceChoice::Auto), ("CPU", DeviceChoice::Cpu), ("cuda:1", DeviceChoice::Cuda(1))] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap(), c);
        }
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        let e = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(e.contains("auto, cpu or cuda:N"), "{e}");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn cpu_is_always_available_and_auto_never_fails() {
        assert_eq!(select(DeviceChoice::Cpu).unwrap(), Selected::Cpu);
        assert!(select(DeviceChoice::Auto).is_ok());
        if !cuda_driver_present() {
            assert_eq!(select(DeviceChoice::Auto).unwrap(), Selected::Cpu);
            assert!(select(DeviceChoice::Cuda(0)).unwrap_err().to_string().contains("cuda:0"));
        }
    }
}
