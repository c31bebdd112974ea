//! Tests for paged attention: against a naive reference and the contiguous kernel, over shuffled
//! page tables; split-key decode against the unsplit per-head walk it replaced and against f64;
//! and the canonical-order invariant: a row's bits are the same alone (decode) or in a prefill
//! call, on either instruction path, in any thread pool.
use super::flash_decode::{decode, Plan, SERIAL_DECODE_KEYS};
use super::*;
use crate::attention::causal_attention;
use crate::attention::tests::naive;
use crate::vecops::scale_body;
use proptest::prelude::*;

/// A shuffled page table of `needed` pages out of a pool of `needed + spare` pages.
fn shuffled_table(needed: usize, spare: usize, seed: u64) -> (Vec<u32>, usize) {
    let num_pages = needed + spare;
    let mut ids: Vec<u32> = (0..num_pages as u32).collect();
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    for i in (1..num_pages).rev() {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ids.swap(i, (x >> 33) as usize % (i + 1));
    }
    ids.truncate(needed);
    (ids, num_pages)
}

pub(super) fn gen(n: usize, seed: u32, salt: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_add(salt)) % 1000) as f32
                / 250.0
                - 2.0
        })
        .collect()
}

fn assert_close(
    got: &[f32],
    want: &[f32],
    tol: f32,
    what: &str,
) -> std::result::Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            (a - b).abs() < tol,
            "{}: element {}: {} vs {}",
            what,
            i,
            a,
            b
        );
    }
    Ok(())
}

proptest! {
    #[test]
    fn matches_naive_and_contiguous(
        kv_heads in 1usize..3, group in 1usize..=4, head_dim in prop_oneof![Just(8usize), Just(64)],
        page_size in 1usize..=16, pos0 in 0usize..150, n_q in 1usize..20,
        spare in 0usize..4, seed in 0u32..1000,
    ) {
        let shape = AttentionShape { heads: kv_heads * group, kv_heads, head_dim };
        let kv_row = kv_heads * head_dim;
        let n_kv = pos0 + n_q;
        let q = gen(n_q * shape.heads * head_dim, seed, 1);
        let k = gen(n_kv * kv_row, seed, 2);
        let v = gen(n_kv * kv_row, seed, 3);
        let (table, num_pages) = shuffled_table(n_kv.div_ceil(page_size), spare, seed as u64);
        // Unwritten slots hold NaN, so reading one would poison the output.
        let mut k_pool = vec![f16::NAN; num_pages * page_size * kv_row];
        let mut v_pool = k_pool.clone();
        // Written in two calls, as prefill then decode would.
        let split = pos0.min(n_kv);
        for (lo, hi) in [(0, split), (split, n_kv)] {
            let kv = PagedKvMut { k_pool: &mut k_pool, v_pool: &mut v_pool, page_size, page_table: &table };
            write_kv(shape, kv, lo, &k[lo * kv_row..hi * kv_row], &v[lo * kv_row..hi * kv_row]).unwrap();
        }
        // The contiguous f16-rounded copy, and a read-back of the pages.
        let round = |x: &[f32]| -> Vec<f32> { x.iter().map(|&a| f16::from_f32(a).to_f32()).collect() };
        let (k16, v16) = (round(&k), round(&v));
        for pos in 0..n_kv {
            let row = table[pos / page_size] as usize * page_size + pos % page_size;
            for i in 0..kv_row {
                prop_assert_eq!(k_pool[row * kv_row + i].to_f32(), k16[pos * kv_row + i]);
                prop_assert_eq!(v_pool[row * kv_row + i].to_f32(), v16[pos * kv_row + i]);
            }
        }
        let scale = 1.0 / (head_dim as f32).sqrt();
        let kv = PagedKv { k_pool: &k_pool, v_pool: &v_pool, page_size, page_table: &table };
        let mut out = vec![0f32; q.len()];
        paged_causal_attention(shape, &q, kv, pos0, scale, &mut out).unwrap();
        assert_close(&out, &naive(shape, &q, &k16, &v16, pos0, scale), 1e-3, "vs naive")?;

        let mut contiguous = vec![0f32; q.len()];
        causal_attention(shape, &q, &k16, &v16, pos0, scale, &mut contiguous).unwrap();
        assert_close(&out, &contiguous, 1e-4, "vs causal_attention")?;

        let mut portable = vec![0f32; q.len()];
        paged_attention_with(shape, &q, kv, pos0, NO_WINDOW, scale, &mut portable, false).unwrap();
        assert_close(&portable, &contiguous, 1e-4, "portable vs causal_attention")?;
        if cpu::features().avx2 {
            let mut simd = vec![0f32; q.len()];
            paged_attention_with(shape, &q, kv, pos0, NO_WINDOW, scale, &mut simd, true).unwrap();
            assert_close(&simd, &portable, 1e-4, "avx2 vs portable")?;
        }

        // Split at a key `split <= pos0`: every query sees all of `0..split` (the shared-prefix
        // part, non-causal) and its causal share of the rest; merged, the two partial
        // attentions equal the whole.
        let split = (seed as usize * 7919) % (pos0 + 1);
        let heads_total = n_q * shape.heads;
        let (mut a, mut la) = (vec![0f32; q.len()], vec![0f32; heads_total]);
        paged_attention_partial(shape, &q, kv, 0..split, None, scale, &mut a, &mut la).unwrap();
        let (mut b, mut lb) = (vec![0f32; q.len()], vec![0f32; heads_total]);
        paged_attention_partial(shape, &q, kv, split..n_kv, Some(pos0), scale, &mut b, &mut lb)
            .unwrap();
        merge_partial_attention(&mut a, &mut la, &b, &lb, head_dim).unwrap();
        assert_close(&a, &contiguous, 1e-4, "partial + merge vs causal_attention")?;
        // An empty range contributes nothing.
        let (mut e, mut le) = (vec![0f32; q.len()], vec![0f32; heads_total]);
        paged_attention_partial(shape, &q, kv, 0..0, None, scale, &mut e, &mut le).unwrap();
        prop_assert!(le.iter().all(|&x| x == f32::NEG_INFINITY));
        merge_partial_attention(&mut e, &mut le, &a, &la, head_dim).unwrap();
        assert_close(&e, &contiguous, 1e-4, "empty + merged vs causal_attention")?;
    }
}

