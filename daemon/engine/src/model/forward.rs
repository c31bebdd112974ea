//! The forward pass: a batch of sequences' new tokens through the network, their keys and
//! values written into KV pages, logits out for the sequences that ask for them.

use super::arch::Activation;
use super::error::{ModelError, Result};
use super::experts::ExpertScratch;
use super::kv::{KvPages, Pools};
use super::weights::{forward_shared, MatScratch, RowSplit};
use super::Mlp;
use super::Model;
pub use crate::executor::{RowKind, SeqStep};
use agentd_kernels::attention::AttentionShape;
use agentd_kernels::norm::rms_norm;
use agentd_kernels::paged_attention::{
    paged_attention_after_prefix, paged_causal_attention, paged_prefix_states,
    paged_window_attention, write_kv, KvStore, PagedKv, PagedKvMut, PrefixStates, CHUNK,
};
use agentd_kernels::vecops;
use rayon::prelude::*;

/// A single sequence's KV in its own growable pages, for the oracle tests (the product runs
/// every sequence through the scheduler).
#[cfg(test)]
pub struct KvCache {
    pages: KvPages,
    table: Vec<u32>,
    len: usize,
}

#[cfg(test)]
impl KvCache {
    pub(super) fn new(pages: KvPages) -> Self {
        Self {
            pages,
            table: Vec::new(),
            len: 0,
        }
    }

    /// Tokens whose keys and values are cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position from `len` on (to re-run from a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held for keys and values.
    pub fn size_bytes(&self) -> usize {
        self.pages.size_bytes()
    }
}

/// Buffers reused across the layers of one forward call.
#[derive(Default)]
struct Scratch {
    norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Per-head QK-norm output, and post-norm output.
    normed: Vec<f32>,
    mat: MatScratch,
    experts: ExpertScratch,
}

