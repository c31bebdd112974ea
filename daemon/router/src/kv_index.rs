//! [`PrefixIndex`] over the shared tier's KV events: what each daemon announced it holds
//! (`agentd_kvtier::events::KvIndex`, kept current by an `IndexFollower` reading the Redis
//! Stream and the heartbeats). A prompt's page keys are computed as the daemon computes them:
//! under the fingerprint its heartbeat gives (model, tokenizer, template, KV dtype, page
//! layout) and the cache namespace the router chose from the caller's identity.

use crate::placement::{CacheNamespace, Cached, PrefixIndex};
use agentd_kvtier::events::{EventsConfig, IndexFollower, KvIndex};
use agentd_kvtier::{PageRun, RedisTierConfig, TierNamespace};
use agentd_store::Namespace;
use std::sync::{Arc, RwLock};

/// The KV-event index as placement's [`PrefixIndex`].
pub struct KvEventIndex {
    index: Arc<RwLock<KvIndex>>,
    /// Keeps the follower's thread running (stopped when dropped).
    _follower: Option<IndexFollower>,
}

impl KvEventIndex {
    /// Follows the KV events on the Redis Cluster reachable through `nodes` (`redis://` URLs).
    pub fn follow(nodes: Vec<String>) -> Result<Self, agentd_kvtier::TierError> {
        let follower = IndexFollower::start(EventsConfig::new(RedisTierConfig::new(nodes)))?;
        Ok(Self {
            index: follower.index(),
            _follower: Some(follower),
        })
    }

    /// Over an index kept by someone else (tests).
    pub fn over(index: Arc<RwLock<KvIndex>>) -> Self {
        Self {
            index,
            _follower: None,
        }
    }
}

impl PrefixIndex for KvEventIndex {
    fn cached(&self, node: u8, ns: CacheNamespace, tokens: &[u32]) -> Cached {
        self.cached_all(&[node], ns, tokens)[0]
    }

    /// The prompt's page keys are hashed once per distinct fingerprint (once, when the daemons
    /// run the same model the same way), outside the index's lock.
    fn cached_all(&self, nodes: &[u8], ns: CacheNamespace, tokens: &[u32]) -> Vec<Cached> {
        let ns = match ns {
            CacheNamespace::Tenant(t) => Namespace::Tenant(t),
            CacheNamespace::Published(p) => Namespace::Published(p),
        };
        // A node without a heartbeat is not known to hold anything.
        let fingerprints: Vec<_> = match self.index.read() {
            Ok(index) => nodes
                .iter()
                .map(|&n| index.fingerprint(n).cloned())
                .collect(),
            Err(_) => return vec![Cached::default(); nodes.len()],
        };
        let mut runs: Vec<(agentd_store::format::Fingerprint, PageRun, usize)> = Vec::new();
        for fp in fingerprints.iter().flatten() {
            if !runs.iter().any(|(f, _, _)| f == fp) {
                let tier_ns = TierNamespace::new(fp.clone(), ns);
                runs.push((
                    fp.clone(),
                    PageRun::new(&tier_ns, tokens),
                    tier_ns.page_size(),
                ));
            }
        }
        let Ok(index) = self.index.read() else {
            return vec![Cached::default(); nodes.len()];
        };
        nodes
            .iter()
            .zip(&fingerprints)
            .map(|(&node, fp)| {
                let Some((_, run, page)) = fp
                    .as_ref()
                    .and_then(|fp| runs.iter().find(|(f, _, _)| f == fp))
                else {
                    return Cached::default();
                };
                let local = index.matched_pages(node, run.keys());
                let anywhere = index.held_anywhere(run.keys()).max(local);
                Cached {
                    local: local * page,
                    anywhere: anywhere * page,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_kvtier::events::{EventKind, Heartbeat, KvEvent};
    use agentd_store::format::Fingerprint;

    fn fingerprint() -> Fingerprint {
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

    #[test]
    fn a_node_announcing_a_prompts_pages_holds_them_and_the_others_can_load_them() {
        let mut index = KvIndex::new();
        for node in [1, 2] {
            let hb = Heartbeat {
                node,
                epoch: 10,
                fingerprint: fingerprint(),
            };
            index.heartbeat(node, Some(&hb));
        }
        let tokens: Vec<u32> = (0..50).collect();
        let ns = TierNamespace::new(fingerprint(), Namespace::Tenant(7));
        let run = PageRun::new(&ns, &tokens[..32]);
        index.apply(&KvEvent {
            node: 1,
            epoch: 10,
            kind: EventKind::Stored,
            keys: run.keys().iter().map(|k| *k.hash()).collect(),
        });
        let idx = KvEventIndex::over(Arc::new(RwLock::new(index)));
        let t7 = CacheNamespace::Tenant(7);
        assert_eq!(
            idx.cached(1, t7, &tokens),
            Cached {
                local: 32,
                anywhere: 32
            }
        );
        assert_eq!(
            idx.cached(2, t7, &tokens),
            Cached {
                local: 0,
                anywhere: 32
            }
        );
        // Another tenant's namespace, or a node without a heartbeat, holds nothing.
        assert_eq!(
            idx.cached(1, CacheNamespace::Tenant(8), &tokens),
            Cached::default()
        );
        assert_eq!(idx.cached(3, t7, &tokens), Cached::default());
    }
}
