//! The model's weights: quantized matrices for decode, optional dense copies for prefill.
//!
//! Decode multiplies each weight by one vector, so it reads the 4- or 8-bit blocks directly
//! ([`QMatrix`]). Prefill multiplies by many rows at once, where a dense f32 matrix product
//! (candle's gemm) is several times faster than quantized dot products: when
//! [`LoadOptions::dense_prefill`] is set each layer weight is also kept dequantised. Formats
//! without a quantized kernel (F32, F16, K-quants, ...) are held dense only.

use super::error::{ModelError, Result};
use super::gguf::GgufFile;
use agentd_kernels::matvec::{matvec_many_batch, QMatrix};
use agentd_kernels::quant::{Q8Vector, QuantType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// How to hold weights in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Keep a dequantised f32 copy of every layer weight for fast prefill (≈ 4 bytes per
    /// parameter on top of the quantized bytes). Without it, prefill dequantises each weight on
    /// the fly.
    pub dense_prefill: bool,
    /// Decode with dense f32 products too (keeps a dense copy of every weight, the output head
    /// included). Slower; it removes the 8-bit activation rounding of the quantized kernels,
    /// for checking results against an f32 reference.
    pub exact_decode: bool,
    /// Serve at most this many positions instead of the model's trained context (as
    /// llama.cpp's `--ctx-size`); `None`: the trained context. Larger than trained is an error.
    pub context: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dense_prefill: true,
            exact_decode: false,
            context: None,
        }
    }
}

fn quant_type(dtype: GgmlDType) -> Option<QuantType> {
    match dtype {
        GgmlDType::Q4_0 => Some(QuantType::Q4_0),
        GgmlDType::Q4_1 => Some(QuantType::Q4_1),
        GgmlDType::Q8_0 => Some(QuantType::Q8_0),
        _ => None,
    }
}

/// A weight as loaded: quantized blocks when a kernel exists for the format, else dense f32.
enum Loaded {
    Quant(QMatrix),
    Dense(Tensor),
}

fn load_matrix(file: &mut GgufFile, name: &str, rows: usize, cols: usize) -> Result<Loaded> {
    let qt: QTensor = file.tensor(name, &[rows, cols])?;
    let bad = |reason: String| ModelError::BadTensor {
        name: name.to_owned(),
        reason,
    };
    match quant_type(qt.dtype()) {
        Some(ty) => {
            let bytes = qt.data().map_err(|e| bad(e.to_string()))?.into_owned();
            Ok(Loaded::Quant(
                QMatrix::new(ty, rows, cols, bytes).map_err(|e| bad(e.to_string()))?,
            ))
        }
        None => Ok(Loaded::Dense(
            qt.dequantize(&Device::Cpu)
                .map_err(|e| bad(e.to_string()))?,
        )),
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
    /// Whether decode rows use the quantized kernel (false with [`LoadOptions::exact_decode`]).
    quant_decode: bool,
}

/// How a weight is held: quantized (with an optional dense copy for prefill) or dense only.
enum Weight {
    Quant {
        q: Arc<QMatrix>,
        dense: Option<Tensor>,
    },
    Dense(Tensor),
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
            Loaded::Quant(q) => {
                let keep_dense = opts.dense_prefill || opts.exact_decode;
                let dense = if keep_dense {
                    Some(dense_of(&q)?)
                } else {
                    None
                };
                Weight::Quant {
                    q: Arc::new(q),
                    dense,
                }
            }
            Loaded::Dense(t) => Weight::Dense(t),
        };
        Ok(Self {
            rows,
            cols,
            weight,
            quant_decode: !opts.exact_decode,
        })
    }

    /// A layer that shares the embedding's matrix (tied output head). It gets a dense copy only
    /// for [`LoadOptions::exact_decode`]: otherwise the head runs on one row per step.
    pub(super) fn tied(embedding: &Embedding, opts: LoadOptions) -> Result<Self> {
        let weight = match &embedding.table {
            Table::Quant(q) => {
                let dense = if opts.exact_decode {
                    Some(dense_of(q)?)
                } else {
                    None
                };
                Weight::Quant {
                    q: q.clone(),
                    dense,
                }
            }
            Table::Dense(t, _) => Weight::Dense(t.clone()),
        };
        let (rows, cols) = (embedding.rows, embedding.cols);
        Ok(Self {
            rows,
            cols,
            weight,
            quant_decode: !opts.exact_decode,
        })
    }

    /// Bytes held for this weight (quantized and dense).
    pub fn size_bytes(&self) -> usize {
        match &self.weight {
            Weight::Quant { q, dense } => {
                q.size_bytes() + dense.as_ref().map_or(0, |d| d.elem_count() * 4)
            }
            Weight::Dense(d) => d.elem_count() * 4,
        }
    }

    /// `out[i] = W · x[i]` for the rows of `x`: the first `rows.decode` are decode rows, the
    /// rest prompt rows (see [`forward_shared`]).
    pub fn forward(
        &self,
        x: &[f32],
        rows: RowSplit,
        out: &mut Vec<f32>,
        s: &mut MatScratch,
    ) -> Result<()> {
        forward_shared(&[self], x, rows, &mut [out], s)
    }

    /// Dense products for `n` rows, written to `out` (`n × rows` elements).
    fn forward_dense(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        match &self.weight {
            Weight::Quant { dense: Some(d), .. } | Weight::Dense(d) => {
                matmul_into(x, n, self.cols, d, out)
            }
            Weight::Quant { q, dense: None } => matmul_into(x, n, self.cols, &dense_of(q)?, out),
        }
    }
}

