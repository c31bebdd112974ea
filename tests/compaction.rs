//! End to end: context compression in the SDK's agent loop against the real daemon and model.
//! A daemon serving a 2,048-token context runs an agent whose tool returns long pages, for more
//! turns than the context holds: old results are masked, older turns summarised, the run
//! completes, the prefix stays byte-identical and cached, and no call is parted from its result.

mod common;

use agentd_engine::model::GgufFile;
use agentd_engine::tokenizer::GgufTokenizer;
use agentd_sdk::agent::{tool_fn, Agent, AgentEvent, CompactionKind, ContextPolicy, ToolChoice};
use agentd_sdk::{Client, Error, FinishReason, GenerateOptions};
use common::Daemon;
use tokio_stream::StreamExt;

const CONTEXT: u32 = 2048;

/// A page of the manual.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Page {
    /// The page number, from 1.
    page: u32,
}

/// About 220 tokens of text that differs from page to page.
fn page_text(n: u32) -> String {
    (1..=10)
        .map(|i| {
            format!(
                "Page {n}, line {i}: setting {i} of unit {n} is {}.",
                n * 37 + i * 11
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn reader(policy: ContextPolicy, turns: usize) -> Agent {
    Agent::builder("You read a long manual page by page and report the settings you find.")
        .tool(tool_fn(
            "read_page",
            "Reads one page of the manual.",
            |p: Page| async move { Ok::<_, String>(page_text(p.page)) },
        ))
        .options(GenerateOptions::greedy().max_tokens(64))
        .tool_choice(ToolChoice::Always)
        .max_turns(turns)
        .context(policy)
        .build()
}

fn tokenizer() -> GgufTokenizer {
    let file = GgufFile::open(&common::model()).unwrap();
    GgufTokenizer::from_metadata(file.metadata()).unwrap()
}

/// The log's messages as (role, content), split at `<|im_start|>`.
fn messages(text: &str) -> Vec<(String, String)> {
    text.split("<|im_start|>")
        .skip(1)
        .map(|m| {
            let (role, rest) = m.split_once('\n').unwrap_or((m, ""));
            (role.to_owned(), rest.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_longer_than_the_context_completes_and_the_prefix_still_hits() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = CONTEXT.to_string();
    let d = Daemon::start(&dir.path().join("c.sock"), &["--context", &ctx]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    assert_eq!(c.model_info().await.unwrap().context_length, CONTEXT);
    let turns = 10;
    let agent = reader(ContextPolicy::new().summary_tokens(96), turns);
    agent.prefix(&c).await.unwrap();
    let prefix_len = c.list_prefixes(false).await.unwrap()[0].tokens;
    let probe = agent.session(&c).await.unwrap();
    let (prefix_tokens, _) = probe.tokens().await.unwrap();
    probe.close().await.unwrap();
    assert_eq!(prefix_tokens.len() as u32, prefix_len);

    let s = agent.session(&c).await.unwrap();
    let events: Vec<AgentEvent> = agent
        .run_stream(
            s.clone(),
            "Read pages 1 to 10 of the manual, one page per call.".into(),
        )
        .collect()
        .await;
    let out = match events.last() {
        Some(AgentEvent::Done(out)) => out.clone(),
        other => panic!("the run did not complete: {other:?}"),
    };
    assert_eq!(out.usages.len(), turns, "every turn ran");
    for u in &out.usages {
        assert_ne!(u.finish, FinishReason::ContextFull, "{u:?}");
        assert!(u.prompt_tokens + u.generated_tokens <= CONTEXT, "{u:?}");
    }

    // More tokens went through the session than the context holds.
    let (log, _) = s.tokens().await.unwrap();
    let removed: u32 = out
        .compactions
        .iter()
        .map(|c| c.tokens_before - c.tokens_after)
        .sum();
    let total = log.len() as u32 + removed;
    eprintln!(
        "final log {} tokens, {} compactions removed {removed}, total {total}",
        log.len(),
        out.compactions.len()
    );
    for c in &out.compactions {
        eprintln!("  {c}");
        if let CompactionKind::Summarized { summary, .. } = &c.kind {
            eprintln!("    summary: {summary:?}");
        }
    }
    assert!(total > CONTEXT, "{total} tokens in all");
    let masked = out
        .compactions
        .iter()
        .filter(|c| matches!(c.kind, CompactionKind::Masked { .. }))
        .count();
    let summarized = out.compactions.len() - masked;
    assert!(masked >= 1 && summarized >= 1, "{:?}", out.compactions);

    // After each compaction, the next turn's cached tokens cover the pinned prefix, and the
    // streamed events announced it.
    let mut pending = None;
    let mut checked = 0;
    for e in &events {
        match e {
            AgentEvent::Compacted(c) => {
                assert!(c.start >= prefix_len, "{c}: the prefix was rewritten");
                pending = Some(c.clone());
            }
            AgentEvent::TurnFinished(u) => {
                if let Some(c) = pending.take() {
                    eprintln!(
                        "after {c}: cached {} of {}",
                        u.cached_tokens, u.prompt_tokens
                    );
                    assert!(u.cached_tokens >= prefix_len, "{c}: {u:?}");
                    checked += 1;
                }
            }
            _ => {}
        }
    }
    assert!(
        checked >= 2,
        "{checked} compactions were followed by a turn"
    );

    // The log still starts with the prefix, byte for byte; every reply's calls are followed by
    // their results, masked or whole, and the newest results are whole.
    assert_eq!(log[..prefix_tokens.len()], prefix_tokens[..]);
    let text = tokenizer().decode(&log, false).unwrap();
    let msgs = messages(&text);
    assert_eq!(msgs[0].0, "system");
    assert!(msgs[1].0 == "user" && msgs[1].1.contains("replaced by this summary"));
    assert!(
        msgs[1].1.contains("Read pages 1 to 10"),
        "the request survives: {}",
        msgs[1].1
    );
    let mut i = 2;
    while i < msgs.len() {
        let (role, content) = &msgs[i];
        assert_eq!(role, "assistant", "message {i}: {content}");
        if i + 1 == msgs.len() && content.is_empty() {
            break; // The turn the results opened, which the turn budget ended.
        }
        let calls = content.matches("<tool_call>").count();
        assert!(calls >= 1, "message {i}: {content}");
        for j in 1..=calls {
            let (role, content) = &msgs[i + j];
            assert_eq!(role, "tool", "call {j} of message {i} lost its result");
            assert!(content.contains("<tool_response>"), "{content}");
        }
        i += calls + 1;
    }
    let last_result = msgs.iter().rev().find(|m| m.0 == "tool").unwrap();
    assert!(
        last_result.1.contains("setting 1 of unit"),
        "{}",
        last_result.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masking_keeps_everything_before_the_rewrite_cached() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = CONTEXT.to_string();
    let d = Daemon::start(&dir.path().join("m.sock"), &["--context", &ctx]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let page = c.model_info().await.unwrap().page_size;
    let agent = reader(
        ContextPolicy::new()
            .budget(1800)
            .keep_results(1)
            .summarization(false),
        6,
    );
    let s = agent.session(&c).await.unwrap();
    let events: Vec<AgentEvent> = agent
        .run_stream(s.clone(), "Read pages 1 to 6.".into())
        .collect()
        .await;
    let Some(AgentEvent::Done(out)) = events.last() else {
        panic!("the run did not complete: {:?}", events.last());
    };
    assert_eq!(out.usages.len(), 6);
    assert!(!out.compactions.is_empty());
    // Masking rewrites from an old result on: what comes before it is still cached (to the
    // page), so only the rest is computed again.
    let mut pending: Option<u32> = None;
    for e in &events {
        match e {
            AgentEvent::Compacted(c) => {
                assert!(matches!(c.kind, CompactionKind::Masked { .. }), "{c}");
                eprintln!("{c}");
                // Two compactions with no generation between: the earlier start counts.
                pending = Some(pending.map_or(c.start, |p| p.min(c.start)));
            }
            AgentEvent::TurnFinished(u) => {
                eprintln!("turn: cached {} of {}", u.cached_tokens, u.prompt_tokens);
                if let Some(start) = pending.take() {
                    assert!(u.cached_tokens >= start / page * page, "{start}: {u:?}");
                }
            }
            _ => {}
        }
    }
    let (log, _) = s.tokens().await.unwrap();
    assert!(log.len() as u32 <= 1800);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rewrites_and_contexts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("b.sock"), &["--context", "1024"]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let s = c.create_session(None, vec![1, 2, 3, 4]).await.unwrap();
    let msgs = [agentd_sdk::Message::user("hi")];
    let err = s.rewrite_messages(1, 9, &msgs, false).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("not inside")),
        "{err}"
    );
    let err = s
        .rewrite_messages(
            0,
            1,
            &[agentd_sdk::Message::new(agentd_sdk::Role::Tool, "x")],
            true,
        )
        .await;
    assert!(
        err.is_ok(),
        "a rewrite at 0 renders a whole conversation: {err:?}"
    );
    let mut raw = common::raw_client(&d.socket).await;
    let both = agentd_sdk::proto::RewriteRequest {
        session_id: s.id(),
        start: 0,
        end: 1,
        tokens: vec![5],
        messages: vec![agentd_sdk::proto::Message {
            role: "user".into(),
            content: "x".into(),
        }],
        add_generation_prompt: false,
    };
    let st = raw.rewrite(both.clone()).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("not both"), "{st:?}");
    let prompt_alone = agentd_sdk::proto::RewriteRequest {
        messages: Vec::new(),
        add_generation_prompt: true,
        ..both
    };
    let st = raw.rewrite(prompt_alone).await.unwrap_err();
    assert!(st.message().contains("needs messages"), "{st:?}");
    let err = s.rewrite(0, 1, vec![99_999]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    // The served context is the cap, not the model's 8,192.
    let err = s.rewrite(0, 0, vec![5; 1100]).await.unwrap_err();
    assert!(
        matches!(&err, Error::OutOfRange(m) if m.contains("1024")),
        "{err}"
    );
    drop(d);

    // A context above the model's is refused at start with a message.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--model")
        .arg(common::model())
        .args(["--context", "9000", "generate", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("context of 9000") && err.contains("8192"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_longer_than_the_policy_allows_are_truncated_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("t.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let agent = reader(ContextPolicy::new().max_result_tokens(60), 1);
    let s = agent.session(&c).await.unwrap();
    let out = agent.run(&s, "Read page 3.").await.unwrap();
    // The transcript keeps the whole result; the log holds the cut one. (The page is the one
    // the model asked for: greedy SmolLM2-135M asks for page 1 here, which tests the cut as well.)
    let results: Vec<_> = out
        .transcript
        .iter()
        .filter(|m| m.role == agentd_sdk::Role::Tool)
        .collect();
    assert!(!results.is_empty(), "{:?}", out.transcript);
    let whole = (0..100)
        .map(page_text)
        .find(|p| results[0].content.contains(p))
        .unwrap_or_else(|| panic!("no whole page in the result: {:?}", out.transcript));
    let (log, _) = s.tokens().await.unwrap();
    let text = tokenizer().decode(&log, false).unwrap();
    let tool = messages(&text)
        .into_iter()
        .find(|m| m.0 == "tool")
        .unwrap()
        .1;
    assert!(tool.contains("[truncated: the first "), "{tool}");
    assert!(
        tool.contains(&format!("of {} bytes]", whole.len())),
        "{tool}"
    );
    let content = tool.trim_end().trim_end_matches("<|im_end|>");
    let n = c.tokenize(content, false).await.unwrap().len();
    assert!(n <= 60, "{n} tokens: {content}");
}
