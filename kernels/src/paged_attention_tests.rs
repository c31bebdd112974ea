//! Tests for paged attention: against a naive reference and the contiguous kernel, over shuffled page tables.
use super::*;
use crate::attention::causal_attention;
use crate::attention::tests::naive;
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

fn gen(n: usize, seed: u32, salt: u32) -> Vec<f32> {
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
        paged_attention_with(shape, &q, kv, pos0, scale, &mut portable, false).unwrap();
        assert_close(&portable, &contiguous, 1e-4, "portable vs causal_attention")?;
        if cpu::features().avx2 {
            let mut simd = vec![0f32; q.len()];
            paged_attention_with(shape, &q, kv, pos0, scale, &mut simd, true).unwrap();
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
