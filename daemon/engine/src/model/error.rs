//! What can go wrong loading or running a model.

use std::path::PathBuf;

/// An error from loading a GGUF file or running the forward pass. Each variant names the key,
/// tensor or limit involved, so a malformed file is diagnosable from the message alone.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be opened or read.
    #[error("reading {path}: {source}")]
    Io {
        /// The model file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The GGUF container itself is malformed or truncated.
    #[error("{path} is not a valid GGUF file: {reason}")]
    Format {
        /// The model file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// A required metadata key is absent.
    #[error("GGUF metadata key `{key}` is missing")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata key has the wrong type or an impossible value.
    #[error("GGUF metadata key `{key}`: {reason}")]
    BadKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required tensor is absent.
    #[error("GGUF tensor `{name}` is missing")]
    MissingTensor {
        /// The tensor name.
        name: String,
    },
    /// A tensor exists but its shape, type or bytes do not fit the hyperparameters.
    #[error("GGUF tensor `{name}`: {reason}")]
    BadTensor {
        /// The tensor name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A load option this model cannot honour.
    #[error("invalid load option: {0}")]
    BadOption(String),
    /// The file describes something this engine does not run.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A sequence would grow past the model's context length.
    #[error("context overflow: {needed} tokens needed, the model's context length is {limit}")]
    ContextOverflow {
        /// Tokens the sequence would hold.
        needed: usize,
        /// The model's context length.
        limit: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A kernel rejected its inputs (a bug in the engine, reported rather than panicking).
    #[error("kernel: {0}")]
    Kernel(#[from] agentd_kernels::KernelError),
    /// candle failed (matrix products, dequantisation).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias for model operations.
pub type Result<T> = std::result::Result<T, ModelError>;
