//! The shared tier through the scheduler on the fake executor: pages one scheduler exports are
//! loaded by another and give the tokens a recompute gives; other tenants never see them; a
//! damaged or unavailable tier costs only recomputation.

use super::tests::{fake, greedy, page_bytes, random_tokens, run_to_end, VOCAB};
use super::*;
use agentd_engine::ModelDigests;
use agentd_kvtier::{KvTier, MemoryTier, PageRun, TierNamespace};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn digests() -> ModelDigests {
    ModelDigests {
        model_sha256: "fake-model".into(),
        tokenizer_digest: "fake-tokenizer".into(),
        template_digest: "fake-template".into(),
    }
}

/// A scheduler on the fake executor sharing `tier`.
fn spawn(tier: &Arc<MemoryTier>) -> SchedulerHandle {
    let cfg = SchedulerConfig {
        kv_memory: 64 * page_bytes(16),
        shared: Some(SharedTierConfig {
            tier: tier.clone(),
            digests: digests(),
            events: None,
            export_queue: 8,
        }),
        ..Default::default()
    };
    SchedulerHandle::spawn(fake(VOCAB), cfg).unwrap()
}

/// Waits until the scheduler's exporter has stored at least `pages` pages.
async fn exported(h: &SchedulerHandle, pages: u64) -> SharedTierStats {
    let start = Instant::now();
    loop {
        let s = h.stats().await.unwrap().shared_tier.unwrap();
        if s.exported_pages >= pages {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The tier's run for `tokens` in tenant `t`'s namespace, as a scheduler at the default page
/// size cuts it.
fn run_of(tokens: &[u32], t: TenantId) -> PageRun {
    let mut e = fake(VOCAB);
    e.allocate(4, 16).unwrap();
    let fp = fingerprint(&digests(), &e.layout());
    let ns = TierNamespace::new(fp, crate::cache::Namespace::Tenant(t));
    PageRun::new(&ns, tokens)
}

/// A prefix pinned on one scheduler is exported; a session with the same prompt on another
/// loads it (reported as tier-cached tokens) and generates exactly the reference tokens; another
/// tenant's identical prompt finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_prefix_is_shared_with_another_scheduler_of_the_same_tenant_only() {
    let tier = Arc::new(MemoryTier::default());
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let prefix = random_tokens(&mut rng, 100); // 6 whole pages of 16, and 4 tokens
    let a = spawn(&tier);
    a.register_prefix(1, prefix.clone(), false).await.unwrap();
    let s = exported(&a, 6).await;
    assert_eq!(s.exported_pages, 6, "whole pages only: {s:?}");

    let b = spawn(&tier);
    let mut prompt = prefix.clone();
    prompt.extend(random_tokens(&mut rng, 20));
    let sid = b.create_session(1, None, prompt.clone()).await.unwrap();
    let (_, usage) = run_to_end(&b, 1, sid, greedy(6)).await;
    assert_eq!(usage.tier_cached_tokens, 96, "{usage:?}");
    assert_eq!(usage.cached_tokens, 96, "{usage:?}");
    let stats = b.stats().await.unwrap().shared_tier.unwrap();
    assert_eq!((stats.hit_pages, stats.loaded_tokens), (6, 96), "{stats:?}");

    let sid = b.create_session(2, None, prompt.clone()).await.unwrap();
    let (_, usage) = run_to_end(&b, 2, sid, greedy(6)).await;
    assert_eq!(
        (usage.cached_tokens, usage.tier_cached_tokens),
        (0, 0),
        "another tenant: {usage:?}"
    );
    b.check_invariants().await.unwrap().unwrap();
    a.check_invariants().await.unwrap().unwrap();
}

/// Evicted runs hit twice are written back to the tier too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_runs_hit_twice_are_exported() {
    let tier = Arc::new(MemoryTier::default());
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let hot = random_tokens(&mut rng, 70);
    let a = spawn(&tier);
    for _ in 0..3 {
        let sid = a.create_session(1, None, hot.clone()).await.unwrap();
        run_to_end(&a, 1, sid, greedy(4)).await;
    }
    assert!(a.evict_cache(None).await.unwrap() > 0);
    exported(&a, 4).await;

    let b = spawn(&tier);
    let sid = b.create_session(1, None, hot.clone()).await.unwrap();
    let (_, usage) = run_to_end(&b, 1, sid, greedy(4)).await;
    assert_eq!(usage.tier_cached_tokens, 64, "{usage:?}");
}

/// A damaged value ends the run it is in: the pages before it are loaded, the rest computed,
/// and the output is the reference's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_page_is_recomputed_and_the_pages_before_it_are_used() {
    let tier = Arc::new(MemoryTier::default());
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let prefix = random_tokens(&mut rng, 80);
    let a = spawn(&tier);
    a.register_prefix(1, prefix.clone(), false).await.unwrap();
    exported(&a, 5).await;
    let run = run_of(&prefix, 1);
    let key = *run.key(3).unwrap();
    let mut raw = tier.raw(&key).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 0x40;
    tier.set_raw(&key, raw);

    let b = spawn(&tier);
    let sid = b.create_session(1, None, prefix.clone()).await.unwrap();
    let (_, usage) = run_to_end(&b, 1, sid, greedy(6)).await;
    assert_eq!(usage.tier_cached_tokens, 48, "{usage:?}");
    let stats = b.stats().await.unwrap().shared_tier.unwrap();
    assert_eq!(stats.damaged_pages, 1, "{stats:?}");
    assert!(!tier.contains(&key), "a damaged value is deleted");
    b.check_invariants().await.unwrap().unwrap();
}

