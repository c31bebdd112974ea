//! Causal grouped-query attention with an online softmax.
//!
//! Each (query, head) pair walks its keys in tiles, keeping a running maximum and sum
//! (FlashAttention's online softmax), so no score matrix is ever materialised and memory stays
//! O(head_dim) per task. Query heads that share a K/V head read it in place: K and V are never
//! repeated per query head.

use crate::cpu;
use crate::tile;
use crate::vecops::{exp_sub_sum_body, scale_body};

use crate::{KernelError, Result};
use rayon::prelude::*;

/// The head layout of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

const TILE: usize = 64;

/// Attention for `q` (rows of `heads × head_dim`, at positions `pos0, pos0 + 1, …`) over the
/// keys and values `k`, `v` (rows of `kv_heads × head_dim` for positions `0..`), causally: the
/// query at position `p` sees keys `0..=p`. Writes rows of `heads × head_dim` to `out`.
pub fn causal_attention(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos0: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let q_row = heads * head_dim;
    let kv_row = kv_heads * head_dim;
    let n_q = q.len() / q_row.max(1);
    let needed_kv = (pos0 + n_q) * kv_row;
    if q.len() != n_q * q_row || out.len() != q.len() {
        return Err(KernelError::Length {
            what: "attention output",
            expected: q.len(),
            got: out.len(),
        });
    }
    if k.len() < needed_kv || v.len() < needed_kv {
        return Err(KernelError::Length {
            what: "attention keys/values",
            expected: needed_kv,
            got: k.len().min(v.len()),
        });
    }
    let group = heads / kv_heads;
    if n_q == 1 {
        // Decode: one task per query head; short contexts stay on this thread, where the work
        // is smaller than the cost of handing it to another.
        let one_head = |(head, o): (usize, &mut [f32])| {
            let qh = &q[head * head_dim..][..head_dim];
            let params = OneQuery {
                k,
                v,
                kv_row,
                kv_off: (head / group) * head_dim,
                n_keys: pos0 + 1,
                scale,
            };
            #[cfg(target_arch = "x86_64")]
            if cpu::features().avx2 {
                // SAFETY: AVX2 and FMA were detected at run time.
                return unsafe { one_query_avx2(&params, qh, o) };
            }
            one_query(&params, qh, o);
        };
        if (pos0 + 1) * heads < SERIAL_DECODE_KEYS {
            out.chunks_mut(head_dim).enumerate().for_each(one_head);
        } else {
            out.par_chunks_mut(head_dim).enumerate().for_each(one_head);
        }
        return Ok(());
    }
    // Prefill: one task per (K/V head, block of query rows). The block's queries walk the keys
    // tile by tile together, so each K/V tile is read from memory once and then served from L1.
    let blocks = n_q.div_ceil(QUERY_BLOCK);
    let results: Vec<Vec<f32>> = (0..kv_heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (kvh, blk) = (task / blocks, task % blocks);
            let rows = blk * QUERY_BLOCK..((blk + 1) * QUERY_BLOCK).min(n_q);
            let p = Block {
                q,
                k,
                v,
                q_row,
                kv_row,
                kvh,
                group,
                head_dim,
                rows,
                pos0,
                scale,
            };
            let mut res = vec![0f32; p.rows.len() * group * head_dim];
            #[cfg(target_arch = "x86_64")]
            if cpu::features().avx2 {
                // SAFETY: AVX2 and FMA were detected at run time.
                unsafe { block_queries_avx2(&p, &mut res) };
                return res;
            }
            block_queries(&p, &mut res);
            res
        })
        .collect();
    for (task, res) in results.iter().enumerate() {
        let (kvh, blk) = (task / blocks, task % blocks);
        for (i, chunk) in res.chunks_exact(group * head_dim).enumerate() {
            let r = blk * QUERY_BLOCK + i;
            out[r * q_row + kvh * group * head_dim..][..group * head_dim].copy_from_slice(chunk);
        }
    }
    Ok(())
}

/// Keys × heads below which decode attention runs on the calling thread.
const SERIAL_DECODE_KEYS: usize = 2048;

