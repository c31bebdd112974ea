//! Opening the store's directory, so that nothing found there stops the daemon except another
//! daemon using it.
//!
//! The directory holds `lock` (an empty file, locked while a store is open), `meta/` (sled),
//! `blobs/` (`{id:016x}.kv` blob files, `{id:016x}.tmp` while one is written) and, after damage,
//! `meta.damaged-<UTC time>/` (a database moved aside for inspection; nothing reads it again).
//!
//! [`Store::open`], in order:
//! 1. Take the lock. Held by another process: [`StoreError::Locked`], the one refusal, since two
//!    daemons writing one directory would damage it.
//! 2. Open sled and read both of its trees through. Any failure but a lock or the file system
//!    refusing (sled's corruption errors, a panic inside sled, a missing or empty db file under
//!    an existing `meta/`) means the database is damaged: it is renamed aside and a new one is
//!    created. Its prefix registrations are lost (they live only in sled); its records are not.
//! 3. Check each record in sled against its blob. A record whose metadata is unusable leaves its
//!    blob to step 4; one whose blob or fingerprint is wrong is dropped with its blob.
//! 4. Scan `blobs/`: a blob sled does not list (an orphan after a crash, or every blob after a
//!    rebuild) is adopted from its descriptor when that checks out for the running daemon, and
//!    deleted otherwise; leftover `.tmp` files are deleted; anything else (`lost+found`, stray
//!    files, other names) is left alone with a warning.

use super::{Store, StoreConfig, StoreError, StoreStats};
use crate::format::{BlobHeader, Damage, Fingerprint, PrefixRecord, RecordMeta, BLOB_HEADER_LEN};
use crate::index::DiskIndex;
use crate::writer::{self, blob_path, Job};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// The lock file's name in the cache directory.
const LOCK: &str = "lock";
/// sled's directory.
const META: &str = "meta";
/// The blob files' directory.
const BLOBS: &str = "blobs";
/// What a damaged entry's new name adds, before a UTC time.
const DAMAGED: &str = ".damaged-";
/// Descriptors are a few bytes per token; a longer one is damage, not a record.
const MAX_DESCRIPTOR: u32 = 64 << 20;

