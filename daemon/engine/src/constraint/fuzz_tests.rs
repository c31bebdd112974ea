//! The constraint compiler on generated hostile inputs (a bounded fuzz run in every test run):
//! random Lark grammars and JSON schemas built from the shapes that broke it — many
//! alternatives, deep nesting, huge repetition counts, rule chains, self-references, regexes —
//! and random bytes. Whatever the input, compiling ends (in time) with a constraint or an
//! error whose message is short and holds no panic text; it never panics.

use super::{ConstraintError, ConstraintSpec, ToolSpec};
use crate::LoadedModel;
use proptest::prelude::*;
use std::time::{Duration, Instant};

fn engine() -> &'static LoadedModel {
    crate::test_model::default_engine()
}

/// A Lark expression of depth at most `depth`.
fn lark_expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        "[a-z]{1,3}".prop_map(|s| format!("\"{s}\"")),
        Just("/[0-9]+/".to_owned()),
        Just("/(a|b)*c/".to_owned()),
        Just("r1".to_owned()),
        Just("r2".to_owned()),
        Just("%json {\"type\": \"integer\"}".to_owned()),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..8).prop_map(|v| v.join(" | ")),
            prop::collection::vec(inner.clone(), 1..4).prop_map(|v| v.join(" ")),
            inner.clone().prop_map(|e| format!("({e})")),
            (inner.clone(), prop_oneof![Just("*"), Just("+"), Just("?")])
                .prop_map(|(e, op)| format!("({e}){op}")),
            (inner, 0u64..200_000_000).prop_map(|(e, n)| format!("({e}){{{n}}}")),
        ]
    })
}

/// A Lark grammar: a start rule, two helper rules (possibly recursive), and sometimes a chain
/// of rules that doubles at each link.
fn lark() -> impl Strategy<Value = String> {
    (lark_expr(), lark_expr(), lark_expr(), 0usize..48).prop_map(|(start, r1, r2, chain)| {
        let rules = format!("r1: {r1}\nr2: {r2} | r1\n");
        if chain == 0 {
            return format!("start: {start}\n{rules}");
        }
        let mut g = format!("start: c0\n{rules}");
        for i in 0..chain {
            g.push_str(&format!("c{i}: c{} c{}\n", i + 1, i + 1));
        }
        g.push_str(&format!("c{chain}: {start}\n"));
        g
    })
}

/// A JSON schema of bounded depth, with the keywords that cost the compiler most.
fn schema() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::json!({"type": "integer"})),
        Just(serde_json::json!({"type": "string", "maxLength": 12})),
        Just(serde_json::json!({"type": "string", "pattern": "^(a|b)+$"})),
        Just(serde_json::json!({"$ref": "#"})),
        Just(serde_json::json!({"type": "boolean"})),
        (0u64..u64::MAX).prop_map(|n| serde_json::json!({"type": "string", "minLength": n})),
        prop::collection::vec("[a-z]{1,6}", 1..50).prop_map(|v| serde_json::json!({"enum": v})),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..6)
                .prop_map(|v| serde_json::json!({"anyOf": v})),
            prop::collection::vec(inner.clone(), 1..4)
                .prop_map(|v| serde_json::json!({"allOf": v})),
            inner
                .clone()
                .prop_map(|v| serde_json::json!({"type": "array", "items": v, "maxItems": 3})),
            prop::collection::vec(("[a-z]{1,5}", inner), 1..5).prop_map(|kv| {
                let props: serde_json::Map<_, _> = kv.into_iter().collect();
                let required: Vec<_> = props.keys().cloned().collect();
                serde_json::json!({"type": "object", "properties": props, "required": required})
            }),
        ]
    })
}

fn spec() -> impl Strategy<Value = ConstraintSpec> {
    prop_oneof![
        lark().prop_map(ConstraintSpec::Lark),
        ".{0,200}".prop_map(ConstraintSpec::Lark),
        schema().prop_map(ConstraintSpec::JsonSchema),
        (
            prop::collection::vec(schema(), 1..4),
            any::<bool>(),
            0usize..80
        )
            .prop_map(|(params, required, max_calls)| ConstraintSpec::ToolCalls {
                tools: params
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| ToolSpec {
                        name: format!("tool_{i}"),
                        parameters: serde_json::json!({"type": "object", "properties": {"x": p}}),
                    })
                    .collect(),
                required,
                max_calls,
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn compiling_any_constraint_ends_in_time_without_a_panic(spec in spec()) {
        let factory = engine().constraint_factory().expect("factory");
        let t0 = Instant::now();
        match factory.constraint(&spec) {
            Ok(mut c) => {
                // The first mask was computed at compile time; one more step must work too.
                let mut logits = vec![0.0f32; engine().model.config().vocab];
                c.mask(&mut logits).expect("the first mask");
            }
            Err(ConstraintError::Crashed { detail }) => {
                // Caught and reported: allowed, but the client's message holds none of it.
                let shown = ConstraintError::Crashed { detail }.to_string();
                prop_assert!(!shown.contains("panicked"), "{}", shown);
            }
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.len() < 1024, "a message of {} bytes: {}", m.len(), m);
            }
        }
        let took = t0.elapsed();
        prop_assert!(
            took < Duration::from_secs(20),
            "compiling took {:?}: {:?}", took, spec
        );
    }
}

// A chain of rules that doubles at every link compiled, then failed at its first token with
// INTERNAL, after the stream had started.
#[test]
fn a_doubling_chain_of_rules_fails_at_compile_time() {
    let factory = engine().constraint_factory().expect("factory");
    let mut g = String::from("start: r0\n");
    for i in 0..40 {
        g.push_str(&format!("r{i}: r{} r{}\n", i + 1, i + 1));
    }
    g.push_str("r40: \"x\"\n");
    match factory.constraint(&ConstraintSpec::Lark(g)) {
        Err(ConstraintError::Invalid(m)) => assert!(m.len() < 1024, "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("compiled"),
    }
}
