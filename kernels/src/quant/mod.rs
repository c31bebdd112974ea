//! GGUF's quantized weight formats, repacked into 8-row panels, and the one product every
//! activation row goes through.
//!
//! Supported formats ([`QuantType`]): the 32-element block formats `Q4_0`, `Q4_1`, `Q5_0`,
//! `Q5_1`, `Q8_0`, the 256-element "K-quant" super-blocks `Q4_K`, `Q5_K`, `Q6_K`, and `F16`.
//!
//! **Panels.** At load time ([`pack`]) the rows of a weight are grouped in eights (zero rows pad
//! the last group) and each group's blocks are rewritten so that one 32-byte load holds four
//! consecutive elements of each of the eight rows (llama.cpp's repacked `Q4_0x8` layout,
//! generalised): 4-bit values as nibbles (element `i` low, element `i + 16` high), a 5th and 6th
//! bit as bit masks, scales and minimums as eight values side by side. A product then
//! broadcasts four activation bytes and multiplies them with eight rows at once, so each 32-bit
//! lane of a SIMD register accumulates one output: no horizontal sums. The panel takes the
//! same bytes as the GGUF blocks, except the K-quants' 6-bit scales, unpacked to bytes (+2–3 %).
//!
//! **Activations** are quantised per row to signed bytes ([`act`]): per 32-element block with
//! an f16-rounded scale for the 32-element formats (llama.cpp's `Q8_1`), per 256 with an f32
//! scale for the K-quants (`Q8_K`), with integer sums per 16 elements for the offsets and
//! minimums. `F16` weights multiply f32 activations.
//!
//! **One order of operations.** Each output is computed by the same sequence of operations
//! whatever the kernel: per block, an exact integer dot product (how it is summed cannot change
//! it), then a fixed sequence of f32 multiplies and fused multiply-adds into one accumulator.
//! The scalar twin ([`scalar`]), the AVX2, AVX-VNNI and AVX-512 VNNI kernels ([`x86`]: 256-bit
//! registers over one panel group, or 512-bit ones over two, each lane doing its row's f32
//! steps in the same order; only exact integer sums are grouped differently), one row
//! alone or a tile of rows, one thread or many: all give the same bits. A prompt row and a
//! decode row, a cache hit and a recompute, a batch of one and a batch of 32 are therefore
//! bit-identical by construction.

pub mod act;
pub(crate) mod formats;
pub mod pack;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
pub mod x86;

#[cfg(test)]
mod tests;

pub use act::{ActKind, QuantizedRows};
pub use formats::{QuantType, BLOCK, SUPER};
