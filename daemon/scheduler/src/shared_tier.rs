//! The scheduler's side of the shared tier ([`agentd_kvtier`], a Redis Cluster in the daemon):
//! exporting full pages on the disk tier's policy, and loading the pages that continue a
//! request's local match at admission.
//!
//! Two threads own the tier's calls, so the scheduler thread never waits on it:
//! - the *loader* takes a request's runs (one per namespace it may match in), cuts each into a
//!   [`PageRun`], asks [`KvTier::lookup`] for the pages past the ones held locally and reads
//!   them with [`KvTier::get_many`] (checked; a damaged value is deleted by the tier and ends
//!   the run); [`Scheduler::apply_tier_loads`] puts them in the pool and the tree as the disk
//!   tier's loads are, and lets the request be admitted. A load starts only after the disk
//!   tier's (a request first takes what memory and disk hold, then asks the tier for more).
//! - the *exporter* takes pages' bytes, skips the leading pages the tier already holds and
//!   stores the rest with [`KvTier::put_many`]. Its queue is bounded: an export that does not
//!   fit is dropped and counted, never waited for.
//!
//! Any tier failure is a miss: the request computes those tokens.

use super::scheduler::Scheduler;
use super::types::*;
use crate::cache::{EvictedRun, Namespace, PageId};
use agentd_engine::ModelDigests;
use agentd_kvtier::events::{EventKind, EventSink};
use agentd_kvtier::{KvTier, PageRun, TierNamespace};
use agentd_store::format::Fingerprint;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

/// The shared tier and what the KV in it is computed by.
#[derive(Clone)]
pub struct SharedTierConfig {
    /// The tier ([`agentd_kvtier::RedisTier`] in the daemon, [`agentd_kvtier::MemoryTier`] in
    /// tests).
    pub tier: Arc<dyn KvTier>,
    /// The model's digests: pages are shared only between daemons running the same model,
    /// tokenizer and template (and KV dtype and page layout).
    pub digests: ModelDigests,
    /// Exports queued at most (each is one run's pages); more are dropped and counted.
    pub export_queue: usize,
    /// Where the pages this daemon starts and stops holding are announced (KV events on the
    /// cluster's stream, [`agentd_kvtier::events`]), if anywhere.
    pub events: Option<Arc<dyn EventSink>>,
}

impl std::fmt::Debug for SharedTierConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTierConfig")
            .field("tier", &self.tier.name())
            .field("digests", &self.digests)
            .field("export_queue", &self.export_queue)
            .field("events", &self.events.is_some())
            .finish()
    }
}

/// One namespace's run to look up: the request's tokens and the first page not held locally.
struct RunLoad {
    ns: Namespace,
    tns: TierNamespace,
    tokens: Vec<u32>,
    from: usize,
}

/// A request's lookups, for the loader thread.
struct Load {
    req: u64,
    runs: Vec<RunLoad>,
}

/// What the loader found: per run, the pages served from page `from` on.
struct Loaded {
    req: u64,
    runs: Vec<(RunLoad, Vec<Vec<u8>>)>,
}

/// Pages `first..` of `tokens` (whole pages only), for the exporter thread.
struct Export {
    tns: TierNamespace,
    tokens: Vec<u32>,
    first: usize,
    bytes: Vec<u8>,
}

/// Counters kept by the scheduler and the tier threads.
#[derive(Default)]
struct Counters {
    exported_pages: AtomicU64,
    export_dropped_pages: AtomicU64,
    export_failed_pages: AtomicU64,
    loaded_tokens: AtomicU64,
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// The shared tier's threads and counters, owned by the scheduler.
pub(super) struct SharedTier {
    tier: Arc<dyn KvTier>,
    fingerprint: Fingerprint,
    loads: mpsc::Sender<Load>,
    done: mpsc::Receiver<Loaded>,
    exports: mpsc::SyncSender<Export>,
    counters: Arc<Counters>,
    events: Option<Arc<dyn EventSink>>,
}

impl SharedTier {
    /// Starts the loader and exporter threads; `wake` is called after each finished load.
    fn spawn(
        cfg: &SharedTierConfig,
        fingerprint: Fingerprint,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        let counters = Arc::new(Counters::default());
        let (loads, load_rx) = mpsc::channel::<Load>();
        let (done_tx, done) = mpsc::channel::<Loaded>();
        let tier = cfg.tier.clone();
        std::thread::Builder::new()
            .name("agentd-tier-loader".into())
            .spawn(move || {
                for load in load_rx {
                    let runs = load
                        .runs
                        .into_iter()
                        .map(|run| {
                            let pages = load_run(&*tier, &run);
                            (run, pages)
                        })
                        .collect();
                    if done_tx
                        .send(Loaded {
                            req: load.req,
                            runs,
                        })
                        .is_err()
                    {
                        break;
                    }
                    wake();
                }
            })?;
        let (exports, export_rx) = mpsc::sync_channel::<Export>(cfg.export_queue.max(1));
        let (tier, c) = (cfg.tier.clone(), counters.clone());
        std::thread::Builder::new()
            .name("agentd-tier-exporter".into())
            .spawn(move || {
                for job in export_rx {
                    export_run(&*tier, &c, job);
                }
            })?;
        Ok(Self {
            tier: cfg.tier.clone(),
            fingerprint,
            loads,
            done,
            exports,
            counters,
            events: cfg.events.clone(),
        })
    }

