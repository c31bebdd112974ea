//! Bounds a constraint must stay within before it is compiled.
//!
//! Compiling a grammar costs time and memory that grow with its size, its alternatives, its
//! nesting and its repetition counts; a hostile request can make any of them huge while staying
//! under the transport's message limit. Each bound here is checked on the request's own text
//! or JSON in one linear pass, before llguidance sees it, and a violation names the bound and
//! its value. llguidance's own limits (grammar size, lexer fuel, Earley items per mask) back
//! these up inside the compiler and at every mask.

use super::{ConstraintError, ConstraintSpec};
use std::time::Duration;

/// The bounds on one constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstraintLimits {
    /// The longest Lark source, or the longest JSON schema once serialised (all tools' schemas
    /// together for a tool list), in bytes.
    pub max_source_bytes: usize,
    /// The most tools in a tool list.
    pub max_tools: usize,
    /// The most alternatives: `|` in a Lark grammar; `anyOf`/`oneOf`/`allOf` branches and
    /// `enum` values in a schema, counted over the whole schema.
    pub max_alternatives: usize,
    /// The deepest nesting: brackets in a Lark grammar, objects and arrays in a schema.
    pub max_nesting: usize,
    /// The largest repetition count (`x{n}`, `x{n,m}`) in a Lark grammar.
    pub max_repeat: u64,
    /// The longest a compilation (grammar, lexer and the first token mask) may take; checked by
    /// whoever runs the compilation (it cannot be interrupted).
    pub max_compile: Duration,
}

impl Default for ConstraintLimits {
    fn default() -> Self {
        Self {
            max_source_bytes: 256 << 10,
            max_tools: 256,
            max_alternatives: 4096,
            max_nesting: 48,
            max_repeat: 10_000,
            max_compile: Duration::from_secs(5),
        }
    }
}

