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

fn quantize_into(q: &mut QBlocks, x: &[f32], block: usize) {
    let blocks = x.len() / block;
    q.qs.resize(x.len(), 0);
    q.d.resize(blocks, 0.0);
    q.s.resize(if block == BLOCK { blocks } else { 0 }, 0.0);
    q.sum16.resize(x.len() / 16, 0);
    #[cfg(target_arch = "x86_64")]
    if cpu::features().avx2 {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(q: &mut QBlocks, x: &[f32], block: usize) {
            quantize_body(q, x, block)
        }
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { fast(q, x, block) };
    }
    quantize_body(q, x, block)
}

#[inline(always)]
fn quantize_body(q: &mut QBlocks, x: &[f32], block: usize) {
    for (b, (xs, qs)) in x
        .chunks_exact(block)
        .zip(q.qs.chunks_exact_mut(block))
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
            *o = (v * id).round() as i8;
        }
        let mut sum = 0i32;
        for (k, s16) in qs.chunks_exact(16).enumerate() {
            let s: i32 = s16.iter().map(|&v| v as i32).sum();
            q.sum16[b * block / 16 + k] = s;
            sum += s;
        }
        if block == BLOCK {
            // Rounded to f16 as ggml's `block_q8_1` stores it.
            let d = f16::from_f32(d).to_f32();
            q.d[b] = d;
            q.s[b] = d * sum as f32;
        } else {
            q.d[b] = d;
        }
    }
}