impl Model {
    /// Runs `tokens` (the sequence's next tokens, at positions `cache.len()…`) through the
    /// network, appends their keys and values to `cache`, and returns the logits for the last
    /// of them. One token is a decode row, several are prompt rows.
    #[cfg(test)]
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.forward_cached(tokens, cache, false)
    }

    /// [`Model::forward`], returning the logits of every one of `tokens` (row after row).
    #[cfg(test)]
    pub fn forward_all(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.forward_cached(tokens, cache, true)
    }

    #[cfg(test)]
    fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache, all: bool) -> Result<Vec<f32>> {
        let ps = cache.pages.page_size();
        let need = (cache.len + tokens.len()).div_ceil(ps);
        if need > cache.table.len() {
            cache.pages.grow(need.next_power_of_two());
            cache.table = (0..cache.pages.num_pages() as u32).collect();
        }
        let kind = if tokens.len() == 1 {
            RowKind::Decode
        } else {
            RowKind::Prompt
        };
        let step = SeqStep {
            tokens,
            pos0: cache.len,
            page_table: &cache.table,
            kind,
            logits: 1,
        };
        let logits = if all {
            self.forward_all_logits(step, &mut cache.pages)?
        } else {
            let mut out = self.forward_batch(&[step], &mut cache.pages)?;
            out.pop().flatten().expect("logits were asked for")
        };
        cache.len += tokens.len();
        Ok(logits)
    }

    fn check_step(&self, s: &SeqStep<'_>, page_size: usize, num_pages: usize) -> Result<()> {
        let c = &self.config;
        let n = s.tokens.len();
        let bad = |reason: String| ModelError::BadTensor {
            name: "input".into(),
            reason,
        };
        if n == 0 {
            return Err(bad("no tokens to run".into()));
        }
        let limit = c.context_length.min(self.ropes[0].positions());
        if s.pos0 + n > limit {
            return Err(ModelError::ContextOverflow {
                needed: s.pos0 + n,
                limit,
            });
        }
        if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(ModelError::TokenOutOfRange { id, vocab: c.vocab });
        }
        let pages = (s.pos0 + n).div_ceil(page_size);
        if s.page_table.len() < pages {
            return Err(bad(format!(
                "page table has {} pages, positions up to {} need {pages}",
                s.page_table.len(),
                s.pos0 + n
            )));
        }
        if let Some(p) = s.page_table[..pages]
            .iter()
            .find(|&&p| p as usize >= num_pages)
        {
            return Err(bad(format!("page {p} is outside the pool of {num_pages}")));
        }
        Ok(())
    }

    /// One forward step over a batch of sequences: every sequence's new tokens run through the
    /// network together (every row, decode or prompt, in one quantized product per shared input),
    /// each sequence's keys and values go into its pages in `kv`, and attention
    /// reads them back from the pages. Returns, per sequence in order, the logits of its last
    /// `logits` new tokens (row after row, `logits × vocab` values) when it asked for any.
    pub fn forward_batch(
        &self,
        seqs: &[SeqStep<'_>],
        kv: &mut KvPages,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        self.run_batch(seqs, kv, false)
    }

    /// Runs one sequence's new tokens (`step`, whose `logits` flag is ignored) like
    /// [`Model::forward_batch`] and returns the logits of *every* new token, row after row
    /// (`step.tokens.len() × vocab` values): what perplexity needs. Each row's logits are
    /// computed exactly as the last row's are in [`Model::forward_batch`] (the head on 8-bit
    /// activations unless loaded with [`super::LoadOptions::exact`]), so the last row
    /// equals what `forward_batch` returns for the same step.
    pub fn forward_all_logits(&self, step: SeqStep<'_>, kv: &mut KvPages) -> Result<Vec<f32>> {
        let step = SeqStep {
            logits: step.tokens.len(),
            ..step
        };
        let mut out = self.run_batch(&[step], kv, true)?;
        Ok(out.pop().flatten().unwrap_or_default())
    }

    /// [`Model::forward_batch`]; with `all_rows`, a sequence that asks for logits gets every
    /// new row's rather than the last one's.
    fn run_batch(
        &self,
        seqs: &[SeqStep<'_>],
        kv: &mut KvPages,
        all_rows: bool,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        for s in seqs {
            self.check_step(s, kv.page_size(), kv.num_pages())?;
        }
        // Decode rows first, then prompt rows; `order[i]` is the i-th sequence in row order.
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].kind == RowKind::Prompt);
        let mut row0 = vec![0usize; seqs.len()];
        let mut split = RowSplit {
            decode: 0,
            prompt: 0,
        };
        for &i in &order {
            row0[i] = split.total();
            match seqs[i].kind {
                RowKind::Decode => split.decode += seqs[i].tokens.len(),
                RowKind::Prompt => split.prompt += seqs[i].tokens.len(),
            }
        }
        let n = split.total();
        let hidden = c.hidden;
        let mut x = vec![0f32; n * hidden];
        for (i, s) in seqs.iter().enumerate() {
            for (j, &t) in s.tokens.iter().enumerate() {
                let r = row0[i] + j;
                let row = &mut x[r * hidden..(r + 1) * hidden];
                self.embedding.lookup(t as usize, row);
                if c.embedding_scale != 1.0 {
                    vecops::scale(row, c.embedding_scale);
                }
            }
        }
        let shape = AttentionShape {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        };
        let (q_row, kv_row) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let scale = c.attention_scale;
        let page_size = kv.page_size();
        let mut expert_load = vec![0u64; c.experts];
        let mut s = Scratch {
            norm: vec![0f32; n * hidden],
            ..Default::default()
        };
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut s.norm);
            forward_shared(
                &[&layer.wq, &layer.wk, &layer.wv],
                &s.norm,
                split,
                &mut [&mut s.q, &mut s.k, &mut s.v],
                &mut s.mat,
            )?;
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                for (out, b) in [(&mut s.q, bq), (&mut s.k, bk), (&mut s.v, bv)] {
                    for row in out.chunks_exact_mut(b.len()) {
                        vecops::add(row, b);
                    }
                }
            }
            if let Some([qn, kn]) = &layer.qk_norm {
                // RMSNorm over each head (the weight is one head long).
                for (out, w) in [(&mut s.q, qn), (&mut s.k, kn)] {
                    s.normed.resize(out.len(), 0.0);
                    rms_norm(out, w, c.rms_eps, &mut s.normed);
                    std::mem::swap(out, &mut s.normed);
                }
            }
            let rope = &self.ropes[layer.rope];
            for (i, seq) in seqs.iter().enumerate() {
                let rows = row0[i]..row0[i] + seq.tokens.len();
                let q = &mut s.q[rows.start * q_row..rows.end * q_row];
                rope.apply_style(c.rope_style, q, seq.pos0, c.heads, c.head_dim);
                let k = &mut s.k[rows.start * kv_row..rows.end * kv_row];
                rope.apply_style(c.rope_style, k, seq.pos0, c.kv_heads, c.head_dim);
            }
            s.attn.resize(s.q.len(), 0.0);
            let step = LayerAttention {
                seqs,
                row0: &row0,
                order: &order,
                shape,
                page_size,
                scale,
                window: layer.window,
                shared_prefix: self.shared_prefix_attention(),
                q: &s.q,
                k: &s.k,
                v: &s.v,
            };
            match kv.pools_mut() {
                Pools::F16(p) => step.run(&mut p.k[li], &mut p.v[li], &mut s.attn)?,
                Pools::Q8_0(p) => step.run(&mut p.k[li], &mut p.v[li], &mut s.attn)?,
            }
            layer.wo.forward(&s.attn, split, &mut s.proj, &mut s.mat)?;
            add_residual(
                &mut x,
                &mut s.proj,
                layer.post_attn_norm.as_deref(),
                c,
                &mut s.normed,
            );

            rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut s.norm);
            match &layer.mlp {
                Mlp::Dense { gate, up, down } => {
                    forward_shared(
                        &[gate, up],
                        &s.norm,
                        split,
                        &mut [&mut s.gate, &mut s.up],
                        &mut s.mat,
                    )?;
                    gated_activation(c.activation, &mut s.gate, &s.up);
                    down.forward(&s.gate, split, &mut s.proj, &mut s.mat)?;
                }
                Mlp::Experts(e) => e.forward(
                    &s.norm,
                    split,
                    &mut s.proj,
                    &mut s.mat,
                    &mut s.experts,
                    &mut expert_load,
                )?,
            }
            add_residual(
                &mut x,
                &mut s.proj,
                layer.post_ffn_norm.as_deref(),
                c,
                &mut s.normed,
            );
        }
        if c.experts > 0 {
            self.record_expert_load(expert_load);
        }
        // The head runs only on the rows whose logits are wanted, in one product for the whole
        // batch. `wanted[j]` is a sequence
        // and the range of its rows whose logits it gets.
        let wanted: Vec<(usize, std::ops::Range<usize>)> = (0..seqs.len())
            .filter(|&i| seqs[i].logits > 0)
            .map(|i| {
                let end = row0[i] + seqs[i].tokens.len();
                let start = if all_rows {
                    row0[i]
                } else {
                    end - seqs[i].logits.min(seqs[i].tokens.len())
                };
                (i, start..end)
            })
            .collect();
        let head_n: usize = wanted.iter().map(|(_, r)| r.len()).sum();
        let mut normed = vec![0f32; head_n * hidden];
        let mut at = 0;
        for (_, rows) in &wanted {
            for r in rows.clone() {
                rms_norm(
                    &x[r * hidden..(r + 1) * hidden],
                    &self.output_norm,
                    c.rms_eps,
                    &mut normed[at * hidden..(at + 1) * hidden],
                );
                at += 1;
            }
        }
        let mut logits = Vec::new();
        let head_rows = RowSplit {
            decode: head_n,
            prompt: 0,
        };
        if head_n > 0 {
            self.head
                .forward(&normed, head_rows, &mut logits, &mut s.mat)?;
        }
        let mut out: Vec<Option<Vec<f32>>> = vec![None; seqs.len()];
        if let [(i, _)] = wanted.as_slice() {
            // One sequence: its logits are the whole buffer (no copy of n × vocab values).
            out[*i] = Some(logits);
            return Ok(out);
        }
        let mut at = 0;
        for (i, rows) in wanted {
            let n = rows.len();
            out[i] = Some(logits[at * c.vocab..(at + n) * c.vocab].to_vec());
            at += n;
        }
        Ok(out)
    }
}

