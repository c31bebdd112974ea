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

/// [`scores`] with AVX2: for 64-element heads the query stays in eight registers.
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
    let mut tmax = f32::NEG_INFINITY;
    if d == 64 {
        let qr: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(qp.add(8 * i)));
        for (j, s) in out.iter_mut().enumerate() {
            let kp = k.as_ptr().add(j * stride);
            let mut a0 = _mm256_mul_ps(qr[0], E::load8(kp));
            let mut a1 = _mm256_mul_ps(qr[1], E::load8(kp.add(8)));
            for i in (2..8).step_by(2) {
                a0 = _mm256_fmadd_ps(qr[i], E::load8(kp.add(8 * i)), a0);
                a1 = _mm256_fmadd_ps(qr[i + 1], E::load8(kp.add(8 * i + 8)), a1);
            }
            *s = hsum(_mm256_add_ps(a0, a1)) * scale;
            tmax = tmax.max(*s);
        }
        return tmax;
    }
    for (j, s) in out.iter_mut().enumerate() {
        let kp = k.as_ptr().add(j * stride);
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
        *s = hsum(_mm256_add_ps(a0, a1)) * scale;
        tmax = tmax.max(*s);
    }
    tmax
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;

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
