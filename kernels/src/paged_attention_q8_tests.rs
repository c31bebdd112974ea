//! Q8_0 pages: attention over them equals attention (in f64) over their dequantized values, the
//! AVX2 and portable paths agree, and the canonical-order invariant holds as for f16 (a row
//! alone equals the same row inside a prefill block, bit for bit, windowed or not, in any
//! thread pool, on either instruction path).

use super::*;

/// A sequence of `n_keys` positions stored as Q8_0 in shuffled pages, with its keys and values
/// dequantized in position order (what attention must compute over).
struct Q8Case {
    shape: AttentionShape,
    page_size: usize,
    n_keys: usize,
    k_dq: Vec<f32>,
    v_dq: Vec<f32>,
    k_pool: Vec<BlockQ8_0>,
    v_pool: Vec<BlockQ8_0>,
    table: Vec<u32>,
}

impl Q8Case {
    fn new(
        kv_heads: usize,
        group: usize,
        head_dim: usize,
        page_size: usize,
        n_keys: usize,
        seed: u32,
    ) -> Self {
        let shape = AttentionShape {
            heads: kv_heads * group,
            kv_heads,
            head_dim,
        };
        let kv_row = kv_heads * head_dim;
        let k = gen(n_keys * kv_row, seed, 2);
        let v = gen(n_keys * kv_row, seed, 3);
        let (table, num_pages) = shuffled_table(n_keys.div_ceil(page_size), 2, seed as u64);
        let units = num_pages * page_size * kv_row / QK8_0;
        let poison = BlockQ8_0 {
            d: f16::NAN,
            qs: [0; QK8_0],
        };
        let (mut k_pool, mut v_pool) = (vec![poison; units], vec![poison; units]);
        let kv = PagedKvMut {
            k_pool: &mut k_pool,
            v_pool: &mut v_pool,
            page_size,
            page_table: &table,
        };
        write_kv(shape, kv, 0, &k, &v).unwrap();
        // Read the rows back through the page table: the values the kernel must attend over.
        let (mut k_dq, mut v_dq) = (vec![0f32; k.len()], vec![0f32; v.len()]);
        let row_units = kv_row / QK8_0;
        for t in 0..n_keys {
            let row = table[t / page_size] as usize * page_size + t % page_size;
            let src = row * row_units..(row + 1) * row_units;
            let dst = t * kv_row..(t + 1) * kv_row;
            BlockQ8_0::dequantize(false, &k_pool[src.clone()], &mut k_dq[dst.clone()]);
            BlockQ8_0::dequantize(false, &v_pool[src], &mut v_dq[dst]);
        }
        Q8Case {
            shape,
            page_size,
            n_keys,
            k_dq,
            v_dq,
            k_pool,
            v_pool,
            table,
        }
    }

    fn kv(&self) -> PagedKv<'_, BlockQ8_0> {
        PagedKv {
            k_pool: &self.k_pool,
            v_pool: &self.v_pool,
            page_size: self.page_size,
            page_table: &self.table,
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.shape.head_dim as f32).sqrt()
    }

    fn rows(&self, n: usize, seed: u32) -> Vec<f32> {
        gen(n * self.shape.heads * self.shape.head_dim, seed, 4)
    }

    fn label(&self) -> String {
        format!(
            "{:?}, page {}, {} keys",
            self.shape, self.page_size, self.n_keys
        )
    }

    /// `paged_attention_with` for rows `q` at `pos0…` under `window`, in `pool`.
    fn attend(
        &self,
        q: &[f32],
        pos0: usize,
        window: usize,
        simd: bool,
        pool: &rayon::ThreadPool,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; q.len()];
        pool.install(|| {
            paged_attention_with(
                self.shape,
                q,
                self.kv(),
                pos0,
                window,
                self.scale(),
                &mut out,
                simd,
            )
        })
        .unwrap();
        out
    }

    /// The naive reference: rows `q` at `pos0…`, each over keys `pos + 1 - window ..= pos` of
    /// the dequantized values, in f64.
    fn naive(&self, q: &[f32], pos0: usize, window: usize) -> Vec<f32> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
        } = self.shape;
        let (kv_row, group, scale) = (kv_heads * d, heads / kv_heads, self.scale() as f64);
        let mut out = vec![0f32; q.len()];
        for (r, (qr, or)) in q
            .chunks_exact(heads * d)
            .zip(out.chunks_exact_mut(heads * d))
            .enumerate()
        {
            let pos = pos0 + r;
            let lo = (pos + 1).saturating_sub(window);
            for (h, o) in or.chunks_exact_mut(d).enumerate() {
                let (qh, off) = (&qr[h * d..(h + 1) * d], (h / group) * d);
                let s: Vec<f64> = (lo..=pos)
                    .map(|t| {
                        let k = &self.k_dq[t * kv_row + off..][..d];
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
                    let v = &self.v_dq[(lo + i) * kv_row + off..][..d];
                    for (a, &x) in acc.iter_mut().zip(v) {
                        *a += wt * x as f64;
                    }
                }
                for (o, a) in o.iter_mut().zip(&acc) {
                    *o = (a / l) as f32;
                }
            }
        }
        out
    }
}

fn pools() -> Vec<rayon::ThreadPool> {
    [1, 3]
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect()
}