#[test]
fn write_kv_round_trips() {
    let shape = AttentionShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let (page_size, kv_row, n) = (3, 16, 10);
    let table = [4u32, 0, 2, 1];
    let mut k_pool = vec![f16::ZERO; 5 * page_size * kv_row];
    let mut v_pool = k_pool.clone();
    let k: Vec<f32> = (0..n * kv_row).map(|i| i as f32 * 0.25).collect();
    let v: Vec<f32> = (0..n * kv_row).map(|i| -(i as f32) * 0.5).collect();
    for pos in 0..n {
        let kv = PagedKvMut {
            k_pool: &mut k_pool,
            v_pool: &mut v_pool,
            page_size,
            page_table: &table,
        };
        let rows = pos * kv_row..(pos + 1) * kv_row;
        write_kv(shape, kv, pos, &k[rows.clone()], &v[rows]).unwrap();
    }
    for pos in 0..n {
        let row = table[pos / page_size] as usize * page_size + pos % page_size;
        for i in 0..kv_row {
            assert_eq!(k_pool[row * kv_row + i].to_f32(), k[pos * kv_row + i]);
            assert_eq!(v_pool[row * kv_row + i].to_f32(), v[pos * kv_row + i]);
        }
    }
    // Page 3 is not in the table (only the first four ids are used, and not 3).
    assert!(k_pool[3 * page_size * kv_row..4 * page_size * kv_row]
        .iter()
        .all(|x| *x == f16::ZERO));
}

