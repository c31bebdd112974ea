//! End to end on the catalog's other architectures: Qwen2.5-Coder-0.5B (`qwen2`, byte-level
//! BPE with the qwen2 pre-tokenizer, the GGUF's own Hermes-speaking template) and Gemma-3-270M
//! (`gemma3`: sliding-window layers, QK-norm, a 262k SentencePiece vocabulary, the built-in
//! Gemma template), each pulled through the catalog on first use and served by the real
//! daemon: a greedy answer through the scheduler, the calculator agent's tool loop, and a
//! cache hit that gives the same tokens as the first run. Transcripts are printed (run with
//! --nocapture to read them).

mod common;

use agentd_agents::calculator;
use agentd_sdk::{Client, GenerateOptions, Message, Role};
use common::Daemon;

fn catalog_model(name: &str) -> std::path::PathBuf {
    agentd_engine::catalog::ensure_catalog_model(name, &mut |m| eprintln!("{m}"))
        .unwrap_or_else(|e| panic!("pulling {name}: {e}"))
}

/// One greedy chat answer, and the same again on a second session (a cache hit on the whole
/// prompt): identical text, and the second run's prompt came from the cache.
async fn answer_twice(c: &Client, question: &str) -> String {
    let mut texts = Vec::new();
    for _ in 0..2 {
        let s = c.create_session(None, Vec::new()).await.unwrap();
        s.append_messages(&[Message::user(question)], true)
            .await
            .unwrap();
        let stream = s
            .generate(&GenerateOptions::default().temperature(0.0).max_tokens(40))
            .await
            .unwrap();
        let (text, usage) = common::run(stream).await;
        eprintln!("{question} -> {text:?} ({usage:?})");
        texts.push((text, usage));
    }
    assert_eq!(texts[0].0, texts[1].0, "a cache hit changed the answer");
    assert!(texts[1].1.cached_tokens > 0, "{:?}", texts[1].1);
    texts.remove(0).0
}

/// The calculator agent's run; its tool calls were made (constrained by the daemon) and
/// answered; returns the transcript as text.
async fn calculator_run(c: &Client, question: &str) -> String {
    let agent = calculator();
    let s = agent.session(c).await.unwrap();
    let out = agent.run(&s, question).await.unwrap();
    let mut text = String::new();
    for m in &out.transcript {
        eprintln!("[{}] {}", m.role, m.content);
        text.push_str(&m.content);
        text.push('\n');
    }
    eprintln!("answer: {}", out.answer);
    assert!(
        out.transcript.iter().any(|m| m.role == Role::Tool),
        "no tool was called"
    );
    text + &out.answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen2_answers_and_runs_the_calculator_agent() {
    let model = catalog_model("qwen2.5-coder-0.5b");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_model(&model, &dir.path().join("q.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let text = answer_twice(&c, "What is the capital of France? Answer in one word.").await;
    assert!(text.contains("Paris"), "{text:?}");
    let run = calculator_run(&c, "What is 12 times 7?").await;
    assert!(run.contains("84"), "{run}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_answers_and_runs_the_calculator_agent() {
    let model = catalog_model("gemma3-270m");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_model(&model, &dir.path().join("g.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    // The base (not instruction-tuned) 270M model: the answer is checked for being text the
    // vocabulary decodes and stable across a cache hit, not for its facts.
    let text = answer_twice(&c, "The capital of France is").await;
    assert!(!text.trim().is_empty(), "{text:?}");
    let run = calculator_run(&c, "What is 12 times 7?").await;
    assert!(
        run.contains("<tool_response>") || run.contains("84"),
        "{run}"
    );
}
