//! The agentd SDK.
//!
//! - [`proto`]: the wire contract, package `agentd.v1`, re-exported from `agentd-wire`.
//! - [`Client`], [`Session`], [`GenerateOptions`], [`Event`], [`Error`]: a typed async client
//!   over the daemon's Unix socket.
//! - [`Usage`], [`FinishReason`], [`Stats`], [`TenantStats`], [`PrefixEntry`], [`ModelInfo`],
//!   [`Health`]: what the daemon reports, as the SDK's own types (converted from the wire's;
//!   [`proto`] stays available for raw access).
//! - [`Message`], [`Role`]: the chat types both sides agree on.
//! - [`agent`]: tools, the tool-call loop (calls constrained by the daemon), a shared prefix.

pub mod agent;
mod client;
mod error;
mod types;

pub use client::{default_socket_path, Client, Event, GenerateOptions, GenerateStream, Session};
pub use error::Error;
pub use types::{
    FinishReason, Health, ModelInfo, PrefixEntry, SharedTierStats, Stats, TenantStats, Usage,
};

pub use agentd_wire::{proto, Message, Role};
