//! Wire requests → the engine's types: messages (roles checked, their number bounded),
//! sampling parameters (wire zeros meaning "off"), constraints (JSON parsed, the tool list's
//! length bounded before its schemas are), and finish reasons back to the wire. Each refusal is
//! INVALID_ARGUMENT with a short message naming what was wrong.

use super::status;
use agentd_engine::constraint::{ConstraintSpec, ToolSpec};
use agentd_engine::sampling::SamplingParams;
use agentd_engine::FinishReason;
use agentd_wire::proto;
use tonic::Status;

/// The most messages one request may carry.
pub const MAX_MESSAGES: usize = 10_000;

/// Wire messages → chat messages; an unknown role or too many messages is INVALID_ARGUMENT.
pub fn chat_messages(msgs: Vec<proto::Message>) -> Result<Vec<agentd_wire::Message>, Status> {
    use agentd_wire::Role;
    if msgs.len() > MAX_MESSAGES {
        return Err(Status::invalid_argument(format!(
            "{} messages are more than the limit of {MAX_MESSAGES} per request",
            msgs.len()
        )));
    }
    msgs.into_iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "tool" => Role::Tool,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown message role {:?} (system, user, assistant or tool)",
                        status::cap(other)
                    )))
                }
            };
            Ok(agentd_wire::Message::new(role, m.content))
        })
        .collect()
}

/// The request's sampling parameters; absent, agentd's defaults
/// ([`agentd_wire::sampling_defaults`]).
pub fn sampling_params(s: Option<proto::Sampling>) -> SamplingParams {
    let Some(s) = s else {
        return SamplingParams::default();
    };
    let or_one = |x: f32| if x == 0.0 { 1.0 } else { x };
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: or_one(s.top_p),
        min_p: s.min_p,
        repetition_penalty: or_one(s.repetition_penalty),
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        ..SamplingParams::default()
    }
}

/// A wire constraint → the engine's; bad JSON is INVALID_ARGUMENT naming where.
pub fn constraint_spec(c: proto::Constraint) -> Result<ConstraintSpec, Status> {
    use proto::constraint::Kind;
    let json = |what: &str, text: &str| {
        serde_json::from_str::<serde_json::Value>(text).map_err(|e| {
            Status::invalid_argument(status::cap(&format!("{what} is not valid JSON: {e}")))
        })
    };
    match c.kind {
        None => Err(Status::invalid_argument(
            "the constraint is empty: give json_schema, lark or tool_calls",
        )),
        Some(Kind::JsonSchema(s)) => Ok(ConstraintSpec::JsonSchema(json("json_schema", &s)?)),
        Some(Kind::Lark(g)) => Ok(ConstraintSpec::Lark(g)),
        Some(Kind::ToolCalls(t)) => {
            let limit = agentd_engine::constraint::ConstraintLimits::default().max_tools;
            if t.tools.len() > limit {
                return Err(Status::invalid_argument(format!(
                    "the constraint has {} tools in the list; the limit is {limit}",
                    t.tools.len()
                )));
            }
            let tools = t
                .tools
                .into_iter()
                .map(|tool| {
                    let what = format!("the parameters of tool {:?}", status::cap(&tool.name));
                    Ok(ToolSpec {
                        parameters: json(&what, &tool.parameters_json)?,
                        name: tool.name,
                    })
                })
                .collect::<Result<Vec<_>, Status>>()?;
            Ok(ConstraintSpec::ToolCalls {
                tools,
                required: t.required,
                max_calls: t.max_calls as usize,
            })
        }
    }
}

/// A finish reason as the wire's `finish_reason` and `stop` fields.
pub fn finish_fields(f: &FinishReason) -> (String, String) {
    match f {
        FinishReason::Eos => ("eos".into(), String::new()),
        FinishReason::Stop(s) => ("stop".into(), s.clone()),
        FinishReason::MaxTokens => ("max_tokens".into(), String::new()),
        FinishReason::ContextFull => ("context_full".into(), String::new()),
        FinishReason::Cancelled => ("cancelled".into(), String::new()),
    }
}

/// The shared tier's counters for the Stats RPC.
pub(crate) fn shared_tier_stats(s: agentd_scheduler::SharedTierStats) -> proto::SharedTierStats {
    proto::SharedTierStats {
        exported_pages: s.exported_pages,
        export_dropped_pages: s.export_dropped_pages,
        export_failed_pages: s.export_failed_pages,
        lookups: s.lookups,
        lookup_pages: s.lookup_pages,
        hit_pages: s.hit_pages,
        damaged_pages: s.damaged_pages,
        failures: s.failures,
        loaded_tokens: s.loaded_tokens,
    }
}