/// `x += post_norm(y)` (or `x += y` without a post-norm); `y` may be overwritten.
fn add_residual(
    x: &mut [f32],
    y: &mut Vec<f32>,
    post_norm: Option<&[f32]>,
    c: &super::ModelConfig,
    scratch: &mut Vec<f32>,
) {
    if let Some(w) = post_norm {
        scratch.resize(y.len(), 0.0);
        rms_norm(y, w, c.rms_eps, scratch);
        std::mem::swap(y, scratch);
    }
    vecops::add(x, y);
}

/// One layer's attention for a batch, after RoPE: what it needs besides the layer's pools.
struct LayerAttention<'a> {
    seqs: &'a [SeqStep<'a>],
    /// Each sequence's first row.
    row0: &'a [usize],
    /// The sequences in row order.
    order: &'a [usize],
    shape: AttentionShape,
    page_size: usize,
    scale: f32,
    window: Option<usize>,
    /// Attend the leading pages that several sequences share once for all of them (see
    /// [`shared_prefix_groups`]).
    shared_prefix: bool,
    /// Every row's queries, keys and values.
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

impl LayerAttention<'_> {
    /// Writes each sequence's new keys and values into its pages (stored as `S`), then attends
    /// every row over its sequence's pages into `attn` (rows of `heads × head_dim`), the
    /// sequences in parallel.
    fn run<S: KvStore>(&self, k_pool: &mut [S], v_pool: &mut [S], attn: &mut [f32]) -> Result<()> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        let (q_row, kv_row) = (heads * head_dim, kv_heads * head_dim);
        for (i, seq) in self.seqs.iter().enumerate() {
            let rows = self.row0[i]..self.row0[i] + seq.tokens.len();
            let dst = PagedKvMut {
                k_pool: &mut *k_pool,
                v_pool: &mut *v_pool,
                page_size: self.page_size,
                page_table: seq.page_table,
            };
            let (k, v) = (
                &self.k[rows.start * kv_row..rows.end * kv_row],
                &self.v[rows.start * kv_row..rows.end * kv_row],
            );
            write_kv(self.shape, dst, seq.pos0, k, v)?;
        }
        let (k_pool, v_pool) = (&*k_pool, &*v_pool);
        // Shared prefixes: each group's shared keys attended once for all its members' rows.
        // A member then continues from its rows' states, which gives the same bits as
        // attending alone (see `agentd_kernels::paged_attention::paged_prefix_states`).
        let groups = match (self.window, self.shared_prefix) {
            (None, true) => shared_prefix_groups(self.seqs, self.page_size),
            _ => Vec::new(),
        };
        let mut member_of: Vec<Option<(usize, std::ops::Range<usize>)>> =
            vec![None; self.seqs.len()];
        let mut states: Vec<PrefixStates> = Vec::with_capacity(groups.len());
        for (gi, g) in groups.iter().enumerate() {
            let mut q_all = Vec::new();
            for &i in &g.members {
                let rows = q_all.len() / q_row..q_all.len() / q_row + self.seqs[i].tokens.len();
                let r0 = self.row0[i];
                q_all.extend_from_slice(&self.q[r0 * q_row..(r0 + rows.len()) * q_row]);
                member_of[i] = Some((gi, rows));
            }
            let kv = PagedKv {
                k_pool,
                v_pool,
                page_size: self.page_size,
                page_table: self.seqs[g.members[0]].page_table,
            };
            states.push(paged_prefix_states(
                self.shape, &q_all, kv, g.keys, self.scale,
            )?);
        }
        // Each sequence's output rows, in row order, paired with the sequence.
        let mut outs: Vec<(usize, &mut [f32])> = Vec::with_capacity(self.seqs.len());
        let mut rest = attn;
        for &i in self.order {
            let (head, tail) = rest.split_at_mut(self.seqs[i].tokens.len() * q_row);
            outs.push((i, head));
            rest = tail;
        }
        let attend = |(i, out): (usize, &mut [f32])| {
            let seq = &self.seqs[i];
            let kv = PagedKv {
                k_pool,
                v_pool,
                page_size: self.page_size,
                page_table: seq.page_table,
            };
            let rows = self.row0[i]..self.row0[i] + seq.tokens.len();
            let q = &self.q[rows.start * q_row..rows.end * q_row];
            let (shape, scale, pos0) = (self.shape, self.scale, seq.pos0);
            // A member's rows always lie within its group's states; were they not, attending
            // alone gives the same bits.
            let prefix = member_of[i]
                .as_ref()
                .and_then(|(gi, rows)| states[*gi].slice(rows.clone()));
            if let Some(prefix) = prefix {
                return paged_attention_after_prefix(shape, q, kv, pos0, scale, prefix, out);
            }
            match self.window {
                Some(w) => paged_window_attention(shape, q, kv, pos0, w, scale, out),
                None => paged_causal_attention(shape, q, kv, pos0, scale, out),
            }
        };
        if outs.len() == 1 {
            outs.into_iter().try_for_each(attend)?;
        } else {
            outs.into_par_iter().try_for_each(attend)?;
        }
        Ok(())
    }
}

