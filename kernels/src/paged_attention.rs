//! Causal grouped-query attention over a paged KV pool of f16 values or Q8_0 blocks.
//!
//! # Layout
//!
//! One layer's keys live in `k_pool` and its values in `v_pool`, two slices of
//! `num_pages × page_size × kv_heads × head_dim` elements each, stored as
//! [`KvStore`] units: one `half::f16` per element, or one [`BlockQ8_0`] per 32 elements
//! (`head_dim` must then be a multiple of 32, so no block straddles two heads; offsets below
//! are in elements, divided by 32 to index the pool). Page `p` holds `page_size`
//! consecutive token rows of `kv_heads × head_dim` elements, starting at element
//! `p × page_size × kv_heads × head_dim`; within a row, K/V head `h` occupies
//! `h × head_dim .. (h + 1) × head_dim`. A sequence is a page table (`&[u32]`, page ids in
//! position order, in any order in the pool) plus its length: position `t` lives in page
//! `page_table[t / page_size]`, slot `t % page_size`.
//!
//! Storing K/V as f16 halves KV memory and bandwidth (23,040 bytes per token for SmolLM2-135M,
//! instead of 46,080 in f32), Q8_0 nearly halves it again (12,240); scores and accumulators
//! stay f32. Q8_0 tiles are dequantized to f32 before use, in decode and prefill alike (see
//! [`crate::kv_store`]), so the invariant below holds for both formats.
//!
//! # Algorithm
//!
//! The same online softmax as [`crate::attention`]: each query walks its keys in tiles of up to
//! 64 keys (a tile may span several pages), keeping a running maximum and sum, so no score
//! matrix is materialised and no context is ever copied out of the pages.
//!
//! # Invariant: one canonical order of operations per query row
//!
//! A query row's output is bit-for-bit the same whether it is computed alone (decode: serial,
//! or split across any number of threads) or as any row of a prefill call of any size, at any
//! position in it; the engine relies on this (a prefix-cache hit recomputes only the last
//! prompt token and must equal a full recompute). Every path follows this order for a row at
//! position `p`, which sees keys `0..=p`:
//!
//! 1. The keys are cut into chunks at fixed absolute positions `[0, C)`, `[C, 2C)`, … with
//!    `C` = [`CHUNK`] (256), a constant multiple of the tile; the causal limit ends the last
//!    chunk early. The cuts depend on neither the context length, the page size, the query
//!    block nor the thread count.
//! 2. Within a chunk, the online softmax starts from a fresh state (maximum `-inf`, sum 0,
//!    accumulator 0) and walks tiles of up to 64 keys from the chunk's start (so at absolute
//!    multiples of 64): scores, `tile::fold_softmax`, then the weighted values, key by key in
//!    order.
//! 3. The chunk states are merged into the row's running state in chunk order with one formula
//!    (`tile::merge_state`; merging into the fresh state is a copy, so the first chunk may be
//!    folded straight into the running state), and the result is divided by the final sum.
//! 4. The arithmetic is the same in every path for a given instruction choice: the AVX2+FMA+F16C
//!    kernels (`tile::scores`, `tile::accumulate`, and the same portable softmax and merge code)
//!    or the portable ones, chosen once per call from the detected CPU; f16 keys and values
//!    convert to f32 exactly, so reading them in place (decode) or from an f32 copy of the tile
//!    (prefill) gives the same products.
//!
//! Decode (one query row, in the private `flash_decode` module) computes the chunk states in
//! parallel, one rayon task per (K/V head, chunk) covering every query head of that K/V head's
//! group, so each key and value row is read once for the whole group, then merges them in
//! order. A context of one chunk runs straight into the output, and contexts shorter than 2,048
//! keys × query heads run their chunks on the calling thread. Calls made from inside a rayon
//! loop (the engine attends to a batch's sequences in parallel) split the same way, nested.
//!
//! Prefill (the private `prefill` module, `paged_prefill.rs`) runs one task per (K/V head,
//! block of query rows), so each page is read once for the whole query group; the block walks
//! the chunks in order and keeps a chunk state per row beside its running state. On AVX-512 its
//! scores and weighted values run on 512-bit registers whose halves are the AVX2 kernels' two
//! accumulators (`tile::scores_avx512`), so it stays equal to decode bit for bit. Query heads that share a K/V head read it in place. An AVX2+FMA+F16C
//! kernel (chosen at run time) converts eight f16 at a time with `vcvtph2ps` and, for 64-wide
//! heads, keeps the query or the accumulator in registers; a portable path handles every head
//! size and every CPU.
//!
//! [`paged_attention_partial`] and [`merge_partial_attention`] expose attention over a key range
//! and the merge of two such results (cascade attention), normalised, with log-sum-exps.

