//! Operator actions on prefixes: list every tenant's, publish one to every tenant (sharing its
//! pages, not recomputing them), unpin any, and evict the unpinned cache. The service decides who
//! is an operator; these functions trust their caller.

use super::scheduler::{Prefix, PrefixReply, Scheduler};
use super::types::*;
use crate::cache::Namespace;

/// One registered prefix, as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PrefixEntry {
    /// Its id.
    pub id: PrefixId,
    /// The tenant that registered it.
    pub tenant: TenantId,
    /// Its length in tokens.
    pub tokens: usize,
    /// Whether its KV is pinned (never evicted).
    pub pinned: bool,
    /// Whether every tenant may start sessions from it.
    pub published: bool,
    /// How many of its tokens have KV in the pool right now.
    pub resident_tokens: usize,
}

impl Scheduler {
    /// The prefixes `tenant` may use (its own and the published ones), or with `None` every
    /// prefix of every tenant; by id.
    pub fn list_prefixes(&self, tenant: Option<TenantId>) -> Vec<PrefixEntry> {
        let mut out: Vec<PrefixEntry> = self
            .prefixes
            .iter()
            .filter(|(_, p)| {
                tenant.is_none_or(|t| p.tenant == t || matches!(p.ns, Namespace::Published(_)))
            })
            .map(|(&id, p)| PrefixEntry {
                id,
                tenant: p.tenant,
                tokens: p.tokens.len(),
                pinned: p.pinned,
                published: matches!(p.ns, Namespace::Published(_)),
                resident_tokens: if self.cfg.cache {
                    self.tree.longest_prefix_len(p.ns, &p.tokens)
                } else {
                    0
                },
            })
            .collect();
        out.sort_by_key(|e| e.id.0);
        out
    }

    /// Publishes a copy of prefix `id` (any tenant's) that every tenant may start sessions from;
    /// `reply` gets the new prefix. When the source's KV is resident its pages are shared with
    /// the published copy (nothing is recomputed); otherwise the copy is computed like a new
    /// registration.
    pub fn publish_prefix(&mut self, id: PrefixId, reply: PrefixReply) {
        let Some(src) = self.prefixes.get(&id) else {
            return reply(Err(SchedError::UnknownPrefix(id.0)));
        };
        if matches!(src.ns, Namespace::Published(_)) {
            return reply(Ok(super::PrefixInfo {
                id,
                tokens: src.tokens.len(),
            }));
        }
        let (tenant, tokens, src_ns) = (src.tenant, src.tokens.clone(), src.ns);
        let resident =
            self.cfg.cache && self.tree.longest_prefix_len(src_ns, &tokens) == tokens.len();
        if !resident {
            return self.register_prefix(tenant, tokens, true, reply);
        }
        let m = self.tree.match_prefix(src_ns, &tokens);
        let pages = m.pages[..tokens.len().div_ceil(self.cfg.page_size)].to_vec();
        let new_id = PrefixId(self.fresh_id());
        let ns = Namespace::Published(super::ids::published_namespace(&tokens));
        match self.tree.insert(ns, &tokens, &pages) {
            Ok(ins) => self.announce(
                agentd_kvtier::events::EventKind::Stored,
                ns,
                &tokens,
                ins.already_cached / self.cfg.page_size,
            ),
            Err(e) => return reply(Err(e.into())),
        }
        let len = tokens.len();
        self.prefixes.insert(
            new_id,
            Prefix {
                tenant,
                ns,
                tokens,
                pinned: false,
            },
        );
        reply(self.pin_prefix(new_id).map(|()| super::PrefixInfo {
            id: new_id,
            tokens: len,
        }))
    }

    /// Unpins and forgets prefix `id` of any tenant, published or not (its KV becomes ordinary
    /// cache; sessions created from it keep their tokens).
    pub fn unpin_prefix(&mut self, id: PrefixId) -> Result<()> {
        let p = self
            .prefixes
            .remove(&id)
            .ok_or(SchedError::UnknownPrefix(id.0))?;
        self.unpersist_prefix(id, p.ns, &p.tokens);
        if p.pinned {
            self.tree.unpin(p.ns, &p.tokens)?;
        }
        Ok(())
    }

    /// Evicts unpinned cache not in use: up to `pages` pages, or all of it with `None`.
    /// Returns the pages freed.
    pub fn evict_cache(&mut self, pages: Option<usize>) -> usize {
        let before = self.stats.evicted_pages;
        self.evict(pages.unwrap_or(usize::MAX));
        (self.stats.evicted_pages - before) as usize
    }
}