#[test]
fn rejects_bad_inputs() {
    let shape = AttentionShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
    };
    let pool = vec![f16::ZERO; 4 * 2 * 4]; // 4 pages of 2 tokens
    let short_pool = vec![f16::ZERO; 3 * 2 * 4];
    let q = vec![0.0f32; 2 * 8]; // two query rows
    let table = [3u32, 1, 0];
    let kv = PagedKv {
        k_pool: &pool,
        v_pool: &pool,
        page_size: 2,
        page_table: &table,
    };
    let run = |shape: AttentionShape, q: &[f32], kv: PagedKv<'_>, pos0: usize, out_len: usize| {
        let mut out = vec![0.0f32; out_len];
        paged_causal_attention(shape, q, kv, pos0, 1.0, &mut out)
    };
    assert!(run(shape, &q, kv, 3, 16).is_ok());
    let is_len_err = |r: Result<()>| matches!(r, Err(KernelError::Length { .. }));
    // Out-of-range page id.
    let bad_ids = [3u32, 9, 0];
    assert!(is_len_err(run(
        shape,
        &q,
        PagedKv {
            page_table: &bad_ids,
            ..kv
        },
        3,
        16
    )));
    // Page table too short for the positions (5 keys need 3 pages).
    assert!(is_len_err(run(
        shape,
        &q,
        PagedKv {
            page_table: &table[..2],
            ..kv
        },
        3,
        16
    )));
    // Positions past the table.
    assert!(is_len_err(run(shape, &q, kv, 5, 16)));
    // Page size 0.
    assert!(is_len_err(run(
        shape,
        &q,
        PagedKv { page_size: 0, ..kv },
        0,
        16
    )));
    // Pools not whole pages, and pools of different sizes.
    assert!(is_len_err(run(
        shape,
        &q,
        PagedKv { page_size: 3, ..kv },
        0,
        16
    )));
    assert!(is_len_err(run(
        shape,
        &q,
        PagedKv {
            v_pool: &short_pool,
            ..kv
        },
        0,
        16
    )));
    assert!(is_len_err(run(
        shape,
        &q,
        PagedKv {
            k_pool: &short_pool,
            ..kv
        },
        0,
        16
    )));
    // Output and query lengths.
    assert!(is_len_err(run(shape, &q, kv, 0, 15)));
    assert!(is_len_err(run(shape, &q[..15], kv, 0, 15)));
    // Head layouts.
    for bad in [
        AttentionShape {
            heads: 3,
            kv_heads: 2,
            head_dim: 4,
        },
        AttentionShape {
            heads: 2,
            kv_heads: 0,
            head_dim: 4,
        },
        AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 0,
        },
        AttentionShape {
            heads: 0,
            kv_heads: 1,
            head_dim: 4,
        },
    ] {
        assert!(is_len_err(run(bad, &q, kv, 0, 16)));
    }

    // write_kv: the same checks, plus K and V row lengths.
    let mut k_pool = pool.clone();
    let mut v_pool = pool.clone();
    let mut write = |table: &[u32], page_size: usize, pos0: usize, k: &[f32], v: &[f32]| {
        let kv = PagedKvMut {
            k_pool: &mut k_pool,
            v_pool: &mut v_pool,
            page_size,
            page_table: table,
        };
        write_kv(shape, kv, pos0, k, v)
    };
    let row = [1.0f32; 4];
    assert!(write(&table, 2, 5, &row, &row).is_ok());
    assert!(is_len_err(write(&table, 2, 6, &row, &row)));
    assert!(is_len_err(write(&bad_ids, 2, 2, &row, &row)));
    assert!(is_len_err(write(&table, 0, 0, &row, &row)));
    assert!(is_len_err(write(&table, 2, 0, &row[..3], &row[..3])));
    assert!(is_len_err(write(&table, 2, 0, &row, &[1.0; 8])));
    let mut short_v = short_pool.clone();
    let mut k_pool = pool.clone();
    let kv = PagedKvMut {
        k_pool: &mut k_pool,
        v_pool: &mut short_v,
        page_size: 2,
        page_table: &table,
    };
    assert!(is_len_err(write_kv(shape, kv, 0, &row, &row)));
}

/// The decode path before split-key decode, kept as the reference: one query head at a time
/// over the whole context, in one online softmax.
fn reference_decode(
    shape: AttentionShape,
    q: &[f32],
    kv: &PagedKv<'_>,
    n_keys: usize,
    scale: f32,
    simd: bool,
) -> Vec<f32> {
    let d = shape.head_dim;
    let (kv_row, group) = (shape.kv_heads * d, shape.heads / shape.kv_heads);
    let mut out = vec![0f32; q.len()];
    for (head, o) in out.chunks_exact_mut(d).enumerate() {
        let w = Walk::new(kv, kv_row, (head / group) * d);
        let qh = &q[head * d..(head + 1) * d];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the tests pass `simd` only where AVX2, FMA and F16C were detected.
            unsafe { one_query_avx2(&w, qh, o, n_keys, scale) };
            continue;
        }
        one_query(&w, false, qh, o, n_keys, scale);
    }
    out
}

