//! End to end: the SDK's agent loop against the real daemon and model — calls constrained by
//! the daemon, tools run concurrently with results in call order, tool errors and timeouts fed
//! back to the model, every session on the agent's shared prefix.

mod common;

use agentd_sdk::agent::{tool_fn, Agent, AgentEvent, ToolChoice};
use agentd_sdk::{Client, GenerateOptions, Role};
use common::Daemon;
use std::time::Duration;
use tokio_stream::StreamExt;

/// Two integers.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Pair {
    /// The first number.
    a: i64,
    /// The second number.
    b: i64,
}

/// A city.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct City {
    /// The city's name.
    city: String,
}

fn calculator() -> Agent {
    Agent::builder(
        "You are a careful calculator. Use the tools for arithmetic, then state the result.",
    )
    .tool(tool_fn("add", "Adds two integers.", |p: Pair| async move {
        Ok::<_, String>(p.a.saturating_add(p.b).to_string())
    }))
    .tool(tool_fn(
        "multiply",
        "Multiplies two integers.",
        |p: Pair| async move { Ok::<_, String>(p.a.saturating_mul(p.b).to_string()) },
    ))
    .options(GenerateOptions::default().seed(3).max_tokens(80))
    .tool_choice(ToolChoice::RequiredFirst)
    .max_turns(3)
    .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sessions_share_the_prefix_and_run_valid_tool_calls() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let agent = calculator();
    let prefix = agent.prefix(&c).await.unwrap();
    let prefix_tokens = c.list_prefixes(false).await.unwrap()[0].tokens;
    assert_eq!(agent.prefix(&c).await.unwrap(), prefix, "registered once");
    let questions = [
        "What is 12 times 7?",
        "Add 19 and 23.",
        "What is 6 times 9?",
        "Sum 100 and 250.",
    ];
    let mut tasks = Vec::new();
    for q in questions {
        let (agent, c) = (agent.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            let s = agent.session(&c).await.unwrap();
            agent.run(&s, q).await.unwrap()
        }));
    }
    for t in tasks {
        let out = t.await.unwrap();
        // The first turn starts on the shared prefix.
        assert!(
            out.usages[0].cached_tokens >= prefix_tokens,
            "{:?}",
            out.usages[0]
        );
        // The first reply was calls (required); each ran and its result came back.
        let tool_msgs: Vec<_> = out
            .transcript
            .iter()
            .filter(|m| m.role == Role::Tool)
            .collect();
        assert!(!tool_msgs.is_empty(), "{:?}", out.transcript);
        for m in &tool_msgs {
            assert!(m.content.starts_with("<tool_response>"), "{}", m.content);
            assert!(
                !m.content.contains("error:"),
                "a valid call failed: {}",
                m.content
            );
        }
        assert!(out.usages.len() <= 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_errors_and_timeouts_go_back_to_the_model_and_events_stream() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let agent = Agent::builder("You answer questions about the weather using the tools.")
        .tool(tool_fn(
            "forecast",
            "The forecast for a city.",
            |_: City| async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok::<_, String>("sunny".into())
            },
        ))
        .tool(tool_fn(
            "history",
            "Past weather for a city.",
            |c: City| async move { Err::<String, _>(format!("no records for {}", c.city)) },
        ))
        .options(GenerateOptions::default().seed(5).max_tokens(60))
        .tool_choice(ToolChoice::RequiredFirst)
        .tool_timeout(Duration::from_millis(200))
        .max_turns(2)
        .build();
    let s = agent.session(&c).await.unwrap();
    let events: Vec<AgentEvent> = agent
        .run_stream(s, "Will it rain in Oslo tomorrow?".into())
        .collect()
        .await;
    let finished: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::ToolCallFinished {
                result, is_error, ..
            } => Some((result.clone(), *is_error)),
            _ => None,
        })
        .collect();
    assert!(!finished.is_empty(), "{events:?}");
    for (result, is_error) in &finished {
        assert!(is_error, "{result}");
        assert!(
            result.contains("timed out") || result.contains("no records"),
            "{result}"
        );
    }
    assert!(events
        .iter()
        .any(|e| matches!(e, AgentEvent::ToolCallStarted { .. })));
    assert!(events
        .iter()
        .any(|e| matches!(e, AgentEvent::TurnFinished(_))));
    // The run went on after the failed calls (a second generation) and ended normally.
    let Some(AgentEvent::Done(out)) = events.last() else {
        panic!("last event: {:?}", events.last());
    };
    assert_eq!(out.usages.len(), 2, "{:?}", out.transcript);
}
