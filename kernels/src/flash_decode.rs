//! Decode attention (one query row) over the paged KV pool, split across the keys
//! (flash-decoding), in the canonical order of [`super`] (see its module documentation).
//!
//! The keys are cut into the canonical chunks `[0, CHUNK)`, `[CHUNK, 2·CHUNK)`, … (the last one
//! ends at the context). One task per (K/V head, chunk) computes, for every query head of that
//! K/V head's group, the online-softmax state of its chunk from a fresh start: the running
//! maximum `m`, the sum `l` of `e^(s - m)` and the unnormalised output `Σ e^(s - m)·v`. It walks
//! its keys tile by tile from the chunk's start and, within a tile, query head by query head, so
//! each key and value row is fetched from memory once for the whole group (the other heads find
//! it in cache). The states are then merged chunk 0, 1, 2, … in that order with
//! [`tile::merge_state`] and normalised.
//!
//! The chunks are fixed (they depend on neither the context length, the page size nor the
//! thread count) and the merge order is fixed, so the result is bit-for-bit the same in any
//! thread pool, serial or parallel, and the same as the prefill path gives for that query row.
//! Contexts of one chunk run straight into the output on the calling thread; contexts of fewer
//! than [`SERIAL_DECODE_KEYS`] keys × query heads run their chunks on the calling thread, the
//! rest on the rayon pool.
//!
//! f16 keys and values are read in place; Q8_0 ones are dequantized a tile at a time into f32
//! buffers (once for the whole query group) and the tile is then walked exactly as the prefill
//! path walks its f32 copy, so the two paths stay equal bit for bit.

use super::{mask_below, window_start, KvStore, PagedKv, PrefixRows, Walk, CHUNK, TILE};
use crate::attention::AttentionShape;
use crate::tile;
use crate::vecops::scale_body;
use rayon::prelude::*;
use std::ops::Range;

/// Keys × query heads below which decode attention runs on the calling thread.
pub(super) const SERIAL_DECODE_KEYS: usize = 2048;

/// f32s per cache line.
const LINE: usize = 16;

/// How decode splits its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    /// Keys per chunk (the last chunk may be shorter); at least 1. Always [`CHUNK`] in
    /// [`Plan::new`], the canonical order; the tests use other lengths to check the merge.
    pub chunk: usize,
    /// Whether the (K/V head, chunk) tasks run on the rayon pool or on this thread. The result
    /// is the same either way.
    pub parallel: bool,
}

impl Plan {
    /// The plan for `n_keys` keys and `heads` query heads: canonical chunks, run on this thread
    /// below [`SERIAL_DECODE_KEYS`] keys × query heads or when there is one chunk, else on the
    /// rayon pool.
    pub fn new(heads: usize, n_keys: usize) -> Plan {
        Plan {
            chunk: CHUNK,
            parallel: n_keys * heads >= SERIAL_DECODE_KEYS && n_keys > CHUNK,
        }
    }
}

