//! Subcommands that talk to a running daemon over its socket (`admin`, `connect`), and the
//! model-file tools that need no daemon (`model`: `agentd model quantize`; `catalog`:
//! `agentd model list|pull|rm` and the meaning of `--model NAME|PATH`; `tokenize`:
//! `agentd model tokenize`), `route`: `agentd route`, the router in front of several daemons; and `device`: `agentd device`,
//! the CUDA probe.

pub mod admin;
pub mod catalog;
pub mod connect;
pub mod device;
pub mod model;
pub mod route;
pub mod run;
pub mod serve;
pub mod tokenize;
