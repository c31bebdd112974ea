//! Compute kernels for agentd's engine.
//!
//! Every kernel works on plain slices (`&[f32]`, raw GGUF block bytes) so the engine can call it
//! from any tensor library. Kernels that matter for speed have an AVX2 implementation chosen at
//! run time ([`cpu::features`]) and a portable scalar twin that tests compare it against; nothing
//! here depends on building with `target-cpu=native`.
//!
//! - [`quant`]: GGUF's quantized formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16)
//!   repacked into 8-row panels, 8-bit activations, and the one order of operations every
//!   product follows (scalar twin, AVX2, AVX-VNNI, AVX-512 VNNI).
//! - [`matmul`]: a quantized weight matrix times a batch of activation rows, decode and prompt
//!   rows alike, tiled and parallel over weight rows; a row's result never depends on its batch.
//! - [`dense`]: the f32 product (`--exact`, formats without a quantized kernel), one fixed sum
//!   order per output, so its rows do not depend on the batch either.
//! - [`vecops`]: f32 dot products, `axpy`, a fast vectorised `exp`, SiLU.
//! - [`norm`], [`rope`]: RMSNorm and rotary position embeddings.
//! - [`attention`]: causal grouped-query attention with an online softmax (FlashAttention-style
//!   tiles), reading each K/V head once per query group and never materialising repeated K/V.
//! - [`paged_attention`]: the same attention reading f16 or Q8_0 K/V ([`kv_store`]) straight
//!   from fixed-size pages of a preallocated pool through a page table, plus `write_kv` to store new rows in their pages,
//!   and partial attention over a key range with a merge (cascade attention).
//!
//! A CUDA backend (cudarc, NVRTC) will sit beside `cpu` behind a `cuda` feature; it is not built yet.

pub mod attention;
pub mod cpu;
pub mod dense;
pub mod kv_store;
pub mod matmul;
pub mod norm;
pub mod paged_attention;
pub mod pool;
pub mod quant;
pub mod rope;
mod tile;
pub mod vecops;

/// Errors a kernel reports when its inputs do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer's length does not match the shape it is used with.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// The length the shape implies.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// Activations were not quantised in the form a weight format reads.
    #[error("activations were not prepared for {format} weights")]
    Unprepared {
        /// The weight format.
        format: &'static str,
    },
    /// A row length that is not a whole number of quantisation blocks.
    #[error("row length {cols} is not a multiple of the block size {block}")]
    PartialBlock {
        /// Elements per row.
        cols: usize,
        /// Elements per block.
        block: usize,
    },
}

/// Result alias for kernel calls.
pub type Result<T> = std::result::Result<T, KernelError>;
