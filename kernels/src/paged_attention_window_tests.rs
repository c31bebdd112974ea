//! Sliding-window attention: the windowed prefill rows equal each row attended alone (the
//! decode path) bit for bit, the result matches attention over the window computed in f64, and
//! pages wholly below the window's first tile are never read.

use super::*;

/// Attention of query row `q` at position `pos` over keys `pos + 1 - window ..= pos` only, in
/// f64 from the f16-rounded K/V of `c`.
fn exact_window(c: &DecodeCase, q: &[f32], pos: usize, window: usize) -> Vec<f32> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
    } = c.shape;
    let (kv_row, group, scale) = (kv_heads * d, heads / kv_heads, c.scale() as f64);
    let lo = (pos + 1).saturating_sub(window);
    let mut out = vec![0f32; heads * d];
    for (h, o) in out.chunks_exact_mut(d).enumerate() {
        let (qh, off) = (&q[h * d..(h + 1) * d], (h / group) * d);
        let s: Vec<f64> = (lo..=pos)
            .map(|t| {
                let k = &c.k16[t * kv_row + off..][..d];
                qh.iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = w.iter().sum();
        let mut acc = vec![0f64; d];
        for (i, &wt) in w.iter().enumerate() {
            let v = &c.v16[(lo + i) * kv_row + off..][..d];
            for (a, &x) in acc.iter_mut().zip(v) {
                *a += wt * x as f64;
            }
        }
        for (o, a) in o.iter_mut().zip(&acc) {
            *o = (a / l) as f32;
        }
    }
    out
}

fn windowed(c: &DecodeCase, q: &[f32], pos0: usize, window: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    paged_window_attention(c.shape, q, c.kv(), pos0, window, c.scale(), &mut out).unwrap();
    out
}

/// Fills every key and value of the pages wholly below `window_start(lo)` with NaN.
fn poison_below(c: &mut DecodeCase, lo: usize) {
    let kv_row = c.shape.kv_heads * c.shape.head_dim;
    let pages = window_start(lo) / c.page_size;
    for &p in &c.table[..pages] {
        let r = p as usize * c.page_size * kv_row..(p as usize + 1) * c.page_size * kv_row;
        c.k_pool[r.clone()].fill(f16::NAN);
        c.v_pool[r].fill(f16::NAN);
    }
}

fn check_window(
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    page_size: usize,
    n_keys: usize,
    window: usize,
    seed: u32,
) -> std::result::Result<(), TestCaseError> {
    let c = DecodeCase::new(kv_heads, group, head_dim, page_size, n_keys, seed);
    let q_row = c.shape.heads * head_dim;
    let q = prompt_rows(&c, n_keys, seed);
    let label = format!("{} window {window}", c.label());
    let full = windowed(&c, &q, 0, window);
    for r in [0, n_keys / 3, n_keys / 2, n_keys - 1] {
        let row = &q[r * q_row..(r + 1) * q_row];
        let want = &full[r * q_row..(r + 1) * q_row];
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let alone = pool.install(|| windowed(&c, row, r, window));
            prop_assert_eq!(
                &alone[..],
                want,
                "row {} alone, {} threads, {}",
                r,
                threads,
                &label
            );
        }
        let err = max_rel_err(want, &exact_window(&c, row, r, window), head_dim);
        prop_assert!(err < TOL, "row {} vs f64: {} ({})", r, err, &label);
    }
    // The last row's window: pages wholly below its first tile may hold anything.
    let last = n_keys - 1;
    let row = &q[last * q_row..];
    let before = windowed(&c, row, last, window);
    let mut poisoned = DecodeCase::new(kv_heads, group, head_dim, page_size, n_keys, seed);
    poison_below(&mut poisoned, (last + 1).saturating_sub(window));
    prop_assert_eq!(
        windowed(&poisoned, row, last, window),
        before,
        "poisoned, {}",
        &label
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn windowed_prefill_rows_match_decode_and_f64(
        kv_heads in 1usize..3,
        group in 1usize..4,
        head_dim in prop::sample::select(vec![8usize, 24, 64, 256]),
        page_size in prop::sample::select(vec![1usize, 7, 16, 32]),
        n_keys in 1usize..1400,
        window in 1usize..700,
        seed in 0u32..1000,
    ) {
        check_window(kv_heads, group, head_dim, page_size, n_keys, window, seed)?;
    }
}

/// Windows around the tile and chunk boundaries, on Gemma 3's shape (one K/V head of 256).
#[test]
fn windows_at_tile_and_chunk_boundaries() {
    for (n_keys, window) in [
        (600, 512),
        (1100, 512),
        (513, 512),
        (512, 512),
        (700, 64),
        (700, 65),
        (700, 1),
        (300, 256),
        (1030, 257),
    ] {
        check_window(1, 4, 256, 16, n_keys, window, n_keys as u32).unwrap();
    }
}

/// A window as long as the context is plain causal attention, bit for bit.
#[test]
fn a_window_past_the_context_is_causal_attention() {
    let c = DecodeCase::new(2, 3, 64, 16, 900, 5);
    let q = prompt_rows(&c, 900, 5);
    let mut causal = vec![f32::NAN; q.len()];
    paged_causal_attention(c.shape, &q, c.kv(), 0, c.scale(), &mut causal).unwrap();
    assert_eq!(windowed(&c, &q, 0, 900), causal);
    assert_eq!(windowed(&c, &q, 0, 5000), causal);
    let mut out = vec![0f32; q.len()];
    assert!(paged_window_attention(c.shape, &q, c.kv(), 0, 0, c.scale(), &mut out).is_err());
}