use crate::attention::AttentionShape;
use crate::cpu;
pub use crate::kv_store::{BlockQ8_0, KvStore, QK8_0};
use crate::tile;
use crate::{KernelError, Result};
use half::f16;
use rayon::prelude::*;

/// One layer's paged keys and values, read-only, for one sequence, stored as `S` (f16 or
/// [`BlockQ8_0`]).
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a, S = f16> {
    /// The key pool: `num_pages × page_size × kv_heads × head_dim` values in `S` units.
    pub k_pool: &'a [S],
    /// The value pool, laid out like `k_pool` (same length).
    pub v_pool: &'a [S],
    /// Token rows per page (at least 1).
    pub page_size: usize,
    /// The sequence's page ids, in position order.
    pub page_table: &'a [u32],
}

impl<S: KvStore> PagedKv<'_, S> {
    /// Checks the pools and the pages positions `0..n_pos` use, for K/V rows of `kv_row`
    /// elements (see `check_pages`); returns the number of pages in the pool.
    fn check(&self, kv_row: usize, n_pos: usize) -> Result<usize> {
        check_pages(
            kv_row / S::ELEMS,
            self.page_size,
            self.k_pool.len(),
            self.v_pool.len(),
            self.page_table,
            n_pos,
        )
    }
}

/// One layer's paged keys and values, writable, for one sequence (see [`write_kv`]).
#[derive(Debug)]
pub struct PagedKvMut<'a, S = f16> {
    /// The key pool: `num_pages × page_size × kv_heads × head_dim` values in `S` units.
    pub k_pool: &'a mut [S],
    /// The value pool, laid out like `k_pool` (same length).
    pub v_pool: &'a mut [S],
    /// Token rows per page (at least 1).
    pub page_size: usize,
    /// The sequence's page ids, in position order.
    pub page_table: &'a [u32],
}

/// Keys per online-softmax tile.
const TILE: usize = 64;

/// Keys per chunk of the canonical order (see the module documentation): chunks start at
/// absolute positions `0, CHUNK, 2·CHUNK, …`, whatever the context length, page size, query
/// block or thread count. A multiple of the 64-key tile, so tiles within a chunk also sit at
/// absolute multiples of 64. 256 was measured best of 128/256/512: it splits 512- and
/// 2,048-key decodes across two threads at no single-thread cost.
pub const CHUNK: usize = 256;

const _: () = assert!(CHUNK.is_multiple_of(TILE));

/// The end of the canonical chunk that key `t` falls in, capped at `end`.
#[inline(always)]
pub(crate) fn chunk_end(t: usize, end: usize) -> usize {
    ((t / CHUNK + 1) * CHUNK).min(end)
}

/// Query rows per prefill task.
const QUERY_BLOCK: usize = 16;

/// Checks the head layout for storage `S`; returns the K/V row length (`kv_heads × head_dim`).
fn check_shape<S: KvStore>(shape: AttentionShape) -> Result<usize> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    if kv_heads == 0 {
        return Err(KernelError::Length {
            what: "kv_heads (at least 1)",
            expected: 1,
            got: 0,
        });
    }
    if head_dim == 0 {
        return Err(KernelError::Length {
            what: "head_dim (at least 1)",
            expected: 1,
            got: 0,
        });
    }
    if !head_dim.is_multiple_of(S::ELEMS) {
        return Err(KernelError::PartialBlock {
            cols: head_dim,
            block: S::ELEMS,
        });
    }
    if heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(KernelError::Length {
            what: "query heads (a positive multiple of kv_heads)",
            expected: heads.div_ceil(kv_heads).max(1) * kv_heads,
            got: heads,
        });
    }
    Ok(kv_heads * head_dim)
}

