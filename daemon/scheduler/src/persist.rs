//! The scheduler's side of the disk tier ([`agentd_store`]): write-through of pinned prefixes,
//! write-back of evicted runs that were hit at least twice, loading pages back when a request's
//! match continues on disk, and restoring registered prefixes at start.

use super::scheduler::{Prefix, Scheduler};
use super::types::*;
use crate::cache::{EvictedRun, Namespace, PageId, PageLease};
use agentd_engine::{KvLayout, ModelDigests};
use agentd_store::format::{Fingerprint, FORMAT_VERSION};
use agentd_store::{PageRead, Store, StoreError};
use std::sync::{mpsc, Arc};

/// Evicted runs matched at least this often are written back to disk.
pub(crate) const WRITE_BACK_HITS: u64 = 2;

/// One run of pages to load for one namespace: the tokens it covers and the page reads.
pub(super) struct RunLoad {
    ns: Namespace,
    tokens: Vec<u32>,
    reads: Vec<PageRead>,
}

/// A request's disk loads, for the reader thread.
pub(super) struct DiskLoad {
    req: u64,
    runs: Vec<RunLoad>,
}

/// A page's bytes and how long reading them took, or why it could not be used.
type PageResult = std::result::Result<(Vec<u8>, std::time::Duration), StoreError>;

/// What the reader did with a [`DiskLoad`]: per run, its pages (stopping at the first failure).
pub(super) struct LoadedRun {
    load: DiskLoad,
    pages: Vec<Vec<PageResult>>,
}

/// The disk reader thread: page reads and checksums off the scheduler thread.
pub(super) struct DiskReader {
    jobs: mpsc::Sender<DiskLoad>,
    done: mpsc::Receiver<LoadedRun>,
}

impl DiskReader {
    /// Starts the thread; `wake` is called after each finished load (the scheduler thread may
    /// be asleep waiting for it).
    pub(super) fn spawn(wake: Arc<dyn Fn() + Send + Sync>) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<DiskLoad>();
        let (tx, done) = mpsc::channel::<LoadedRun>();
        std::thread::Builder::new()
            .name("agentd-disk-reader".into())
            .spawn(move || {
                for load in rx {
                    let pages = load
                        .runs
                        .iter()
                        .map(|run| {
                            let mut out = Vec::with_capacity(run.reads.len());
                            for read in &run.reads {
                                let t0 = std::time::Instant::now();
                                let mut buf = vec![0u8; read.len()];
                                let r = read.read(&mut buf).map(|()| (buf, t0.elapsed()));
                                let failed = r.is_err();
                                out.push(r);
                                if failed {
                                    break;
                                }
                            }
                            out
                        })
                        .collect();
                    if tx.send(LoadedRun { load, pages }).is_err() {
                        break;
                    }
                    wake();
                }
            })?;
        Ok(Self { jobs, done })
    }
}

/// What the KV in pages of `layout`, computed by the model with `digests`, depends on.
pub fn fingerprint(digests: &ModelDigests, layout: &KvLayout) -> Fingerprint {
    Fingerprint {
        format_version: FORMAT_VERSION,
        model_sha256: digests.model_sha256.clone(),
        kv_dtype: layout.dtype.name().into(),
        page_size: layout.page_size as u32,
        layers: layout.layers as u32,
        kv_heads: layout.kv_heads as u32,
        head_dim: layout.head_dim as u32,
        tokenizer_digest: digests.tokenizer_digest.clone(),
        template_digest: digests.template_digest.clone(),
    }
}

impl Scheduler {
    /// Opens the disk tier and restores the registered prefixes it kept (their KV loads on
    /// first use).
    pub(super) fn open_store(&mut self, cfg: &DiskTierConfig) -> Result<()> {
        let fp = fingerprint(&cfg.digests, &self.exec().layout());
        let (store, prefixes) =
            Store::open(&cfg.store, fp).map_err(|e| SchedError::DiskTier(Cause::new(e)))?;
        for p in prefixes {
            self.prefixes.insert(
                PrefixId(p.id),
                Prefix {
                    tenant: p.tenant,
                    ns: p.ns,
                    tokens: p.tokens,
                    pinned: false,
                },
            );
        }
        self.store = Some(store);
        let waker = self.waker.clone();
        let wake = move || {
            if let Some(w) = waker.get() {
                w()
            }
        };
        self.reader =
            Some(DiskReader::spawn(Arc::new(wake)).map_err(|e| SchedError::Spawn(Cause::new(e)))?);
        Ok(())
    }

    /// Applies the store's finished writes.
    pub(super) fn poll_store(&mut self) {
        if let Some(s) = &mut self.store {
            s.poll();
        }
    }

    /// Waits until everything written so far is durable.
    pub fn flush_store(&mut self) {
        if let Some(s) = &mut self.store {
            s.flush();
        }
    }

