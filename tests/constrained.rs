//! End to end: constrained generation through the real daemon and model — tool calls that always
//! parse and match a tool's schema (a cap on their number ends the reply after the last),
//! JSON-schema output, and bad constraints refused.

mod common;

use agentd_sdk::{Client, Error, FinishReason, GenerateOptions, Message};
use common::{run, Daemon};
use serde_json::{json, Value};

fn tools() -> Vec<(String, Value)> {
    vec![
        (
            "calculate".into(),
            json!({
                "type": "object",
                "properties": { "expression": { "type": "string", "maxLength": 40 } },
                "required": ["expression"],
                "additionalProperties": false,
            }),
        ),
        (
            "get_weather".into(),
            json!({
                "type": "object",
                "properties": {
                    "city": { "type": "string", "maxLength": 30 },
                    "unit": { "enum": ["celsius", "fahrenheit"] },
                },
                "required": ["city", "unit"],
                "additionalProperties": false,
            }),
        ),
    ]
}

fn system() -> Message {
    let list: Vec<Value> = tools()
        .into_iter()
        .map(|(name, params)| json!({"type": "function", "function": {"name": name, "parameters": params}}))
        .collect();
    Message::system(format!(
        "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags. \
         For each function call return a JSON object with the function name and arguments within <tool_call></tool_call> XML tags.\n\
         <tools>\n{}\n</tools>",
        serde_json::to_string(&list).unwrap()
    ))
}

/// Checks one call's JSON against the tools' schemas (by hand, for these two schemas).
fn check_call(json_text: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(json_text).map_err(|e| format!("{e}: {json_text}"))?;
    let obj = v.as_object().ok_or("not an object")?;
    if obj.len() != 2 {
        return Err(format!("keys: {obj:?}"));
    }
    let args = obj["arguments"]
        .as_object()
        .ok_or("arguments not an object")?;
    match obj["name"].as_str() {
        Some("calculate") => {
            let e = args
                .get("expression")
                .and_then(Value::as_str)
                .ok_or("no expression")?;
            if args.len() != 1 || e.chars().count() > 40 {
                return Err(format!("bad calculate args {args:?}"));
            }
        }
        Some("get_weather") => {
            let city = args.get("city").and_then(Value::as_str).ok_or("no city")?;
            let unit = args.get("unit").and_then(Value::as_str).ok_or("no unit")?;
            if args.len() != 2
                || city.chars().count() > 30
                || !["celsius", "fahrenheit"].contains(&unit)
            {
                return Err(format!("bad get_weather args {args:?}"));
            }
        }
        other => return Err(format!("unknown tool {other:?}")),
    }
    Ok(())
}