/// Checks the pools (`k_len`, `v_len`: storage units; `kv_row`: units per token row) and the
/// first pages of the page table that positions `0..n_pos` use; returns the number of pages in
/// the pool.
fn check_pages(
    kv_row: usize,
    page_size: usize,
    k_len: usize,
    v_len: usize,
    page_table: &[u32],
    n_pos: usize,
) -> Result<usize> {
    if page_size == 0 {
        return Err(KernelError::Length {
            what: "page size (at least 1)",
            expected: 1,
            got: 0,
        });
    }
    let page_elems = page_size * kv_row;
    if !k_len.is_multiple_of(page_elems) {
        return Err(KernelError::Length {
            what: "key pool (whole pages of page_size × kv_heads × head_dim)",
            expected: k_len / page_elems * page_elems,
            got: k_len,
        });
    }
    if v_len != k_len {
        return Err(KernelError::Length {
            what: "value pool (same length as the key pool)",
            expected: k_len,
            got: v_len,
        });
    }
    let num_pages = k_len / page_elems;
    let needed = n_pos.div_ceil(page_size);
    if page_table.len() < needed {
        return Err(KernelError::Length {
            what: "page table (pages for the positions)",
            expected: needed,
            got: page_table.len(),
        });
    }
    if let Some(&bad) = page_table[..needed]
        .iter()
        .find(|&&p| p as usize >= num_pages)
    {
        return Err(KernelError::Length {
            what: "page id (below the pool's page count)",
            expected: num_pages,
            got: bad as usize,
        });
    }
    Ok(num_pages)
}

/// Writes the K/V rows `k`, `v` (f32, rows of `kv_heads × head_dim`, for positions
/// `pos0, pos0 + 1, …`) into their page slots, rounded to f16 or quantized to Q8_0 blocks
/// ([`KvStore::quantize`]). `shape.heads` is only checked, not used. Every page the positions
/// fall in must be in the page table and the pool.
pub fn write_kv<S: KvStore>(
    shape: AttentionShape,
    kv: PagedKvMut<'_, S>,
    pos0: usize,
    k: &[f32],
    v: &[f32],
) -> Result<()> {
    let kv_row = check_shape::<S>(shape)?;
    let units = kv_row / S::ELEMS;
    let n = k.len() / kv_row;
    if k.len() != n * kv_row {
        return Err(KernelError::Length {
            what: "new keys (whole rows of kv_heads × head_dim)",
            expected: n * kv_row,
            got: k.len(),
        });
    }
    if v.len() != k.len() {
        return Err(KernelError::Length {
            what: "new values (same length as the new keys)",
            expected: k.len(),
            got: v.len(),
        });
    }
    let PagedKvMut {
        k_pool,
        v_pool,
        page_size,
        page_table,
    } = kv;
    check_pages(
        units,
        page_size,
        k_pool.len(),
        v_pool.len(),
        page_table,
        pos0 + n,
    )?;
    for (i, (kr, vr)) in k
        .chunks_exact(kv_row)
        .zip(v.chunks_exact(kv_row))
        .enumerate()
    {
        let pos = pos0 + i;
        let row = page_table[pos / page_size] as usize * page_size + pos % page_size;
        let dst = row * units..(row + 1) * units;
        S::quantize(kr, &mut k_pool[dst.clone()]);
        S::quantize(vr, &mut v_pool[dst]);
    }
    Ok(())
}

/// Attention for `q` (rows of `heads × head_dim`, at positions `pos0, pos0 + 1, …`) over the
/// paged keys and values `kv`, causally: the query at position `p` sees keys `0..=p`, so the
/// keys and values of positions `0..pos0 + n_q` must already be in the pages (see
/// [`write_kv`]). Writes rows of `heads × head_dim` to `out`. Every length and every page id
/// the positions use is checked; a mismatch is a [`KernelError::Length`], never a panic.
///
/// Every query row follows the canonical order of the module documentation, so its output
/// depends on its own inputs only: not on how many rows the call has or where it sits among
/// them, and not on the number of threads. One query row (decode) over a long context is split
/// over the keys and runs on the rayon pool.
pub fn paged_causal_attention<S: KvStore>(
    shape: AttentionShape,
    q: &[f32],
    kv: PagedKv<'_, S>,
    pos0: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    paged_attention_with(
        shape,
        q,
        kv,
        pos0,
        NO_WINDOW,
        scale,
        out,
        cpu::features().avx2,
    )
}

