//! A quantized weight matrix and its product with a vector: the decode step's workhorse.
//!
//! Decode multiplies every weight by one activation vector, so it is bound by memory bandwidth:
//! reading 4-bit weights instead of f32 ones is what makes it fast. Rows are split across the
//! rayon pool.

use crate::quant::{dequantize_row, dot_row, Q8Vector, QuantType, BLOCK};
use crate::{KernelError, Result};
use rayon::prelude::*;

/// A row-major matrix of GGUF blocks: `rows` rows of `cols` elements, as GGUF stores a weight
/// of shape `[rows, cols]` (output features × input features).
#[derive(Debug, Clone)]
pub struct QMatrix {
    ty: QuantType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// Rows below which a product runs on the calling thread (splitting costs more than it saves).
const PARALLEL_MIN_ROWS: usize = 64;

impl QMatrix {
    /// Wraps GGUF block bytes; checks that they hold exactly `rows × cols` elements.
    pub fn new(ty: QuantType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::PartialBlock { cols, block: BLOCK });
        }
        let expected = rows * ty.row_bytes(cols);
        if data.len() != expected {
            return Err(KernelError::Length {
                what: "quantized matrix bytes",
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// The block format.
    pub fn quant_type(&self) -> QuantType {
        self.ty
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.ty.row_bytes(self.cols);
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantises row `r` into `out` (`cols` elements), e.g. for an embedding lookup.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.ty, self.row(r), out);
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row_into(r, o));
        out
    }

    /// `out = W · x` with `x` already quantised (`cols` elements); `out` has `rows` elements.
    pub fn matvec(&self, x: &Q8Vector, out: &mut [f32]) -> Result<()> {
        if x.len() != self.cols {
            return Err(KernelError::Length {
                what: "matvec input",
                expected: self.cols,
                got: x.len(),
            });
        }
        if out.len() != self.rows {
            return Err(KernelError::Length {
                what: "matvec output",
                expected: self.rows,
                got: out.len(),
            });
        }
        if self.rows < PARALLEL_MIN_ROWS {
            for (r, o) in out.iter_mut().enumerate() {
                *o = dot_row(self.ty, self.row(r), x);
            }
            return Ok(());
        }
        let chunk = (self.rows / (rayon::current_num_threads() * 8)).max(16);
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            for (i, o) in o.iter_mut().enumerate() {
                *o = dot_row(self.ty, self.row(c * chunk + i), x);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matvec_equals_row_dots_and_checks_shapes() {
        let (rows, cols) = (130, 64);
        // Q8_0 blocks with scale 1.0 (f16 0x3c00) and values that depend on row and column.
        let mut data = Vec::new();
        for r in 0..rows {
            for b in 0..cols / BLOCK {
                data.extend_from_slice(&[0x00, 0x3c]);
                data.extend((0..BLOCK).map(|j| (((r + b * 7 + j) % 13) as i8 - 6) as u8));
            }
        }
        let m = QMatrix::new(QuantType::Q8_0, rows, cols, data).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let xq = Q8Vector::quantize(&x);
        let mut out = vec![0f32; rows];
        m.matvec(&xq, &mut out).unwrap();
        let deq = m.dequantize();
        for r in 0..rows {
            let row = &deq[r * cols..(r + 1) * cols];
            let exact: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
            let norm: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            let got = out[r];
            assert!(
                (got - exact).abs() < 0.01 * norm,
                "row {r}: {got} vs {exact}"
            );
        }
        assert!(m.matvec(&xq, &mut out[..3]).is_err());
        assert!(QMatrix::new(QuantType::Q4_1, 2, 30, vec![]).is_err());
        assert!(QMatrix::new(QuantType::Q4_1, 2, 32, vec![0; 39]).is_err());
    }
}