/// The complete calls in `text` (each checked), and what is left outside them.
fn calls(text: &str) -> (Vec<String>, String) {
    let mut found = Vec::new();
    let mut outside = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("<tool_call>\n") {
        outside.push_str(&rest[..i]);
        let body = &rest[i + "<tool_call>\n".len()..];
        match body.find("\n</tool_call>") {
            Some(j) => {
                found.push(body[..j].to_owned());
                rest = body[j + "\n</tool_call>".len()..].trim_start_matches('\n');
            }
            None => return (found, outside), // cut off by max_tokens
        }
    }
    // A call cut off by max_tokens before its opening tag was complete.
    if !rest.is_empty() && "<tool_call>\n".starts_with(rest) {
        return (found, outside);
    }
    outside.push_str(rest);
    (found, outside)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_always_parse_and_match_a_schema() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let prefix = c.register_prefix_messages(&[system()]).await.unwrap();
    let questions = [
        "What is 17 times 23?",
        "What's the weather in Paris?",
        "How warm is it in Tokyo, in fahrenheit?",
        "Compute 2 to the power of 10.",
        "Is it raining in London?",
        "Add 1234 and 4321.",
        "What is the square root of 144?",
        "Tell me the temperature in Berlin.",
        "Hello! Who are you?",
        "Divide 100 by 7.",
    ];
    let mut complete = 0;
    for (i, q) in questions.iter().enumerate() {
        // (required, max_calls): calls only, text and calls, exactly one call.
        for (required, max_calls) in [(true, 0), (false, 0), (true, 1)] {
            let s = c.create_session(Some(prefix), vec![]).await.unwrap();
            s.append_messages(&[Message::user(*q)], true).await.unwrap();
            let opts = GenerateOptions::default()
                .seed(i as u64)
                .max_tokens(120)
                .tool_calls(&tools(), required)
                .max_tool_calls(max_calls);
            let (text, usage) = run(s.generate(&opts).await.unwrap()).await;
            let (found, outside) = calls(&text);
            for call in &found {
                check_call(call).unwrap_or_else(|e| panic!("{q:?}: {e}\n{text}"));
            }
            assert!(!outside.contains('<'), "{q:?}: stray tag in {text:?}");
            if required {
                assert!(
                    !found.is_empty(),
                    "{q:?}: no complete call in {text:?} ({usage:?})"
                );
                assert!(
                    outside.trim().is_empty(),
                    "{q:?}: text outside calls: {text:?}"
                );
            }
            if max_calls == 1 {
                // The reply ends with its one call: nothing cut off, nothing after it.
                assert_eq!(found.len(), 1, "{q:?}: {text:?}");
                assert_eq!(usage.finish, FinishReason::Eos, "{q:?}: {text:?}");
                assert!(text.trim_end().ends_with("</tool_call>"), "{text:?}");
            }
            assert!(!usage.constraint.is_zero(), "{usage:?}");
            eprintln!(
                "constraint {:.2} ms/token, decode {:.2} ms/token",
                1e3 * usage.constraint.as_secs_f64() / f64::from(usage.generated_tokens.max(1)),
                1e3 * (usage.total.as_secs_f64() - usage.ttft.as_secs_f64())
                    / f64::from(usage.generated_tokens.max(2) - 1)
            );
            complete += found.len();
            s.close().await.unwrap();
        }
    }
    assert!(complete >= questions.len(), "{complete} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_output_and_bad_constraints() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let s = c.create_session(None, vec![]).await.unwrap();
    s.append_messages(
        &[Message::user(
            "How many legs does a spider have? Answer in JSON.",
        )],
        true,
    )
    .await
    .unwrap();
    let schema = json!({
        "type": "object",
        "properties": { "legs": { "type": "integer" }, "animal": { "type": "string", "maxLength": 20 } },
        "required": ["legs", "animal"],
        "additionalProperties": false,
    });
    let (text, usage) = run(s
        .generate(
            &GenerateOptions::greedy()
                .max_tokens(60)
                .json_schema(&schema),
        )
        .await
        .unwrap())
    .await;
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(v["legs"].is_i64() && v["animal"].is_string(), "{v}");
    assert_eq!(usage.finish, FinishReason::Eos, "{usage:?}");
    // Bad constraints are refused before anything runs, and say why.
    let bad = [
        GenerateOptions::greedy().lark("start: /[abc/"),
        GenerateOptions::greedy().lark("   "),
        GenerateOptions::greedy().json_schema(&json!([1, 2])),
        GenerateOptions::greedy().tool_calls(&[], false),
        GenerateOptions::greedy().tool_calls(&[(String::new(), json!({}))], true),
        GenerateOptions::greedy()
            .tool_calls(&tools(), true)
            .max_tool_calls(u32::MAX),
    ];
    for opts in bad {
        match s.generate(&opts).await {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("constraint"), "{m}"),
            Err(e) => panic!("{e}"),
            Ok(stream) => {
                let e = run_err(stream).await;
                panic!("accepted; ended with {e}");
            }
        }
    }
    // The session is still usable.
    let (_, usage) = run(s
        .generate(&GenerateOptions::greedy().max_tokens(2))
        .await
        .unwrap())
    .await;
    assert!(
        matches!(usage.finish, FinishReason::Eos | FinishReason::MaxTokens),
        "{usage:?}"
    );
}

async fn run_err(stream: agentd_sdk::GenerateStream) -> String {
    let (text, usage) = run(stream).await;
    format!("{text:?} {usage:?}")
}