fn dense_of(q: &QMatrix) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        q.dequantize(),
        (q.rows(), q.cols()),
        &Device::Cpu,
    )?)
}

/// Rows in every dense product. The last block of a chunk is padded with zero rows, so each
/// product has exactly this shape and a row's result never depends on how many rows its chunk
/// had: candle's gemm picks its blocking and threading from the matrix sizes, and with them the
/// order of its sums. (A cache hit recomputes only the last prompt token, as a one-row chunk; it
/// must get the same bits as the long chunk that first computed it.)
const DENSE_ROWS: usize = 64;

fn matmul_into(x: &[f32], n: usize, cols: usize, w: &Tensor, out: &mut [f32]) -> Result<()> {
    let out_cols = out.len() / n.max(1);
    let wt = w.t()?;
    let mut block = vec![0f32; DENSE_ROWS * cols];
    for (b, rows) in x.chunks(DENSE_ROWS * cols).enumerate() {
        let n_rows = rows.len() / cols;
        block[..rows.len()].copy_from_slice(rows);
        block[rows.len()..].fill(0.0);
        let xt = Tensor::from_slice(&block, (DENSE_ROWS, cols), &Device::Cpu)?;
        let y = xt.matmul(&wt)?.flatten_all()?.to_vec1::<f32>()?;
        out[b * DENSE_ROWS * out_cols..][..n_rows * out_cols]
            .copy_from_slice(&y[..n_rows * out_cols]);
    }
    Ok(())
}

/// The token embedding table, looked up one row per token.
pub struct Embedding {
    rows: usize,
    cols: usize,
    table: Table,
}

enum Table {
    Quant(Arc<QMatrix>),
    /// The tensor (shared with a tied head) and its rows as a flat vector for look-ups.
    Dense(Tensor, Vec<f32>),
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
            Loaded::Dense(t) => {
                let flat = t.flatten_all()?.to_vec1::<f32>()?;
                Table::Dense(t, flat)
            }
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
            Table::Dense(_, d) => out.copy_from_slice(&d[id * self.cols..(id + 1) * self.cols]),
        }
    }

    /// Bytes held for the table.
    pub fn size_bytes(&self) -> usize {
        match &self.table {
            Table::Quant(q) => q.size_bytes(),
            // The f32 tensor plus the flat copy used for look-ups.
            Table::Dense(_, d) => 2 * d.len() * std::mem::size_of::<f32>(),
        }
    }
}

/// How the rows of an activation matrix are computed: the first `decode` rows are decode rows
/// (one sampled token each), the next `prompt` rows prompt rows.
///
/// Decode rows go through the quantized kernels (8-bit activations), every decode row of a
/// batch in one pass over the weights; prompt rows go through a dense f32 matrix product. A
/// row's result depends only on its kind, never on what else is in the batch, so batched decode
/// gives exactly the logits of one-at-a-time decode.
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
    q8: Vec<Q8Vector>,
    fused: Vec<f32>,
}

/// `outs[i] = ws[i] · x` for layers that read the same input (Q, K and V; gate and up), each
/// output holding `rows.total()` rows in input order. The decode rows are quantised once and
/// every product for every decode row runs in one parallel pass over the weights.
pub fn forward_shared(
    ws: &[&Linear],
    x: &[f32],
    rows: RowSplit,
    outs: &mut [&mut Vec<f32>],
    s: &mut MatScratch,
) -> Result<()> {
    let cols = ws[0].cols;
    debug_assert!(ws.iter().all(|w| w.cols == cols));
    debug_assert_eq!(x.len(), rows.total() * cols);
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        out.resize(rows.total() * w.rows, 0.0);
    }
    let quantized: Option<Vec<&QMatrix>> = ws
        .iter()
        .map(|w| match &w.weight {
            Weight::Quant { q, .. } if w.quant_decode => Some(&**q),
            _ => None,
        })
        .collect();
    let (dec_x, prompt_x) = x.split_at(rows.decode * cols);
    match quantized {
        Some(mats) if rows.decode > 0 => {
            s.q8.resize_with(rows.decode, Q8Vector::default);
            for (q8, xr) in s.q8.iter_mut().zip(dec_x.chunks_exact(cols)) {
                q8.quantize_from(xr);
            }
            let total: usize = ws.iter().map(|w| w.rows).sum();
            s.fused.resize(total * rows.decode, 0.0);
            matvec_many_batch(&mats, &s.q8, &mut s.fused)?;
            for (j, fused) in s.fused.chunks_exact(total).enumerate() {
                let mut at = 0;
                for (w, out) in ws.iter().zip(outs.iter_mut()) {
                    out[j * w.rows..(j + 1) * w.rows].copy_from_slice(&fused[at..at + w.rows]);
                    at += w.rows;
                }
            }
        }
        _ if rows.decode > 0 => {
            for (w, out) in ws.iter().zip(outs.iter_mut()) {
                w.forward_dense(dec_x, rows.decode, &mut out[..rows.decode * w.rows])?;
            }
        }
        _ => {}
    }
    if rows.prompt > 0 {
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            w.forward_dense(prompt_x, rows.prompt, &mut out[rows.decode * w.rows..])?;
        }
    }
    Ok(())
}