/// Why sled could not open a database (see [`StoreError::Open`]).
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// sled returned an error.
    #[error(transparent)]
    Sled(#[from] sled::Error),
    /// sled panicked while opening or reading it.
    #[error("sled panicked: {0}")]
    Panic(String),
    /// The directory's files are not sled's.
    #[error("{0}")]
    Layout(&'static str),
}

/// What stands in the way of opening `meta/`.
pub(crate) enum MetaFailure {
    /// Another process holds sled's lock.
    Locked(String),
    /// The file system refuses (permissions, space): moving the database aside would not help.
    Refused(MetaError),
    /// The database is damaged.
    Damaged(MetaError),
}

impl Store {
    /// Opens (creating) the store in `cfg.dir` for a daemon whose KV depends on `fp`, as the
    /// module docs describe: recovers from a damaged database, drops records written for
    /// anything else or whose blob is damaged, adopts orphan blobs, and trims to the budget.
    /// Returns the persisted prefixes. Fails only when another process holds the directory, or
    /// the file system refuses the directory or a new database.
    pub fn open(
        cfg: &StoreConfig,
        fp: Fingerprint,
    ) -> Result<(Self, Vec<PrefixRecord>), StoreError> {
        let dir_err = |source| StoreError::Dir {
            dir: cfg.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&cfg.dir).map_err(dir_err)?;
        let lock = lock_dir(&cfg.dir)?;
        let blobs = cfg.dir.join(BLOBS);
        ensure_dir(&blobs).map_err(dir_err)?;
        warn_unexpected(&cfg.dir);
        let db = open_meta(&cfg.dir)?;
        let open_err = |source: sled::Error| StoreError::Open {
            dir: cfg.dir.clone(),
            source: source.into(),
        };
        let records = db.open_tree("records").map_err(open_err)?;
        let prefixes = db.open_tree("prefixes").map_err(open_err)?;
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let writer = {
            let (dir, db) = (blobs.clone(), db.clone());
            std::thread::Builder::new()
                .name("agentd-store".into())
                .spawn(move || writer::run(dir, db, jobs_rx, done_tx))
                .map_err(dir_err)?
        };
        let page_size = fp.page_size as usize;
        let mut store = Store {
            index: DiskIndex::new(page_size),
            page_size,
            blobs,
            db,
            metas: HashMap::new(),
            pending: HashMap::new(),
            next_id: 0,
            stats: StoreStats {
                budget: cfg.budget,
                ..Default::default()
            },
            jobs: Some(jobs_tx),
            done: done_rx,
            writer: Some(writer),
            fp,
            _lock: lock,
        };
        let kept = store.restore_prefixes(&prefixes);
        let removing = store.check_records(&records);
        store.scan_blobs(&kept, &removing).map_err(dir_err)?;
        store.trim(0);
        if store.stats.adopted > 0 {
            tracing::warn!(
                records = store.stats.adopted,
                "disk cache records restored from their blobs' descriptors"
            );
        }
        tracing::info!(
            records = store.metas.len(),
            bytes = store.stats.bytes,
            prefixes = kept.len(),
            "disk cache opened"
        );
        Ok((store, kept))
    }

    /// The persisted prefix registrations written for this daemon; the others are removed.
    fn restore_prefixes(&self, prefixes: &sled::Tree) -> Vec<PrefixRecord> {
        let mut kept = Vec::new();
        for (key, value) in prefixes.iter().flatten() {
            match serde_json::from_slice::<PrefixRecord>(&value) {
                Ok(p) if p.fingerprint == self.fp => kept.push(p),
                _ => {
                    tracing::warn!(
                        "dropping a persisted prefix written for another model or tokenizer"
                    );
                    let _ = prefixes.remove(key);
                }
            }
        }
        kept
    }

    /// Admits the records in sled whose blob checks out. Returns the ids being dropped (their
    /// blobs are the writer's to delete); a record whose metadata alone is at fault is removed
    /// from sled and its blob left to [`Store::scan_blobs`].
    fn check_records(&mut self, records: &sled::Tree) -> HashSet<u64> {
        let mut removing = HashSet::new();
        for (key, value) in records.iter().flatten() {
            let Ok(id) = <[u8; 8]>::try_from(key.as_ref()).map(u64::from_be_bytes) else {
                tracing::warn!(key = ?key, "removing a disk cache metadata entry with a bad key");
                let _ = records.remove(key);
                continue;
            };
            let checked = serde_json::from_slice::<RecordMeta>(&value)
                .map_err(StoreError::from)
                .and_then(|meta| self.check_on_open(id, &meta).map(|len| (meta, len)));
            match checked {
                Ok((meta, len)) => self.admit(id, meta, len),
                Err(why @ (StoreError::BadMeta(_) | StoreError::Damaged(Damage::MetaChecksum))) => {
                    tracing::warn!(
                        record = id,
                        reason = %why,
                        "a disk cache record's metadata is unusable; trying its blob's descriptor"
                    );
                    let _ = records.remove(key);
                }
                Err(why) => {
                    self.drop_record(id, &why);
                    removing.insert(id);
                }
            }
        }
        removing
    }

    /// What is wrong with `meta` for this daemon, before its blob is looked at.
    fn check_meta(&self, meta: &RecordMeta) -> Result<(), StoreError> {
        if let Some(field) = meta.fingerprint.mismatch(&self.fp) {
            return Err(Damage::Fingerprint(field).into());
        }
        if meta.meta_crc != meta.compute_crc() {
            return Err(Damage::MetaChecksum.into());
        }
        if meta.tokens.is_empty() || meta.page_crc.len() != meta.pages(self.page_size) {
            return Err(Damage::PageCount.into());
        }
        Ok(())
    }

    /// Checks record `id` (from sled) against its blob's header and length; returns the
    /// blob's length.
    fn check_on_open(&self, id: u64, meta: &RecordMeta) -> Result<u64, StoreError> {
        self.check_meta(meta)?;
        let (_, header, len) = self.open_blob(id)?;
        if header.payload != meta.payload_len() {
            return Err(Damage::HeaderMismatch.into());
        }
        Ok(len)
    }

    /// Opens record `id`'s blob and reads its header, checking it and the file's length.
    fn open_blob(&self, id: u64) -> Result<(std::fs::File, BlobHeader, u64), StoreError> {
        let io = |source| StoreError::Io {
            what: "opening a blob",
            source,
        };
        let mut f = std::fs::File::open(blob_path(&self.blobs, id)).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        if len < BLOB_HEADER_LEN as u64 {
            return Err(Damage::ShortHeader.into());
        }
        let mut h = [0u8; BLOB_HEADER_LEN];
        f.read_exact(&mut h).map_err(io)?;
        let header = BlobHeader::decode(&h)?;
        if header.id != id {
            return Err(Damage::HeaderMismatch.into());
        }
        if len != header.file_len() {
            return Err(Damage::BlobLength {
                len,
                expected: header.file_len(),
            }
            .into());
        }
        Ok((f, header, len))
    }

    /// Reads and checks record `id`'s descriptor from its blob; returns it and the blob's
    /// length.
    fn read_descriptor(&self, id: u64) -> Result<(RecordMeta, u64), StoreError> {
        let (mut f, header, len) = self.open_blob(id)?;
        if header.desc_len > MAX_DESCRIPTOR {
            return Err(Damage::DescriptorChecksum.into());
        }
        let mut desc = vec![0u8; header.desc_len as usize];
        f.seek(SeekFrom::Start(header.desc_offset()))
            .and_then(|_| f.read_exact(&mut desc))
            .map_err(|source| StoreError::Io {
                what: "reading a blob",
                source,
            })?;
        if crc32fast::hash(&desc) != header.desc_crc {
            return Err(Damage::DescriptorChecksum.into());
        }
        let meta: RecordMeta = serde_json::from_slice(&desc)?;
        self.check_meta(&meta)?;
        if header.payload != meta.payload_len() {
            return Err(Damage::HeaderMismatch.into());
        }
        Ok((meta, len))
    }

    /// Goes through `blobs/`: adopts the blobs sled does not list when their descriptors check
    /// out (pinned only while a restored registration in `kept` covers them), deletes the
    /// others and unfinished writes, and leaves what the store did not write alone. Ids at or
    /// above every blob's are given out from then on.
    fn scan_blobs(
        &mut self,
        kept: &[PrefixRecord],
        removing: &HashSet<u64>,
    ) -> std::io::Result<()> {
        let mut next_id = self.metas.keys().max().map_or(0, |id| id + 1);
        for entry in std::fs::read_dir(&self.blobs)? {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read an entry of the cache's blob directory");
                    continue;
                }
            };
            let path = entry.path();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            let Some((id, finished)) = blob_name(&path).filter(|_| is_file) else {
                tracing::warn!(
                    path = %path.display(),
                    "ignoring an entry of the cache's blob directory that agentd did not write"
                );
                continue;
            };
            next_id = next_id.max(id.saturating_add(1));
            if !finished {
                tracing::info!(path = %path.display(), "removing a blob whose writing was interrupted");
                remove(&path);
            } else if !self.metas.contains_key(&id) && !removing.contains(&id) {
                match self.read_descriptor(id) {
                    Ok((mut meta, len)) => {
                        meta.pinned = meta.pinned
                            && kept
                                .iter()
                                .any(|p| p.ns == meta.ns && p.tokens.starts_with(&meta.tokens));
                        tracing::debug!(record = id, "adopting a blob sled did not list");
                        self.send(Job::Meta {
                            id,
                            meta: Box::new(meta.clone()),
                        });
                        self.admit(id, meta, len);
                        self.stats.adopted += 1;
                    }
                    Err(why) => {
                        tracing::warn!(
                            record = id,
                            reason = %why,
                            "removing a blob that cannot be used; its tokens will be recomputed"
                        );
                        self.stats.dropped += 1;
                        remove(&path);
                    }
                }
            }
        }
        self.next_id = next_id;
        Ok(())
    }
}

