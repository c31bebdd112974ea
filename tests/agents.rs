//! End to end: the three agents in agents/ (built only on the SDK) against the real daemon and
//! model. Each transcript is printed (run with --nocapture to read them).

mod common;

use agentd_agents::{calculator, coordinator, fs_researcher};
use agentd_sdk::agent::RunOutput;
use agentd_sdk::{Client, Role};
use common::Daemon;

fn show(name: &str, out: &RunOutput) {
    eprintln!("=== {name} ===");
    for m in &out.transcript {
        eprintln!("[{}] {}", m.role, m.content);
    }
    eprintln!("answer: {}\n", out.answer);
}

fn tool_results(out: &RunOutput) -> Vec<&str> {
    out.transcript
        .iter()
        .filter(|m| m.role == Role::Tool)
        .map(|m| m.content.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_agents_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let files = dir.path().join("notes");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(
        files.join("cache.md"),
        "agentd keeps KV pages in a radix tree.\nPinned prefixes survive restarts on disk.\n",
    )
    .unwrap();
    std::fs::write(
        files.join("limits.md"),
        "Each tenant may open 4096 sessions.\n",
    )
    .unwrap();

    let calc = calculator();
    let s = calc.session(&c).await.unwrap();
    let out = calc.run(&s, "What is 12 times 7?").await.unwrap();
    show("calculator", &out);
    assert!(!tool_results(&out).is_empty());

    let research = fs_researcher(files.clone()).unwrap();
    let s = research.session(&c).await.unwrap();
    let out = research
        .run(&s, "Which file says how many sessions a tenant may open?")
        .await
        .unwrap();
    show("fs-researcher", &out);
    assert!(!tool_results(&out).is_empty());

    let boss = coordinator(c.clone(), files).unwrap();
    let s = boss.session(&c).await.unwrap();
    let out = boss
        .run(
            &s,
            "Ask the calculator for 6 times 7, and the researcher what survives restarts.",
        )
        .await
        .unwrap();
    show("coordinator", &out);
    let results = tool_results(&out);
    assert!(!results.is_empty());
    // Delegated runs came back as results (a sub-agent's answer, or its error as text).
    assert!(results
        .iter()
        .all(|r| r.contains("ask_calculator") || r.contains("ask_researcher")));
    // Every agent session started on its agent's prefix.
    let stats = c.stats().await.unwrap();
    assert!(stats.cached_tokens > 0 && stats.hit_rate > 0.3, "{stats:?}");
}
