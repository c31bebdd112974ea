//! Constrained decoding with llguidance: a JSON schema, a Lark grammar, or tool calls
//! (Hermes-style `<tool_call>{"name": …, "arguments": {…}}</tool_call>` whose JSON must match one
//! of the tools' schemas). Before each sampled token the grammar's mask removes every token it
//! does not allow; after it, the token advances the grammar.

pub mod limits;
mod tok_env;

pub use limits::ConstraintLimits;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

use crate::tokenizer::GgufTokenizer;

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
    /// The grammar library panicked on this constraint. `detail` (the panic's message, which
    /// holds the library's internal state) is for the log, not for the client.
    #[error("the grammar engine could not compile this constraint")]
    Crashed {
        /// The panic's message.
        detail: String,
    },
}

/// The longest message taken from the grammar library into an error: its messages can hold
/// the whole grammar and the parser's state.
const MAX_LIBRARY_MESSAGE: usize = 512;

/// A message from the grammar library, cut to its first line and [`MAX_LIBRARY_MESSAGE`] bytes.
fn library_message(e: impl std::fmt::Display) -> String {
    let full = e.to_string();
    let line = full.lines().next().unwrap_or_default();
    let mut end = line.len().min(MAX_LIBRARY_MESSAGE);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    if end < full.len() {
        format!("{}…", &line[..end])
    } else {
        full
    }
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
        // Bounded repetition: llguidance factors it into O(log n) rules, where nesting one
        // optional group per call hit its nesting limit at 30 calls.
        (true, n) => format!("start: call{{1,{n}}}"),
        (false, n) => format!("start: TEXT? call{{0,{n}}}"),
    };
    Ok(format!(
        "{start}\ncall: \"{open}\\n\" args \"\\n{close}\\n\"\nargs: %json {json}\nTEXT: /[^<]+/\n"
    ))
}

/// The largest cap on calls per reply a request may set.
pub const MAX_TOOL_CALLS: usize = 64;

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
    limits: ConstraintLimits,
}

impl ConstraintFactory {
    /// A factory for `tokenizer` (any vocabulary kind: the trie is built from
    /// [`GgufTokenizer::token_bytes`]), whose end of turn is its EOS, for logits of `vocab`
    /// entries.
    pub fn new(tokenizer: Arc<GgufTokenizer>, vocab: usize) -> Result<Self, ConstraintError> {
        let unavailable = |e: anyhow::Error| ConstraintError::Unavailable(e.to_string());
        let env = tok_env::tok_env(tokenizer, vocab)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(unavailable)?;
        factory.quiet();
        // Errors without the grammar and the parser's state in them (they reach clients).
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory: Arc::new(factory),
            vocab,
            limits: ConstraintLimits::default(),
        })
    }

    /// The bounds every constraint is checked against before it is compiled.
    pub fn limits(&self) -> &ConstraintLimits {
        &self.limits
    }

    /// A fresh constraint for one generation: the spec checked against [`Self::limits`],
    /// compiled, and its first token mask computed, so that a constraint that cannot work
    /// fails here, before the generation starts, and not at its first token.
    pub fn constraint(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        self.limits.check(spec)?;
        let grammar = spec.grammar()?;
        // llguidance asserts on some inputs (more than u16::MAX symbols in a lexeme class,
        // say): a panic there is this request's failure, not the daemon's.
        let compiled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let parser = self
                .factory
                .create_parser(grammar)
                .map_err(|e| ConstraintError::Invalid(library_message(e)))?;
            let mut matcher = Matcher::new(Ok(parser));
            if let Some(e) = matcher.get_error() {
                return Err(ConstraintError::Invalid(library_message(e)));
            }
            let first = matcher
                .compute_mask_or_eos()
                .map_err(|e| ConstraintError::Invalid(library_message(e)))?;
            if first.is_zero() {
                return Err(ConstraintError::Invalid(
                    "the constraint allows no output at all".into(),
                ));
            }
            probe(&matcher, &first)?;
            Ok((matcher, first))
        }));
        let (matcher, first) = compiled.map_err(|panic| ConstraintError::Crashed {
            detail: panic_message(&panic),
        })??;
        Ok(Constraint {
            matcher,
            vocab: self.vocab,
            first_mask: Some(first),
            mask_seconds: 0.0,
        })
    }
}

/// How many tokens [`probe`] walks a copy of a fresh constraint through.
const PROBE_STEPS: usize = 4;

/// Walks a copy of `matcher` a few tokens ahead (the first token each mask allows) so that a
/// grammar whose parser blows its limits on its first tokens (a chain of rules that doubles at
/// every link, say) fails at compile time, not in the stream.
fn probe(matcher: &Matcher, first: &llguidance::toktrie::SimpleVob) -> Result<(), ConstraintError> {
    let mut copy = matcher.deep_clone();
    let mut mask = first.clone();
    for _ in 0..PROBE_STEPS {
        let Some(token) = mask.first_bit_set() else {
            break;
        };
        copy.consume_token(token as u32)
            .map_err(|e| ConstraintError::Invalid(library_message(e)))?;
        if copy.is_stopped() {
            break;
        }
        mask = copy
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Invalid(library_message(e)))?;
    }
    Ok(())
}

/// The message a caught panic carried.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// One generation's grammar state.
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
    /// The mask computed when the constraint was compiled, used for the first token.
    first_mask: Option<llguidance::toktrie::SimpleVob>,
    /// Time spent computing masks and advancing the grammar.
    pub mask_seconds: f64,
}

impl Constraint {
    /// Sets every logit the grammar does not allow next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let t0 = std::time::Instant::now();
        let mask = match self.first_mask.take() {
            Some(m) => m,
            None => self
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| ConstraintError::Failed(library_message(e)))?,
        };
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
            .map_err(|e| ConstraintError::Failed(library_message(e)));
        self.mask_seconds += t0.elapsed().as_secs_f64();
        r
    }

    /// Whether the grammar is complete and allows nothing more.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod fuzz_tests;

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
        assert!(g.starts_with("start: call{1,3}\n"), "{g}");
        assert!(tool_call_grammar(&add, true, MAX_TOOL_CALLS).is_ok());
        let e = tool_call_grammar(&add, true, u32::MAX as usize).unwrap_err();
        assert!(e.to_string().contains("max_calls"), "{e}");
        let g = tool_call_grammar(&add, false, 1).unwrap();
        assert!(g.starts_with("start: TEXT? call{0,1}\n"), "{g}");
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