/// Decode attention for one query row `q` (`heads × head_dim`) over keys `keys` of `kv`
/// (`lo..n_keys`: all earlier keys, or a sliding window), split as `plan` says; writes
/// `heads × head_dim` to `out`. Keys from the start of `lo`'s 64-key tile are read, those below
/// `lo` masked, and chunks lie at absolute multiples of the plan's chunk, so a windowed row
/// follows the same order as in the prefill path. The caller has checked every length and page
/// id; `simd` only where AVX2, FMA and F16C were detected.
///
/// With `prefix` (one row's state over the keys `0..prefix.keys`, a whole number of chunks,
/// computed once for every sequence sharing those pages: see [`super::cascade`]), `keys` must
/// start at `prefix.keys`: the chunks from there are merged onto the prefix state in order,
/// which is the canonical order, so the result is the same bits as without a prefix.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode<S: KvStore>(
    shape: AttentionShape,
    q: &[f32],
    kv: &PagedKv<'_, S>,
    keys: Range<usize>,
    scale: f32,
    out: &mut [f32],
    simd: bool,
    plan: Plan,
    prefix: Option<PrefixRows<'_>>,
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let (group, kv_row) = (heads / kv_heads, kv_heads * d);
    let gd = group * d;
    let (lo, n_keys) = (keys.start, keys.end);
    let run = |kvh: usize, keys: Range<usize>, acc: &mut [f32], m: &mut [f32], l: &mut [f32]| {
        let task = GroupChunk {
            walk: Walk::new(kv, kv_row, kvh * d),
            q: &q[kvh * gd..(kvh + 1) * gd],
            keys,
            lo,
            scale,
        };
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the caller chose `simd` only where AVX2, FMA and F16C were detected.
            return unsafe { group_chunk_avx2(&task, acc, m, l) };
        }
        group_chunk(&task, false, acc, m, l);
    };
    // Chunks `first..first + chunks` at absolute multiples of the chunk length; the first
    // starts at the tile that holds `lo`.
    let first = lo / plan.chunk;
    let chunks = n_keys.div_ceil(plan.chunk).max(first + 1) - first;
    let chunk_keys = |c: usize| {
        let c = first + c;
        (c * plan.chunk).max(window_start(lo))..((c + 1) * plan.chunk).min(n_keys)
    };
    if chunks == 1 && prefix.is_none() {
        // One chunk per K/V head, accumulated straight into `out` (the same as merging it
        // into a fresh state).
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
            run(kvh, chunk_keys(0), acc, m, l);
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
        run(kvh, chunk_keys(c), acc, m, l);
    };
    if plan.parallel {
        parts.par_chunks_mut(stride).enumerate().for_each(task);
    } else {
        parts.chunks_mut(stride).enumerate().for_each(task);
    }
    // Merge in chunk order, so the sums do not depend on which thread ran what: the first
    // state copied (as merging it into a fresh one would), then each later one merged in.
    for (kvh, out) in out.chunks_exact_mut(gd).enumerate() {
        let states = &parts[kvh * chunks * stride..(kvh + 1) * chunks * stride];
        for (g, o) in out.chunks_exact_mut(d).enumerate() {
            let state = |c: usize| {
                let p = &states[c * stride..(c + 1) * stride];
                (&p[g * d..(g + 1) * d], p[gd + g], p[gd + group + g])
            };
            // Without a prefix, chunk 0's state is the start; with one, the prefix's state
            // (itself chunks merged in order) is, and every chunk here is merged onto it.
            let (acc0, mut m, mut l, from) = match &prefix {
                None => {
                    let (a, m, l) = state(0);
                    (a, m, l, 1)
                }
                Some(p) => {
                    let h = kvh * group + g;
                    (&p.acc[h * d..(h + 1) * d], p.m[h], p.l[h], 0)
                }
            };
            o.copy_from_slice(acc0);
            for c in from..chunks {
                let (acc, mc, lc) = state(c);
                tile::merge_state(o, &mut m, &mut l, acc, mc, lc);
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

/// One task: the query heads of one K/V head (`q`, `group × head_dim`) over the keys `keys`.
struct GroupChunk<'a, S> {
    walk: Walk<'a, S>,
    q: &'a [f32],
    keys: Range<usize>,
    /// Keys below this one are masked (a sliding window's start; 0 without one).
    lo: usize,
    scale: f32,
}

/// The online-softmax state of every query head of a [`GroupChunk`], from a fresh start:
/// unnormalised accumulators in `acc` (`group × head_dim`), maxima in `m` and sums in `l`
/// (`group` each). Walks the keys a tile at a time from the chunk's start (the canonical tiles)
/// and runs every query head over the tile before the next, so the tile's keys and values stay
/// in cache for the whole group.
#[inline(always)]
fn group_chunk<S: KvStore>(
    t: &GroupChunk<'_, S>,
    simd: bool,
    acc: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    let d = t.q.len() / m.len();
    acc.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let in_place = t.walk.as_f16();
    let tile_keys = TILE.min(t.keys.len());
    let (mut kb, mut vb) = match in_place {
        Some(_) => (Vec::new(), Vec::new()),
        None => (vec![0f32; tile_keys * d], vec![0f32; tile_keys * d]),
    };
    let mut scores = [0f32; TILE];
    let mut t0 = t.keys.start;
    while t0 < t.keys.end {
        let n = TILE.min(t.keys.end - t0);
        let heads = t.q.chunks_exact(d).zip(acc.chunks_exact_mut(d)).enumerate();
        if let Some(w) = &in_place {
            for (g, (qg, ag)) in heads {
                w.tile(simd, qg, ag, &mut m[g], &mut l[g], t0, n, t.lo, t.scale);
            }
        } else {
            // The prefill path's steps (`block_chunk`) on a dequantized copy of the tile.
            t.walk.load_tile(simd, t0, n, d, &mut kb, &mut vb);
            let s = &mut scores[..n];
            for (g, (qg, ag)) in heads {
                let tmax = tile::scores(simd, qg, &kb, d, t.scale, s);
                let tmax = mask_below(s, t0, t.lo, tmax);
                tile::fold_softmax(ag, &mut m[g], &mut l[g], s, tmax);
                tile::accumulate(simd, ag, &vb, d, s);
            }
        }
        t0 += n;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_chunk_avx2<S: KvStore>(
    t: &GroupChunk<'_, S>,
    acc: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
) {
    group_chunk(t, true, acc, m, l)
}
