//! The inner loops of attention, shared by the contiguous and the paged kernels: one query's
//! scores against a run of keys, and the weighted sum of a run of values. They are generic over
//! how K and V are stored ([`KvElem`]: f32 or f16) and take the run as a slice whose consecutive
//! rows are `stride` elements apart.

use half::f16;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// An element type K and V can be stored in.
pub(crate) trait KvElem: Copy {
    /// The value as f32.
    fn to_f32(self) -> f32;
    /// Eight consecutive values at `p`, widened to f32.
    ///
    /// # Safety
    /// `p` must point at 8 readable values and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// One online-softmax step for one query: folds a tile's `scores` (whose largest is `tmax`)
/// into the running maximum `m` and sum `l`, rescaling the unnormalised accumulator `acc` when
/// the maximum grows; leaves `scores` holding the tile's weights `e^(s - m)` for
/// [`accumulate`].
#[inline(always)]
pub(crate) fn fold_softmax(
    acc: &mut [f32],
    m: &mut f32,
    l: &mut f32,
    scores: &mut [f32],
    tmax: f32,
) {
    if tmax > *m {
        if *l > 0.0 {
            let c = (*m - tmax).exp();
            crate::vecops::scale_body(acc, c);
            *l *= c;
        }
        *m = tmax;
    }
    *l += crate::vecops::exp_sub_sum_body(scores, *m);
}

/// Folds the online-softmax state (`acc_b`, `m_b`, `l_b`) of a later range of keys into the
/// running state (`acc`, `m`, `l`): both are brought to the larger maximum and added. An empty
/// state (`l == 0`) on either side is no rescale: the other side is kept or copied as is, so
/// merging into a fresh state (`0`, `-inf`, `0`) copies. This is the one merge formula of paged
/// attention's canonical order (see `crate::paged_attention`): every path merges its key chunks
/// with it, in chunk order.
#[inline(always)]
pub(crate) fn merge_state(
    acc: &mut [f32],
    m: &mut f32,
    l: &mut f32,
    acc_b: &[f32],
    m_b: f32,
    l_b: f32,
) {
    if l_b == 0.0 {
        return;
    }
    if *l == 0.0 {
        acc.copy_from_slice(acc_b);
        (*m, *l) = (m_b, l_b);
        return;
    }
    let mx = m.max(m_b);
    let (ca, cb) = ((*m - mx).exp(), (m_b - mx).exp());
    for (a, &b) in acc.iter_mut().zip(acc_b) {
        *a = *a * ca + b * cb;
    }
    *l = *l * ca + l_b * cb;
    *m = mx;
}

/// Converts a run of stored elements to f32 (`out.len()` of them; `src` at least as long).
#[inline(always)]
pub(crate) fn to_f32<E: KvElem>(simd: bool, src: &[E], out: &mut [f32]) {
    assert!(src.len() >= out.len(), "source run shorter than its output");
    #[cfg(target_arch = "x86_64")]
    if simd {
        let whole = out.len() / 8 * 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: the caller detected AVX2 and F16C; i + 8 <= out.len() <= src.len().
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), E::load8(src.as_ptr().add(i))) };
        }
        for i in whole..out.len() {
            out[i] = src[i].to_f32();
        }
        return;
    }
    let _ = simd;
    for (o, x) in out.iter_mut().zip(src) {
        *o = x.to_f32();
    }
}

