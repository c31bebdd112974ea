//! Small f32 vector operations: dot product, `y += a·x`, a fast `exp`, SiLU·mul.
//!
//! Each has one portable body; on x86 the same body is compiled a second time with AVX2 and FMA
//! enabled and chosen at run time, so the compiler vectorises it without `target-cpu=native`.

use crate::cpu;

/// Generates `pub fn $name` that runs `$body` compiled for AVX2+FMA when the CPU has it and for
/// the baseline target otherwise. `$body` is an `#[inline(always)]` function taking the same
/// arguments.
macro_rules! dispatch {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if cpu::features().avx2 {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? { $body($($arg),*) }
                // SAFETY: AVX2 and FMA were detected at run time.
                return unsafe { fast($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

const LANES: usize = 16;

#[inline(always)]
pub(crate) fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let chunks = n / LANES * LANES;
    for (ca, cb) in a[..chunks]
        .chunks_exact(LANES)
        .zip(b[..chunks].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut sum = 0f32;
    for i in chunks..n {
        sum += a[i] * b[i];
    }
    // Pairwise reduction keeps the result independent of which body ran.
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0] + sum
}

dispatch! {
    /// `Σ a[i]·b[i]` over the shorter of the two slices.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 => dot_body
}

#[inline(always)]
pub(crate) fn axpy_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

dispatch! {
    /// `y[i] += a * x[i]`.
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) => axpy_body
}

#[inline(always)]
pub(crate) fn scale_body(y: &mut [f32], a: f32) {
    for y in y.iter_mut() {
        *y *= a;
    }
}

dispatch! {
    /// `y[i] *= a`.
    pub fn scale(y: &mut [f32], a: f32) => scale_body
}

/// `e^x` to about 2 ulp for x in [-87, 88]; 0 below, +inf above. Branch-free, so loops over it
/// vectorise (the Cephes polynomial).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from the bits of n + 127 + 2^23, whose mantissa is the integer n + 127 (in 1..=254
    // after the clamp): the same value as `(n as i32 + 127) << 23`, without a saturating
    // float-to-integer conversion, which does not vectorise.
    let biased = ((n + 127.0) + 8_388_608.0)
        .to_bits()
        .wrapping_sub(0x4B00_0000);
    let pow2 = f32::from_bits(biased << 23);
    let v = e * pow2;
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        v
    }
}

#[inline(always)]
pub(crate) fn exp_sub_sum_body(y: &mut [f32], m: f32) -> f32 {
    // Two passes so both vectorise: a running scalar sum in the exp loop would serialise it.
    for v in y.iter_mut() {
        *v = exp_approx(*v - m);
    }
    let mut lanes = [0f32; 8];
    let mut chunks = y.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

dispatch! {
    /// `y[i] = e^(y[i] - m)`, returning `Σ y[i]`: the numerator of a softmax with maximum `m`.
    pub fn exp_sub_sum(y: &mut [f32], m: f32) -> f32 => exp_sub_sum_body
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp_approx(-*g)) * u;
    }
}

dispatch! {
    /// SwiGLU's elementwise part: `gate[i] = silu(gate[i]) * up[i]`.
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) => silu_mul_body
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`, llama.cpp's `ggml_gelu`), exact
/// `tanh` from the standard library.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

#[inline(always)]
fn gelu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

dispatch! {
    /// GeGLU's elementwise part (Gemma): `gate[i] = gelu_tanh(gate[i]) * up[i]`.
    pub fn gelu_mul(gate: &mut [f32], up: &[f32]) => gelu_mul_body
}

#[inline(always)]
fn add_body(y: &mut [f32], x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += x;
    }
}

dispatch! {
    /// `y[i] += x[i]` (residual connections).
    pub fn add(y: &mut [f32], x: &[f32]) => add_body
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn gelu_tanh_matches_its_formula_in_f64() {
        for i in -400..400 {
            let x = i as f32 * 0.025;
            let xd = x as f64;
            let want = 0.5
                * xd
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
            assert!(
                (gelu_tanh(x) as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{x}"
            );
        }
        let mut g = vec![1.0f32, -2.0, 0.5];
        gelu_mul(&mut g, &[2.0, 1.0, 0.0]);
        assert_eq!(g, vec![gelu_tanh(1.0) * 2.0, gelu_tanh(-2.0), 0.0]);
    }

    /// The exponent trick in `exp_approx` gives `2^n` for every `n` the clamp lets through.
    #[test]
    fn exp_approx_power_of_two_is_exact() {
        for n in -126i32..=127 {
            let biased = ((n as f32 + 127.0) + 8_388_608.0)
                .to_bits()
                .wrapping_sub(0x4B00_0000);
            assert_eq!(f32::from_bits(biased << 23), 2f32.powi(n), "2^{n}");
        }
        assert!(exp_approx(f32::NAN).is_nan());
    }

    #[test]
    fn exp_approx_is_accurate_over_the_softmax_range() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = x.exp();
            let got = exp_approx(x);
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp_approx(-1000.0), 0.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(1000.0), f32::INFINITY);
    }

    proptest! {
        #[test]
        fn dispatched_ops_match_naive(v in proptest::collection::vec(-3.0f32..3.0, 0..200), a in -2.0f32..2.0) {
            let w: Vec<f32> = v.iter().map(|x| x * 0.5 - 0.25).collect();
            let naive: f32 = v.iter().zip(&w).map(|(x, y)| x * y).sum();
            prop_assert!((dot(&v, &w) - naive).abs() <= 1e-4 * (1.0 + naive.abs()));
            prop_assert_eq!(dot(&v, &w), dot_body(&v, &w));

            let mut y = w.clone();
            axpy(&mut y, a, &v);
            for i in 0..y.len() { prop_assert!((y[i] - (w[i] + a * v[i])).abs() <= 1e-5); }

            let mut g = v.clone();
            silu_mul(&mut g, &w);
            for i in 0..g.len() {
                let want = v[i] / (1.0 + (-v[i]).exp()) * w[i];
                prop_assert!((g[i] - want).abs() <= 1e-5);
            }

            let mut e = v.clone();
            let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let s = exp_sub_sum(&mut e, m);
            let want: f32 = v.iter().map(|x| (x - m).exp()).sum();
            prop_assert!((s - want).abs() <= 1e-4 * (1.0 + want));
        }
    }
}