/// The record id of a blob file's name, and whether it is finished (`.kv`) or being written
/// (`.tmp`); `None` for any other name.
fn blob_name(path: &Path) -> Option<(u64, bool)> {
    let stem = path.file_stem()?.to_str()?;
    let finished = match path.extension()?.to_str()? {
        "kv" => true,
        "tmp" => false,
        _ => return None,
    };
    let id = u64::from_str_radix(stem, 16).ok()?;
    (format!("{id:016x}") == stem).then_some((id, finished))
}

/// Deletes a file of the store's, warning when it cannot.
fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a cache file");
    }
}

/// Takes the directory's lock (a file lock on `dir/lock`, released when the file closes).
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    let dir_err = |source| StoreError::Dir {
        dir: dir.to_owned(),
        source,
    };
    let path = dir.join(LOCK);
    if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
        move_aside(&path).map_err(dir_err)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(dir_err)?;
    match fs2::FileExt::try_lock_exclusive(&file) {
        Ok(()) => Ok(file),
        Err(e) if e.raw_os_error() == fs2::lock_contended_error().raw_os_error() => {
            Err(StoreError::Locked {
                dir: dir.to_owned(),
                detail: format!("{} is locked", path.display()),
            })
        }
        Err(source) => Err(dir_err(source)),
    }
}

