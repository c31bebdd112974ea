//! RMSNorm: `y = x / sqrt(mean(x²) + eps) * weight`, row by row.

use crate::vecops;

/// Normalises each row of `x` (rows of `weight.len()` elements) into `out`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, yr) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss = vecops::dot(xr, xr);
        let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
        for ((y, x), w) in yr.iter_mut().zip(xr).zip(weight) {
            *y = x * inv * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_each_row() {
        let x = [3.0, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let w = [1.0, 2.0, 1.0, 1.0];
        let mut y = [0.0; 8];
        rms_norm(&x, &w, 0.0, &mut y);
        let inv = 1.0 / (25.0f32 / 4.0).sqrt();
        let want = [3.0 * inv, 8.0 * inv, 0.0, 0.0, 1.0, 2.0, 1.0, 1.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }
}
