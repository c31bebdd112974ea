//! The service's request decoding on generated hostile input (a bounded fuzz run in every test
//! run): random bytes as protobuf, and well-formed requests with random roles, JSON and
//! grammars, through the same checks the RPCs run before anything reaches the scheduler. None
//! may panic, and every refusal is INVALID_ARGUMENT with a short message.

use crate::request::{chat_messages, constraint_spec, sampling_params};
use agentd_engine::constraint::ConstraintLimits;
use agentd_wire::proto;
use proptest::prelude::*;
use prost::Message as _;

/// Runs a generate request through the service's checks.
fn check_generate(r: proto::GenerateRequest) -> Result<(), tonic::Status> {
    let _ = sampling_params(r.sampling);
    if let Some(c) = r.constraint {
        let spec = constraint_spec(c)?;
        ConstraintLimits::default()
            .check(&spec)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        // Building the grammar text (not compiling it) must not panic either.
        spec.grammar()
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    }
    Ok(())
}

fn refused_well(s: &tonic::Status) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.code(), tonic::Code::InvalidArgument, "{}", s.message());
    prop_assert!(s.message().len() <= 4096, "{} bytes", s.message().len());
    Ok(())
}

fn json_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        Just("{\"$ref\": \"#\"}".to_owned()),
        Just("{\"type\": \"object\"}".to_owned()),
        Just("[1, 2]".to_owned()),
        Just("{\"type\": \"string\", \"maxLength\": 18446744073709551615}".to_owned()),
        (1usize..200).prop_map(|n| format!("{}1{}", "[".repeat(n), "]".repeat(n))),
        (1usize..200).prop_map(|n| format!("{}{{}}{}", "{\"a\":".repeat(n), "}".repeat(n))),
    ]
}

fn constraint() -> impl Strategy<Value = proto::Constraint> {
    use proto::constraint::Kind;
    prop_oneof![
        json_text().prop_map(|s| Some(Kind::JsonSchema(s))),
        ".{0,128}".prop_map(|s| Some(Kind::Lark(s))),
        (
            prop::collection::vec((".{0,12}", json_text()), 0..6),
            any::<bool>(),
            any::<u32>()
        )
            .prop_map(|(tools, required, max_calls)| {
                Some(Kind::ToolCalls(proto::ToolCalls {
                    tools: tools
                        .into_iter()
                        .map(|(name, parameters_json)| proto::Tool {
                            name,
                            description: String::new(),
                            parameters_json,
                        })
                        .collect(),
                    required,
                    max_calls,
                }))
            }),
        Just(None),
    ]
    .prop_map(|kind| proto::Constraint { kind })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_request_checks(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(r) = proto::GenerateRequest::decode(bytes.as_slice()) {
            if let Err(s) = check_generate(r) {
                refused_well(&s)?;
            }
        }
        if let Ok(r) = proto::AppendRequest::decode(bytes.as_slice()) {
            if let Err(s) = chat_messages(r.messages) {
                refused_well(&s)?;
            }
        }
    }

    #[test]
    fn hostile_generate_requests_are_refused_with_short_messages(
        c in constraint(),
        stop in prop::collection::vec(".{0,8}", 0..4),
        temperature in any::<f32>(),
        top_p in any::<f32>(),
    ) {
        let r = proto::GenerateRequest {
            session_id: 1,
            max_tokens: 8,
            sampling: Some(proto::Sampling { temperature, top_p, ..Default::default() }),
            stop,
            constraint: Some(c),
            ignore_eos: false,
        };
        if let Err(s) = check_generate(r) {
            refused_well(&s)?;
        }
    }

    #[test]
    fn messages_with_any_role_are_accepted_or_refused_by_name(
        roles in prop::collection::vec(".{0,10}", 0..8),
    ) {
        let msgs = roles
            .into_iter()
            .map(|role| proto::Message { role, content: "x".into() })
            .collect();
        if let Err(s) = chat_messages(msgs) {
            refused_well(&s)?;
            prop_assert!(s.message().contains("role"), "{}", s.message());
        }
    }
}