#[inline(always)]
fn one_query(w: &Walk<'_>, simd: bool, q: &[f32], out: &mut [f32], n_keys: usize, scale: f32) {
    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
    out.fill(0.0);
    let mut t0 = 0;
    while t0 < n_keys {
        let n = TILE.min(n_keys - t0);
        w.tile(simd, q, out, &mut m, &mut l, t0, n, 0, scale);
        t0 += n;
    }
    if l > 0.0 {
        scale_body(out, 1.0 / l);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn one_query_avx2(w: &Walk<'_>, q: &[f32], out: &mut [f32], n_keys: usize, scale: f32) {
    one_query(w, true, q, out, n_keys, scale)
}

/// One decode step's inputs: `n_keys` keys already in shuffled pages, and one query row.
struct DecodeCase {
    shape: AttentionShape,
    page_size: usize,
    n_keys: usize,
    q: Vec<f32>,
    k16: Vec<f32>,
    v16: Vec<f32>,
    k_pool: Vec<f16>,
    v_pool: Vec<f16>,
    table: Vec<u32>,
}

impl DecodeCase {
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
        let q = gen(shape.heads * head_dim, seed, 1);
        let k = gen(n_keys * kv_row, seed, 2);
        let v = gen(n_keys * kv_row, seed, 3);
        let (table, num_pages) = shuffled_table(n_keys.div_ceil(page_size), 2, seed as u64);
        let mut k_pool = vec![f16::NAN; num_pages * page_size * kv_row];
        let mut v_pool = k_pool.clone();
        let kv = PagedKvMut {
            k_pool: &mut k_pool,
            v_pool: &mut v_pool,
            page_size,
            page_table: &table,
        };
        write_kv(shape, kv, 0, &k, &v).unwrap();
        let round =
            |x: &[f32]| -> Vec<f32> { x.iter().map(|&a| f16::from_f32(a).to_f32()).collect() };
        DecodeCase {
            shape,
            page_size,
            n_keys,
            q,
            k16: round(&k),
            v16: round(&v),
            k_pool,
            v_pool,
            table,
        }
    }

    fn kv(&self) -> PagedKv<'_> {
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

    /// Split-key decode with an explicit plan.
    fn decode(&self, simd: bool, plan: Plan) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.q.len()];
        decode(
            self.shape,
            &self.q,
            &self.kv(),
            0..self.n_keys,
            self.scale(),
            &mut out,
            simd,
            plan,
            None,
        );
        out
    }

    /// The public entry point (its own plan and SIMD choice).
    fn public(&self) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.q.len()];
        paged_causal_attention(
            self.shape,
            &self.q,
            self.kv(),
            self.n_keys - 1,
            self.scale(),
            &mut out,
        )
        .unwrap();
        out
    }

    fn reference(&self, simd: bool) -> Vec<f32> {
        reference_decode(
            self.shape,
            &self.q,
            &self.kv(),
            self.n_keys,
            self.scale(),
            simd,
        )
    }

    /// Attention over all the keys computed in f64 (from the f16-rounded K/V), rounded to f32.
    fn exact(&self) -> Vec<f32> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
        } = self.shape;
        let (kv_row, group, scale) = (kv_heads * d, heads / kv_heads, self.scale() as f64);
        let mut out = vec![0f32; heads * d];
        for (h, o) in out.chunks_exact_mut(d).enumerate() {
            let (qh, off) = (&self.q[h * d..(h + 1) * d], (h / group) * d);
            let s: Vec<f64> = (0..self.n_keys)
                .map(|t| {
                    let k = &self.k16[t * kv_row + off..][..d];
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
            for (t, &wt) in w.iter().enumerate() {
                let v = &self.v16[t * kv_row + off..][..d];
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

    fn label(&self) -> String {
        format!(
            "heads {} kv {} dim {} page {} keys {}",
            self.shape.heads, self.shape.kv_heads, self.shape.head_dim, self.page_size, self.n_keys
        )
    }
}

/// The largest error of `got` against `want`, each head's error relative to that head's largest
/// magnitude in `want`.
fn max_rel_err(got: &[f32], want: &[f32], head_dim: usize) -> f32 {
    assert_eq!(got.len(), want.len());
    got.chunks_exact(head_dim)
        .zip(want.chunks_exact(head_dim))
        .map(|(g, w)| {
            let mag = w.iter().fold(f32::MIN_POSITIVE, |a, &x| a.max(x.abs()));
            g.iter()
                .zip(w)
                .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() / mag })
                .fold(0f32, f32::max)
        })
        .fold(0f32, f32::max)
}

/// Tolerance (relative, see [`max_rel_err`]) of split-key decode against attention computed in
/// f64, and of its AVX2 path against its portable one. Measured: about 1e-6.
const TOL: f32 = 1e-5;
/// Tolerance of split-key decode against the unsplit walk: the unsplit sum over one long run of
/// tiles rounds more (measured against f64: up to 1e-5 at 9,000 keys, where split stays near
/// 1e-6), so the two differ by up to about that.
const SPLIT_TOL: f32 = 2.5e-5;

/// Checks one case: split vs f64 and vs unsplit (both instruction paths), AVX2 vs portable,
/// the public entry point, and bit-equality across serial/parallel runs and pool sizes.
fn check_decode_case(c: &DecodeCase) -> std::result::Result<(), TestCaseError> {
    let d = c.shape.head_dim;
    let label = c.label();
    let exact = c.exact();
    let plan = Plan::new(c.shape.heads, c.n_keys);
    let forced = Plan {
        chunk: CHUNK,
        parallel: true,
    };
    let unsplit = Plan {
        chunk: c.n_keys,
        parallel: false,
    };
    let simd_paths: &[bool] = if cpu::features().avx2 {
        &[false, true]
    } else {
        &[false]
    };
    let mut split_results = Vec::new();
    for &simd in simd_paths {
        let reference = c.reference(simd);
        // Unsplit is the old walk exactly.
        prop_assert_eq!(&c.decode(simd, unsplit), &reference, "unsplit, {}", &label);
        let split = c.decode(simd, forced);
        if c.n_keys <= CHUNK {
            // One canonical chunk: the plain online softmax.
            prop_assert_eq!(&split, &reference, "one chunk, {}", &label);
        }
        let err = max_rel_err(&split, &exact, d);
        prop_assert!(
            err <= TOL,
            "split vs f64 (simd {}): {} at {}",
            simd,
            err,
            &label
        );
        let err = max_rel_err(&split, &reference, d);
        prop_assert!(
            err <= SPLIT_TOL,
            "split vs unsplit (simd {}): {} at {}",
            simd,
            err,
            &label
        );
        // The same chunks run serially, or in pools of any size, give the same bits.
        let serial = c.decode(
            simd,
            Plan {
                parallel: false,
                ..forced
            },
        );
        prop_assert_eq!(&serial, &split, "serial vs parallel, {}", &label);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let pooled = pool.install(|| c.decode(simd, forced));
            prop_assert_eq!(&pooled, &split, "{} threads, {}", threads, &label);
        }
        split_results.push(split);
    }
    if let [portable, avx2] = &split_results[..] {
        let err = max_rel_err(avx2, portable, d);
        prop_assert!(err <= TOL, "avx2 vs portable: {} at {}", err, &label);
    }
    // The public entry point follows `Plan::new` with the detected instruction set.
    let simd = cpu::features().avx2;
    prop_assert_eq!(&c.public(), &c.decode(simd, plan), "public, {}", &label);
    Ok(())
}