/// [`paged_causal_attention`] with a sliding window: the query at position `p` sees only the
/// `window` keys `p + 1 - window ..= p` (fewer at the start), as llama.cpp's standard
/// sliding-window mask. Keys below the window are never read beyond the 64-key tile that holds
/// the window's first key (see [`window_start`]), so pages wholly below
/// `window_start(p + 1 - window)` may hold anything. The canonical order is the causal one with
/// the keys below the window masked (see the module documentation), so decode and prefill still
/// agree bit for bit. `window` must be at least 1.
pub fn paged_window_attention<S: KvStore>(
    shape: AttentionShape,
    q: &[f32],
    kv: PagedKv<'_, S>,
    pos0: usize,
    window: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    if window == 0 {
        return Err(KernelError::Length {
            what: "sliding window (at least 1 key)",
            expected: 1,
            got: 0,
        });
    }
    paged_attention_with(shape, q, kv, pos0, window, scale, out, cpu::features().avx2)
}

/// The window of plain causal attention: every earlier key.
const NO_WINDOW: usize = usize::MAX;

/// The first key a windowed walk reads for a row whose window starts at key `lo`: the start of
/// the 64-key tile that holds `lo` (keys from there to `lo` are read and masked). Pages wholly
/// below it are never read.
pub fn window_start(lo: usize) -> usize {
    lo / TILE * TILE
}

/// The first key a row at position `pos` sees under `window`.
#[inline(always)]
fn window_lo(pos: usize, window: usize) -> usize {
    (pos + 1).saturating_sub(window)
}

