//! End to end: `agentd serve` on a temporary Unix socket with the real model, driven through the
//! SDK client: generation and prefix sharing, chat messages, bad input on every RPC, a second
//! daemon on the same socket, a stale socket, limits, 64 clients at once, a client that goes
//! away mid-stream or is killed, SIGTERM mid-generation, and the overhead benchmark.

mod common;

use agentd_sdk::{Client, Error, Event, FinishReason, GenerateOptions};
use common::{chatml, model, run, spawn, Daemon};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_generates_and_shares_prefixes_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("agentd.sock");
    let d = Daemon::start(&socket, &[]).await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    let dir_mode = std::fs::metadata(socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700, "socket directory mode {dir_mode:o}");

    let c = Client::connect(&d.socket).await.unwrap();
    let info = c.model_info().await.unwrap();
    assert_eq!(
        (info.context_length, info.layers, info.kv_heads),
        (8192, 30, 3)
    );
    let system = c
        .tokenize(
            "<|im_start|>system\nYou are a terse assistant. Answer in one short sentence.<|im_end|>\n",
            true,
        )
        .await
        .unwrap();
    let prefix = c.register_prefix(system.clone()).await.unwrap();
    // Eight sessions from the prefix, concurrently.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let q = c
                .tokenize(&chatml(&format!("What is {i} plus {i}?")), true)
                .await
                .unwrap();
            let s = c.create_session(Some(prefix), q).await.unwrap();
            let stream = s
                .generate(&GenerateOptions::greedy().max_tokens(12))
                .await
                .unwrap();
            let out = run(stream).await;
            (s, out)
        }));
    }
    let mut sessions = Vec::new();
    for t in tasks {
        let (s, (text, usage)) = t.await.unwrap();
        assert!(!text.trim().is_empty(), "empty reply");
        assert!(usage.cached_tokens as usize >= system.len(), "{usage:?}");
        assert!(usage.generated_tokens >= 1 && usage.generated_tokens <= 12);
        sessions.push(s);
    }
    // A fork reuses everything its parent computed.
    let f = sessions[0].fork().await.unwrap();
    let more = c.tokenize(&chatml("And times two?"), true).await.unwrap();
    f.append(more).await.unwrap();
    let (_, usage) = run(f
        .generate(&GenerateOptions::greedy().max_tokens(4))
        .await
        .unwrap())
    .await;
    let (parent_log, _) = sessions[0].tokens().await.unwrap();
    assert_eq!(
        usage.cached_tokens as usize,
        parent_log.len() - 1,
        "{usage:?}"
    );
    // ignore_eos: exactly max_tokens tokens, end-of-turn never sampled.
    let (_, usage) = run(f
        .generate(&GenerateOptions::greedy().max_tokens(40).ignore_eos(true))
        .await
        .unwrap())
    .await;
    assert_eq!(
        (usage.generated_tokens, &usage.finish),
        (40, &FinishReason::MaxTokens),
        "{usage:?}"
    );
    let stats = c.stats().await.unwrap();
    assert!(stats.hit_rate > 0.5, "{stats:?}");
    assert_eq!(stats.sessions, 9);
    // `agentd status` reads the same counters over the socket.
    let status = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["tenant"]["sessions"], 9, "{json}");
    assert!(json["cache"]["hit_rate"].as_f64().unwrap() > 0.5, "{json}");
    assert_eq!(json["prefixes"][0]["id"], prefix, "{json}");
    // The operator CLI (this test runs as the daemon's uid): every tenant's counters, then
    // publish, list, unpin.
    let agentd = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
            .args(args)
            .arg("--socket")
            .arg(&d.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let json = agentd(&["status", "--all-tenants"]);
    assert_eq!(json["tenants"][0]["sessions"], 9, "{json}");
    let published = agentd(&["prefix", "publish", &prefix.to_string()])["published"].clone();
    let list = agentd(&["prefix", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    // Ids are random, so the list (ordered by id) can put either first.
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == published)
        .unwrap_or_else(|| panic!("{published} is not listed: {list}"));
    assert_eq!(entry["published"], true, "{list}");
    agentd(&["prefix", "unpin", &published.to_string()]);
    assert_eq!(agentd(&["prefix", "list"]).as_array().unwrap().len(), 1);
    for s in sessions {
        s.close().await.unwrap();
    }
    // SIGTERM with nothing running: exit 0 and the socket is removed.
    d.signal(libc::SIGTERM);
    let socket = d.socket.clone();
    let out = d.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_precise_statuses_and_do_not_disturb_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let q = c.tokenize(&chatml("Hello"), true).await.unwrap();
    let s = c.create_session(None, q.clone()).await.unwrap();

    let e = c.create_session(Some(424_242), vec![]).await.unwrap_err();
    assert!(
        matches!(&e, Error::NotFound(m) if m.contains("424242")),
        "{e}"
    );
    let e = c.create_session(None, vec![1, 999_999]).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("999999")),
        "{e}"
    );
    let e = c.create_session(None, vec![1; 9000]).await.unwrap_err();
    assert!(
        matches!(&e, Error::OutOfRange(m) if m.contains("8192")),
        "{e}"
    );
    let e = s.append(vec![]).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("nothing to append")),
        "{e}"
    );
    for (opts, what) in [
        (GenerateOptions::greedy().max_tokens(0), "max_tokens"),
        (GenerateOptions::greedy().max_tokens(100_000), "max_tokens"),
        (GenerateOptions::greedy().temperature(-1.0), "temperature"),
        (GenerateOptions::greedy().top_p(1.5), "top_p"),
        (GenerateOptions::greedy().stop(""), "stop"),
    ] {
        let e = s.generate(&opts).await.expect_err("an error");
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains(what)),
            "{what}: {e}"
        );
    }
    let e = s.rewrite(5, 99_999, vec![]).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("99999")),
        "{e}"
    );
    let e = c.tokenize(&"x".repeat(2 << 20), false).await.unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(_)), "{e}");
    // A busy session refuses a second generation.
    let stream = s
        .generate(&GenerateOptions::greedy().max_tokens(40))
        .await
        .unwrap();
    let e = s
        .generate(&GenerateOptions::greedy())
        .await
        .expect_err("busy");
    assert!(
        matches!(&e, Error::FailedPrecondition(m) if m.contains("busy")),
        "{e}"
    );
    let (text, usage) = run(stream).await;
    assert!(!text.is_empty() && usage.generated_tokens > 0);
    // Closed sessions are gone.
    let id = s.id();
    s.close().await.unwrap();
    let other = c.create_session(None, q).await.unwrap();
    assert_ne!(other.id(), id);
    assert!(c.health().await.unwrap().ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let d = Daemon::start(&socket, &[]).await;
    let second = spawn(&socket, &[]).wait_with_output().unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already listening"), "{err}");
    // The first still serves.
    assert!(Client::connect(&socket)
        .await
        .unwrap()
        .health()
        .await
        .is_ok());
    // A crash leaves the socket file behind; the next daemon replaces it.
    d.signal(libc::SIGKILL);
    let _ = d.wait();
    assert!(socket.exists());
    let d2 = Daemon::start(&socket, &[]).await;
    assert!(Client::connect(&d2.socket)
        .await
        .unwrap()
        .health()
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_its_sequence_and_sigterm_lets_streams_finish() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &["--grace-seconds", "60"]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let q = c
        .tokenize(&chatml("Tell me a long story."), true)
        .await
        .unwrap();
    let s = c.create_session(None, q.clone()).await.unwrap();
    let mut stream = s
        .generate(&GenerateOptions::greedy().max_tokens(2000))
        .await
        .unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Event::Token { .. }))));
    drop(stream);
    let start = Instant::now();
    loop {
        let st = c.stats().await.unwrap();
        if st.running == 0 && st.waiting == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not freed: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGTERM mid-generation: the stream still completes, then the daemon exits 0.
    let s2 = c.create_session(None, q).await.unwrap();
    let mut stream = s2
        .generate(&GenerateOptions::greedy().max_tokens(24))
        .await
        .unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Event::Token { .. }))));
    d.signal(libc::SIGTERM);
    let mut done = None;
    while let Some(ev) = stream.next().await {
        if let Ok(Event::Done(u)) = ev {
            done = Some(u);
        }
    }
    let usage = done.expect("the stream finished after SIGTERM");
    assert_eq!(usage.finish, FinishReason::MaxTokens, "{usage:?}");
    let out = d.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_are_resource_exhausted_with_the_limit_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &dir.path().join("a.sock"),
        &[
            "--max-sessions",
            "3",
            "--max-generations",
            "1",
            "--max-request-tokens",
            "200",
        ],
    )
    .await;
    let c = Client::connect(&d.socket).await.unwrap();
    let q = c.tokenize(&chatml("Count to ten."), true).await.unwrap();
    let a = c.create_session(None, q.clone()).await.unwrap();
    let b = c.create_session(None, q.clone()).await.unwrap();
    let _third = c.create_session(None, q.clone()).await.unwrap();
    let e = c.create_session(None, q.clone()).await.unwrap_err();
    assert!(
        matches!(&e, Error::ResourceExhausted(m) if m.contains("open sessions is limited to 3")),
        "{e}"
    );
    let e = a.fork().await.unwrap_err();
    assert!(matches!(&e, Error::ResourceExhausted(_)), "{e}");
    let e = a
        .generate(&GenerateOptions::greedy().max_tokens(500))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ResourceExhausted(m) if m.contains("limited to 200")),
        "{e}"
    );
    let stream = a
        .generate(&GenerateOptions::greedy().max_tokens(30))
        .await
        .unwrap();
    let e = b
        .generate(&GenerateOptions::greedy().max_tokens(5))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ResourceExhausted(m) if m.contains("concurrent generations is limited to 1")),
        "{e}"
    );
    let (_, usage) = run(stream).await;
    assert!(usage.generated_tokens > 0);
    // Once the first is done, the second may run.
    let (_, usage) = run(b
        .generate(&GenerateOptions::greedy().max_tokens(5))
        .await
        .unwrap())
    .await;
    assert!(usage.generated_tokens > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_on_their_own_connections_stream_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        // Each session on its own connection (its own client).
        let socket = d.socket.clone();
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(&socket).await?;
            let q = c
                .tokenize(&chatml(&format!("Name the number {i}.")), true)
                .await?;
            let s = c.create_session(None, q).await?;
            let mut stream = s
                .generate(&GenerateOptions::default().seed(i).max_tokens(8))
                .await?;
            let mut tokens = 0u32;
            let mut usage = None;
            while let Some(ev) = stream.next().await {
                match ev? {
                    Event::Token { .. } => tokens += 1,
                    Event::Done(u) => usage = Some(u),
                }
            }
            let (log, _) = s.tokens().await?;
            Ok::<_, Error>((tokens, usage.expect("usage"), log.len()))
        }));
    }
    for t in tasks {
        let (tokens, usage, log_len) = t.await.unwrap().expect("no error");
        // Every sampled token was streamed (an end-of-turn token is streamed but not counted),
        // and the session's log holds the prompt plus all of them.
        let eos = u32::from(usage.finish == FinishReason::Eos);
        assert_eq!(tokens, usage.generated_tokens + eos, "{usage:?}");
        assert_eq!(log_len as u32, usage.prompt_tokens + tokens, "{usage:?}");
    }
}

