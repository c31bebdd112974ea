//! The agentd wire contract: package `agentd.v1` (`proto/agentd/v1/agentd.proto`) as generated
//! Rust types with client and server stubs, and the chat types ([`Message`], [`Role`]) that the
//! daemon and the SDK agree on. No client or server logic lives here.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The Hermes tool-call format both sides agree on: the daemon's tool-call constraint produces
/// `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` blocks, the SDK parses them and
/// sends results back as `<tool_response>` blocks.
pub mod hermes {
    /// Opens a tool call.
    pub const TOOL_CALL_OPEN: &str = "<tool_call>";
    /// Closes a tool call (on a line of its own).
    pub const TOOL_CALL_CLOSE: &str = "</tool_call>";
    /// Opens a tool result.
    pub const TOOL_RESPONSE_OPEN: &str = "<tool_response>";
    /// Closes a tool result.
    pub const TOOL_RESPONSE_CLOSE: &str = "</tool_response>";

    /// The system prompt for tool use: `instructions`, then the tools' signatures (each
    /// `{"type": "function", "function": {"name", "description", "parameters"}}`, one JSON
    /// line) and how to call them. The SDK's agents and the daemon's OpenAI-compatible API both
    /// build it here, so the same instructions and tools give the same bytes, and the same
    /// cached prefix.
    pub fn system_prompt(instructions: &str, signatures: &[String]) -> String {
        if signatures.is_empty() {
            return instructions.to_owned();
        }
        let head = if instructions.is_empty() {
            String::new()
        } else {
            format!("{instructions}\n\n")
        };
        format!(
            "{head}You may call functions. Their signatures are inside <tools></tools>:\n<tools>\n{}\n</tools>\n\
             To call one, reply with <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>. \
             Results come back inside <tool_response></tool_response>. When you have the answer, reply with plain text.",
            signatures.join("\n")
        )
    }

    /// One tool's signature line for [`system_prompt`].
    pub fn signature(name: &str, description: &str, parameters: &serde_json::Value) -> String {
        serde_json::json!({
            "type": "function",
            "function": {
                "name": name,
                "description": description,
                "parameters": parameters,
            }
        })
        .to_string()
    }

    /// A tool result as the content of a `tool` message: a `<tool_response>` block holding
    /// `{"name", "content"}`.
    pub fn tool_response(name: &str, content: &str) -> String {
        let body = serde_json::json!({ "name": name, "content": content });
        format!("{TOOL_RESPONSE_OPEN}\n{body}\n{TOOL_RESPONSE_CLOSE}")
    }
}

/// agentd's sampling defaults, the one set used by the daemon when a request carries no
/// sampling parameters, by `agentd generate`'s flags and by the SDK's `GenerateOptions`:
/// temperature 0.7, top-k 40, top-p 0.95, min-p 0.05, repetition penalty 1.1 (over the last 64
/// tokens), no presence or frequency penalty, seeded from entropy. Small models loop without a
/// mild repetition penalty, hence 1.1 (as Ollama); temperature 0 is greedy.
pub mod sampling_defaults {
    /// Softmax temperature; 0 is greedy.
    pub const TEMPERATURE: f32 = 0.7;
    /// Keep the k most likely tokens (0 = off).
    pub const TOP_K: u32 = 40;
    /// Nucleus mass (1 = off).
    pub const TOP_P: f32 = 0.95;
    /// Drop tokens below this fraction of the top token's probability (0 = off).
    pub const MIN_P: f32 = 0.05;
    /// Divides positive (multiplies negative) logits of recent tokens (1 = off).
    pub const REPETITION_PENALTY: f32 = 1.1;
    /// Recent tokens the penalties look at.
    pub const PENALTY_LAST_N: usize = 64;

    /// The defaults as wire parameters.
    pub fn wire() -> crate::proto::Sampling {
        crate::proto::Sampling {
            temperature: TEMPERATURE,
            top_k: TOP_K,
            top_p: TOP_P,
            min_p: MIN_P,
            repetition_penalty: REPETITION_PENALTY,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

/// The socket a daemon listens on by default, and clients connect to: `$AGENTD_SOCKET`, else
/// `$XDG_RUNTIME_DIR/agentd/agentd.sock`, else `agentd.sock` in the data directory
/// (`$AGENTD_HOME`, else the XDG data directory's `agentd`).
pub fn default_socket_path() -> PathBuf {
    if let Some(sock) = std::env::var_os("AGENTD_SOCKET").filter(|v| !v.is_empty()) {
        return PathBuf::from(sock);
    }
    if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(run).join("agentd").join("agentd.sock");
    }
    let home = std::env::var_os("AGENTD_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| dirs::data_dir().map(|d| d.join("agentd")))
        .unwrap_or_else(|| PathBuf::from(".agentd"));
    home.join("agentd.sock")
}

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