/// Overwrites with `-inf` the scores of the keys below `lo` in a tile that starts at key `t0`,
/// and returns the largest remaining score (`tmax` when nothing was masked). Masked keys then
/// add exactly zero to the softmax sum and the accumulator.
#[inline(always)]
pub(crate) fn mask_below(s: &mut [f32], t0: usize, lo: usize, tmax: f32) -> f32 {
    if lo <= t0 {
        return tmax;
    }
    let cut = (lo - t0).min(s.len());
    s[..cut].fill(f32::NEG_INFINITY);
    s[cut..].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// [`paged_causal_attention`] with the SIMD choice made by the caller (`simd` only where
/// AVX2, FMA and F16C were detected). Both the decode and the prefill path use that one choice,
/// so they give the same bits for the same row.
#[allow(clippy::too_many_arguments)]
fn paged_attention_with<S: KvStore>(
    shape: AttentionShape,
    q: &[f32],
    kv: PagedKv<'_, S>,
    pos0: usize,
    window: usize,
    scale: f32,
    out: &mut [f32],
    simd: bool,
) -> Result<()> {
    let kv_row = check_shape::<S>(shape)?;
    let AttentionShape {
        heads, head_dim, ..
    } = shape;
    let q_row = heads * head_dim;
    let n_q = q.len() / q_row;
    if q.len() != n_q * q_row {
        return Err(KernelError::Length {
            what: "attention queries (whole rows of heads × head_dim)",
            expected: n_q * q_row,
            got: q.len(),
        });
    }
    if out.len() != q.len() {
        return Err(KernelError::Length {
            what: "attention output",
            expected: q.len(),
            got: out.len(),
        });
    }
    kv.check(kv_row, pos0 + n_q)?;
    if n_q == 0 {
        return Ok(());
    }
    let simd = simd && cfg!(target_arch = "x86_64");
    if n_q == 1 {
        // Decode: split over the keys when the context is long (see `flash_decode`).
        let n_keys = pos0 + 1;
        let lo = window_lo(pos0, window);
        let plan = flash_decode::Plan::new(heads, n_keys - lo);
        flash_decode::decode(shape, q, &kv, lo..n_keys, scale, out, simd, plan, None);
        return Ok(());
    }
    // Prefill: blocks of query rows over all their visible keys.
    attend_blocks(
        Span {
            shape,
            kv: &kv,
            keys: 0..pos0 + n_q,
            causal_pos0: Some(pos0),
            window,
            scale,
            simd,
        },
        q,
        out,
        None,
        None,
    );
    Ok(())
}

/// Attention for `q` (rows of `heads × head_dim`) over only the keys `keys` of `kv`, returning
/// each (row, head)'s output normalised over those keys and, in `lse`, the log of its softmax
/// denominator (`-inf` where the row saw no key). With `causal_pos0 = Some(p)` row `r` sits at
/// position `p + r` and sees keys below `p + r + 1` only; with `None` every row sees all of
/// `keys`. Two such partial results over disjoint key ranges combine with
/// [`merge_partial_attention`] into attention over both: the building block of cascade
/// attention (a shared prefix attended once for many sequences). Split-key decode, inside
/// [`paged_causal_attention`], does the same with unnormalised partial states. The causal
/// prefill path is this function over `0..pos0 + n` without the log-sum-exps. Within `keys`,
/// the canonical order applies (chunks cut at absolute multiples of [`CHUNK`], tiles from each
/// chunk's start), so over `0..pos0 + n` it gives the bits of [`paged_causal_attention`]. (A
/// cascade over shared prefix pages was measured on this CPU and gave no gain over attending
/// per sequence, so the engine does not use one yet.)
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_partial<S: KvStore>(
    shape: AttentionShape,
    q: &[f32],
    kv: PagedKv<'_, S>,
    keys: std::ops::Range<usize>,
    causal_pos0: Option<usize>,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let kv_row = check_shape::<S>(shape)?;
    let q_row = shape.heads * shape.head_dim;
    let n_q = q.len() / q_row;
    if q.len() != n_q * q_row || out.len() != q.len() {
        return Err(KernelError::Length {
            what: "partial attention queries and output (whole rows of heads × head_dim)",
            expected: n_q * q_row,
            got: out.len(),
        });
    }
    if lse.len() != n_q * shape.heads {
        return Err(KernelError::Length {
            what: "partial attention log-sum-exp (one per row and head)",
            expected: n_q * shape.heads,
            got: lse.len(),
        });
    }
    kv.check(kv_row, keys.end)?;
    if n_q == 0 {
        return Ok(());
    }
    let simd = cpu::features().avx2 && cfg!(target_arch = "x86_64");
    attend_blocks(
        Span {
            shape,
            kv: &kv,
            keys,
            causal_pos0,
            window: NO_WINDOW,
            scale,
            simd,
        },
        q,
        out,
        Some(lse),
        None,
    );
    Ok(())
}

/// Combines two partial attentions over disjoint key ranges (see [`paged_attention_partial`]):
/// `out`/`lse` become the attention over both. `head_dim` splits the rows into heads.
pub fn merge_partial_attention(
    out: &mut [f32],
    lse: &mut [f32],
    other: &[f32],
    other_lse: &[f32],
    head_dim: usize,
) -> Result<()> {
    if other.len() != out.len() || other_lse.len() != lse.len() || out.len() != lse.len() * head_dim
    {
        return Err(KernelError::Length {
            what: "partial attentions to merge (same shapes, one lse per head)",
            expected: out.len(),
            got: other.len(),
        });
    }
    for (h, (o, l)) in out
        .chunks_exact_mut(head_dim)
        .zip(lse.iter_mut())
        .enumerate()
    {
        let (la, lb) = (*l, other_lse[h]);
        if lb == f32::NEG_INFINITY {
            continue;
        }
        let ob = &other[h * head_dim..(h + 1) * head_dim];
        if la == f32::NEG_INFINITY {
            o.copy_from_slice(ob);
            *l = lb;
            continue;
        }
        let m = la.max(lb);
        let (wa, wb) = ((la - m).exp(), (lb - m).exp());
        let inv = 1.0 / (wa + wb);
        for (x, y) in o.iter_mut().zip(ob) {
            *x = (*x * wa + *y * wb) * inv;
        }
        *l = m + (wa + wb).ln();
    }
    Ok(())
}

/// What a set of query blocks attends to.
struct Span<'k, 'a, S> {
    shape: AttentionShape,
    kv: &'k PagedKv<'a, S>,
    keys: std::ops::Range<usize>,
    causal_pos0: Option<usize>,
    /// Keys a causal row sees, itself included ([`NO_WINDOW`]: all).
    window: usize,
    scale: f32,
    simd: bool,
}

/// Runs one task per (K/V head, block of query rows) and scatters the results into `out` (and
/// the log-sum-exps into `lse`). With `init`, each row starts from its state over the keys
/// before `sp.keys` (a shared prefix, see [`cascade`]) instead of a fresh one.
fn attend_blocks<S: KvStore>(
    sp: Span<'_, '_, S>,
    q: &[f32],
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    init: Option<PrefixRows<'_>>,
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = sp.shape;
    let (q_row, kv_row, group) = (heads * head_dim, kv_heads * head_dim, heads / kv_heads);
    let n_q = q.len() / q_row;
    let blocks = n_q.div_ceil(QUERY_BLOCK);
    let results: Vec<(Vec<f32>, Vec<f32>)> = (0..kv_heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (kvh, blk) = (task / blocks, task % blocks);
            let rows = blk * QUERY_BLOCK..((blk + 1) * QUERY_BLOCK).min(n_q);
            // A windowed block starts at the tile of its first row's first key.
            let start = match sp.causal_pos0 {
                Some(pos0) if sp.window != NO_WINDOW => {
                    window_start(window_lo(pos0 + rows.start, sp.window)).max(sp.keys.start)
                }
                _ => sp.keys.start,
            };
            let p = Block {
                walk: Walk::new(sp.kv, kv_row, kvh * head_dim),
                q,
                q_row,
                kvh,
                group,
                head_dim,
                rows,
                keys: start..sp.keys.end,
                causal_pos0: sp.causal_pos0,
                window: sp.window,
                scale: sp.scale,
                init,
            };
            let mut res = vec![0f32; p.rows.len() * group * head_dim];
            let mut lse = vec![0f32; p.rows.len() * group];
            #[cfg(target_arch = "x86_64")]
            if sp.simd {
                if cpu::features().avx512 && head_dim.is_multiple_of(16) {
                    // SAFETY: AVX-512F was detected.
                    unsafe { block_queries_avx512(&p, &mut res, &mut lse) };
                } else {
                    // SAFETY: `simd` is set only where AVX2, FMA and F16C were detected.
                    unsafe { block_queries_avx2(&p, &mut res, &mut lse) };
                }
                return (res, lse);
            }
            block_queries::<S, false>(&p, false, &mut res, &mut lse);
            (res, lse)
        })
        .collect();
    let mut lse_out = lse;
    for (task, (res, l)) in results.iter().enumerate() {
        let (kvh, blk) = (task / blocks, task % blocks);
        for (i, chunk) in res.chunks_exact(group * head_dim).enumerate() {
            let r = blk * QUERY_BLOCK + i;
            out[r * q_row + kvh * group * head_dim..][..group * head_dim].copy_from_slice(chunk);
            if let Some(lo) = lse_out.as_deref_mut() {
                lo[r * heads + kvh * group..][..group].copy_from_slice(&l[i * group..][..group]);
            }
        }
    }
}

