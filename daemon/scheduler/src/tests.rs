//! Scheduler tests on the fake executor (no model file): cache on and off give the same
//! outputs, forks, rewrites, tenants, preemption, cancellation, admission order. Every token is
//! also checked against [`FakeExecutor::reference_logits`], so a page shared or copied wrongly
//! shows up as a different token.

use super::*;
use agentd_engine::detok::{Decode, DetokError};
use agentd_engine::sampling::SamplingParams;
use agentd_engine::{Decoding, Executor, FakeExecutor, FinishReason, GenerateOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// The fake model's vocabulary and context, as the default model's.
pub(super) const VOCAB: usize = 49_152;
pub(super) const CONTEXT: usize = 8192;
/// The fake model's end-of-sequence token.
pub(super) const EOS: u32 = 2;

/// Token ids as text (`"<id>"`), for the detokeniser.
pub(super) struct IdText;

impl Decode for IdText {
    fn decode_ids(&self, ids: &[u32]) -> std::result::Result<String, DetokError> {
        Ok(ids.iter().map(|i| format!("<{i}>")).collect())
    }
}

pub(super) fn fake(vocab: usize) -> Box<dyn Executor> {
    Box::new(FakeExecutor::new(vocab, CONTEXT))
}

/// KV bytes of one page of `page_size` tokens on the fake executor.
pub(super) fn page_bytes(page_size: usize) -> usize {
    FakeExecutor::new(1, 1).kv_bytes_per_token() * page_size
}

pub(super) fn random_tokens(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(100..40_000)).collect()
}

pub(super) fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens,
        ..Default::default()
    }
}

/// The output state for `opts`, as the service builds it.
pub(super) fn dec(opts: GenerateOptions) -> Decoding {
    dec_with(opts, vec![EOS])
}

/// [`dec`] with the end tokens `stop`.
pub(super) fn dec_with(opts: GenerateOptions, stop: Vec<u32>) -> Decoding {
    Decoding::new(&opts, stop, None, Arc::new(IdText)).expect("valid options")
}

/// What a correct scheduler streams after `log` with greedy sampling: each token the argmax of
/// the reference logits of everything before it, up to `max` tokens or the end of sequence.
pub(super) fn reference_greedy(log: &[u32], max: usize, vocab: usize) -> Vec<u32> {
    reference_greedy_until(log, max, vocab, Some(EOS))
}

/// [`reference_greedy`] ending at `eos` (never, with `None`).
pub(super) fn reference_greedy_until(
    log: &[u32],
    max: usize,
    vocab: usize,
    eos: Option<u32>,
) -> Vec<u32> {
    let mut seq = log.to_vec();
    let mut out = Vec::new();
    while out.len() < max {
        let l = FakeExecutor::reference_logits(&seq, vocab);
        let t = (0..l.len())
            .max_by(|&i, &j| l[i].total_cmp(&l[j]).then(j.cmp(&i)))
            .expect("vocab") as u32;
        out.push(t);
        seq.push(t);
        if Some(t) == eos {
            break;
        }
    }
    out
}

pub(super) async fn run_to_end(
    h: &SchedulerHandle,
    tenant: TenantId,
    sid: SessionId,
    opts: GenerateOptions,
) -> (Vec<u32>, Usage) {
    let max = opts.max_tokens;
    let (log, _) = h.session_tokens(tenant, sid).await.unwrap();
    let mut rx = h.generate(tenant, sid, dec(opts)).await.unwrap();
    let mut ids = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, .. } => ids.push(id),
            Event::Done(u) => {
                if u.finish != FinishReason::Cancelled {
                    assert_eq!(ids, reference_greedy(&log, max, VOCAB), "{u:?}");
                }
                return (ids, u);
            }
            Event::Error(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("stream ended without Done");
}

fn handle(cfg: SchedulerConfig) -> SchedulerHandle {
    SchedulerHandle::spawn(fake(VOCAB), cfg).unwrap()
}

