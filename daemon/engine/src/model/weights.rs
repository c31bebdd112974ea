//! The model's weights, held in their GGUF format, and the one product every row goes through.
//!
//! Every matrix whose format has a quantized kernel (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
//! Q6_K, F16) is held once, packed into 8-row panels ([`QMatrix`]), and multiplies decode rows
//! and prompt rows alike: activations are quantised per block to 8 bits and each output is
//! computed by one fixed sequence of block dot products, so a row's result never depends on the
//! batch it is in (a cache hit equals a recompute bit for bit). Formats without a kernel (F32,
//! BF16, the I-quants, ...) are dequantised to f32 and the loader logs which.
//!
//! [`LoadOptions::exact`] keeps a dense f32 copy of every weight instead and runs every
//! product in f32: the reference mode for checking the quantized products. Dense products compute
//! each output as one fixed-order dot product of an input row with a weight row, so they too are
//! independent of the batch, and a decode row costs one pass over the weights.

use super::error::{ModelError, Result};
use super::gguf::GgufFile;
use agentd_kernels::dense::matmul_dense;
use agentd_kernels::matmul::{act_kinds, matmul_many, QMatrix};
use agentd_kernels::quant::{QuantType, QuantizedRows};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use std::sync::Arc;

/// How to hold weights in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Run every product in f32 on dense dequantised copies of the weights (≈ 4 bytes per
    /// parameter): the reference for checking the quantized products, which round activations
    /// to 8 bits. Slower and larger.
    pub exact: bool,
    /// Serve at most this many positions instead of the model's trained context (as
    /// llama.cpp's `--ctx-size`); `None`: the trained context. Larger than trained is an error.
    pub context: Option<usize>,
    /// How the KV pages store keys and values (`--kv-dtype`); Q8_0 is refused at load for head
    /// sizes that are not a multiple of 32.
    pub kv_dtype: crate::executor::KvDtype,
}

fn quant_type(dtype: GgmlDType) -> Option<QuantType> {
    Some(match dtype {
        GgmlDType::Q4_0 => QuantType::Q4_0,
        GgmlDType::Q4_1 => QuantType::Q4_1,
        GgmlDType::Q5_0 => QuantType::Q5_0,
        GgmlDType::Q5_1 => QuantType::Q5_1,
        GgmlDType::Q8_0 => QuantType::Q8_0,
        GgmlDType::Q4K => QuantType::Q4_K,
        GgmlDType::Q5K => QuantType::Q5_K,
        GgmlDType::Q6K => QuantType::Q6_K,
        GgmlDType::F16 => QuantType::F16,
        _ => return None,
    })
}

/// A weight as loaded: packed when a kernel exists for the format, else dense f32.
enum Loaded {
    Quant(QMatrix),
    Dense(Vec<f32>),
}

/// `qt` dequantised to a flat row-major f32 vector.
fn dequantize_flat(qt: &QTensor) -> candle_core::Result<Vec<f32>> {
    qt.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()
}

fn load_matrix(file: &mut GgufFile, name: &str, rows: usize, cols: usize) -> Result<Loaded> {
    let qt: QTensor = file.tensor(name, &[rows, cols])?;
    let bad = |reason: String| ModelError::BadTensor {
        name: name.to_owned(),
        reason,
    };
    match quant_type(qt.dtype()) {
        Some(ty) if cols.is_multiple_of(ty.block_elems()) => {
            let bytes = qt.data().map_err(|e| bad(e.to_string()))?;
            Ok(Loaded::Quant(
                QMatrix::new(ty, rows, cols, &bytes).map_err(|e| bad(e.to_string()))?,
            ))
        }
        _ => {
            tracing::warn!(
                tensor = name,
                format = ?qt.dtype(),
                "no quantized kernel for this format: held as dense f32"
            );
            Ok(Loaded::Dense(
                dequantize_flat(&qt).map_err(|e| bad(e.to_string()))?,
            ))
        }
    }
}

/// Reads a 1-D f32 vector (norm weights, RoPE frequency factors).
pub(super) fn load_vector(file: &mut GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let qt = file.tensor(name, &[len])?;
    let bad = |e: candle_core::Error| ModelError::BadTensor {
        name: name.to_owned(),
        reason: e.to_string(),
    };
    qt.dequantize(&Device::Cpu)
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(bad)
}

/// A linear layer without bias: `y = W x` with `W` of shape `[rows, cols]`.
pub struct Linear {
    rows: usize,
    cols: usize,
    weight: Weight,
    /// Whether the weight's memory belongs to another owner (a head tied to the embedding).
    shared: bool,
}

