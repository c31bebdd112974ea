//! NVRTC compiles the kernel sources for a device's architecture; the PTX is cached on disk,
//! keyed by everything that changes it (NVRTC's version, the driver's, the architecture, the
//! source), so a daemon compiles once per machine and source revision.

use crate::device::{driver_version, nvrtc_present, nvrtc_version};
use crate::sources::KernelSource;
use crate::{CudaError, Result};
use std::path::{Path, PathBuf};

/// Compiles `source` for `arch` (e.g. `compute_90`) with NVRTC; the PTX text.
pub fn compile_ptx(source: &KernelSource, arch: &str) -> Result<String> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(source.file.into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source.text, opts)
        .map(|ptx| ptx.to_src())
        .map_err(|e| CudaError::Compile {
            file: source.file,
            log: match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => format!("{other:?}"),
            },
        })
}

/// What a cached PTX depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// NVRTC's version.
    pub nvrtc: (i32, i32),
    /// The driver's version (the PTX is JIT-compiled by it), if any.
    pub driver: Option<i32>,
    /// The architecture compiled for.
    pub arch: String,
}

impl CacheKey {
    /// The cache file name of `source` under this key: a SHA-256 over the key and the source.
    pub fn file_name(&self, source: &KernelSource) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"agentd-ptx-v1");
        h.update(self.nvrtc.0.to_le_bytes());
        h.update(self.nvrtc.1.to_le_bytes());
        h.update(self.driver.unwrap_or(0).to_le_bytes());
        for part in [self.arch.as_str(), source.file, source.text] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let hex: String = h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}-{hex}.ptx", source.file.trim_end_matches(".cu"))
    }
}

/// PTX cached in a directory (the data directory's `ptx/`).
#[derive(Debug, Clone)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    /// A cache in `dir` (created on first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key for `arch` on this machine (NVRTC's and the driver's versions).
    pub fn key(arch: &str) -> Result<CacheKey> {
        Ok(CacheKey {
            nvrtc: nvrtc_version()?,
            driver: driver_version().ok(),
            arch: arch.into(),
        })
    }

    /// `source`'s PTX under `key`: read from the cache, else compiled and stored (written to a
    /// temporary file and renamed, so a crash never leaves half a file). Returns the PTX and
    /// whether it came from the cache. A cache that cannot be written is logged, not an error.
    pub fn load_or_compile(&self, source: &KernelSource, key: &CacheKey) -> Result<(String, bool)> {
        let path = self.dir.join(key.file_name(source));
        match std::fs::read_to_string(&path) {
            Ok(ptx) if ptx.contains(".entry") => return Ok((ptx, true)),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "a cached PTX file is damaged; compiling again")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CudaError::Cache { path, source }),
        }
        let ptx = compile_ptx(source, &key.arch)?;
        if let Err(e) = self.store(&path, &ptx) {
            tracing::warn!(error = %e, "the PTX cache could not be written; compiling again next time");
        }
        Ok((ptx, false))
    }

    fn store(&self, path: &Path, ptx: &str) -> Result<()> {
        let io = |source| CudaError::Cache {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, ptx).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
#[path = "compile_tests.rs"]
mod tests;
