//! The forward pass over a sequence's new tokens, and the per-sequence KV cache it extends.

use super::error::{ModelError, Result};
use super::weights::forward_shared;
use super::Model;
use agentd_kernels::attention::{causal_attention, AttentionShape};
use agentd_kernels::norm::rms_norm;
use agentd_kernels::quant::Q8Vector;
use agentd_kernels::vecops;

/// Keys and values of every layer for one sequence's tokens so far (f32, rows of
/// `kv_heads × head_dim` per position).
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    row: usize,
    len: usize,
}

impl KvCache {
    pub(super) fn new(layers: usize, row: usize) -> Self {
        Self {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            row,
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
        let len = len.min(self.len);
        for (k, v) in self.k.iter_mut().zip(&mut self.v) {
            k.truncate(len * self.row);
            v.truncate(len * self.row);
        }
        self.len = len;
    }

    /// Bytes held for keys and values.
    pub fn size_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.len() * 4).sum()
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
    q8: Q8Vector,
    fused: Vec<f32>,
}

impl Model {
    /// Runs `tokens` (the sequence's next tokens, at positions `cache.len()…`) through the
    /// network, appends their keys and values to `cache`, and returns the logits for the last
    /// of them.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = tokens.len();
        let pos0 = cache.len;
        if n == 0 {
            return Err(ModelError::BadTensor {
                name: "input".into(),
                reason: "no tokens to run".into(),
            });
        }
        let limit = c.context_length.min(self.rope.positions());
        if pos0 + n > limit {
            return Err(ModelError::ContextOverflow {
                needed: pos0 + n,
                limit,
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(ModelError::TokenOutOfRange { id, vocab: c.vocab });
        }
        let hidden = c.hidden;
        let mut x = vec![0f32; n * hidden];
        for (row, &t) in x.chunks_exact_mut(hidden).zip(tokens) {
            self.embedding.lookup(t as usize, row);
        }
        let shape = AttentionShape {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let mut s = Scratch {
            norm: vec![0f32; n * hidden],
            ..Default::default()
        };
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut s.norm);
            forward_shared(
                &[&layer.wq, &layer.wk, &layer.wv],
                &s.norm,
                n,
                &mut [&mut s.q, &mut s.k, &mut s.v],
                &mut s.q8,
                &mut s.fused,
            )?;
            self.rope.apply(&mut s.q, pos0, c.heads, c.head_dim);
            self.rope.apply(&mut s.k, pos0, c.kv_heads, c.head_dim);
            cache.k[li].extend_from_slice(&s.k);
            cache.v[li].extend_from_slice(&s.v);
            s.attn.resize(s.q.len(), 0.0);
            causal_attention(
                shape,
                &s.q,
                &cache.k[li],
                &cache.v[li],
                pos0,
                scale,
                &mut s.attn,
            )?;
            layer.wo.forward(&s.attn, n, &mut s.proj, &mut s.q8)?;
            vecops::add(&mut x, &s.proj);

            rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut s.norm);
            forward_shared(
                &[&layer.gate, &layer.up],
                &s.norm,
                n,
                &mut [&mut s.gate, &mut s.up],
                &mut s.q8,
                &mut s.fused,
            )?;
            vecops::silu_mul(&mut s.gate, &s.up);
            layer.down.forward(&s.gate, n, &mut s.proj, &mut s.q8)?;
            vecops::add(&mut x, &s.proj);
        }
        cache.len += n;
        let last = &x[(n - 1) * hidden..];
        let mut normed = vec![0f32; hidden];
        rms_norm(last, &self.output_norm, c.rms_eps, &mut normed);
        let mut logits = Vec::with_capacity(c.vocab);
        self.head.forward(&normed, 1, &mut logits, &mut s.q8)?;
        Ok(logits)
    }
}
