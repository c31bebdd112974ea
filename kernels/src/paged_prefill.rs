//! Prefill attention: every query row of a block of rows for one K/V head's query group, in the
//! canonical order of [`super`] (see its module documentation), tile by tile on an f32 copy of
//! each tile of keys and values.

use super::{chunk_end, mask_below, window_lo, KvStore, PrefixRows, Walk, TILE};
use crate::tile;
use crate::vecops::scale_body;

/// One task: the query heads of K/V head `kvh` for query rows `rows`, over `keys`.
pub(super) struct Block<'a, S> {
    pub(super) walk: Walk<'a, S>,
    pub(super) q: &'a [f32],
    pub(super) q_row: usize,
    pub(super) kvh: usize,
    pub(super) group: usize,
    pub(super) head_dim: usize,
    pub(super) rows: std::ops::Range<usize>,
    pub(super) keys: std::ops::Range<usize>,
    pub(super) causal_pos0: Option<usize>,
    pub(super) window: usize,
    pub(super) scale: f32,
    /// Each row's state over the keys before `keys` (a shared prefix), or `None` to start
    /// fresh.
    pub(super) init: Option<PrefixRows<'a>>,
}

/// Online-softmax attention for every query of a [`Block`], in the canonical order (see the
/// module documentation): chunk by chunk of [`super::CHUNK`] keys at absolute positions, each chunk
/// tile by tile from its start into a fresh state that is then merged into the row's running
/// state ([`tile::merge_state`]; the first chunk folds straight into the running state, which
/// is the same as merging into a fresh one). Each tile is converted to f32 once and then used by
/// every query of the block. Writes rows of `group × head_dim` (normalised) into `out` and each
/// query's log-sum-exp into `lse`.
#[inline(always)]
pub(super) fn block_queries<S: KvStore, const W: bool>(
    p: &Block<'_, S>,
    simd: bool,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let nq = p.rows.len() * p.group;
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut l = vec![0f32; nq];
    block_states::<S, W>(p, simd, out, &mut m, &mut l);
    for (qi, acc) in out.chunks_exact_mut(p.head_dim).enumerate() {
        if l[qi] > 0.0 {
            scale_body(acc, 1.0 / l[qi]);
            lse[qi] = m[qi] + l[qi].ln();
        } else {
            lse[qi] = f32::NEG_INFINITY;
        }
    }
}

/// The unnormalised online-softmax states (`out`, `m`, `l`: rows of `group × head_dim`, and
/// `group` maxima and sums per row) of every query of a [`Block`] over its keys, in the
/// canonical order; with `p.init`, starting from each row's state over the keys before.
#[inline(always)]
pub(super) fn block_states<S: KvStore, const W: bool>(
    p: &Block<'_, S>,
    simd: bool,
    out: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    let d = p.head_dim;
    let nq = p.rows.len() * p.group;
    out.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    if let Some(init) = &p.init {
        // Each row continues from its prefix state: the prefix's chunks were merged in order
        // (the first one copied), so merging the later chunks onto it keeps the canonical order.
        let heads = init.m.len() / init.rows;
        let gd = p.group * d;
        for (ri, r) in p.rows.clone().enumerate() {
            let h0 = r * heads + p.kvh * p.group;
            out[ri * gd..(ri + 1) * gd].copy_from_slice(&init.acc[h0 * d..h0 * d + gd]);
            m[ri * p.group..(ri + 1) * p.group].copy_from_slice(&init.m[h0..h0 + p.group]);
            l[ri * p.group..(ri + 1) * p.group].copy_from_slice(&init.l[h0..h0 + p.group]);
        }
    }
    let visible_end = |r: usize| match p.causal_pos0 {
        Some(pos0) => (pos0 + r + 1).min(p.keys.end),
        None => p.keys.end,
    };
    let visible_start = |r: usize| match p.causal_pos0 {
        Some(pos0) => window_lo(pos0 + r, p.window).max(p.keys.start),
        None => p.keys.start,
    };
    let last = p.rows.clone().map(visible_end).max().unwrap_or(0);
    let tile_keys = TILE.min(last.saturating_sub(p.keys.start));
    let mut buf = Buffers {
        k: vec![0f32; tile_keys * d],
        v: vec![0f32; tile_keys * d],
        scores: [0f32; TILE],
    };
    // The state of the second and later chunks, merged into `out`, `m`, `l` after each.
    let (mut cacc, mut cm, mut cl) = (Vec::new(), Vec::new(), Vec::new());
    let mut c0 = p.keys.start;
    while c0 < last {
        let c1 = chunk_end(c0, last);
        if c0 == p.keys.start && p.init.is_none() {
            block_chunk::<S, W>(
                p,
                simd,
                c0..c1,
                (&visible_start, &visible_end),
                &mut buf,
                out,
                m,
                l,
            );
        } else {
            cacc.clear();
            cacc.resize(nq * d, 0.0);
            cm.clear();
            cm.resize(nq, f32::NEG_INFINITY);
            cl.clear();
            cl.resize(nq, 0.0);
            block_chunk::<S, W>(
                p,
                simd,
                c0..c1,
                (&visible_start, &visible_end),
                &mut buf,
                &mut cacc,
                &mut cm,
                &mut cl,
            );
            for (qi, (acc, cacc)) in out
                .chunks_exact_mut(d)
                .zip(cacc.chunks_exact(d))
                .enumerate()
            {
                tile::merge_state(acc, &mut m[qi], &mut l[qi], cacc, cm[qi], cl[qi]);
            }
        }
        c0 = c1;
    }
}

