//! Calls that go to every live daemon: Stats (the replies summed) and EvictCache.

use crate::service::{forward, RouterService};
use agentd_service::access::Caller;
use agentd_wire::proto;
use std::collections::BTreeMap;
use tonic::{Code, Status};

impl RouterService {
    /// Stats from every live daemon, summed ([`sum_stats`]), as the caller.
    pub(crate) async fn stats_all(
        &self,
        caller: &Caller,
        r: proto::StatsRequest,
    ) -> Result<proto::StatsReply, Status> {
        let mut replies = Vec::new();
        for b in self.backends.live() {
            match b
                .client()
                .stats(forward(caller, r))
                .await
                .map_err(|s| b.status(s))
            {
                Ok(s) => replies.push(s.into_inner()),
                Err(s) if s.code() == Code::Unavailable => {}
                Err(s) => return Err(s),
            }
        }
        if replies.is_empty() {
            return Err(self.none_up());
        }
        Ok(sum_stats(replies))
    }

    /// EvictCache on every live daemon; the pages freed summed.
    pub(crate) async fn evict_all(
        &self,
        caller: &Caller,
        r: proto::EvictCacheRequest,
    ) -> Result<proto::EvictCacheReply, Status> {
        let mut freed = 0u32;
        let mut any = false;
        for b in self.backends.live() {
            match b
                .client()
                .evict_cache(forward(caller, r))
                .await
                .map_err(|s| b.status(s))
            {
                Ok(e) => {
                    any = true;
                    freed = freed.saturating_add(e.into_inner().freed_pages);
                }
                Err(s) if s.code() == Code::Unavailable => {}
                Err(s) => return Err(s),
            }
        }
        if !any {
            return Err(self.none_up());
        }
        Ok(proto::EvictCacheReply { freed_pages: freed })
    }
}

/// Element-wise sum of two per-position counters.
fn add_vec(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// Several daemons' Stats as one: counts and pages summed, per-tenant counters merged by
/// tenant, the page shape from the first, the hit rate averaged weighted by each daemon's
/// prompt tokens.
pub fn sum_stats(replies: Vec<proto::StatsReply>) -> proto::StatsReply {
    let mut it = replies.into_iter();
    let Some(mut t) = it.next() else {
        return proto::StatsReply::default();
    };
    let weight = |s: &proto::StatsReply| (s.prefill_tokens + s.cached_tokens) as f64;
    let (mut hits, mut weights, mut n, mut plain) =
        (t.hit_rate * weight(&t), weight(&t), 1.0, t.hit_rate);
    let mut tenants: BTreeMap<u64, proto::TenantStats> = BTreeMap::new();
    let mut merge = |list: Vec<proto::TenantStats>| {
        for s in list {
            let e = tenants.entry(s.tenant).or_insert(proto::TenantStats {
                tenant: s.tenant,
                ..Default::default()
            });
            e.sessions += s.sessions;
            e.running += s.running;
            e.waiting += s.waiting;
            e.prefill_tokens += s.prefill_tokens;
            e.cached_tokens += s.cached_tokens;
            e.generated_tokens += s.generated_tokens;
        }
    };
    merge(std::mem::take(&mut t.tenants));
    for s in it {
        hits += s.hit_rate * weight(&s);
        weights += weight(&s);
        plain += s.hit_rate;
        n += 1.0;
        t.pool_pages += s.pool_pages;
        t.free_pages += s.free_pages;
        t.peak_pages += s.peak_pages;
        t.tree_tokens += s.tree_tokens;
        t.steps += s.steps;
        t.preemptions += s.preemptions;
        t.sessions += s.sessions;
        t.running += s.running;
        t.waiting += s.waiting;
        t.prefill_tokens += s.prefill_tokens;
        t.cached_tokens += s.cached_tokens;
        t.generated_tokens += s.generated_tokens;
        merge(s.tenants);
        t.disk_records += s.disk_records;
        t.disk_bytes += s.disk_bytes;
        t.disk_budget += s.disk_budget;
        t.disk_loaded_tokens += s.disk_loaded_tokens;
        add_vec(&mut t.expert_load_last_step, &s.expert_load_last_step);
        add_vec(&mut t.expert_load_total, &s.expert_load_total);
        t.spec_drafted += s.spec_drafted;
        t.spec_accepted += s.spec_accepted;
        add_vec(&mut t.spec_drafted_at, &s.spec_drafted_at);
        add_vec(&mut t.spec_accepted_at, &s.spec_accepted_at);
        t.spec_model_drafted += s.spec_model_drafted;
        t.spec_model_accepted += s.spec_model_accepted;
        t.shared_tier = match (t.shared_tier.take(), s.shared_tier) {
            (Some(a), Some(b)) => Some(proto::SharedTierStats {
                exported_pages: a.exported_pages + b.exported_pages,
                export_dropped_pages: a.export_dropped_pages + b.export_dropped_pages,
                export_failed_pages: a.export_failed_pages + b.export_failed_pages,
                lookups: a.lookups + b.lookups,
                lookup_pages: a.lookup_pages + b.lookup_pages,
                hit_pages: a.hit_pages + b.hit_pages,
                damaged_pages: a.damaged_pages + b.damaged_pages,
                failures: a.failures + b.failures,
                loaded_tokens: a.loaded_tokens + b.loaded_tokens,
            }),
            (a, b) => a.or(b),
        };
    }
    t.hit_rate = if weights > 0.0 {
        hits / weights
    } else {
        plain / n
    };
    t.tenants = tenants.into_values().collect();
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_summed_and_tenants_merged() {
        let a = proto::StatsReply {
            pool_pages: 10,
            page_size: 16,
            sessions: 2,
            prefill_tokens: 30,
            cached_tokens: 10,
            hit_rate: 0.25,
            tenants: vec![proto::TenantStats {
                tenant: 1,
                sessions: 2,
                ..Default::default()
            }],
            spec_drafted_at: vec![1, 2],
            ..Default::default()
        };
        let b = proto::StatsReply {
            pool_pages: 20,
            page_size: 16,
            sessions: 3,
            prefill_tokens: 0,
            cached_tokens: 40,
            hit_rate: 1.0,
            tenants: vec![
                proto::TenantStats {
                    tenant: 1,
                    sessions: 1,
                    ..Default::default()
                },
                proto::TenantStats {
                    tenant: 2,
                    sessions: 5,
                    ..Default::default()
                },
            ],
            spec_drafted_at: vec![1, 1, 1],
            ..Default::default()
        };
        let s = sum_stats(vec![a, b]);
        assert_eq!((s.pool_pages, s.page_size, s.sessions), (30, 16, 5));
        assert_eq!(s.spec_drafted_at, vec![2, 3, 1]);
        assert!((s.hit_rate - 50.0 / 80.0).abs() < 1e-9, "{}", s.hit_rate);
        let t: Vec<(u64, u32)> = s.tenants.iter().map(|t| (t.tenant, t.sessions)).collect();
        assert_eq!(t, vec![(1, 3), (2, 5)]);
        assert_eq!(sum_stats(vec![]), proto::StatsReply::default());
    }
}