#[test]
fn bench_serve_reports_the_daemon_overhead() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--model")
        .arg(model())
        .args(["bench", "serve", "--iterations", "5"])
        .env("AGENTD_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["iterations"], 5);
    let trip = r["round_trip_p50_ms"].as_f64().unwrap();
    let engine = r["engine_p50_ms"].as_f64().unwrap();
    assert!(trip > 0.0 && engine > 0.0 && engine <= trip, "{r}");
    assert!(r["overhead_p50_ms"].as_f64().unwrap() >= 0.0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_messages_are_rendered_by_the_template_and_content_stays_text() {
    use agentd_sdk::Message;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let system = [Message::system("You are a terse assistant.")];
    let prefix = c.register_prefix_messages(&system).await.unwrap();
    let s = c.create_session(Some(prefix), vec![]).await.unwrap();
    let (prefix_log, _) = s.tokens().await.unwrap();
    // Content that looks like a control token stays text.
    s.append_messages(&[Message::user("Say <|im_start|> back to me.")], true)
        .await
        .unwrap();
    let im_start = c.tokenize("<|im_start|>", true).await.unwrap();
    assert_eq!(im_start.len(), 1);
    let (log, _) = s.tokens().await.unwrap();
    let starts = log.iter().filter(|&&t| t == im_start[0]).count();
    assert_eq!(starts, 3, "system, user and assistant turns only: {log:?}");
    // The same conversation rendered in one go gives the same tokens.
    let whole = c
        .tokenize(
            "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\n",
            true,
        )
        .await
        .unwrap();
    assert_eq!(&log[..whole.len()], &whole[..]);
    let (text, usage) = run(s
        .generate(&GenerateOptions::greedy().max_tokens(16))
        .await
        .unwrap())
    .await;
    assert!(!text.is_empty());
    assert!(
        usage.cached_tokens as usize >= prefix_log.len(),
        "{usage:?}"
    );
    // A second turn continues the same log.
    let before = s.tokens().await.unwrap().0.len();
    let after = s
        .append_messages(&[Message::user("Thanks.")], true)
        .await
        .unwrap();
    assert!(after as usize > before);
    let (_, usage) = run(s
        .generate(&GenerateOptions::greedy().max_tokens(4))
        .await
        .unwrap())
    .await;
    assert!(usage.cached_tokens as usize >= before - 1, "{usage:?}");
    // Bad input.
    let e = c.register_prefix_messages(&[]).await.unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(_)), "{e}");
    let mut raw = common::raw_client(&d.socket).await;
    let bad_role = agentd_sdk::proto::AppendRequest {
        session_id: s.id(),
        tokens: vec![],
        messages: vec![agentd_sdk::proto::Message {
            role: "wizard".into(),
            content: "hi".into(),
        }],
        add_generation_prompt: false,
    };
    let st = raw.append(bad_role).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("wizard"), "{}", st.message());
    let both = agentd_sdk::proto::AppendRequest {
        session_id: s.id(),
        tokens: vec![1],
        messages: vec![agentd_sdk::proto::Message {
            role: "user".into(),
            content: "hi".into(),
        }],
        add_generation_prompt: false,
    };
    let st = raw.append(both).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
}