/// A tier that is down never fails a request: it is computed, and the failures are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_tier_costs_only_recomputation() {
    let tier = Arc::new(MemoryTier::default());
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let prefix = random_tokens(&mut rng, 80);
    let a = spawn(&tier);
    a.register_prefix(1, prefix.clone(), false).await.unwrap();
    exported(&a, 5).await;
    tier.set_available(false);

    let b = spawn(&tier);
    let sid = b.create_session(1, None, prefix.clone()).await.unwrap();
    let (_, usage) = run_to_end(&b, 1, sid, greedy(6)).await;
    assert_eq!(usage.cached_tokens, 0, "{usage:?}");
    b.register_prefix(1, prefix.clone(), false).await.unwrap();
    let stats = b.stats().await.unwrap().shared_tier.unwrap();
    assert!(stats.failures >= 1, "{stats:?}");
    // Exports fail too, counted, without blocking anything.
    let start = Instant::now();
    loop {
        let s = b.stats().await.unwrap().shared_tier.unwrap();
        if s.export_failed_pages >= 5 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        tier.stats().puts,
        5,
        "only the first scheduler's pages were stored"
    );
    b.check_invariants().await.unwrap().unwrap();
}

/// A tier whose stores block until the gate opens (a slow cluster).
struct Gated {
    inner: MemoryTier,
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Gated {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl KvTier for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn lookup(
        &self,
        ns: &TierNamespace,
        run: &PageRun,
        from: usize,
    ) -> agentd_kvtier::Result<usize> {
        self.inner.lookup(ns, run, from)
    }
    fn get(&self, ns: &TierNamespace, run: &PageRun, page: usize) -> agentd_kvtier::PageResult {
        self.inner.get(ns, run, page)
    }
    fn put(
        &self,
        ns: &TierNamespace,
        run: &PageRun,
        page: usize,
        bytes: &[u8],
    ) -> agentd_kvtier::Result<()> {
        self.wait();
        self.inner.put(ns, run, page, bytes)
    }
    fn remove(
        &self,
        ns: &TierNamespace,
        key: &agentd_kvtier::PageKey,
    ) -> agentd_kvtier::Result<()> {
        self.inner.remove(ns, key)
    }
    fn stats(&self) -> agentd_kvtier::TierStats {
        self.inner.stats()
    }
}

/// A slow tier never holds up the scheduler: exports that do not fit the queue are dropped and
/// counted, and prefixes are still registered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_beyond_the_queue_are_dropped_and_counted_not_waited_for() {
    let tier = Arc::new(Gated {
        inner: MemoryTier::default(),
        open: std::sync::Mutex::new(false),
        cv: std::sync::Condvar::new(),
    });
    let cfg = SchedulerConfig {
        kv_memory: 64 * page_bytes(16),
        shared: Some(SharedTierConfig {
            tier: tier.clone(),
            digests: digests(),
            events: None,
            export_queue: 1,
        }),
        ..Default::default()
    };
    let h = SchedulerHandle::spawn(fake(VOCAB), cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(25);
    // The exporter takes the first and blocks on it; the second fills the queue; the other
    // three are dropped (two pages each).
    for _ in 0..5 {
        let tokens = random_tokens(&mut rng, 32);
        tokio::time::timeout(Duration::from_secs(10), h.register_prefix(1, tokens, false))
            .await
            .expect("registering does not wait for the tier")
            .unwrap();
    }
    let s = h.stats().await.unwrap().shared_tier.unwrap();
    assert!(s.export_dropped_pages >= 4, "{s:?}");
    tier.open();
    // What was queued is stored once the tier answers: every page exported or dropped.
    let start = Instant::now();
    loop {
        let s = h.stats().await.unwrap().shared_tier.unwrap();
        if s.exported_pages + s.export_dropped_pages == 10 {
            assert!(s.exported_pages >= 2, "{s:?}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A KV event sink that keeps the index a router would build from one node's events.
#[derive(Default)]
struct IndexSink {
    index: std::sync::Mutex<agentd_kvtier::events::KvIndex>,
}

impl agentd_kvtier::events::EventSink for IndexSink {
    fn set_fingerprint(&self, fingerprint: agentd_store::format::Fingerprint) {
        let hb = agentd_kvtier::events::Heartbeat {
            node: 0,
            epoch: 1,
            fingerprint,
        };
        self.index.lock().unwrap().heartbeat(0, Some(&hb));
    }

    fn publish(
        &self,
        kind: agentd_kvtier::events::EventKind,
        ns: &TierNamespace,
        tokens: &[u32],
        first_page: usize,
    ) {
        let run = PageRun::new(ns, tokens);
        let ev = agentd_kvtier::events::KvEvent {
            node: 0,
            epoch: 1,
            kind,
            keys: run.keys()[first_page..].iter().map(|k| *k.hash()).collect(),
        };
        self.index.lock().unwrap().apply(&ev);
    }
}

/// The pages a scheduler computes, loads from the tier or evicts are announced as KV events
/// (here: into an index, as a router's), keyed as the tier keys them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn computed_loaded_and_evicted_pages_are_announced_as_kv_events() {
    let tier = Arc::new(MemoryTier::default());
    let spawn_with = |sink: &Arc<IndexSink>| {
        let cfg = SchedulerConfig {
            kv_memory: 64 * page_bytes(16),
            shared: Some(SharedTierConfig {
                tier: tier.clone(),
                digests: digests(),
                events: Some(sink.clone()),
                export_queue: 8,
            }),
            ..Default::default()
        };
        SchedulerHandle::spawn(fake(VOCAB), cfg).unwrap()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let prompt = random_tokens(&mut rng, 100);
    let keys = run_of(&prompt, 1).keys().to_vec();
    let matched = |s: &IndexSink| s.index.lock().unwrap().matched_pages(0, &keys);

    // Computed: the prompt's 6 whole pages are announced (and those of its output, which the
    // prompt's keys do not reach).
    let sink_a = Arc::new(IndexSink::default());
    let a = spawn_with(&sink_a);
    let sid = a.create_session(1, None, prompt.clone()).await.unwrap();
    run_to_end(&a, 1, sid, greedy(4)).await;
    assert_eq!(matched(&sink_a), 6);
    // Another tenant's keys are other keys.
    let other = run_of(&prompt, 2).keys().to_vec();
    assert_eq!(sink_a.index.lock().unwrap().matched_pages(0, &other), 0);

    // Pinned and exported, then loaded by another scheduler: announced there too.
    a.register_prefix(1, prompt.clone(), false).await.unwrap();
    exported(&a, 6).await;
    let sink_b = Arc::new(IndexSink::default());
    let b = spawn_with(&sink_b);
    let mut longer = prompt.clone();
    longer.extend(random_tokens(&mut rng, 10));
    let sid = b.create_session(1, None, longer).await.unwrap();
    let (_, usage) = run_to_end(&b, 1, sid, greedy(2)).await;
    assert_eq!(usage.tier_cached_tokens, 96, "{usage:?}");
    assert_eq!(matched(&sink_b), 6);

    // Evicted (no disk tier here): announced as removed.
    b.close(1, sid).await.unwrap();
    b.evict_cache(None).await.unwrap();
    assert_eq!(matched(&sink_b), 0);
    assert_eq!(sink_b.index.lock().unwrap().node_pages(0), 0);
    a.check_invariants().await.unwrap().unwrap();
    b.check_invariants().await.unwrap().unwrap();
}

/// The same prefix published on two schedulers is one namespace: the second loads the first's
/// exported pages instead of computing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_published_on_two_schedulers_is_computed_once() {
    let tier = Arc::new(MemoryTier::default());
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let prefix = random_tokens(&mut rng, 100);
    let a = spawn(&tier);
    a.register_prefix(1, prefix.clone(), true).await.unwrap();
    exported(&a, 6).await;
    let b = spawn(&tier);
    let p = b.register_prefix(2, prefix.clone(), true).await.unwrap();
    let s = b.stats().await.unwrap();
    assert_eq!(s.shared_tier.unwrap().loaded_tokens, 96, "{s:?}");
    assert!(s.prefill_tokens <= 4, "only the last partial page: {s:?}");
    // Any tenant's session from it hits.
    let sid = b.create_session(3, Some(p.id), vec![5, 6]).await.unwrap();
    let (_, usage) = run_to_end(&b, 3, sid, greedy(3)).await;
    assert!(usage.cached_tokens >= 96, "{usage:?}");
    b.check_invariants().await.unwrap().unwrap();
}
