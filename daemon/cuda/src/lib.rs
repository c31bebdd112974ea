//! agentd's CUDA building blocks, for the CUDA executor (issue 19; the executor itself is not
//! built yet).
//!
//! - [`sources`]: the CUDA C kernels, kept in `kernels/cuda/*.cu` and built into the binary.
//! - [`compile`]: NVRTC compiles them at run time for the device's architecture; the PTX is
//!   cached in the data directory under a key of NVRTC's version, the driver's version, the
//!   architecture and the sources' hash.
//! - [`device`]: what the machine has: the driver, NVRTC, the devices.
//!
//! cudarc loads `libcuda` and `libnvrtc` when first used (`dynamic-loading`), so building
//! needs no CUDA toolkit and a machine without a GPU runs the same binary. cudarc panics when
//! a library is missing, so every entry point here checks for it first and returns
//! [`CudaError::NoDriver`] / [`CudaError::NoNvrtc`] instead.

pub mod compile;
pub mod device;
pub mod sources;

pub use compile::{compile_ptx, CacheKey, PtxCache};
pub use device::{probe, CudaProbe, DeviceInfo};

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No NVIDIA driver library (`libcuda.so`) could be loaded.
    #[error("no NVIDIA driver: libcuda.so could not be loaded (is the driver installed?)")]
    NoDriver,
    /// No NVRTC library (`libnvrtc.so`) could be loaded.
    #[error("no NVRTC: libnvrtc.so could not be loaded (install the CUDA toolkit's NVRTC, or set LD_LIBRARY_PATH to its lib directory)")]
    NoNvrtc,
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(String),
    /// NVRTC refused a kernel source.
    #[error("NVRTC could not compile {file}: {log}")]
    Compile {
        /// The source file.
        file: &'static str,
        /// NVRTC's log (or error).
        log: String,
    },
    /// The PTX cache could not be read or written.
    #[error("the PTX cache at {path}: {source}")]
    Cache {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, CudaError>;
