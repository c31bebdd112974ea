//! The dense f32 product (`--exact` mode, and weight formats without a quantized kernel):
//! `out[i][j] = x[i] · w[j]` with each output summed in one fixed order that depends only on
//! the row length, so a row's result never depends on how many rows share the product (the
//! engine's cache-hit invariant). Sixteen lane accumulators of fused multiply-adds, a pairwise
//! reduction, four input rows per pass over a weight row; an AVX2/FMA build chosen at run time,
//! whose bits equal the portable body's.

use rayon::prelude::*;

/// Weight rows per parallel task of [`matmul_dense`].
const DENSE_TASK_ROWS: usize = 32;
/// Input rows per tile of [`matmul_dense`] (their block of weight rows stays in cache while
/// they pass).
const DENSE_TILE_ROWS: usize = 16;
/// Accumulator lanes of [`dot1_body`] and [`dot4_body`].
const DOT_LANES: usize = 16;

/// The end of every dot product of [`dot1_body`] and [`dot4_body`]: a pairwise reduction of
/// the 16 lanes, plus the tail.
#[inline(always)]
fn reduce_lanes(mut a: [f32; DOT_LANES], tail: f32) -> f32 {
    let mut width = DOT_LANES / 2;
    while width > 0 {
        for i in 0..width {
            a[i] += a[i + width];
        }
        width /= 2;
    }
    a[0] + tail
}

/// `x · w`: 16 lane accumulators updated by fused multiply-adds over the 16-element chunks, a
/// fused tail, then [`reduce_lanes`]. A fused multiply-add is exactly rounded on every instruction
/// set (and in software), so the result does not depend on which body runs either.
#[inline(always)]
fn dot1_body(x: &[f32], w: &[f32]) -> f32 {
    let n = w.len();
    let chunks = n / DOT_LANES * DOT_LANES;
    let mut a = [0f32; DOT_LANES];
    for (wc, xc) in w[..chunks]
        .chunks_exact(DOT_LANES)
        .zip(x[..chunks].chunks_exact(DOT_LANES))
    {
        for l in 0..DOT_LANES {
            a[l] = xc[l].mul_add(wc[l], a[l]);
        }
    }
    let mut tail = 0f32;
    for i in chunks..n {
        tail = x[i].mul_add(w[i], tail);
    }
    reduce_lanes(a, tail)
}

/// `[x0 · w, x1 · w, x2 · w, x3 · w]`, each summed exactly as [`dot1_body`] sums it (one pass
/// over `w` for four rows).
#[inline(always)]
fn dot4_body(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let n = w.len();
    let chunks = n / DOT_LANES * DOT_LANES;
    let (mut a0, mut a1, mut a2, mut a3) = (
        [0f32; DOT_LANES],
        [0f32; DOT_LANES],
        [0f32; DOT_LANES],
        [0f32; DOT_LANES],
    );
    for c in (0..chunks).step_by(DOT_LANES) {
        let wc = &w[c..c + DOT_LANES];
        let (c0, c1, c2, c3) = (
            &x[0][c..c + DOT_LANES],
            &x[1][c..c + DOT_LANES],
            &x[2][c..c + DOT_LANES],
            &x[3][c..c + DOT_LANES],
        );
        for l in 0..DOT_LANES {
            a0[l] = c0[l].mul_add(wc[l], a0[l]);
            a1[l] = c1[l].mul_add(wc[l], a1[l]);
            a2[l] = c2[l].mul_add(wc[l], a2[l]);
            a3[l] = c3[l].mul_add(wc[l], a3[l]);
        }
    }
    let tail = |x: &[f32]| {
        let mut t = 0f32;
        for i in chunks..n {
            t = x[i].mul_add(w[i], t);
        }
        t
    };
    [
        reduce_lanes(a0, tail(x[0])),
        reduce_lanes(a1, tail(x[1])),
        reduce_lanes(a2, tail(x[2])),
        reduce_lanes(a3, tail(x[3])),
    ]
}