/// One K/V head of a sequence's pages: maps positions to pool offsets (in storage units).
struct Walk<'a, S = f16> {
    k: &'a [S],
    v: &'a [S],
    page_size: usize,
    table: &'a [u32],
    /// Units per token row.
    kv_row: usize,
    /// The head's first unit within a row.
    kv_off: usize,
}

impl<'a, S: KvStore> Walk<'a, S> {
    /// The walk over K/V head elements `kv_off..` of rows of `kv_row` elements.
    fn new(kv: &PagedKv<'a, S>, kv_row: usize, kv_off: usize) -> Self {
        Walk {
            k: kv.k_pool,
            v: kv.v_pool,
            page_size: kv.page_size,
            table: kv.page_table,
            kv_row: kv_row / S::ELEMS,
            kv_off: kv_off / S::ELEMS,
        }
    }

    /// The same walk over the pools as f16, when they are f16 (read in place by decode).
    #[inline(always)]
    fn as_f16(&self) -> Option<Walk<'a, f16>> {
        Some(Walk {
            k: S::as_f16(self.k)?,
            v: S::as_f16(self.v)?,
            page_size: self.page_size,
            table: self.table,
            kv_row: self.kv_row,
            kv_off: self.kv_off,
        })
    }

    /// The runs of keys `t0 + j .. t0 + j + len` that each sit in one page, as
    /// `(j, offset, len)`, `offset` being the pool offset of the run's first key of this head.
    /// An iterator rather than a callback: a closure does not inherit its caller's target
    /// features, so SIMD code inside one would become a function call per intrinsic.
    #[inline(always)]
    fn segments(&self, t0: usize, n: usize) -> Segments<'_, 'a, S> {
        Segments {
            walk: self,
            t0,
            n,
            j: 0,
        }
    }
}

