//! [`MemoryTier`]: the tier as a map in this process, for tests of the tier's callers. It keeps
//! values in the same encoded form, under the same keys, as [`crate::RedisTier`], so a test can
//! damage one, evict one mid-chain or make the tier unavailable and watch the caller cope.

use crate::{check_call, finish_get, value, Count, Counters, KvTier, PageKey, PageResult};
use crate::{PageRun, Result, TierError, TierNamespace, TierStats};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

const NAME: &str = "memory";

#[derive(Debug, Default)]
struct Inner {
    values: HashMap<String, Vec<u8>>,
    /// Keys in insertion order (with stale entries for removed keys), for eviction.
    order: VecDeque<String>,
}

/// An in-memory tier with an optional capacity in pages: past it, the oldest page stored is
/// evicted, as Redis would under `maxmemory`.
#[derive(Debug)]
pub struct MemoryTier {
    inner: Mutex<Inner>,
    capacity: Option<usize>,
    available: AtomicBool,
    counters: Counters,
}

impl Default for MemoryTier {
    fn default() -> Self {
        Self::new(None)
    }
}

impl MemoryTier {
    /// An empty tier holding at most `capacity` pages (`None`: no bound).
    pub fn new(capacity: Option<usize>) -> Self {
        Self {
            inner: Mutex::default(),
            capacity,
            available: AtomicBool::new(true),
            counters: Counters::default(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent whatever panicked while it was held.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_available(&self, op: &'static str) -> Result<()> {
        if self.available.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.counters.add(Count::Failure);
        Err(TierError::Unavailable {
            tier: NAME,
            op,
            detail: "made unavailable by the test".into(),
        })
    }

    /// Makes every call fail as [`TierError::Unavailable`] (`false`) or work again (`true`), as
    /// a Redis that goes away and comes back.
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::Relaxed);
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.inner().values.len()
    }

    /// True when no page is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the tier holds `key`.
    pub fn contains(&self, key: &PageKey) -> bool {
        self.inner().values.contains_key(&key.redis_key())
    }

    /// Drops a page as an eviction would (not counted as a removal).
    pub fn evict(&self, key: &PageKey) -> bool {
        self.inner().values.remove(&key.redis_key()).is_some()
    }

    /// The stored value of `key`, as encoded.
    pub fn raw(&self, key: &PageKey) -> Option<Vec<u8>> {
        self.inner().values.get(&key.redis_key()).cloned()
    }

    /// Replaces the stored value of `key` with anything (to test damaged values).
    pub fn set_raw(&self, key: &PageKey, raw: Vec<u8>) {
        self.store(key.redis_key(), raw);
    }

    fn store(&self, k: String, v: Vec<u8>) {
        let mut inner = self.inner();
        if inner.values.insert(k.clone(), v).is_none() {
            inner.order.push_back(k);
        }
        while let Some(cap) = self.capacity {
            if inner.values.len() <= cap {
                break;
            }
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.values.remove(&oldest);
        }
        // Stale order entries (removed keys) are dropped once they outnumber the live ones.
        if inner.order.len() > 2 * inner.values.len() + 16 {
            let Inner { values, order } = &mut *inner;
            order.retain(|k| values.contains_key(k));
        }
    }
}

impl KvTier for MemoryTier {
    fn name(&self) -> &'static str {
        NAME
    }

    fn lookup(&self, ns: &TierNamespace, run: &PageRun, from: usize) -> Result<usize> {
        self.check_available("lookup")?;
        if !run.belongs_to(ns) {
            return check_call(NAME, ns, run, 0, None).map(|()| 0);
        }
        let inner = self.inner();
        let n = run
            .keys()
            .iter()
            .skip(from)
            .take_while(|k| inner.values.contains_key(&k.redis_key()))
            .count();
        self.counters.add(Count::Lookup { pages: n });
        Ok(n)
    }

    fn get(&self, ns: &TierNamespace, run: &PageRun, page: usize) -> PageResult {
        self.check_available("get")?;
        check_call(NAME, ns, run, page, None)?;
        let k = run.keys()[page].redis_key();
        let raw = self.inner().values.get(&k).cloned();
        let r = finish_get(NAME, &self.counters, ns, run, page, raw);
        if r.is_err() {
            self.inner().values.remove(&k);
        }
        r
    }

    fn put(&self, ns: &TierNamespace, run: &PageRun, page: usize, bytes: &[u8]) -> Result<()> {
        self.check_available("put")?;
        check_call(NAME, ns, run, page, Some(bytes))?;
        let v = value::encode(ns, run, page, bytes);
        self.counters.add(Count::Put { bytes: v.len() });
        self.store(run.keys()[page].redis_key(), v);
        Ok(())
    }

    fn remove(&self, _ns: &TierNamespace, key: &PageKey) -> Result<()> {
        self.check_available("remove")?;
        if self.inner().values.remove(&key.redis_key()).is_some() {
            self.counters.add(Count::Remove);
        }
        Ok(())
    }

