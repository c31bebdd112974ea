//! What the machine has: the NVIDIA driver, NVRTC, the devices. Never panics: cudarc panics
//! when a library is missing, so presence is checked before any call into it.

use crate::{CudaError, Result};
use std::path::Path;

/// One CUDA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its ordinal (`cuda:N`).
    pub ordinal: usize,
    /// Its name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0).
    pub compute_capability: (i32, i32),
    /// Device memory, bytes.
    pub total_memory: usize,
}

impl DeviceInfo {
    /// The NVRTC architecture option for this device, e.g. `compute_90`.
    pub fn arch(&self) -> String {
        let (major, minor) = self.compute_capability;
        format!("compute_{major}{minor}")
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CudaProbe {
    /// The driver's CUDA version (e.g. 12080 for 12.8), if a driver loaded.
    pub driver_version: Option<i32>,
    /// NVRTC's version (major, minor), if NVRTC loaded.
    pub nvrtc_version: Option<(i32, i32)>,
    /// The devices the driver sees.
    pub devices: Vec<DeviceInfo>,
    /// Why the driver or a device could not be used, if so.
    pub error: Option<String>,
}

/// Whether the driver library loads.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library under its known names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NVRTC library loads.
pub fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the out-pointers are valid for the call.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Compile {
            file: "-",
            log: format!("nvrtcVersion failed: {r:?}"),
        });
    }
    Ok((major, minor))
}

/// The driver's CUDA version (e.g. 12080).
pub fn driver_version() -> Result<i32> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    let mut v = 0;
    // SAFETY: the library is present; the out-pointer is valid for the call.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(CudaError::Driver(format!("cuDriverGetVersion: {r:?}")));
    }
    Ok(v)
}

/// Makes NVRTC from `dir` (e.g. the `nvidia/cuda_nvrtc/lib` directory of the
/// `nvidia-cuda-nvrtc-cu12` Python wheel) the one cudarc loads: the library is opened by its
/// path and kept open, so cudarc's later open by name finds it. Returns whether a library was
/// found there.
pub fn preload_nvrtc(dir: &Path) -> bool {
    for name in ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some(&path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        };
        if let Ok(lib) = lib {
            // Kept open for the life of the process.
            std::mem::forget(lib);
            return true;
        }
    }
    false
}

/// Probes the driver, NVRTC and every device. Never fails: what is missing is `None` or
/// empty, and `error` says why.
pub fn probe() -> CudaProbe {
    let mut p = CudaProbe {
        nvrtc_version: nvrtc_version().ok(),
        ..CudaProbe::default()
    };
    match driver_version() {
        Ok(v) => p.driver_version = Some(v),
        Err(e) => {
            p.error = Some(e.to_string());
            return p;
        }
    }
    let count = match cudarc::driver::CudaContext::device_count() {
        Ok(n) => n.max(0) as usize,
        Err(e) => {
            p.error = Some(format!("CUDA driver: {e}"));
            return p;
        }
    };
    for ordinal in 0..count {
        let info = cudarc::driver::CudaContext::new(ordinal).and_then(|ctx| {
            Ok(DeviceInfo {
                ordinal,
                name: ctx.name()?,
                compute_capability: ctx.compute_capability()?,
                total_memory: ctx.total_mem()?,
            })
        });
        match info {
            Ok(d) => p.devices.push(d),
            Err(e) => p.error = Some(format!("device {ordinal}: {e}")),
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_never_panics_and_says_what_is_missing() {
        let p = probe();
        if driver_present() {
            assert!(p.driver_version.is_some(), "{p:?}");
        } else {
            assert!(p.devices.is_empty());
            assert!(p.error.as_deref().unwrap().contains("libcuda"), "{p:?}");
            assert!(matches!(driver_version(), Err(CudaError::NoDriver)));
        }
        for d in &p.devices {
            assert!(d.arch().starts_with("compute_"));
            assert!(d.total_memory > 0);
        }
    }

    #[test]
    fn preloading_from_a_directory_without_nvrtc_finds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!preload_nvrtc(dir.path()));
    }
}