/// The client side of [`a_killed_client_frees_its_sequence`]: runs only when re-executed with
/// `AGENTD_TEST_KILLED_SOCKET` set; streams until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_child() {
    let Some(socket) = std::env::var_os("AGENTD_TEST_KILLED_SOCKET") else {
        return;
    };
    let c = Client::connect(PathBuf::from(socket)).await.unwrap();
    let q = c
        .tokenize(&chatml("Write a very long poem."), true)
        .await
        .unwrap();
    let s = c.create_session(None, q).await.unwrap();
    let mut stream = s
        .generate(&GenerateOptions::greedy().max_tokens(4000))
        .await
        .unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Event::Token { .. }))));
    println!("STREAMING");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_frees_its_sequence() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("a.sock"), &[]).await;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "killed_client_child", "--nocapture"])
        .env("AGENTD_TEST_KILLED_SOCKET", &d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let streaming = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("STREAMING"))
    });
    assert!(streaming.join().unwrap(), "the child never streamed");
    let c = Client::connect(&d.socket).await.unwrap();
    assert_eq!(c.stats().await.unwrap().running, 1);
    child.kill().unwrap(); // SIGKILL: no goodbye from the client
    child.wait().unwrap();
    let start = Instant::now();
    loop {
        let st = c.stats().await.unwrap();
        if st.running == 0 && st.waiting == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not freed: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