    fn namespace(&self, ns: Namespace) -> TierNamespace {
        TierNamespace::new(self.fingerprint.clone(), ns)
    }

    /// The counters, the tier's own included.
    pub(super) fn stats(&self) -> SharedTierStats {
        let t = self.tier.stats();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        SharedTierStats {
            exported_pages: g(&c.exported_pages),
            export_dropped_pages: g(&c.export_dropped_pages),
            export_failed_pages: g(&c.export_failed_pages),
            lookups: t.lookups,
            lookup_pages: t.lookup_pages,
            hit_pages: t.hits,
            damaged_pages: t.rejected,
            failures: t.failures,
            loaded_tokens: g(&c.loaded_tokens),
        }
    }
}

/// The loader's work for one run: the pages the tier serves from `run.from` on, stopping at
/// the first that it does not (a miss, a damaged value, a failure: logged, then a miss).
fn load_run(tier: &dyn KvTier, run: &RunLoad) -> Vec<Vec<u8>> {
    let span = tracing::debug_span!("tier_load", tier = tier.name(), from = run.from);
    let _g = span.enter();
    let pages = PageRun::new(&run.tns, &run.tokens);
    if pages.len() <= run.from {
        return Vec::new();
    }
    let found = match tier.lookup(&run.tns, &pages, run.from) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "the shared tier's lookup failed; computing instead");
            return Vec::new();
        }
    };
    if found == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(found);
    for r in tier.get_many(&run.tns, &pages, run.from..run.from + found) {
        match r {
            Ok(Some(b)) => out.push(b),
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "a shared tier page was not served; computing it");
                break;
            }
        }
    }
    out
}

/// The exporter's work for one job: store the pages the tier does not hold yet.
fn export_run(tier: &dyn KvTier, c: &Counters, job: Export) {
    let span = tracing::debug_span!("tier_export", tier = tier.name(), first = job.first);
    let _g = span.enter();
    let run = PageRun::new(&job.tns, &job.tokens);
    let page_bytes = job.tns.page_bytes();
    let pages: Vec<&[u8]> = job.bytes.chunks(page_bytes.max(1)).collect();
    if pages.len() + job.first != run.len() {
        tracing::error!(
            pages = pages.len(),
            first = job.first,
            run = run.len(),
            "an export's pages do not match its tokens"
        );
        bump(&c.export_failed_pages, pages.len() as u64);
        return;
    }
    // Pages the tier holds already (another daemon exported them) need not be sent again.
    let have = tier.lookup(&job.tns, &run, job.first).unwrap_or(0);
    let rest = &pages[have.min(pages.len())..];
    if rest.is_empty() {
        return;
    }
    match tier.put_many(&job.tns, &run, job.first + have, rest) {
        Ok(()) => bump(&c.exported_pages, rest.len() as u64),
        Err(e) => {
            tracing::debug!(error = %e, "exporting pages to the shared tier failed");
            bump(&c.export_failed_pages, rest.len() as u64);
        }
    }
}

impl Scheduler {
    /// Starts the shared tier's threads.
    pub(super) fn open_shared_tier(&mut self, cfg: &SharedTierConfig) -> Result<()> {
        let fp = crate::persist::fingerprint(&cfg.digests, &self.exec().layout());
        let waker = self.waker.clone();
        let wake = move || {
            if let Some(w) = waker.get() {
                w()
            }
        };
        if let Some(events) = &cfg.events {
            events.set_fingerprint(fp.clone());
        }
        let tier = SharedTier::spawn(cfg, fp, Arc::new(wake))
            .map_err(|e| SchedError::Spawn(Cause::new(e)))?;
        self.shared = Some(tier);
        Ok(())
    }

    /// Queues pages `first_page..` of `tokens` (held in `pages`, page `first_page` first) for
    /// the shared tier, whole pages only; dropped and counted when the queue is full.
    fn export_run(&mut self, ns: Namespace, tokens: &[u32], first_page: usize, pages: &[PageId]) {
        let Some(shared) = &self.shared else { return };
        let ps = self.cfg.page_size;
        let full = tokens.len() / ps;
        if full <= first_page || pages.len() < full - first_page {
            return;
        }
        let Some(bytes) = self.pages_bytes(&pages[..full - first_page]) else {
            return;
        };
        let job = Export {
            tns: shared.namespace(ns),
            tokens: tokens[..full * ps].to_vec(),
            first: first_page,
            bytes,
        };
        if let Err(mpsc::TrySendError::Full(_) | mpsc::TrySendError::Disconnected(_)) =
            shared.exports.try_send(job)
        {
            bump(
                &shared.counters.export_dropped_pages,
                (full - first_page) as u64,
            );
        }
    }

