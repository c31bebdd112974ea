//! The CPU executor's numerics on the real model: a row's logits do not depend on how its
//! sequence was split into steps (a cache hit equals a recompute) or on which rows share its
//! batch (batched decode equals one at a time). The scheduler relies on both. Both hold for
//! Q8_0 pages too, whose logits stay close to f16's.

use crate::executor::{CpuExecutor, Executor, KvDtype, RowKind, SeqStep};
use crate::LoadedModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn engine() -> &'static LoadedModel {
    crate::test_model::default_engine()
}

fn random_tokens(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(100..40_000)).collect()
}

/// An executor over the default model whose pages store KV as `dtype`.
fn executor(engine: &LoadedModel, dtype: KvDtype) -> CpuExecutor {
    CpuExecutor::with_kv_dtype(engine.model.clone(), dtype).unwrap()
}

/// Runs `prompt` in fresh pages of its own; returns the last logits.
fn full_logits(engine: &LoadedModel, dtype: KvDtype, prompt: &[u32]) -> Vec<f32> {
    let mut kv = executor(engine, dtype);
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
/// a full recompute's, for random prompts split at random points and just before the end, with
/// f16 and with Q8_0 pages.
#[test]
fn logits_after_a_cache_hit_equal_a_full_recompute() {
    for dtype in KvDtype::ALL {
        cache_hit_equals_recompute(dtype);
    }
}

fn cache_hit_equals_recompute(dtype: KvDtype) {
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
        let want = full_logits(engine, dtype, &prompt);
        // The prefix in pages 0.., as an earlier request left it in the cache.
        let mut kv = executor(engine, dtype);
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
        eprintln!("{dtype}: len {len} split {split}: max |Δ| {diff} over a range of {range}");
        // Bit-identical: every prompt row is computed the same way whatever its chunk.
        assert_eq!(diff, 0.0, "{dtype}: len {len} split {split}");
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

/// Sequences sharing a 600-token prefix's pages (two whole 256-key chunks and a partial page
/// each copied), in one step with decode rows, a draft-verify row group, a prompt chunk and a
/// sequence of its own: shared-prefix attention on gives the same logits bit for bit as off,
/// for f16 and Q8_0 pages.
#[test]
fn shared_prefix_attention_gives_the_same_logits() {
    for dtype in [KvDtype::F16, KvDtype::Q8_0] {
        shared_prefix_same_logits(dtype);
    }
}

fn shared_prefix_same_logits(dtype: KvDtype) {
    let engine = engine();
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let ps = 16;
    let prefix = random_tokens(&mut rng, 600);
    let mut kv = executor(engine, dtype);
    kv.allocate(120, ps).unwrap();
    let shared_pages = prefix.len().div_ceil(ps);
    let shared: Vec<u32> = (0..shared_pages as u32).collect();
    kv.forward(&[SeqStep {
        tokens: &prefix,
        pos0: 0,
        page_table: &shared,
        kind: RowKind::Prompt,
        logits: 0,
    }])
    .unwrap();
    // Four sequences on the shared whole pages, each with a copy of the partial last page.
    let full = prefix.len() / ps;
    let mut next = shared_pages as u32;
    let mut tables = Vec::new();
    for _ in 0..4 {
        let own: Vec<u32> = (next..next + 3).collect();
        next += 3;
        kv.copy_page(shared[full], own[0], prefix.len() % ps)
            .unwrap();
        tables.push(
            shared[..full]
                .iter()
                .chain(&own)
                .copied()
                .collect::<Vec<u32>>(),
        );
    }
    // And one sequence with pages of its own.
    let alone: Vec<u32> = (next..next + 40).collect();
    let other = random_tokens(&mut rng, 300);
    kv.forward(&[SeqStep {
        tokens: &other,
        pos0: 0,
        page_table: &alone,
        kind: RowKind::Prompt,
        logits: 0,
    }])
    .unwrap();
    let new: Vec<Vec<u32>> = [1usize, 1, 4, 9]
        .iter()
        .map(|&n| random_tokens(&mut rng, n))
        .collect();
    let last = random_tokens(&mut rng, 1);
    let mut steps: Vec<SeqStep<'_>> = new
        .iter()
        .zip(&tables)
        .enumerate()
        .map(|(i, (t, table))| SeqStep {
            tokens: t,
            pos0: prefix.len(),
            page_table: table,
            kind: if i == 3 {
                RowKind::Prompt
            } else {
                RowKind::Decode
            },
            logits: t.len().min(4),
        })
        .collect();
    steps.push(SeqStep {
        tokens: &last,
        pos0: other.len(),
        page_table: &alone,
        kind: RowKind::Decode,
        logits: 1,
    });
    let was = engine.model.shared_prefix_attention();
    engine.model.set_shared_prefix_attention(false);
    let per_sequence = kv.forward(&steps).unwrap();
    engine.model.set_shared_prefix_attention(true);
    let cascade = kv.forward(&steps).unwrap();
    engine.model.set_shared_prefix_attention(was);
    for (i, (a, b)) in per_sequence.iter().zip(&cascade).enumerate() {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{dtype}: sequence {i}"
        );
    }
}

/// Every row's logits for `tokens` run as one prompt in fresh pages of `dtype`.
fn all_row_logits(engine: &LoadedModel, dtype: KvDtype, tokens: &[u32]) -> Vec<f32> {
    let mut kv = executor(engine, dtype);
    let pages = tokens.len().div_ceil(16);
    kv.allocate(pages, 16).unwrap();
    let table: Vec<u32> = (0..pages as u32).collect();
    let step = SeqStep {
        tokens,
        pos0: 0,
        page_table: &table,
        kind: RowKind::Prompt,
        logits: tokens.len(),
    };
    kv.forward(&[step]).unwrap()[0].take().unwrap()
}

/// KL(p ‖ q) of the softmaxes of two logit rows, in nats.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let logsm = |x: &[f32]| {
        let m = x.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        x.iter().map(|&v| v as f64 - lse).collect::<Vec<f64>>()
    };
    let (lp, lq) = (logsm(p), logsm(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// Q8_0 pages give logits close to f16 pages' on text (every row of a 421-token prompt past
/// several chunks). Measured on SmolLM2-135M Q4_1: mean KL(f16 ‖ q8_0) 2.5e-3 nats, largest
/// 4.2e-2, top-1 agreement 99.3%, largest |Δ logit| 2.24; the bounds leave about 2× room.
#[test]
fn q8_0_logits_are_close_to_f16() {
    let engine = engine();
    let text = "The committee met on Tuesday to review the budget. After a long discussion, \
        they agreed to fund the new library wing, but only if the city matched the grant.\n\n\
        fn fib(n: u64) -> u64 { if n < 2 { n } else { fib(n - 1) + fib(n - 2) } }\n\n\
        Q: What is the capital of France? A: Paris. Q: How many legs does a spider have? \
        A: Eight. The recipe calls for two cups of flour, a pinch of salt, and three eggs; \
        whisk them together and bake at 180 degrees for twenty-five minutes. ";
    let tokens = engine.tokenizer.encode(&text.repeat(3), false).unwrap();
    assert!(tokens.len() > 300, "{} tokens", tokens.len());
    let vocab = engine.model.config().vocab;
    let f16 = all_row_logits(engine, KvDtype::F16, &tokens);
    let q8 = all_row_logits(engine, KvDtype::Q8_0, &tokens);
    let (mut kl_sum, mut kl_max, mut agree, mut diff_max) = (0f64, 0f64, 0usize, 0f32);
    for (a, b) in f16.chunks_exact(vocab).zip(q8.chunks_exact(vocab)) {
        let k = kl(a, b);
        kl_sum += k;
        kl_max = kl_max.max(k);
        agree += usize::from(argmax(a) == argmax(b));
        diff_max = diff_max.max(max_abs_diff(a, b));
    }
    let n = tokens.len();
    let (kl_mean, top1) = (kl_sum / n as f64, agree as f64 / n as f64);
    eprintln!(
        "q8_0 vs f16 over {n} rows: mean KL {kl_mean:.2e}, max KL {kl_max:.2e}, \
         top-1 agreement {top1:.4}, max |Δ logit| {diff_max}"
    );
    assert!(kl_mean < 5e-3, "mean KL {kl_mean}");
    assert!(kl_max < 0.1, "max KL {kl_max}");
    assert!(top1 >= 0.97, "top-1 agreement {top1}");
    assert!(diff_max < 4.0, "max |Δ logit| {diff_max}");
}

/// A model whose heads are not whole Q8_0 blocks is refused with its head size named.
#[test]
fn q8_0_refuses_a_head_size_not_a_multiple_of_32() {
    let mut config = engine().model.config().clone();
    config.head_dim = 48;
    let err = crate::model::check_kv_dtype(&config, KvDtype::Q8_0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("48") && err.contains("q8_0"), "{err}");
    crate::model::check_kv_dtype(&config, KvDtype::F16).unwrap();
}

/// Q8_0 pages hold a token in about half the bytes of f16 ones, and pages move through host
/// bytes (the disk tier) intact.
#[test]
fn q8_0_pages_are_half_the_bytes_and_round_trip_through_host_bytes() {
    let engine = engine();
    let (f, q) = (
        executor(engine, KvDtype::F16),
        executor(engine, KvDtype::Q8_0),
    );
    let (bf, bq) = (f.kv_bytes_per_token(), q.kv_bytes_per_token());
    assert_eq!(bq * 64, bf * 34, "{bq} vs {bf}");
    let mut kv = executor(engine, KvDtype::Q8_0);
    kv.allocate(4, 16).unwrap();
    assert_eq!(kv.layout().dtype, KvDtype::Q8_0);
    let tokens: Vec<u32> = (0..20).map(|i| 1000 + i * 37).collect();
    let step = SeqStep {
        tokens: &tokens,
        pos0: 0,
        page_table: &[0, 1],
        kind: RowKind::Prompt,
        logits: 1,
    };
    let want = kv.forward(&[step]).unwrap();
    let mut bytes = Vec::new();
    for p in [0, 1] {
        kv.read_page(p, &mut bytes).unwrap();
    }
    assert_eq!(bytes.len(), 2 * kv.page_bytes());
    for (p, b) in [2u32, 3].iter().zip(bytes.chunks_exact(kv.page_bytes())) {
        kv.write_page(*p, b).unwrap();
    }
    let step = SeqStep {
        tokens: &tokens[19..],
        pos0: 19,
        page_table: &[2, 3],
        kind: RowKind::Prompt,
        logits: 1,
    };
    assert_eq!(kv.forward(&[step]).unwrap(), want);
}
