//! GGUF's 32-element block formats, repacked for SIMD, and 8-bit activations.
//!
//! GGUF stores a weight row as a run of blocks:
//! - `Q4_0`: f16 scale `d`, 16 bytes of 4-bit values; `x = (q - 8) * d`.
//! - `Q4_1`: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit values; `x = q * d + m`.
//! - `Q8_0`: f16 scale `d`, 32 signed bytes; `x = q * d`.
//!
//! In each 4-bit block, byte `j` holds element `j` in its low nibble and element `j + 16` in its
//! high nibble. At load time each row is repacked ([`repack_row`]) into the same number of bytes
//! laid out as arrays: all blocks' values, then all scales, then all minimums. The AVX2 kernel
//! then converts eight scales with one instruction instead of one at a time, which halves the
//! work per block.
//!
//! Activations are quantised per 32-element block to signed bytes with a scale and the block's
//! scaled sum ([`Q8Vector`], llama.cpp's `Q8_1`), which folds a Q4_1 minimum in with one multiply.

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
        self.value_bytes() + if self.has_min() { 4 } else { 2 }
    }

    /// Bytes of quantised values in one block.
    pub const fn value_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 | QuantType::Q4_1 => 16,
            QuantType::Q8_0 => 32,
        }
    }

    /// Whether blocks carry a minimum.
    pub const fn has_min(self) -> bool {
        matches!(self, QuantType::Q4_1)
    }

    /// Bytes a row of `cols` elements takes (`cols` must be a multiple of [`BLOCK`]).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / BLOCK * self.block_bytes()
    }
}

/// Rewrites one row of GGUF blocks (`gguf`) into the packed layout (`out`, the same length):
/// every block's values, then every block's f16 scale, then (Q4_1) every f16 minimum.
pub fn repack_row(ty: QuantType, gguf: &[u8], out: &mut [u8]) {
    let (bb, vb) = (ty.block_bytes(), ty.value_bytes());
    let blocks = gguf.len() / bb;
    let (values, rest) = out.split_at_mut(blocks * vb);
    let (scales, mins) = rest.split_at_mut(blocks * 2);
    for (b, block) in gguf.chunks_exact(bb).enumerate() {
        scales[2 * b..2 * b + 2].copy_from_slice(&block[..2]);
        let v = if ty.has_min() {
            mins[2 * b..2 * b + 2].copy_from_slice(&block[2..4]);
            &block[4..]
        } else {
            &block[2..]
        };
        values[b * vb..(b + 1) * vb].copy_from_slice(v);
    }
}

/// A packed row split into its parts.
struct Packed<'a> {
    values: &'a [u8],
    scales: &'a [u8],
    mins: &'a [u8],
}

fn split(ty: QuantType, row: &[u8]) -> Packed<'_> {
    let blocks = row.len() / ty.block_bytes();
    let (values, rest) = row.split_at(blocks * ty.value_bytes());
    let (scales, mins) = rest.split_at(blocks * 2);
    Packed {
        values,
        scales,
        mins,
    }
}

#[inline(always)]
fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
}

