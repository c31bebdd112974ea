//! The agentd SDK.
//!
//! - [`proto`]: the wire contract, package `agentd.v1` (`proto/agentd/v1/agentd.proto`), as
//!   generated Rust types, client and server stubs.
//! - [`Client`], [`Session`], [`GenerateOptions`], [`Event`], [`Error`]: a typed async client
//!   over the daemon's Unix socket.
//! - [`Message`], [`Role`]: the chat types both sides agree on.
//! - [`agent`]: tools, the tool-call loop (calls constrained by the daemon), a shared prefix.

use serde::{Deserialize, Serialize};

pub mod agent;
mod client;
mod error;

pub use client::{default_socket_path, Client, Event, GenerateOptions, GenerateStream, Session};
pub use error::Error;

/// The generated wire types and gRPC stubs of package `agentd.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("agentd.v1");
}

/// Who said a message in a chat transcript.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the whole conversation.
    System,
    /// The person (or program) asking.
    User,
    /// The model's own replies.
    Assistant,
    /// The result of a tool call, fed back to the model.
    Tool,
}

impl Role {
    /// The role's name as chat templates expect it (`"system"`, `"user"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One turn of a chat: a role and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who said it.
    pub role: Role,
    /// What was said.
    pub content: String,
}

impl Message {
    /// A message with the given role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// A tool result.
    pub fn tool(content: impl Into<String>) -> Self {
        Self::new(Role::Tool, content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_serialise_as_template_names() {
        let m = Message::tool("42");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"role":"tool","content":"42"}"#);
        assert_eq!(Role::Assistant.to_string(), "assistant");
    }
}
