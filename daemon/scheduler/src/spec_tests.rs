//! Speculative decoding on the fake executor: with a three-token vocabulary, prompt-lookup
//! drafts are proposed at almost every step and accepted about a third of the time, so both
//! the accepting and the rejecting paths run constantly. Every streamed token must still be the
//! reference greedy token, for several sequences sharing a prefix at once, with the pages
//! accounted for afterwards.

use super::tests::{dec_with, page_bytes, reference_greedy_until};
use super::*;
use agentd_engine::sampling::SamplingParams;
use agentd_engine::{FakeExecutor, GenerateOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 3;

/// Greedy tokens after `log` by the fake's reference logits (no end token).
fn reference(log: &[u32], max: usize) -> Vec<u32> {
    reference_greedy_until(log, max, VOCAB, None)
}

async fn outputs(
    spec: SpecConfig,
    prompts: &[Vec<u32>],
    max: usize,
) -> (Vec<Vec<u32>>, SchedStats) {
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: max,
        ..Default::default()
    };
    outputs_with(spec, prompts, opts).await
}

async fn outputs_with(
    spec: SpecConfig,
    prompts: &[Vec<u32>],
    opts: GenerateOptions,
) -> (Vec<Vec<u32>>, SchedStats) {
    let cfg = SchedulerConfig {
        page_size: 4,
        kv_memory: 256 * page_bytes(4),
        speculation: spec,
        ..SchedulerConfig::default()
    };
    let h = SchedulerHandle::spawn(Box::new(FakeExecutor::new(VOCAB, 8192)), cfg).unwrap();
    let mut tasks = Vec::new();
    for p in prompts {
        let (h, p, opts) = (h.clone(), p.clone(), opts.clone());
        tasks.push(tokio::spawn(async move {
            let sid = h.create_session(0, None, p).await.unwrap();
            let mut rx = h.generate(0, sid, dec_with(opts, vec![])).await.unwrap();
            let mut ids = Vec::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Token { id, .. } => ids.push(id),
                    Event::Done(u) => {
                        assert_eq!(u.generated_tokens, ids.len());
                        break;
                    }
                    Event::Error(e) => panic!("{e}"),
                }
            }
            h.close(0, sid).await.unwrap();
            ids
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    h.check_invariants().await.unwrap().unwrap();
    let stats = h.stats().await.unwrap();
    (out, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafts_are_verified_exactly_and_rejected_positions_leak_nothing() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let shared: Vec<u32> = (0..23).map(|_| rng.random_range(0..VOCAB as u32)).collect();
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| {
            let mut p = shared.clone();
            p.extend((0..5 + i).map(|_| rng.random_range(0..VOCAB as u32)));
            p
        })
        .collect();
    let max = 150;
    // Every sequence drafts, however busy the batch.
    let spec = SpecConfig {
        small_batch: 8,
        ..SpecConfig::default()
    };
    let (with, stats) = outputs(spec, &prompts, max).await;
    for (p, out) in prompts.iter().zip(&with) {
        assert_eq!(out, &reference(p, max));
    }
    assert!(stats.spec_drafted > 100, "{stats:?}");
    assert!(
        stats.spec_accepted > 0 && stats.spec_accepted < stats.spec_drafted,
        "{stats:?}"
    );
    assert_eq!(
        stats.spec_drafted,
        stats.spec_drafted_at.iter().sum::<u64>(),
        "{stats:?}"
    );
    assert_eq!(
        stats.spec_accepted,
        stats.spec_accepted_at.iter().sum::<u64>(),
        "{stats:?}"
    );
    // A position is accepted only after every one before it.
    for j in 1..stats.spec_drafted_at.len() {
        assert!(
            stats.spec_accepted_at[j] <= stats.spec_accepted_at[j - 1],
            "{stats:?}"
        );
        assert!(
            stats.spec_accepted_at[j] <= stats.spec_drafted_at[j],
            "{stats:?}"
        );
    }
    let (without, stats) = outputs(SpecConfig::off(), &prompts, max).await;
    assert_eq!(with, without);
    assert_eq!(stats.spec_drafted, 0);
}

/// Sampling: each row's token is drawn by the sequence's own sampler from that row's logits
/// (the same logits and random stream as without speculation), so with a seed the outputs are
/// the same tokens, and a draft token is kept exactly when it is the token drawn — the
/// speculative-sampling rule for a one-token draft distribution. Over many seeds, drafts are
/// both accepted and rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_draws_the_same_tokens_with_and_without_speculation() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|_| (0..20).map(|_| rng.random_range(0..VOCAB as u32)).collect())
        .collect();
    let spec = SpecConfig {
        small_batch: 8,
        ..SpecConfig::default()
    };
    let (mut drafted, mut accepted) = (0, 0);
    for seed in 0..8 {
        let opts = GenerateOptions {
            sampling: SamplingParams {
                temperature: 0.9,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                repetition_penalty: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            },
            max_tokens: 60,
            ..Default::default()
        };
        let (with, stats) = outputs_with(spec, &prompts, opts.clone()).await;
        let (without, _) = outputs_with(SpecConfig::off(), &prompts, opts).await;
        assert_eq!(with, without, "seed {seed}");
        drafted += stats.spec_drafted;
        accepted += stats.spec_accepted;
    }
    assert!(
        drafted > 0 && accepted > 0 && accepted < drafted,
        "{accepted} of {drafted}"
    );
}
