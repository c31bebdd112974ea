//! agentd: a daemon that hosts a Llama-family GGUF model for many agent sessions.
//!
//! The pieces, from the file on disk to text on the screen:
//! - [`model_store`] finds the model file (and fetches the default one).
//! - [`model`] loads a GGUF file's hyperparameters and weights and runs the forward pass.
//! - [`tokenizer`] builds a byte-level BPE tokenizer from the GGUF's metadata.
//! - [`chat`] renders messages through the GGUF's chat template.
//! - [`sampling`] turns logits into the next token; [`detok`] and [`stop`] turn tokens into text.
//! - [`generate`] ties them together into a streaming generation loop.
//! - [`scheduler`] runs many sessions' generations in continuous batches over a paged KV pool
//!   shared through the radix tree of cached prefixes.
//! - [`service`] is the gRPC service over a Unix socket (`agentd serve`), on the scheduler.
//! - [`cache`] holds the paged KV pool's page accounting and the radix tree of cached prefixes.

pub mod bench;
pub mod bench_agents;
pub mod bench_prefix;
pub mod bench_restart;
pub mod bench_serve;
pub mod cache;
pub mod chat;
pub mod config;
pub mod constraint;
pub mod decoding;
pub mod detok;
pub mod generate;
pub mod model;
pub mod model_store;
pub mod render;
pub mod sampling;
pub mod scheduler;
pub mod service;
pub mod stop;
pub mod store;
pub mod tokenizer;
