//! End to end: `agentd bench prefix` on the real model, small enough for CI. Checks the report's
//! accounting, not its timings: with the cache on, the shared system prompt is computed once per
//! namespace; with it off, once per session.

use serde_json::Value;
use std::process::Command;

fn model() -> std::path::PathBuf {
    agentd_engine::model_files::ensure_default_model(&mut |m| eprintln!("{m}"))
        .expect("the default model")
}

#[test]
fn bench_prefix_computes_the_shared_prompt_once_per_namespace() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--model")
        .arg(model())
        .args([
            "bench",
            "prefix",
            "--sessions",
            "6",
            "--system-tokens",
            "200",
            "--gen-tokens",
            "4",
            "--tenants",
            "1,2",
        ])
        .env("AGENTD_LOG", "warn")
        .output()
        .expect("running agentd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let system = report["system_prompt_tokens"].as_u64().unwrap();
    let (min, max) = (
        report["prompt_tokens"][0].as_u64().unwrap(),
        report["prompt_tokens"][1].as_u64().unwrap(),
    );
    assert!(system >= 200 && min > system, "{report}");
    let runs = report["runs"].as_array().unwrap();
    let run = |mode: &str, cache: bool, tenants: u64| {
        runs.iter()
            .find(|r| r["mode"] == mode && r["cache"] == cache && r["tenants"] == tenants)
            .unwrap_or_else(|| panic!("no {mode} cache={cache} tenants={tenants} run: {report}"))
    };
    let computed = |r: &Value| r["prefill_tokens_computed"].as_u64().unwrap();
    let own_max = 6 * (max - system);
    // Cache off: every session computes its whole prompt.
    let off = run("concurrent", false, 1);
    assert!(computed(off) >= 6 * min, "{off}");
    assert_eq!(off["cached_tokens"], 0);
    // Cache on: the system prompt once per namespace, plus each session's own tokens.
    for tenants in [1, 2] {
        let on = run("concurrent", true, tenants);
        assert!(
            computed(on) <= tenants * system + own_max,
            "{tenants} tenants: {on}"
        );
        assert!(
            on["cached_tokens"].as_u64().unwrap() >= (6 - tenants) * system,
            "{on}"
        );
        assert_eq!(on["sessions"], 6);
        assert!(on["peak_kv_bytes"].as_u64().unwrap() > 0);
    }
    let one = run("one_at_a_time", true, 1);
    assert!(computed(one) <= system + own_max, "{one}");
    for key in [
        "concurrent_over_one_at_a_time_tokens_per_s",
        "peak_kv_over_one_prompt_plus_own_tokens",
        "warm_ttft_p50_over_cold_ttft_p50",
    ] {
        assert!(
            report["summary"][key].as_f64().unwrap() > 0.0,
            "{key}: {report}"
        );
    }
}
