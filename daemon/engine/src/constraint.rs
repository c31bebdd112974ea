//! Constrained decoding with llguidance: a JSON schema, a Lark grammar, or tool calls
//! (Hermes-style `<tool_call>{"name": …, "arguments": {…}}</tool_call>` whose JSON must match one
//! of the tools' schemas). Before each sampled token the grammar's mask removes every token it
//! does not allow; after it, the token advances the grammar.

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// What a constraint can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// The schema, grammar or tool list is not usable (the message says why).
    #[error("invalid constraint: {0}")]
    Invalid(String),
    /// The tokenizer could not be adapted for constrained decoding.
    #[error("constrained decoding is unavailable for this model: {0}")]
    Unavailable(String),
    /// The grammar reached an error state while generating.
    #[error("the constraint failed while generating: {0}")]
    Failed(String),
}

/// One tool the model may call: its name and the JSON schema of its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSpec {
    /// The tool's name (what goes in `"name"`).
    pub name: String,
    /// JSON schema of `"arguments"` (an object schema).
    pub parameters: serde_json::Value,
}

/// What a generation must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstraintSpec {
    /// The whole output is one JSON value matching this schema.
    JsonSchema(serde_json::Value),
    /// The whole output matches this Lark grammar (llguidance's dialect).
    Lark(String),
    /// Free text without `<`, and tool calls, each `<tool_call>\n{json}\n</tool_call>` with JSON
    /// `{"name": …, "arguments": …}` matching one tool. With `required`, the reply is one or
    /// more calls and nothing else.
    ToolCalls {
        /// The tools.
        tools: Vec<ToolSpec>,
        /// At least one call, and no free text.
        required: bool,
        /// The most calls in the reply (0: any number); the reply ends after the last.
        max_calls: usize,
    },
}

/// The opening and closing tags of a tool call (the wire contract's Hermes format).
pub use agentd_wire::hermes::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};

impl ConstraintSpec {
    /// The llguidance grammar for this constraint.
    pub fn grammar(&self) -> Result<TopLevelGrammar, ConstraintError> {
        match self {
            ConstraintSpec::JsonSchema(schema) => {
                Ok(TopLevelGrammar::from_json_schema(compact(schema.clone())?))
            }
            ConstraintSpec::Lark(src) => {
                if src.trim().is_empty() {
                    return Err(ConstraintError::Invalid("the grammar is empty".into()));
                }
                Ok(TopLevelGrammar::from_lark(src.clone()))
            }
            ConstraintSpec::ToolCalls {
                tools,
                required,
                max_calls,
            } => Ok(TopLevelGrammar::from_lark(tool_call_grammar(
                tools, *required, *max_calls,
            )?)),
        }
    }
}

/// The schema with llguidance told to emit compact, single-line JSON (a small model left free
/// to choose whitespace can emit it forever).
fn compact(mut schema: serde_json::Value) -> Result<serde_json::Value, ConstraintError> {
    let obj = schema
        .as_object_mut()
        .ok_or_else(|| ConstraintError::Invalid("a JSON schema must be an object".into()))?;
    obj.insert(
        "x-guidance".into(),
        serde_json::json!({
            "whitespace_flexible": false,
            "key_separator": ": ",
            "item_separator": ", ",
        }),
    );
    Ok(schema)
}

/// The Lark grammar for tool calls over `tools`.
pub fn tool_call_grammar(
    tools: &[ToolSpec],
    required: bool,
    max_calls: usize,
) -> Result<String, ConstraintError> {
    if tools.is_empty() {
        return Err(ConstraintError::Invalid("the tool list is empty".into()));
    }
    if max_calls > MAX_TOOL_CALLS {
        // The grammar nests one group per call: an unbounded count would be an unbounded
        // grammar.
        return Err(ConstraintError::Invalid(format!(
            "max_calls {max_calls} is more than {MAX_TOOL_CALLS} (0: any number)"
        )));
    }
    let mut calls = Vec::new();
    for t in tools {
        if t.name.is_empty() {
            return Err(ConstraintError::Invalid("a tool has an empty name".into()));
        }
        if !t.parameters.is_object() {
            return Err(ConstraintError::Invalid(format!(
                "tool {:?}: its parameters must be a JSON schema object",
                t.name
            )));
        }
        let mut parameters = t.parameters.clone();
        cap_strings(&mut parameters);
        calls.push(serde_json::json!({
            "type": "object",
            "properties": {
                "name": { "const": t.name },
                "arguments": parameters,
            },
            "required": ["name", "arguments"],
            "additionalProperties": false,
        }));
    }
    let schema = compact(serde_json::json!({ "anyOf": calls }))?;
    let json = serde_json::to_string(&schema).expect("a JSON value serialises");
    let open = TOOL_CALL_OPEN;
    let close = TOOL_CALL_CLOSE;
    let start = match (required, max_calls) {
        (true, 0) => "start: call+".to_owned(),
        (false, 0) => "start: TEXT? call*".to_owned(),
        // At most n: call (call (call)?)? — nested options, one per further call.
        (true, n) => format!("start: {}", at_most(n)),
        (false, n) => format!("start: TEXT? ({})?", at_most(n)),
    };
    Ok(format!(
        "{start}\ncall: \"{open}\\n\" args \"\\n{close}\\n\"\nargs: %json {json}\nTEXT: /[^<]+/\n"
    ))
}

