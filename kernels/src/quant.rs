//! GGUF's 32-element block formats and 8-bit activations.
//!
//! Weights stay in the bytes GGUF stores (no repacking), so a matrix row is a run of blocks:
//! - `Q4_0`: f16 scale `d`, 16 bytes of 4-bit values; `x = (q - 8) * d`.
//! - `Q4_1`: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit values; `x = q * d + m`.
//! - `Q8_0`: f16 scale `d`, 32 signed bytes; `x = q * d`.
//!
//! In each 4-bit block, byte `j` holds element `j` in its low nibble and element `j + 16` in its
//! high nibble. Activations are quantised per 32-element block to signed bytes with an f32 scale
//! and the block's scaled sum ([`Q8Vector`]), which lets a Q4_1 dot product fold in the minimum
//! with one multiply (the idea of llama.cpp's `Q8_1`).

use crate::cpu;
use half::f16;

/// Elements in every block of every supported format.
pub const BLOCK: usize = 32;

/// A supported GGUF block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// 4-bit, symmetric, one f16 scale per block.
    Q4_0,
    /// 4-bit with an f16 scale and an f16 minimum per block.
    Q4_1,
    /// 8-bit, one f16 scale per block.
    Q8_0,
}

impl QuantType {
    /// Bytes one block takes.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q8_0 => 34,
        }
    }

    /// Bytes a row of `cols` elements takes (`cols` must be a multiple of [`BLOCK`]).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / BLOCK * self.block_bytes()
    }
}

