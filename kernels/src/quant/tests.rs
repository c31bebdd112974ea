//! Every kernel against the scalar twin (bit for bit), the twin against f32 arithmetic on
//! ggml's own dequantisation, and rows against batches.

use super::formats::{QuantType, BLOCK};
use super::QuantizedRows;
use crate::matmul::{act_kinds, matmul_many_with, Isa, QMatrix};
use half::f16;
use proptest::prelude::*;
use rand_like::Lcg;

/// A tiny deterministic generator (proptest supplies the seed).
mod rand_like {
    pub struct Lcg(pub u64);
    impl Lcg {
        pub fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        pub fn byte(&mut self) -> u8 {
            self.next() as u8
        }
        pub fn unit(&mut self) -> f32 {
            (self.next() % 20001) as f32 / 10000.0 - 1.0
        }
    }
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// A random but valid GGUF block of `ty`.
fn random_block(ty: QuantType, rng: &mut Lcg) -> Vec<u8> {
    let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.byte()).collect();
    match ty {
        QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => {
            put_f16(&mut b, 0, 0.05 * rng.unit())
        }
        QuantType::Q4_1 | QuantType::Q5_1 => {
            put_f16(&mut b, 0, 0.05 * rng.unit());
            put_f16(&mut b, 2, 0.3 * rng.unit());
        }
        QuantType::Q4_K | QuantType::Q5_K => {
            put_f16(&mut b, 0, 0.01 * rng.unit());
            put_f16(&mut b, 2, 0.01 * rng.unit().abs());
        }
        QuantType::Q6_K => put_f16(&mut b, 208, 0.002 * rng.unit()),
        QuantType::F16 => {
            for k in 0..BLOCK {
                put_f16(&mut b, 2 * k, rng.unit());
            }
        }
    }
    b
}

fn random_matrix(ty: QuantType, rows: usize, cols: usize, rng: &mut Lcg) -> Vec<u8> {
    (0..rows * cols / ty.block_elems())
        .flat_map(|_| random_block(ty, rng))
        .collect()
}

