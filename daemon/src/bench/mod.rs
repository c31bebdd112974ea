//! `agentd bench …`: measurements that print JSON (never asserted as times in tests).
//!
//! - `engine`: prefill and decode throughput of the CPU executor.
//! - `latency`: inter-token latency of running streams while a prefix loads from disk and while
//!   a large grammar compiles; session-call latency while sessions prefill.
//! - `prefix`: many sessions sharing one system prompt, cache off and on.
//! - `restart`: first-request TTFT on a persisted prefix after a restart.
//! - `serve`: the daemon's own per-request overhead over the socket.

pub mod engine;
pub mod latency;
pub mod prefix;
pub mod restart;
pub mod serve;