impl ConstraintLimits {
    /// Checks `spec` against these limits; the error names the limit and the value found.
    pub fn check(&self, spec: &ConstraintSpec) -> Result<(), ConstraintError> {
        match spec {
            ConstraintSpec::Lark(src) => self.check_lark(src),
            ConstraintSpec::JsonSchema(schema) => self.check_schema("the schema", schema),
            ConstraintSpec::ToolCalls { tools, .. } => {
                if tools.len() > self.max_tools {
                    return Err(over("tools in the list", tools.len(), self.max_tools));
                }
                let mut total = 0;
                for t in tools {
                    total += t.name.len();
                    total += json_len(&t.parameters);
                    if total > self.max_source_bytes {
                        return Err(over(
                            "bytes of tool names and schemas",
                            total,
                            self.max_source_bytes,
                        ));
                    }
                }
                let mut alternatives = tools.len();
                for t in tools {
                    let what = format!("the parameters of tool {:?}", short(&t.name));
                    alternatives += self.schema_shape(&what, &t.parameters)?;
                    if alternatives > self.max_alternatives {
                        return Err(over(
                            "alternatives in the tool list",
                            alternatives,
                            self.max_alternatives,
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    fn check_schema(&self, what: &str, schema: &serde_json::Value) -> Result<(), ConstraintError> {
        let bytes = json_len(schema);
        if bytes > self.max_source_bytes {
            return Err(over(
                &format!("bytes in {what}"),
                bytes,
                self.max_source_bytes,
            ));
        }
        let alternatives = self.schema_shape(what, schema)?;
        if alternatives > self.max_alternatives {
            return Err(over(
                &format!("alternatives in {what}"),
                alternatives,
                self.max_alternatives,
            ));
        }
        Ok(())
    }

    /// Checks the nesting of `schema` and counts its alternatives.
    fn schema_shape(
        &self,
        what: &str,
        schema: &serde_json::Value,
    ) -> Result<usize, ConstraintError> {
        // An explicit stack: a hostile schema must not recurse this thread into an overflow.
        let mut stack = vec![(schema, 1usize)];
        let mut alternatives = 0usize;
        while let Some((v, depth)) = stack.pop() {
            if depth > self.max_nesting {
                return Err(over(
                    &format!("levels of nesting in {what}"),
                    depth,
                    self.max_nesting,
                ));
            }
            match v {
                serde_json::Value::Object(obj) => {
                    for key in ["anyOf", "oneOf", "allOf", "enum"] {
                        if let Some(serde_json::Value::Array(items)) = obj.get(key) {
                            alternatives += items.len();
                        }
                    }
                    stack.extend(obj.values().map(|c| (c, depth + 1)));
                }
                serde_json::Value::Array(items) => {
                    stack.extend(items.iter().map(|c| (c, depth + 1)));
                }
                _ => {}
            }
        }
        Ok(alternatives)
    }

    fn check_lark(&self, src: &str) -> Result<(), ConstraintError> {
        if src.len() > self.max_source_bytes {
            return Err(over(
                "bytes in the grammar",
                src.len(),
                self.max_source_bytes,
            ));
        }
        let b = src.as_bytes();
        let (mut alternatives, mut depth, mut deepest) = (0usize, 0usize, 0usize);
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'|' => alternatives += 1,
                b'(' | b'[' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b')' | b']' => depth = depth.saturating_sub(1),
                b'{' => {
                    // A repetition `{n}` or `{n,m}`; anything else (`%json {…}`) is skipped.
                    let end = b[i + 1..]
                        .iter()
                        .position(|&c| !(c.is_ascii_digit() || c == b',' || c == b' '))
                        .map_or(b.len(), |p| i + 1 + p);
                    if end < b.len() && b[end] == b'}' && end > i + 1 {
                        for n in src[i + 1..end].split(',') {
                            let n = n.trim();
                            if n.is_empty() {
                                continue;
                            }
                            let count = n.parse::<u64>().unwrap_or(u64::MAX);
                            if count > self.max_repeat {
                                return Err(ConstraintError::Invalid(format!(
                                    "a repetition count of {} is more than the limit of {}",
                                    short(n),
                                    self.max_repeat
                                )));
                            }
                        }
                    }
                }
                _ => {}
            }
            i += 1;
        }
        if alternatives > self.max_alternatives {
            return Err(over(
                "alternatives (`|`) in the grammar",
                alternatives,
                self.max_alternatives,
            ));
        }
        if deepest > self.max_nesting {
            return Err(over(
                "levels of brackets in the grammar",
                deepest,
                self.max_nesting,
            ));
        }
        Ok(())
    }
}

fn over(what: &str, found: usize, limit: usize) -> ConstraintError {
    ConstraintError::Invalid(format!(
        "the constraint has {found} {what}; the limit is {limit}"
    ))
}

/// The length of `v` serialised as compact JSON.
fn json_len(v: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing a Value to a counter cannot fail.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// `s` cut to a length fit for an error message.
pub(crate) fn short(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constraint::ToolSpec;

    fn check(spec: ConstraintSpec) -> Result<(), String> {
        ConstraintLimits::default()
            .check(&spec)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_lark_grammar_over_a_limit_is_refused_naming_the_limit() {
        let many = format!(
            "start: {}",
            (0..5000)
                .map(|i| format!("\"w{i}\""))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let e = check(ConstraintSpec::Lark(many)).unwrap_err();
        assert!(e.contains("4999 alternatives") && e.contains("4096"), "{e}");
        let e = check(ConstraintSpec::Lark("start: \"a\"{100000000}".into())).unwrap_err();
        assert!(e.contains("100000000") && e.contains("10000"), "{e}");
        let e = check(ConstraintSpec::Lark(
            "start: \"a\"{1, 99999999999999999999999}".into(),
        ))
        .unwrap_err();
        assert!(e.contains("repetition"), "{e}");
        let deep = format!("start: {}\"a\"{}", "(".repeat(60), ")".repeat(60));
        let e = check(ConstraintSpec::Lark(deep)).unwrap_err();
        assert!(e.contains("60 levels"), "{e}");
        let big = format!("start: \"{}\"", "a".repeat(300 << 10));
        let e = check(ConstraintSpec::Lark(big)).unwrap_err();
        assert!(e.contains("bytes in the grammar"), "{e}");
        // Ordinary grammars pass, `%json {…}` braces included.
        check(ConstraintSpec::Lark(
            "start: \"a\"{2,5} x\nx: %json {\"type\": \"integer\"}".into(),
        ))
        .unwrap();
    }

    #[test]
    fn a_schema_over_a_limit_is_refused_naming_the_limit() {
        let branches: Vec<_> = (0..5000).map(|i| serde_json::json!({"const": i})).collect();
        let e = check(ConstraintSpec::JsonSchema(
            serde_json::json!({"anyOf": branches}),
        ))
        .unwrap_err();
        assert!(e.contains("5000 alternatives"), "{e}");
        let mut deep = serde_json::json!({"type": "integer"});
        for _ in 0..60 {
            deep = serde_json::json!({"type": "array", "items": deep});
        }
        let e = check(ConstraintSpec::JsonSchema(deep)).unwrap_err();
        assert!(e.contains("levels of nesting"), "{e}");
        check(ConstraintSpec::JsonSchema(serde_json::json!({"$ref": "#"}))).unwrap();
    }

    #[test]
    fn a_tool_list_over_a_limit_is_refused_with_a_short_message() {
        let tools: Vec<_> = (0..10_000)
            .map(|i| ToolSpec {
                name: format!("tool_{i}"),
                parameters: serde_json::json!({"type": "object"}),
            })
            .collect();
        let e = check(ConstraintSpec::ToolCalls {
            tools,
            required: false,
            max_calls: 0,
        })
        .unwrap_err();
        assert!(e.contains("10000 tools") && e.len() < 200, "{e}");
    }
}
