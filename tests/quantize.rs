//! End to end: `agentd model quantize` on the real model, then the quantized files used by
//! `agentd generate` and `agentd bench perplexity`, and the command's refusals.

mod common;

use common::{model, success_stdout as stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

fn agentd(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(args)
        .env("AGENTD_LOG", "warn")
        .output()
        .expect("running agentd")
}

/// The default model quantized by the binary to `ty`, once per test binary.
fn quantized(ty: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static FILES: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let mut files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = files.iter().find(|(t, _)| t == ty) {
        return p.clone();
    }
    let out_path = dir.path().join(format!("smollm2-{ty}.gguf"));
    let start = std::time::Instant::now();
    let out = agentd(&[
        "model".as_ref(),
        "quantize".as_ref(),
        model().as_os_str(),
        out_path.as_os_str(),
        "--type".as_ref(),
        ty.as_ref(),
    ]);
    let summary = stdout(&out);
    eprintln!("{ty} in {:.1} s: {summary}", start.elapsed().as_secs_f64());
    assert!(summary.contains("272 tensors"), "{summary}");
    assert!(summary.contains("MiB"), "{summary}");
    files.push((ty.to_owned(), out_path.clone()));
    out_path
}

fn generate(model: &Path) -> String {
    stdout(&agentd(&[
        "--model".as_ref(),
        model.as_os_str(),
        "generate".as_ref(),
        "What is the capital of France?".as_ref(),
        "--temperature".as_ref(),
        "0".as_ref(),
        "--max-tokens".as_ref(),
        "24".as_ref(),
    ]))
}

#[test]
fn quantized_models_generate_text() {
    let q8 = generate(&quantized("q8_0"));
    assert!(q8.contains("Paris"), "{q8}");
    let k = generate(&quantized("q4_k_m"));
    assert!(k.trim().len() > 10, "{k}");
    eprintln!("q8_0: {q8}\nq4_k_m: {k}");
}

/// Perplexity on this repository's ARCHITECTURE.md (prose): finite and plausible for the source,
/// nearly unchanged by Q8_0, somewhat higher but close with Q4_K_M.
#[test]
fn perplexity_of_quantized_models_stays_close_to_the_source() {
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md");
    let ppl = |m: &Path| -> f64 {
        let out = agentd(&[
            "--model".as_ref(),
            m.as_os_str(),
            "--context".as_ref(),
            "128".as_ref(),
            "bench".as_ref(),
            "perplexity".as_ref(),
            "--file".as_ref(),
            text.as_os_str(),
            "--max-chunks".as_ref(),
            "6".as_ref(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
        eprintln!("{}: {v}", m.display());
        assert_eq!(v["context"], 128);
        assert_eq!(v["chunks"], 6);
        assert_eq!(v["tokens_scored"], 6 * 63);
        assert!(v["file_bytes"].as_u64().unwrap() > 10_000);
        assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
        v["perplexity"].as_f64().unwrap()
    };
    let source = ppl(&model());
    assert!(source > 1.5 && source < 200.0, "{source}");
    let q8 = ppl(&quantized("q8_0"));
    assert!((q8 / source - 1.0).abs() < 0.02, "q8_0 {q8} vs {source}");
    let k = ppl(&quantized("q4_k_m"));
    assert!(
        k / source < 1.25 && k / source > 0.9,
        "q4_k_m {k} vs {source}"
    );
}

fn failure(args: &[&std::ffi::OsStr], code: i32) -> String {
    let out = agentd(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn bad_quantize_requests_fail_cleanly_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let q = |input: &Path, output: &Path, ty: &str, code: i32| {
        failure(
            &[
                "model".as_ref(),
                "quantize".as_ref(),
                input.as_os_str(),
                output.as_os_str(),
                "--type".as_ref(),
                ty.as_ref(),
            ],
            code,
        )
    };
    let err = q(&dir.path().join("missing.gguf"), &out, "q8_0", 1);
    assert!(
        err.contains("cannot read") && err.contains("missing.gguf"),
        "{err}"
    );
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let err = q(&text, &out, "q8_0", 1);
    assert!(err.contains("is not a GGUF file"), "{err}");
    // clap rejects the type before anything runs (usage error: exit code 2).
    let err = q(&model(), &out, "q3_k_xl", 2);
    assert!(err.contains("unknown quantization type `q3_k_xl`"), "{err}");
    let m = model();
    let err = q(&m, &m, "q8_0", 1);
    assert!(err.contains("is the input file"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only notes.txt"
    );
}
