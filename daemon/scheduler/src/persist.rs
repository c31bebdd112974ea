//! The scheduler's side of the disk tier ([`agentd_store`]): write-through of pinned prefixes,
//! write-back of evicted runs that were hit at least twice, loading pages back when a request's
//! match continues on disk, and restoring registered prefixes at start.

use super::scheduler::{Prefix, Scheduler};
use super::types::*;
use crate::cache::{EvictedRun, Namespace, PageId};
use agentd_engine::{KvLayout, ModelDigests};
use agentd_store::format::{Fingerprint, FORMAT_VERSION};
use agentd_store::Store;

/// Evicted runs matched at least this often are written back to disk.
const WRITE_BACK_HITS: u64 = 2;

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
            self.bump_id_past(p.id);
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

    fn pages_bytes(&self, pages: &[PageId]) -> Option<Vec<u8>> {
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
        for run in runs.into_iter().filter(|r| r.hits >= WRITE_BACK_HITS) {
            self.persist_run(run.ns, &run.tokens, run.start / ps, &run.pages, false);
        }
    }

    /// Before matching `tokens`: where the match in `ns` continues on disk beyond what is in
    /// memory, reads those pages into fresh pool pages and inserts them into the tree. Any
    /// failure (damaged blob, no free page) leaves the tree as it was; the tokens are computed.
    pub(super) fn load_from_disk(&mut self, ns: Namespace, tokens: &[u32]) {
        if !self.cfg.cache || self.store.is_none() || tokens.is_empty() {
            return;
        }
        self.poll_store();
        let ps = self.cfg.page_size;
        let resident = self.tree.longest_prefix_len(ns, tokens);
        let store = self.store.as_ref().expect("checked");
        let m = store.longest_match(ns, tokens, resident);
        if m.tokens <= resident {
            return;
        }
        // Keep the resident part from being evicted while pages are found.
        let held = self.tree.match_prefix(ns, tokens);
        if let Some(n) = held.last_node {
            self.tree.lock(n).expect("matched node is live");
        }
        let need = m.pages.len();
        if self.tree.pool().free_count() < need {
            self.evict(need - self.tree.pool().free_count());
        }
        let mut loaded: Vec<PageId> = Vec::with_capacity(need);
        let mut buf = vec![0u8; self.exec().page_bytes()];
        let mut ok = self.tree.pool().free_count() >= need;
        let mut records = Vec::new();
        for loc in m.pages.iter().take_while(|_| ok) {
            let store = self.store.as_mut().expect("checked");
            if let Err(why) = store.read_page(loc.record, loc.page, &mut buf) {
                tracing::warn!(reason = %why, "a disk cache page could not be used");
                ok = false;
                break;
            }
            let page = self.tree.pool_mut().alloc().expect("reserved above");
            loaded.push(page);
            if let Err(e) = self.exec().write_page(page.0, &buf) {
                tracing::error!(error = %e, "writing a page loaded from disk failed");
                ok = false;
                break;
            }
            if records.last() != Some(&loc.record) {
                records.push(loc.record);
            }
        }
        if ok {
            let first = resident / ps;
            let mut pages = held.pages[..first].to_vec();
            pages.extend(&loaded);
            if let Err(e) = self.tree.insert(ns, &tokens[..m.tokens], &pages) {
                tracing::error!(error = %e, "inserting pages loaded from disk failed");
            } else {
                self.stats.disk_loaded_tokens += (m.tokens - resident) as u64;
            }
            let store = self.store.as_mut().expect("checked");
            for r in records {
                store.touch(r);
            }
        }
        for p in loaded {
            self.tree.pool_mut().release(p).expect("allocated above");
        }
        if let Some(n) = held.last_node {
            self.tree.unlock(n).expect("locked above");
        }
        self.pin_restored(ns);
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
