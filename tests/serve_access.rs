//! End to end: who may call `agentd serve` and as which tenant — two Unix users as two
//! tenants through peer credentials, the TOML config under flags, and TCP with bearer tokens.

mod common;

use agentd_sdk::{Client, Error, GenerateOptions};
use common::{chatml, run, spawn, Daemon};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

/// The other tenant's side of [`two_uids_are_two_tenants`]: runs only when re-executed with
/// `AGENTD_TEST_PEER_SOCKET` set (as another Unix user), and fails its process on any surprise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_tenant_client() {
    let Some(socket) = std::env::var_os("AGENTD_TEST_PEER_SOCKET") else {
        return; // Not re-executed: nothing to do.
    };
    let foreign: u64 = std::env::var("AGENTD_TEST_FOREIGN_SESSION")
        .unwrap()
        .parse()
        .unwrap();
    let foreign_prefix: u64 = std::env::var("AGENTD_TEST_FOREIGN_PREFIX")
        .unwrap()
        .parse()
        .unwrap();
    let c = Client::connect(PathBuf::from(socket)).await.unwrap();
    // The first tenant's session and prefix do not exist for this tenant: NOT_FOUND, exactly as
    // for an id that never existed.
    let e = c
        .create_session(Some(foreign_prefix), vec![])
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");
    let e = c.session(foreign).tokens().await.unwrap_err();
    let e_never = c.session(999_999).tokens().await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");
    assert_eq!(
        e.to_string().replace(&foreign.to_string(), "ID"),
        e_never.to_string().replace("999999", "ID")
    );
    let e = c.session(foreign).append(vec![1]).await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");
    // The operator's published prefix is listed and usable; the private one is not listed.
    let published: u64 = std::env::var("AGENTD_TEST_PUBLISHED_PREFIX")
        .unwrap()
        .parse()
        .unwrap();
    let listed = c.list_prefixes(false).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].id == published && listed[0].published && !listed[0].own);
    let from_published = c.create_session(Some(published), vec![9]).await.unwrap();
    let (_, usage) = run(from_published
        .generate(&GenerateOptions::greedy().max_tokens(1))
        .await
        .unwrap())
    .await;
    assert_eq!(usage.cached_tokens, listed[0].tokens, "{usage:?}");
    from_published.close().await.unwrap();
    // Admin calls from a uid that is not an operator are refused, naming the uid.
    let not_operator =
        |e: Error| matches!(&e, Error::PermissionDenied(m) if m.contains("not an operator"));
    assert!(not_operator(c.publish_prefix(published).await.unwrap_err()));
    assert!(not_operator(c.unpin_prefix(published).await.unwrap_err()));
    assert!(not_operator(c.evict_cache(None).await.unwrap_err()));
    assert!(not_operator(c.list_prefixes(true).await.unwrap_err()));
    assert!(not_operator(c.stats_all_tenants().await.unwrap_err()));
    let mine = c.create_session(None, vec![1, 2, 3]).await.unwrap();
    // Its own session works, and its stats show only its own session.
    let (log, _) = mine.tokens().await.unwrap();
    assert_eq!(log, vec![1, 2, 3]);
    assert_eq!(c.stats().await.unwrap().sessions, 1);
    println!("PEER-TENANT-OK");
}