#[inline(always)]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Dequantises one row of blocks into `out` (`out.len()` elements; `row` holds exactly that many).
pub fn dequantize_row(ty: QuantType, row: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    for (block, out) in row.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
        match ty {
            QuantType::Q4_0 => {
                let d = f16_at(block, 0);
                for j in 0..16 {
                    let q = block[2 + j];
                    out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            QuantType::Q4_1 => {
                let d = f16_at(block, 0);
                let m = f16_at(block, 2);
                for j in 0..16 {
                    let q = block[4 + j];
                    out[j] = (q & 0x0f) as f32 * d + m;
                    out[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            QuantType::Q8_0 => {
                let d = f16_at(block, 0);
                for j in 0..32 {
                    out[j] = block[2 + j] as i8 as f32 * d;
                }
            }
        }
    }
}

/// A vector of activations quantised to signed bytes in blocks of 32.
#[derive(Debug, Clone, Default)]
pub struct Q8Vector {
    /// The quantised values.
    pub qs: Vec<i8>,
    /// One scale per block (an f16 value): `x ≈ q * d`.
    pub d: Vec<f32>,
    /// One scaled sum per block (an f16 value): `d * Σ q`.
    pub s: Vec<f32>,
}

impl Q8Vector {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.qs.len()
    }

    /// True when it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.qs.is_empty()
    }

    /// Quantises `x` (its length a multiple of [`BLOCK`]) into `self`, reusing its buffers.
    pub fn quantize_from(&mut self, x: &[f32]) {
        let blocks = x.len() / BLOCK;
        self.qs.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        for (b, (xs, qs)) in x
            .chunks_exact(BLOCK)
            .zip(self.qs.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qs.iter_mut().zip(xs) {
                let r = (v * id).round() as i32;
                *q = r as i8;
                sum += r;
            }
            // Scales are stored rounded to f16, as ggml's `block_q8_1` stores them, so the
            // products match llama.cpp's arithmetic.
            self.d[b] = f16::from_f32(d).to_f32();
            self.s[b] = f16::from_f32(d * sum as f32).to_f32();
        }
    }

    /// A new quantised copy of `x`.
    pub fn quantize(x: &[f32]) -> Self {
        let mut v = Self::default();
        v.quantize_from(x);
        v
    }
}

/// Dot product of one quantised weight row with a quantised activation vector, choosing the
/// AVX2 kernel when the CPU has it.
#[inline]
pub fn dot_row(ty: QuantType, row: &[u8], x: &Q8Vector) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu::features().avx2 {
        // SAFETY: the features this function needs were detected at run time.
        return unsafe { avx2::dot_row(ty, row, x) };
    }
    dot_row_scalar(ty, row, x)
}

/// The portable reference for [`dot_row`].
pub fn dot_row_scalar(ty: QuantType, row: &[u8], x: &Q8Vector) -> f32 {
    let bb = ty.block_bytes();
    let mut acc = 0f32;
    for (b, block) in row.chunks_exact(bb).enumerate() {
        let ys = &x.qs[b * BLOCK..(b + 1) * BLOCK];
        let dy = x.d[b];
        match ty {
            QuantType::Q4_0 => {
                let mut isum = 0i32;
                for j in 0..16 {
                    let q = block[2 + j];
                    isum += ((q & 0x0f) as i32 - 8) * ys[j] as i32;
                    isum += ((q >> 4) as i32 - 8) * ys[j + 16] as i32;
                }
                acc += f16_at(block, 0) * dy * isum as f32;
            }
            QuantType::Q4_1 => {
                let mut isum = 0i32;
                for j in 0..16 {
                    let q = block[4 + j];
                    isum += (q & 0x0f) as i32 * ys[j] as i32;
                    isum += (q >> 4) as i32 * ys[j + 16] as i32;
                }
                acc += f16_at(block, 0) * dy * isum as f32 + f16_at(block, 2) * x.s[b];
            }
            QuantType::Q8_0 => {
                let mut isum = 0i32;
                for j in 0..32 {
                    isum += block[2 + j] as i8 as i32 * ys[j] as i32;
                }
                acc += f16_at(block, 0) * dy * isum as f32;
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8Vector, QuantType, BLOCK};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn f16_to_f32(bytes: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*bytes, *bytes.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// 16 bytes of nibbles → 32 bytes: low nibbles in the low lane, high nibbles in the high lane.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let tmp = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    /// Σ x·y over 32 unsigned × signed byte pairs, as 8 f32 partial sums.
    #[inline(always)]
    unsafe fn sum_u8_i8(x: __m256i, y: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(x, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Σ x·y over 32 signed byte pairs (values in -127..=127), as 8 f32 partial sums.
    #[inline(always)]
    unsafe fn sum_i8_i8(x: __m256i, y: __m256i) -> __m256 {
        sum_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row(ty: QuantType, row: &[u8], x: &Q8Vector) -> f32 {
        let bb = ty.block_bytes();
        let blocks = row.len() / bb;
        debug_assert!(x.qs.len() >= blocks * BLOCK);
        let rp = row.as_ptr();
        let yp = x.qs.as_ptr();
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        match ty {
            QuantType::Q4_0 => {
                for b in 0..blocks {
                    let blk = rp.add(b * bb);
                    let d = _mm256_set1_ps(f16_to_f32(blk) * *x.d.get_unchecked(b));
                    let q = _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8));
                    let y = _mm256_loadu_si256(yp.add(b * BLOCK) as *const __m256i);
                    acc = _mm256_fmadd_ps(d, sum_i8_i8(q, y), acc);
                }
            }
            QuantType::Q4_1 => {
                for b in 0..blocks {
                    let blk = rp.add(b * bb);
                    let d = _mm256_set1_ps(f16_to_f32(blk) * *x.d.get_unchecked(b));
                    mins += f16_to_f32(blk.add(2)) * *x.s.get_unchecked(b);
                    let q = nibbles(blk.add(4));
                    let y = _mm256_loadu_si256(yp.add(b * BLOCK) as *const __m256i);
                    acc = _mm256_fmadd_ps(d, sum_u8_i8(q, y), acc);
                }
            }
            QuantType::Q8_0 => {
                for b in 0..blocks {
                    let blk = rp.add(b * bb);
                    let d = _mm256_set1_ps(f16_to_f32(blk) * *x.d.get_unchecked(b));
                    let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    let y = _mm256_loadu_si256(yp.add(b * BLOCK) as *const __m256i);
                    acc = _mm256_fmadd_ps(d, sum_i8_i8(q, y), acc);
                }
            }
        }
        hsum(acc) + mins
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Quantises `w` (one row) into `ty`'s block bytes, as ggml's reference quantisers do.
    pub(crate) fn quantize_row(ty: QuantType, w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for xs in w.chunks_exact(BLOCK) {
            match ty {
                QuantType::Q4_0 => {
                    let max = xs
                        .iter()
                        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                    for j in 0..16 {
                        let a = ((xs[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                        let b = ((xs[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                        out.push(a | (b << 4));
                    }
                }
                QuantType::Q4_1 => {
                    let min = xs.iter().cloned().fold(f32::INFINITY, f32::min);
                    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
                    for j in 0..16 {
                        let a = (((xs[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                        let b = (((xs[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                        out.push(a | (b << 4));
                    }
                }
                QuantType::Q8_0 => {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                    out.extend(xs.iter().map(|v| (v * id).round() as i8 as u8));
                }
            }
        }
        out
    }

    fn types() -> impl Strategy<Value = QuantType> {
        prop_oneof![
            Just(QuantType::Q4_0),
            Just(QuantType::Q4_1),
            Just(QuantType::Q8_0)
        ]
    }

    fn row(blocks: usize) -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(-4.0f32..4.0, blocks * BLOCK)
    }

    proptest! {
        /// The SIMD kernel (when present) and the scalar twin agree, and both approximate the
        /// f32 dot product of the dequantised row with the activations.
        #[test]
        fn dot_row_matches_scalar_and_dequantised(ty in types(), (w, x) in (1usize..12).prop_flat_map(|b| (row(b), row(b)))) {
            let bytes = quantize_row(ty, &w);
            prop_assert_eq!(bytes.len(), ty.row_bytes(w.len()));
            let xq = Q8Vector::quantize(&x);
            let fast = dot_row(ty, &bytes, &xq);
            let slow = dot_row_scalar(ty, &bytes, &xq);
            prop_assert!((fast - slow).abs() <= 1e-3 * (1.0 + slow.abs()), "simd {fast} vs scalar {slow}");

            let mut deq = vec![0f32; w.len()];
            dequantize_row(ty, &bytes, &mut deq);
            let exact: f32 = deq.iter().zip(&x).map(|(a, b)| a * b).sum();
            let norm: f32 = deq.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            prop_assert!((slow - exact).abs() <= 0.02 * norm + 1e-3, "quantised {slow} vs f32 {exact} (norm {norm})");
        }

        #[test]
        fn dequantize_stays_within_one_step(ty in types(), w in row(4)) {
            let bytes = quantize_row(ty, &w);
            let mut deq = vec![0f32; w.len()];
            dequantize_row(ty, &bytes, &mut deq);
            for (blk_w, blk_d) in w.chunks(BLOCK).zip(deq.chunks(BLOCK)) {
                let range = blk_w.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                let step = match ty { QuantType::Q8_0 => range / 254.0, _ => range / 15.0 };
                for (a, b) in blk_w.iter().zip(blk_d) {
                    prop_assert!((a - b).abs() <= step * 1.01 + 1e-3, "{a} vs {b}, step {step}");
                }
            }
        }
    }

    #[test]
    fn zero_activations_quantise_to_zero() {
        let q = Q8Vector::quantize(&[0.0; 64]);
        assert!(q.qs.iter().all(|&v| v == 0));
        assert_eq!(q.d, vec![0.0, 0.0]);
    }
}