#[test]
fn split_decode_matches_unsplit_over_shapes() {
    let mut seed = 0;
    let mut check = |kv_heads, group, head_dim, page_size, n_keys| {
        seed += 1;
        let c = DecodeCase::new(kv_heads, group, head_dim, page_size, n_keys, seed);
        check_decode_case(&c).unwrap();
    };
    for (kv_heads, group) in [(1, 1), (1, 4), (2, 7), (3, 3), (2, 1), (3, 2), (1, 5)] {
        for head_dim in [64, 128, 256] {
            for page_size in [16, 32] {
                for n_keys in [1, 63, 130, 700, 2049] {
                    check(kv_heads, group, head_dim, page_size, n_keys);
                }
            }
        }
    }
    // The longest context for the models' shapes (SmolLM2, Gemma-3, Qwen2.5) and a few more.
    for (kv_heads, group, head_dim, page_size) in [
        (3, 3, 64, 16),
        (1, 4, 256, 32),
        (2, 7, 64, 16),
        (1, 1, 128, 16),
        (3, 6, 128, 32),
    ] {
        check(kv_heads, group, head_dim, page_size, 9000);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn split_decode_matches_unsplit(
        kv_heads in 1usize..=3, group in 1usize..=7,
        head_dim in prop_oneof![Just(64usize), Just(128), Just(256), Just(24)],
        page_size in prop_oneof![Just(16usize), Just(32), 1usize..40],
        n_keys in 1usize..9000, seed in 0u32..1000,
    ) {
        let c = DecodeCase::new(kv_heads, group, head_dim, page_size, n_keys, seed);
        check_decode_case(&c)?;
    }

    /// Any chunking, even one that cuts pages and tiles, is the same attention.
    #[test]
    fn any_chunking_is_the_same_attention(
        kv_heads in 1usize..=3, group in 1usize..=4, page_size in 1usize..40,
        n_keys in 1usize..1500, chunk in 1usize..600, seed in 0u32..1000,
    ) {
        let c = DecodeCase::new(kv_heads, group, 64, page_size, n_keys, seed);
        let exact = c.exact();
        for simd in [false, cpu::features().avx2] {
            let reference = c.reference(simd);
            let split = c.decode(simd, Plan { chunk, parallel: true });
            let err = max_rel_err(&split, &reference, 64);
            prop_assert!(err <= SPLIT_TOL, "chunk {}: {} at {}", chunk, err, c.label());
            let err = max_rel_err(&split, &exact, 64);
            prop_assert!(err <= TOL, "chunk {} vs f64: {} at {}", chunk, err, c.label());
        }
    }
}

#[test]
fn decode_plan_is_canonical() {
    // The chunks never depend on the context length (or anything else); only where they run
    // does.
    for heads in [1, 4, 9, 14] {
        for n_keys in (1..20_000).step_by(97) {
            let plan = Plan::new(heads, n_keys);
            assert_eq!(plan.chunk, CHUNK);
            assert_eq!(
                plan.parallel,
                n_keys > CHUNK && n_keys * heads >= SERIAL_DECODE_KEYS
            );
        }
    }
    assert_eq!(CHUNK % TILE, 0);
    assert_eq!(chunk_end(0, 10_000), CHUNK);
    assert_eq!(chunk_end(CHUNK - 1, 10_000), CHUNK);
    assert_eq!(chunk_end(CHUNK, 10_000), 2 * CHUNK);
    assert_eq!(chunk_end(CHUNK + 5, CHUNK + 9), CHUNK + 9);
}

/// `n` query rows ending at the end of `c`'s context, and the keys they see: rows
/// `n_keys - n .. n_keys`.
fn prompt_rows(c: &DecodeCase, n: usize, seed: u32) -> Vec<f32> {
    gen(n * c.shape.heads * c.shape.head_dim, seed, 4)
}

/// Runs `paged_attention_with` for the rows `q` at positions `pos0, pos0 + 1, …` in a pool of
/// `threads` threads.
fn attend_in_pool(
    c: &DecodeCase,
    q: &[f32],
    pos0: usize,
    simd: bool,
    pool: &rayon::ThreadPool,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    pool.install(|| {
        paged_attention_with(
            c.shape,
            q,
            c.kv(),
            pos0,
            NO_WINDOW,
            c.scale(),
            &mut out,
            simd,
        )
    })
    .unwrap();
    out
}

/// Checks the invariant for `n` prompt rows ending at `c`'s context: the prefill call's rows
/// equal, bit for bit, each row attended alone (the decode path), on both instruction paths,
/// in pools of 1 and 3 threads (decode splits across threads where the context is long).
fn check_prefill_matches_decode(
    c: &DecodeCase,
    n: usize,
    seed: u32,
) -> std::result::Result<(), TestCaseError> {
    let q = prompt_rows(c, n, seed);
    let q_row = c.shape.heads * c.shape.head_dim;
    let pos0 = c.n_keys - n;
    let label = format!("{} rows {}", c.label(), n);
    let pools: Vec<rayon::ThreadPool> = [1, 3]
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();
    let simd_paths: &[bool] = if cpu::features().avx2 {
        &[false, true]
    } else {
        &[false]
    };
    for &simd in simd_paths {
        let prefill: Vec<Vec<f32>> = pools
            .iter()
            .map(|pool| attend_in_pool(c, &q, pos0, simd, pool))
            .collect();
        prop_assert_eq!(
            &prefill[0],
            &prefill[1],
            "prefill, 1 vs 3 threads, {}",
            &label
        );
        for (pool, threads) in pools.iter().zip([1, 3]) {
            // Every row in the 3-thread pool; the first, middle and last on one thread (the
            // decode path's independence from the pool is also checked on its own above).
            let rows: Vec<usize> = if threads == 1 {
                vec![0, n / 2, n - 1]
            } else {
                (0..n).collect()
            };
            for r in rows {
                let row = &q[r * q_row..(r + 1) * q_row];
                let alone = attend_in_pool(c, row, pos0 + r, simd, pool);
                prop_assert_eq!(
                    &alone[..],
                    &prefill[0][r * q_row..(r + 1) * q_row],
                    "row {} at {} alone vs in prefill (simd {}, {} threads), {}",
                    r,
                    pos0 + r,
                    simd,
                    threads,
                    &label
                );
            }
        }
    }
    // The last row alone, through the public entry point, is the decode step itself.
    let simd = cpu::features().avx2;
    let last = &q[(n - 1) * q_row..];
    let mut public = vec![f32::NAN; q_row];
    paged_causal_attention(c.shape, last, c.kv(), c.n_keys - 1, c.scale(), &mut public).unwrap();
    prop_assert_eq!(
        &public[..],
        &attend_in_pool(c, &q, pos0, simd, &pools[1])[(n - 1) * q_row..],
        "public decode vs prefill, {}",
        &label
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// The canonical-order invariant: a prefill of `n` rows ending at a random context gives,
    /// for every row, the bits of that row attended alone.
    #[test]
    fn prefill_rows_match_decode_bit_for_bit(
        kv_heads in 1usize..=3, group in 1usize..=7,
        head_dim in prop_oneof![Just(64usize), Just(128), Just(256)],
        page_size in 1usize..40, n_keys in 1usize..9000, n in 1usize..=40, seed in 0u32..1000,
    ) {
        let n = n.min(n_keys);
        let c = DecodeCase::new(kv_heads, group, head_dim, page_size, n_keys, seed);
        check_prefill_matches_decode(&c, n, seed)?;
    }
}

/// The engine's case: a whole prompt run as prefill (a recompute) against its last token alone
/// (a cache hit), around the chunk and tile boundaries and past several chunks.
#[test]
fn whole_prompt_prefill_matches_last_token_decode() {
    let mut seed = 100;
    for (kv_heads, group, head_dim, page_size) in [
        (3, 3, 64, 16),
        (1, 4, 256, 32),
        (2, 7, 64, 16),
        (1, 1, 24, 7),
    ] {
        for n_keys in [1, 2, 63, 64, 65, 255, 256, 257, 511, 513, 700, 2100] {
            seed += 1;
            let c = DecodeCase::new(kv_heads, group, head_dim, page_size, n_keys, seed);
            let q = prompt_rows(&c, n_keys, seed);
            let q_row = c.shape.heads * head_dim;
            let mut full = vec![f32::NAN; q.len()];
            paged_causal_attention(c.shape, &q, c.kv(), 0, c.scale(), &mut full).unwrap();
            for r in [0, n_keys / 2, n_keys - 1] {
                let row = &q[r * q_row..(r + 1) * q_row];
                let mut alone = vec![f32::NAN; q_row];
                paged_causal_attention(c.shape, row, c.kv(), r, c.scale(), &mut alone).unwrap();
                assert_eq!(
                    alone[..],
                    full[r * q_row..(r + 1) * q_row],
                    "row {r} of {}",
                    c.label()
                );
            }
            // The partial-attention entry point over all the keys is the same walk.
            let mut part = vec![f32::NAN; q.len()];
            let mut lse = vec![0f32; n_keys * c.shape.heads];
            paged_attention_partial(
                c.shape,
                &q,
                c.kv(),
                0..n_keys,
                Some(0),
                c.scale(),
                &mut part,
                &mut lse,
            )
            .unwrap();
            assert_eq!(part, full, "partial vs causal, {}", c.label());
        }
    }
}

/// The engine attends to each sequence of a batch inside a parallel loop; nested splitting
/// gives the same bits as one sequence at a time.
#[test]
fn batched_long_decodes_match_one_at_a_time() {
    let cases: Vec<DecodeCase> = (0..4)
        .map(|i| DecodeCase::new(3, 3, 64, 16, 1500 + 1700 * i, i as u32))
        .collect();
    let one_at_a_time: Vec<Vec<f32>> = cases.iter().map(DecodeCase::public).collect();
    let batched: Vec<Vec<f32>> = cases.par_iter().map(DecodeCase::public).collect();
    assert_eq!(batched, one_at_a_time);
}

#[path = "paged_attention_window_tests.rs"]
mod window;

#[path = "paged_attention_q8_tests.rs"]
mod q8;