/// `scores[j] = scale · q·k_j` for the keys of a run (`k` starts at the run's first key of the
/// head; keys are `stride` apart); returns the largest score. `simd` says AVX2/FMA/F16C may be
/// used (the caller detected them).
#[inline(always)]
pub(crate) fn scores<E: KvElem>(
    simd: bool,
    q: &[f32],
    k: &[E],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> f32 {
    let d = q.len();
    if out.is_empty() {
        return f32::NEG_INFINITY;
    }
    assert!(
        k.len() >= (out.len() - 1) * stride + d,
        "key run shorter than its rows"
    );
    #[cfg(target_arch = "x86_64")]
    if simd && d.is_multiple_of(8) {
        // SAFETY: the caller detected the features; the bounds were checked above.
        return unsafe { scores_avx2(q, k, stride, scale, out) };
    }
    let _ = simd;
    let mut tmax = f32::NEG_INFINITY;
    for (j, s) in out.iter_mut().enumerate() {
        let kj = &k[j * stride..j * stride + d];
        let mut lanes = [0f32; 8];
        for (i, (a, b)) in q.iter().zip(kj).enumerate() {
            lanes[i % 8] += a * b.to_f32();
        }
        *s = lanes.iter().sum::<f32>() * scale;
        tmax = tmax.max(*s);
    }
    tmax
}

/// `acc += Σ_j w[j] · v_j` over the values of a run (laid out as in [`scores`]).
#[inline(always)]
pub(crate) fn accumulate<E: KvElem>(
    simd: bool,
    acc: &mut [f32],
    v: &[E],
    stride: usize,
    w: &[f32],
) {
    let d = acc.len();
    if w.is_empty() {
        return;
    }
    assert!(
        v.len() >= (w.len() - 1) * stride + d,
        "value run shorter than its rows"
    );
    #[cfg(target_arch = "x86_64")]
    if simd && d.is_multiple_of(8) {
        // SAFETY: the caller detected the features; the bounds were checked above.
        return unsafe { accumulate_avx2(acc, v, stride, w) };
    }
    let _ = simd;
    for (j, &wj) in w.iter().enumerate() {
        for (a, b) in acc.iter_mut().zip(&v[j * stride..j * stride + d]) {
            *a += wj * b.to_f32();
        }
    }
}

/// [`scores`] with AVX2. Keys go four at a time: each 8-wide chunk of the query is loaded
/// once for the four keys, and the four dot products are reduced together ([`hsum4`]), which
/// costs about a third of four separate horizontal sums. Every score is the same bits as
/// [`score_avx2`] gives for its key alone (the same products, partial sums and tree), which the
/// remaining keys use; a test checks the two against each other.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2<E: KvElem>(
    q: &[f32],
    k: &[E],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> f32 {
    let (qp, d) = (q.as_ptr(), q.len());
    let n = out.len();
    let mut tmax = f32::NEG_INFINITY;
    let mut j = 0;
    let sv = _mm_set1_ps(scale);
    while j + 4 <= n {
        let kp: [*const E; 4] = std::array::from_fn(|t| k.as_ptr().add((j + t) * stride));
        let mut a0 = [_mm256_setzero_ps(); 4];
        let mut a1 = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        if d == 64 {
            // As `score_avx2`'s 64-wide body: the first two chunks multiplied, then fused.
            let (qa, qb) = (_mm256_loadu_ps(qp), _mm256_loadu_ps(qp.add(8)));
            for t in 0..4 {
                a0[t] = _mm256_mul_ps(qa, E::load8(kp[t]));
                a1[t] = _mm256_mul_ps(qb, E::load8(kp[t].add(8)));
            }
            c = 16;
        }
        while c + 16 <= d {
            let (qa, qb) = (_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(qp.add(c + 8)));
            for t in 0..4 {
                a0[t] = _mm256_fmadd_ps(qa, E::load8(kp[t].add(c)), a0[t]);
                a1[t] = _mm256_fmadd_ps(qb, E::load8(kp[t].add(c + 8)), a1[t]);
            }
            c += 16;
        }
        if c < d {
            let qa = _mm256_loadu_ps(qp.add(c));
            for t in 0..4 {
                a0[t] = _mm256_fmadd_ps(qa, E::load8(kp[t].add(c)), a0[t]);
            }
        }
        let v: [__m256; 4] = std::array::from_fn(|t| _mm256_add_ps(a0[t], a1[t]));
        let s = _mm_mul_ps(hsum4(v), sv);
        _mm_storeu_ps(out.as_mut_ptr().add(j), s);
        for &x in &out[j..j + 4] {
            tmax = tmax.max(x);
        }
        j += 4;
    }
    for (t, o) in out[j..].iter_mut().enumerate() {
        *o = score_avx2(q, k.as_ptr().add((j + t) * stride)) * scale;
        tmax = tmax.max(*o);
    }
    tmax
}

/// One key's dot product with `q` (the order [`scores_avx2`] reproduces four at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn score_avx2<E: KvElem>(q: &[f32], kp: *const E) -> f32 {
    let (qp, d) = (q.as_ptr(), q.len());
    if d == 64 {
        let mut a0 = _mm256_mul_ps(_mm256_loadu_ps(qp), E::load8(kp));
        let mut a1 = _mm256_mul_ps(_mm256_loadu_ps(qp.add(8)), E::load8(kp.add(8)));
        for i in (2..8).step_by(2) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(8 * i)), E::load8(kp.add(8 * i)), a0);
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(qp.add(8 * i + 8)),
                E::load8(kp.add(8 * i + 8)),
                a1,
            );
        }
        return hsum(_mm256_add_ps(a0, a1));
    }
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut c = 0;
    while c + 16 <= d {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), E::load8(kp.add(c)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c + 8)), E::load8(kp.add(c + 8)), a1);
        c += 16;
    }
    if c < d {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), E::load8(kp.add(c)), a0);
    }
    hsum(_mm256_add_ps(a0, a1))
}

