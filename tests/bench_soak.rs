//! `agentd bench soak` and `agentd bench memory` on the real binary and model, kept short: they
//! run their child daemon, finish, and report what they promise.

mod common;

use common::model;
use std::process::Command;

/// Runs `agentd bench ARGS` with the default model and returns its JSON report.
fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--model")
        .arg(model())
        .arg("bench")
        .args(args)
        .env("AGENTD_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_soak_runs_sessions_without_errors_and_reports_each_minute() {
    let r = bench(&[
        "soak",
        "--sessions",
        "3",
        "--minutes",
        "0.25",
        "--warmup-minutes",
        "0.1",
        "--max-tokens",
        "8",
        "--kv-memory",
        "128MiB",
    ]);
    assert_eq!(r["errors"], 0, "{r}");
    let minutes = r["per_minute"].as_array().unwrap();
    assert_eq!(minutes.len(), 1, "{r}");
    assert_eq!(minutes[0]["seconds"], 15.0, "{r}");
    let s = &r["summary"];
    assert!(s["turns"].as_u64().unwrap() > 0, "{r}");
    assert!(s["conversations"].as_u64().unwrap() >= 3, "{r}");
    assert!(minutes[0]["rss_mib"].as_f64().unwrap() > 100.0, "{r}");
    assert!(s["turn_p50_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(s["rss_change_after_warmup_pct"].is_number(), "{r}");
}

#[test]
fn bench_memory_sends_each_large_request_and_reads_the_daemons_rss() {
    let r = bench(&[
        "memory",
        "--requests",
        "1",
        "--bytes",
        "256KiB",
        "--idle-seconds",
        "0.5",
        "--kv-memory",
        "128MiB",
    ]);
    let phases = r["phases"].as_array().unwrap();
    let by_rpc = |rpc: &str| {
        phases
            .iter()
            .find(|p| p["rpc"] == rpc)
            .unwrap_or_else(|| panic!("no {rpc} phase: {r}"))
    };
    // Too long for the context: tokenized, then refused.
    for rpc in ["register", "append", "create"] {
        let p = by_rpc(rpc);
        assert_eq!(p["ok"], 0, "{r}");
        let refusal = p["refused_with"].as_str().unwrap();
        assert!(refusal.starts_with("OutOfRange"), "{r}");
    }
    assert_eq!(by_rpc("tokenize")["ok"], 1, "{r}");
    let before = r["rss_before_mib"].as_f64().unwrap();
    assert!(before > 100.0, "{r}");
    assert!(r["rss_peak_mib"].as_f64().unwrap() >= before, "{r}");
}
