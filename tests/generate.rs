//! End to end: the real `agentd` binary answering on the real model (SmolLM2-135M-Instruct Q4_1,
//! fetched by the same code path the daemon uses).

mod common;

use common::{model, success_stdout as stdout};
use std::path::Path;
use std::process::{Command, Output};

/// Runs `agentd --model <model> <args>`.
fn agentd(model: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--model")
        .arg(model)
        .args(args)
        .env("AGENTD_LOG", "warn")
        .output()
        .expect("running agentd")
}

/// Runs agentd expecting a clean failure (exit code 1, not a panic's 101) and returns stderr.
fn failure(model: &Path, args: &[&str]) -> String {
    let out = agentd(model, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean error, got {:?}: {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn greedy_generation_answers_and_is_deterministic() {
    let m = model();
    let args = [
        "generate",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ];
    let first = stdout(&agentd(&m, &args));
    let second = stdout(&agentd(&m, &args));
    assert!(first.contains("Paris"), "{first}");
    assert_eq!(first, second);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = model();
    let run = |seed: &str| {
        let args = [
            "generate",
            "Write a short poem about the sea.",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--max-tokens",
            "32",
        ];
        stdout(&agentd(&m, &args))
    };
    let (a, b, c) = (run("7"), run("7"), run("8"));
    assert_eq!(a, b);
    assert_ne!(a, c, "different seeds gave the same 32 tokens");
    assert!(!a.trim().is_empty());
}

#[test]
fn stop_strings_end_the_reply_before_they_appear() {
    let m = model();
    let base = [
        "generate",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ];
    let full = stdout(&agentd(&m, &base));
    let cut_at = full
        .find("Paris")
        .expect("the greedy answer mentions Paris");
    let mut args = base.to_vec();
    args.extend(["--stop", "Paris"]);
    let stopped = stdout(&agentd(&m, &args));
    assert_eq!(stopped.trim_end_matches('\n'), &full[..cut_at]);
}

#[test]
fn system_prompt_and_stats_are_accepted() {
    let m = model();
    let out = agentd(
        &m,
        &[
            "generate",
            "Say hi",
            "--system",
            "You are terse.",
            "--max-tokens",
            "8",
            "--stats",
        ],
    );
    stdout(&out);
    let stats = String::from_utf8_lossy(&out.stderr);
    let line = stats.lines().last().expect("a stats line");
    let v: serde_json::Value = serde_json::from_str(line).expect("stats are JSON");
    assert!(v["prompt_tokens"].as_u64().unwrap() > 10, "{v}");
    assert!(v["generated_tokens"].as_u64().unwrap() <= 8, "{v}");
}

#[test]
fn bad_inputs_fail_cleanly_with_a_reason() {
    let m = model();
    let err = failure(&m, &["generate", "hi", "--max-tokens", "0"]);
    assert!(err.contains("max_tokens must be at least 1"), "{err}");
    let err = failure(&m, &["generate", "hi", "--temperature=-1"]);
    assert!(err.contains("temperature"), "{err}");
    let err = failure(&m, &["generate", "hi", "--top-p", "1.5"]);
    assert!(err.contains("top_p"), "{err}");
    let err = failure(&m, &["generate", "hi", "--stop", ""]);
    assert!(err.contains("stop"), "{err}");
    let err = failure(&m, &["generate", "hi", "--max-tokens", "9000"]);
    assert!(err.contains("context"), "{err}");
    let err = failure(&m, &["--threads", "0", "generate", "hi"]);
    assert!(err.contains("--threads must be at least 1"), "{err}");
}

#[test]
fn bad_model_files_fail_cleanly_and_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let err = failure(&missing, &["generate", "hi"]);
    assert!(err.contains("missing.gguf"), "{err}");

    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(model()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = failure(&truncated, &["generate", "hi"]);
    assert!(
        err.contains("truncated.gguf") && err.contains("tensor"),
        "{err}"
    );
}

#[test]
fn default_model_is_found_in_agentd_home() {
    let home = tempfile::tempdir().unwrap();
    let models = home.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let target = models.join(agentd_engine::model_files::DEFAULT_MODEL_FILE);
    std::fs::hard_link(model(), &target)
        .or_else(|_| std::fs::copy(model(), &target).map(|_| ()))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["model", "path"])
        .env("AGENTD_HOME", home.path())
        .env_remove("AGENTD_MODEL")
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), target.display().to_string());
}

#[test]
fn a_closed_stdout_cancels_generation_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let m = model();
    let prompt = "Tell me a long story about a dragon.";
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--model")
        .arg(&m)
        .args([
            "generate",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "4000",
            "--stats",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    let stats: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(stats["finish"], "cancelled", "{stats}");
    assert!(
        stats["generated_tokens"].as_u64().unwrap() < 4000,
        "{stats}"
    );
}