    /// Export of a newly pinned prefix (write-through), when its KV is all in the tree.
    pub(super) fn export_prefix(&mut self, ns: Namespace, tokens: &[u32]) {
        if self.shared.is_none() {
            return;
        }
        let m = self.tree.match_prefix(ns, tokens);
        if m.matched_tokens == tokens.len() {
            self.export_run(ns, tokens, 0, &m.pages);
        }
    }

    /// Export of an evicted run (write-back; the caller filters by hits). Its pages were just
    /// released and are not reused before this returns, so their bytes are intact.
    pub(super) fn export_evicted(&mut self, run: &EvictedRun) {
        // A run starting inside a page shares that page with the part still cached; the page
        // is whole in the pool, so it is exported with the rest.
        let first = run.start / self.cfg.page_size;
        self.export_run(run.ns, &run.tokens, first, &run.pages);
    }

    /// Announces that this daemon now holds (`Stored`) or no longer holds (`Removed`) the
    /// whole pages `first_page..` of `tokens` in `ns` (a KV event; nothing without events).
    pub(super) fn announce(
        &self,
        kind: EventKind,
        ns: Namespace,
        tokens: &[u32],
        first_page: usize,
    ) {
        let Some(shared) = &self.shared else { return };
        let Some(events) = &shared.events else { return };
        if !self.cfg.cache || tokens.len() / self.cfg.page_size <= first_page {
            return;
        }
        events.publish(kind, &shared.namespace(ns), tokens, first_page);
    }

    /// Announces the runs an eviction removed, except those written back to the disk tier
    /// (still held here, a disk read away).
    pub(super) fn announce_evicted(&self, runs: &[EvictedRun]) {
        let ps = self.cfg.page_size;
        for run in runs {
            let on_disk = self.store.is_some() && run.hits >= crate::persist::WRITE_BACK_HITS;
            if !on_disk {
                self.announce(EventKind::Removed, run.ns, &run.tokens, run.start / ps);
            }
        }
    }

    /// If waiting request `i`'s prompt continues for at least one whole page past what memory
    /// (and the disk tier, whose load came first) holds, hands a lookup to the loader and
    /// marks the request as loading; returns whether it did. Each request is looked up once.
    pub(super) fn begin_tier_load(&mut self, i: usize) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        let r = &self.waiting[i];
        if !self.cfg.cache || r.tier_checked || r.loading || r.tokens.is_empty() {
            return false;
        }
        let ps = self.cfg.page_size;
        let full = r.tokens.len() / ps;
        let mut runs = Vec::new();
        let mut resident_max = 0;
        for ns in [Some(r.ns), r.published].into_iter().flatten() {
            let resident = self.tree.longest_prefix_len(ns, &r.tokens);
            resident_max = resident_max.max(resident);
            let from = resident / ps;
            if full > from {
                runs.push(RunLoad {
                    ns,
                    tns: shared.namespace(ns),
                    tokens: r.tokens[..full * ps].to_vec(),
                    from,
                });
            }
        }
        let id = r.id;
        let r = &mut self.waiting[i];
        r.tier_checked = true;
        if runs.is_empty() {
            return false;
        }
        if shared.loads.send(Load { req: id, runs }).is_err() {
            tracing::error!("the shared tier's loader thread is gone");
            return false;
        }
        r.loading = true;
        r.tier_match = Some(resident_max);
        true
    }

    /// Puts the pages the loader found into fresh pool pages and the tree, and lets their
    /// requests be admitted.
    pub(super) fn apply_tier_loads(&mut self) {
        let Some(shared) = &self.shared else { return };
        let done: Vec<Loaded> = shared.done.try_iter().collect();
        let ps = self.cfg.page_size;
        for d in done {
            for (run, pages) in d.runs {
                if pages.is_empty() {
                    continue;
                }
                let end = ((run.from + pages.len()) * ps).min(run.tokens.len());
                let added = self.insert_loaded(run.ns, &run.tokens[..end], run.from, &pages);
                if let (Some(n), Some(shared)) = (added, &self.shared) {
                    bump(&shared.counters.loaded_tokens, n as u64);
                    self.pin_restored(run.ns);
                }
            }
            if let Some(r) = self.waiting.iter_mut().find(|r| r.id == d.req) {
                r.loading = false;
            }
        }
    }
}
