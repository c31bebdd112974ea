//! The disk tier of the prefix cache: records of KV pages in blob files, their metadata and the
//! registered prefixes in sled, an in-memory index to match requests against what is on disk,
//! and a disk budget with LRU eviction.
//!
//! Why blob files and not sled values: a record is hundreds of KiB to tens of MiB; files written
//! tmp → fsync → rename are atomic without loading sled's log with large values, can be read a
//! page range at a time, and make the integrity checks easy to exercise (a test flips a byte).
//! sled holds only small metadata, and a record goes into sled only after its blob is durable,
//! so a crash leaves at worst an orphan blob. Each blob ends with its record's descriptor, so the
//! next start adopts an orphan back into sled instead of losing it.
//!
//! Nothing found in the directory stops the daemon except another daemon using it (a lock file):
//! a damaged sled database is moved aside and rebuilt from the blobs' descriptors, and entries
//! the store did not write are left alone with a warning (see `open`).
//!
//! - [`format`]: the fingerprint, record metadata, blob layout, chained page hashes.
//! - [`index`]: chain hash → pages on disk; token-granular matching.
//! - `open`: opening the directory: the lock, damage recovery, checking and adopting records.
//! - `writer`: the thread that writes blobs and sled.
//!
//! The store is owned by the scheduler's thread; page reads are synchronous there.

pub mod format;
pub mod index;
mod open;
#[cfg(test)]
mod open_tests;
mod writer;

use format::{check_blob_header, Damage, Fingerprint, PrefixRecord, RecordMeta, BLOB_HEADER_LEN};
use index::{DiskIndex, DiskMatch};
pub use open::MetaError;
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use writer::{blob_path, Done, Job};

/// A cache namespace: the tree and the disk tier never match across namespaces.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Namespace {
    /// One tenant's private prefixes.
    Tenant(u64),
    /// Prefixes an operator published for sharing.
    Published(u64),
}

/// One page to read from a blob and how to check it ([`Store::plan_read`]).
#[derive(Debug, Clone)]
pub struct PageRead {
    /// The record (blob) holding it.
    pub record: u64,
    /// The page's index in its sequence.
    pub page: u32,
    path: PathBuf,
    payload: u64,
    offset: u64,
    len: usize,
    crc: u32,
}

impl PageRead {
    /// Bytes of the page.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a page has bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads the page into `out` (resized to the page), checking the blob's header and the
    /// page's checksum. Blocking file I/O: for a reader thread.
    pub fn read(&self, out: &mut [u8]) -> Result<(), StoreError> {
        if out.len() != self.len {
            return Err(StoreError::PageSize {
                expected: self.len,
                got: out.len(),
            });
        }
        let mut f = std::fs::File::open(&self.path).map_err(|source| StoreError::Io {
            what: "opening a blob",
            source,
        })?;
        let read = |source| StoreError::Io {
            what: "reading a blob",
            source,
        };
        let mut h = [0u8; BLOB_HEADER_LEN];
        f.read_exact(&mut h).map_err(read)?;
        check_blob_header(&h, self.record, self.payload)?;
        f.seek(SeekFrom::Start(self.offset))
            .and_then(|_| f.read_exact(out))
            .map_err(read)?;
        if crc32fast::hash(out) != self.crc {
            return Err(Damage::PageChecksum { page: self.page }.into());
        }
        Ok(())
    }
}

/// How many leading tokens `a` and `b` share.
pub fn common_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// What can go wrong in the disk tier.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The metadata database failed.
    #[error("the cache metadata: {0}")]
    Db(#[from] sled::Error),
    /// The record's metadata cannot be decoded.
    #[error("unreadable metadata: {0}")]
    BadMeta(#[from] serde_json::Error),
    /// The record was dropped meanwhile.
    #[error("record {0} is gone")]
    RecordGone(u64),
    /// A page outside the record was asked for.
    #[error("page {page} is not in record {record}")]
    PageNotInRecord {
        /// The record.
        record: u64,
        /// The page.
        page: u32,
    },
    /// The caller's buffer is not one page.
    #[error("a page is {expected} bytes, not {got}")]
    PageSize {
        /// One page's bytes.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
    /// The record fails a check (its tokens will be recomputed).
    #[error(transparent)]
    Damaged(#[from] format::Damage),
    /// The directory cannot be created or read.
    #[error("cannot use the cache directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another process (another agentd) holds the cache directory's lock. Two daemons on one
    /// directory would corrupt it, so this is the one state of the directory that stops start-up.
    #[error(
        "the cache directory {dir} is in use by another agentd ({detail}); stop it, or give \
         each daemon its own cache directory"
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// What reported the lock as held.
        detail: String,
    },
    /// sled cannot open a database, even a new one after the old one was moved aside as
    /// damaged (the file system refuses: permissions, no space).
    #[error("cannot open the cache database in {dir}: {source}")]
    Open {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: MetaError,
    },
}

/// Where and how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The directory holding `meta/` (sled) and `blobs/`.
    pub dir: PathBuf,
    /// Most bytes of blobs kept.
    pub budget: u64,
}

/// Counters of the disk tier.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StoreStats {
    /// Records on disk.
    pub records: usize,
    /// Bytes of blobs on disk (and being written).
    pub bytes: u64,
    /// The budget.
    pub budget: u64,
    /// Records written since start.
    pub written: u64,
    /// Pages read back into memory since start.
    pub loaded_pages: u64,
    /// Bytes read back since start.
    pub loaded_bytes: u64,
    /// Seconds spent reading and checking them.
    pub load_seconds: f64,
    /// Records dropped: fingerprint or checksum mismatch, missing or short blob.
    pub dropped: u64,
    /// Records restored at start from their blobs' descriptors, sled having lost them (an
    /// orphan blob after a crash, or a damaged database rebuilt).
    pub adopted: u64,
    /// Records evicted to stay under the budget.
    pub evicted: u64,
}

