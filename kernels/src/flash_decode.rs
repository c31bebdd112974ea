//! Decode attention (one query row) over the paged f16 KV pool, split across the keys
//! (flash-decoding).
//!
//! One task per (K/V head, chunk of keys) computes, for every query head of that K/V head's
//! group, the partial online-softmax state over its keys: the running maximum `m`, the sum `l`
//! of `e^(s - m)` and the unnormalised output `Σ e^(s - m)·v`. It walks its keys tile by tile
//! and, within a tile, query head by query head, so each key and value row is fetched from
//! memory once for the whole group (the other heads find it in cache). The partial states are
//! then merged chunk 0, 1, 2, … in that order and normalised.
//!
//! The chunk length is a function of the context length and the page size only (see
//! [`chunk_len`]), never of the number of threads, and the merge order is fixed, so the result is
//! bit-for-bit the same on any machine and in any thread pool. Short contexts (fewer than
//! [`SERIAL_DECODE_KEYS`] keys × query heads) run as one chunk per K/V head on the calling
//! thread, which gives exactly the unsplit online softmax.

use super::{PagedKv, Walk, TILE};
use crate::attention::AttentionShape;
use crate::vecops::scale_body;
use rayon::prelude::*;
use std::ops::Range;

/// Keys × query heads below which decode attention runs on the calling thread, unsplit.
pub(super) const SERIAL_DECODE_KEYS: usize = 2048;

/// The number of chunks a long context is split into (about: see [`chunk_len`]).
const TARGET_CHUNKS: usize = 16;

/// The fewest keys in a chunk (before rounding up to whole pages and tiles).
const MIN_CHUNK_KEYS: usize = 128;

/// f32s per cache line.
const LINE: usize = 16;

/// How decode splits its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    /// Keys per chunk (the last chunk may be shorter); at least 1.
    pub chunk: usize,
    /// Whether the (K/V head, chunk) tasks run on the rayon pool or on this thread. The result
    /// is the same either way.
    pub parallel: bool,
}

impl Plan {
    /// The plan for `n_keys` keys on pages of `page_size`: unsplit and serial below
    /// [`SERIAL_DECODE_KEYS`] keys × query heads, else chunks of [`chunk_len`] in parallel.
    pub fn new(heads: usize, n_keys: usize, page_size: usize) -> Plan {
        if n_keys * heads < SERIAL_DECODE_KEYS {
            Plan {
                chunk: n_keys.max(1),
                parallel: false,
            }
        } else {
            Plan {
                chunk: chunk_len(n_keys, page_size),
                parallel: true,
            }
        }
    }
}

/// Keys per chunk for a context of `n_keys` keys: about `n_keys / TARGET_CHUNKS`, at least
/// [`MIN_CHUNK_KEYS`], rounded up to whole pages covering at least one tile, so chunks start on
/// page boundaries (and, for pages that divide the tile, on the unsplit walk's tile boundaries).
/// Depends on `n_keys` and `page_size` only.
pub(super) fn chunk_len(n_keys: usize, page_size: usize) -> usize {
    let unit = page_size * TILE.div_ceil(page_size);
    n_keys
        .div_ceil(TARGET_CHUNKS)
        .max(MIN_CHUNK_KEYS)
        .next_multiple_of(unit)
}

