//! End to end, as a hostile client would try it: constraints built to stall or crash the
//! grammar compiler are refused before their stream starts, with a short message, while another
//! tenant's stream keeps flowing; large requests leave health checks fast; tenants see only
//! their own figures; ids are random; ModelInfo and Tokenize need a tenant and disclose no
//! path; `--log-format json` writes JSON lines.

mod common;

use agentd_sdk::{Client, Error, Event, GenerateOptions, Message};
use common::{run, Daemon};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// Greedy generations on `s`, one after another until `stop` is set, each of up to 64 tokens;
/// returns the longest gap between two tokens of one generation, and the tokens seen.
async fn longest_gap(
    s: agentd_sdk::Session,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Duration, usize) {
    let (mut longest, mut tokens) = (Duration::ZERO, 0);
    while !*stop.borrow() {
        s.append_messages(
            &[Message::user("Count from one to one hundred in words.")],
            true,
        )
        .await
        .unwrap();
        let mut stream = s
            .generate(&GenerateOptions::greedy().max_tokens(64))
            .await
            .unwrap();
        let mut last: Option<Instant> = None;
        while let Some(ev) = stream.next().await {
            match ev.unwrap() {
                Event::Token { .. } => {
                    if let Some(t) = last {
                        longest = longest.max(t.elapsed());
                    }
                    last = Some(Instant::now());
                    tokens += 1;
                }
                Event::Done(_) => break,
            }
        }
    }
    (longest, tokens)
}