/// A record on disk (or being written): its metadata and its blob file's length.
struct Held {
    meta: RecordMeta,
    file_len: u64,
}

/// The disk tier (see the module docs).
pub struct Store {
    fp: Fingerprint,
    page_size: usize,
    blobs: PathBuf,
    db: sled::Db,
    index: DiskIndex,
    metas: HashMap<u64, Held>,
    /// Records being written.
    pending: HashMap<u64, Held>,
    /// No record id below this is given out (ids of blobs found at start included: a rebuilt
    /// database's id generator starts again at 0).
    next_id: u64,
    stats: StoreStats,
    jobs: Option<mpsc::Sender<Job>>,
    done: mpsc::Receiver<Done>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// The directory's lock, held as long as the store (declared last: released after sled).
    _lock: std::fs::File,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    fn admit(&mut self, id: u64, meta: RecordMeta, file_len: u64) {
        self.index
            .add(id, meta.ns, &meta.tokens, meta.first_page as usize);
        self.stats.bytes += file_len;
        self.metas.insert(id, Held { meta, file_len });
    }

    fn send(&self, job: Job) {
        if let Some(tx) = &self.jobs {
            let _ = tx.send(job);
        }
    }

    /// Drops record `id` (index, metadata, blob), logging why.
    pub fn drop_record(&mut self, id: u64, why: &StoreError) {
        tracing::warn!(
            record = id,
            reason = %why,
            "dropping a disk cache record; its tokens will be recomputed"
        );
        self.stats.dropped += 1;
        self.forget(id);
    }

    fn forget(&mut self, id: u64) {
        self.index.remove(id);
        if let Some(held) = self.metas.remove(&id) {
            self.stats.bytes -= held.file_len;
        }
        self.send(Job::Remove { id });
    }

    /// Applies finished writes: committed records become matchable.
    pub fn poll(&mut self) {
        while let Ok(done) = self.done.try_recv() {
            match done {
                Done::Committed { id } => {
                    if let Some(held) = self.pending.remove(&id) {
                        self.stats.written += 1;
                        self.stats.bytes -= held.file_len;
                        self.admit(id, held.meta, held.file_len);
                    }
                }
                Done::Failed { id, error } => {
                    tracing::warn!(record = id, %error, "writing a disk cache record failed");
                    if let Some(held) = self.pending.remove(&id) {
                        self.stats.bytes -= held.file_len;
                    }
                }
            }
        }
    }

    /// The longest prefix of `tokens` in `ns` servable from the first `resident` tokens in
    /// memory plus pages on disk.
    pub fn longest_match(&self, ns: Namespace, tokens: &[u32], resident: usize) -> DiskMatch {
        self.index.longest_match(ns, tokens, resident)
    }

    /// Reads page `page` of record `record` into `out` (one page's bytes), checking the blob's
    /// header and the page's checksum. On any failure the record is dropped and the error says
    /// why; the caller recomputes instead.
    pub fn read_page(&mut self, record: u64, page: u32, out: &mut [u8]) -> Result<(), StoreError> {
        let t0 = std::time::Instant::now();
        let r = self.plan_read(record, page).and_then(|p| p.read(out));
        self.finish_read(record, out.len(), t0.elapsed(), r.as_ref().err());
        r
    }

    /// Where page `page` of record `record` is and how to check it: a plan any thread can carry
    /// out ([`PageRead::read`]), so the scheduler's thread never waits on the disk.
    pub fn plan_read(&self, record: u64, page: u32) -> Result<PageRead, StoreError> {
        let meta = &self
            .metas
            .get(&record)
            .ok_or(StoreError::RecordGone(record))?
            .meta;
        let k = page
            .checked_sub(meta.first_page)
            .filter(|&k| (k as usize) < meta.page_crc.len())
            .ok_or(StoreError::PageNotInRecord { record, page })? as usize;
        let page_bytes = self.fp.page_bytes();
        Ok(PageRead {
            record,
            page,
            path: blob_path(&self.blobs, record),
            payload: meta.payload_len(),
            offset: (BLOB_HEADER_LEN + k * page_bytes) as u64,
            len: page_bytes,
            crc: meta.page_crc[k],
        })
    }

