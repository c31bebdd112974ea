//! Subcommands that talk to a running daemon over its socket.

pub mod admin;
pub mod connect;
