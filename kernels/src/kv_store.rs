//! How the paged KV pool stores keys and values ([`KvStore`]): f16 elements, or llama.cpp's
//! Q8_0 blocks ([`BlockQ8_0`]: 32 int8 values and one f16 scale, 34 bytes for 32 values
//! instead of 64).
//!
//! Attention never computes on the stored form: a tile of keys and values is widened to f32
//! ([`KvStore::dequantize`]) and the f32 tile kernels run on it, except that f16 keys may be
//! read in place by the decode path ([`KvStore::as_f16`]), since f16 widens exactly. A Q8_0
//! value dequantizes as `f32(scale) × f32(q)`: one rounded multiply, the same in the portable
//! and the AVX2 body, so both give the same f32 tile bit for bit, and decode and prefill (which
//! both dequantize a tile before using it) keep the canonical order's bit equality.

use half::f16;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Values per Q8_0 block.
pub const QK8_0: usize = 32;

/// One Q8_0 block, as llama.cpp's `block_q8_0`: `d = max|x| / 127` (rounded to f16) and
/// `qs[i] = round(x[i] / d)`, so `x[i] ≈ d × qs[i]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BlockQ8_0 {
    /// The scale.
    pub d: f16,
    /// The quantized values.
    pub qs: [i8; QK8_0],
}

/// Bytes of one [`BlockQ8_0`] in host form ([`BlockQ8_0::to_bytes`]).
pub const BLOCK_Q8_0_BYTES: usize = 2 + QK8_0;

impl BlockQ8_0 {
    /// The block in host form: the scale's little-endian bits, then the 32 values.
    pub fn to_bytes(&self) -> [u8; BLOCK_Q8_0_BYTES] {
        let mut out = [0u8; BLOCK_Q8_0_BYTES];
        out[..2].copy_from_slice(&self.d.to_bits().to_le_bytes());
        for (o, &q) in out[2..].iter_mut().zip(&self.qs) {
            *o = q as u8;
        }
        out
    }

    /// A block from [`Self::to_bytes`]'s form (`bytes` is [`BLOCK_Q8_0_BYTES`] long).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        assert_eq!(bytes.len(), BLOCK_Q8_0_BYTES, "one Q8_0 block");
        let mut qs = [0i8; QK8_0];
        for (q, &b) in qs.iter_mut().zip(&bytes[2..]) {
            *q = b as i8;
        }
        BlockQ8_0 {
            d: f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])),
            qs,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for super::BlockQ8_0 {}
}

/// A storage unit of the KV pool: one f16 value, or one [`BlockQ8_0`] of [`QK8_0`] values.
/// Offsets into a pool of units are element offsets divided by [`KvStore::ELEMS`]; a head's
/// elements never share a unit with another head's (`head_dim` is a multiple of `ELEMS`).
pub trait KvStore: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    /// Values per unit.
    const ELEMS: usize;
    /// The name of the format (`"f16"`, `"q8_0"`).
    const NAME: &'static str;

    /// Stores `src` (`dst.len() × ELEMS` values) into `dst`.
    fn quantize(src: &[f32], dst: &mut [Self]);

    /// Widens the first `out.len()` values (a multiple of `ELEMS`) of `src` to f32. `simd`
    /// only where AVX2, FMA and F16C were detected; the result is the same bits either way.
    fn dequantize(simd: bool, src: &[Self], out: &mut [f32]);

    /// The pool as f16 values, when that is what it holds (read in place by decode).
    fn as_f16(pool: &[Self]) -> Option<&[f16]>;
}

impl KvStore for f16 {
    const ELEMS: usize = 1;
    const NAME: &'static str = "f16";

    #[inline]
    fn quantize(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(*s);
        }
    }

    #[inline(always)]
    fn dequantize(simd: bool, src: &[Self], out: &mut [f32]) {
        crate::tile::to_f32(simd, src, out)
    }

    #[inline(always)]
    fn as_f16(pool: &[Self]) -> Option<&[f16]> {
        Some(pool)
    }
}

impl KvStore for BlockQ8_0 {
    const ELEMS: usize = QK8_0;
    const NAME: &'static str = "q8_0";

