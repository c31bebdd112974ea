//! `agentd bench …`: measurements that print JSON (never asserted as times in tests).
//!
//! - `cluster`: daemons behind `agentd route` on a shared KV tier: routed, round-robin, no tier.
//! - `engine`: prefill and decode throughput of the CPU executor (and the KV dtype's bytes).
//! - `kv-quality`: Q8_0 KV pages against f16 ones: KL divergence, top-1 and greedy agreement.
//! - `http`: the HTTP API's per-request overhead next to the gRPC figure.
//! - `latency`: inter-token latency of running streams while a prefix loads from disk and while
//!   a large grammar compiles; session-call latency while sessions prefill.
//! - `perplexity`: the model's perplexity on a text file, as llama.cpp's `llama-perplexity`.
//! - `memory`: the daemon's RSS before, at the peak of and after a battery of large requests.
//! - `prefix`: many sessions sharing one system prompt, cache off and on.
//! - `restart`: first-request TTFT on a persisted prefix after a restart.
//! - `serve`: the daemon's own per-request overhead over the socket.
//! - `spec`: decode speed with and without speculative decoding, agent and chat workloads.
//! - `soak`: many sessions in multi-turn loops for minutes: errors, turn latency, RSS per minute.
//!
//! `soak`, `memory` and `cluster` run daemons as child processes (`child`), so the RSS they read is the
//! daemon's alone; the others run the service in this process.

pub mod child;
pub mod cluster;
pub mod engine;
pub mod http;
pub mod kv_quality;
pub mod latency;
pub mod memory;
pub mod perplexity;
pub mod prefix;
pub mod redis_cluster;
pub mod restart;
pub mod serve;
pub mod soak;
pub mod spec;