/// Sessions sharing random prefixes generate the same greedy tokens with the cache on (hits)
/// as with it off, concurrently, and the hits are reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_on_and_off_give_identical_greedy_outputs() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let shared = random_tokens(&mut rng, 150);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let keep = [150, 150, 97, 40, 150, 0][i];
            let mut p = shared[..keep].to_vec();
            p.extend(random_tokens(&mut rng, 10 + i * 3));
            p
        })
        .collect();
    let mut outputs = Vec::new();
    for cache in [false, true] {
        let h = handle(SchedulerConfig {
            cache,
            step_tokens: 128,
            ..Default::default()
        });
        // The first session warms the cache; the rest run concurrently.
        let mut results = Vec::new();
        let first = h.create_session(1, None, prompts[0].clone()).await.unwrap();
        results.push(run_to_end(&h, 1, first, greedy(12)).await);
        let mut tasks = Vec::new();
        for p in &prompts[1..] {
            let (h, p) = (h.clone(), p.clone());
            tasks.push(tokio::spawn(async move {
                let sid = h.create_session(1, None, p).await.unwrap();
                run_to_end(&h, 1, sid, greedy(12)).await
            }));
        }
        for t in tasks {
            results.push(t.await.unwrap());
        }
        h.check_invariants().await.unwrap().unwrap();
        let stats = h.stats().await.unwrap();
        if cache {
            assert!(stats.cached_tokens >= 150 + 97 + 40 + 150, "{stats:?}");
            for (i, (_, u)) in results.iter().enumerate().skip(1) {
                let expect = common_len(&prompts[0], &prompts[i]);
                assert!(u.cached_tokens + 16 > expect, "session {i}: {u:?}");
            }
        } else {
            assert_eq!(stats.cached_tokens, 0);
        }
        outputs.push(results);
    }
    for (i, (off, on)) in outputs[0].iter().zip(&outputs[1]).enumerate() {
        assert_eq!(off.0, on.0, "session {i}");
    }
}