/// Dequantises one packed row into `out` (`out.len()` elements).
pub fn dequantize_row(ty: QuantType, row: &[u8], out: &mut [f32]) {
    let p = split(ty, row);
    let vb = ty.value_bytes();
    for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
        let d = f16_at(p.scales, b);
        let v = &p.values[b * vb..(b + 1) * vb];
        match ty {
            QuantType::Q4_0 => {
                for j in 0..16 {
                    out[j] = ((v[j] & 0x0f) as i32 - 8) as f32 * d;
                    out[j + 16] = ((v[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            QuantType::Q4_1 => {
                let m = f16_at(p.mins, b);
                for j in 0..16 {
                    out[j] = (v[j] & 0x0f) as f32 * d + m;
                    out[j + 16] = (v[j] >> 4) as f32 * d + m;
                }
            }
            QuantType::Q8_0 => {
                for j in 0..32 {
                    out[j] = v[j] as i8 as f32 * d;
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
        #[cfg(target_arch = "x86_64")]
        if cpu::features().avx2 {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast(v: &mut Q8Vector, x: &[f32]) {
                quantize_body(v, x)
            }
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { fast(self, x) };
        }
        quantize_body(self, x)
    }

    /// A new quantised copy of `x`.
    pub fn quantize(x: &[f32]) -> Self {
        let mut v = Self::default();
        v.quantize_from(x);
        v
    }
}

#[inline(always)]
fn quantize_body(v: &mut Q8Vector, x: &[f32]) {
    for (b, (xs, qs)) in x
        .chunks_exact(BLOCK)
        .zip(v.qs.chunks_exact_mut(BLOCK))
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
        v.d[b] = f16::from_f32(d).to_f32();
        v.s[b] = f16::from_f32(d * sum as f32).to_f32();
    }
}

/// Dot product of one packed weight row with a quantised activation vector, choosing the AVX2
/// kernel when the CPU has it.
#[inline]
pub fn dot_row(ty: QuantType, row: &[u8], x: &Q8Vector) -> f32 {
    let mut out = [0f32];
    dot_rows(ty, row, x, &mut out);
    out[0]
}

/// Dot products of consecutive packed rows (`rows`, `out.len()` of them) with `x`, into `out`.
pub fn dot_rows(ty: QuantType, rows: &[u8], x: &Q8Vector, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu::features().avx2 {
        // SAFETY: the features these functions need were detected at run time.
        unsafe {
            use avx2::{Q4_0, Q4_1, Q8_0};
            match (ty, cpu::features().avx_vnni) {
                (QuantType::Q4_0, false) => avx2::dot_rows::<Q4_0>(rows, x, out),
                (QuantType::Q4_1, false) => avx2::dot_rows::<Q4_1>(rows, x, out),
                (QuantType::Q8_0, false) => avx2::dot_rows::<Q8_0>(rows, x, out),
                (QuantType::Q4_0, true) => avx2::dot_rows_vnni::<Q4_0>(rows, x, out),
                (QuantType::Q4_1, true) => avx2::dot_rows_vnni::<Q4_1>(rows, x, out),
                (QuantType::Q8_0, true) => avx2::dot_rows_vnni::<Q8_0>(rows, x, out),
            }
        }
        return;
    }
    let rb = rows.len() / out.len().max(1);
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb.max(1))) {
        *o = dot_row_scalar(ty, row, x);
    }
}

/// The portable reference for [`dot_row`].
pub fn dot_row_scalar(ty: QuantType, row: &[u8], x: &Q8Vector) -> f32 {
    let p = split(ty, row);
    let vb = ty.value_bytes();
    let mut acc = 0f32;
    for b in 0..p.scales.len() / 2 {
        let ys = &x.qs[b * BLOCK..(b + 1) * BLOCK];
        let v = &p.values[b * vb..(b + 1) * vb];
        let scale = f16_at(p.scales, b) * x.d[b];
        let isum: i32 = match ty {
            QuantType::Q4_0 => (0..16)
                .map(|j| {
                    ((v[j] & 0x0f) as i32 - 8) * ys[j] as i32
                        + ((v[j] >> 4) as i32 - 8) * ys[j + 16] as i32
                })
                .sum(),
            QuantType::Q4_1 => (0..16)
                .map(|j| {
                    (v[j] & 0x0f) as i32 * ys[j] as i32 + (v[j] >> 4) as i32 * ys[j + 16] as i32
                })
                .sum(),
            QuantType::Q8_0 => (0..32).map(|j| v[j] as i8 as i32 * ys[j] as i32).sum(),
        };
        acc += scale * isum as f32;
        if ty.has_min() {
            acc += f16_at(p.mins, b) * x.s[b];
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{split, Q8Vector, QuantType, BLOCK};
    use std::arch::x86_64::*;

    /// 16 bytes of nibbles → 32 bytes: low nibbles in the low lane, high nibbles in the high lane.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let tmp = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_inserti128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Format tags for the const-generic kernels (one compiled copy per format).
    pub(super) const Q4_0: u8 = 0;
    pub(super) const Q4_1: u8 = 1;
    pub(super) const Q8_0: u8 = 2;

    const fn quant_type(tag: u8) -> QuantType {
        match tag {
            Q4_0 => QuantType::Q4_0,
            Q4_1 => QuantType::Q4_1,
            _ => QuantType::Q8_0,
        }
    }

    /// Σ u·s over 32 unsigned × signed byte pairs, as 8 i32 partial sums; with `VNNI` one
    /// `vpdpbusd` instead of `vpmaddubsw` + `vpmaddwd`.
    #[inline(always)]
    unsafe fn dot_u8_i8<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    /// The 8 partial sums of block `b`'s integer dot product.
    #[inline(always)]
    unsafe fn block_sums<const T: u8, const VNNI: bool>(
        values: *const u8,
        ys: *const i8,
        b: usize,
    ) -> __m256i {
        let y = _mm256_loadu_si256(ys.add(b * BLOCK) as *const __m256i);
        match T {
            Q4_0 => {
                let q = _mm256_sub_epi8(nibbles(values.add(b * 16)), _mm256_set1_epi8(8));
                dot_u8_i8::<VNNI>(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q))
            }
            Q4_1 => dot_u8_i8::<VNNI>(nibbles(values.add(b * 16)), y),
            _ => {
                let q = _mm256_loadu_si256(values.add(b * 32) as *const __m256i);
                dot_u8_i8::<VNNI>(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q))
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows<const T: u8>(rows: &[u8], x: &Q8Vector, out: &mut [f32]) {
        dot_rows_body::<T, false>(rows, x, out)
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(super) unsafe fn dot_rows_vnni<const T: u8>(rows: &[u8], x: &Q8Vector, out: &mut [f32]) {
        dot_rows_body::<T, true>(rows, x, out)
    }

    #[inline(always)]
    unsafe fn dot_rows_body<const T: u8, const VNNI: bool>(
        rows: &[u8],
        x: &Q8Vector,
        out: &mut [f32],
    ) {
        let ty = quant_type(T);
        let n = out.len();
        if n == 0 {
            return;
        }
        let rb = rows.len() / n;
        let blocks = rb / ty.block_bytes();
        debug_assert!(x.qs.len() >= blocks * BLOCK && x.d.len() >= blocks);
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot_one::<T, VNNI>(&rows[r * rb..(r + 1) * rb], blocks, x);
        }
    }

    #[inline(always)]
    unsafe fn dot_one<const T: u8, const VNNI: bool>(
        row: &[u8],
        blocks: usize,
        x: &Q8Vector,
    ) -> f32 {
        let ty = quant_type(T);
        let p = split(ty, row);
        let (values, ys) = (p.values.as_ptr(), x.qs.as_ptr());
        let scales = p.scales.as_ptr() as *const u16;
        let mins = p.mins.as_ptr() as *const u16;
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut macc = _mm256_setzero_ps();
        let mut b = 0;
        // Eight blocks at a time: their scales are converted and combined in one go, then each
        // block's is broadcast from its lane.
        while b + 8 <= blocks {
            let d = _mm256_cvtph_ps(_mm_loadu_si128(scales.add(b) as *const __m128i));
            let sc = _mm256_mul_ps(d, _mm256_loadu_ps(x.d.as_ptr().add(b)));
            if T == Q4_1 {
                let m = _mm256_cvtph_ps(_mm_loadu_si128(mins.add(b) as *const __m128i));
                macc = _mm256_fmadd_ps(m, _mm256_loadu_ps(x.s.as_ptr().add(b)), macc);
            }
            let mut j = 0;
            while j < 8 {
                let s0 = _mm256_permutevar8x32_ps(sc, _mm256_set1_epi32(j as i32));
                let s1 = _mm256_permutevar8x32_ps(sc, _mm256_set1_epi32(j as i32 + 1));
                let p0 = _mm256_cvtepi32_ps(block_sums::<T, VNNI>(values, ys, b + j));
                let p1 = _mm256_cvtepi32_ps(block_sums::<T, VNNI>(values, ys, b + j + 1));
                acc0 = _mm256_fmadd_ps(s0, p0, acc0);
                acc1 = _mm256_fmadd_ps(s1, p1, acc1);
                j += 2;
            }
            b += 8;
        }
        let mut tail_min = 0f32;
        while b < blocks {
            let d = _cvtsh_ss(*scales.add(b)) * *x.d.get_unchecked(b);
            let p0 = _mm256_cvtepi32_ps(block_sums::<T, VNNI>(values, ys, b));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d), p0, acc0);
            if T == Q4_1 {
                tail_min += _cvtsh_ss(*mins.add(b)) * *x.s.get_unchecked(b);
            }
            b += 1;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + hsum(macc) + tail_min
    }

    #[inline(always)]
    unsafe fn _cvtsh_ss(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Quantises `w` (one row) into `ty`'s packed bytes, via GGUF's block layout.
    pub(crate) fn quantize_row(ty: QuantType, w: &[f32]) -> Vec<u8> {
        let gguf = quantize_row_gguf(ty, w);
        let mut packed = vec![0u8; gguf.len()];
        repack_row(ty, &gguf, &mut packed);
        packed
    }

    /// Quantises `w` (one row) into GGUF block bytes, as ggml's reference quantisers do.
    pub(crate) fn quantize_row_gguf(ty: QuantType, w: &[f32]) -> Vec<u8> {
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

    /// Every SIMD kernel this CPU can run, by name, on one row (the last is what `dot_row` picks).
    fn simd_variants(ty: QuantType, row: &[u8], x: &Q8Vector) -> Vec<(&'static str, f32)> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use avx2::{Q4_0, Q4_1, Q8_0};
            let f = cpu::features();
            let mut o = [0f32];
            if f.avx2 {
                // SAFETY: AVX2 was detected.
                unsafe {
                    match ty {
                        QuantType::Q4_0 => avx2::dot_rows::<Q4_0>(row, x, &mut o),
                        QuantType::Q4_1 => avx2::dot_rows::<Q4_1>(row, x, &mut o),
                        QuantType::Q8_0 => avx2::dot_rows::<Q8_0>(row, x, &mut o),
                    }
                }
                out.push(("avx2", o[0]));
            }
            if f.avx_vnni {
                // SAFETY: AVX-VNNI was detected.
                unsafe {
                    match ty {
                        QuantType::Q4_0 => avx2::dot_rows_vnni::<Q4_0>(row, x, &mut o),
                        QuantType::Q4_1 => avx2::dot_rows_vnni::<Q4_1>(row, x, &mut o),
                        QuantType::Q8_0 => avx2::dot_rows_vnni::<Q8_0>(row, x, &mut o),
                    }
                }
                out.push(("avx-vnni", o[0]));
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
        fn dot_row_matches_scalar_and_dequantised(ty in types(), (w, x) in (1usize..30).prop_flat_map(|b| (row(b), row(b)))) {
            let bytes = quantize_row(ty, &w);
            prop_assert_eq!(bytes.len(), ty.row_bytes(w.len()));
            let xq = Q8Vector::quantize(&x);
            let slow = dot_row_scalar(ty, &bytes, &xq);
            for (name, fast) in simd_variants(ty, &bytes, &xq) {
                prop_assert!((fast - slow).abs() <= 1e-3 * (1.0 + slow.abs()), "{name} {fast} vs scalar {slow}");
            }
            prop_assert_eq!(dot_row(ty, &bytes, &xq), simd_variants(ty, &bytes, &xq).last().map_or(slow, |v| v.1));

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