/// Sequences of a step that share leading pages, and how many keys they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharedPrefix {
    /// The sharing sequences (indices into the step), in step order.
    pub members: Vec<usize>,
    /// The shared keys `0..keys`: a positive multiple of [`CHUNK`], in pages every member's
    /// table holds alike, and before every member's first new position.
    pub keys: usize,
}

/// Groups the sequences of a step whose page tables start with the same pages, for
/// shared-prefix attention. A sequence's candidates share its first page; within them, the
/// shared length chosen is the one that covers the most keys × members (members that share
/// less attend alone). Only whole [`CHUNK`]s before a member's first new position count, so the
/// keys are the same pages, already written, for every member, and the cascade keeps each
/// row's canonical order. Groups of one are dropped.
pub(crate) fn shared_prefix_groups(seqs: &[SeqStep<'_>], page_size: usize) -> Vec<SharedPrefix> {
    let mut by_first: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, s) in seqs.iter().enumerate() {
        if s.pos0 >= CHUNK && !s.tokens.is_empty() {
            if let Some(&p) = s.page_table.first() {
                by_first.entry(p).or_default().push(i);
            }
        }
    }
    let mut groups = Vec::new();
    for members in by_first.into_values().filter(|m| m.len() >= 2) {
        let lead = seqs[members[0]].page_table;
        // The keys each member shares with the lead (whole chunks, before its new rows).
        let shared: Vec<usize> = members
            .iter()
            .map(|&i| {
                let pages = lead
                    .iter()
                    .zip(seqs[i].page_table)
                    .take_while(|(a, b)| a == b)
                    .count();
                (pages * page_size)
                    .min(seqs[i].pos0)
                    .min(seqs[members[0]].pos0)
                    / CHUNK
                    * CHUNK
            })
            .collect();
        let best = shared
            .iter()
            .copied()
            .filter(|&k| k >= CHUNK)
            .map(|k| (k * shared.iter().filter(|&&s| s >= k).count(), k))
            .max();
        let Some((_, keys)) = best else { continue };
        let chosen: Vec<usize> = members
            .iter()
            .zip(&shared)
            .filter(|&(_, &s)| s >= keys)
            .map(|(&i, _)| i)
            .collect();
        if chosen.len() >= 2 {
            groups.push(SharedPrefix {
                members: chosen,
                keys,
            });
        }
    }
    groups
}

