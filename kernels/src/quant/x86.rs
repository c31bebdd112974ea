//! The x86 products: AVX2, AVX-VNNI and AVX-512 VNNI versions of one body, each a tile of `R`
//! activation rows times one panel group of eight weight rows. Every 32-bit lane of a register
//! accumulates one output, in the order [`super::scalar::group_dot`] follows, so all of them
//! give the scalar twin's bits.

use super::formats::{QuantType, BLOCK};
use std::arch::x86_64::*;

/// Instruction-set tags for the const-generic body.
pub(crate) const AVX2: u8 = 0;
/// AVX-VNNI (`vpdpbusd` on 256-bit registers, VEX encoded).
pub(crate) const VNNI: u8 = 1;
/// AVX-512 VNNI with VL and BW (EVEX `vpdpbusd`, mask registers, 32 vector registers).
pub(crate) const AVX512: u8 = 2;

/// One activation row, as raw pointers into a [`super::QuantizedRows`].
#[derive(Clone, Copy)]
pub(crate) struct ActPtr {
    /// Quantised values (or f32 values for `F16`, cast).
    pub qs: *const i8,
    /// Per-block scales.
    pub d: *const f32,
    /// Per-block `d · Σ q` (32-element blocks).
    pub s: *const f32,
    /// `Σ q` per 16 elements.
    pub sum16: *const i32,
    /// f32 values (F16 weights).
    pub f: *const f32,
}

const fn fmt(tag: u8) -> QuantType {
    QuantType::ALL[tag as usize]
}

/// The format tag [`tile`] takes for `ty`.
pub(crate) const fn tag(ty: QuantType) -> u8 {
    match ty {
        QuantType::Q4_0 => 0,
        QuantType::Q4_1 => 1,
        QuantType::Q5_0 => 2,
        QuantType::Q5_1 => 3,
        QuantType::Q8_0 => 4,
        QuantType::Q4_K => 5,
        QuantType::Q5_K => 6,
        QuantType::Q6_K => 7,
        QuantType::F16 => 8,
    }
}

/// `acc + Σ₄ u·s` per 32-bit lane (unsigned × signed bytes).
#[inline(always)]
unsafe fn dp<const ISA: u8>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    match ISA {
        VNNI => _mm256_dpbusd_avx_epi32(acc, u, s),
        AVX512 => _mm256_dpbusd_epi32(acc, u, s),
        _ => _mm256_add_epi32(
            acc,
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
        ),
    }
}

#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32((p as *const i32).read_unaligned())
}

/// The integer dot products of one 32-element sub-block (`vals`) with elements `e0..e0 + 32`
/// of each activation row: low halves into `lo`, high halves into `hi` (for `Q8_0` on plain
/// AVX2, signed products without the +128 offset).
#[inline(always)]
unsafe fn sub_dots<const T: u8, const ISA: u8, const R: usize>(
    vals: *const u8,
    a: &[ActPtr; R],
    e0: usize,
    lo: &mut [__m256i; R],
    hi: &mut [__m256i; R],
) {
    let ty = fmt(T);
    if T == tag(QuantType::Q8_0) {
        for g in 0..8 {
            let v = _mm256_loadu_si256(vals.add(32 * g) as *const __m256i);
            let acc = if g < 4 { &mut *lo } else { &mut *hi };
            if ISA == AVX2 {
                let w = _mm256_xor_si256(v, _mm256_set1_epi8(0x80u8 as i8));
                let aw = _mm256_sign_epi8(w, w);
                for t in 0..R {
                    let y = bcast4(a[t].qs.add(e0 + 4 * g));
                    let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(y, w));
                    acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
                }
            } else {
                for t in 0..R {
                    acc[t] = dp::<ISA>(acc[t], v, bcast4(a[t].qs.add(e0 + 4 * g)));
                }
            }
        }
        return;
    }
    let m0f = _mm256_set1_epi8(0x0f);
    for g in 0..4 {
        let v = _mm256_loadu_si256(vals.add(32 * g) as *const __m256i);
        let mut l = _mm256_and_si256(v, m0f);
        let mut h = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);
        match ty.high_planes() {
            1 => {
                let p = _mm256_loadu_si256(vals.add(128) as *const __m256i);
                let m = _mm256_set1_epi8(0x10);
                let up = _mm_cvtsi32_si128(4 - g as i32);
                let down = _mm_cvtsi32_si128(g as i32);
                l = _mm256_or_si256(l, _mm256_and_si256(_mm256_sll_epi16(p, up), m));
                h = _mm256_or_si256(h, _mm256_and_si256(_mm256_srl_epi16(p, down), m));
            }
            2 => {
                let pl = _mm256_loadu_si256(vals.add(128) as *const __m256i);
                let ph = _mm256_loadu_si256(vals.add(160) as *const __m256i);
                let m = _mm256_set1_epi8(0x30);
                let (pl, ph) = if g < 3 {
                    let up = _mm_cvtsi32_si128(4 - 2 * g as i32);
                    (_mm256_sll_epi16(pl, up), _mm256_sll_epi16(ph, up))
                } else {
                    (_mm256_srli_epi16(pl, 2), _mm256_srli_epi16(ph, 2))
                };
                l = _mm256_or_si256(l, _mm256_and_si256(pl, m));
                h = _mm256_or_si256(h, _mm256_and_si256(ph, m));
            }
            _ => {}
        }
        for t in 0..R {
            lo[t] = dp::<ISA>(lo[t], l, bcast4(a[t].qs.add(e0 + 4 * g)));
            hi[t] = dp::<ISA>(hi[t], h, bcast4(a[t].qs.add(e0 + 16 + 4 * g)));
        }
    }
}

