//! A mixture-of-experts MLP in the Mixtral layout: a router (`ffn_gate_inp`) scores every
//! expert for each row, the row goes to its `expert_used_count` best experts, and their outputs
//! are summed with the router's softmax renormalised over the chosen ones (llama.cpp's and
//! Mixtral's rule: softmax over all experts, top-k, divided by the top-k's sum — the same as a
//! softmax over the chosen experts' logits).
//!
//! Each expert's quantized products run once per step over all rows routed to it, from every
//! sequence of the batch. A row's output depends only on the row: the router and the experts'
//! products are row-independent, and each row adds its experts' outputs in expert order, so the
//! batch a row is in never changes its bits (the engine's cache-hit invariant).
//!
//! Weights come as llama.cpp's merged 3-D tensors (`ffn_{gate,up,down}_exps`) or, in older
//! files, one tensor per expert (`ffn_{gate,up,down}.E`).

use super::arch::Activation;
use super::config::ModelConfig;
use super::error::{ModelError, Result};
use super::gguf::GgufFile;
use super::weights::{forward_shared, LoadOptions, MatScratch, RowSplit};
use super::Linear;
use agentd_kernels::vecops;
use std::sync::atomic::{AtomicU64, Ordering};

/// One block's experts and router.
pub struct Experts {
    router: Linear,
    gate: Vec<Linear>,
    up: Vec<Linear>,
    down: Vec<Linear>,
    used: usize,
    activation: Activation,
    /// Rows routed to each expert since load.
    routed: Vec<AtomicU64>,
}

/// Per-call buffers.
#[derive(Default)]
pub struct ExpertScratch {
    logits: Vec<f32>,
    x: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    y: Vec<f32>,
}

impl Experts {
    /// Loads block `layer`'s router and experts.
    pub(super) fn load(
        file: &mut GgufFile,
        layer: usize,
        c: &ModelConfig,
        opts: LoadOptions,
    ) -> Result<Self> {
        let n = c.experts;
        let name = |t: &str| format!("blk.{layer}.{t}.weight");
        let router = Linear::load(file, &name("ffn_gate_inp"), n, c.hidden, opts)?;
        let (gate, up, down) = if file.tensor_info(&name("ffn_gate_exps")).is_some() {
            (
                Linear::load_stacked(file, &name("ffn_gate_exps"), n, c.ffn, c.hidden, opts)?,
                Linear::load_stacked(file, &name("ffn_up_exps"), n, c.ffn, c.hidden, opts)?,
                Linear::load_stacked(file, &name("ffn_down_exps"), n, c.hidden, c.ffn, opts)?,
            )
        } else {
            let mut gate = Vec::with_capacity(n);
            let mut up = Vec::with_capacity(n);
            let mut down = Vec::with_capacity(n);
            for e in 0..n {
                let one = |t: &str| format!("blk.{layer}.{t}.{e}.weight");
                gate.push(Linear::load(file, &one("ffn_gate"), c.ffn, c.hidden, opts)?);
                up.push(Linear::load(file, &one("ffn_up"), c.ffn, c.hidden, opts)?);
                down.push(Linear::load(file, &one("ffn_down"), c.hidden, c.ffn, opts)?);
            }
            (gate, up, down)
        };
        if c.experts_used == 0 || c.experts_used > n {
            return Err(ModelError::BadKey {
                key: format!("{}.expert_used_count", c.architecture),
                reason: format!("{} must be in 1..={n}", c.experts_used),
            });
        }
        Ok(Self {
            router,
            gate,
            up,
            down,
            used: c.experts_used,
            activation: c.activation,
            routed: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Bytes held for the router and the experts.
    pub fn size_bytes(&self) -> usize {
        self.router.size_bytes()
            + [&self.gate, &self.up, &self.down]
                .iter()
                .flat_map(|v| v.iter())
                .map(Linear::size_bytes)
                .sum::<usize>()
    }

    /// Rows routed to each expert since load.
    pub fn routed(&self) -> Vec<u64> {
        self.routed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// `out` = the mixture's output for each row of `x` (`rows` rows of `hidden`); `load[e]`
    /// gets the rows routed to expert `e` added.
    pub fn forward(
        &self,
        x: &[f32],
        rows: RowSplit,
        out: &mut Vec<f32>,
        s: &mut MatScratch,
        e: &mut ExpertScratch,
        load: &mut [u64],
    ) -> Result<()> {
        let n = rows.total();
        let hidden = self.router.cols();
        let n_exp = self.gate.len();
        self.router.forward(x, rows, &mut e.logits, s)?;
        // Per row: its experts in ascending order and their weights.
        let mut chosen: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); n_exp];
        for (r, logits) in e.logits.chunks_exact(n_exp).enumerate() {
            for (expert, w) in route(logits, self.used) {
                let at = chosen[expert].len();
                chosen[expert].push((r, at, w));
            }
        }
        out.clear();
        out.resize(n * hidden, 0.0);
        // The weighted outputs of each row's experts, added in expert order.
        for (expert, picks) in chosen.iter().enumerate() {
            if picks.is_empty() {
                continue;
            }
            let m = picks.len();
            load[expert] += m as u64;
            self.routed[expert].fetch_add(m as u64, Ordering::Relaxed);
            e.x.clear();
            for &(r, _, _) in picks {
                e.x.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
            }
            let split = RowSplit {
                decode: m,
                prompt: 0,
            };
            forward_shared(
                &[&self.gate[expert], &self.up[expert]],
                &e.x,
                split,
                &mut [&mut e.gate, &mut e.up],
                s,
            )?;
            match self.activation {
                Activation::Silu => vecops::silu_mul(&mut e.gate, &e.up),
                Activation::GeluTanh => vecops::gelu_mul(&mut e.gate, &e.up),
            }
            self.down[expert].forward(&e.gate, split, &mut e.y, s)?;
            for &(r, i, w) in picks {
                vecops::axpy(
                    &mut out[r * hidden..(r + 1) * hidden],
                    w,
                    &e.y[i * hidden..(i + 1) * hidden],
                );
            }
        }
        Ok(())
    }
}

/// The `k` experts with the largest router logits (ties: the lower index), with their softmax
/// weights renormalised over the chosen ones.
pub fn route(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order.truncate(k);
    let max = logits[order[0]];
    let mut picks: Vec<(usize, f32)> = order
        .iter()
        .map(|&i| (i, (logits[i] - max).exp()))
        .collect();
    let sum: f32 = picks.iter().map(|p| p.1).sum();
    for p in &mut picks {
        p.1 /= sum;
    }
    picks.sort_by_key(|p| p.0);
    picks
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routing_picks_the_largest_logits_and_renormalises() {
        let picks = route(&[0.1, 2.0, -1.0, 2.0, 1.0], 2);
        assert_eq!(picks.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((picks[0].1 - 0.5).abs() < 1e-6 && (picks[1].1 - 0.5).abs() < 1e-6);
        let picks = route(&[0.0, 1.0, 3.0], 2);
        assert_eq!(picks.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
        let want = 1.0 / (1.0 + 2f32.exp());
        assert!((picks[0].1 - want).abs() < 1e-6);
        assert!((picks.iter().map(|p| p.1).sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
