//! The seam between the scheduler and the hardware: an [`Executor`] runs one step over a batch
//! of sequences against KV pages it owns, and moves pages (copy on write, to and from host bytes
//! for the disk tier). The scheduler decides *what* runs; an executor decides *how*.
//!
//! - [`CpuExecutor`]: the GGUF model on the CPU (weights, f16 KV pages, rayon's thread pool).
//! - [`FakeExecutor`]: deterministic logits from a hash of each row's tokens and position, for
//!   fast scheduler tests with no model file.
//!
//! A GPU executor is a second implementation of the same trait; `kernels/` stays a crate of CPU
//! kernels on host slices.

mod cpu;
mod fake;

pub use cpu::CpuExecutor;
pub use fake::FakeExecutor;

/// How a sequence's rows in a step are computed. A row's numerics depend only on its kind, never
/// on the other rows of the batch, so a cache hit equals a recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// Prompt tokens: dense f32 products.
    Prompt,
    /// Sampled tokens fed back: quantized products, batched across sequences.
    Decode,
}

/// One sequence's part of a batched forward step.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// The new tokens, at positions `pos0, pos0 + 1, …`.
    pub tokens: &'a [u32],
    /// Tokens already in the sequence's pages.
    pub pos0: usize,
    /// The sequence's pages in position order; must cover positions `0..pos0 + tokens.len()`.
    pub page_table: &'a [u32],
    /// How the rows are computed.
    pub kind: RowKind,
    /// How many of the new tokens, counted back from the last, to return logits for (0: none;
    /// 1: the last token's, for sampling; more: the rows that verify draft tokens).
    pub logits: usize,
}

/// What the scheduler needs to know about the model behind an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Logits per row.
    pub vocab: usize,
    /// The most positions a sequence may hold.
    pub context_length: usize,
    /// When every layer attends within a sliding window: the keys a query sees, itself
    /// included. Pages wholly below [`first_key_read`] are then never read again by the
    /// sequence, and the scheduler may release them. `None` when any layer sees everything.
    pub window: Option<usize>,
}

/// The first key position attention reads for a query at `pos` under `window` (the start of
/// the kernel's tile that holds the window's first key): a sequence's pages wholly below it
/// are never read by that query or any later one.
pub fn first_key_read(pos: usize, window: usize) -> usize {
    agentd_kernels::paged_attention::window_start((pos + 1).saturating_sub(window))
}

/// The element type of the KV pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// IEEE half precision.
    #[default]
    F16,
    /// llama.cpp's Q8_0 blocks: 32 int8 values and one f16 scale (`max|x| / 127`) per 32
    /// elements of a head, 34 bytes instead of 64, so a pool holds about twice the tokens.
    /// Head sizes must be a multiple of 32.
    Q8_0,
}

impl KvDtype {
    /// The name recorded in the disk tier's fingerprint, and `--kv-dtype`'s value.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::Q8_0 => "q8_0",
        }
    }

    /// Every dtype, default first.
    pub const ALL: [KvDtype; 2] = [KvDtype::F16, KvDtype::Q8_0];

    /// The dtype named `name` (as [`KvDtype::name`] gives it).
    pub fn from_name(name: &str) -> Option<KvDtype> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Elements per storage block (1 for f16): head sizes must be a multiple of it.
    pub fn block(self) -> usize {
        match self {
            KvDtype::F16 => 1,
            KvDtype::Q8_0 => agentd_kernels::paged_attention::QK8_0,
        }
    }

    /// Bytes a K/V row of `elems` elements (a multiple of [`KvDtype::block`]) takes.
    pub fn row_bytes(self, elems: usize) -> usize {
        match self {
            KvDtype::F16 => elems * 2,
            KvDtype::Q8_0 => elems / self.block() * agentd_kernels::kv_store::BLOCK_Q8_0_BYTES,
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_name(s).ok_or_else(|| format!("unknown KV dtype {s:?} (f16 or q8_0)"))
    }
}

/// The layout of an executor's KV pages: what a page's bytes mean, so that pages written by one
/// process are only read back by a process with the same layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Tokens per page.
    pub page_size: usize,
    /// Pages allocated.
    pub pages: usize,
    /// Layers (each page holds keys and values of every layer).
    pub layers: usize,
    /// K/V heads per layer.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Element type.
    pub dtype: KvDtype,
}

/// What an executor operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The model rejected the step (bad input, or a kernel failed).
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// A page id outside the allocated pool.
    #[error("page {page} is outside the pool of {pages}")]
    BadPage {
        /// The page named.
        page: u32,
        /// Pages allocated.
        pages: usize,
    },
    /// Host bytes of the wrong size for one page.
    #[error("a page is {expected} bytes, got {got}")]
    PageBytes {
        /// [`Executor::page_bytes`].
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// The pool cannot be allocated as asked.
    #[error("cannot allocate the KV pool: {0}")]
    Pool(String),
}

/// Runs forward steps over KV pages it owns. One executor serves one scheduler; it is driven
/// from the scheduler's thread.
pub trait Executor: Send {
    /// The model's vocabulary and context length.
    fn shape(&self) -> ModelShape;

    /// Bytes of KV one token takes across all layers.
    fn kv_bytes_per_token(&self) -> usize;

    /// Allocates the KV pool: `pages` pages of `page_size` tokens, all zero. Called once, before
    /// any other page operation.
    fn allocate(&mut self, pages: usize, page_size: usize) -> Result<(), ExecError>;

    /// The layout of the allocated pages.
    fn layout(&self) -> KvLayout;

    /// One step over a batch: each sequence's new tokens run through the model, their keys and
    /// values go into the sequence's pages, and, per sequence in order, the logits of its last
    /// new token come back when it asked for them.
    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Vec<Option<Vec<f32>>>, ExecError>;

    /// Copies the first `tokens` rows of page `src` to page `dst` in every layer (copy on write
    /// of a shared, partly filled page).
    fn copy_page(&mut self, src: u32, dst: u32, tokens: usize) -> Result<(), ExecError>;

    /// Bytes of one page in host form ([`Executor::read_page`]'s layout).
    fn page_bytes(&self) -> usize;

    /// Appends page `page`'s bytes, in host form, to `out`.
    fn read_page(&self, page: u32, out: &mut Vec<u8>) -> Result<(), ExecError>;

    /// Overwrites page `page` from host bytes ([`Executor::page_bytes`] of them).
    fn write_page(&mut self, page: u32, bytes: &[u8]) -> Result<(), ExecError>;
}

fn check_page(page: u32, pages: usize) -> Result<(), ExecError> {
    if page as usize >= pages {
        return Err(ExecError::BadPage { page, pages });
    }
    Ok(())
}

#[cfg(test)]
mod cpu_tests;