/// The horizontal sums of four vectors, as `[hsum(v[0]), …, hsum(v[3])]` bit for bit: the
/// same pairs added in the same tree (`((x0 + x4) + (x2 + x6)) + ((x1 + x5) + (x3 + x7))`;
/// float addition is commutative, so only the tree matters), four lanes at a time.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum4(v: [__m256; 4]) -> __m128 {
    // [A0+A4, A1+A5, A2+A6, A3+A7 | B0+B4, …] for A = v[0], B = v[1]; likewise C, D.
    let ab = _mm256_add_ps(
        _mm256_permute2f128_ps(v[0], v[1], 0x20),
        _mm256_permute2f128_ps(v[0], v[1], 0x31),
    );
    let cd = _mm256_add_ps(
        _mm256_permute2f128_ps(v[2], v[3], 0x20),
        _mm256_permute2f128_ps(v[2], v[3], 0x31),
    );
    // [A(0+2), A(1+3), C(0+2), C(1+3) | B(0+2), B(1+3), D(0+2), D(1+3)].
    let u = _mm256_add_ps(
        _mm256_shuffle_ps(ab, cd, 0b01_00_01_00),
        _mm256_shuffle_ps(ab, cd, 0b11_10_11_10),
    );
    // [A, C, A, C | B, D, B, D].
    let f = _mm256_add_ps(
        _mm256_shuffle_ps(u, u, 0b10_00_10_00),
        _mm256_shuffle_ps(u, u, 0b11_01_11_01),
    );
    let (lo, hi) = (_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
    _mm_unpacklo_ps(lo, hi)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum(a: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
}

/// [`accumulate`] with AVX2: for 64-element heads the accumulator stays in eight registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_avx2<E: KvElem>(acc: &mut [f32], v: &[E], stride: usize, w: &[f32]) {
    let ap = acc.as_mut_ptr();
    if acc.len() == 64 {
        let mut r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(ap.add(8 * i)));
        for (j, &wj) in w.iter().enumerate() {
            let vp = v.as_ptr().add(j * stride);
            let wv = _mm256_set1_ps(wj);
            for (i, r) in r.iter_mut().enumerate() {
                *r = _mm256_fmadd_ps(wv, E::load8(vp.add(8 * i)), *r);
            }
        }
        for (i, r) in r.iter().enumerate() {
            _mm256_storeu_ps(ap.add(8 * i), *r);
        }
        return;
    }
    for (j, &wj) in w.iter().enumerate() {
        let vp = v.as_ptr().add(j * stride);
        let wv = _mm256_set1_ps(wj);
        for c in (0..acc.len()).step_by(8) {
            let r = _mm256_fmadd_ps(wv, E::load8(vp.add(c)), _mm256_loadu_ps(ap.add(c)));
            _mm256_storeu_ps(ap.add(c), r);
        }
    }
}