/// Makes `path` a directory, moving aside whatever else is there.
fn ensure_dir(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() && !std::fs::metadata(path).is_ok_and(|m| m.is_dir())
    {
        move_aside(path)?;
    }
    std::fs::create_dir_all(path)
}

/// Warns about the cache directory's entries the store does not use.
fn warn_unexpected(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if [LOCK, META, BLOBS].contains(&name.as_ref()) {
            continue;
        }
        if name.contains(DAMAGED) {
            tracing::info!(
                path = %entry.path().display(),
                "a damaged cache entry moved aside earlier; delete it when no longer needed"
            );
        } else {
            tracing::warn!(
                path = %entry.path().display(),
                "ignoring an entry of the cache directory that agentd did not write"
            );
        }
    }
}

/// Opens `dir/meta`, moving it aside and starting a new database when it is damaged.
fn open_meta(dir: &Path) -> Result<sled::Db, StoreError> {
    let path = dir.join(META);
    let failed = |f: MetaFailure| match f {
        MetaFailure::Locked(detail) => StoreError::Locked {
            dir: dir.to_owned(),
            detail,
        },
        MetaFailure::Refused(source) | MetaFailure::Damaged(source) => StoreError::Open {
            dir: dir.to_owned(),
            source,
        },
    };
    let why = match try_open_meta(&path) {
        Ok(db) => return Ok(db),
        Err(MetaFailure::Damaged(why)) => why,
        Err(f) => return Err(failed(f)),
    };
    let aside = move_aside(&path).map_err(|source| StoreError::Dir {
        dir: dir.to_owned(),
        source,
    })?;
    tracing::warn!(
        reason = %why,
        moved_to = %aside.display(),
        "the disk cache's metadata database is damaged: moved it aside and started a new one; \
         its records are rebuilt from the blobs, its registered prefixes are lost"
    );
    try_open_meta(&path).map_err(failed)
}

/// Opens sled at `path` and reads both trees through, so damage shows now rather than later.
fn try_open_meta(path: &Path) -> Result<sled::Db, MetaFailure> {
    if path.exists() {
        if !path.is_dir() {
            return Err(MetaFailure::Damaged(MetaError::Layout(
                "it is not a directory",
            )));
        }
        match std::fs::metadata(path.join("db")) {
            Ok(m) if m.len() > 0 => {}
            Ok(_) => {
                return Err(MetaFailure::Damaged(MetaError::Layout(
                    "its db file is empty",
                )))
            }
            Err(_) => {
                return Err(MetaFailure::Damaged(MetaError::Layout(
                    "its db file is missing",
                )))
            }
        }
    }
    let opened = std::panic::catch_unwind(|| -> sled::Result<sled::Db> {
        let db = sled::Config::new().path(path).open()?;
        for name in ["records", "prefixes"] {
            for entry in db.open_tree(name)?.iter() {
                entry?;
            }
        }
        Ok(db)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(classify(e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(MetaFailure::Damaged(MetaError::Panic(msg)))
        }
    }
}

/// Sorts a sled error: its lock held elsewhere (an io error whose text says so: sled has no
/// variant for it), the file system refusing, or damage (anything else, corruption included).
pub(crate) fn classify(e: sled::Error) -> MetaFailure {
    use std::io::ErrorKind as K;
    match &e {
        sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock") => {
            MetaFailure::Locked(io.to_string())
        }
        sled::Error::Io(io)
            if matches!(
                io.kind(),
                K::PermissionDenied
                    | K::ReadOnlyFilesystem
                    | K::StorageFull
                    | K::QuotaExceeded
                    | K::OutOfMemory
            ) =>
        {
            MetaFailure::Refused(e.into())
        }
        _ => MetaFailure::Damaged(e.into()),
    }
}

/// Renames `path` to `path.damaged-<UTC time>` (with `-2`, `-3`… if taken); returns the new
/// path.
fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = utc_stamp(super::now_secs());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut aside = path.with_file_name(format!("{name}{DAMAGED}{stamp}"));
    let mut n = 1;
    while std::fs::symlink_metadata(&aside).is_ok() {
        n += 1;
        aside = path.with_file_name(format!("{name}{DAMAGED}{stamp}-{n}"));
    }
    std::fs::rename(path, &aside)?;
    if let Some(parent) = path.parent() {
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(aside)
}

/// `secs` since the Unix epoch as a compact UTC time: `20261202T130501Z`.
pub(crate) fn utc_stamp(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (H. Hinnant's algorithm), from 1970-01-01.
    let z = days as i64 + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}