/// Two Unix users are two tenants: the daemon runs with `--tenant-per-uid`, and a second
/// process under another uid (this test binary re-executed as `nobody`, which needs root) cannot
/// see the first tenant's session or prefix. Without root, only the first tenant's side runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_uids_are_two_tenants() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("a.sock");
    let d = Daemon::start(&socket, &["--tenant-per-uid"]).await;
    let c = Client::connect(&socket).await.unwrap();
    let prefix = c.register_prefix(vec![5, 6, 7, 8]).await.unwrap();
    let s = c.create_session(Some(prefix), vec![9]).await.unwrap();
    assert_eq!(c.stats().await.unwrap().sessions, 1);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the second-uid half of this test is skipped");
        return;
    }
    // As the daemon's own uid, this process is an operator: it publishes a copy of its prefix,
    // which shares the KV pages (no page is allocated).
    let free = c.stats().await.unwrap().free_pages;
    let published = c.publish_prefix(prefix).await.unwrap();
    assert_eq!(c.stats().await.unwrap().free_pages, free);
    let all = c.list_prefixes(true).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all
        .iter()
        .all(|p| p.pinned && p.resident_tokens == 4 && p.own));
    const NOBODY: u32 = 65534;
    // Let the other user's group reach the 0660 socket, as an operator would with a group.
    let path = std::ffi::CString::new(socket.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; chown has no memory-safety preconditions.
    assert_eq!(unsafe { libc::chown(path.as_ptr(), 0, NOBODY) }, 0);
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "peer_tenant_client", "--nocapture"])
        .env("AGENTD_TEST_PEER_SOCKET", &socket)
        .env("AGENTD_TEST_FOREIGN_SESSION", s.id().to_string())
        .env("AGENTD_TEST_FOREIGN_PREFIX", prefix.to_string())
        .env("AGENTD_TEST_PUBLISHED_PREFIX", published.to_string())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("PEER-TENANT-OK"),
        "peer client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first tenant's view is unchanged.
    assert_eq!(c.stats().await.unwrap().sessions, 1);
    assert_eq!(s.tokens().await.unwrap().0, vec![5, 6, 7, 8, 9]);
    // The operator sees both tenants' counters, unpins the published copy and evicts the cache
    // it leaves (the private prefix stays pinned and resident).
    let stats = c.stats_all_tenants().await.unwrap();
    assert_eq!(stats.tenants.len(), 2, "{:?}", stats.tenants);
    assert!(stats
        .tenants
        .iter()
        .any(|t| t.tenant == u64::from(NOBODY) && t.sessions == 1));
    c.unpin_prefix(published).await.unwrap();
    let e = c.unpin_prefix(published).await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");
    assert!(c.evict_cache(None).await.unwrap() > 0);
    let left = c.list_prefixes(true).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!((left[0].id, left[0].resident_tokens), (prefix, 4));
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_defaults_that_flags_override() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentd.toml");
    std::fs::write(
        &config,
        "kv_memory = \"128MiB\"\npage_size = 32\n[limits]\nsessions = 2\n",
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    // The file's values apply (the harness's own --kv-memory 256MiB flag beats the file's).
    let d = Daemon::start(&dir.path().join("a.sock"), &["--config", cfg]).await;
    let c = Client::connect(&d.socket).await.unwrap();
    let info = c.model_info().await.unwrap();
    assert_eq!(info.page_size, 32);
    assert_eq!(info.pool_pages as usize, (256 << 20) / (23_040 * 32));
    c.create_session(None, vec![1]).await.unwrap();
    c.create_session(None, vec![1]).await.unwrap();
    let e = c.create_session(None, vec![1]).await.unwrap_err();
    assert!(
        matches!(&e, Error::ResourceExhausted(m) if m.contains("limited to 2")),
        "{e}"
    );
    drop(d);
    // A flag beats the file.
    let d = Daemon::start(
        &dir.path().join("b.sock"),
        &["--config", cfg, "--max-sessions", "3"],
    )
    .await;
    let c = Client::connect(&d.socket).await.unwrap();
    for _ in 0..3 {
        c.create_session(None, vec![1]).await.unwrap();
    }
    drop(d);
    // A [tenants] table admits only the uids it lists.
    std::fs::write(&config, "[tenants]\n4242 = \"someone\"\n").unwrap();
    let d = Daemon::start(&dir.path().join("c.sock"), &["--config", cfg]).await;
    let e = Client::connect(&d.socket)
        .await
        .unwrap()
        .stats()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::PermissionDenied(m) if m.contains("not a tenant")),
        "{e}"
    );
    drop(d);
    // A typo in the file is an error naming it.
    std::fs::write(&config, "kv_memroy = \"1GiB\"\n").unwrap();
    let out = spawn(&dir.path().join("d.sock"), &["--config", cfg])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kv_memroy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_calls_need_a_bearer_token_which_names_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let addr = common::free_loopback_addr();
    let config = dir.path().join("agentd.toml");
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    std::fs::write(
        &config,
        format!(
            "[tenants]\n{uid} = \"ops\"\n[tcp]\nlisten = \"{addr}\"\n[tcp.tokens]\n\"alice-token-0123456789\" = \"alice\"\n"
        ),
    )
    .unwrap();
    let d = Daemon::start(
        &dir.path().join("a.sock"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let alice = Client::connect_tcp(&addr, "alice-token-0123456789")
        .await
        .unwrap();
    let q = alice.tokenize(&chatml("Hi"), true).await.unwrap();
    let s = alice.create_session(None, q).await.unwrap();
    let (text, usage) = run(s
        .generate(&GenerateOptions::greedy().max_tokens(4))
        .await
        .unwrap())
    .await;
    assert!(!text.is_empty() && usage.generated_tokens > 0);
    assert_eq!(alice.stats().await.unwrap().sessions, 1);
    // The local operator (another tenant) cannot see alice's session.
    let ops = Client::connect(&d.socket).await.unwrap();
    let e = ops.session(s.id()).tokens().await.unwrap_err();
    assert!(matches!(&e, Error::NotFound(_)), "{e}");
    assert_eq!(ops.stats().await.unwrap().sessions, 0);
    // A wrong token is refused on every tenant-bound call.
    let mallory = Client::connect_tcp(&addr, "not-a-token-at-all-xx")
        .await
        .unwrap();
    let e = mallory.create_session(None, vec![1]).await.unwrap_err();
    assert!(
        matches!(&e, Error::PermissionDenied(m) if m.contains("bearer")),
        "{e}"
    );
    let e = mallory.session(s.id()).tokens().await.unwrap_err();
    assert!(matches!(&e, Error::PermissionDenied(_)), "{e}");
    // Admin calls are never accepted over TCP, even with a valid token.
    let e = alice.evict_cache(None).await.unwrap_err();
    assert!(
        matches!(&e, Error::PermissionDenied(m) if m.contains("Unix socket")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_group_gives_the_socket_to_a_group_and_an_unknown_one_stops_the_start() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentd.sock");
    let o = Command::new("id").arg("-gn").output().unwrap();
    let group = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    let d = Daemon::start(&socket, &["--socket-group", &group]).await;
    let meta = std::fs::metadata(&d.socket).unwrap();
    // SAFETY: getgid has no preconditions.
    let gid = unsafe { libc::getgid() };
    assert_eq!((meta.gid(), meta.mode() & 0o777), (gid, 0o660));
    drop(d);
    // An unknown group, here from the config file: a clear error naming it, before the model
    // loads, and no socket left behind.
    let config = dir.path().join("agentd.toml");
    std::fs::write(&config, "socket_group = \"no-such-group-for-agentd\"\n").unwrap();
    let out = spawn(
        &dir.path().join("other.sock"),
        &["--config", config.to_str().unwrap()],
    )
    .wait_with_output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("unknown group \"no-such-group-for-agentd\""),
        "{stderr}"
    );
    assert!(!dir.path().join("other.sock").exists());
}