/// [`scores`] for f32 keys on 512-bit registers, for head sizes that are a multiple of 16 (the
/// prefill path's tile copy; the CPU must have AVX-512F). Lanes 0–7 of each accumulator run
/// [`scores_avx2`]'s `a0` (the even 8-wide chunks) and lanes 8–15 its `a1` (the odd ones), and
/// the halves are added and reduced as there, so every score is the same bits in half the
/// multiply-adds. Heads of 64, 128 and 256 keep the query in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
pub(crate) unsafe fn scores_avx512(
    q: &[f32],
    k: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> f32 {
    let (d, n) = (q.len(), out.len());
    if n == 0 {
        return f32::NEG_INFINITY;
    }
    assert!(d.is_multiple_of(16), "head size not a multiple of 16");
    assert!(
        k.len() >= (n - 1) * stride + d,
        "key run shorter than its rows"
    );
    match d {
        64 => scores_regs::<4>(q, k, stride, scale, out),
        128 => scores_regs::<8>(q, k, stride, scale, out),
        256 => scores_regs::<16>(q, k, stride, scale, out),
        _ => {
            let qp = q.as_ptr();
            let dot = |kp: *const f32| -> __m512 {
                let mut a = _mm512_setzero_ps();
                for c in (0..d).step_by(16) {
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(c)), _mm512_loadu_ps(kp.add(c)), a);
                }
                a
            };
            scores_by_four(k, stride, scale, out, dot)
        }
    }
}

/// [`scores_avx512`] for heads of `16 N` elements, the query in `N` registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
unsafe fn scores_regs<const N: usize>(
    q: &[f32],
    k: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) -> f32 {
    let qv: [__m512; N] = std::array::from_fn(|i| _mm512_loadu_ps(q.as_ptr().add(16 * i)));
    // The first 16-wide step multiplied for 64-wide heads (as `scores_avx2` does), fused
    // multiply-adds from zero otherwise.
    let dot = |kp: *const f32| -> __m512 {
        let mut a = if N == 4 {
            _mm512_mul_ps(qv[0], _mm512_loadu_ps(kp))
        } else {
            _mm512_fmadd_ps(qv[0], _mm512_loadu_ps(kp), _mm512_setzero_ps())
        };
        for (i, qi) in qv.iter().enumerate().skip(1) {
            a = _mm512_fmadd_ps(*qi, _mm512_loadu_ps(kp.add(16 * i)), a);
        }
        a
    };
    scores_by_four(k, stride, scale, out, dot)
}

/// The scores of a run of keys four at a time (the last few one at a time) from each key's
/// 16-lane accumulator (`dot`), reduced as [`scores_avx2`] reduces its two 8-lane ones; returns
/// the largest, kept as a vector maximum (the same value as a scalar fold: a maximum is exact
/// and a NaN score is skipped either way).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores_by_four(
    k: &[f32],
    stride: usize,
    scale: f32,
    out: &mut [f32],
    dot: impl Fn(*const f32) -> __m512,
) -> f32 {
    let n = out.len();
    let sv = _mm_set1_ps(scale);
    let mut vmax = _mm_set1_ps(f32::NEG_INFINITY);
    let mut j = 0;
    while j + 4 <= n {
        let kp = k.as_ptr().add(j * stride);
        let v: [__m256; 4] = std::array::from_fn(|t| halves_sum(dot(kp.add(t * stride))));
        let s = _mm_mul_ps(hsum4(v), sv);
        _mm_storeu_ps(out.as_mut_ptr().add(j), s);
        // `maxps` keeps its second operand when the first is NaN.
        vmax = _mm_max_ps(s, vmax);
        j += 4;
    }
    let mut lanes = [0f32; 4];
    _mm_storeu_ps(lanes.as_mut_ptr(), vmax);
    let mut tmax = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for (t, o) in out[j..].iter_mut().enumerate() {
        *o = hsum(halves_sum(dot(k.as_ptr().add((j + t) * stride)))) * scale;
        tmax = tmax.max(*o);
    }
    tmax
}

