//! End to end: the shared KV tier on a real six-node Redis Cluster between two daemons with
//! separate data directories (so no shared disk tier). A prefix pinned on the first is exported;
//! the same prompt on the second is served from the tier (cached tokens, the same greedy
//! output); another tenant of the second finds nothing; with Redis gone, the second still
//! serves, computing. Skipped, saying so, only when `redis-server` is not installed.

mod common;

#[path = "../daemon/kvtier/tests/support/cluster.rs"]
mod cluster;

use agentd_sdk::{Client, GenerateOptions, Message, SharedTierStats};
use common::{chatml, run, Daemon};
use std::time::{Duration, Instant};

/// A system prompt of a few hundred tokens (many pages).
fn system_prompt(seed: usize) -> Vec<Message> {
    let body: String = (0..12)
        .map(|i| {
            format!(
                "Rule {i} of set {seed}: answer briefly, cite the file you read, and never invent a tool result. "
            )
        })
        .collect();
    vec![Message::system(format!(
        "You are agent number {seed}. {body}"
    ))]
}

/// The shared tier's counters of the daemon `c` is an operator of.
async fn tier_stats(c: &Client) -> SharedTierStats {
    c.stats()
        .await
        .unwrap()
        .shared_tier
        .expect("the daemon has a shared tier")
}

/// Generates 12 tokens greedily in a new session of `tokens`.
async fn ask(c: &Client, tokens: Vec<u32>) -> (String, agentd_sdk::Usage) {
    let s = c.create_session(None, tokens).await.unwrap();
    let out = run(s
        .generate(&GenerateOptions::greedy().max_tokens(12))
        .await
        .unwrap())
    .await;
    s.close().await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_exported_by_one_daemon_is_served_to_the_same_tenant_on_another() {
    if !cluster::redis_installed() {
        eprintln!("skipped: redis-server and redis-cli are not installed");
        return;
    }
    let t0 = Instant::now();
    let mut redis = cluster::Cluster::start();
    let urls = redis.urls().join(",");
    let dir = tempfile::tempdir().unwrap();
    let addr = common::free_loopback_addr();
    let config = dir.path().join("agentd.toml");
    let bob = "bob-token-0123456789abcdef";
    std::fs::write(
        &config,
        format!("[tcp]\nlisten = \"{addr}\"\n[tcp.tokens]\n\"{bob}\" = \"bob\"\n"),
    )
    .unwrap();
    let (s1, s2) = (dir.path().join("one.sock"), dir.path().join("two.sock"));
    let args1 = ["--kv-tier", &urls];
    let args2 = [
        "--kv-tier",
        &urls,
        "--kv-tier-timeout-ms",
        "300",
        "--config",
        config.to_str().unwrap(),
    ];
    let (d1, d2) = tokio::join!(Daemon::start(&s1, &args1), Daemon::start(&s2, &args2));
    let (c1, c2) = (
        Client::connect(&d1.socket).await.unwrap(),
        Client::connect(&d2.socket).await.unwrap(),
    );

    // Daemon 1: a pinned prefix is exported, whole pages only.
    let prefix = c1
        .register_prefix_messages(&system_prompt(0))
        .await
        .unwrap();
    let prefix_tokens = c1.list_prefixes(false).await.unwrap()[0].tokens;
    let page_size = c1.stats().await.unwrap().page_size;
    let pages = u64::from(prefix_tokens / page_size);
    assert!(pages >= 3, "the prefix spans {pages} whole pages");
    let start = Instant::now();
    while tier_stats(&c1).await.exported_pages < pages {
        assert!(start.elapsed() < Duration::from_secs(20), "not exported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let q = c1
        .tokenize(&chatml("Which file did you read?"), true)
        .await
        .unwrap();
    let s = c1.create_session(Some(prefix), q).await.unwrap();
    let (tokens, _) = s.tokens().await.unwrap();
    let (text1, usage1) = run(s
        .generate(&GenerateOptions::greedy().max_tokens(12))
        .await
        .unwrap())
    .await;
    assert_eq!(
        (usage1.cached_tokens, usage1.tier_cached_tokens),
        (prefix_tokens, 0)
    );

    // Daemon 2, the same tenant: the prompt's whole pages of the prefix come from the tier, and
    // the greedy output is token for token the first daemon's.
    let (text2, usage2) = ask(&c2, tokens.clone()).await;
    assert_eq!(text2, text1, "a tier hit changed the output");
    assert_eq!(
        u64::from(usage2.cached_tokens),
        pages * u64::from(page_size),
        "{usage2:?}"
    );
    assert_eq!(
        usage2.tier_cached_tokens, usage2.cached_tokens,
        "{usage2:?}"
    );
    let st = tier_stats(&c2).await;
    assert_eq!(st.loaded_tokens, pages * u64::from(page_size), "{st:?}");
    assert_eq!((st.hit_pages, st.damaged_pages), (pages, 0), "{st:?}");

    // Another tenant of daemon 2 finds nothing (its namespace has other keys).
    let b = Client::connect_tcp(&addr, bob).await.unwrap();
    let (text_b, usage_b) = ask(&b, tokens.clone()).await;
    assert_eq!(
        (usage_b.cached_tokens, usage_b.tier_cached_tokens),
        (0, 0),
        "{usage_b:?}"
    );
    assert_eq!(text_b, text1);
    assert_eq!(tier_stats(&c2).await.hit_pages, pages);

    // Redis gone: daemon 2 still serves a prompt it has never seen, computing it.
    redis.stop_all();
    let other = c2
        .tokenize(
            &format!(
                "<|im_start|>system\n{}<|im_end|>\n{}",
                system_prompt(1)[0].content,
                chatml("Hello?")
            ),
            true,
        )
        .await
        .unwrap();
    let asked = Instant::now();
    let (text3, usage3) = ask(&c2, other).await;
    assert!(
        !text3.is_empty() && usage3.generated_tokens > 0,
        "{usage3:?}"
    );
    // Only the template's opening is in memory; nothing more came from anywhere.
    assert!(usage3.cached_tokens < page_size, "{usage3:?}");
    assert!(asked.elapsed() < Duration::from_secs(20));
    let after = tier_stats(&c2).await;
    assert!(after.failures >= 1, "{after:?}");
    assert_eq!(after.loaded_tokens, st.loaded_tokens, "{after:?}");
    eprintln!("took {:?}", t0.elapsed());
}
