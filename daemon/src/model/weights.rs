//! The model's weights: quantized matrices for decode, optional dense copies for prefill.
//!
//! Decode multiplies each weight by one vector, so it reads the 4- or 8-bit blocks directly
//! ([`QMatrix`]). Prefill multiplies by many rows at once, where a dense f32 matrix product
//! (candle's gemm) is several times faster than quantized dot products: when
//! [`LoadOptions::dense_prefill`] is set each layer weight is also kept dequantised. Formats
//! without a quantized kernel (F32, F16, K-quants, ...) are held dense only.

use super::error::{ModelError, Result};
use super::gguf::GgufFile;
use agentd_kernels::matvec::{matvec_many, QMatrix};
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dense_prefill: true,
            exact_decode: false,
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
    /// Row counts up to which products use the quantized matrix-vector kernel.
    quant_max_rows: usize,
}

/// How a weight is held: quantized (with an optional dense copy for prefill) or dense only.
enum Weight {
    Quant {
        q: Arc<QMatrix>,
        dense: Option<Tensor>,
    },
    Dense(Tensor),
}

/// Row counts up to which a product uses quantized matrix-vector kernels rather than a dense
/// matrix product (unless [`LoadOptions::exact_decode`]).
const QUANT_MAX_ROWS: usize = 1;

fn quant_max_rows(opts: LoadOptions) -> usize {
    if opts.exact_decode {
        0
    } else {
        QUANT_MAX_ROWS
    }
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
            quant_max_rows: quant_max_rows(opts),
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
            quant_max_rows: quant_max_rows(opts),
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

    /// `out[i] = W · x[i]` for the `n` rows of `x`; `q8` is scratch reused across calls.
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        out: &mut Vec<f32>,
        q8: &mut Q8Vector,
    ) -> Result<()> {
        out.resize(n * self.rows, 0.0);
        match &self.weight {
            Weight::Quant { q, .. } if n <= self.quant_max_rows => {
                for (xr, yr) in x
                    .chunks_exact(self.cols)
                    .zip(out.chunks_exact_mut(self.rows))
                {
                    q8.quantize_from(xr);
                    q.matvec(q8, yr)?;
                }
                Ok(())
            }
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

fn matmul_into(x: &[f32], n: usize, cols: usize, w: &Tensor, out: &mut [f32]) -> Result<()> {
    let xt = Tensor::from_slice(x, (n, cols), &Device::Cpu)?;
    let y = xt.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    out.copy_from_slice(&y);
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

/// `outs[i] = ws[i] · x` for layers that read the same input (Q, K and V; gate and up). On the
/// quantized decode path the input is quantised once and every product runs in one parallel
/// pass; `fused` is scratch for that pass.
pub fn forward_shared(
    ws: &[&Linear],
    x: &[f32],
    n: usize,
    outs: &mut [&mut Vec<f32>],
    q8: &mut Q8Vector,
    fused: &mut Vec<f32>,
) -> Result<()> {
    let quantized: Option<Vec<&QMatrix>> = if n == 1 {
        ws.iter()
            .map(|w| match &w.weight {
                Weight::Quant { q, .. } if n <= w.quant_max_rows => Some(&**q),
                _ => None,
            })
            .collect()
    } else {
        None
    };
    let Some(mats) = quantized else {
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            w.forward(x, n, out, q8)?;
        }
        return Ok(());
    };
    q8.quantize_from(x);
    fused.resize(ws.iter().map(|w| w.rows).sum(), 0.0);
    matvec_many(&mats, q8, fused)?;
    let mut at = 0;
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        out.clear();
        out.extend_from_slice(&fused[at..at + w.rows]);
        at += w.rows;
    }
    Ok(())
}
