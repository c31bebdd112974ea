//! The disk tier through the scheduler on the fake executor: write-back of evicted runs, and
//! pages read back from disk give the tokens a recompute gives.

use super::tests::{fake, greedy, page_bytes, random_tokens, run_to_end, VOCAB};
use super::*;
use agentd_engine::ModelDigests;
use agentd_store::StoreConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Spawns a scheduler, retrying while the previous one (on its way out) still holds the store.
fn spawn_retrying(cfg: &SchedulerConfig) -> SchedulerHandle {
    let start = std::time::Instant::now();
    loop {
        match SchedulerHandle::spawn(fake(VOCAB), cfg.clone()) {
            Ok(h) => return h,
            Err(e) if start.elapsed().as_secs() < 20 => {
                eprintln!("retrying: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// A run evicted after two hits is written back, and after a restart it is served from disk
/// with the same greedy output; a run hit once is not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_runs_hit_twice_are_written_back_and_served_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SchedulerConfig {
        kv_memory: 64 * page_bytes(16),
        store: Some(DiskTierConfig {
            store: StoreConfig {
                dir: dir.path().to_owned(),
                budget: 1 << 30,
            },
            digests: ModelDigests {
                model_sha256: "fake-model".into(),
                tokenizer_digest: "fake-tokenizer".into(),
                template_digest: "fake-template".into(),
            },
        }),
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let hot = random_tokens(&mut rng, 200);
    let cold = random_tokens(&mut rng, 200);
    let h = spawn_retrying(&cfg);
    // The first run computes the prompt; the next two hit the cache (computing only the last
    // prompt token) and give exactly the same output, as must a load from disk.
    let mut first: Option<Vec<u32>> = None;
    for _ in 0..3 {
        let sid = h.create_session(1, None, hot.clone()).await.unwrap();
        let (out, _) = run_to_end(&h, 1, sid, greedy(6)).await;
        match &first {
            Some(f) => assert_eq!(&out, f, "a cache hit changed the output"),
            None => first = Some(out),
        }
    }
    let sid = h.create_session(1, None, cold.clone()).await.unwrap();
    run_to_end(&h, 1, sid, greedy(4)).await;
    assert!(h.evict_cache(None).await.unwrap() > 0);
    h.flush().await.unwrap();
    let disk = h.stats().await.unwrap().disk.unwrap();
    assert!(disk.records >= 1 && disk.written >= 1, "{disk:?}");
    drop(h);

    let h = spawn_retrying(&cfg);
    let sid = h.create_session(1, None, hot.clone()).await.unwrap();
    let (out, usage) = run_to_end(&h, 1, sid, greedy(6)).await;
    assert_eq!(usage.cached_tokens, hot.len() - 1, "{usage:?}");
    assert_eq!(Some(out), first);
    let sid = h.create_session(1, None, cold.clone()).await.unwrap();
    let (_, usage) = run_to_end(&h, 1, sid, greedy(4)).await;
    assert_eq!(
        usage.cached_tokens, 0,
        "a run hit once is not written: {usage:?}"
    );
    h.check_invariants().await.unwrap().unwrap();
}
