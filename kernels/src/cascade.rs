//! Shared-prefix (cascade) attention: the keys that several sequences share (the same pages of
//! a system prompt, say) are attended once for all of their query rows, and each sequence then
//! continues over its own keys from that state.
//!
//! [`paged_prefix_states`] runs the prefill path's blocks over the shared keys with the query
//! rows of every sharing sequence side by side: each 64-key tile of the shared pages is read
//! and converted from f16 (or dequantized from Q8_0) once per block of [`super::QUERY_BLOCK`]
//! rows × the query heads of a K/V head, instead of once per query, and the pages are read
//! from memory once per step instead of once per sequence. Tasks are (K/V head, block of rows,
//! 256-key chunk), so even a step of a few rows spreads over every thread; the chunk states
//! are merged in chunk order. It returns the unnormalised
//! online-softmax states (accumulator, maximum, sum) of every (row, head), not normalised
//! outputs: [`paged_attention_after_prefix`] then merges each row's own chunks onto its state.
//!
//! # Exactness
//!
//! The shared keys must be a whole number of the canonical chunks (`0..k·CHUNK`). Their state is
//! then the canonical order's running state after chunk `k - 1` (chunk 0 copied, each later one
//! merged, the same tiles and arithmetic as every other path), and the continuation merges
//! chunks `k, k + 1, …` onto it in order: the operations a row goes through are exactly those
//! of [`super::paged_causal_attention`], so the output is the same bits, in decode and prefill,
//! whichever sequences happen to share the step. A cascade is never a numerical change.

use super::{
    attend_blocks, check_shape, Block, KvStore, PagedKv, Span, Walk, CHUNK, NO_WINDOW, QUERY_BLOCK,
};
use crate::attention::AttentionShape;
use crate::tile;
use crate::{cpu, KernelError, Result};
use rayon::prelude::*;

/// The online-softmax states of query rows over the shared keys `0..keys` (see
/// [`paged_prefix_states`]): for row `r` and query head `h`, the unnormalised accumulator
/// `acc[(r·heads + h)·head_dim ..][..head_dim]`, the maximum `m[r·heads + h]` and the sum
/// `l[r·heads + h]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixStates {
    keys: usize,
    heads: usize,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl PrefixStates {
    /// The shared keys the states cover (`0..keys`).
    pub fn keys(&self) -> usize {
        self.keys
    }

    /// Query rows held.
    pub fn rows(&self) -> usize {
        self.m.len() / self.heads.max(1)
    }

    /// The states of rows `rows` (one sequence's rows, in the order they were given).
    pub fn slice(&self, rows: std::ops::Range<usize>) -> Option<PrefixRows<'_>> {
        if rows.end > self.rows() || rows.start > rows.end {
            return None;
        }
        let d = self.acc.len() / self.m.len().max(1);
        let h = self.heads;
        Some(PrefixRows {
            keys: self.keys,
            rows: rows.len(),
            acc: &self.acc[rows.start * h * d..rows.end * h * d],
            m: &self.m[rows.start * h..rows.end * h],
            l: &self.l[rows.start * h..rows.end * h],
        })
    }
}

/// Some rows' states over the shared keys `0..keys` (a view into [`PrefixStates`]), laid out
/// as there.
#[derive(Debug, Clone, Copy)]
pub struct PrefixRows<'a> {
    /// The shared keys covered: `0..keys`, a multiple of [`CHUNK`].
    pub keys: usize,
    /// Query rows.
    pub rows: usize,
    /// Unnormalised accumulators, `rows × heads × head_dim`.
    pub acc: &'a [f32],
    /// Running maxima, `rows × heads`.
    pub m: &'a [f32],
    /// Softmax sums, `rows × heads`.
    pub l: &'a [f32],
}