    pub(super) fn pages_bytes(&self, pages: &[PageId]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(pages.len() * self.exec().page_bytes());
        for p in pages {
            if let Err(e) = self.exec().read_page(p.0, &mut out) {
                tracing::error!(error = %e, "reading a page for the disk tier failed");
                return None;
            }
        }
        Some(out)
    }

    /// Writes pages `first_page..` (held in `pages`, page `first_page` first) of `tokens`
    /// unless the disk already has them all.
    fn persist_run(
        &mut self,
        ns: Namespace,
        tokens: &[u32],
        first_page: usize,
        pages: &[PageId],
        pinned: bool,
    ) {
        let Some(store) = &self.store else { return };
        if tokens.is_empty() || store.covers(ns, tokens) {
            return;
        }
        let ps = self.cfg.page_size;
        // Pages the disk already has, from the start, need not be written again.
        let on_disk = store.longest_match(ns, tokens, 0).tokens / ps;
        let first = first_page.max(on_disk.min(tokens.len().div_ceil(ps) - 1));
        let Some(bytes) = self.pages_bytes(&pages[first - first_page..]) else {
            return;
        };
        let store = self.store.as_mut().expect("checked");
        store.write(ns, tokens.to_vec(), first, bytes, pinned);
    }

    /// Write-through of a newly pinned prefix (and its registration).
    pub(super) fn persist_prefix(&mut self, id: PrefixId) {
        let Some(p) = self.prefixes.get(&id) else {
            return;
        };
        let (tenant, ns, tokens) = (p.tenant, p.ns, p.tokens.clone());
        self.export_prefix(ns, &tokens);
        let Some(store) = &self.store else { return };
        store.put_prefix(id.0, tenant, ns, tokens.clone());
        let m = self.tree.match_prefix(ns, &tokens);
        if m.matched_tokens == tokens.len() {
            self.persist_run(ns, &tokens, 0, &m.pages, true);
        }
    }

    /// Forgets a registration on disk and lets its records age out.
    pub(super) fn unpersist_prefix(&mut self, id: PrefixId, ns: Namespace, tokens: &[u32]) {
        if let Some(store) = &mut self.store {
            store.remove_prefix(id.0);
            store.unpin(ns, tokens);
        }
    }

    /// Write-back of evicted runs that were hit at least twice. Their pages were just released
    /// and are not reused before this returns, so their bytes are intact.
    pub(super) fn persist_evicted(&mut self, runs: Vec<EvictedRun>) {
        let ps = self.cfg.page_size;
        for run in runs.iter().filter(|r| r.hits >= WRITE_BACK_HITS) {
            self.export_evicted(run);
        }
        for run in runs.into_iter().filter(|r| r.hits >= WRITE_BACK_HITS) {
            self.persist_run(run.ns, &run.tokens, run.start / ps, &run.pages, false);
        }
    }

    /// If the cached match of waiting request `i` continues on disk beyond what is in memory,
    /// hands the reads to the disk reader and marks the request as loading (admission skips it
    /// until [`Scheduler::apply_disk_loads`] has put the pages in the tree); returns whether it
    /// did. Each request is looked up on disk once.
    pub(super) fn begin_disk_load(&mut self, i: usize) -> bool {
        let (Some(store), Some(reader)) = (&self.store, &self.reader) else {
            return false;
        };
        let r = &self.waiting[i];
        if !self.cfg.cache || r.disk_checked || r.tokens.is_empty() {
            return false;
        }
        let mut runs = Vec::new();
        let mut memory = 0;
        for ns in [Some(r.ns), r.published].into_iter().flatten() {
            let resident = self.tree.longest_prefix_len(ns, &r.tokens);
            memory = memory.max(resident);
            let m = store.longest_match(ns, &r.tokens, resident);
            if m.tokens <= resident || m.pages.is_empty() {
                continue;
            }
            let reads: std::result::Result<Vec<_>, _> = m
                .pages
                .iter()
                .map(|loc| store.plan_read(loc.record, loc.page))
                .collect();
            match reads {
                Ok(reads) => runs.push(RunLoad {
                    ns,
                    tokens: r.tokens[..m.tokens].to_vec(),
                    reads,
                }),
                Err(e) => tracing::warn!(error = %e, "a disk cache match cannot be read"),
            }
        }
        let id = r.id;
        let r = &mut self.waiting[i];
        r.disk_checked = true;
        if runs.is_empty() {
            return false;
        }
        if reader.jobs.send(DiskLoad { req: id, runs }).is_err() {
            tracing::error!("the disk reader thread is gone");
            return false;
        }
        r.loading = true;
        r.memory_match = Some(memory);
        true
    }