/// One task of [`matmul_dense`]: weight rows `j0..` against every input row, into `dst`
/// (`[weight row - j0][input row]`), four input rows per pass over a weight row.
#[inline(always)]
fn dense_task_body(x: &[f32], n: usize, cols: usize, w: &[f32], j0: usize, dst: &mut [f32]) {
    let row = |i: usize| &x[i * cols..][..cols];
    for i0 in (0..n).step_by(DENSE_TILE_ROWS) {
        let i1 = (i0 + DENSE_TILE_ROWS).min(n);
        for (jj, d) in dst.chunks_exact_mut(n).enumerate() {
            let wr = &w[(j0 + jj) * cols..][..cols];
            let mut i = i0;
            while i + 4 <= i1 {
                let four = dot4_body([row(i), row(i + 1), row(i + 2), row(i + 3)], wr);
                d[i..i + 4].copy_from_slice(&four);
                i += 4;
            }
            for (i, d) in d.iter_mut().enumerate().take(i1).skip(i) {
                *d = dot1_body(row(i), wr);
            }
        }
    }
}

/// [`dense_task_body`], compiled for AVX2 and FMA when the CPU has them.
fn dense_task(x: &[f32], n: usize, cols: usize, w: &[f32], j0: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(x: &[f32], n: usize, cols: usize, w: &[f32], j0: usize, dst: &mut [f32]) {
            dense_task_body(x, n, cols, w, j0, dst)
        }
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { fast(x, n, cols, w, j0, dst) };
    }
    dense_task_body(x, n, cols, w, j0, dst)
}

/// `out[i][j] = x[i] · w[j]` for the `n` rows of `x` and every row of the row-major `w` (`cols`
/// columns). Each output is summed in one fixed order that depends only on `cols` (see
/// [`dot1_body`]), so a row's result never depends on how many rows came with it.
pub fn matmul_dense(x: &[f32], n: usize, cols: usize, w: &[f32], out: &mut [f32]) {
    let rows = w.len() / cols;
    debug_assert_eq!(out.len(), n * rows);
    let task = |b: usize, d: &mut [f32]| dense_task(x, n, cols, w, b * DENSE_TASK_ROWS, d);
    if n == 1 {
        // A decode row: the transposed layout is the output's.
        out.par_chunks_mut(DENSE_TASK_ROWS)
            .enumerate()
            .for_each(|(b, d)| task(b, d));
        return;
    }
    let mut t = vec![0f32; rows * n];
    t.par_chunks_mut(DENSE_TASK_ROWS * n)
        .enumerate()
        .for_each(|(b, d)| task(b, d));
    for (i, o) in out.chunks_exact_mut(rows).enumerate() {
        for (j, o) in o.iter_mut().enumerate() {
            *o = t[j * n + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Every row of a dense product gives the same bits alone as in a batch of any size (four
    /// rows per pass or the one-row remainder), and is the dot product to f32 accuracy.
    #[test]
    fn dense_rows_do_not_depend_on_the_batch() {
        let (rows, cols) = (37, 70); // 70: four 16-lane chunks and a tail of 6
        let w = values(rows * cols, 1);
        let x = values(11 * cols, 2);
        let mut alone = vec![0f32; 11 * rows];
        for i in 0..11 {
            let xi = &x[i * cols..(i + 1) * cols];
            matmul_dense(xi, 1, cols, &w, &mut alone[i * rows..(i + 1) * rows]);
            for j in 0..rows {
                let exact: f64 = xi
                    .iter()
                    .zip(&w[j * cols..(j + 1) * cols])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!((alone[i * rows + j] as f64 - exact).abs() < 1e-4);
            }
        }
        for n in 1..=11 {
            let mut out = vec![0f32; n * rows];
            matmul_dense(&x[..n * cols], n, cols, &w, &mut out);
            let same = out
                .iter()
                .zip(&alone)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{n} rows");
        }
    }

    /// The AVX2/FMA build of a task gives the portable body's bits (a fused multiply-add is
    /// exactly rounded everywhere).
    #[test]
    fn dispatched_task_equals_the_portable_body() {
        let (rows, cols, n) = (DENSE_TASK_ROWS, 70, 7);
        let w = values(rows * cols, 3);
        let x = values(n * cols, 4);
        let (mut fast, mut portable) = (vec![0f32; rows * n], vec![0f32; rows * n]);
        dense_task(&x, n, cols, &w, 0, &mut fast);
        dense_task_body(&x, n, cols, &w, 0, &mut portable);
        assert!(fast
            .iter()
            .zip(&portable)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