    fn stats(&self) -> TierStats {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::ns;
    use crate::ValueError;

    fn page(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 7 + j) as u8).collect()
    }

    /// Stores every page of `tokens` for tenant 1; returns the namespace and the run.
    fn filled(tier: &MemoryTier, tokens: &[u32]) -> (TierNamespace, PageRun) {
        let n = ns(1);
        let run = PageRun::new(&n, tokens);
        for i in 0..run.len() {
            tier.put(&n, &run, i, &page(i, n.page_bytes())).unwrap();
        }
        (n, run)
    }

    #[test]
    fn a_stored_run_is_found_and_served_in_full() {
        let tier = MemoryTier::default();
        let tokens: Vec<u32> = (0..100).collect();
        let (n, run) = filled(&tier, &tokens);
        assert_eq!(run.len(), 6);
        assert_eq!(tier.lookup(&n, &run, 0).unwrap(), 6);
        assert_eq!(tier.lookup(&n, &run, 4).unwrap(), 2);
        let got = tier.get_many(&n, &run, 0..6);
        assert_eq!(got.len(), 6);
        assert_eq!(
            tier.get_many(&n, &run, 4..20).len(),
            2,
            "clamped to the run"
        );
        assert_eq!(tier.get_many(&n, &run, 4..usize::MAX).len(), 2);
        for (i, g) in got.into_iter().enumerate() {
            assert_eq!(g.unwrap(), Some(page(i, n.page_bytes())));
        }
        // A longer sequence with the same start finds the shared pages only.
        let mut longer = tokens.clone();
        longer.extend(500..600);
        let run2 = PageRun::new(&n, &longer);
        assert_eq!(tier.lookup(&n, &run2, 0).unwrap(), 6);
        let s = tier.stats();
        assert_eq!((s.puts, s.hits, s.lookups), (6, 10, 3));
    }

    #[test]
    fn a_page_evicted_mid_chain_gives_a_partial_run() {
        let tier = MemoryTier::default();
        let (n, run) = filled(&tier, &(0..160).collect::<Vec<u32>>());
        assert!(tier.evict(&run.keys()[4]));
        assert_eq!(tier.lookup(&n, &run, 0).unwrap(), 4);
        assert_eq!(tier.lookup(&n, &run, 5).unwrap(), 5);
        let got = tier.get_many(&n, &run, 0..10);
        assert_eq!(got.len(), 5, "reading stops at the missing page");
        assert!(matches!(got[4], Ok(None)));
    }

    #[test]
    fn capacity_evicts_the_oldest_pages() {
        let tier = MemoryTier::new(Some(3));
        let (n, run) = filled(&tier, &(0..80).collect::<Vec<u32>>());
        assert_eq!(tier.len(), 3);
        assert_eq!(tier.lookup(&n, &run, 0).unwrap(), 0);
        assert_eq!(tier.lookup(&n, &run, 2).unwrap(), 3);
    }

    #[test]
    fn a_corrupted_value_is_rejected_and_deleted() {
        let tier = MemoryTier::default();
        let (n, run) = filled(&tier, &(0..64).collect::<Vec<u32>>());
        let k = run.keys()[2];
        let mut raw = tier.raw(&k).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x10;
        tier.set_raw(&k, raw);
        match tier.get(&n, &run, 2) {
            Err(TierError::Damaged { page: 2, why, .. }) => assert_eq!(why, ValueError::Checksum),
            other => panic!("served a damaged page: {other:?}"),
        }
        assert!(!tier.contains(&k), "the damaged value is deleted");
        assert_eq!(tier.lookup(&n, &run, 0).unwrap(), 2);
        assert_eq!(tier.stats().rejected, 1);
    }

    #[test]
    fn wrong_tokens_or_another_tenant_are_never_served() {
        let tier = MemoryTier::default();
        let tokens: Vec<u32> = (0..64).collect();
        let (n, run) = filled(&tier, &tokens);
        // Page 1's value stored under page 2's key: the tokens differ.
        tier.set_raw(&run.keys()[2], tier.raw(&run.keys()[1]).unwrap());
        assert!(matches!(
            tier.get(&n, &run, 2),
            Err(TierError::Damaged {
                why: ValueError::Tokens,
                ..
            })
        ));
        // Another tenant's run of the same tokens has other keys: nothing found.
        let other = ns(2);
        let run2 = PageRun::new(&other, &tokens);
        assert_eq!(tier.lookup(&other, &run2, 0).unwrap(), 0);
        // A run cut for tenant 1 asked about under tenant 2 is refused, not served.
        assert!(matches!(
            tier.get(&other, &run, 0),
            Err(TierError::Invalid { .. })
        ));
        assert!(tier.lookup(&other, &run, 0).is_err());
        // Tenant 1's value copied under tenant 2's key is rejected.
        tier.set_raw(&run2.keys()[0], tier.raw(&run.keys()[0]).unwrap());
        assert!(matches!(
            tier.get(&other, &run2, 0),
            Err(TierError::Damaged {
                why: ValueError::Namespace,
                ..
            })
        ));
    }

    #[test]
    fn bad_calls_are_errors_not_panics() {
        let tier = MemoryTier::default();
        let n = ns(1);
        let run = PageRun::new(&n, &(0..20).collect::<Vec<u32>>());
        assert!(tier.put(&n, &run, 0, &[1, 2, 3]).is_err(), "not one page");
        assert!(
            tier.put(&n, &run, 1, &page(0, n.page_bytes())).is_err(),
            "past the run"
        );
        assert!(tier.get(&n, &run, 5).is_err());
        let empty = PageRun::new(&n, &[1, 2]);
        assert!(empty.is_empty());
        assert_eq!(tier.lookup(&n, &empty, 0).unwrap(), 0);
        assert!(tier.get_many(&n, &empty, 0..3)[0].is_err());
    }

    #[test]
    fn an_unavailable_tier_fails_every_call_and_comes_back() {
        let tier = MemoryTier::default();
        let (n, run) = filled(&tier, &(0..32).collect::<Vec<u32>>());
        tier.set_available(false);
        assert!(matches!(
            tier.lookup(&n, &run, 0),
            Err(TierError::Unavailable { .. })
        ));
        assert!(tier.get(&n, &run, 0).is_err());
        assert!(tier.put(&n, &run, 0, &page(0, n.page_bytes())).is_err());
        tier.set_available(true);
        assert_eq!(tier.lookup(&n, &run, 0).unwrap(), 2);
        assert_eq!(tier.stats().failures, 3);
    }
}
