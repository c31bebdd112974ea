//! The router's prefixes: a registered prefix gets a router-wide id, and the router remembers
//! whose it is, whether it is published, its tokens, and its id on each daemon it was
//! registered on. A session from a prefix placed on a daemon that lacks it gets it registered
//! there first, from the tokens (that daemon loads the KV from the shared tier when it can).

use agentd_scheduler::TenantId;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// One registered prefix.
#[derive(Debug)]
pub struct Prefix {
    /// The router's id for it (what clients see).
    pub id: u64,
    /// The tenant that registered it.
    pub tenant: TenantId,
    /// Whether every tenant may use it.
    pub published: bool,
    /// Its tokens.
    pub tokens: Vec<u32>,
    /// Node → the prefix's id on that daemon. The lock is held while registering on a daemon,
    /// so one prefix is registered at most once per daemon.
    pub on: tokio::sync::Mutex<BTreeMap<u8, u64>>,
}

impl Prefix {
    /// Whether `tenant` may use it (its own, or published).
    pub fn visible_to(&self, tenant: TenantId) -> bool {
        self.published || self.tenant == tenant
    }

    /// The nodes it is registered on now (without waiting for a registration in flight).
    pub fn nodes(&self) -> Vec<u8> {
        self.on
            .try_lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// Every prefix registered through the router.
#[derive(Debug, Default)]
pub struct Registry {
    prefixes: Mutex<HashMap<u64, Arc<Prefix>>>,
}

impl Registry {
    /// Records a prefix registered on `node` as `daemon_id`; returns it with its new router id
    /// (random, 63 bits, never 0).
    pub fn insert(
        &self,
        tenant: TenantId,
        published: bool,
        tokens: Vec<u32>,
        on: BTreeMap<u8, u64>,
    ) -> Arc<Prefix> {
        let mut map = self.prefixes.lock().expect("registry lock");
        let id = loop {
            let id = (rand::random::<u64>() >> 1).max(1);
            if !map.contains_key(&id) {
                break id;
            }
        };
        let p = Arc::new(Prefix {
            id,
            tenant,
            published,
            tokens,
            on: tokio::sync::Mutex::new(on),
        });
        map.insert(id, p.clone());
        p
    }

    /// The prefix `id`, if `tenant` may use it (NOT_FOUND otherwise, as for an id that never
    /// existed); any prefix for an operator acting on all tenants (`any`).
    pub fn get(&self, id: u64, tenant: TenantId, any: bool) -> Option<Arc<Prefix>> {
        let map = self.prefixes.lock().expect("registry lock");
        map.get(&id)
            .filter(|p| any || p.visible_to(tenant))
            .cloned()
    }

    /// Forgets the prefix `id`.
    pub fn remove(&self, id: u64) -> Option<Arc<Prefix>> {
        self.prefixes.lock().expect("registry lock").remove(&id)
    }

    /// Every prefix `tenant` may use (every prefix with `all`), by id.
    pub fn list(&self, tenant: TenantId, all: bool) -> Vec<Arc<Prefix>> {
        let map = self.prefixes.lock().expect("registry lock");
        let mut v: Vec<_> = map
            .values()
            .filter(|p| all || p.visible_to(tenant))
            .cloned()
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_sees_its_own_and_published_prefixes_only() {
        let r = Registry::default();
        let a = r.insert(1, false, vec![1, 2], [(1, 100)].into());
        let b = r.insert(2, false, vec![3], [(2, 200)].into());
        let p = r.insert(2, true, vec![4], [(2, 300)].into());
        assert!(r.get(a.id, 1, false).is_some());
        assert!(r.get(b.id, 1, false).is_none());
        assert!(r.get(b.id, 1, true).is_some());
        assert!(r.get(p.id, 1, false).is_some());
        let ids: Vec<u64> = r.list(1, false).iter().map(|p| p.id).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&a.id) && ids.contains(&p.id));
        assert_eq!(r.list(1, true).len(), 3);
        assert_eq!(a.nodes(), vec![1]);
        assert!(r.remove(a.id).is_some());
        assert!(r.get(a.id, 1, false).is_none());
        assert!(a.id != 0 && a.id >> 63 == 0);
    }
}