    fn quantize(src: &[f32], dst: &mut [Self]) {
        assert_eq!(src.len(), dst.len() * QK8_0, "whole Q8_0 blocks");
        for (b, x) in dst.iter_mut().zip(src.chunks_exact(QK8_0)) {
            *b = quantize_block(x);
        }
    }

    #[inline(always)]
    fn dequantize(simd: bool, src: &[Self], out: &mut [f32]) {
        assert!(
            out.len().is_multiple_of(QK8_0) && src.len() * QK8_0 >= out.len(),
            "whole Q8_0 blocks"
        );
        #[cfg(target_arch = "x86_64")]
        if simd {
            for (b, o) in src.iter().zip(out.chunks_exact_mut(QK8_0)) {
                // SAFETY: the caller detected AVX2 and F16C; `o` holds 32 values.
                unsafe { dequantize_block_avx2(b, o.as_mut_ptr()) };
            }
            return;
        }
        let _ = simd;
        for (b, o) in src.iter().zip(out.chunks_exact_mut(QK8_0)) {
            let d = b.d.to_f32();
            for (o, &q) in o.iter_mut().zip(&b.qs) {
                *o = d * q as f32;
            }
        }
    }

    #[inline(always)]
    fn as_f16(_: &[Self]) -> Option<&[f16]> {
        None
    }
}

/// llama.cpp's `quantize_row_q8_0_ref` for one block.
fn quantize_block(x: &[f32]) -> BlockQ8_0 {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK8_0];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// One block widened with AVX2: `f32(d) × f32(q)` for each of the 32 values at `out`.
///
/// # Safety
/// AVX2 and F16C must be available; `out` must have room for 32 f32s.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dequantize_block_avx2(b: &BlockQ8_0, out: *mut f32) {
    let d = _mm256_set1_ps(b.d.to_f32());
    let qp = b.qs.as_ptr() as *const __m128i;
    let lo = _mm_loadu_si128(qp);
    let hi = _mm_loadu_si128(qp.add(1));
    for (i, x) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
        .into_iter()
        .enumerate()
    {
        let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
        _mm256_storeu_ps(out.add(8 * i), _mm256_mul_ps(d, f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed as f32).sin() * (1.0 + (i % 7) as f32))
            .collect()
    }

    #[test]
    fn q8_0_quantizes_as_llama_cpp_and_round_trips_within_half_a_step() {
        let x = values(4 * QK8_0, 3);
        let mut b = vec![BlockQ8_0::default(); 4];
        BlockQ8_0::quantize(&x, &mut b);
        let mut y = vec![0f32; x.len()];
        BlockQ8_0::dequantize(false, &b, &mut y);
        for (blk, (xs, ys)) in b.iter().zip(x.chunks(QK8_0).zip(y.chunks(QK8_0))) {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert_eq!(blk.d, f16::from_f32(amax / 127.0));
            assert!(blk.qs.iter().any(|q| q.abs() == 127));
            for (a, c) in xs.iter().zip(ys) {
                // Half a step, plus the scale's f16 rounding over 127 steps.
                assert!(
                    (a - c).abs() <= amax / 127.0 * 0.5 + amax * 1e-3,
                    "{a} vs {c}"
                );
            }
        }
        let zero = [0f32; QK8_0];
        let mut z = [BlockQ8_0::default()];
        BlockQ8_0::quantize(&zero, &mut z);
        assert_eq!(z[0].qs, [0; QK8_0]);
    }

    #[test]
    fn q8_0_simd_dequantize_equals_portable_bit_for_bit() {
        let x = values(8 * QK8_0, 9);
        let mut b = vec![BlockQ8_0::default(); 8];
        BlockQ8_0::quantize(&x, &mut b);
        b[3].qs[5] = -128;
        let (mut p, mut s) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        BlockQ8_0::dequantize(false, &b, &mut p);
        BlockQ8_0::dequantize(cpu::features().avx2, &b, &mut s);
        assert_eq!(
            p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            s.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn q8_0_block_bytes_round_trip() {
        let mut b = [BlockQ8_0::default()];
        BlockQ8_0::quantize(&values(QK8_0, 1), &mut b);
        assert_eq!(BlockQ8_0::from_bytes(&b[0].to_bytes()), b[0]);
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), BLOCK_Q8_0_BYTES);
    }
}
