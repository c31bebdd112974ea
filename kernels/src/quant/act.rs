//! Activation rows quantised to signed bytes, in the forms the products read.

use super::formats::{QuantType, BLOCK, SUPER};
use crate::cpu;
use half::f16;

/// Which quantisation of the activations a weight format multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActKind {
    /// Per 32 elements, f16-rounded scale (legacy formats).
    Block32,
    /// Per 256 elements, f32 scale (K-quants).
    Super256,
    /// Plain f32 (F16 weights).
    Float,
}

impl QuantType {
    /// The activation form this format's product reads.
    pub const fn act_kind(self) -> ActKind {
        match self {
            QuantType::F16 => ActKind::Float,
            t if t.is_k() => ActKind::Super256,
            _ => ActKind::Block32,
        }
    }
}

/// Rows quantised in blocks of `block` elements.
#[derive(Debug, Clone, Default)]
pub struct QBlocks {
    /// Values, `rows × cols`.
    pub qs: Vec<i8>,
    /// One scale per block: `x ≈ q · d`.
    pub d: Vec<f32>,
    /// `d · Σ q` per block (the minimum's factor for `Q4_1`/`Q5_1`; 32-element blocks only).
    pub s: Vec<f32>,
    /// `Σ q` per 16 elements.
    pub sum16: Vec<i32>,
}

/// A batch of activation rows (`rows × cols` f32) in every form some weight asked for.
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    rows: usize,
    cols: usize,
    /// Per-32 quantisation, when prepared.
    pub(crate) b32: Option<QBlocks>,
    /// Per-256 quantisation, when prepared.
    pub(crate) b256: Option<QBlocks>,
    /// The f32 rows, when prepared.
    pub(crate) f: Option<Vec<f32>>,
}

impl QuantizedRows {
    /// Quantises `x` (`rows` rows of `cols` elements) into each of `kinds`, reusing buffers.
    /// `cols` must be a multiple of 32 (of 256 for [`ActKind::Super256`]).
    pub fn prepare(&mut self, x: &[f32], rows: usize, cols: usize, kinds: &[ActKind]) {
        debug_assert_eq!(x.len(), rows * cols);
        self.rows = rows;
        self.cols = cols;
        let want = |k| kinds.contains(&k);
        if want(ActKind::Block32) {
            quantize_into(self.b32.get_or_insert_with(Default::default), x, BLOCK);
        } else {
            self.b32 = None;
        }
        if want(ActKind::Super256) {
            quantize_into(self.b256.get_or_insert_with(Default::default), x, SUPER);
        } else {
            self.b256 = None;
        }
        if want(ActKind::Float) {
            let f = self.f.get_or_insert_with(Vec::new);
            f.clear();
            f.extend_from_slice(x);
        } else {
            self.f = None;
        }
    }

    /// A new batch quantised into each of `kinds`.
    pub fn new(x: &[f32], rows: usize, cols: usize, kinds: &[ActKind]) -> Self {
        let mut q = Self::default();
        q.prepare(x, rows, cols, kinds);
        q
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the form `kind` was prepared.
    pub fn has(&self, kind: ActKind) -> bool {
        match kind {
            ActKind::Block32 => self.b32.is_some(),
            ActKind::Super256 => self.b256.is_some(),
            ActKind::Float => self.f.is_some(),
        }
    }
}

/// Elements per parallel task when quantising a batch of rows (smaller batches, such as a
/// decode step's, run on the calling thread).
const PAR_ELEMS: usize = 16 << 10;

/// One contiguous run of blocks and its outputs.
struct Part<'a> {
    x: &'a [f32],
    qs: &'a mut [i8],
    d: &'a mut [f32],
    /// Empty for per-256 blocks.
    s: &'a mut [f32],
    sum16: &'a mut [i32],
}

fn quantize_into(q: &mut QBlocks, x: &[f32], block: usize) {
    use rayon::prelude::*;
    let blocks = x.len() / block;
    q.qs.resize(x.len(), 0);
    q.d.resize(blocks, 0.0);
    q.s.resize(if block == BLOCK { blocks } else { 0 }, 0.0);
    q.sum16.resize(x.len() / 16, 0);
    // Blocks are independent, so how they are shared out does not change a bit.
    let per = PAR_ELEMS.next_multiple_of(block);
    if x.len() <= per {
        // A decode step's rows: one part, on this thread.
        let whole = Part {
            x,
            qs: &mut q.qs,
            d: &mut q.d,
            s: &mut q.s,
            sum16: &mut q.sum16,
        };
        return quantize_part(whole, block);
    }
    let mut parts = Vec::with_capacity(x.len().div_ceil(per));
    let (mut xs, mut qs, mut d, mut s, mut sum16) = (
        x,
        &mut q.qs[..],
        &mut q.d[..],
        &mut q.s[..],
        &mut q.sum16[..],
    );
    while !xs.is_empty() {
        let len = per.min(xs.len());
        let nb = len / block;
        let (x0, x1) = xs.split_at(len);
        let (q0, q1) = std::mem::take(&mut qs).split_at_mut(len);
        let (d0, d1) = std::mem::take(&mut d).split_at_mut(nb);
        let ns = nb.min(s.len());
        let (s0, s1) = std::mem::take(&mut s).split_at_mut(ns);
        let (m0, m1) = std::mem::take(&mut sum16).split_at_mut(len / 16);
        parts.push(Part {
            x: x0,
            qs: q0,
            d: d0,
            s: s0,
            sum16: m0,
        });
        (xs, qs, d, s, sum16) = (x1, q1, d1, s1, m1);
    }
    parts.into_par_iter().for_each(|p| quantize_part(p, block));
}

/// Quantises one part with the fastest body this CPU runs.
fn quantize_part(p: Part<'_>, block: usize) {
    #[cfg(target_arch = "x86_64")]
    if cpu::features().avx2 {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(p: Part<'_>, block: usize) {
            quantize_body(p, block)
        }
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { fast(p, block) };
    }
    quantize_body(p, block)
}

#[inline(always)]
fn quantize_body(p: Part<'_>, block: usize) {
    for (b, (xs, qs)) in
        p.x.chunks_exact(block)
            .zip(p.qs.chunks_exact_mut(block))
            .enumerate()
    {
        // Eight running maxima, then their maximum: the same value as a sequential fold (max is
        // exact and order-free), but a dependency chain LLVM can vectorise.
        let mut lanes = [0f32; 8];
        for c in xs.chunks_exact(8) {
            for (m, v) in lanes.iter_mut().zip(c) {
                *m = m.max(v.abs());
            }
        }
        let amax = lanes.iter().fold(0f32, |a, &m| a.max(m));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (o, v) in qs.iter_mut().zip(xs) {
            // `round` gives an integer in -127..=127 (for finite inputs), read from the float's
            // bits after adding 1.5 · 2^23: the value `as i8` gives, without a saturating
            // conversion, which does not vectorise (a NaN input gives some byte, not 0).
            let r = (v * id).round();
            *o = ((r + 12_582_912.0).to_bits() as i32 - 0x4B40_0000) as i8;
        }
        let mut sum = 0i32;
        for (k, s16) in qs.chunks_exact(16).enumerate() {
            let s: i32 = s16.iter().map(|&v| v as i32).sum();
            p.sum16[b * block / 16 + k] = s;
            sum += s;
        }
        if block == BLOCK {
            // Rounded to f16 as ggml's `block_q8_1` stores it.
            let d = f16::from_f32(d).to_f32();
            p.d[b] = d;
            p.s[b] = d * sum as f32;
        } else {
            p.d[b] = d;
        }
    }
}