/// The f32 copy of one tile's keys and values, and one query's scores over it.
struct Buffers {
    k: Vec<f32>,
    v: Vec<f32>,
    scores: [f32; TILE],
}

/// Folds the keys `keys` (one canonical chunk, or its part below `last`) into the states
/// (`acc`, `m`, `l`) of every query of a [`Block`], tile by tile from the chunk's start; a row
/// sees the keys from `visible.0(row)` (tiles wholly below it skipped, keys below it in its tile
/// masked) to below `visible.1(row)` only.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_chunk<S: KvStore, const W: bool>(
    p: &Block<'_, S>,
    simd: bool,
    keys: std::ops::Range<usize>,
    (visible_start, visible_end): (&impl Fn(usize) -> usize, &impl Fn(usize) -> usize),
    buf: &mut Buffers,
    acc: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    let d = p.head_dim;
    let mut t0 = keys.start;
    while t0 < keys.end {
        let n = TILE.min(keys.end - t0);
        p.walk.load_tile(simd, t0, n, d, &mut buf.k, &mut buf.v);
        for (ri, r) in p.rows.clone().enumerate() {
            let (lo, end) = (visible_start(r), visible_end(r));
            if t0 >= end || t0 + n <= lo {
                continue;
            }
            let nr = n.min(end - t0);
            let s = &mut buf.scores[..nr];
            for g in 0..p.group {
                let qi = ri * p.group + g;
                let head = p.kvh * p.group + g;
                let qv = &p.q[r * p.q_row + head * d..][..d];
                let acc = &mut acc[qi * d..(qi + 1) * d];
                #[cfg(target_arch = "x86_64")]
                if W {
                    // SAFETY: `W` is set only in `block_queries_avx512`, for heads that are a
                    // multiple of 16 on a CPU with AVX-512F; the tile holds `n` keys.
                    unsafe {
                        let tmax = tile::scores_avx512(qv, &buf.k, d, p.scale, s);
                        let tmax = mask_below(s, t0, lo, tmax);
                        tile::fold_softmax(acc, &mut m[qi], &mut l[qi], s, tmax);
                        tile::accumulate_avx512(acc, &buf.v, d, s);
                    }
                    continue;
                }
                let tmax = tile::scores(simd, qv, &buf.k, d, p.scale, s);
                let tmax = mask_below(s, t0, lo, tmax);
                tile::fold_softmax(acc, &mut m[qi], &mut l[qi], s, tmax);
                tile::accumulate(simd, acc, &buf.v, d, s);
            }
        }
        t0 += n;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn block_queries_avx2<S: KvStore>(
    p: &Block<'_, S>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    block_queries::<S, false>(p, true, out, lse)
}

/// [`block_queries`] with the scores and the weighted values on 512-bit registers (the same
/// bits as the AVX2 kernels: see [`tile::scores_avx512`]); heads a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub(super) unsafe fn block_queries_avx512<S: KvStore>(
    p: &Block<'_, S>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    block_queries::<S, true>(p, true, out, lse)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn block_states_avx2<S: KvStore>(
    p: &Block<'_, S>,
    out: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    block_states::<S, false>(p, true, out, m, l)
}

/// [`block_states_avx2`] with the 512-bit scores and weighted values (the same bits); heads a
/// multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub(super) unsafe fn block_states_avx512<S: KvStore>(
    p: &Block<'_, S>,
    out: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    block_states::<S, true>(p, true, out, m, l)
}