/// How a weight is held.
enum Weight {
    /// Packed panels; every row goes through the quantized product.
    Quant(Arc<QMatrix>),
    /// Dense f32, row-major `[rows, cols]` (a format without a kernel, or
    /// [`LoadOptions::exact`]); shared with the embedding when the head is tied to it.
    Dense(Arc<Vec<f32>>),
}

impl Linear {
    /// Loads weight `name` of shape `[rows, cols]`.
    pub(super) fn load(
        file: &mut GgufFile,
        name: &str,
        rows: usize,
        cols: usize,
        opts: LoadOptions,
    ) -> Result<Self> {
        let weight = match load_matrix(file, name, rows, cols)? {
            Loaded::Quant(q) if opts.exact => Weight::Dense(dense_of(&q)),
            Loaded::Quant(q) => Weight::Quant(Arc::new(q)),
            Loaded::Dense(t) => Weight::Dense(Arc::new(t)),
        };
        Ok(Self {
            rows,
            cols,
            weight,
            shared: false,
        })
    }

    /// Loads the `n` matrices of shape `[rows, cols]` stacked in the 3-D weight `name` (shape
    /// `[n, rows, cols]`: llama.cpp's merged expert tensors), one layer each.
    pub(super) fn load_stacked(
        file: &mut GgufFile,
        name: &str,
        n: usize,
        rows: usize,
        cols: usize,
        opts: LoadOptions,
    ) -> Result<Vec<Self>> {
        let qt: QTensor = file.tensor(name, &[n, rows, cols])?;
        let bad = |reason: String| ModelError::BadTensor {
            name: name.to_owned(),
            reason,
        };
        let layer = |weight| Self {
            rows,
            cols,
            weight,
            shared: false,
        };
        match quant_type(qt.dtype()) {
            Some(ty) if cols.is_multiple_of(ty.block_elems()) => {
                let bytes = qt.data().map_err(|e| bad(e.to_string()))?;
                let per = bytes.len() / n;
                (0..n)
                    .map(|e| {
                        let q = QMatrix::new(ty, rows, cols, &bytes[e * per..(e + 1) * per])
                            .map_err(|err| bad(format!("expert {e}: {err}")))?;
                        Ok(layer(if opts.exact {
                            Weight::Dense(dense_of(&q))
                        } else {
                            Weight::Quant(Arc::new(q))
                        }))
                    })
                    .collect()
            }
            _ => {
                tracing::warn!(
                    tensor = name,
                    format = ?qt.dtype(),
                    "no quantized kernel for this format: held as dense f32"
                );
                let all = dequantize_flat(&qt).map_err(|e| bad(e.to_string()))?;
                Ok(all
                    .chunks_exact(rows * cols)
                    .map(|m| layer(Weight::Dense(Arc::new(m.to_vec()))))
                    .collect())
            }
        }
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// A layer that shares the embedding's matrix (tied output head).
    pub(super) fn tied(embedding: &Embedding, opts: LoadOptions) -> Result<Self> {
        let weight = match &embedding.table {
            Table::Quant(q) if opts.exact => Weight::Dense(dense_of(q)),
            Table::Quant(q) => Weight::Quant(q.clone()),
            Table::Dense(t) => Weight::Dense(t.clone()),
        };
        let (rows, cols) = (embedding.rows, embedding.cols);
        // Only the f32 reference mode makes a copy of its own.
        let shared = !opts.exact || matches!(embedding.table, Table::Dense(..));
        Ok(Self {
            rows,
            cols,
            weight,
            shared,
        })
    }

    /// Bytes held for this weight (none when it shares the embedding's).
    pub fn size_bytes(&self) -> usize {
        if self.shared {
            return 0;
        }
        match &self.weight {
            Weight::Quant(q) => q.size_bytes(),
            Weight::Dense(d) => d.len() * std::mem::size_of::<f32>(),
        }
    }

    /// `out[i] = W · x[i]` for every row of `x` (see [`forward_shared`]).
    pub fn forward(
        &self,
        x: &[f32],
        rows: RowSplit,
        out: &mut Vec<f32>,
        s: &mut MatScratch,
    ) -> Result<()> {
        forward_shared(&[self], x, rows, &mut [out], s)
    }
}

fn dense_of(q: &QMatrix) -> Arc<Vec<f32>> {
    Arc::new(q.dequantize())
}

/// The token embedding table, looked up one row per token.
pub struct Embedding {
    rows: usize,
    cols: usize,
    table: Table,
}

enum Table {
    Quant(Arc<QMatrix>),
    /// Row-major f32 rows (shared with a tied head).
    Dense(Arc<Vec<f32>>),
}

impl Embedding {
    /// Loads `name` of shape `[vocab, hidden]`.
    pub(super) fn load(
        file: &mut GgufFile,
        name: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<Self> {
        let table = match load_matrix(file, name, vocab, hidden)? {
            Loaded::Quant(q) => Table::Quant(Arc::new(q)),
            Loaded::Dense(t) => Table::Dense(Arc::new(t)),
        };
        Ok(Self {
            rows: vocab,
            cols: hidden,
            table,
        })
    }

    /// Writes the embedding of token `id` (checked by the caller) into `out`.
    pub fn lookup(&self, id: usize, out: &mut [f32]) {
        match &self.table {
            Table::Quant(q) => q.dequantize_row_into(id, out),
            Table::Dense(d) => out.copy_from_slice(&d[id * self.cols..(id + 1) * self.cols]),
        }
    }

    /// Bytes held for the table.
    pub fn size_bytes(&self) -> usize {
        match &self.table {
            Table::Quant(q) => q.size_bytes(),
            Table::Dense(d) => d.len() * std::mem::size_of::<f32>(),
        }
    }
}

/// The rows of an activation matrix: the first `decode` are decode rows (one sampled token
/// each), the next `prompt` prompt rows. Both go through the same product; the split is kept
/// for the attention step and the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSplit {
    /// Decode rows (first).
    pub decode: usize,
    /// Prompt rows (after them).
    pub prompt: usize,
}

impl RowSplit {
    /// All rows.
    pub fn total(self) -> usize {
        self.decode + self.prompt
    }
}

/// Scratch buffers for [`forward_shared`], reused across calls.
#[derive(Default)]
pub struct MatScratch {
    acts: QuantizedRows,
    fused: Vec<f32>,
}

/// `outs[i] = ws[i] · x` for layers that read the same input (Q, K and V; gate and up), each
/// output holding `rows.total()` rows in input order. The rows are quantised once and every
/// product for every row runs in one parallel pass over the weights.
pub fn forward_shared(
    ws: &[&Linear],
    x: &[f32],
    rows: RowSplit,
    outs: &mut [&mut Vec<f32>],
    s: &mut MatScratch,
) -> Result<()> {
    let cols = ws[0].cols;
    let n = rows.total();
    debug_assert!(ws.iter().all(|w| w.cols == cols));
    debug_assert_eq!(x.len(), n * cols);
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        out.resize(n * w.rows, 0.0);
    }
    if n == 0 {
        return Ok(());
    }
    let quantized: Option<Vec<&QMatrix>> = ws
        .iter()
        .map(|w| match &w.weight {
            Weight::Quant(q) => Some(&**q),
            Weight::Dense(_) => None,
        })
        .collect();
    let Some(mats) = quantized else {
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            match &w.weight {
                Weight::Dense(d) => matmul_dense(x, n, cols, d, out),
                Weight::Quant(q) => {
                    let mut one = MatScratch::default();
                    forward_quant(&[&**q], x, n, cols, &mut [&mut out[..]], &mut one)?
                }
            }
        }
        return Ok(());
    };
    let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
    forward_quant(&mats, x, n, cols, &mut slices, s)
}

fn forward_quant(
    mats: &[&QMatrix],
    x: &[f32],
    n: usize,
    cols: usize,
    outs: &mut [&mut [f32]],
    s: &mut MatScratch,
) -> Result<()> {
    s.acts.prepare(x, n, cols, &act_kinds(mats));
    if let [out] = outs {
        matmul_many(mats, &s.acts, out)?;
        return Ok(());
    }
    let total: usize = mats.iter().map(|m| m.rows()).sum();
    s.fused.resize(total * n, 0.0);
    matmul_many(mats, &s.acts, &mut s.fused)?;
    // Each activation row's outputs lie side by side in `fused`; split them into the matrices'
    // outputs (in parallel for prompt-sized batches).
    let mut at = 0;
    for (m, out) in mats.iter().zip(outs.iter_mut()) {
        let r = m.rows();
        let copy = |(o, f): (&mut [f32], &[f32])| o.copy_from_slice(&f[at..at + r]);
        if n >= 64 {
            use rayon::prelude::*;
            out.par_chunks_mut(r)
                .zip(s.fused.par_chunks(total))
                .for_each(copy);
        } else {
            out.chunks_mut(r).zip(s.fused.chunks(total)).for_each(copy);
        }
        at += r;
    }
    Ok(())
}
