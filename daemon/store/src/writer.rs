//! The store's writer thread: blob files (tmp → fsync → rename → fsync of the directory), then
//! their metadata in sled, so a record in sled always has a complete blob behind it. sled is
//! flushed whenever the queue runs dry and on request.

use super::format::{BlobHeader, PrefixRecord, RecordMeta};
use super::StoreError;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Work for the writer thread.
pub(super) enum Job {
    /// Write a record's blob (header, pages `bytes`, descriptor `desc`), then its metadata
    /// (the descriptor) in sled.
    Write {
        id: u64,
        desc: Vec<u8>,
        bytes: Vec<u8>,
    },
    /// Rewrite a record's metadata (hits, last use, pin).
    Meta { id: u64, meta: Box<RecordMeta> },
    /// Delete a record: metadata first, then the blob.
    Remove { id: u64 },
    /// Persist a prefix registration.
    PutPrefix(Box<PrefixRecord>),
    /// Forget a prefix registration.
    RemovePrefix(u64),
    /// Flush sled and answer.
    Flush(mpsc::Sender<()>),
}

/// What the writer reports back for a [`Job::Write`].
pub(super) enum Done {
    /// The blob is durable and its metadata is in sled.
    Committed { id: u64 },
    /// Writing failed; the record does not exist.
    Failed { id: u64, error: StoreError },
}

/// The blob file of record `id`.
pub(super) fn blob_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.kv"))
}

pub(super) fn record_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// The temporary file record `id`'s blob is written to before its rename.
pub(super) fn tmp_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.tmp"))
}

fn write_blob(dir: &Path, id: u64, bytes: &[u8], desc: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(dir, id);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&BlobHeader::new(id, bytes.len() as u64, desc).encode())?;
    f.write_all(bytes)?;
    f.write_all(desc)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, blob_path(dir, id))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Runs jobs until the channel closes.
pub(super) fn run(dir: PathBuf, db: sled::Db, jobs: mpsc::Receiver<Job>, done: mpsc::Sender<Done>) {
    let records = db.open_tree("records").expect("opened at start");
    let prefixes = db.open_tree("prefixes").expect("opened at start");
    loop {
        let job = match jobs.try_recv() {
            Ok(job) => job,
            Err(mpsc::TryRecvError::Empty) => {
                if let Err(e) = db.flush() {
                    tracing::warn!(error = %e, "flushing the cache metadata failed");
                }
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        let result: Result<(), StoreError> = match job {
            Job::Write { id, desc, bytes } => {
                let r = write_blob(&dir, id, &bytes, &desc)
                    .map_err(|source| StoreError::Io {
                        what: "writing a blob",
                        source,
                    })
                    .and_then(|()| {
                        records
                            .insert(record_key(id), desc)
                            .map(drop)
                            .map_err(StoreError::from)
                    });
                let _ = done.send(match r {
                    Ok(()) => Done::Committed { id },
                    Err(error) => {
                        let _ = std::fs::remove_file(blob_path(&dir, id));
                        Done::Failed { id, error }
                    }
                });
                Ok(())
            }
            Job::Meta { id, meta } => records
                .insert(record_key(id), json(&*meta))
                .map(drop)
                .map_err(StoreError::from),
            Job::Remove { id } => records
                .remove(record_key(id))
                .map_err(StoreError::from)
                .and_then(|_| match std::fs::remove_file(blob_path(&dir, id)) {
                    Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                        Err(StoreError::Io {
                            what: "removing a blob",
                            source,
                        })
                    }
                    _ => Ok(()),
                }),
            Job::PutPrefix(p) => prefixes
                .insert(record_key(p.id), json(&*p))
                .map(drop)
                .map_err(StoreError::from),
            Job::RemovePrefix(id) => prefixes
                .remove(record_key(id))
                .map(drop)
                .map_err(StoreError::from),
            Job::Flush(reply) => {
                let r = db.flush().map(drop).map_err(StoreError::from);
                let _ = reply.send(());
                r
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "a cache store write failed");
        }
    }
    if let Err(e) = db.flush() {
        tracing::warn!(error = %e, "flushing the cache metadata failed");
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serialises")
}