fn simd_paths() -> &'static [bool] {
    if cpu::features().avx2 {
        &[false, true]
    } else {
        &[false]
    }
}

/// Checks `c` for `n` prompt rows ending at its context under `window`: both instruction paths
/// match the naive reference over the dequantized values (and each other), and every row of
/// the prefill call equals that row attended alone, bit for bit, in pools of 1 and 3 threads.
fn check(c: &Q8Case, n: usize, window: usize, seed: u32) -> std::result::Result<(), TestCaseError> {
    let q = c.rows(n, seed);
    let q_row = c.shape.heads * c.shape.head_dim;
    let pos0 = c.n_keys - n;
    let label = format!("{} rows {} window {}", c.label(), n, window);
    let want = c.naive(&q, pos0, window);
    let pools = pools();
    let mut by_path = Vec::new();
    for &simd in simd_paths() {
        let prefill = c.attend(&q, pos0, window, simd, &pools[0]);
        assert_close(
            &prefill,
            &want,
            2e-4,
            &format!("naive, simd {simd}, {label}"),
        )?;
        prop_assert_eq!(
            &prefill,
            &c.attend(&q, pos0, window, simd, &pools[1]),
            "prefill, 1 vs 3 threads, {}",
            &label
        );
        for pool in &pools {
            for r in [0, n / 2, n - 1] {
                let row = &q[r * q_row..(r + 1) * q_row];
                prop_assert_eq!(
                    &c.attend(row, pos0 + r, window, simd, pool)[..],
                    &prefill[r * q_row..(r + 1) * q_row],
                    "row {} alone vs in prefill (simd {}), {}",
                    r,
                    simd,
                    &label
                );
            }
        }
        by_path.push(prefill);
    }
    if let [portable, avx2] = &by_path[..] {
        assert_close(avx2, portable, 1e-5, &format!("avx2 vs portable, {label}"))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Q8_0 pages, causal or windowed, over head sizes of one to eight blocks and contexts
    /// across several chunks.
    #[test]
    fn q8_0_attention_matches_naive_and_rows_match_decode_bit_for_bit(
        kv_heads in 1usize..=2, group in 1usize..=5,
        head_dim in prop_oneof![Just(32usize), Just(64), Just(128), Just(256)],
        page_size in 1usize..40, n_keys in 1usize..2200, n in 1usize..=24,
        window in prop_oneof![Just(NO_WINDOW), 1usize..700], seed in 0u32..1000,
    ) {
        let n = n.min(n_keys);
        let c = Q8Case::new(kv_heads, group, head_dim, page_size, n_keys, seed);
        check(&c, n, window, seed)?;
    }
}

/// The engine's case on its model shapes: a whole prompt as prefill (a recompute) against its
/// last row alone (a cache hit), around tile and chunk boundaries, through the public entry
/// points.
#[test]
fn q8_0_whole_prompt_prefill_matches_last_token_decode() {
    for (i, (kv_heads, group, head_dim, page_size)) in
        [(3, 3, 64, 16), (2, 7, 64, 16), (1, 4, 128, 32)]
            .into_iter()
            .enumerate()
    {
        for n_keys in [1, 63, 64, 65, 256, 257, 513, 2100] {
            let seed = (i * 100 + n_keys) as u32;
            let c = Q8Case::new(kv_heads, group, head_dim, page_size, n_keys, seed);
            let q = c.rows(n_keys, seed);
            let q_row = c.shape.heads * head_dim;
            for window in [None, Some(200)] {
                let attend = |q: &[f32], pos0: usize| {
                    let mut out = vec![f32::NAN; q.len()];
                    match window {
                        Some(w) => {
                            paged_window_attention(c.shape, q, c.kv(), pos0, w, c.scale(), &mut out)
                        }
                        None => {
                            paged_causal_attention(c.shape, q, c.kv(), pos0, c.scale(), &mut out)
                        }
                    }
                    .unwrap();
                    out
                };
                let full = attend(&q, 0);
                let r = n_keys - 1;
                assert_eq!(
                    attend(&q[r * q_row..], r),
                    full[r * q_row..],
                    "last row of {}, window {window:?}",
                    c.label()
                );
            }
        }
    }
}

/// A head size that is not whole Q8_0 blocks is refused with the block size, never read.
#[test]
fn q8_0_refuses_head_dims_not_a_multiple_of_32() {
    let shape = AttentionShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 48,
    };
    let mut pool = vec![BlockQ8_0::default(); 16 * 3];
    let mut vpool = pool.clone();
    let kv = PagedKvMut {
        k_pool: &mut pool,
        v_pool: &mut vpool,
        page_size: 16,
        page_table: &[0],
    };
    let err = write_kv(shape, kv, 0, &[0.0; 48], &[0.0; 48]).unwrap_err();
    assert_eq!(
        err,
        KernelError::PartialBlock {
            cols: 48,
            block: 32
        }
    );
    let kv = PagedKv {
        k_pool: &pool,
        v_pool: &pool,
        page_size: 16,
        page_table: &[0],
    };
    let mut out = [0f32; 96];
    assert!(paged_causal_attention(shape, &[0.0; 96], kv, 0, 1.0, &mut out).is_err());
}
