//! A quantized weight matrix and its product with a vector: the decode step's workhorse.
//!
//! Decode multiplies every weight by one activation vector, so it is bound by memory bandwidth:
//! reading 4-bit weights instead of f32 ones is what makes it fast. Products that share an input
//! (Q, K and V; gate and up) run as one parallel pass ([`matvec_many`]), split into a few
//! contiguous row ranges so each thread streams its weights front to back.

use crate::quant::{dequantize_row, dot_rows, repack_row, Q8Vector, QuantType, BLOCK};
use crate::{KernelError, Result};
use rayon::prelude::*;

/// A row-major matrix of packed blocks: `rows` rows of `cols` elements, as GGUF stores a weight
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
    /// Takes GGUF block bytes, checks that they hold exactly `rows × cols` elements, and repacks
    /// each row for the SIMD kernels ([`repack_row`]).
    pub fn new(ty: QuantType, rows: usize, cols: usize, gguf: Vec<u8>) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(KernelError::PartialBlock { cols, block: BLOCK });
        }
        let expected = rows * ty.row_bytes(cols);
        if gguf.len() != expected {
            return Err(KernelError::Length {
                what: "quantized matrix bytes",
                expected,
                got: gguf.len(),
            });
        }
        let mut data = huge_page_buffer(gguf.len());
        let rb = ty.row_bytes(cols);
        if rb > 0 {
            data.par_chunks_mut(rb)
                .zip(gguf.par_chunks(rb))
                .for_each(|(out, row)| repack_row(ty, row, out));
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
        if self.cols > 0 {
            out.par_chunks_mut(self.cols)
                .enumerate()
                .for_each(|(r, o)| self.dequantize_row_into(r, o));
        }
        out
    }

    /// `out = W · x` with `x` already quantised (`cols` elements); `out` has `rows` elements.
    pub fn matvec(&self, x: &Q8Vector, out: &mut [f32]) -> Result<()> {
        matvec_many(&[self], x, out)
    }
}

/// A zeroed buffer for weights that are streamed every step. On Linux the kernel is asked to
/// back it with transparent huge pages before it is touched: streaming 100 MB per token through
/// 4 KiB pages costs a TLB miss per page, and in a virtual machine each miss is a nested walk.
fn huge_page_buffer(len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_ptr() as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the allocation just made; MADV_HUGEPAGE is advice
            // only and cannot change the memory's contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(len, 0);
    v
}

/// The products of several matrices with the same input, in one parallel pass: `out` holds
/// their outputs one after another (`Σ rows` elements).
pub fn matvec_many(mats: &[&QMatrix], x: &Q8Vector, out: &mut [f32]) -> Result<()> {
    let total: usize = mats.iter().map(|m| m.rows).sum();
    if out.len() != total {
        return Err(KernelError::Length {
            what: "matvec output",
            expected: total,
            got: out.len(),
        });
    }
    if let Some(m) = mats.iter().find(|m| m.cols != x.len()) {
        return Err(KernelError::Length {
            what: "matvec input",
            expected: m.cols,
            got: x.len(),
        });
    }
    let threads = rayon::current_num_threads().max(1);
    let chunk = if total < PARALLEL_MIN_ROWS {
        total.max(1)
    } else {
        total.div_ceil(threads * 2)
    };
    out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
        // This chunk covers global rows start..start + o.len(), possibly across matrices.
        let (mut start, mut o) = (c * chunk, o);
        let mut first_row = 0;
        for m in mats {
            if o.is_empty() {
                break;
            }
            if start >= first_row + m.rows {
                first_row += m.rows;
                continue;
            }
            let r0 = start - first_row;
            let n = o.len().min(m.rows - r0);
            let rb = m.ty.row_bytes(m.cols);
            let (head, rest) = o.split_at_mut(n);
            dot_rows(m.ty, &m.data[r0 * rb..(r0 + n) * rb], x, head);
            o = rest;
            start += n;
            first_row += m.rows;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantType;

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
        // Several matrices in one pass give each one's product, one after another.
        let mut both = vec![0f32; 2 * rows];
        matvec_many(&[&m, &m], &xq, &mut both).unwrap();
        assert_eq!(&both[..rows], &out[..]);
        assert_eq!(&both[rows..], &out[..]);
        assert!(QMatrix::new(QuantType::Q4_1, 2, 30, vec![]).is_err());
        assert!(QMatrix::new(QuantType::Q4_1, 2, 32, vec![0; 39]).is_err());
    }
}