/// Decode attention for one query row `q` (`heads × head_dim`) over keys `0..n_keys` of `kv`,
/// split as `plan` says; writes `heads × head_dim` to `out`. The caller has checked every
/// length and page id; `simd` only where AVX2, FMA and F16C were detected.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode(
    shape: AttentionShape,
    q: &[f32],
    kv: &PagedKv<'_>,
    n_keys: usize,
    scale: f32,
    out: &mut [f32],
    simd: bool,
    plan: Plan,
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let (group, kv_row) = (heads / kv_heads, kv_heads * d);
    let gd = group * d;
    let run = |kvh: usize, keys: Range<usize>, acc: &mut [f32], m: &mut [f32], l: &mut [f32]| {
        let task = GroupChunk {
            walk: Walk::new(kv, kv_row, kvh * d),
            q: &q[kvh * gd..(kvh + 1) * gd],
            keys,
            scale,
        };
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the caller chose `simd` only where AVX2, FMA and F16C were detected.
            return unsafe { group_chunk_avx2(&task, acc, m, l) };
        }
        group_chunk(&task, false, acc, m, l);
    };
    let chunks = n_keys.div_ceil(plan.chunk).max(1);
    if chunks == 1 && !plan.parallel {
        // One chunk per K/V head, accumulated straight into `out`.
        let mut stack = [0f32; 64];
        let mut heap = Vec::new();
        let ml = if 2 * group <= stack.len() {
            &mut stack[..2 * group]
        } else {
            heap.resize(2 * group, 0.0);
            &mut heap[..]
        };
        let (m, l) = ml.split_at_mut(group);
        for (kvh, acc) in out.chunks_exact_mut(gd).enumerate() {
            run(kvh, 0..n_keys, acc, m, l);
            for (o, &l) in acc.chunks_exact_mut(d).zip(l.iter()) {
                normalise(o, l);
            }
        }
        return;
    }
    // One partial state per (K/V head, chunk): `group × d` accumulators, then `group` maxima,
    // then `group` sums, each state starting on a cache line: the accumulators are read and
    // written once per key, and vectors that straddle lines made 256-wide heads about 10%
    // slower (measured).
    let stride = (gd + 2 * group).next_multiple_of(LINE);
    let mut buf = vec![0f32; kv_heads * chunks * stride + LINE];
    let start = buf.as_ptr().align_offset(LINE * 4).min(LINE);
    let parts = &mut buf[start..start + kv_heads * chunks * stride];
    let task = |(t, part): (usize, &mut [f32])| {
        let (kvh, c) = (t / chunks, t % chunks);
        let (acc, ml) = part.split_at_mut(gd);
        let (m, l) = ml.split_at_mut(group);
        run(
            kvh,
            c * plan.chunk..((c + 1) * plan.chunk).min(n_keys),
            acc,
            m,
            l,
        );
    };
    if plan.parallel {
        parts.par_chunks_mut(stride).enumerate().for_each(task);
    } else {
        parts.chunks_mut(stride).enumerate().for_each(task);
    }
    // Merge in chunk order, so the sums do not depend on which thread ran what.
    for (kvh, out) in out.chunks_exact_mut(gd).enumerate() {
        let states = &parts[kvh * chunks * stride..(kvh + 1) * chunks * stride];
        for (g, o) in out.chunks_exact_mut(d).enumerate() {
            let state = |c: usize| {
                let p = &states[c * stride..(c + 1) * stride];
                (&p[g * d..(g + 1) * d], p[gd + g], p[gd + group + g])
            };
            let (acc0, mut m, mut l) = state(0);
            o.copy_from_slice(acc0);
            for c in 1..chunks {
                let (acc, mc, lc) = state(c);
                merge_state(o, &mut m, &mut l, acc, mc, lc);
            }
            normalise(o, l);
        }
    }
}

/// Divides an unnormalised accumulator by its softmax sum `l` (leaves zeros where no key was
/// seen).
#[inline]
fn normalise(acc: &mut [f32], l: f32) {
    if l > 0.0 {
        scale_body(acc, 1.0 / l);
    }
}

/// Folds the partial state (`acc_b`, `m_b`, `l_b`) over later keys into (`acc`, `m`, `l`):
/// both become relative to the larger maximum and are added.
#[inline]
fn merge_state(acc: &mut [f32], m: &mut f32, l: &mut f32, acc_b: &[f32], m_b: f32, l_b: f32) {
    if l_b == 0.0 {
        return;
    }
    if *l == 0.0 {
        acc.copy_from_slice(acc_b);
        (*m, *l) = (m_b, l_b);
        return;
    }
    let mx = m.max(m_b);
    let (ca, cb) = ((*m - mx).exp(), (m_b - mx).exp());
    for (a, &b) in acc.iter_mut().zip(acc_b) {
        *a = *a * ca + b * cb;
    }
    *l = *l * ca + l_b * cb;
    *m = mx;
}

/// One task: the query heads of one K/V head (`q`, `group × head_dim`) over the keys `keys`.
struct GroupChunk<'a> {
    walk: Walk<'a>,
    q: &'a [f32],
    keys: Range<usize>,
    scale: f32,
}

/// The partial online-softmax state of every query head of a [`GroupChunk`]: unnormalised
/// accumulators in `acc` (`group × head_dim`), maxima in `m` and sums in `l` (`group` each).
/// Walks the keys a tile at a time and runs every query head over the tile before the next,
/// so the tile's keys and values stay in cache for the whole group.
#[inline(always)]
fn group_chunk(t: &GroupChunk<'_>, simd: bool, acc: &mut [f32], m: &mut [f32], l: &mut [f32]) {
    let d = t.q.len() / m.len();
    acc.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let mut t0 = t.keys.start;
    while t0 < t.keys.end {
        let n = TILE.min(t.keys.end - t0);
        for (g, (qg, ag)) in t.q.chunks_exact(d).zip(acc.chunks_exact_mut(d)).enumerate() {
            t.walk
                .tile(simd, qg, ag, &mut m[g], &mut l[g], t0, n, t.scale);
        }
        t0 += n;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_chunk_avx2(t: &GroupChunk<'_>, acc: &mut [f32], m: &mut [f32], l: &mut [f32]) {
    group_chunk(t, true, acc, m, l)
}
