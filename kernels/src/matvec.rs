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
    matvec_many_batch(mats, std::slice::from_ref(x), out)
}

/// [`matvec_many`] for several inputs at once (a batch of decode rows): `out` holds, for each
/// input in turn, the outputs of every matrix (`xs.len() × Σ rows` elements). Each weight block
/// is read once for the whole batch while it sits in cache, which is what makes a batched
/// decode step cheaper per token than one step per sequence. Every output equals the one
/// [`matvec_many`] gives for that input alone, bit for bit.
pub fn matvec_many_batch(mats: &[&QMatrix], xs: &[Q8Vector], out: &mut [f32]) -> Result<()> {
    let total: usize = mats.iter().map(|m| m.rows).sum();
    if out.len() != total * xs.len() {
        return Err(KernelError::Length {
            what: "matvec output",
            expected: total * xs.len(),
            got: out.len(),
        });
    }
    for x in xs {
        if let Some(m) = mats.iter().find(|m| m.cols != x.len()) {
            return Err(KernelError::Length {
                what: "matvec input",
                expected: m.cols,
                got: x.len(),
            });
        }
    }
    if xs.is_empty() || total == 0 {
        return Ok(());
    }
    let threads = rayon::current_num_threads().max(1);
    let chunk = if total < PARALLEL_MIN_ROWS {
        total
    } else {
        total.div_ceil(threads * 2)
    };
    if xs.len() == 1 {
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            rows_of_chunk(mats, c * chunk, o.len(), |m, r0, at, n| {
                let rb = m.ty.row_bytes(m.cols);
                dot_rows(
                    m.ty,
                    &m.data[r0 * rb..(r0 + n) * rb],
                    &xs[0],
                    &mut o[at..at + n],
                );
            });
        });
        return Ok(());
    }
    // Several inputs: each task fills its rows for every input into a local buffer (input-major),
    // walking the rows in small blocks so a block's weights are reused from L1 by every input.
    const BLOCK_ROWS: usize = 16;
    let n_chunks = total.div_ceil(chunk);
    let parts: Vec<Vec<f32>> = (0..n_chunks)
        .into_par_iter()
        .map(|c| {
            let (start, len) = (c * chunk, chunk.min(total - c * chunk));
            let mut local = vec![0f32; len * xs.len()];
            rows_of_chunk(mats, start, len, |m, r0, at, n| {
                let rb = m.ty.row_bytes(m.cols);
                for b in (0..n).step_by(BLOCK_ROWS) {
                    let nb = BLOCK_ROWS.min(n - b);
                    let rows = &m.data[(r0 + b) * rb..(r0 + b + nb) * rb];
                    for (j, x) in xs.iter().enumerate() {
                        let o = j * len + at + b;
                        dot_rows(m.ty, rows, x, &mut local[o..o + nb]);
                    }
                }
            });
            local
        })
        .collect();
    for (c, local) in parts.iter().enumerate() {
        let (start, len) = (c * chunk, local.len() / xs.len());
        for j in 0..xs.len() {
            out[j * total + start..j * total + start + len]
                .copy_from_slice(&local[j * len..(j + 1) * len]);
        }
    }
    Ok(())
}

/// Splits the global rows `start..start + len` (counted across `mats` one after another) into
/// per-matrix runs and calls `f(matrix, first row in it, offset in the range, rows)` for each.
fn rows_of_chunk(
    mats: &[&QMatrix],
    start: usize,
    len: usize,
    mut f: impl FnMut(&QMatrix, usize, usize, usize),
) {
    let (mut pos, mut first_row, end) = (start, 0, start + len);
    for m in mats {
        if pos >= end {
            break;
        }
        if pos >= first_row + m.rows {
            first_row += m.rows;
            continue;
        }
        let r0 = pos - first_row;
        let n = (end - pos).min(m.rows - r0);
        f(m, r0, pos - start, n);
        pos += n;
        first_row += m.rows;
    }
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
        // A batch of inputs gives each input's own product, bit for bit.
        let xs: Vec<Q8Vector> = (0..5)
            .map(|k| {
                Q8Vector::quantize(&x.iter().map(|v| v * (k as f32 - 1.7)).collect::<Vec<_>>())
            })
            .collect();
        let mut batch = vec![0f32; 5 * 2 * rows];
        matvec_many_batch(&[&m, &m], &xs, &mut batch).unwrap();
        for (k, xk) in xs.iter().enumerate() {
            let mut one = vec![0f32; 2 * rows];
            matvec_many(&[&m, &m], xk, &mut one).unwrap();
            assert_eq!(
                &batch[k * 2 * rows..(k + 1) * 2 * rows],
                &one[..],
                "input {k}"
            );
        }
        assert!(matvec_many_batch(&[&m], &xs, &mut batch[..7]).is_err());
        assert!(QMatrix::new(QuantType::Q4_1, 2, 30, vec![]).is_err());
        assert!(QMatrix::new(QuantType::Q4_1, 2, 32, vec![0; 39]).is_err());
    }
}