/// The low eight lanes plus the high eight.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn halves_sum(a: __m512) -> __m256 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
    _mm256_add_ps(_mm512_castps512_ps256(a), hi)
}

/// [`accumulate`] for f32 values on 512-bit registers, for head sizes that are a multiple of
/// 16 (the CPU must have AVX-512F): each lane takes the same fused multiply-adds, key by key,
/// as in [`accumulate_avx2`], so the result is the same bits. Heads of 64, 128 and 256 keep the
/// accumulator in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
pub(crate) unsafe fn accumulate_avx512(acc: &mut [f32], v: &[f32], stride: usize, w: &[f32]) {
    let d = acc.len();
    if w.is_empty() {
        return;
    }
    assert!(d.is_multiple_of(16), "head size not a multiple of 16");
    assert!(
        v.len() >= (w.len() - 1) * stride + d,
        "value run shorter than its rows"
    );
    match d {
        64 => accumulate_regs::<4>(acc, v, stride, w),
        128 => accumulate_regs::<8>(acc, v, stride, w),
        256 => accumulate_regs::<16>(acc, v, stride, w),
        _ => {
            let ap = acc.as_mut_ptr();
            for (j, &wj) in w.iter().enumerate() {
                let vp = v.as_ptr().add(j * stride);
                let wv = _mm512_set1_ps(wj);
                for c in (0..d).step_by(16) {
                    let r =
                        _mm512_fmadd_ps(wv, _mm512_loadu_ps(vp.add(c)), _mm512_loadu_ps(ap.add(c)));
                    _mm512_storeu_ps(ap.add(c), r);
                }
            }
        }
    }
}

