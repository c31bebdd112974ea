//! End to end: the shared tier's failure modes and KV events between real daemons on a real
//! six-node Redis Cluster, watched by the index a router keeps (`IndexFollower`, in this
//! process):
//! - a daemon with `--node` announces its pinned prefix; the index holds it under the keys the
//!   tier uses;
//! - another KV dtype or another model file finds nothing in the tier;
//! - a page deleted mid-chain gives a partial hit, a corrupted value is rejected and
//!   recomputed — both with the same greedy output;
//! - killing a Redis primary mid-run loses no request;
//! - a restarted daemon's stale entries leave the index.
//!
//! Skipped, saying so, only when `redis-server` is not installed.

mod common;

#[path = "../daemon/kvtier/tests/support/cluster.rs"]
mod cluster;

use agentd_kvtier::events::{EventsConfig, IndexFollower, KvIndex};
use agentd_kvtier::{PageKey, PageRun, RedisTierConfig, TierNamespace};
use agentd_sdk::{Client, GenerateOptions, Message};
use agentd_store::Namespace;
use common::{chatml, run, Daemon};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

fn system_prompt() -> Vec<Message> {
    let body: String = (0..14)
        .map(|i| format!("Rule {i}: read the runbook, check the alerts, write the ticket. "))
        .collect();
    vec![Message::system(format!(
        "You are the on-call agent. {body}"
    ))]
}

async fn ask(c: &Client, tokens: Vec<u32>) -> (String, agentd_sdk::Usage) {
    let s = c.create_session(None, tokens).await.unwrap();
    let out = run(s
        .generate(&GenerateOptions::greedy().max_tokens(10))
        .await
        .unwrap())
    .await;
    s.close().await.unwrap();
    out
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what}: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read(index: &Arc<RwLock<KvIndex>>) -> std::sync::RwLockReadGuard<'_, KvIndex> {
    index.read().unwrap()
}

