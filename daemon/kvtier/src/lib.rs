//! The tiers below agentd's KV memory pool, behind one trait: [`KvTier`].
//!
//! A tier stores whole KV pages, each under a [`PageKey`] — a chained content hash over the
//! page's tokens and every page before it, seeded by a [`TierNamespace`] digest that folds in
//! everything the bytes depend on (model file, tokenizer, template, KV dtype, page layout, the
//! server-chosen tenant namespace). Callers cut a token sequence into a [`PageRun`] once and
//! name pages by their index in it, so a key, its parent and its tokens cannot disagree.
//!
//! - [`key`]: namespaces, page keys, runs, the Redis key form and its Cluster hash tags.
//! - [`value`]: one value per page (header and K/V bytes together), checked on every read.
//! - [`MemoryTier`]: a map in memory with an optional capacity, for tests.
//! - [`events`]: KV events (which daemon holds which pages) on a capped Redis Stream, node
//!   heartbeats with restart epochs, and the index a router builds from them.
//! - [`RedisTier`]: the shared tier on Redis Cluster (redis-rs's async cluster client on its
//!   own small tokio runtime), every call bounded by a timeout.
//!
//! **The trait is synchronous** and meant for a tier thread, as the disk tier's reads run on
//! the scheduler's reader thread today (`daemon/scheduler/src/persist.rs`): the scheduler thread
//! never waits on a tier. A failing tier (Redis down, a timeout, a damaged value) returns an
//! error that the caller treats as a miss: the tokens are recomputed, no request fails because
//! of a tier.
//!
//! Every read is checked ([`value::decode`]); a value that fails a check is deleted from the
//! tier and reported as [`TierError::Damaged`], never served.

pub mod events;
pub mod key;
mod memory;
mod redis_tier;
pub mod value;

pub use key::{PageKey, PageRun, TierNamespace};
pub use memory::MemoryTier;
pub use redis_tier::{RedisTier, RedisTierConfig};
pub use value::ValueError;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What can go wrong in a tier. Every variant means "not served from this tier": the caller
/// recomputes.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The tier cannot be reached (no connection, a refused or failed command).
    #[error("the {tier} tier is unavailable ({op}): {detail}")]
    Unavailable {
        /// The tier's name.
        tier: &'static str,
        /// The operation.
        op: &'static str,
        /// What failed.
        detail: String,
    },
    /// The tier did not answer in time.
    #[error("the {tier} tier did not answer {op} within {after:?}")]
    Timeout {
        /// The tier's name.
        tier: &'static str,
        /// The operation.
        op: &'static str,
        /// The bound.
        after: Duration,
    },
    /// A stored value failed a check; it was deleted from the tier.
    #[error("page {page} in the {tier} tier was rejected: {why}")]
    Damaged {
        /// The tier's name.
        tier: &'static str,
        /// The page's index in its run.
        page: usize,
        /// The check that failed.
        why: ValueError,
    },
    /// The call itself is wrong: a page past the run, a run of another namespace, bytes that
    /// are not one page, a synchronous call from inside an async runtime.
    #[error("invalid call to the {tier} tier: {detail}")]
    Invalid {
        /// The tier's name.
        tier: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// Result alias for tier operations.
pub type Result<T> = std::result::Result<T, TierError>;

/// One page read from a tier: its bytes, `None` when the tier does not hold it, or why it
/// cannot be used.
pub type PageResult = Result<Option<Vec<u8>>>;

/// A tier below the memory pool: local disk, a shared Redis Cluster, memory for tests.
///
/// Methods take the namespace and a [`PageRun`] cut for it, and name pages by index. All are
/// synchronous and may block up to the tier's timeout; call them from a tier thread, never from
/// the scheduler thread or inside an async runtime. Any error is a miss to the caller.
pub trait KvTier: Send + Sync {
    /// The tier's name, for logs and errors ("memory", "redis").
    fn name(&self) -> &'static str;

    /// How many consecutive pages of `run`, starting at page `from`, the tier holds (pages
    /// before `from` are not asked about: the caller has them in a faster tier). Presence is a
    /// hint — a page may be evicted before it is read — and [`KvTier::get`] still checks it.
    fn lookup(&self, ns: &TierNamespace, run: &PageRun, from: usize) -> Result<usize>;

    /// Page `page` of `run`, checked against its key, parent, tokens, namespace and checksum;
    /// `Ok(None)` if the tier does not hold it. A value failing a check is deleted and
    /// [`TierError::Damaged`] returned.
    fn get(&self, ns: &TierNamespace, run: &PageRun, page: usize) -> PageResult;

    /// Pages `pages` of `run` (those of them the run has), in order, each as [`KvTier::get`]
    /// gives it. Stops after the first page that is not served (a miss or an error), since a
    /// run cannot continue past it. A range starting past the run gives one error.
    fn get_many(
        &self,
        ns: &TierNamespace,
        run: &PageRun,
        pages: std::ops::Range<usize>,
    ) -> Vec<PageResult> {
        if pages.start >= run.len() && !pages.is_empty() {
            return vec![check_call(self.name(), ns, run, pages.start, None).map(|()| None)];
        }
        let pages = pages.start..pages.end.min(run.len());
        let mut out = Vec::with_capacity(pages.len());
        for p in pages {
            let r = self.get(ns, run, p);
            let served = matches!(r, Ok(Some(_)));
            out.push(r);
            if !served {
                break;
            }
        }
        out
    }

    /// Stores page `page` of `run` holding `bytes` (one page of the namespace's layout).
    fn put(&self, ns: &TierNamespace, run: &PageRun, page: usize, bytes: &[u8]) -> Result<()>;

    /// Stores pages `first..first + pages.len()` of `run`, `pages[i]` holding page `first + i`.
    fn put_many(
        &self,
        ns: &TierNamespace,
        run: &PageRun,
        first: usize,
        pages: &[&[u8]],
    ) -> Result<()> {
        for (i, b) in pages.iter().enumerate() {
            self.put(ns, run, first + i, b)?;
        }
        Ok(())
    }

    /// Deletes a page (a no-op if the tier does not hold it).
    fn remove(&self, ns: &TierNamespace, key: &PageKey) -> Result<()>;

    /// The tier's counters since it was opened.
    fn stats(&self) -> TierStats;
}

/// Counters of one tier since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Lookups answered.
    pub lookups: u64,
    /// Pages the answered lookups found (the runs' lengths, added up).
    pub lookup_pages: u64,
    /// Pages served by `get`.
    pub hits: u64,
    /// Pages `get` did not find.
    pub misses: u64,
    /// Values that failed a check (deleted, not served).
    pub rejected: u64,
    /// Pages stored.
    pub puts: u64,
    /// Bytes of values stored.
    pub bytes_put: u64,
    /// Pages deleted on request.
    pub removes: u64,
    /// Calls that failed (unavailable, timed out): each was a miss for its caller.
    pub failures: u64,
}