#[inline(always)]
unsafe fn ysum(a: &ActPtr, blk: usize, half: Option<usize>) -> i32 {
    match half {
        Some(h) => *a.sum16.add(2 * blk + h),
        None => *a.sum16.add(2 * blk) + *a.sum16.add(2 * blk + 1),
    }
}

/// `out[t][r]` = weight row `r` of the panel group at `panel` (`recs` records) · activation
/// row `a[t]`.
#[inline(always)]
pub(crate) unsafe fn tile<const T: u8, const ISA: u8, const R: usize>(
    panel: *const u8,
    recs: usize,
    a: &[ActPtr; R],
    out: &mut [[f32; 8]; R],
) {
    let ty = fmt(T);
    let (rb, sb, subs) = (ty.rec_bytes(), ty.sub_bytes(), ty.rec_elems() / BLOCK);
    let mut acc = [_mm256_setzero_ps(); R];
    let zero = _mm256_setzero_si256();
    // Plain AVX2 multiplies Q8_0's signed values directly: no offset to take off.
    let offset = if T == tag(QuantType::Q8_0) && ISA == AVX2 {
        0
    } else {
        ty.offset()
    };
    for i in 0..recs {
        let rec = panel.add(i * rb);
        if T == tag(QuantType::F16) {
            for k in 0..BLOCK {
                let w = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16 * k) as *const __m128i));
                for t in 0..R {
                    let x = _mm256_set1_ps(*a[t].f.add(i * BLOCK + k));
                    acc[t] = _mm256_fmadd_ps(w, x, acc[t]);
                }
            }
            continue;
        }
        let tail = rec.add(subs * sb);
        let d8 = _mm256_cvtph_ps(_mm_loadu_si128(tail as *const __m128i));
        if !ty.is_k() {
            let (mut lo, mut hi) = ([zero; R], [zero; R]);
            sub_dots::<T, ISA, R>(rec, a, i * BLOCK, &mut lo, &mut hi);
            for t in 0..R {
                let mut v = _mm256_add_epi32(lo[t], hi[t]);
                if offset != 0 {
                    v = _mm256_sub_epi32(v, _mm256_set1_epi32(offset * ysum(&a[t], i, None)));
                }
                let dd = _mm256_mul_ps(d8, _mm256_set1_ps(*a[t].d.add(i)));
                acc[t] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(v), acc[t]);
                if ty.has_min() {
                    let m8 = _mm256_cvtph_ps(_mm_loadu_si128(tail.add(16) as *const __m128i));
                    acc[t] = _mm256_fmadd_ps(m8, _mm256_set1_ps(*a[t].s.add(i)), acc[t]);
                }
            }
            continue;
        }
        let mut sumi = [zero; R];
        for s in 0..subs {
            let blk = i * subs + s;
            let (mut lo, mut hi) = ([zero; R], [zero; R]);
            sub_dots::<T, ISA, R>(rec.add(s * sb), a, blk * BLOCK, &mut lo, &mut hi);
            if T == tag(QuantType::Q6_K) {
                let sc = |h: usize| {
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(tail.add(16 + 8 * h) as *const __m128i))
                };
                let (sl, sh) = (sc(2 * s), sc(2 * s + 1));
                for t in 0..R {
                    let l =
                        _mm256_sub_epi32(lo[t], _mm256_set1_epi32(32 * ysum(&a[t], blk, Some(0))));
                    let h =
                        _mm256_sub_epi32(hi[t], _mm256_set1_epi32(32 * ysum(&a[t], blk, Some(1))));
                    let p = _mm256_add_epi32(_mm256_mullo_epi32(sl, l), _mm256_mullo_epi32(sh, h));
                    sumi[t] = _mm256_add_epi32(sumi[t], p);
                }
            } else {
                let sc =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(tail.add(32 + 8 * s) as *const __m128i));
                for t in 0..R {
                    let v = _mm256_add_epi32(lo[t], hi[t]);
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_mullo_epi32(sc, v));
                }
            }
        }
        for t in 0..R {
            let dy = _mm256_set1_ps(*a[t].d.add(i));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d8, dy), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            if ty.has_min() {
                let mut summ = zero;
                for s in 0..subs {
                    let m = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        tail.add(96 + 8 * s) as *const __m128i
                    ));
                    let ys = _mm256_set1_epi32(ysum(&a[t], i * subs + s, None));
                    summ = _mm256_add_epi32(summ, _mm256_mullo_epi32(m, ys));
                }
                let dmin8 = _mm256_cvtph_ps(_mm_loadu_si128(tail.add(16) as *const __m128i));
                acc[t] =
                    _mm256_fnmadd_ps(_mm256_mul_ps(dmin8, dy), _mm256_cvtepi32_ps(summ), acc[t]);
            }
        }
    }
    for t in 0..R {
        _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// A tile kernel: panel group, records, activation rows, outputs.
pub(crate) type TileFn<const R: usize> =
    unsafe fn(*const u8, usize, &[ActPtr; R], &mut [[f32; 8]; R]);

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn on_avx2<const T: u8, const R: usize>(
    p: *const u8,
    n: usize,
    a: &[ActPtr; R],
    o: &mut [[f32; 8]; R],
) {
    tile::<T, AVX2, R>(p, n, a, o)
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn on_vnni<const T: u8, const R: usize>(
    p: *const u8,
    n: usize,
    a: &[ActPtr; R],
    o: &mut [[f32; 8]; R],
) {
    tile::<T, VNNI, R>(p, n, a, o)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn on_avx512<const T: u8, const R: usize>(
    p: *const u8,
    n: usize,
    a: &[ActPtr; R],
    o: &mut [[f32; 8]; R],
) {
    tile::<T, AVX512, R>(p, n, a, o)
}

/// The tile kernel for format `ty` on instruction set `isa` (the caller checked that the CPU
/// has it).
pub(crate) fn kernel<const R: usize>(ty: QuantType, isa: u8) -> TileFn<R> {
    macro_rules! pick {
        ($t:expr) => {
            match isa {
                AVX512 => on_avx512::<{ $t }, R> as TileFn<R>,
                VNNI => on_vnni::<{ $t }, R> as TileFn<R>,
                _ => on_avx2::<{ $t }, R> as TileFn<R>,
            }
        };
    }
    match ty {
        QuantType::Q4_0 => pick!(0),
        QuantType::Q4_1 => pick!(1),
        QuantType::Q5_0 => pick!(2),
        QuantType::Q5_1 => pick!(3),
        QuantType::Q8_0 => pick!(4),
        QuantType::Q4_K => pick!(5),
        QuantType::Q5_K => pick!(6),
        QuantType::Q6_K => pick!(7),
        QuantType::F16 => pick!(8),
    }
}

/// Two 32-byte loads, from two panel groups, as one 512-bit register (group `p0` in the low
/// half: its eight rows' lanes come first).
#[inline(always)]
unsafe fn ld2(p0: *const u8, p1: *const u8) -> __m512i {
    let lo = _mm512_castsi256_si512(_mm256_loadu_si256(p0 as *const __m256i));
    _mm512_inserti64x4::<1>(lo, _mm256_loadu_si256(p1 as *const __m256i))
}

/// Eight f16 at `p0` and eight at `p1`, as sixteen f32.
#[inline(always)]
unsafe fn ph2(p0: *const u8, p1: *const u8) -> __m512 {
    let lo = _mm256_castsi128_si256(_mm_loadu_si128(p0 as *const __m128i));
    _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
        lo,
        _mm_loadu_si128(p1 as *const __m128i),
    ))
}

/// Eight bytes at `p0` and eight at `p1` as sixteen 32-bit integers (`SIGNED`: as `i8`).
#[inline(always)]
unsafe fn bytes2<const SIGNED: bool>(p0: *const u8, p1: *const u8) -> __m512i {
    let b = _mm_unpacklo_epi64(
        _mm_loadl_epi64(p0 as *const __m128i),
        _mm_loadl_epi64(p1 as *const __m128i),
    );
    if SIGNED {
        _mm512_cvtepi8_epi32(b)
    } else {
        _mm512_cvtepu8_epi32(b)
    }
}

#[inline(always)]
unsafe fn bcast4w(p: *const i8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

/// [`sub_dots`] for two panel groups at once on 512-bit registers (sixteen weight rows, lane
/// `8k + r` for row `r` of group `k`). The integer sums are exact, so how they are grouped does
/// not matter: every format but `Q6_K` (whose halves have their own scales) sums both halves
/// into `lo`.
#[inline(always)]
unsafe fn sub_dots16<const T: u8, const R: usize>(
    v0: *const u8,
    v1: *const u8,
    a: &[ActPtr; R],
    e0: usize,
    lo: &mut [__m512i; R],
    hi: &mut [__m512i; R],
) {
    let ty = fmt(T);
    let split = T == tag(QuantType::Q6_K);
    if T == tag(QuantType::Q8_0) {
        for g in 0..8 {
            let v = ld2(v0.add(32 * g), v1.add(32 * g));
            for t in 0..R {
                lo[t] = _mm512_dpbusd_epi32(lo[t], v, bcast4w(a[t].qs.add(e0 + 4 * g)));
            }
        }
        return;
    }
    let m0f = _mm512_set1_epi8(0x0f);
    for g in 0..4 {
        let v = ld2(v0.add(32 * g), v1.add(32 * g));
        let mut l = _mm512_and_si512(v, m0f);
        let mut h = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m0f);
        match ty.high_planes() {
            1 => {
                let p = ld2(v0.add(128), v1.add(128));
                let m = _mm512_set1_epi8(0x10);
                let up = _mm_cvtsi32_si128(4 - g as i32);
                let down = _mm_cvtsi32_si128(g as i32);
                l = _mm512_or_si512(l, _mm512_and_si512(_mm512_sll_epi16(p, up), m));
                h = _mm512_or_si512(h, _mm512_and_si512(_mm512_srl_epi16(p, down), m));
            }
            2 => {
                let pl = ld2(v0.add(128), v1.add(128));
                let ph = ld2(v0.add(160), v1.add(160));
                let m = _mm512_set1_epi8(0x30);
                let (pl, ph) = if g < 3 {
                    let up = _mm_cvtsi32_si128(4 - 2 * g as i32);
                    (_mm512_sll_epi16(pl, up), _mm512_sll_epi16(ph, up))
                } else {
                    (_mm512_srli_epi16::<2>(pl), _mm512_srli_epi16::<2>(ph))
                };
                l = _mm512_or_si512(l, _mm512_and_si512(pl, m));
                h = _mm512_or_si512(h, _mm512_and_si512(ph, m));
            }
            _ => {}
        }
        for t in 0..R {
            let yl = bcast4w(a[t].qs.add(e0 + 4 * g));
            let yh = bcast4w(a[t].qs.add(e0 + 16 + 4 * g));
            lo[t] = _mm512_dpbusd_epi32(lo[t], l, yl);
            if split {
                hi[t] = _mm512_dpbusd_epi32(hi[t], h, yh);
            } else {
                lo[t] = _mm512_dpbusd_epi32(lo[t], h, yh);
            }
        }
    }
}

/// [`tile`] on 512-bit registers for two panel groups (`p0`, `p1`: sixteen weight rows):
/// `out[t][8k + r]` = row `r` of group `k` · activation row `a[t]`. Each lane follows the f32
/// operations of [`tile`] (and of [`super::scalar::group_dot`]) for its row, so it gives their
/// bits; only the integer sums, which are exact, are grouped differently.
#[inline(always)]
pub(crate) unsafe fn tile16<const T: u8, const R: usize>(
    p0: *const u8,
    p1: *const u8,
    recs: usize,
    a: &[ActPtr; R],
    out: &mut [[f32; 16]; R],
) {
    let ty = fmt(T);
    let (rb, sb, subs) = (ty.rec_bytes(), ty.sub_bytes(), ty.rec_elems() / BLOCK);
    let mut acc = [_mm512_setzero_ps(); R];
    let zero = _mm512_setzero_si512();
    let offset = ty.offset();
    for i in 0..recs {
        let (r0, r1) = (p0.add(i * rb), p1.add(i * rb));
        if T == tag(QuantType::F16) {
            for k in 0..BLOCK {
                let w = ph2(r0.add(16 * k), r1.add(16 * k));
                for t in 0..R {
                    let x = _mm512_set1_ps(*a[t].f.add(i * BLOCK + k));
                    acc[t] = _mm512_fmadd_ps(w, x, acc[t]);
                }
            }
            continue;
        }
        let (t0, t1) = (r0.add(subs * sb), r1.add(subs * sb));
        let d16 = ph2(t0, t1);
        if !ty.is_k() {
            let (mut lo, mut hi) = ([zero; R], [zero; R]);
            sub_dots16::<T, R>(r0, r1, a, i * BLOCK, &mut lo, &mut hi);
            for t in 0..R {
                let mut v = lo[t];
                if offset != 0 {
                    v = _mm512_sub_epi32(v, _mm512_set1_epi32(offset * ysum(&a[t], i, None)));
                }
                let dd = _mm512_mul_ps(d16, _mm512_set1_ps(*a[t].d.add(i)));
                acc[t] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(v), acc[t]);
                if ty.has_min() {
                    let m16 = ph2(t0.add(16), t1.add(16));
                    acc[t] = _mm512_fmadd_ps(m16, _mm512_set1_ps(*a[t].s.add(i)), acc[t]);
                }
            }
            continue;
        }
        let mut sumi = [zero; R];
        for s in 0..subs {
            let blk = i * subs + s;
            let (mut lo, mut hi) = ([zero; R], [zero; R]);
            sub_dots16::<T, R>(
                r0.add(s * sb),
                r1.add(s * sb),
                a,
                blk * BLOCK,
                &mut lo,
                &mut hi,
            );
            if T == tag(QuantType::Q6_K) {
                let sc = |h: usize| bytes2::<true>(t0.add(16 + 8 * h), t1.add(16 + 8 * h));
                let (sl, sh) = (sc(2 * s), sc(2 * s + 1));
                for t in 0..R {
                    let l =
                        _mm512_sub_epi32(lo[t], _mm512_set1_epi32(32 * ysum(&a[t], blk, Some(0))));
                    let h =
                        _mm512_sub_epi32(hi[t], _mm512_set1_epi32(32 * ysum(&a[t], blk, Some(1))));
                    let p = _mm512_add_epi32(_mm512_mullo_epi32(sl, l), _mm512_mullo_epi32(sh, h));
                    sumi[t] = _mm512_add_epi32(sumi[t], p);
                }
            } else {
                let sc = bytes2::<false>(t0.add(32 + 8 * s), t1.add(32 + 8 * s));
                for t in 0..R {
                    sumi[t] = _mm512_add_epi32(sumi[t], _mm512_mullo_epi32(sc, lo[t]));
                }
            }
        }
        for t in 0..R {
            let dy = _mm512_set1_ps(*a[t].d.add(i));
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d16, dy), _mm512_cvtepi32_ps(sumi[t]), acc[t]);
            if ty.has_min() {
                let mut summ = zero;
                for s in 0..subs {
                    let m = bytes2::<false>(t0.add(96 + 8 * s), t1.add(96 + 8 * s));
                    let ys = _mm512_set1_epi32(ysum(&a[t], i * subs + s, None));
                    summ = _mm512_add_epi32(summ, _mm512_mullo_epi32(m, ys));
                }
                let dmin16 = ph2(t0.add(16), t1.add(16));
                acc[t] =
                    _mm512_fnmadd_ps(_mm512_mul_ps(dmin16, dy), _mm512_cvtepi32_ps(summ), acc[t]);
            }
        }
    }
    for t in 0..R {
        _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// A two-group tile kernel: two panel groups, records, activation rows, outputs.
pub(crate) type Tile16Fn<const R: usize> =
    unsafe fn(*const u8, *const u8, usize, &[ActPtr; R], &mut [[f32; 16]; R]);

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn on_avx512_wide<const T: u8, const R: usize>(
    p0: *const u8,
    p1: *const u8,
    n: usize,
    a: &[ActPtr; R],
    o: &mut [[f32; 16]; R],
) {
    tile16::<T, R>(p0, p1, n, a, o)
}

/// The two-group (512-bit) tile kernel for format `ty` (the caller checked that the CPU has
/// AVX-512 VNNI, BW and VL).
pub(crate) fn kernel16<const R: usize>(ty: QuantType) -> Tile16Fn<R> {
    match ty {
        QuantType::Q4_0 => on_avx512_wide::<0, R>,
        QuantType::Q4_1 => on_avx512_wide::<1, R>,
        QuantType::Q5_0 => on_avx512_wide::<2, R>,
        QuantType::Q5_1 => on_avx512_wide::<3, R>,
        QuantType::Q8_0 => on_avx512_wide::<4, R>,
        QuantType::Q4_K => on_avx512_wide::<5, R>,
        QuantType::Q5_K => on_avx512_wide::<6, R>,
        QuantType::Q6_K => on_avx512_wide::<7, R>,
        QuantType::F16 => on_avx512_wide::<8, R>,
    }
}