/// With a pool far too small for every sequence at once, sequences are preempted and requeued,
/// every request still completes with the output it gets alone, and no page leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_under_memory_pressure_completes_every_request() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let prompts: Vec<Vec<u32>> = (0..5).map(|_| random_tokens(&mut rng, 120)).collect();
    let page_bytes = page_bytes(16);
    let mut outputs = Vec::new();
    for pages in [1000usize, 24] {
        let h = handle(SchedulerConfig {
            kv_memory: pages * page_bytes,
            ..Default::default()
        });
        let mut tasks = Vec::new();
        for p in &prompts {
            let (h, p) = (h.clone(), p.clone());
            tasks.push(tokio::spawn(async move {
                let sid = h.create_session(1, None, p).await.unwrap();
                run_to_end(&h, 1, sid, greedy(40)).await
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let stats = h.stats().await.unwrap();
        h.check_invariants().await.unwrap().unwrap();
        if pages == 24 {
            assert!(stats.preemptions > 0, "{stats:?}");
            assert!(stats.peak_pages <= 24);
        }
        outputs.push(results);
    }
    for (i, (a, b)) in outputs[0].iter().zip(&outputs[1]).enumerate() {
        assert_eq!(a.0, b.0, "request {i}");
        assert_eq!(b.1.finish, FinishReason::MaxTokens);
    }
}

/// Forking shares the whole log; a rewrite keeps the cache hits before the rewritten range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_and_rewrite_reuse_the_cache() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let h = handle(SchedulerConfig::default());
    let a = h
        .create_session(1, None, random_tokens(&mut rng, 100))
        .await
        .unwrap();
    let (first, _) = run_to_end(&h, 1, a, greedy(8)).await;
    let (log, _) = h.session_tokens(1, a).await.unwrap();
    assert_eq!(log.len(), 100 + first.len());
    let b = h.fork(1, a).await.unwrap();
    h.append(1, b, random_tokens(&mut rng, 5)).await.unwrap();
    let (_, u) = run_to_end(&h, 1, b, greedy(4)).await;
    // Everything the first generation computed is reused (its last sampled token had no KV yet).
    assert_eq!(u.cached_tokens, log.len() - 1, "{u:?}");
    let epoch = h.rewrite(1, a, 50..100, vec![500, 501]).await.unwrap();
    assert_eq!(epoch, 1);
    let (_, u) = run_to_end(&h, 1, a, greedy(4)).await;
    assert_eq!(u.cached_tokens, 50, "{u:?}");
    assert!(matches!(
        h.rewrite(1, a, 10..9999, vec![]).await,
        Err(SchedError::InvalidRequest(_))
    ));
    h.check_invariants().await.unwrap().unwrap();
}

/// Tenants never see each other's sessions or private prefixes, and do not share cache unless
/// a prefix is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_published_prefixes_are_shared() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let h = handle(SchedulerConfig::default());
    let system = random_tokens(&mut rng, 80);
    let private = h.register_prefix(1, system.clone(), false).await.unwrap();
    assert_eq!(private.tokens, 80);
    let s1 = h
        .create_session(1, Some(private.id), vec![7, 8, 9])
        .await
        .unwrap();
    let (_, u) = run_to_end(&h, 1, s1, greedy(2)).await;
    assert_eq!(u.cached_tokens, 80);
    // Tenant 2 cannot name tenant 1's session or prefix: the same error as a missing id.
    assert_eq!(
        h.append(2, s1, vec![1]).await,
        Err(SchedError::UnknownSession(s1.0))
    );
    assert_eq!(
        h.create_session(2, Some(private.id), vec![]).await,
        Err(SchedError::UnknownPrefix(private.id.0))
    );
    assert_eq!(
        h.append(2, SessionId(999_999), vec![1]).await,
        Err(SchedError::UnknownSession(999_999))
    );
    // The same tokens in tenant 2 are not a hit.
    let mut same = system.clone();
    same.extend([7, 8, 9]);
    let s2 = h.create_session(2, None, same).await.unwrap();
    let (_, u) = run_to_end(&h, 2, s2, greedy(2)).await;
    assert_eq!(u.cached_tokens, 0);
    // A published prefix is shared by every tenant.
    let public = random_tokens(&mut rng, 64);
    let p = h.register_prefix(1, public, true).await.unwrap();
    let s3 = h.create_session(3, Some(p.id), vec![5]).await.unwrap();
    let (_, u) = run_to_end(&h, 3, s3, greedy(2)).await;
    assert_eq!(u.cached_tokens, 64);
    let stats = h.stats().await.unwrap();
    assert_eq!(stats.tenants[&3].cached_tokens, 64);
    h.check_invariants().await.unwrap().unwrap();
}

/// A dropped stream frees its sequence; closing a busy session cancels it; bad requests get
/// errors that say what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_frees_everything_and_bad_requests_are_refused() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let h = handle(SchedulerConfig {
        cache: false,
        ..Default::default()
    });
    let s = h
        .create_session(1, None, random_tokens(&mut rng, 60))
        .await
        .unwrap();
    let mut rx = h.generate(1, s, dec(greedy(4000))).await.unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Token { .. })));
    assert_eq!(
        h.generate(1, s, dec(greedy(4))).await.err(),
        Some(SchedError::SessionBusy(s.0))
    );
    drop(rx);
    // The engine notices at its next step; poll until the session is idle again.
    let mut freed = false;
    for _ in 0..200 {
        let st = h.stats().await.unwrap();
        if st.free_pages == st.pool_pages && st.tenants[&1].running == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(freed, "pages not freed after the stream was dropped");
    // Closing a session with a generation in flight cancels it.
    let mut rx = h.generate(1, s, dec(greedy(4000))).await.unwrap();
    assert!(matches!(rx.recv().await, Some(Event::Token { .. })));
    h.close(1, s).await.unwrap();
    let mut last = None;
    while let Some(ev) = rx.recv().await {
        last = Some(ev);
    }
    assert!(
        matches!(&last, Some(Event::Done(u)) if u.finish == FinishReason::Cancelled),
        "{last:?}"
    );
    h.check_invariants().await.unwrap().unwrap();
    // Bad input.
    let e = h.create_session(1, None, vec![49_152]).await.unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let e = h.create_session(1, None, vec![5; 9000]).await.unwrap_err();
    assert!(
        matches!(e, SchedError::ContextOverflow { limit: 8192, .. }),
        "{e}"
    );
    let empty = h.create_session(1, None, vec![]).await.unwrap();
    let e = h.generate(1, empty, dec(greedy(4))).await.unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    h.append(1, empty, vec![1, 2]).await.unwrap();
    let e = h.generate(1, empty, dec(greedy(0))).await.unwrap_err();
    assert!(e.to_string().contains("max_tokens"), "{e}");
    let e = h.generate(1, empty, dec(greedy(9000))).await.unwrap_err();
    assert!(e.to_string().contains("max_tokens"), "{e}");
    // A request larger than the whole pool fails with the numbers.
    let page_bytes = page_bytes(16);
    let small = handle(SchedulerConfig {
        kv_memory: 4 * page_bytes,
        ..Default::default()
    });
    let s = small
        .create_session(1, None, random_tokens(&mut rng, 100))
        .await
        .unwrap();
    let mut rx = small.generate(1, s, dec(greedy(4))).await.unwrap();
    match rx.recv().await {
        Some(Event::Error(e @ SchedError::PoolTooSmall { .. })) => {
            assert!(e.to_string().contains("--kv-memory"), "{e}")
        }
        other => panic!("expected PoolTooSmall, got {other:?}"),
    }
    small.check_invariants().await.unwrap().unwrap();
}

/// Runs the scheduler until idle; returns the order in which the streams ended.
fn finish_order(
    s: &mut Scheduler,
    streams: &mut [(usize, UnboundedReceiver<Event>)],
) -> Vec<usize> {
    let mut order = Vec::new();
    for _ in 0..10_000 {
        if s.is_idle() {
            break;
        }
        s.step();
        for (tag, rx) in streams.iter_mut() {
            while let Ok(ev) = rx.try_recv() {
                if matches!(ev, Event::Done(_) | Event::Error(_)) {
                    order.push(*tag);
                }
            }
        }
    }
    order
}