/// The states of the query rows `q` (rows of `heads × head_dim`, from any number of sequences)
/// over the keys `0..keys` of `kv`, which every row sees whole: the rows sit at positions
/// `keys` or later of sequences whose page tables start with `kv.page_table`'s pages. `keys`
/// must be a positive multiple of [`CHUNK`]; lengths and page ids are checked (an error, never
/// a panic). Runs one task per (K/V head, block of rows) on the rayon pool.
pub fn paged_prefix_states<S: KvStore>(
    shape: AttentionShape,
    q: &[f32],
    kv: PagedKv<'_, S>,
    keys: usize,
    scale: f32,
) -> Result<PrefixStates> {
    let kv_row = check_shape::<S>(shape)?;
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let q_row = heads * d;
    let n_q = q.len() / q_row;
    if q.len() != n_q * q_row {
        return Err(KernelError::Length {
            what: "prefix queries (whole rows of heads × head_dim)",
            expected: n_q * q_row,
            got: q.len(),
        });
    }
    if keys == 0 || !keys.is_multiple_of(CHUNK) {
        return Err(KernelError::Length {
            what: "shared prefix keys (a positive multiple of the 256-key chunk)",
            expected: (keys / CHUNK).max(1) * CHUNK,
            got: keys,
        });
    }
    kv.check(kv_row, keys)?;
    let simd = cpu::features().avx2 && cfg!(target_arch = "x86_64");
    let group = heads / kv_heads;
    let blocks = n_q.div_ceil(QUERY_BLOCK);
    let sp = Span {
        shape,
        kv: &kv,
        keys: 0..keys,
        causal_pos0: None,
        window: NO_WINDOW,
        scale,
        simd,
    };
    // One task per (K/V head, block of rows, chunk): the chunks of one block are independent
    // until merged, so a step with few rows still spreads over every thread. Each chunk's state
    // starts fresh, as in every path's canonical order.
    type State = (Vec<f32>, Vec<f32>, Vec<f32>);
    let chunks = keys / CHUNK;
    let results: Vec<State> = (0..kv_heads * blocks * chunks)
        .into_par_iter()
        .map(|task| {
            let (kvh, blk, c) = (
                task / (blocks * chunks),
                task / chunks % blocks,
                task % chunks,
            );
            let rows = blk * QUERY_BLOCK..((blk + 1) * QUERY_BLOCK).min(n_q);
            let p = Block {
                walk: Walk::new(sp.kv, kv_row, kvh * d),
                q,
                q_row,
                kvh,
                group,
                head_dim: d,
                rows,
                keys: c * CHUNK..(c + 1) * CHUNK,
                causal_pos0: None,
                window: NO_WINDOW,
                scale,
                init: None,
            };
            let nq = p.rows.len() * group;
            let (mut acc, mut m, mut l) = (vec![0f32; nq * d], vec![0f32; nq], vec![0f32; nq]);
            #[cfg(target_arch = "x86_64")]
            if sp.simd {
                if crate::cpu::features().avx512 && d.is_multiple_of(16) {
                    // SAFETY: AVX-512F was detected.
                    unsafe { super::block_states_avx512(&p, &mut acc, &mut m, &mut l) };
                } else {
                    // SAFETY: `simd` is set only where AVX2, FMA and F16C were detected.
                    unsafe { super::block_states_avx2(&p, &mut acc, &mut m, &mut l) };
                }
                return (acc, m, l);
            }
            super::block_states::<_, false>(&p, false, &mut acc, &mut m, &mut l);
            (acc, m, l)
        })
        .collect();
    let mut st = PrefixStates {
        keys,
        heads,
        acc: vec![0f32; n_q * q_row],
        m: vec![0f32; n_q * heads],
        l: vec![0f32; n_q * heads],
    };
    // Merged chunk by chunk in order: chunk 0 copied, each later one merged in (the canonical
    // order's running state after the last shared chunk).
    for (task, (acc, m, l)) in results.iter().enumerate() {
        let (kvh, blk, c) = (
            task / (blocks * chunks),
            task / chunks % blocks,
            task % chunks,
        );
        for qi in 0..m.len() {
            let (i, g) = (qi / group, qi % group);
            let h = (blk * QUERY_BLOCK + i) * heads + kvh * group + g;
            let src = &acc[qi * d..(qi + 1) * d];
            let dst = &mut st.acc[h * d..(h + 1) * d];
            if c == 0 {
                dst.copy_from_slice(src);
                (st.m[h], st.l[h]) = (m[qi], l[qi]);
            } else {
                tile::merge_state(dst, &mut st.m[h], &mut st.l[h], src, m[qi], l[qi]);
            }
        }
    }
    Ok(st)
}

/// [`super::paged_causal_attention`] for the rows `q` of one sequence (at positions `pos0,
/// pos0 + 1, …`) whose first `prefix.keys` keys were attended already, as `prefix` (their
/// states, from [`paged_prefix_states`]): attends the keys from `prefix.keys` to each row's
/// position and merges them onto the prefix states. Gives the same bits as
/// [`super::paged_causal_attention`] over all the keys. `prefix.keys` must not pass `pos0`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_after_prefix<S: KvStore>(
    shape: AttentionShape,
    q: &[f32],
    kv: PagedKv<'_, S>,
    pos0: usize,
    scale: f32,
    prefix: PrefixRows<'_>,
    out: &mut [f32],
) -> Result<()> {
    let kv_row = check_shape::<S>(shape)?;
    let AttentionShape {
        heads, head_dim, ..
    } = shape;
    let q_row = heads * head_dim;
    let n_q = q.len() / q_row;
    if q.len() != n_q * q_row || out.len() != q.len() {
        return Err(KernelError::Length {
            what: "attention queries and output (whole rows of heads × head_dim)",
            expected: n_q * q_row,
            got: out.len(),
        });
    }
    if prefix.rows != n_q
        || prefix.m.len() != n_q * heads
        || prefix.l.len() != n_q * heads
        || prefix.acc.len() != n_q * q_row
    {
        return Err(KernelError::Length {
            what: "prefix states (one per query row and head)",
            expected: n_q * heads,
            got: prefix.m.len(),
        });
    }
    if prefix.keys > pos0 || !prefix.keys.is_multiple_of(CHUNK) {
        return Err(KernelError::Length {
            what: "prefix keys (whole chunks, before the first query's position)",
            expected: pos0 / CHUNK * CHUNK,
            got: prefix.keys,
        });
    }
    kv.check(kv_row, pos0 + n_q)?;
    if n_q == 0 {
        return Ok(());
    }
    let simd = cpu::features().avx2 && cfg!(target_arch = "x86_64");
    if n_q == 1 {
        let n_keys = pos0 + 1;
        let plan = super::flash_decode::Plan::new(heads, n_keys - prefix.keys);
        super::flash_decode::decode(
            shape,
            q,
            &kv,
            prefix.keys..n_keys,
            scale,
            out,
            simd,
            plan,
            Some(prefix),
        );
        return Ok(());
    }
    attend_blocks(
        Span {
            shape,
            kv: &kv,
            keys: prefix.keys..pos0 + n_q,
            causal_pos0: Some(pos0),
            window: NO_WINDOW,
            scale,
            simd,
        },
        q,
        out,
        None,
        Some(prefix),
    );
    Ok(())
}
