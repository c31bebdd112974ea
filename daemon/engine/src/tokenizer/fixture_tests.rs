//! Fixture tests: about thirty strings per vocabulary and llama.cpp's ids for them, with and
//! without special parsing and BOS, in `fixtures/*.json`.
//!
//! `bench/tokenizer_compare.py --write-fixtures` wrote them from llama.cpp (llama-cpp-python,
//! `Llama(model_path, vocab_only=True).tokenize(text.encode(), add_bos, special)`); each file
//! names its model file and the llama-cpp-python version. A model that is not on disk is
//! skipped with a note. Besides the three models' files, two of llama.cpp's vocabulary-only test
//! files (`models/ggml-vocab-{llama-spm,phi-3}.gguf` in its repository) have fixtures, checked
//! when copied into the models folder.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;

use super::GgufTokenizer;
use crate::model::GgufFile;

/// One fixture file.
#[derive(Deserialize)]
struct Fixture {
    /// The GGUF file name, looked up with [`model_file`].
    model: String,
    cases: Vec<Case>,
}

/// One string and llama.cpp's ids for it.
#[derive(Deserialize)]
struct Case {
    text: String,
    parse_special: bool,
    add_bos: bool,
    ids: Vec<u32>,
}

/// Where the model file `name` is: among the vocabulary files kept with the fixtures, in the
/// models folder, or pulled through the catalog when a
/// catalog entry has that file name (so CI runs these against the real vocabularies); `None`
/// for a file the catalog does not know and that is not on disk.
fn model_file(name: &str) -> Option<PathBuf> {
    let vendored = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/tokenizer/fixtures/vocab")
        .join(name);
    if vendored.is_file() {
        return Some(vendored);
    }
    let path = crate::model_files::models_dir().ok()?.join(name);
    if path.is_file() {
        return Some(path);
    }
    let catalog = crate::catalog::Catalog::load().ok()?;
    let entry = catalog.entries().iter().find(|e| e.file == name)?;
    let pulled = crate::catalog::ensure_catalog_model(&entry.name, &mut |m| eprintln!("{m}"))
        .unwrap_or_else(|e| panic!("pulling {}: {e}", entry.name));
    Some(pulled)
}

/// The tokenizer of model file `name` (metadata only, no weights), or `None` with a note when
/// the file is absent.
fn tokenizer(name: &str) -> Option<GgufTokenizer> {
    let Some(path) = model_file(name) else {
        eprintln!("note: {name} is not in the models folder; its tokenizer tests are skipped");
        return None;
    };
    let file = GgufFile::open(&path).expect("read GGUF metadata");
    Some(GgufTokenizer::from_metadata(file.metadata()).expect("tokenizer"))
}

/// Checks every case of a fixture file, reporting all mismatches at once.
fn check(json: &str) {
    let fixture: Fixture = serde_json::from_str(json).expect("fixture JSON");
    let Some(tok) = tokenizer(&fixture.model) else {
        return;
    };
    let mut mismatches = Vec::new();
    for case in &fixture.cases {
        let options = super::EncodeOptions {
            parse_special: case.parse_special,
            add_bos: case.add_bos,
        };
        let ids = tok.encode_with(&case.text, options).expect("encode");
        if ids != case.ids {
            mismatches.push(format!(
                "{:?} (special {}, bos {}):\n  ours      {:?}\n  llama.cpp {:?}",
                case.text, case.parse_special, case.add_bos, ids, case.ids
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ from llama.cpp for {}:\n{}",
        mismatches.len(),
        fixture.cases.len(),
        fixture.model,
        mismatches.join("\n")
    );
}

#[test]
fn smollm2_matches_llama_cpp_fixtures() {
    check(include_str!("fixtures/smollm2.json"));
}

#[test]
fn qwen25_matches_llama_cpp_fixtures() {
    check(include_str!("fixtures/qwen2.5.json"));
}

#[test]
fn gemma3_matches_llama_cpp_fixtures() {
    check(include_str!("fixtures/gemma3.json"));
}

/// llama.cpp's `models/ggml-vocab-llama-spm.gguf` (Llama 2's vocabulary: SentencePiece with the
/// space prefix), when copied into the models folder.
#[test]
fn llama_spm_matches_llama_cpp_fixtures() {
    check(include_str!("fixtures/llama-spm.json"));
}

/// llama.cpp's `models/ggml-vocab-phi-3.gguf` (special tokens strip the whitespace after them),
/// when copied into the models folder.
#[test]
fn phi3_matches_llama_cpp_fixtures() {
    check(include_str!("fixtures/phi-3.json"));
}

/// Gemma 3's tokenizer, built once for the tests below.
fn gemma3() -> Option<&'static GgufTokenizer> {
    static TOKENIZER: OnceLock<Option<GgufTokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| tokenizer("gemma-3-270m.Q4_K_M.gguf"))
        .as_ref()
}

#[test]
fn gemma3_special_ids_match_llama_cpp() {
    let Some(tok) = gemma3() else { return };
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!(tok.bos_token_id(), Some(2));
    assert_eq!(tok.eos_token_id(), 1);
    assert!(tok.add_bos_token());
    assert_eq!(tok.token_text(105), Some("<start_of_turn>"));
    assert_eq!(tok.token_text(106), Some("<end_of_turn>"));
    // llama.cpp's end-of-generation set: <eos>, <end_of_turn> and the user-defined "</s>".
    assert_eq!(tok.stop_token_ids(), [1, 106, 212]);
    // add_space_prefix is false: no space before the first word.
    let ids = tok
        .encode("<start_of_turn>user\nHi<end_of_turn>", true)
        .expect("encode");
    assert_eq!(ids.first(), Some(&105));
    assert_eq!(ids.last(), Some(&106));
    assert_eq!(
        tok.decode(&ids, true).expect("decode"),
        "user\nHi",
        "{ids:?}"
    );
}

#[test]
fn gemma3_round_trips_and_survives_hostile_text() {
    let Some(tok) = gemma3() else { return };
    for text in [
        "Hello, world! Ça va? 日本語 🦀 \u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}",
        "\t\tindented\n\n\n   spaced\u{0}nul",
        "<start_of_turn> <0x41> ▁▁x",
    ] {
        let ids = tok.encode(text, false).expect("encode");
        assert_eq!(
            tok.decode(&ids, false).expect("decode"),
            text.replace('▁', " ")
        );
    }
    let spaces = " ".repeat(1 << 20);
    let ids = tok.encode(&spaces, true).expect("encode");
    assert_eq!(tok.decode(&ids, false).expect("decode"), spaces);
}

#[test]
fn qwen25_special_ids_match_llama_cpp() {
    let Some(tok) = tokenizer("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf") else {
        return;
    };
    assert_eq!(tok.vocab_size(), 151_936);
    assert_eq!(tok.eos_token_id(), 151_645);
    assert!(!tok.add_bos_token());
    // <|im_end|> (EOS), then <|endoftext|>, <|fim_pad|>, <|repo_name|>, <|file_sep|> and the
    // ordinary "</s>" (128247), all on llama.cpp's list.
    assert_eq!(
        tok.stop_token_ids(),
        [151_645, 128_247, 151_643, 151_662, 151_663, 151_664]
    );
    // Single digits (the qwen2 pre-tokenizer).
    let ids = tok.encode("12345", false).expect("encode");
    assert_eq!(ids.len(), 5, "{ids:?}");
}