    /// Puts the runs the disk reader finished into fresh pool pages and the tree, and lets
    /// their requests be admitted. A failed read drops its record (logged); those tokens are
    /// computed instead.
    pub(super) fn apply_disk_loads(&mut self) {
        let Some(reader) = &self.reader else { return };
        let done: Vec<LoadedRun> = reader.done.try_iter().collect();
        for d in done {
            for (run, pages) in d.load.runs.iter().zip(d.pages) {
                self.apply_run(run, pages);
            }
            if let Some(r) = self.waiting.iter_mut().find(|r| r.id == d.load.req) {
                r.loading = false;
            }
        }
    }

    fn apply_run(&mut self, run: &RunLoad, pages: Vec<PageResult>) {
        let ns = run.ns;
        let mut bytes = Vec::with_capacity(pages.len());
        let mut records = Vec::new();
        for (read, result) in run.reads.iter().zip(pages) {
            let store = self.store.as_mut().expect("a reader implies a store");
            match result {
                Ok((b, took)) => {
                    store.finish_read(read.record, b.len(), took, None);
                    if records.last() != Some(&read.record) {
                        records.push(read.record);
                    }
                    bytes.push(b);
                }
                Err(why) => {
                    tracing::warn!(reason = %why, "a disk cache page could not be used");
                    store.finish_read(read.record, 0, Default::default(), Some(&why));
                    return;
                }
            }
        }
        let Some(first) = run.reads.first().map(|r| r.page as usize) else {
            return;
        };
        if bytes.len() != run.reads.len() {
            return;
        }
        if let Some(added) = self.insert_loaded(ns, &run.tokens, first, &bytes) {
            self.stats.disk_loaded_tokens += added as u64;
            let store = self.store.as_mut().expect("a reader implies a store");
            for r in records {
                store.touch(r);
            }
        }
        self.pin_restored(ns);
    }

    /// Puts pages loaded from a tier below memory into fresh pool pages and the tree: `bytes`
    /// holds pages `first..` of `tokens` (which ends where the last of them does, or inside
    /// it). Returns the tokens newly cached, or `None` when nothing was inserted: the part
    /// resident in memory no longer reaches page `first` or already covers `tokens`, the pool
    /// has no room, or writing the pages failed (logged).
    pub(super) fn insert_loaded(
        &mut self,
        ns: Namespace,
        tokens: &[u32],
        first: usize,
        bytes: &[Vec<u8>],
    ) -> Option<usize> {
        let ps = self.cfg.page_size;
        // The memory-resident part may have changed while the pages were read.
        let resident = self.tree.longest_prefix_len(ns, tokens);
        if resident < first * ps
            || resident >= tokens.len()
            || (first + bytes.len()) * ps < tokens.len()
        {
            return None;
        }
        // Keep the resident part from being evicted while pages are found.
        let held = self.tree.match_prefix(ns, tokens);
        if let Some(n) = held.last_node {
            self.tree.lock(n).expect("matched node is live");
        }
        let need = bytes.len();
        if self.tree.pool().free_count() < need {
            self.evict(need - self.tree.pool().free_count());
        }
        let mut added = None;
        if self.tree.pool().free_count() >= need {
            // Leases: the pages go back to the pool when this block ends, unless the tree
            // took its own references on them.
            let loaded: Vec<PageLease> = (0..need)
                .map(|_| self.tree.pool().lease_new().expect("checked above"))
                .collect();
            let written = {
                let mut exec = self.exec();
                loaded
                    .iter()
                    .zip(bytes)
                    .try_for_each(|(p, b)| exec.write_page(p.id().0, b))
            };
            match written {
                Ok(()) => {
                    let mut pages = held.pages[..first].to_vec();
                    pages.extend(loaded.iter().map(|l| l.id()));
                    pages.truncate(tokens.len().div_ceil(ps));
                    match self.tree.insert(ns, tokens, &pages) {
                        Ok(ins) => {
                            added = Some(tokens.len() - resident);
                            self.announce(
                                agentd_kvtier::events::EventKind::Stored,
                                ns,
                                tokens,
                                ins.already_cached / ps,
                            );
                        }
                        Err(e) => tracing::error!(error = %e, "inserting loaded pages failed"),
                    }
                }
                Err(e) => tracing::error!(error = %e, "writing loaded pages failed"),
            }
        }
        if let Some(n) = held.last_node {
            self.tree.unlock(n).expect("locked above");
        }
        added
    }

    /// Pins the restored registrations in `ns` whose tokens are now all resident (loaded from
    /// disk, or computed again by a request that included them).
    pub(super) fn pin_restored(&mut self, ns: Namespace) {
        if self.store.is_none() || self.prefixes.values().all(|p| p.pinned) {
            return;
        }
        let ready: Vec<PrefixId> = self
            .prefixes
            .iter()
            .filter(|(_, p)| {
                !p.pinned
                    && p.ns == ns
                    && self.tree.longest_prefix_len(ns, &p.tokens) == p.tokens.len()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if let Err(e) = self.pin_prefix(id) {
                tracing::warn!(error = %e, "pinning a restored prefix failed");
            }
        }
    }
}
