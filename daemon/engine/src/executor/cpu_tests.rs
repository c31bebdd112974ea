//! The CPU executor's numerics on the real model: a row's logits do not depend on how its
//! sequence was split into steps (a cache hit equals a recompute) or on which rows share its
//! batch (batched decode equals one at a time). The scheduler relies on both.

use crate::executor::{Executor, RowKind, SeqStep};
use crate::LoadedModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn engine() -> &'static LoadedModel {
    crate::test_model::default_engine()
}

fn random_tokens(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(100..40_000)).collect()
}

/// Runs `prompt` in fresh pages of its own; returns the last logits.
fn full_logits(engine: &LoadedModel, prompt: &[u32]) -> Vec<f32> {
    let mut kv = engine.cpu_executor();
    let pages = prompt.len().div_ceil(16);
    kv.allocate(pages, 16).unwrap();
    let table: Vec<u32> = (0..pages as u32).collect();
    let step = SeqStep {
        tokens: prompt,
        pos0: 0,
        page_table: &table,
        kind: RowKind::Prompt,
        logits: 1,
    };
    kv.forward(&[step]).unwrap()[0].take().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap()
}

/// Logits after a token-granular cache hit (full pages shared, the partial page copied) equal
/// a full recompute's, for random prompts split at random points and just before the end.
#[test]
fn logits_after_a_cache_hit_equal_a_full_recompute() {
    let engine = engine();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let ps = 16;
    // Random splits, then the split a cache hit on a whole prompt makes (only the last token
    // recomputed, as a one-row chunk) at lengths around the dense product's row blocks.
    let cases: Vec<(usize, usize)> = (0..4)
        .map(|_| {
            let len = rng.random_range(40..200);
            (len, rng.random_range(1..len))
        })
        .chain([128, 129, 193, 200].map(|len| (len, len - 1)))
        .collect();
    for (len, split) in cases {
        let prompt = random_tokens(&mut rng, len);
        let want = full_logits(engine, &prompt);
        // The prefix in pages 0.., as an earlier request left it in the cache.
        let mut kv = engine.cpu_executor();
        kv.allocate(2 * len.div_ceil(ps) + 2, ps).unwrap();
        let n_prefix_pages = split.div_ceil(ps);
        let prefix_table: Vec<u32> = (0..n_prefix_pages as u32).collect();
        let step = SeqStep {
            tokens: &prompt[..split],
            pos0: 0,
            page_table: &prefix_table,
            kind: RowKind::Prompt,
            logits: 0,
        };
        kv.forward(&[step]).unwrap();
        // The new request shares the full pages and copies the partial one.
        let mut table: Vec<u32> = prefix_table[..split / ps].to_vec();
        let mut next = n_prefix_pages as u32;
        if !split.is_multiple_of(ps) {
            kv.copy_page(prefix_table[split / ps], next, split % ps)
                .unwrap();
            table.push(next);
            next += 1;
        }
        while table.len() < len.div_ceil(ps) {
            table.push(next);
            next += 1;
        }
        let step = SeqStep {
            tokens: &prompt[split..],
            pos0: split,
            page_table: &table,
            kind: RowKind::Prompt,
            logits: 1,
        };
        let got = kv.forward(&[step]).unwrap()[0].take().unwrap();
        let range = want.iter().fold(f32::MIN, |a, &b| a.max(b))
            - want.iter().fold(f32::MAX, |a, &b| a.min(b));
        let diff = max_abs_diff(&got, &want);
        eprintln!("len {len} split {split}: max |Δ| {diff} over a range of {range}");
        // Bit-identical: every prompt row is computed the same way whatever its chunk.
        assert_eq!(diff, 0.0, "len {len} split {split}");
        assert_eq!(argmax(&got), argmax(&want));
    }
}

/// Decode rows batched together give exactly the logits each gives alone.
#[test]
fn batched_decode_equals_one_at_a_time() {
    let engine = engine();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let ps = 16;
    let lens = [5usize, 37, 64, 90];
    let mut kv = engine.cpu_executor();
    kv.allocate(64, ps).unwrap();
    let mut tables = Vec::new();
    let mut next = 0u32;
    let prompts: Vec<Vec<u32>> = lens.iter().map(|&l| random_tokens(&mut rng, l)).collect();
    for p in &prompts {
        let n = (p.len() + 1).div_ceil(ps) as u32;
        tables.push((next..next + n).collect::<Vec<u32>>());
        next += n;
    }
    for (p, t) in prompts.iter().zip(&tables) {
        let step = SeqStep {
            tokens: &p[..p.len() - 1],
            pos0: 0,
            page_table: t,
            kind: RowKind::Prompt,
            logits: 0,
        };
        kv.forward(&[step]).unwrap();
    }
    let steps: Vec<SeqStep<'_>> = prompts
        .iter()
        .zip(&tables)
        .map(|(p, t)| SeqStep {
            tokens: &p[p.len() - 1..],
            pos0: p.len() - 1,
            page_table: t,
            kind: RowKind::Decode,
            logits: 1,
        })
        .collect();
    let batched = kv.forward(&steps).unwrap();
    for (i, s) in steps.iter().enumerate() {
        let alone = kv.forward(&[*s]).unwrap();
        assert_eq!(alone[0], batched[i], "sequence {i}");
    }
}
