//! The portable product: one panel group (eight weight rows) times one activation row, in the
//! order of operations every kernel follows (see the module docs of [`super`]).

use super::act::QuantizedRows;
use super::formats::{QuantType, BLOCK, GROUP};
use super::pack::value;
use half::f16;

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// `out[r] = row r of the group · activation row t`, for the eight rows of one panel group.
pub fn group_dot(ty: QuantType, panel: &[u8], acts: &QuantizedRows, t: usize, out: &mut [f32]) {
    let cols = acts.cols();
    let recs = cols / ty.rec_elems();
    let (rb, sb, subs) = (ty.rec_bytes(), ty.sub_bytes(), ty.rec_elems() / BLOCK);
    if ty == QuantType::F16 {
        let x = &acts.f.as_ref().expect("f32 activations prepared")[t * cols..(t + 1) * cols];
        for (r, o) in out.iter_mut().enumerate().take(GROUP) {
            let mut acc = 0f32;
            for (i, rec) in panel.chunks_exact(rb).take(recs).enumerate() {
                for k in 0..BLOCK {
                    acc = f16_at(rec, 16 * k + 2 * r).mul_add(x[i * BLOCK + k], acc);
                }
            }
            *o = acc;
        }
        return;
    }
    let a = if ty.is_k() {
        acts.b256.as_ref().expect("per-256 activations prepared")
    } else {
        acts.b32.as_ref().expect("per-32 activations prepared")
    };
    let ys = &a.qs[t * cols..(t + 1) * cols];
    let sum16 = &a.sum16[t * cols / 16..(t + 1) * cols / 16];
    let per_row = cols / if ty.is_k() { 256 } else { BLOCK };
    let (ds, ss) = (&a.d[t * per_row..], &a.s[(t * per_row).min(a.s.len())..]);
    let o = ty.offset();
    for (r, out) in out.iter_mut().enumerate().take(GROUP) {
        let mut acc = 0f32;
        for i in 0..recs {
            let rec = &panel[i * rb..(i + 1) * rb];
            let tail = &rec[subs * sb..];
            let blk = i * subs; // first 32-element block of this record
                                // Exact integer dot of sub-block s's halves (elements 0..16 and 16..32).
            let halves = |s: usize| {
                let vals = &rec[s * sb..(s + 1) * sb];
                let y = &ys[(blk + s) * BLOCK..];
                let dot = |h: usize| -> i32 {
                    (16 * h..16 * h + 16)
                        .map(|e| value(ty, vals, r, e) as i32 * y[e] as i32)
                        .sum::<i32>()
                        - o * sum16[2 * (blk + s) + h]
                };
                (dot(0), dot(1))
            };
            let d = f16_at(tail, 2 * r);
            let dy = ds[if ty.is_k() { i } else { blk }];
            match ty {
                QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 => {
                    let (lo, hi) = halves(0);
                    acc = (d * dy).mul_add((lo + hi) as f32, acc);
                }
                QuantType::Q4_1 | QuantType::Q5_1 => {
                    let (lo, hi) = halves(0);
                    acc = (d * dy).mul_add((lo + hi) as f32, acc);
                    acc = f16_at(tail, 16 + 2 * r).mul_add(ss[blk], acc);
                }
                QuantType::Q4_K | QuantType::Q5_K => {
                    let (mut sumi, mut summ) = (0i32, 0i32);
                    for s in 0..subs {
                        let (lo, hi) = halves(s);
                        sumi += tail[32 + 8 * s + r] as i32 * (lo + hi);
                        let ysum = sum16[2 * (blk + s)] + sum16[2 * (blk + s) + 1];
                        summ += tail[96 + 8 * s + r] as i32 * ysum;
                    }
                    let dmin = f16_at(tail, 16 + 2 * r);
                    acc = (d * dy).mul_add(sumi as f32, acc);
                    acc = (-(dmin * dy)).mul_add(summ as f32, acc);
                }
                QuantType::Q6_K => {
                    let mut sumi = 0i32;
                    for s in 0..subs {
                        let (lo, hi) = halves(s);
                        sumi += tail[16 + 8 * (2 * s) + r] as i8 as i32 * lo;
                        sumi += tail[16 + 8 * (2 * s + 1) + r] as i8 as i32 * hi;
                    }
                    acc = (d * dy).mul_add(sumi as f32, acc);
                }
                QuantType::F16 => unreachable!(),
            }
        }
        *out = acc;
    }
}