/// [`accumulate_avx512`] with the accumulator in `N` registers (`acc.len() == 16 N`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[inline]
unsafe fn accumulate_regs<const N: usize>(acc: &mut [f32], v: &[f32], stride: usize, w: &[f32]) {
    let ap = acc.as_mut_ptr();
    let mut r: [__m512; N] = std::array::from_fn(|i| _mm512_loadu_ps(ap.add(16 * i)));
    for (j, &wj) in w.iter().enumerate() {
        let vp = v.as_ptr().add(j * stride);
        let wv = _mm512_set1_ps(wj);
        for (i, r) in r.iter_mut().enumerate() {
            *r = _mm512_fmadd_ps(wv, _mm512_loadu_ps(vp.add(16 * i)), *r);
        }
    }
    for (i, r) in r.iter().enumerate() {
        _mm512_storeu_ps(ap.add(16 * i), *r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;

    /// The four-key body gives every key the bits of the one-key body, for every head size
    /// the engine meets, f32 and f16 keys, any run length.
    #[test]
    fn four_key_scores_equal_one_key_scores_bit_for_bit() {
        if !cpu::features().avx2 {
            return;
        }
        for d in [8usize, 16, 24, 32, 64, 80, 128, 256] {
            for n in [1usize, 3, 4, 5, 8, 15, 64] {
                let stride = d + 8;
                let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
                let kf: Vec<f32> = (0..stride * n).map(|i| (i as f32 * 0.71).cos()).collect();
                let kh: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
                let mut s = vec![0f32; n];
                // SAFETY: AVX2 was detected; runs are long enough.
                unsafe {
                    let m = scores_avx2(&q, &kf, stride, 0.125, &mut s);
                    for (j, &x) in s.iter().enumerate() {
                        let one = score_avx2(&q, kf.as_ptr().add(j * stride)) * 0.125;
                        assert_eq!(x.to_bits(), one.to_bits(), "f32 d {d} n {n} key {j}");
                    }
                    assert_eq!(m, s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
                    scores_avx2(&q, &kh, stride, 0.125, &mut s);
                    for (j, &x) in s.iter().enumerate() {
                        let one = score_avx2(&q, kh.as_ptr().add(j * stride)) * 0.125;
                        assert_eq!(x.to_bits(), one.to_bits(), "f16 d {d} n {n} key {j}");
                    }
                }
            }
        }
    }

    /// The 512-bit prefill kernels give the AVX2 kernels' bits (which decode uses) for every
    /// head size that is a multiple of 16 and any run length.
    #[test]
    fn wide_scores_and_values_equal_avx2_bit_for_bit() {
        let f = cpu::features();
        if !(f.avx2 && f.avx512) {
            return;
        }
        for d in [16usize, 32, 48, 64, 96, 128, 256] {
            for n in [1usize, 3, 4, 5, 8, 15, 64] {
                let stride = d + 16;
                let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
                let k: Vec<f32> = (0..stride * n).map(|i| (i as f32 * 0.71).cos()).collect();
                let w: Vec<f32> = (0..n).map(|j| (j as f32 * 0.3).exp().recip()).collect();
                let (mut s1, mut s2) = (vec![0f32; n], vec![0f32; n]);
                let (mut a1, mut a2) = (vec![0.5f32; d], vec![0.5f32; d]);
                // SAFETY: AVX2 and AVX-512F were detected; the runs are long enough.
                unsafe {
                    let m1 = scores_avx512(&q, &k, stride, 0.125, &mut s1);
                    let m2 = scores_avx2(&q, &k, stride, 0.125, &mut s2);
                    assert_eq!(m1.to_bits(), m2.to_bits(), "max, d {d} n {n}");
                    accumulate_avx512(&mut a1, &k, stride, &w);
                    accumulate_avx2(&mut a2, &k, stride, &w);
                }
                for (j, (x, y)) in s1.iter().zip(&s2).enumerate() {
                    assert_eq!(x.to_bits(), y.to_bits(), "score d {d} n {n} key {j}");
                }
                for (i, (x, y)) in a1.iter().zip(&a2).enumerate() {
                    assert_eq!(x.to_bits(), y.to_bits(), "value d {d} n {n} lane {i}");
                }
            }
        }
    }

    #[test]
    fn simd_and_portable_runs_agree_for_f32_and_f16() {
        for d in [8usize, 24, 64, 128] {
            let stride = d + 8;
            let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
            let kf: Vec<f32> = (0..stride * 5).map(|i| (i as f32 * 0.11).cos()).collect();
            let kh: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
            let w = [0.1f32, 0.2, 0.3, 0.15, 0.25];
            let simd = cpu::features().avx2;
            let (mut s1, mut s2) = ([0f32; 5], [0f32; 5]);
            let m1 = scores(simd, &q, &kf, stride, 0.5, &mut s1);
            let m2 = scores(false, &q, &kf, stride, 0.5, &mut s2);
            assert!((m1 - m2).abs() < 1e-4);
            for (a, b) in s1.iter().zip(&s2) {
                assert!((a - b).abs() < 1e-4, "d {d}: {a} vs {b}");
            }
            let m3 = scores(simd, &q, &kh, stride, 0.5, &mut s1);
            let m4 = scores(false, &q, &kh, stride, 0.5, &mut s2);
            assert!((m3 - m4).abs() < 1e-4);
            let (mut a1, mut a2) = (vec![1f32; d], vec![1f32; d]);
            accumulate(simd, &mut a1, &kh, stride, &w);
            accumulate(false, &mut a2, &kh, stride, &w);
            for (a, b) in a1.iter().zip(&a2) {
                assert!((a - b).abs() < 1e-5, "d {d}: {a} vs {b}");
            }
        }
    }
}