/// Query rows per prefill task.
const QUERY_BLOCK: usize = 16;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn one_query_avx2(p: &OneQuery<'_>, q: &[f32], out: &mut [f32]) {
    one_query(p, q, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_queries_avx2(p: &Block<'_>, out: &mut [f32]) {
    block_queries(p, out)
}

/// One prefill task: the query heads of K/V head `kvh` for query rows `rows`.
struct Block<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    q_row: usize,
    kv_row: usize,
    kvh: usize,
    group: usize,
    head_dim: usize,
    rows: std::ops::Range<usize>,
    pos0: usize,
    scale: f32,
}

/// Online-softmax attention for every query of a [`Block`], tile by tile over the keys; writes
/// rows of `group × head_dim` into `out`.
#[inline(always)]
fn block_queries(p: &Block<'_>, out: &mut [f32]) {
    let d = p.head_dim;
    let nq = p.rows.len() * p.group;
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut l = vec![0f32; nq];
    let mut scores = [0f32; TILE];
    let kv_off = p.kvh * d;
    let last_keys = p.pos0 + p.rows.end;
    let mut t0 = 0;
    while t0 < last_keys {
        for (ri, r) in p.rows.clone().enumerate() {
            let n_keys = p.pos0 + r + 1;
            if t0 >= n_keys {
                continue;
            }
            let n = TILE.min(n_keys - t0);
            for g in 0..p.group {
                let qi = ri * p.group + g;
                let head = p.kvh * p.group + g;
                let qv = &p.q[r * p.q_row + head * d..][..d];
                let acc = &mut out[qi * d..(qi + 1) * d];
                let s = &mut scores[..n];
                let tmax = tile_scores(qv, &p.k[t0 * p.kv_row + kv_off..], p.kv_row, p.scale, s);
                tile::fold_softmax(acc, &mut m[qi], &mut l[qi], s, tmax);
                tile_accumulate(acc, &p.v[t0 * p.kv_row + kv_off..], p.kv_row, s);
            }
        }
        t0 += TILE;
    }
    for (qi, acc) in out.chunks_exact_mut(d).enumerate() {
        if l[qi] > 0.0 {
            scale_body(acc, 1.0 / l[qi]);
        }
    }
}

struct OneQuery<'a> {
    k: &'a [f32],
    v: &'a [f32],
    kv_row: usize,
    kv_off: usize,
    n_keys: usize,
    scale: f32,
}

#[inline(always)]
fn one_query(p: &OneQuery<'_>, q: &[f32], out: &mut [f32]) {
    let mut scores = [0f32; TILE];
    let mut m = f32::NEG_INFINITY;
    let mut l = 0f32;
    out.fill(0.0);
    let mut t0 = 0;
    while t0 < p.n_keys {
        let n = TILE.min(p.n_keys - t0);
        let s = &mut scores[..n];
        let tmax = tile_scores(q, &p.k[t0 * p.kv_row + p.kv_off..], p.kv_row, p.scale, s);
        if tmax > m {
            if l > 0.0 {
                let c = (m - tmax).exp();
                scale_body(out, c);
                l *= c;
            }
            m = tmax;
        }
        l += exp_sub_sum_body(s, m);
        tile_accumulate(out, &p.v[t0 * p.kv_row + p.kv_off..], p.kv_row, s);
        t0 += n;
    }
    if l > 0.0 {
        scale_body(out, 1.0 / l);
    }
}

/// `scores[j] = scale · q·k_j` for the keys of a tile (see [`tile::scores`]).
#[inline(always)]
fn tile_scores(q: &[f32], k: &[f32], stride: usize, scale: f32, scores: &mut [f32]) -> f32 {
    tile::scores(cpu::features().avx2, q, k, stride, scale, scores)
}

/// `acc += Σ_j w[j] · v_j` over the values of a tile (see [`tile::accumulate`]).
#[inline(always)]
fn tile_accumulate(acc: &mut [f32], v: &[f32], stride: usize, w: &[f32]) {
    tile::accumulate(cpu::features().avx2, acc, v, stride, w)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Softmax attention written the obvious way (f64), with K/V heads repeated per query head.
    pub(crate) fn naive(
        shape: AttentionShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        pos0: usize,
        scale: f32,
    ) -> Vec<f32> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let n_q = q.len() / (heads * d);
        let mut out = vec![0f32; q.len()];
        for r in 0..n_q {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qh = &q[(r * heads + h) * d..][..d];
                let n_keys = pos0 + r + 1;
                let s: Vec<f64> = (0..n_keys)
                    .map(|j| {
                        let kj = &k[(j * kv_heads + kvh) * d..][..d];
                        qh.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let vj = &v[(j * kv_heads + kvh) * d..][..d];
                    for i in 0..d {
                        out[(r * heads + h) * d + i] += (w / z * vj[i] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_naive_attention(
            kv_heads in 1usize..3, group in 1usize..4, head_dim in prop_oneof![Just(8usize), Just(64)],
            pos0 in 0usize..150, n_q in 1usize..40, seed in 0u32..1000,
        ) {
            let shape = AttentionShape { heads: kv_heads * group, kv_heads, head_dim };
            let n_kv = pos0 + n_q;
            let gen = |n: usize, salt: u32| -> Vec<f32> {
                (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_add(salt)) % 1000) as f32 / 250.0 - 2.0).collect()
            };
            let q = gen(n_q * shape.heads * head_dim, 1);
            let k = gen(n_kv * kv_heads * head_dim, 2);
            let v = gen(n_kv * kv_heads * head_dim, 3);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let mut out = vec![0f32; q.len()];
            causal_attention(shape, &q, &k, &v, pos0, scale, &mut out).unwrap();
            let want = naive(shape, &q, &k, &v, pos0, scale);
            for (a, b) in out.iter().zip(&want) {
                prop_assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn rejects_short_kv() {
        let shape = AttentionShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        let q = vec![0.0; 8];
        let mut out = vec![0.0; 8];
        let err = causal_attention(shape, &q, &[0.0; 4], &[0.0; 4], 3, 1.0, &mut out).unwrap_err();
        assert!(matches!(err, KernelError::Length { .. }));
    }
}