/// A raw connection to the cluster, as damage or another writer would touch it.
fn raw(urls: &[String]) -> redis::cluster::ClusterConnection {
    redis::cluster::ClusterClient::new(urls.to_vec())
        .and_then(|c| c.get_connection())
        .expect("a raw cluster connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_failures_cost_only_recomputation_and_restarts_purge_the_index() {
    if !cluster::redis_installed() {
        eprintln!("skipped: redis-server and redis-cli are not installed");
        return;
    }
    let mut redis = cluster::Cluster::start();
    let urls_list = redis.urls();
    let urls = urls_list.join(",");
    let mut redis_cfg = RedisTierConfig::new(urls_list.clone());
    redis_cfg.timeout = Duration::from_millis(500);
    redis_cfg.reconnect_every = Duration::from_millis(200);
    let follower = IndexFollower::start(EventsConfig {
        poll: Duration::from_millis(50),
        ..EventsConfig::new(redis_cfg)
    })
    .unwrap();
    let index = follower.index();
    let dir = tempfile::tempdir().unwrap();
    let sock = |n: &str| dir.path().join(format!("{n}.sock"));
    let no_disk = ["--disk-cache", "0"];
    let node = |n: &'static str| -> Vec<&str> {
        let mut a = vec!["--node", n, "--kv-tier", urls.as_str()];
        a.extend(no_disk);
        a
    };

    // Node 1 pins a prefix: exported, and announced under the tier's keys.
    let d1 = Daemon::start(&sock("one"), &node("1")).await;
    let c1 = Client::connect(&d1.socket).await.unwrap();
    let prefix = c1.register_prefix_messages(&system_prompt()).await.unwrap();
    let probe = c1.create_session(Some(prefix), Vec::new()).await.unwrap();
    let (prefix_tokens, _) = probe.tokens().await.unwrap();
    probe.close().await.unwrap();
    let page_size = c1.stats().await.unwrap().page_size as usize;
    let pages = prefix_tokens.len() / page_size;
    assert!(pages >= 6, "the prefix spans {pages} whole pages");
    wait_for("node 1's heartbeat", || {
        read(&index).fingerprint(1).is_some()
    })
    .await;
    let fp = read(&index).fingerprint(1).cloned().unwrap();
    let keys: Vec<PageKey> = PageRun::new(
        &TierNamespace::new(fp, Namespace::Tenant(0)),
        &prefix_tokens,
    )
    .keys()
    .to_vec();
    wait_for("node 1's pages in the index", || {
        read(&index).matched_pages(1, &keys) == pages
    })
    .await;
    let mut question = prefix_tokens.clone();
    question.extend(
        c1.tokenize(&chatml("Which runbook first?"), true)
            .await
            .unwrap(),
    );
    let (reference, usage) = ask(&c1, question.clone()).await;
    assert!(
        usage.cached_tokens as usize >= pages * page_size,
        "{usage:?}"
    );
    let mut conn = raw(&urls_list);
    let stored: i64 = redis::cmd("EXISTS")
        .arg(keys[pages - 1].redis_key())
        .query(&mut conn)
        .unwrap();
    assert_eq!(stored, 1, "the last whole page is in the tier");

    // Another KV dtype and another model file (one byte of a weight changed) have other
    // namespaces: nothing from the tier.
    let q8 = Daemon::start(&sock("q8"), &["--kv-tier", &urls, "--kv-dtype", "q8_0"]).await;
    let (_, u) = ask(
        &Client::connect(&q8.socket).await.unwrap(),
        question.clone(),
    )
    .await;
    assert_eq!(
        (u.cached_tokens, u.tier_cached_tokens),
        (0, 0),
        "q8_0: {u:?}"
    );
    drop(q8);
    let other_model = dir.path().join("other.gguf");
    std::fs::copy(common::model(), &other_model).unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&other_model)
            .unwrap();
        f.seek(SeekFrom::End(-1)).unwrap();
        f.write_all(&[0x3c]).unwrap();
    }
    let other = Daemon::start_model(&other_model, &sock("other"), &["--kv-tier", &urls]).await;
    let (_, u) = ask(
        &Client::connect(&other.socket).await.unwrap(),
        question.clone(),
    )
    .await;
    assert_eq!(
        (u.cached_tokens, u.tier_cached_tokens),
        (0, 0),
        "other model: {u:?}"
    );
    drop(other);

    // Node 2: a full hit from the tier, the same output.
    let d2 = Daemon::start(&sock("two"), &node("2")).await;
    let c2 = Client::connect(&d2.socket).await.unwrap();
    let (text, u) = ask(&c2, question.clone()).await;
    assert_eq!(text, reference);
    assert_eq!(u.tier_cached_tokens as usize, pages * page_size, "{u:?}");
    wait_for("node 2's loaded pages in the index", || {
        read(&index).matched_pages(2, &keys) >= pages
    })
    .await;

    // A page deleted mid-chain: a partial hit up to it; the same output.
    let cut = pages / 2;
    let _: i64 = redis::cmd("DEL")
        .arg(keys[cut].redis_key())
        .query(&mut conn)
        .unwrap();
    c2.evict_cache(None).await.unwrap();
    wait_for("node 2's eviction in the index", || {
        read(&index).matched_pages(2, &keys) == 0
    })
    .await;
    let (text, u) = ask(&c2, question.clone()).await;
    assert_eq!(text, reference, "a partial hit changed the output");
    assert_eq!(u.tier_cached_tokens as usize, cut * page_size, "{u:?}");

    // A corrupted value before the cut: rejected (deleted), recomputed, the same output.
    let bad = cut / 2;
    let _: () = redis::cmd("SET")
        .arg(keys[bad].redis_key())
        .arg(b"not a page".as_slice())
        .query(&mut conn)
        .unwrap();
    let damaged_before = c2.stats().await.unwrap().shared_tier.unwrap().damaged_pages;
    c2.evict_cache(None).await.unwrap();
    let (text, u) = ask(&c2, question.clone()).await;
    assert_eq!(text, reference, "a damaged value changed the output");
    assert_eq!(u.tier_cached_tokens as usize, bad * page_size, "{u:?}");
    let st = c2.stats().await.unwrap().shared_tier.unwrap();
    assert_eq!(st.damaged_pages, damaged_before + 1, "{st:?}");
    let gone: i64 = redis::cmd("EXISTS")
        .arg(keys[bad].redis_key())
        .query(&mut conn)
        .unwrap();
    assert_eq!(gone, 0, "the damaged value was deleted");

    // A primary killed while requests run: every request completes, with the same output.
    c2.evict_cache(None).await.unwrap();
    let primary = redis.owner(&keys[0].redis_key());
    let asks: Vec<_> = (0..4)
        .map(|_| {
            let (c, q) = (c2.clone(), question.clone());
            tokio::spawn(async move { ask(&c, q).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    redis.kill(primary);
    for a in asks {
        let (text, _) = a.await.expect("no request fails because a primary died");
        assert_eq!(text, reference);
    }
    let (text, _) = ask(&c2, question.clone()).await;
    assert_eq!(text, reference);

    // Node 1 restarts (no disk tier, so it comes back empty): its new epoch purges its stale
    // entries from the index.
    let epoch = read(&index).epoch(1).unwrap();
    drop(c1);
    drop(d1);
    let d1 = Daemon::start(&sock("one-again"), &node("1")).await;
    wait_for("node 1's new epoch", || {
        read(&index).epoch(1).is_some_and(|e| e > epoch)
    })
    .await;
    assert_eq!(read(&index).matched_pages(1, &keys), 0);
    assert_eq!(read(&index).node_pages(1), 0);
    drop(d1);
}