/// With room for one sequence at a time, a tenant that arrives after another tenant's queue is
/// served next, not after the whole queue.
#[test]
fn admission_takes_tenants_in_turn() {
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let mut s = Scheduler::new(
        fake(VOCAB),
        SchedulerConfig {
            max_batch: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let mut streams = Vec::new();
    for tag in 0..4 {
        let sid = s
            .create_session(1, None, random_tokens(&mut rng, 20))
            .unwrap();
        let (tx, rx) = unbounded_channel();
        s.generate(1, sid, dec(greedy(2)), tx).unwrap();
        streams.push((tag, rx));
    }
    let sid = s
        .create_session(2, None, random_tokens(&mut rng, 20))
        .unwrap();
    let (tx, rx) = unbounded_channel();
    s.generate(2, sid, dec(greedy(2)), tx).unwrap();
    streams.push((100, rx));
    let order = finish_order(&mut s, &mut streams);
    assert_eq!(order.len(), 5, "{order:?}");
    assert_eq!(
        order[1], 100,
        "tenant 2 waited behind tenant 1's queue: {order:?}"
    );
    s.check_invariants().unwrap();
}

/// Within a tenant, the waiting request with the longest cached prefix is admitted first.
#[test]
fn admission_prefers_the_longest_cached_prefix() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let mut s = Scheduler::new(
        fake(VOCAB),
        SchedulerConfig {
            max_batch: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let shared = random_tokens(&mut rng, 96);
    let warm = s.create_session(1, None, shared.clone()).unwrap();
    let (tx, rx) = unbounded_channel();
    s.generate(1, warm, dec(greedy(1)), tx).unwrap();
    let mut streams = vec![(0, rx)];
    assert_eq!(finish_order(&mut s, &mut streams), vec![0]);
    // A cold request queued first, then one that hits the cached prefix.
    let mut streams = Vec::new();
    for (tag, prompt) in [
        (1, random_tokens(&mut rng, 40)),
        (2, random_tokens(&mut rng, 40)),
        (3, [shared.clone(), random_tokens(&mut rng, 8)].concat()),
    ] {
        let sid = s.create_session(1, None, prompt).unwrap();
        let (tx, rx) = unbounded_channel();
        s.generate(1, sid, dec(greedy(1)), tx).unwrap();
        streams.push((tag, rx));
    }
    let order = finish_order(&mut s, &mut streams);
    assert_eq!(order[0], 3, "{order:?}");
    s.check_invariants().unwrap();
}

/// A model whose every layer sees only the last 100 keys: a long prompt and a long
/// generation let go of the pages behind the window as they go (their memory comes back while
/// the sequence runs), the tokens are still the reference's, and a second session sharing the
/// prompt hits the cached prompt, longer than the window, and generates the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windowed_models_release_pages_behind_the_window_and_reuse_long_prefixes() {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let prompt = random_tokens(&mut rng, 600);
    let exec = Box::new(FakeExecutor::new(VOCAB, CONTEXT).with_window(100));
    let h = SchedulerHandle::spawn(
        exec,
        SchedulerConfig {
            step_tokens: 128,
            ..Default::default()
        },
    )
    .unwrap();
    let a = h.create_session(1, None, prompt.clone()).await.unwrap();
    let (first, _) = run_to_end(&h, 1, a, greedy(200)).await;
    let st = h.stats().await.unwrap();
    assert!(st.window_released_pages > 0, "{st:?}");
    let b = h.create_session(1, None, prompt.clone()).await.unwrap();
    let (second, usage) = run_to_end(&h, 1, b, greedy(200)).await;
    assert_eq!(first, second);
    assert_eq!(usage.cached_tokens, prompt.len() - 1, "{usage:?}");
    // Every page is back in the pool or in the tree once both are done.
    let st = h.stats().await.unwrap();
    assert_eq!(st.free_pages + st.tree.pages_held, st.pool_pages, "{st:?}");
}

/// With a node number every id a scheduler hands out carries it; a published prefix's
/// namespace is decided by its tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_carry_the_node_and_published_namespaces_agree_across_schedulers() {
    let prefix: Vec<u32> = (1..40).collect();
    for node in [0u8, 9, 127] {
        let h = handle(SchedulerConfig {
            node: Some(node),
            ..Default::default()
        });
        for _ in 0..20 {
            let sid = h.create_session(1, None, vec![1, 2]).await.unwrap();
            assert_eq!(crate::node_of_id(sid.0), node, "{:#x}", sid.0);
            assert!(sid.0 < 1 << 63 && sid.0 != 0);
        }
        let p = h.register_prefix(1, prefix.clone(), true).await.unwrap();
        assert_eq!(crate::node_of_id(p.id.0), node);
    }
    assert_eq!(
        crate::published_namespace(&prefix),
        crate::published_namespace(&prefix.clone())
    );
    assert_ne!(
        crate::published_namespace(&prefix),
        crate::published_namespace(&prefix[1..])
    );
}
