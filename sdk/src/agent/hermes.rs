//! The Hermes tool-call format for ChatML models: the tool list in the system prompt inside
//! `<tools></tools>`, calls as `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, results
//! as `<tool_response>` blocks in a `tool` message.

use super::tool::Tool;
use agentd_wire::hermes::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};
use std::sync::Arc;

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The tool's name.
    pub name: String,
    /// Its arguments.
    pub arguments: serde_json::Value,
}

/// The system prompt: `instructions`, then the tools' signatures. The same inputs always give
/// the same bytes, so every session of an agent shares one cached prefix.
pub fn system_prompt(instructions: &str, tools: &[Arc<dyn Tool>]) -> String {
    let sigs: Vec<String> = tools
        .iter()
        .map(|t| agentd_wire::hermes::signature(t.name(), t.description(), &t.parameters()))
        .collect();
    agentd_wire::hermes::system_prompt(instructions, &sigs)
}

/// The calls in a reply, in order, and the reply's text outside them (trimmed). A call is
/// `<tool_call>` … `\n</tool_call>`: the closing tag starts a line, which a JSON string (whose
/// newlines are escaped) never does, so a string that contains the tag does not end the call.
/// Text that opens a call but does not parse, or never closes it, is left in the text.
pub fn parse_calls(reply: &str) -> (Vec<ToolCall>, String) {
    let close = format!("\n{TOOL_CALL_CLOSE}");
    let close = close.as_str();
    let mut calls = Vec::new();
    let mut text = String::new();
    let mut rest = reply;
    while let Some(i) = rest.find(TOOL_CALL_OPEN) {
        text.push_str(&rest[..i]);
        let body = &rest[i + TOOL_CALL_OPEN.len()..];
        let Some(j) = body.find(close) else {
            rest = &rest[i..];
            break;
        };
        match serde_json::from_str::<serde_json::Value>(body[..j].trim()) {
            Ok(v) if v["name"].is_string() => calls.push(ToolCall {
                name: v["name"].as_str().unwrap_or_default().to_owned(),
                arguments: v.get("arguments").cloned().unwrap_or(serde_json::json!({})),
            }),
            _ => text.push_str(&rest[i..i + TOOL_CALL_OPEN.len() + j + close.len()]),
        }
        rest = &body[j + close.len()..];
    }
    if !rest.contains(TOOL_CALL_OPEN) || calls.is_empty() {
        text.push_str(rest);
    }
    // A reply cut off inside an opening tag leaves its start at the end: not text.
    if let Some(i) = text.rfind('<') {
        if text.len() - i < TOOL_CALL_OPEN.len() && TOOL_CALL_OPEN.starts_with(&text[i..]) {
            text.truncate(i);
        }
    }
    (calls, text.trim().to_owned())
}

/// A tool result as the content of a `tool` message.
pub fn tool_response(name: &str, content: &str) -> String {
    agentd_wire::hermes::tool_response(name, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_parsed_in_order_and_text_kept() {
        let reply = "Let me check.<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>\n";
        let (calls, text) = parse_calls(reply);
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments["x"].as_i64()),
            ("a", Some(1))
        );
        assert_eq!(calls[1].name, "b");
        assert_eq!(text, "Let me check.");
        let (calls, text) = parse_calls("no calls here");
        assert!(calls.is_empty());
        assert_eq!(text, "no calls here");
        let (calls, text) = parse_calls("<tool_call>\nnot json\n</tool_call>");
        assert!(calls.is_empty() && text.contains("not json"));
        let (calls, _) = parse_calls(
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"na",
        );
        assert_eq!(calls.len(), 1);
        // A closing tag inside a JSON string does not end the call.
        let reply = "<tool_call>\n{\"name\": \"e\", \"arguments\": {\"x\": \"}}</tool_call> hi\"}}\n</tool_call>\n";
        let (calls, _) = parse_calls(reply);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].arguments["x"], "}}</tool_call> hi");
        // A reply cut inside the next opening tag.
        let (calls, text) =
            parse_calls("<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool");
        assert_eq!((calls.len(), text.as_str()), (1, ""));
        let (_, text) = parse_calls("a < b");
        assert_eq!(text, "a < b");
    }
}