fn f16v(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// ggml's `dequantize_row_*`, written from its definitions, independent of the panel code.
fn ggml_dequantize(ty: QuantType, b: &[u8]) -> Vec<f32> {
    let mut y = vec![0f32; ty.block_elems()];
    match ty {
        QuantType::Q4_0 => {
            let d = f16v(b, 0);
            for j in 0..16 {
                y[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32 * d;
                y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        QuantType::Q4_1 => {
            let (d, m) = (f16v(b, 0), f16v(b, 2));
            for j in 0..16 {
                y[j] = (b[4 + j] & 0x0f) as f32 * d + m;
                y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
            }
        }
        QuantType::Q5_0 | QuantType::Q5_1 => {
            let at = if ty == QuantType::Q5_0 { 2 } else { 4 };
            let d = f16v(b, 0);
            let qh = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
            for j in 0..16 {
                let xh0 = (((qh >> j) << 4) & 0x10) as u8;
                let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
                let x0 = ((b[at + 4 + j] & 0x0f) | xh0) as i32;
                let x1 = ((b[at + 4 + j] >> 4) | xh1) as i32;
                if ty == QuantType::Q5_0 {
                    y[j] = (x0 - 16) as f32 * d;
                    y[j + 16] = (x1 - 16) as f32 * d;
                } else {
                    let m = f16v(b, 2);
                    y[j] = x0 as f32 * d + m;
                    y[j + 16] = x1 as f32 * d + m;
                }
            }
        }
        QuantType::Q8_0 => {
            let d = f16v(b, 0);
            for j in 0..32 {
                y[j] = b[2 + j] as i8 as f32 * d;
            }
        }
        QuantType::Q4_K | QuantType::Q5_K => {
            let (d, min) = (f16v(b, 0), f16v(b, 2));
            let sc = &b[4..16];
            let get = |j: usize| -> (u8, u8) {
                if j < 4 {
                    (sc[j] & 63, sc[j + 4] & 63)
                } else {
                    (
                        (sc[j + 4] & 0xf) | ((sc[j - 4] >> 6) << 4),
                        (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                    )
                }
            };
            let k5 = ty == QuantType::Q5_K;
            let (qh, qs) = if k5 {
                (&b[16..48], &b[48..176])
            } else {
                (&b[16..16], &b[16..144])
            };
            let (mut u1, mut u2) = (1u8, 2u8);
            for c in 0..4 {
                let (s1, m1) = get(2 * c);
                let (s2, m2) = get(2 * c + 1);
                let (d1, mm1) = (d * s1 as f32, min * m1 as f32);
                let (d2, mm2) = (d * s2 as f32, min * m2 as f32);
                for l in 0..32 {
                    let h1 = if k5 && qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if k5 && qh[l] & u2 != 0 { 16 } else { 0 };
                    y[64 * c + l] = d1 * ((qs[32 * c + l] & 0xf) + h1) as f32 - mm1;
                    y[64 * c + 32 + l] = d2 * ((qs[32 * c + l] >> 4) + h2) as f32 - mm2;
                }
                u1 <<= 2;
                u2 <<= 2;
            }
        }
        QuantType::Q6_K => {
            let d = f16v(b, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    let o = 128 * n;
                    y[o + l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[o + l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[o + l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[o + l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
        QuantType::F16 => {
            for (k, y) in y.iter_mut().enumerate() {
                *y = f16v(b, 2 * k);
            }
        }
    }
    y
}

fn types() -> impl Strategy<Value = QuantType> {
    proptest::sample::select(QuantType::ALL.to_vec())
}

/// Inputs of one test: a format, a matrix, activation rows.
fn case() -> impl Strategy<Value = (QuantType, usize, usize, usize, u64)> {
    (types(), 1usize..27, 1usize..4, 1usize..13, any::<u64>())
        .prop_map(|(ty, rows, blocks, n, seed)| (ty, rows, blocks * ty.block_elems(), n, seed))
}

fn activations(rng: &mut Lcg, n: usize, cols: usize) -> Vec<f32> {
    (0..n * cols).map(|_| rng.unit() * 3.0).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The panel holds exactly ggml's values.
    #[test]
    fn panels_dequantize_to_ggml_values((ty, rows, cols, _n, seed) in case()) {
        let mut rng = Lcg(seed);
        let gguf = random_matrix(ty, rows, cols, &mut rng);
        let m = QMatrix::new(ty, rows, cols, &gguf).unwrap();
        let deq = m.dequantize();
        let bb = ty.block_bytes();
        let want: Vec<f32> = gguf.chunks_exact(bb).flat_map(|b| ggml_dequantize(ty, b)).collect();
        for (i, (a, b)) in deq.iter().zip(&want).enumerate() {
            prop_assert!(a.to_bits() == b.to_bits() || (a - b).abs() <= 1e-6 * b.abs(), "{ty} element {i}: {a} vs ggml {b}");
        }
    }

    /// Every kernel family gives the scalar twin's bits, and the twin is the f32 dot product of
    /// the dequantised weights with the dequantised activations up to rounding.
    #[test]
    fn kernels_equal_scalar_twin_and_f32((ty, rows, cols, n, seed) in case()) {
        let mut rng = Lcg(seed);
        let m = QMatrix::new(ty, rows, cols, &random_matrix(ty, rows, cols, &mut rng)).unwrap();
        let x = activations(&mut rng, n, cols);
        let acts = QuantizedRows::new(&x, n, cols, &act_kinds(&[&m]));
        let mut want = vec![0f32; n * rows];
        matmul_many_with(Isa::Scalar, &[&m], &acts, &mut want).unwrap();
        for isa in Isa::available() {
            let mut got = vec![0f32; n * rows];
            matmul_many_with(isa, &[&m], &acts, &mut got).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                prop_assert_eq!(a.to_bits(), b.to_bits(), "{:?} {} output {}: {} vs scalar {}", isa, ty, i, a, b);
            }
        }
        let w = m.dequantize();
        let xq = dequantized_acts(ty, &acts, &x, n, cols);
        for t in 0..n {
            for r in 0..rows {
                let (wr, xr) = (&w[r * cols..(r + 1) * cols], &xq[t * cols..(t + 1) * cols]);
                let exact: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                let norm: f64 = wr.iter().zip(xr).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                let got = want[t * rows + r] as f64;
                prop_assert!((got - exact).abs() <= 1e-5 * norm + 1e-6, "{} row {} act {}: {} vs {}", ty, r, t, got, exact);
            }
        }
    }

    /// A row's outputs are the same bits alone, in any batch, and in a fused product.
    #[test]
    fn rows_are_batch_independent((ty, rows, cols, n, seed) in case(), pick in proptest::collection::vec(any::<bool>(), 13)) {
        let mut rng = Lcg(seed);
        let m = QMatrix::new(ty, rows, cols, &random_matrix(ty, rows, cols, &mut rng)).unwrap();
        let m2 = QMatrix::new(ty, 9, cols, &random_matrix(ty, 9, cols, &mut rng)).unwrap();
        let x = activations(&mut rng, n, cols);
        let isa = Isa::detect();
        let kinds = act_kinds(&[&m]);
        let mut all = vec![0f32; n * (rows + 9)];
        matmul_many_with(isa, &[&m, &m2], &QuantizedRows::new(&x, n, cols, &kinds), &mut all).unwrap();
        let subset: Vec<usize> = (0..n).filter(|&t| pick[t]).collect();
        let xs: Vec<f32> = subset.iter().flat_map(|&t| x[t * cols..(t + 1) * cols].to_vec()).collect();
        let mut some = vec![0f32; subset.len() * rows];
        matmul_many_with(isa, &[&m], &QuantizedRows::new(&xs, subset.len(), cols, &kinds), &mut some).unwrap();
        for (j, &t) in subset.iter().enumerate() {
            let a = &all[t * (rows + 9)..t * (rows + 9) + rows];
            let b = &some[j * rows..(j + 1) * rows];
            prop_assert!(a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()), "{} row {}", ty, t);
        }
    }
}

/// The activations as the kernels see them (quantised and scaled back), to isolate the
/// kernels' own rounding from the activation quantisation's.
fn dequantized_acts(
    ty: QuantType,
    acts: &QuantizedRows,
    x: &[f32],
    n: usize,
    cols: usize,
) -> Vec<f32> {
    use super::ActKind;
    match ty.act_kind() {
        ActKind::Float => x.to_vec(),
        kind => {
            let (b, block) = if kind == ActKind::Super256 {
                (acts.b256.as_ref().unwrap(), 256)
            } else {
                (acts.b32.as_ref().unwrap(), 32)
            };
            (0..n * cols)
                .map(|i| b.qs[i] as f32 * b.d[i / block])
                .collect()
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let mut rng = Lcg(1);
    let m = QMatrix::new(
        QuantType::Q4_K,
        3,
        256,
        &random_matrix(QuantType::Q4_K, 3, 256, &mut rng),
    )
    .unwrap();
    assert!(QMatrix::new(QuantType::Q4_K, 3, 32, &[]).is_err());
    assert!(QMatrix::new(QuantType::Q4_1, 2, 32, &[0; 39]).is_err());
    let acts = QuantizedRows::new(&[0.5; 512], 2, 256, &[super::ActKind::Block32]);
    let mut out = vec![0f32; 6];
    assert!(
        m.matmul(&acts, &mut out).is_err(),
        "per-256 activations were not prepared"
    );
    let acts = QuantizedRows::new(&[0.5; 512], 2, 256, &act_kinds(&[&m]));
    assert!(m.matmul(&acts, &mut out[..5]).is_err());
    m.matmul(&acts, &mut out).unwrap();
}

/// A batch large enough to be quantised in parallel parts gives every row the bits it gets
/// alone (the parts are cut at block boundaries, and blocks are independent).
#[test]
fn large_batches_quantize_each_row_as_alone() {
    use super::ActKind;
    let (rows, cols) = (90, 768);
    let mut rng = Lcg(7);
    let x = activations(&mut rng, rows, cols);
    for kind in [ActKind::Block32, ActKind::Super256] {
        let all = QuantizedRows::new(&x, rows, cols, &[kind]);
        let pick = |q: &QuantizedRows| {
            if kind == ActKind::Block32 {
                q.b32.clone().unwrap()
            } else {
                q.b256.clone().unwrap()
            }
        };
        let a = pick(&all);
        let block = if kind == ActKind::Block32 { 32 } else { 256 };
        let per_row = cols / block;
        for r in 0..rows {
            let one = pick(&QuantizedRows::new(
                &x[r * cols..(r + 1) * cols],
                1,
                cols,
                &[kind],
            ));
            assert_eq!(
                &a.qs[r * cols..(r + 1) * cols],
                &one.qs[..],
                "{kind:?} row {r}"
            );
            let d: Vec<u32> = a.d[r * per_row..(r + 1) * per_row]
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let d1: Vec<u32> = one.d.iter().map(|v| v.to_bits()).collect();
            assert_eq!(d, d1, "{kind:?} row {r} scales");
            if !one.s.is_empty() {
                let s: Vec<u32> = a.s[r * per_row..(r + 1) * per_row]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let s1: Vec<u32> = one.s.iter().map(|v| v.to_bits()).collect();
                assert_eq!(s, s1, "{kind:?} row {r} sums");
            }
            assert_eq!(
                &a.sum16[r * cols / 16..(r + 1) * cols / 16],
                &one.sum16[..],
                "{kind:?} row {r}"
            );
        }
        // The values are the rounded scaled inputs.
        for (i, (&q, &v)) in a.qs.iter().zip(&x).enumerate() {
            let b = i / block;
            let want = if a.d[b] > 0.0 {
                (v / a.d[b]).round()
            } else {
                0.0
            };
            assert!(
                (q as f32 - want).abs() <= 1.0,
                "{kind:?} element {i}: {q} vs {want}"
            );
        }
    }
}