    /// Accounts for a page read done elsewhere ([`PageRead::read`]): `bytes` read in `took`,
    /// or the failure, which drops the record.
    pub fn finish_read(
        &mut self,
        record: u64,
        bytes: usize,
        took: std::time::Duration,
        failure: Option<&StoreError>,
    ) {
        match failure {
            None => {
                self.stats.loaded_pages += 1;
                self.stats.loaded_bytes += bytes as u64;
                self.stats.load_seconds += took.as_secs_f64();
            }
            Some(why) => {
                if self.metas.contains_key(&record) {
                    self.drop_record(record, why);
                }
            }
        }
    }

    /// Notes a load from record `id` (for LRU on disk).
    pub fn touch(&mut self, id: u64) {
        if let Some(Held { meta, .. }) = self.metas.get_mut(&id) {
            meta.hits += 1;
            meta.last_use = now_secs();
            let meta = Box::new(meta.clone());
            self.send(Job::Meta { id, meta });
        }
    }

    /// Writes pages `first_page..` of `tokens` in `ns` (their bytes in `bytes`, page after
    /// page) as a new record, in the background; it becomes matchable once durable. Older
    /// records are evicted to stay under the budget; a record that cannot fit is not written.
    pub fn write(
        &mut self,
        ns: Namespace,
        tokens: Vec<u32>,
        first_page: usize,
        bytes: Vec<u8>,
        pinned: bool,
    ) {
        let page_bytes = self.fp.page_bytes();
        let page_crc: Vec<u32> = bytes.chunks(page_bytes).map(crc32fast::hash).collect();
        let mut meta = RecordMeta {
            fingerprint: self.fp.clone(),
            ns,
            tokens,
            first_page: first_page as u32,
            page_crc,
            pinned,
            hits: 0,
            last_use: now_secs(),
            meta_crc: 0,
        };
        debug_assert_eq!(meta.page_crc.len(), meta.pages(self.page_size));
        meta.meta_crc = meta.compute_crc();
        let desc = meta.descriptor();
        let len = BLOB_HEADER_LEN as u64 + meta.payload_len() + desc.len() as u64;
        if !self.trim(len) {
            tracing::warn!(
                bytes = len,
                budget = self.stats.budget,
                "a record does not fit the disk cache budget; not written"
            );
            return;
        }
        let id = match self.db.generate_id() {
            Ok(id) => id.max(self.next_id),
            Err(e) => {
                tracing::warn!(error = %e, "no id for a disk cache record; not written");
                return;
            }
        };
        self.next_id = id + 1;
        self.stats.bytes += len;
        self.pending.insert(
            id,
            Held {
                meta,
                file_len: len,
            },
        );
        self.send(Job::Write { id, desc, bytes });
    }

    /// Evicts records, least recently used first (unpinned before pinned), until `incoming`
    /// more bytes fit the budget; false when they cannot.
    fn trim(&mut self, incoming: u64) -> bool {
        if incoming > self.stats.budget {
            return false;
        }
        while self.stats.bytes + incoming > self.stats.budget {
            let victim = self
                .metas
                .iter()
                .min_by_key(|(id, h)| (h.meta.pinned, h.meta.last_use, **id))
                .map(|(id, _)| *id);
            let Some(id) = victim else {
                return false;
            };
            self.stats.evicted += 1;
            self.forget(id);
        }
        true
    }

    /// Whether the whole of `tokens` in `ns` is on disk (or being written) already.
    pub fn covers(&self, ns: Namespace, tokens: &[u32]) -> bool {
        self.index.longest_match(ns, tokens, 0).tokens == tokens.len()
            || self
                .pending
                .values()
                .any(|h| h.meta.ns == ns && h.meta.tokens.starts_with(tokens))
    }

    /// Marks the records holding a prefix of `tokens` in `ns` as unpinned (ordinary LRU).
    pub fn unpin(&mut self, ns: Namespace, tokens: &[u32]) {
        let ids: Vec<u64> = self
            .metas
            .iter()
            .filter(|(_, h)| h.meta.pinned && h.meta.ns == ns && tokens.starts_with(&h.meta.tokens))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let meta = &mut self.metas.get_mut(&id).expect("listed").meta;
            meta.pinned = false;
            let meta = Box::new(meta.clone());
            self.send(Job::Meta { id, meta });
        }
    }

    /// Persists a prefix registration.
    pub fn put_prefix(&self, id: u64, tenant: u64, ns: Namespace, tokens: Vec<u32>) {
        self.send(Job::PutPrefix(Box::new(PrefixRecord {
            fingerprint: self.fp.clone(),
            id,
            tenant,
            ns,
            tokens,
        })));
    }

    /// Forgets a persisted prefix registration.
    pub fn remove_prefix(&self, id: u64) {
        self.send(Job::RemovePrefix(id));
    }

    /// Waits until every queued write is durable (blobs and sled).
    pub fn flush(&mut self) {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Flush(tx));
        let _ = rx.recv();
        self.poll();
    }

    /// Bytes of one page.
    pub fn page_bytes(&self) -> usize {
        self.fp.page_bytes()
    }

    /// The counters.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            records: self.metas.len(),
            ..self.stats.clone()
        }
    }

    /// The blob directory (for tests and benchmarks).
    pub fn blob_dir(&self) -> &Path {
        &self.blobs
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}