/// Elements per task of the elementwise steps that run in parallel for a batch of rows.
const PAR_ELEMS: usize = 32 << 10;

/// `gate = act(gate) · up`, elementwise, in parallel for large batches (each element is computed
/// alone, so the split changes no bit).
fn gated_activation(act: Activation, gate: &mut [f32], up: &[f32]) {
    let one = |g: &mut [f32], u: &[f32]| match act {
        Activation::Silu => vecops::silu_mul(g, u),
        Activation::GeluTanh => vecops::gelu_mul(g, u),
    };
    if gate.len() < 2 * PAR_ELEMS {
        return one(gate, up);
    }
    gate.par_chunks_mut(PAR_ELEMS)
        .zip(up.par_chunks(PAR_ELEMS))
        .for_each(|(g, u)| one(g, u));
}

#[cfg(test)]
mod shared_prefix_tests {
    use super::*;

    fn step<'a>(tokens: &'a [u32], pos0: usize, table: &'a [u32]) -> SeqStep<'a> {
        SeqStep {
            tokens,
            pos0,
            page_table: table,
            kind: RowKind::Decode,
            logits: 1,
        }
    }

    #[test]
    fn groups_take_the_shared_whole_chunks_that_cover_the_most() {
        let t = [7u32];
        // 64 pages of 16 = 1,024 keys shared by three sequences; a fourth shares 20 pages
        // (320 keys: one chunk); a fifth starts elsewhere; a sixth is too short.
        let common: Vec<u32> = (0..64).collect();
        let own = |base: u32| -> Vec<u32> { common.iter().copied().chain([base]).collect() };
        let (a, b, c) = (own(100), own(101), own(102));
        let d: Vec<u32> = common[..20].iter().copied().chain(200..250).collect();
        let e: Vec<u32> = (300..380).collect();
        let f: Vec<u32> = vec![0];
        let seqs = [
            step(&t, 1030, &a),
            step(&t, 1025, &b),
            step(&t, 1100, &c),
            step(&t, 1000, &d),
            step(&t, 1000, &e),
            step(&t, 3, &f),
        ];
        let groups = shared_prefix_groups(&seqs, 16);
        assert_eq!(
            groups,
            vec![SharedPrefix {
                members: vec![0, 1, 2],
                keys: 1024,
            }]
        );
        // A member whose new rows start inside the shared pages caps the keys at its position.
        let seqs = [step(&t, 700, &a), step(&t, 1025, &b)];
        let groups = shared_prefix_groups(&seqs, 16);
        assert_eq!(groups[0].keys, 512);
        // Fewer than two sharing sequences, or less than a chunk shared: no group.
        assert!(shared_prefix_groups(&seqs[..1], 16).is_empty());
        let seqs = [step(&t, 200, &a), step(&t, 200, &b)];
        assert!(shared_prefix_groups(&seqs, 16).is_empty());
    }
}
