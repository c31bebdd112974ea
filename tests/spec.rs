//! Speculative decoding end to end on the real model: two daemons, speculation on and off, run
//! the same prompts (text the model repeats, counting, code, free questions, a JSON schema and
//! tool-call constraints, greedy and seeded sampling); every output must be token-identical,
//! every constrained output valid, and the speculating daemon must have drafted and accepted.

mod common;

use agentd_sdk::{Client, Event, GenerateOptions};
use common::{chatml, raw_client, Daemon};
use tokio_stream::StreamExt;

async fn tokens(c: &Client, prompt: &str, opts: &GenerateOptions) -> (Vec<u32>, String) {
    let toks = c.tokenize(prompt, true).await.unwrap();
    let s = c.create_session(None, toks).await.unwrap();
    let mut stream = s.generate(opts).await.unwrap();
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(ev) = stream.next().await {
        match ev.unwrap() {
            Event::Token { id, text: t } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Done(_) => break,
        }
    }
    s.close().await.unwrap();
    (ids, text)
}

fn cases() -> Vec<(String, GenerateOptions)> {
    let greedy = || GenerateOptions::greedy().max_tokens(64);
    let weather = vec![(
        "get_weather".to_owned(),
        serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false}),
    )];
    vec![
        (chatml("Count from 1 to 40, separated by commas.") + "1, 2, 3, 4, 5,", greedy()),
        (
            chatml("Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.")
                + "apple, banana, cherry,",
            greedy(),
        ),
        (
            chatml("Repeat this code exactly:\nfn main() {\n    let x = 1;\n    let y = 2;\n    println!(\"{}\", x + y);\n}")
                + "fn main() {\n    let x = 1;\n",
            greedy(),
        ),
        (chatml("What is the capital of France?"), greedy()),
        (chatml("Write a haiku about the sea."), greedy()),
        (
            chatml("Ada is 36. Give her record as JSON: {\"name\": \"Ada\", \"age\": 36}."),
            greedy().json_schema(&serde_json::json!({
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"], "additionalProperties": false})),
        ),
        (
            chatml("Get the weather for Paris, then Berlin, then Rome, then Madrid."),
            greedy().tool_calls(&weather, true).max_tool_calls(4),
        ),
        (
            chatml("Tell me a story about a cat who counts: one, two, three."),
            GenerateOptions::default().temperature(0.8).seed(7).max_tokens(64),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_changes_no_token_and_keeps_constrained_output_valid() {
    let dir = tempfile::tempdir().unwrap();
    let on = Daemon::start(&dir.path().join("on.sock"), &["--disk-cache", "0"]).await;
    let off = Daemon::start(
        &dir.path().join("off.sock"),
        &["--disk-cache", "0", "--speculate", "off"],
    )
    .await;
    let (c_on, c_off) = (
        Client::connect(&on.socket).await.unwrap(),
        Client::connect(&off.socket).await.unwrap(),
    );
    for (prompt, opts) in cases() {
        let (a, text) = tokens(&c_on, &prompt, &opts).await;
        let (b, _) = tokens(&c_off, &prompt, &opts).await;
        assert_eq!(a, b, "prompt {prompt:?}: {text:?}");
        if prompt.contains("JSON") {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(v["age"].is_i64(), "{text}");
        }
        if prompt.contains("weather") {
            let calls: Vec<&str> = text.split("<tool_call>\n").skip(1).collect();
            assert!(!calls.is_empty(), "{text}");
            for call in calls {
                let json = call.split("\n</tool_call>").next().unwrap();
                let v: serde_json::Value = serde_json::from_str(json).unwrap();
                assert_eq!(v["name"], "get_weather", "{text}");
                assert!(v["arguments"]["city"].is_string(), "{text}");
            }
        }
    }
    // The daemon's own uid is an operator: the pool-wide speculation counters.
    let mut raw = raw_client(&on.socket).await;
    let stats = raw
        .stats(agentd_sdk::proto::StatsRequest { all_tenants: false })
        .await
        .unwrap()
        .into_inner();
    assert!(
        stats.spec_drafted > 0 && stats.spec_accepted > 0,
        "{stats:?}"
    );
    assert_eq!(
        stats.spec_accepted,
        stats.spec_accepted_at.iter().sum::<u64>()
    );
    // `agentd status` shows them too.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["status", "--socket"])
        .arg(&on.socket)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&common::success_stdout(&status)).unwrap();
    assert_eq!(
        json["speculation"]["accepted"], stats.spec_accepted,
        "{json}"
    );
    let mut raw_off = raw_client(&off.socket).await;
    let stats = raw_off
        .stats(agentd_sdk::proto::StatsRequest { all_tenants: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.spec_drafted, 0);
}