/// The constraints that stalled the engine, crashed the grammar library, or failed only after
/// the stream had started, each with what its refusal must mention.
fn hostile() -> Vec<(&'static str, GenerateOptions, &'static str)> {
    let words = |n: usize| {
        (0..n)
            .map(|i| format!("\"w{i}\""))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let branches: Vec<_> = (0..5000).map(|i| json!({"const": i})).collect();
    let mut chain = String::from("start: r0\n");
    for i in 0..40 {
        chain.push_str(&format!("r{i}: r{} r{}\n", i + 1, i + 1));
    }
    chain.push_str("r40: \"x\"\n");
    let tools: Vec<(String, serde_json::Value)> = (0..10_000)
        .map(|i| (format!("tool_{i}"), json!({"type": "object"})))
        .collect();
    vec![
        // 3.5 MB: froze the engine for 103 s.
        (
            "300,000 alternatives",
            GenerateOptions::greedy().lark(&format!("start: {}", words(300_000))),
            "limit",
        ),
        // 0.65 MB: froze the engine for 3.5 s.
        (
            "60,000 alternatives",
            GenerateOptions::greedy().lark(&format!("start: {}", words(60_000))),
            "limit",
        ),
        // Gave INTERNAL after the stream had started.
        (
            "a self-referencing schema",
            GenerateOptions::greedy().json_schema(&json!({"$ref": "#"})),
            "constraint",
        ),
        (
            "an anyOf of 5,000 branches",
            GenerateOptions::greedy().json_schema(&json!({"anyOf": branches})),
            "limit",
        ),
        (
            "an exponential chain of rules",
            GenerateOptions::greedy().lark(&chain),
            "constraint",
        ),
        (
            "a repetition of 100,000,000",
            GenerateOptions::greedy().lark("start: \"a\"{100000000}"),
            "100000000",
        ),
        // Gave a 2 MB message echoing the grammar.
        (
            "10,000 tools",
            GenerateOptions::greedy().tool_calls(&tools, false),
            "10000 tools",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_constraints_are_refused_before_the_stream_and_stall_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let victim = c.create_session(None, vec![]).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(longest_gap(victim, stop_rx));
    // Let the victim's first generation start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attacker = c.create_session(None, vec![]).await.unwrap();
    attacker
        .append_messages(&[Message::user("Hi")], true)
        .await
        .unwrap();
    for (what, opts, mention) in hostile() {
        let t0 = Instant::now();
        match attacker.generate(&opts).await {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains(mention), "{what}: {m}");
                assert!(m.len() < 1024, "{what}: a message of {} bytes", m.len());
                assert!(!m.contains("panicked"), "{what}: {m}");
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(stream) => {
                let (text, usage) = run(stream).await;
                panic!("{what}: accepted; produced {text:?} {usage:?}");
            }
        }
        eprintln!("{what}: refused in {:?}", t0.elapsed());
    }
    stop_tx.send(true).unwrap();
    let (gap, tokens) = watcher.await.unwrap();
    eprintln!("the other stream's longest gap: {gap:?} over {tokens} tokens");
    assert!(tokens > 0);
    assert!(gap < Duration::from_millis(250), "a gap of {gap:?}");
    // The attacker's session still works.
    let (_, usage) = run(attacker
        .generate(&GenerateOptions::greedy().max_tokens(2))
        .await
        .unwrap())
    .await;
    assert!(usage.generated_tokens > 0);
}

// max_calls of 30 or more failed with "lark grammar too deeply nested" (documented maximum 64).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tool_calls_works_up_to_its_documented_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let s = c.create_session(None, vec![]).await.unwrap();
    s.append_messages(&[Message::user("Add 2 and 3 with the tool.")], true)
        .await
        .unwrap();
    let tools = vec![(
        "add".to_owned(),
        json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
               "required": ["a", "b"], "additionalProperties": false}),
    )];
    for n in [1, 30, 64] {
        let opts = GenerateOptions::greedy()
            .max_tokens(24)
            .tool_calls(&tools, true)
            .max_tool_calls(n);
        let (text, usage) = run(s.generate(&opts).await.unwrap()).await;
        assert!(
            text.starts_with("<tool_call>"),
            "max_calls {n}: {text:?} {usage:?}"
        );
    }
    let e = s
        .generate(
            &GenerateOptions::greedy()
                .tool_calls(&tools, true)
                .max_tool_calls(65),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("64")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_leave_health_checks_fast() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    // Eight appends of 3 MiB each: rendered and tokenized (about a second each here), then
    // refused as longer than the context.
    let big = "lorem ipsum dolor sit amet ".repeat((3 << 20) / 27);
    let mut heavy = Vec::new();
    for _ in 0..8 {
        let s = c.create_session(None, vec![]).await.unwrap();
        let big = big.clone();
        heavy.push(tokio::spawn(async move {
            s.append_messages(&[Message::user(big)], true).await
        }));
    }
    let (mut worst, mut checks) = (Duration::ZERO, 0);
    while heavy.iter().any(|h| !h.is_finished()) {
        let t0 = Instant::now();
        c.health().await.unwrap();
        worst = worst.max(t0.elapsed());
        checks += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for h in heavy {
        let e = h.await.unwrap().unwrap_err();
        assert!(matches!(&e, Error::OutOfRange(_)), "{e}");
    }
    eprintln!("{checks} health checks, the slowest {worst:?}");
    // 200,000 empty messages: refused by count, before any rendering.
    let s = c.create_session(None, vec![]).await.unwrap();
    let many = vec![Message::user(""); 200_000];
    let e = s.append_messages(&many, true).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("limit")),
        "{e}"
    );
    assert!(checks > 3, "{checks} checks");
    // A stalled runtime shows as a check waiting out a whole tokenization (about a second);
    // the bound leaves room for the OS scheduler on a loaded two-core machine, where the
    // other tests of this file run their own daemons beside this one.
    assert!(
        worst < Duration::from_millis(250),
        "a health check took {worst:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_figures_and_ids_say_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let addr = common::free_loopback_addr();
    let config = dir.path().join("agentd.toml");
    std::fs::write(
        &config,
        format!(
            "[tcp]\nlisten = \"{addr}\"\n[tcp.tokens]\n\"alice-token-0123456789\" = \"alice\"\n\"bob-token-0123456789xx\" = \"bob\"\n"
        ),
    )
    .unwrap();
    // A stale socket file (nobody listening) makes the daemon log a warning at start.
    let socket = dir.path().join("a.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let d = Daemon::start(
        &socket,
        &["--config", config.to_str().unwrap(), "--log-format", "json"],
    )
    .await;
    let alice = Client::connect_tcp(&addr, "alice-token-0123456789")
        .await
        .unwrap();
    let bob = Client::connect_tcp(&addr, "bob-token-0123456789xx")
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let s = alice.create_session(None, vec![]).await.unwrap();
        ids.push(s.id());
        s.append_messages(&[Message::user("Hi")], true)
            .await
            .unwrap();
        run(s
            .generate(&GenerateOptions::greedy().max_tokens(4))
            .await
            .unwrap())
        .await;
    }
    // Ids are random: consecutive sessions are not neighbours.
    assert!(
        ids.windows(2).all(|w| w[0].abs_diff(w[1]) > 1_000_000),
        "{ids:?}"
    );
    // Bob sees none of alice's work: no pool-wide activity, no steps, no cached tokens.
    let b = bob.stats().await.unwrap();
    assert_eq!(
        (
            b.sessions,
            b.tree_tokens,
            b.steps,
            b.free_pages,
            b.peak_pages,
            b.preemptions
        ),
        (0, 0, 0, 0, 0, 0),
        "{b:?}"
    );
    assert_eq!((b.hit_rate, b.prefill_tokens), (0.0, 0), "{b:?}");
    let a = alice.stats().await.unwrap();
    assert_eq!(a.sessions, 4, "{a:?}");
    assert!(a.prefill_tokens > 0 && a.generated_tokens > 0, "{a:?}");
    // The operator (this process's uid, on the socket) sees the pool.
    let ops = Client::connect(&d.socket).await.unwrap();
    let o = ops.stats().await.unwrap();
    assert!(o.steps > 0 && o.tree_tokens > 0, "{o:?}");
    // ModelInfo and Tokenize need a tenant; Health answers anyone and says nothing about load.
    let stranger = Client::connect_tcp(&addr, "not-a-token-at-all-xx")
        .await
        .unwrap();
    assert!(stranger.health().await.is_ok());
    let e = stranger.model_info().await.unwrap_err();
    assert!(matches!(&e, Error::PermissionDenied(_)), "{e}");
    let e = stranger.tokenize("hello", false).await.unwrap_err();
    assert!(matches!(&e, Error::PermissionDenied(_)), "{e}");
    // ModelInfo names the model and its digest, not its path.
    let info = alice.model_info().await.unwrap();
    assert_eq!(info.name, agentd_engine::model_files::DEFAULT_MODEL_FILE);
    assert_eq!(
        info.sha256,
        agentd_engine::model_files::DEFAULT_MODEL_SHA256
    );
    // The log is JSON lines.
    d.signal(libc::SIGTERM);
    let out = d.wait();
    // Log lines are JSON objects (what `agentd serve` prints for people, "agentd: listening
    // on …", is not a log line).
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logged: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| !l.starts_with("agentd: "))
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    assert!(
        logged
            .iter()
            .any(|l| l["level"] == "WARN" && l["fields"]["message"] == "removing a stale socket"),
        "{stderr}"
    );
}