/// The counters, shared by the implementations.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    lookups: AtomicU64,
    lookup_pages: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    rejected: AtomicU64,
    puts: AtomicU64,
    bytes_put: AtomicU64,
    removes: AtomicU64,
    failures: AtomicU64,
}

/// Which counter to bump.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Count {
    Lookup { pages: usize },
    Hit,
    Miss,
    Rejected,
    Put { bytes: usize },
    Remove,
    Failure,
}

impl Counters {
    pub(crate) fn add(&self, c: Count) {
        let inc = |a: &AtomicU64, n: u64| {
            a.fetch_add(n, Ordering::Relaxed);
        };
        match c {
            Count::Lookup { pages } => {
                inc(&self.lookups, 1);
                inc(&self.lookup_pages, pages as u64);
            }
            Count::Hit => inc(&self.hits, 1),
            Count::Miss => inc(&self.misses, 1),
            Count::Rejected => inc(&self.rejected, 1),
            Count::Put { bytes } => {
                inc(&self.puts, 1);
                inc(&self.bytes_put, bytes as u64);
            }
            Count::Remove => inc(&self.removes, 1),
            Count::Failure => inc(&self.failures, 1),
        }
    }

    pub(crate) fn snapshot(&self) -> TierStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TierStats {
            lookups: g(&self.lookups),
            lookup_pages: g(&self.lookup_pages),
            hits: g(&self.hits),
            misses: g(&self.misses),
            rejected: g(&self.rejected),
            puts: g(&self.puts),
            bytes_put: g(&self.bytes_put),
            removes: g(&self.removes),
            failures: g(&self.failures),
        }
    }
}

/// Checks a call naming page `page` of `run` (`bytes`: what a put stores).
pub(crate) fn check_call(
    tier: &'static str,
    ns: &TierNamespace,
    run: &PageRun,
    page: usize,
    bytes: Option<&[u8]>,
) -> Result<()> {
    let invalid = |detail: String| Err(TierError::Invalid { tier, detail });
    if !run.belongs_to(ns) {
        return invalid("the run was cut for another namespace".into());
    }
    if page >= run.len() {
        return invalid(format!("page {page} is past the run's {} pages", run.len()));
    }
    match bytes {
        Some(b) if b.len() != ns.page_bytes() => invalid(format!(
            "a page is {} bytes, not {}",
            ns.page_bytes(),
            b.len()
        )),
        _ => Ok(()),
    }
}

/// Decodes a value read for page `page` of `run`: the bytes, or the check that failed (the
/// caller deletes the value). Counts the outcome.
pub(crate) fn finish_get(
    tier: &'static str,
    counters: &Counters,
    ns: &TierNamespace,
    run: &PageRun,
    page: usize,
    raw: Option<Vec<u8>>,
) -> PageResult {
    let Some(raw) = raw else {
        counters.add(Count::Miss);
        return Ok(None);
    };
    match value::decode(ns, run, page, raw) {
        Ok(bytes) => {
            counters.add(Count::Hit);
            Ok(Some(bytes))
        }
        Err(why) => {
            counters.add(Count::Rejected);
            tracing::warn!(tier, page, reason = %why, "a tier value was rejected and is deleted");
            Err(TierError::Damaged { tier, page, why })
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use agentd_store::format::Fingerprint;
    use agentd_store::Namespace;

    /// A small layout: 16 tokens a page, 1 layer, 1 KV head of 4: 256 bytes a page in f16.
    pub fn fingerprint() -> Fingerprint {
        Fingerprint {
            format_version: 2,
            model_sha256: "model".into(),
            kv_dtype: "f16".into(),
            page_size: 16,
            layers: 1,
            kv_heads: 1,
            head_dim: 4,
            tokenizer_digest: "tok".into(),
            template_digest: "tpl".into(),
        }
    }

    /// Tenant `t`'s namespace under [`fingerprint`].
    pub fn ns(t: u64) -> TierNamespace {
        TierNamespace::new(fingerprint(), Namespace::Tenant(t))
    }
}
