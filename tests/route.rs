//! End to end: `agentd route` in front of two real daemons (`--node 1`, `--node 2`), driven by
//! the SDK as one daemon would be — prefix sessions placed where the prefix is, greedy output
//! equal to a daemon's own, fork and close on the session's daemon, a killed daemon's sessions
//! UNAVAILABLE (naming it) while new sessions go to the survivor; daemons sharing a node number
//! refused; the router's own tenancy; with a shared tier on a real Redis Cluster, sessions placed
//! by the daemons' KV events (skipped, saying so, without `redis-server`); and the daemon's
//! delegation headers, which only an operator may send.

mod common;

#[path = "../daemon/kvtier/tests/support/cluster.rs"]
mod cluster;

use agentd_sdk::{Client, Error, Event, GenerateOptions};
use common::{chatml, run, Daemon};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// The node number a session id carries.
fn node_of(id: u64) -> u8 {
    ((id >> 56) & 0x7f) as u8
}

/// An `agentd route` process; killed when dropped.
struct Router {
    child: Child,
    socket: PathBuf,
}

impl Router {
    /// `agentd route` on `socket` in front of `daemons`, once it answers Health as ready.
    async fn start(socket: &Path, daemons: &[&Path], extra: &[&str]) -> Router {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
        cmd.arg("route").arg("--socket").arg(socket);
        for d in daemons {
            cmd.arg("--daemon").arg(format!("unix:{}", d.display()));
        }
        let mut child = cmd
            .args(extra)
            .env("AGENTD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting agentd route");
        let start = Instant::now();
        loop {
            if let Ok(c) = Client::connect(socket).await {
                if c.health().await.is_ok_and(|h| h.ready) {
                    break;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("agentd route exited with {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "agentd route did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Router {
            child,
            socket: socket.to_owned(),
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Greedy text of `n` tokens from a fresh session on `c`: `prefix` (registered there) then
/// `user`.
async fn direct_greedy(c: &Client, prefix: &[u32], user: &[u32], n: u32) -> String {
    let p = c.register_prefix(prefix.to_vec()).await.unwrap();
    let s = c.create_session(Some(p), user.to_vec()).await.unwrap();
    let (text, _) = run(s
        .generate(&GenerateOptions::greedy().max_tokens(n))
        .await
        .unwrap())
    .await;
    s.close().await.unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_behind_the_router_serve_one_prefix_and_survive_one_dying() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let (da, db) = tokio::join!(
        Daemon::start(&a, &["--node", "1"]),
        Daemon::start(&b, &["--node", "2"])
    );
    // One session placed on a daemon costs 100 prompt tokens: the first session from the
    // prefix goes where it is, the second (the prefix is shorter than that) to the other.
    let r = Router::start(
        &dir.path().join("route.sock"),
        &[&a, &b],
        &["--placement", "cache", "--load-weight", "100"],
    )
    .await;
    let c = Client::connect(&r.socket).await.unwrap();
    let health = c.health().await.unwrap();
    assert!(health.ready && health.node.is_none(), "{health:?}");
    assert_eq!(c.model_info().await.unwrap().page_size, 16);
    let (ca, cb) = (
        Client::connect(&a).await.unwrap(),
        Client::connect(&b).await.unwrap(),
    );
    assert_eq!(ca.health().await.unwrap().node, Some(1));

    let system = c
        .tokenize(
            "<|im_start|>system\nYou are a terse assistant. Answer with one short sentence and never use lists.<|im_end|>\n",
            true,
        )
        .await
        .unwrap();
    assert!(system.len() > 16 && system.len() < 100, "{}", system.len());
    let prefix = c.register_prefix(system.clone()).await.unwrap();
    let listed = c.list_prefixes(false).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].id == prefix && listed[0].own && listed[0].tokens == system.len() as u32);
    let on_a = ca.list_prefixes(true).await.unwrap().len();
    let on_b = cb.list_prefixes(true).await.unwrap().len();
    assert_eq!(on_a + on_b, 1, "the prefix is registered on one daemon");
    let holder = if on_a == 1 { 1 } else { 2 };
    let other = 3 - holder;

    let q1 = c
        .tokenize(&chatml("What is the capital of France?"), true)
        .await
        .unwrap();
    let q2 = c
        .tokenize(&chatml("Name a large ocean."), true)
        .await
        .unwrap();
    let s1 = c.create_session(Some(prefix), q1.clone()).await.unwrap();
    assert_eq!(
        node_of(s1.id()),
        holder,
        "the first session goes to the prefix"
    );
    let s2 = c.create_session(Some(prefix), q2.clone()).await.unwrap();
    assert_eq!(
        node_of(s2.id()),
        other,
        "the second goes to the idle daemon"
    );
    // The other daemon got the prefix registered before the session.
    assert_eq!(ca.list_prefixes(true).await.unwrap().len(), 1);
    assert_eq!(cb.list_prefixes(true).await.unwrap().len(), 1);

    // Greedy output through the router equals a daemon's own, on either daemon.
    let greedy = GenerateOptions::greedy().max_tokens(12);
    let (t1, u1) = run(s1.generate(&greedy).await.unwrap()).await;
    let (t2, u2) = run(s2.generate(&greedy).await.unwrap()).await;
    assert!(
        u1.cached_tokens >= 16 && u2.cached_tokens >= 16,
        "{u1:?} {u2:?}"
    );
    let direct = match holder {
        1 => &ca,
        _ => &cb,
    };
    assert_eq!(t1, direct_greedy(direct, &system, &q1, 12).await);
    assert_eq!(t2, direct_greedy(direct, &system, &q2, 12).await);

    // Dropping a stream through the router cancels the generation on the daemon: the session
    // is idle again at once (a busy session refuses a rewrite), long before 400 tokens.
    let before = s1.tokens().await.unwrap().0.len();
    let mut long = s1
        .generate(&GenerateOptions::greedy().max_tokens(400).ignore_eos(true))
        .await
        .unwrap();
    assert!(matches!(long.next().await, Some(Ok(Event::Token { .. }))));
    drop(long);
    let start = Instant::now();
    loop {
        let n = s1.tokens().await.unwrap().0.len() as u32;
        match s1.rewrite(n, n, vec![]).await {
            Ok(_) => break,
            Err(Error::FailedPrecondition(_)) => {
                assert!(start.elapsed() < Duration::from_secs(10), "never cancelled")
            }
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = s1.tokens().await.unwrap().0.len();
    assert!(
        after < before + 200,
        "{before} → {after}: the generation ran on"
    );

    // A fork stays on its session's daemon; closing works through the router.
    let f = s1.fork().await.unwrap();
    assert_eq!(node_of(f.id()), holder);
    assert_eq!(f.tokens().await.unwrap().0, s1.tokens().await.unwrap().0);
    let (_, uf) = run(f
        .generate(&GenerateOptions::greedy().max_tokens(2).ignore_eos(true))
        .await
        .unwrap())
    .await;
    assert_eq!(uf.generated_tokens, 2);
    f.close().await.unwrap();
    assert_eq!(
        c.stats().await.unwrap().sessions,
        2,
        "summed over both daemons"
    );
    let s1_id = s1.id();
    s1.close().await.unwrap();
    let e = c.session(s1_id).tokens().await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");
    // An id no daemon behind the router made is NOT_FOUND, as on a daemon.
    let e = c.session(99 << 56 | 7).tokens().await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");

    // The other daemon dies mid-generation: the stream fails, its sessions are UNAVAILABLE
    // naming it, and new sessions go to the survivor.
    let mut stream = s2
        .generate(&GenerateOptions::greedy().max_tokens(400).ignore_eos(true))
        .await
        .unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Event::Token { .. }))));
    let (victim, victim_socket, survivor) = match other {
        1 => (da, &a, db),
        _ => (db, &b, da),
    };
    victim.signal(libc::SIGKILL);
    let mut failed = None;
    while let Some(ev) = stream.next().await {
        if let Err(e) = ev {
            failed = Some(e);
            break;
        }
    }
    let named = format!("daemon node {other} (unix:{})", victim_socket.display());
    let failed = failed.expect("the stream fails when its daemon dies");
    assert!(
        matches!(&failed, Error::Unavailable(m) if m.contains(&named)),
        "{failed}"
    );
    let e = s2.tokens().await.unwrap_err();
    assert!(
        matches!(&e, Error::Unavailable(m) if m.contains(&named)),
        "{e}"
    );
    for _ in 0..3 {
        let s = c.create_session(Some(prefix), q1.clone()).await.unwrap();
        assert_eq!(node_of(s.id()), holder);
        let (t, _) = run(s.generate(&greedy).await.unwrap()).await;
        assert_eq!(t, t1);
    }
    let h = c.health().await.unwrap();
    assert!(h.ready, "one daemon up is enough");
    assert!(c.stats().await.unwrap().sessions >= 3);
    drop(survivor);
    drop(victim);
}

/// The other side of [`only_an_operator_may_act_as_another_tenant`]: runs only when re-executed
/// as another Unix user with `AGENTD_TEST_DELEGATE_SOCKET` set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegating_peer_client() {
    let Some(socket) = std::env::var_os("AGENTD_TEST_DELEGATE_SOCKET") else {
        return;
    };
    let mut raw = common::raw_client(Path::new(&socket)).await;
    let mut req = tonic::Request::new(agentd_sdk::proto::StatsRequest { all_tenants: false });
    req.metadata_mut()
        .insert("x-agentd-tenant", "0".parse().unwrap());
    let e = raw.stats(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("x-agentd-tenant"), "{e:?}");
    // Without the header it is its own tenant.
    raw.stats(agentd_sdk::proto::StatsRequest { all_tenants: false })
        .await
        .unwrap();
    println!("DELEGATE-REFUSED-OK");
}

/// `msg` sent as tenant `t` (the delegation header).
fn as_tenant<T>(t: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-agentd-tenant", t.parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_operator_may_act_as_another_tenant() {
    use agentd_sdk::proto;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let addr = common::free_loopback_addr();
    let config = dir.path().join("agentd.toml");
    std::fs::write(
        &config,
        format!(
            "tenant_per_uid = true\n[tcp]\nlisten = \"{addr}\"\n[tcp.tokens]\n\"alice-token-0123456789\" = \"alice\"\n"
        ),
    )
    .unwrap();
    let socket = dir.path().join("a.sock");
    let _d = Daemon::start(&socket, &["--config", config.to_str().unwrap()]).await;
    // This process runs as the daemon's uid: an operator, which may act as tenant 5.
    let mut raw = common::raw_client(&socket).await;
    let s = raw
        .create_session(as_tenant(
            "5",
            proto::CreateSessionRequest {
                prefix_id: 0,
                tokens: vec![1, 2, 3],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let r = raw
        .session_tokens(as_tenant("5", proto::SessionRef { session_id: s }))
        .await
        .unwrap();
    assert_eq!(r.into_inner().tokens, vec![1, 2, 3]);
    // As itself (its uid's tenant) the session is someone else's.
    let e = raw
        .session_tokens(proto::SessionRef { session_id: s })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // Acting as a tenant drops operator rights unless asked to keep them.
    let e = raw
        .evict_cache(as_tenant("5", proto::EvictCacheRequest { pages: 0 }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let mut keep = as_tenant("5", proto::EvictCacheRequest { pages: 0 });
    keep.metadata_mut()
        .insert("x-agentd-operator", "1".parse().unwrap());
    raw.evict_cache(keep).await.unwrap();
    let e = raw
        .stats(as_tenant(
            "five",
            proto::StatsRequest { all_tenants: false },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // A TCP caller (a tenant by its token) may not name a tenant.
    let channel = tonic::transport::Endpoint::try_from(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut tcp = proto::agentd_client::AgentdClient::new(channel);
    let mut req = as_tenant("5", proto::SessionRef { session_id: s });
    req.metadata_mut().insert(
        "authorization",
        "Bearer alice-token-0123456789".parse().unwrap(),
    );
    let e = tcp.session_tokens(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("x-agentd-tenant"), "{e:?}");
    // Another Unix user (this test re-executed as `nobody`, which needs root) is refused too.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the second-uid half of this test is skipped");
        return;
    }
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let path = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; chown has no memory-safety preconditions.
    assert_eq!(unsafe { libc::chown(path.as_ptr(), 0, NOBODY) }, 0);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "delegating_peer_client", "--nocapture"])
        .env("AGENTD_TEST_DELEGATE_SOCKET", &socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("DELEGATE-REFUSED-OK"),
        "peer client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_keeps_tenants_apart_and_refuses_daemons_sharing_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let (da, db) = tokio::join!(
        Daemon::start(&a, &["--node", "3"]),
        Daemon::start(&b, &["--node", "3"])
    );
    // Two daemons with one node number: the router refuses to start, naming the problem.
    let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("route")
        .arg("--socket")
        .arg(dir.path().join("dup.sock"))
        .arg("--daemon")
        .arg(format!("unix:{}", a.display()))
        .arg("--daemon")
        .arg(format!("unix:{}", b.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("share a node number") && stderr.contains("node 3"),
        "{stderr}"
    );
    drop(db);

    // Tenancy through the router: its own config (one tenant per uid; alice by bearer token
    // over TCP), whatever the daemon's.
    let addr = common::free_loopback_addr();
    let config = dir.path().join("route.toml");
    std::fs::write(
        &config,
        format!(
            "tenant_per_uid = true\n[tcp]\nlisten = \"{addr}\"\n[tcp.tokens]\n\"alice-token-0123456789\" = \"alice\"\n"
        ),
    )
    .unwrap();
    let r = Router::start(
        &dir.path().join("route.sock"),
        &[&a],
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let alice = Client::connect_tcp(&addr, "alice-token-0123456789")
        .await
        .unwrap();
    let q = alice.tokenize(&chatml("Hi"), true).await.unwrap();
    let prefix = alice.register_prefix(q.clone()).await.unwrap();
    let s = alice.create_session(Some(prefix), vec![]).await.unwrap();
    let (_, usage) = run(s
        .generate(&GenerateOptions::greedy().max_tokens(3).ignore_eos(true))
        .await
        .unwrap())
    .await;
    assert_eq!(usage.generated_tokens, 3);
    assert_eq!(alice.stats().await.unwrap().sessions, 1);
    // The router's operator (this uid, its own tenant) does not see alice's session or
    // prefix, except when listing every tenant's.
    let ops = Client::connect(&r.socket).await.unwrap();
    let e = ops.session(s.id()).tokens().await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");
    let e = ops.create_session(Some(prefix), vec![]).await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");
    assert!(ops.list_prefixes(false).await.unwrap().is_empty());
    let all = ops.list_prefixes(true).await.unwrap();
    assert!(
        all.len() == 1 && !all[0].own && all[0].tenant != 0,
        "{all:?}"
    );
    assert_eq!(ops.stats().await.unwrap().sessions, 0);
    // Admin calls are the router's operators' only.
    let e = alice.evict_cache(None).await.unwrap_err();
    assert!(matches!(&e, Error::PermissionDenied(_)), "{e}");
    ops.evict_cache(None).await.unwrap();
    // An operator publishes alice's prefix: every tenant may use it, and it survives alice
    // dropping her own.
    let published = ops.publish_prefix(prefix).await.unwrap();
    alice.drop_prefix(prefix).await.unwrap();
    let from_published = ops.create_session(Some(published), vec![]).await.unwrap();
    assert_eq!(from_published.tokens().await.unwrap().0, q);
    ops.unpin_prefix(published).await.unwrap();
    let e = ops.unpin_prefix(published).await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");
    drop(da);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_shared_tier_sessions_follow_the_daemons_kv_events() {
    if !cluster::redis_installed() {
        eprintln!("skipped: redis-server and redis-cli are not installed");
        return;
    }
    let redis = cluster::Cluster::start();
    let urls = redis.urls().join(",");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let args_a = ["--node", "1", "--kv-tier", &urls, "--disk-cache", "0"];
    let args_b = ["--node", "2", "--kv-tier", &urls, "--disk-cache", "0"];
    let (da, db) = tokio::join!(Daemon::start(&a, &args_a), Daemon::start(&b, &args_b));
    let r = Router::start(
        &dir.path().join("route.sock"),
        &[&a, &b],
        &["--kv-tier", &urls],
    )
    .await;
    let c = Client::connect(&r.socket).await.unwrap();
    // Each daemon pins a prompt of its own, registered on it directly: the router's registry
    // knows neither; only the daemons' KV events say where each is.
    let rules = |who: &str| -> String {
        (0..8)
            .map(|i| format!("Rule {i} of {who}: check the alerts, then write the ticket. "))
            .collect()
    };
    let mut prompts = Vec::new();
    for (node, socket) in [(1u8, &a), (2u8, &b)] {
        let direct = Client::connect(socket).await.unwrap();
        let tokens = direct
            .tokenize(
                &format!(
                    "<|im_start|>system\n{}<|im_end|>\n",
                    rules(&node.to_string())
                ),
                true,
            )
            .await
            .unwrap();
        assert!(tokens.len() >= 64, "{}", tokens.len());
        direct.register_prefix(tokens.clone()).await.unwrap();
        prompts.push((node, tokens));
    }
    // Until the router's index has the events, placement alternates between the idle daemons
    // (each session is closed before the next); then every session with a daemon's prompt
    // goes to that daemon.
    let start = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < 6 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sessions never followed the KV events"
        );
        // Three sessions in a row per prompt: ties between idle daemons alternate, so this
        // holds only when placement knows where each prompt is.
        let (node, prompt) = &prompts[(in_a_row / 3) % 2];
        let mut tokens = prompt.clone();
        tokens.extend(c.tokenize(&chatml("Any alerts?"), true).await.unwrap());
        let s = c.create_session(None, tokens).await.unwrap();
        let on = node_of(s.id());
        s.close().await.unwrap();
        if on == *node {
            in_a_row += 1;
        } else {
            in_a_row = 0;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop((da, db, redis));
}

/// The SDK's agent loop works through the router unchanged: the calculator agent registers its
/// prefix, learns its template from a probe session, calls its tool and answers, with the
/// sessions spread over two daemons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_runs_through_the_router_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let (da, db) = tokio::join!(
        Daemon::start(&a, &["--node", "1"]),
        Daemon::start(&b, &["--node", "2"])
    );
    let r = Router::start(&dir.path().join("r.sock"), &[&da.socket, &db.socket], &[]).await;
    let c = Client::connect(&r.socket).await.unwrap();
    let calc = agentd_agents::calculator();
    let mut nodes = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let s = calc.session(&c).await.unwrap();
        nodes.insert((s.id() >> 56) & 0x7f);
        let out = calc.run(&s, "What is 12 times 7?").await.unwrap();
        let results: Vec<&str> = out
            .transcript
            .iter()
            .filter(|m| m.role == agentd_sdk::Role::Tool)
            .map(|m| m.content.as_str())
            .collect();
        assert!(
            results.iter().any(|r| r.contains("84")),
            "the tool was called and returned 84: {results:?}"
        );
        s.close().await.unwrap();
    }
    assert_eq!(
        nodes.len(),
        2,
        "least-loaded placement spreads the sessions: {nodes:?}"
    );
}

/// Node numbers outside 0–127 (flag or config file) and daemon addresses the router cannot
/// use are refused at start, each with a message naming what is wrong.
#[test]
fn bad_node_numbers_and_daemon_addresses_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentd.toml");
    std::fs::write(&config, "node = 200\n").unwrap();
    let sock = dir.path().join("a.sock");
    let cases: [(&[&str], &str); 3] = [
        (&["serve", "--node", "128"], "128 is not in 0..=127"),
        (
            &[
                "serve",
                "--socket",
                sock.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            "node = 200",
        ),
        (
            &["route", "--daemon", "tcp://127.0.0.1:5"],
            "bad daemon address",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
            .args(args)
            .env("AGENTD_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
