//! Rotary position embeddings, with cos/sin tables computed once per model.
//!
//! Llama GGUF files store Q and K so that each rotated pair is adjacent (`x[2i]`, `x[2i+1]`),
//! llama.cpp's "normal" RoPE mode ([`RopeStyle::Adjacent`]); Qwen2 and Gemma files keep the
//! Hugging Face layout, where pair `i` is `x[i]`, `x[i + rot_dim/2]` (llama.cpp's NeoX mode,
//! [`RopeStyle::Halves`]).

/// Which dimensions of a head RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`: llama.cpp's normal mode (Llama GGUF files).
    Adjacent,
    /// Pairs `(x[i], x[i + rot_dim/2])`: llama.cpp's NeoX mode (Qwen2, Gemma).
    Halves,
}

/// Precomputed cos/sin for every position up to the model's context length.
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

impl RopeTable {
    /// A table for `positions` positions rotating the first `rot_dim` dimensions of each head,
    /// with frequency base `theta`, optional per-pair frequency divisors (Llama 3's
    /// `rope_freqs`) and a linear position scale (1.0 = none).
    pub fn new(
        positions: usize,
        rot_dim: usize,
        theta: f32,
        freq_factors: Option<&[f32]>,
        position_scale: f32,
    ) -> Self {
        let half = rot_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / (theta as f64).powf(2.0 * i as f64 / rot_dim as f64);
                f / freq_factors.map_or(1.0, |ff| ff[i] as f64)
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            let pos = p as f64 * position_scale as f64;
            for f in &inv_freq {
                let (s, c) = (pos * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Self {
            half,
            cos,
            sin,
            positions,
        }
    }

    /// How many positions the table covers.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// [`RopeTable::apply`] or [`RopeTable::apply_halves`], as `style` says.
    pub fn apply_style(
        &self,
        style: RopeStyle,
        x: &mut [f32],
        pos0: usize,
        heads: usize,
        head_dim: usize,
    ) {
        match style {
            RopeStyle::Adjacent => self.apply(x, pos0, heads, head_dim),
            RopeStyle::Halves => self.apply_halves(x, pos0, heads, head_dim),
        }
    }

    /// Like [`RopeTable::apply`], rotating pairs `(x[i], x[i + half])` of each head (NeoX
    /// style), `half` being half the rotated dimensions.
    pub fn apply_halves(&self, x: &mut [f32], pos0: usize, heads: usize, head_dim: usize) {
        let row_len = heads * head_dim;
        let half = self.half;
        for (r, row) in x.chunks_exact_mut(row_len).enumerate() {
            let at = (pos0 + r) * half;
            let (cos, sin) = (&self.cos[at..at + half], &self.sin[at..at + half]);
            for head in row.chunks_exact_mut(head_dim) {
                let (lo, hi) = head[..2 * half].split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = a * sin[i] + b * cos[i];
                }
            }
        }
    }

    /// Rotates, in place, `rows` consecutive rows of `heads` heads of `head_dim` each; row `r`
    /// is at position `pos0 + r`.
    pub fn apply(&self, x: &mut [f32], pos0: usize, heads: usize, head_dim: usize) {
        let row_len = heads * head_dim;
        for (r, row) in x.chunks_exact_mut(row_len).enumerate() {
            let at = (pos0 + r) * self.half;
            let (cos, sin) = (&self.cos[at..at + self.half], &self.sin[at..at + self.half]);
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..self.half {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * cos[i] - b * sin[i];
                    head[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let t = RopeTable::new(16, 8, 10_000.0, None, 1.0);
        let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.3 - 2.0).collect();
        let mut x = orig.clone();
        t.apply(&mut x, 0, 2, 8);
        assert_eq!(x, orig);
        let mut y = orig.clone();
        t.apply(&mut y, 5, 2, 8);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = y.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        // The first pair rotates by exactly `pos` radians.
        let (a, b) = (orig[0], orig[1]);
        assert!((y[0] - (a * 5f32.cos() - b * 5f32.sin())).abs() < 1e-5);
    }

    #[test]
    fn halves_style_is_adjacent_style_on_permuted_dimensions() {
        // NeoX pairs (i, i + half) are the adjacent pairs (2i, 2i + 1) after an interleave.
        let t = RopeTable::new(32, 8, 10_000.0, None, 1.0);
        let head: Vec<f32> = (0..8).map(|i| i as f32 * 0.7 - 2.5).collect();
        let interleaved: Vec<f32> = (0..4).flat_map(|i| [head[i], head[i + 4]]).collect();
        let (mut a, mut b) = (head.clone(), interleaved);
        t.apply_style(RopeStyle::Halves, &mut a, 9, 1, 8);
        t.apply_style(RopeStyle::Adjacent, &mut b, 9, 1, 8);
        for i in 0..4 {
            assert_eq!(a[i], b[2 * i]);
            assert_eq!(a[i + 4], b[2 * i + 1]);
        }
    }
}