/// The largest cap on calls per reply a request may set.
pub const MAX_TOOL_CALLS: usize = 64;

/// One to `n` calls, as nested optional groups.
fn at_most(n: usize) -> String {
    let mut g = "call".to_owned();
    for _ in 1..n {
        g = format!("call ({g})?");
    }
    g
}

/// The longest string a tool argument may hold when its schema sets no bound of its own.
pub const TOOL_STRING_LIMIT: u64 = 160;

/// Bounds every string in a tool's schema that has no length, enum, const or pattern of its
/// own to [`TOOL_STRING_LIMIT`] characters: a small model that never closes a string would
/// otherwise run to `max_tokens` inside it and leave an unfinished call.
fn cap_strings(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(obj) => {
            let is_string = match obj.get("type") {
                Some(serde_json::Value::String(t)) => t == "string",
                Some(serde_json::Value::Array(ts)) => ts.iter().any(|t| t == "string"),
                _ => false,
            };
            let bounded = ["maxLength", "enum", "const", "pattern"]
                .iter()
                .any(|k| obj.contains_key(*k));
            if is_string && !bounded {
                obj.insert("maxLength".into(), TOOL_STRING_LIMIT.into());
            }
            for v in obj.values_mut() {
                cap_strings(v);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(cap_strings),
        _ => {}
    }
}

/// Builds parsers for one model's tokenizer (made once per engine; building it walks the
/// vocabulary).
pub struct ConstraintFactory {
    factory: Arc<ParserFactory>,
    vocab: usize,
}

impl ConstraintFactory {
    /// A factory for the tokenizer serialised as `tokenizer_json` (Hugging Face format), whose
    /// end of turn is `eos`, for logits of `vocab` entries.
    pub fn new(tokenizer_json: &[u8], eos: u32, vocab: usize) -> Result<Self, ConstraintError> {
        let unavailable = |e: anyhow::Error| ConstraintError::Unavailable(e.to_string());
        let mut bt = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(tokenizer_json)
            .map_err(unavailable)?;
        bt.set_eos_token(eos);
        let env = bt.into_tok_env(Some(vocab)).map_err(unavailable)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(unavailable)?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            vocab,
        })
    }

    /// A fresh constraint for one generation.
    pub fn constraint(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        let grammar = spec.grammar()?;
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ConstraintError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Invalid(e));
        }
        Ok(Constraint {
            matcher,
            vocab: self.vocab,
            mask_seconds: 0.0,
        })
    }
}

/// One generation's grammar state.
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
    /// Time spent computing masks and advancing the grammar.
    pub mask_seconds: f64,
}

impl Constraint {
    /// Sets every logit the grammar does not allow next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let t0 = std::time::Instant::now();
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Failed(e.to_string()))?;
        for (i, l) in logits.iter_mut().enumerate().take(self.vocab) {
            if !mask.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        self.mask_seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Advances the grammar by the sampled token.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        let t0 = std::time::Instant::now();
        let r = self
            .matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Failed(e.to_string()));
        self.mask_seconds += t0.elapsed().as_secs_f64();
        r
    }

    /// Whether the grammar is complete and allows nothing more.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_specs_are_invalid_with_a_reason() {
        let e = tool_call_grammar(&[], false, 0).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let bad = ToolSpec {
            name: "x".into(),
            parameters: serde_json::json!(3),
        };
        assert!(tool_call_grammar(&[bad], true, 0).is_err());
        assert!(ConstraintSpec::JsonSchema(serde_json::json!([1]))
            .grammar()
            .is_err());
        assert!(ConstraintSpec::Lark("  ".into()).grammar().is_err());
        let g = tool_call_grammar(
            &[ToolSpec {
                name: "add".into(),
                parameters: serde_json::json!({"type": "object"}),
            }],
            false,
            0,
        )
        .unwrap();
        assert!(g.starts_with("start: TEXT? call*"), "{g}");
        let add = [ToolSpec {
            name: "add".into(),
            parameters: serde_json::json!({"type": "object"}),
        }];
        let g = tool_call_grammar(&add, true, 3).unwrap();
        assert!(g.starts_with("start: call (call (call)?)?\n"), "{g}");
        assert!(tool_call_grammar(&add, true, MAX_TOOL_CALLS).is_ok());
        let e = tool_call_grammar(&add, true, u32::MAX as usize).unwrap_err();
        assert!(e.to_string().contains("max_calls"), "{e}");
        let g = tool_call_grammar(&add, false, 1).unwrap();
        assert!(g.starts_with("start: TEXT? (call)?\n"), "{g}");
        let mut s = serde_json::json!({"type": "object", "properties": {
            "a": {"type": "string"}, "b": {"type": "string", "maxLength": 5},
            "c": {"type": ["string", "null"]}, "d": {"enum": ["x"]}}});
        cap_strings(&mut s);
        assert_eq!(s["properties"]["a"]["maxLength"], TOOL_STRING_LIMIT);
        assert_eq!(s["properties"]["b"]["maxLength"], 5);
        assert_eq!(s["properties"]["c"]["maxLength"], TOOL_STRING_LIMIT);
        assert!(s["properties"]["d"].get("maxLength").is_none());
    }
}
