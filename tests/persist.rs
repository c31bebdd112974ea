//! End to end: the prefix cache on disk across restarts, model changes, damaged blobs, `kill -9`
//! in the middle of writes, and the disk budget — all through the real binary and model.

mod common;

use agentd_sdk::{Client, GenerateOptions, Message};
use common::{chatml, run, Daemon};
use std::path::{Path, PathBuf};

/// A system prompt of a few hundred tokens (a different one for each `seed`).
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

/// Creates a session from `prefix` plus a question, and generates 12 tokens greedily.
async fn ask(c: &Client, prefix: u64, question: &str) -> (String, agentd_sdk::Usage) {
    let q = c.tokenize(&chatml(question), true).await.unwrap();
    let s = c.create_session(Some(prefix), q).await.unwrap();
    let out = run(s
        .generate(&GenerateOptions::greedy().max_tokens(12))
        .await
        .unwrap())
    .await;
    s.close().await.unwrap();
    out
}

fn blobs(cache: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cache.join("blobs"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn stop(d: Daemon) -> String {
    d.signal(libc::SIGTERM);
    let out = d.wait();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Warm {
    prefix: u64,
    prefix_tokens: u32,
    text: String,
}

/// Starts a daemon on `cache`, registers prefix 0, asks once, stops it cleanly.
async fn warm_up(dir: &Path, cache: &Path) -> Warm {
    let socket = dir.join("warm.sock");
    let d = Daemon::start(&socket, &["--cache-dir", cache.to_str().unwrap()]).await;
    let c = Client::connect(&socket).await.unwrap();
    let prefix = c.register_prefix_messages(&system_prompt(0)).await.unwrap();
    let prefix_tokens = c.list_prefixes(false).await.unwrap()[0].tokens;
    let (text, usage) = ask(&c, prefix, "Which file did you read?").await;
    assert_eq!(usage.cached_tokens, prefix_tokens);
    stop(d);
    assert!(
        !blobs(cache).is_empty(),
        "the pinned prefix was not written"
    );
    Warm {
        prefix,
        prefix_tokens,
        text,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_prefix_is_warm_after_a_restart_and_gives_the_same_output() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let w = warm_up(dir.path(), &cache).await;
    let socket = dir.path().join("b.sock");
    let d = Daemon::start(&socket, &["--cache-dir", cache.to_str().unwrap()]).await;
    let c = Client::connect(&socket).await.unwrap();
    // The registration survived with its id; its KV is on disk, not yet in memory.
    let listed = c.list_prefixes(false).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id, listed[0].tokens),
        (w.prefix, w.prefix_tokens)
    );
    assert_eq!(listed[0].resident_tokens, 0);
    let (text, usage) = ask(&c, w.prefix, "Which file did you read?").await;
    assert_eq!(usage.cached_tokens, w.prefix_tokens, "{usage:?}");
    assert_eq!(text, w.text);
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.disk_loaded_tokens, u64::from(w.prefix_tokens));
    assert_eq!(
        stats.prefill_tokens,
        u64::from(usage.prompt_tokens - usage.cached_tokens)
    );
    // Loaded back, the prefix is pinned and resident again.
    let listed = c.list_prefixes(false).await.unwrap();
    assert!(listed[0].pinned && listed[0].resident_tokens == w.prefix_tokens);
    stop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_model_file_reuses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let w = warm_up(dir.path(), &cache).await;
    // The same weights with a byte appended: another SHA-256, so another model.
    let other = dir.path().join("other.gguf");
    std::fs::copy(common::model(), &other).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&other)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 32]).unwrap();
    drop(f);
    let socket = dir.path().join("b.sock");
    let d = Daemon::start_model(&other, &socket, &["--cache-dir", cache.to_str().unwrap()]).await;
    let c = Client::connect(&socket).await.unwrap();
    assert!(c.list_prefixes(false).await.unwrap().is_empty());
    let mut tokens = c
        .tokenize(
            &format!(
                "<|im_start|>system\n{}<|im_end|>\n",
                system_prompt(0)[0].content
            ),
            true,
        )
        .await
        .unwrap();
    tokens.extend(
        c.tokenize(&chatml("Which file did you read?"), true)
            .await
            .unwrap(),
    );
    let s = c.create_session(None, tokens).await.unwrap();
    let (text, usage) = run(s
        .generate(&GenerateOptions::greedy().max_tokens(12))
        .await
        .unwrap())
    .await;
    assert_eq!(usage.cached_tokens, 0, "{usage:?}");
    assert_eq!(c.stats().await.unwrap().disk_loaded_tokens, 0);
    assert_eq!(text, w.text, "same weights, same greedy output");
    let log = stop(d);
    assert!(log.contains("model_sha256"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_is_detected_and_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let w = warm_up(dir.path(), &cache).await;
    // Flip bytes in the middle of the KV (the header and length stay valid).
    for blob in blobs(&cache) {
        let mut bytes = std::fs::read(&blob).unwrap();
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(&blob, bytes).unwrap();
    }
    let socket = dir.path().join("b.sock");
    let d = Daemon::start(&socket, &["--cache-dir", cache.to_str().unwrap()]).await;
    let c = Client::connect(&socket).await.unwrap();
    let (text, usage) = ask(&c, w.prefix, "Which file did you read?").await;
    assert!(usage.cached_tokens < w.prefix_tokens, "{usage:?}");
    assert_eq!(text, w.text, "recomputed, so the output is unchanged");
    // The damaged record is gone; the recomputed prefix is pinned and written again.
    let log = stop(d);
    assert!(log.contains("checksum"), "{log}");
    let d = Daemon::start(&socket, &["--cache-dir", cache.to_str().unwrap()]).await;
    let c = Client::connect(&socket).await.unwrap();
    let (text, usage) = ask(&c, w.prefix, "Which file did you read?").await;
    assert_eq!(usage.cached_tokens, w.prefix_tokens, "{usage:?}");
    assert_eq!(text, w.text);
    stop(d);
}

// Regression: corrupt bytes in sled's files under `meta/`, or a directory in `blobs/`, made
// `agentd serve` exit 1 ("Read corrupted data", "Is a directory") until the directory was deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_metadata_database_is_moved_aside_and_the_cached_prefix_still_reused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let w = warm_up(dir.path(), &cache).await;
    let conf = cache.join("meta").join("conf");
    let mut bytes = std::fs::read(&conf).unwrap();
    for b in &mut bytes[..16] {
        *b ^= 0x5a;
    }
    std::fs::write(&conf, bytes).unwrap();
    std::fs::create_dir(cache.join("blobs").join("lost+found")).unwrap();
    let socket = dir.path().join("b.sock");
    let d = Daemon::start(&socket, &["--cache-dir", cache.to_str().unwrap()]).await;
    let c = Client::connect(&socket).await.unwrap();
    // The registration lived in the lost database; the KV lives in the blobs, rebuilt from
    // their descriptors, so registering the same prompt again loads it from disk.
    assert!(c.list_prefixes(false).await.unwrap().is_empty());
    let prefix = c.register_prefix_messages(&system_prompt(0)).await.unwrap();
    let (text, usage) = ask(&c, prefix, "Which file did you read?").await;
    assert_eq!(usage.cached_tokens, w.prefix_tokens, "{usage:?}");
    assert_eq!(text, w.text);
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.disk_loaded_tokens, u64::from(w.prefix_tokens));
    let log = stop(d);
    assert!(log.contains("moved it aside"), "{log}");
    assert!(log.contains("lost+found"), "{log}");
    let aside: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("meta.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(cache.join("blobs").join("lost+found").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_cache_directory_is_refused_and_told_why() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let first = Daemon::start(
        &dir.path().join("a.sock"),
        &["--cache-dir", cache.to_str().unwrap()],
    )
    .await;
    let second = common::spawn(
        &dir.path().join("b.sock"),
        &["--cache-dir", cache.to_str().unwrap()],
    )
    .wait_with_output()
    .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another agentd"), "{err}");
    assert!(std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().contains("damaged")));
    stop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_never_breaks_start_up_or_outputs() {
    const PREFIXES: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_arg = cache.to_str().unwrap().to_owned();
    // Reference outputs, with no disk cache at all.
    let socket = dir.path().join("ref.sock");
    let d = Daemon::start(&socket, &["--disk-cache", "0"]).await;
    let c = Client::connect(&socket).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..PREFIXES {
        let p = c.register_prefix_messages(&system_prompt(i)).await.unwrap();
        expected.push(ask(&c, p, "Which file did you read?").await.0);
    }
    drop(d);
    for round in 0..3u64 {
        let socket = dir.path().join(format!("r{round}.sock"));
        let d = Daemon::start(&socket, &["--cache-dir", &cache_arg]).await;
        let c = Client::connect(&socket).await.unwrap();
        // Registrations from before the kills survived (sled was flushed after them).
        let survived = c.list_prefixes(false).await.unwrap().len();
        assert!(
            round == 0 || survived >= PREFIXES,
            "round {round}: {survived}"
        );
        // Whatever survived earlier kills gives the reference output.
        for (i, want) in expected.iter().enumerate() {
            let p = c.register_prefix_messages(&system_prompt(i)).await.unwrap();
            let (text, _) = ask(&c, p, "Which file did you read?").await;
            assert_eq!(&text, want, "round {round}, prefix {i}");
        }
        // Heavy writes: many registrations at once, then SIGKILL part-way.
        let mut tasks = Vec::new();
        for i in 0..12 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let _ = c
                    .register_prefix_messages(&system_prompt(100 + round as usize * 12 + i))
                    .await;
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(400 + 500 * round)).await;
        d.signal(libc::SIGKILL);
        drop(d);
        for t in tasks {
            let _ = t.await;
        }
    }
    // A last start: it comes up, and every restored prefix still answers as the reference.
    let socket = dir.path().join("last.sock");
    let d = Daemon::start(&socket, &["--cache-dir", &cache_arg]).await;
    let c = Client::connect(&socket).await.unwrap();
    for (i, want) in expected.iter().enumerate() {
        let p = c.register_prefix_messages(&system_prompt(i)).await.unwrap();
        let (text, usage) = ask(&c, p, "Which file did you read?").await;
        assert_eq!(&text, want, "prefix {i}");
        assert!(usage.cached_tokens > 0, "{usage:?}");
    }
    stop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_budget_is_respected() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let socket = dir.path().join("a.sock");
    let budget: u64 = 12 << 20;
    let d = Daemon::start(
        &socket,
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--disk-cache",
            "12MiB",
        ],
    )
    .await;
    let c = Client::connect(&socket).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(c.register_prefix_messages(&system_prompt(i)).await.unwrap());
    }
    let stats = c.stats().await.unwrap();
    assert!(stats.disk_bytes <= budget, "{stats:?}");
    assert_eq!(stats.disk_budget, budget);
    stop(d);
    let on_disk: u64 = blobs(&cache)
        .iter()
        .map(|b| b.metadata().unwrap().len())
        .sum();
    assert!(on_disk <= budget, "{on_disk} bytes on disk");
    assert!(
        on_disk > budget / 2,
        "{on_disk} bytes: the budget was not used"
    );
    // The newest prefix survived (least recently used records went first).
    let d = Daemon::start(
        &socket,
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--disk-cache",
            "12MiB",
        ],
    )
    .await;
    let c = Client::connect(&socket).await.unwrap();
    let (_, usage) = ask(&c, *ids.last().unwrap(), "Which file did you read?").await;
    assert!(usage.cached_tokens > 0, "{usage:?}");
    stop(d);
}