impl Walk<'_, f16> {
    /// One online-softmax step: keys `t0..t0 + n` (n ≤ [`TILE`]) for query `q`, folded into
    /// the running maximum `m`, sum `l` and unnormalised accumulator `acc`.
    /// Keys below `lo` are masked (see [`mask_below`]); the tile must hold a key at or past
    /// `lo`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn tile(
        &self,
        simd: bool,
        q: &[f32],
        acc: &mut [f32],
        m: &mut f32,
        l: &mut f32,
        t0: usize,
        n: usize,
        lo: usize,
        scale: f32,
    ) {
        let mut scores = [0f32; TILE];
        let s = &mut scores[..n];
        let mut tmax = f32::NEG_INFINITY;
        for (j, off, len) in self.segments(t0, n) {
            let seg = &mut s[j..j + len];
            tmax = tmax.max(tile::scores(
                simd,
                q,
                &self.k[off..],
                self.kv_row,
                scale,
                seg,
            ));
        }
        let tmax = mask_below(s, t0, lo, tmax);
        tile::fold_softmax(acc, m, l, s, tmax);
        for (j, off, len) in self.segments(t0, n) {
            tile::accumulate(simd, acc, &self.v[off..], self.kv_row, &s[j..j + len]);
        }
    }
}

/// The per-page runs of a range of keys (see [`Walk::segments`]).
struct Segments<'w, 'a, S> {
    walk: &'w Walk<'a, S>,
    t0: usize,
    n: usize,
    j: usize,
}

impl<S> Iterator for Segments<'_, '_, S> {
    type Item = (usize, usize, usize);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.j >= self.n {
            return None;
        }
        let w = self.walk;
        let (j, pos) = (self.j, self.t0 + self.j);
        let slot = pos % w.page_size;
        let len = (w.page_size - slot).min(self.n - j);
        let row = w.table[pos / w.page_size] as usize * w.page_size + slot;
        self.j += len;
        Some((j, row * w.kv_row + w.kv_off, len))
    }
}

impl<S: KvStore> Walk<'_, S> {
    /// Converts keys and values `t0..t0 + n` of this head to f32, `head_dim` apart.
    #[inline(always)]
    fn load_tile(&self, simd: bool, t0: usize, n: usize, d: usize, k: &mut [f32], v: &mut [f32]) {
        let du = d / S::ELEMS;
        for (j, off, len) in self.segments(t0, n) {
            for i in 0..len {
                let src = off + i * self.kv_row;
                let dst = (j + i) * d;
                S::dequantize(simd, &self.k[src..src + du], &mut k[dst..dst + d]);
                S::dequantize(simd, &self.v[src..src + du], &mut v[dst..dst + d]);
            }
        }
    }
}

#[path = "paged_prefill.rs"]
mod prefill;
use prefill::{block_queries, block_states, Block};
#[cfg(target_arch = "x86_64")]
use prefill::{block_queries_avx2, block_queries_avx512, block_states_avx2, block_states_avx512};

#[path = "flash_decode.rs"]
mod flash_decode;

#[path = "cascade.rs"]
mod cascade;
pub use cascade::{paged_attention_after_prefix, paged_prefix_states, PrefixRows, PrefixStates};

#[cfg(test)]
#[path = "paged_attention_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "cascade_tests.rs"]
mod cascade_tests;
