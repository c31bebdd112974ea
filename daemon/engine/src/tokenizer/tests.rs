//! Unit tests on tiny hand-built vocabularies (no model file needed): a byte-level BPE one and a
//! SentencePiece one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Value;

use super::*;

fn strs(xs: &[&str]) -> Value {
    Value::Array(xs.iter().map(|s| Value::String(s.to_string())).collect())
}

fn ints(xs: &[i32]) -> Value {
    Value::Array(xs.iter().map(|&t| Value::I32(t)).collect())
}

fn build(md: &HashMap<String, Value>) -> GgufTokenizer {
    GgufTokenizer::from_metadata(md).expect("tokenizer")
}

fn build_err(md: &HashMap<String, Value>) -> String {
    match GgufTokenizer::from_metadata(md) {
        Ok(_) => "built without error".to_string(),
        Err(e) => e.to_string(),
    }
}

fn set(md: &mut HashMap<String, Value>, key: &str, value: Value) {
    md.insert(key.to_string(), value);
}

const SPECIAL_AND_BOS: EncodeOptions = EncodeOptions {
    parse_special: true,
    add_bos: true,
};

// ---------------------------------------------------------------------------------------------
// Byte-level BPE

/// A tiny byte-level vocabulary: single characters, two merges, and control tokens.
fn tiny_bpe() -> HashMap<String, Value> {
    let tokens = [
        "<|hi|>", "</hi>", "h", "i", "hi", "Ġ", "Ġhi", "<", "|", ">", "1", "2", "3", "12",
    ];
    let types = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    HashMap::from([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("gpt-2".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), strs(&tokens)),
        (
            "tokenizer.ggml.merges".to_string(),
            strs(&["h i", "Ġ hi", "1 2"]),
        ),
        ("tokenizer.ggml.token_type".to_string(), ints(&types)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1)),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(true),
        ),
    ])
}

#[test]
fn tiny_vocabulary_round_trips() {
    let tok = build(&tiny_bpe());
    assert_eq!(tok.encode("hi hi", true).expect("encode"), [4, 6]);
    assert_eq!(
        tok.encode("<|hi|>hi</hi>", true).expect("encode"),
        [0, 4, 1]
    );
    // Without parse_special the control token is just text: "<|", "hi", "|>".
    assert_eq!(
        tok.encode("<|hi|>", false).expect("encode"),
        [7, 8, 4, 8, 9]
    );
    assert_eq!(
        tok.encode_with("hi", SPECIAL_AND_BOS).expect("encode"),
        [0, 4]
    );
    assert_eq!(
        tok.decode(&[0, 4, 6, 1], false).expect("decode"),
        "<|hi|>hi hi</hi>"
    );
    assert_eq!(tok.decode(&[0, 4, 6, 1], true).expect("decode"), "hi hi");
    assert_eq!(tok.stop_token_ids(), [1]);
    assert!(tok.is_control(0) && !tok.is_control(4) && !tok.is_control(99));
    assert_eq!(tok.token_text(6), Some("Ġhi"));
    assert_eq!(tok.token_bytes(6), Some(&b" hi"[..]));
    assert_eq!(tok.token_bytes(0), Some(&b"<|hi|>"[..]));
    assert_eq!(tok.token_kind(0), Some(TokenKind::Control));
    assert!(tok.inner().is_some());
}

#[test]
fn llama3_pre_tokenizer_builds_and_adds_bos() {
    // No llama3 reference model is at hand: this checks that the regex compiles under onig
    // and that the llama3 defaults (BOS on when the key is absent) apply.
    let mut md = tiny_bpe();
    set(
        &mut md,
        "tokenizer.ggml.pre",
        Value::String("llama-bpe".into()),
    );
    md.remove("tokenizer.ggml.add_bos_token");
    let tok = build(&md);
    assert!(tok.add_bos_token());
    assert_eq!(
        tok.encode_with("hi hi", SPECIAL_AND_BOS).expect("encode"),
        [0, 4, 6]
    );
    // llama3 splits digits in threes, so "12" can merge.
    assert_eq!(tok.encode("123", false).expect("encode"), [13, 12]);
}

#[test]
fn qwen2_pre_tokenizer_splits_single_digits() {
    let mut md = tiny_bpe();
    set(&mut md, "tokenizer.ggml.pre", Value::String("qwen2".into()));
    let tok = build(&md);
    // Each digit is its own pre-token, so the "1 2" merge never applies.
    assert_eq!(tok.encode("123", false).expect("encode"), [10, 11, 12]);
    assert_eq!(tok.encode("hi hi", false).expect("encode"), [4, 6]);
}

#[test]
fn add_eos_token_appends_eos_with_add_bos() {
    let mut md = tiny_bpe();
    set(&mut md, "tokenizer.ggml.add_eos_token", Value::Bool(true));
    let tok = build(&md);
    assert_eq!(
        tok.encode_with("hi", SPECIAL_AND_BOS).expect("encode"),
        [0, 4, 1]
    );
    assert_eq!(tok.encode("hi", true).expect("encode"), [4]);
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GgufTokenizer>();
}

#[test]
fn decode_rejects_unknown_id() {
    let tok = build(&tiny_bpe());
    let err = tok
        .decode(&[4, 99], false)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("token id 99"), "{err}");
}

#[test]
fn missing_tokens_key_is_named() {
    let mut md = tiny_bpe();
    md.remove("tokenizer.ggml.tokens");
    let err = build_err(&md);
    assert!(err.contains("tokenizer.ggml.tokens"), "{err}");
}

#[test]
fn mistyped_key_is_named() {
    let mut md = tiny_bpe();
    set(
        &mut md,
        "tokenizer.ggml.eos_token_id",
        Value::String("1".into()),
    );
    let err = build_err(&md);
    assert!(err.contains("tokenizer.ggml.eos_token_id"), "{err}");
}

#[test]
fn unknown_pre_tokenizer_is_an_error() {
    let mut md = tiny_bpe();
    set(
        &mut md,
        "tokenizer.ggml.pre",
        Value::String("falcon".into()),
    );
    let err = build_err(&md);
    assert!(err.contains("`falcon`") && err.contains("qwen2"), "{err}");
    // llama.cpp's "default" is a different regex set from GPT-2's; it is not guessed at.
    set(
        &mut md,
        "tokenizer.ggml.pre",
        Value::String("default".into()),
    );
    assert!(build_err(&md).contains("`default`"));
}

#[test]
fn unknown_tokenizer_model_is_an_error() {
    let mut md = tiny_bpe();
    set(&mut md, "tokenizer.ggml.model", Value::String("t5".into()));
    let err = build_err(&md);
    assert!(err.contains("`t5`") && err.contains("llama"), "{err}");
}

#[test]
fn malformed_merge_is_named() {
    let mut md = tiny_bpe();
    set(&mut md, "tokenizer.ggml.merges", strs(&["hi"]));
    let err = build_err(&md);
    assert!(err.contains("tokenizer.ggml.merges[0]"), "{err}");
}

#[test]
fn out_of_range_eos_is_an_error() {
    let mut md = tiny_bpe();
    set(&mut md, "tokenizer.ggml.eos_token_id", Value::U32(1000));
    let err = build_err(&md);
    assert!(
        err.contains("1000") && err.contains("eos_token_id"),
        "{err}"
    );
}

#[test]
fn short_token_type_array_is_an_error() {
    let mut md = tiny_bpe();
    set(&mut md, "tokenizer.ggml.token_type", ints(&[3, 3]));
    let err = build_err(&md);
    assert!(
        err.contains("token_type") && err.contains("2 entries"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Special tokens: attributes, end of generation, partition

#[test]
fn end_of_generation_texts_become_stop_and_control_tokens() {
    // As llama.cpp does to Qwen 2.5's ordinary "</s>" and Gemma 3's user-defined one.
    let mut md = tiny_bpe();
    let tokens = [
        "<|hi|>",
        "</hi>",
        "h",
        "i",
        "hi",
        "Ġ",
        "Ġhi",
        "<",
        "|",
        ">",
        "<|im_end|>",
        "</s>",
        "<|fim_pad|>",
        "<|endoftext|>",
    ];
    set(&mut md, "tokenizer.ggml.tokens", strs(&tokens));
    set(
        &mut md,
        "tokenizer.ggml.token_type",
        ints(&[3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 3, 1, 3, 4]),
    );
    set(&mut md, "tokenizer.ggml.merges", strs(&["h i", "Ġ hi"]));
    set(&mut md, "tokenizer.ggml.eot_token_id", Value::U32(10));
    let tok = build(&md);
    assert_eq!(tok.stop_token_ids(), [1, 10, 11, 12, 13]);
    assert!(tok.is_control(11) && tok.is_control(13));
    // Now control, "</s>" is text unless special tokens are parsed.
    assert_eq!(tok.encode("</s>", true).expect("encode"), [11]);
    assert_ne!(tok.encode("</s>", false).expect("encode"), [11]);
}

#[test]
fn longer_special_tokens_win_anywhere_in_the_text() {
    // llama.cpp claims each special token's occurrences longest first, so "abc" wins over "xa"
    // although "xa" starts earlier (leftmost-longest matching would take "xa").
    let mut md = tiny_bpe();
    let tokens = ["<|hi|>", "</hi>", "x", "a", "b", "c", "xa", "abc"];
    set(&mut md, "tokenizer.ggml.tokens", strs(&tokens));
    set(
        &mut md,
        "tokenizer.ggml.token_type",
        ints(&[3, 3, 1, 1, 1, 1, 4, 4]),
    );
    set(&mut md, "tokenizer.ggml.merges", strs(&[]));
    let tok = build(&md);
    assert_eq!(tok.encode("xabc", false).expect("encode"), [2, 7]);
    assert_eq!(tok.encode("xaxabc", false).expect("encode"), [6, 2, 7]);
}

// ---------------------------------------------------------------------------------------------
// SentencePiece

/// Ids of the tiny SentencePiece vocabulary's pieces.
mod spm_ids {
    pub const UNK: u32 = 0;
    pub const BOS: u32 = 1;
    pub const EOS: u32 = 2;
    /// `<0x00>` … `<0xFF>` are 3 … 258.
    pub const BYTE0: u32 = 3;
    pub const SPACE: u32 = 259;
    pub const H: u32 = 260;
    pub const SPACE_H: u32 = 264;
    pub const HELLO: u32 = 268;
    pub const SPACE_HELLO: u32 = 269;
    pub const A: u32 = 270;
    pub const B: u32 = 271;
    pub const C: u32 = 272;
    pub const AB: u32 = 273;
    pub const BC: u32 = 274;
    pub const CTRL: u32 = 275;
    pub const USER: u32 = 276;
    pub const SPACES: u32 = 277;
}

/// A tiny SentencePiece vocabulary: `<unk> <s> </s>`, 256 byte tokens, pieces that merge
/// "▁hello" as ll, llo, he, hello, ▁hello (so "▁h", queued early, never wins), "a b c ab bc", a control and a user-defined token.
fn tiny_spm() -> HashMap<String, Value> {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    let pieces: &[(&str, f32, i32)] = &[
        ("▁", -1.0, 1),
        ("h", -2.0, 1),
        ("e", -2.0, 1),
        ("l", -2.0, 1),
        ("o", -2.0, 1),
        ("▁h", -6.0, 1),
        ("he", -3.0, 1),
        ("ll", -1.0, 1),
        ("llo", -2.0, 1),
        ("hello", -4.0, 1),
        ("▁hello", -5.0, 1),
        ("a", -2.0, 1),
        ("b", -2.0, 1),
        ("c", -2.0, 1),
        ("ab", -10.0, 1),
        ("bc", -9.0, 1),
        ("<ctrl>", 0.0, 3),
        ("<user>", 0.0, 4),
        ("  ", 0.0, 4),
    ];
    for &(text, score, kind) in pieces {
        tokens.push(text.into());
        scores.push(score);
        types.push(kind);
    }
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    HashMap::from([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("default".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), strs(&tokens)),
        (
            "tokenizer.ggml.scores".to_string(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.token_type".to_string(), ints(&types)),
    ])
}

fn spm_without_space_prefix() -> GgufTokenizer {
    let mut md = tiny_spm();
    set(
        &mut md,
        "tokenizer.ggml.add_space_prefix",
        Value::Bool(false),
    );
    build(&md)
}

#[test]
fn spm_defaults_follow_llama_cpp() {
    use spm_ids::*;
    let tok = build(&tiny_spm());
    assert_eq!(tok.bos_token_id(), Some(BOS));
    assert_eq!(tok.eos_token_id(), EOS);
    assert!(tok.add_bos_token());
    // "</s>" is on llama.cpp's end-of-generation list as well as EOS.
    assert_eq!(tok.stop_token_ids(), [EOS]);
    assert!(tok.inner().is_none());
    assert_eq!(tok.token_kind(UNK), Some(TokenKind::Unknown));
    assert_eq!(tok.token_kind(BYTE0 + 0x41), Some(TokenKind::Byte));
    assert_eq!(tok.token_kind(USER), Some(TokenKind::UserDefined));
}

#[test]
fn spm_merges_pieces_and_marks_spaces() {
    use spm_ids::*;
    let tok = build(&tiny_spm());
    // add_space_prefix (the default): "hello hello" is "▁hello▁hello".
    assert_eq!(
        tok.encode("hello hello", false).expect("encode"),
        [SPACE_HELLO, SPACE_HELLO]
    );
    assert_eq!(
        tok.encode_with("hello", SPECIAL_AND_BOS).expect("encode"),
        [BOS, SPACE_HELLO]
    );
    let tok = spm_without_space_prefix();
    assert_eq!(
        tok.encode("hello hello", false).expect("encode"),
        [HELLO, SPACE_HELLO]
    );
    assert_eq!(tok.encode(" ", false).expect("encode"), [SPACE]);
    assert_eq!(tok.encode("", false).expect("encode"), Vec::<u32>::new());
    assert_eq!(tok.encode_with("", SPECIAL_AND_BOS).expect("encode"), [BOS]);
}

/// [`tiny_spm`] without the space prefix, with token `id`'s score changed.
fn spm_with_score(id: u32, score: f32) -> HashMap<String, Value> {
    let mut md = tiny_spm();
    set(
        &mut md,
        "tokenizer.ggml.add_space_prefix",
        Value::Bool(false),
    );
    if let Some(Value::Array(scores)) = md.get_mut("tokenizer.ggml.scores") {
        scores[id as usize] = Value::F32(score);
    }
    md
}

#[test]
fn spm_merges_by_score_not_by_length() {
    use spm_ids::*;
    let tok = spm_without_space_prefix();
    // "bc" (-9) outscores "ab" (-10): a + bc, although "ab" comes first.
    assert_eq!(tok.encode("abc", false).expect("encode"), [A, BC]);
    let md = spm_with_score(BC, -11.0);
    assert_eq!(build(&md).encode("abc", false).expect("encode"), [AB, C]);
    // Equal scores: the leftmost pair merges first.
    let mut md = spm_with_score(BC, -10.0);
    assert_eq!(build(&md).encode("abc", false).expect("encode"), [AB, C]);
    // A missing score array means all zero (llama.cpp): ties everywhere, leftmost first.
    md.remove("tokenizer.ggml.scores");
    assert_eq!(build(&md).encode("abc", false).expect("encode"), [AB, C]);
}

#[test]
fn spm_falls_back_to_bytes() {
    use spm_ids::*;
    let tok = spm_without_space_prefix();
    // "é" is not a piece: its two UTF-8 bytes are.
    assert_eq!(
        tok.encode("hé", false).expect("encode"),
        [H, BYTE0 + 0xC3, BYTE0 + 0xA9]
    );
    assert_eq!(tok.encode("a\0b", false).expect("encode"), [A, BYTE0, B]);
    let ids = tok.encode("é🦀 hello", false).expect("encode");
    assert_eq!(tok.decode(&ids, false).expect("decode"), "é🦀 hello");
    // The text "<0x41>" is not the byte token: only a vocabulary piece could make it one.
    let ids = tok.encode("<0x41>", true).expect("encode");
    assert!(!ids.contains(&(BYTE0 + 0x41)), "{ids:?}");
    // "▁" in the text is the space marker's own bytes, which merge like a space.
    assert_eq!(tok.encode("▁", false).expect("encode"), [SPACE]);
}

#[test]
fn spm_without_byte_tokens_reports_the_byte() {
    let mut md = tiny_spm();
    let Some(Value::Array(tokens)) = md.get_mut("tokenizer.ggml.tokens") else {
        unreachable!("tiny_spm has tokens");
    };
    tokens[3 + 0xC3] = Value::String("<0xC3-gone>".into());
    let err = build(&md)
        .encode("é", false)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("0xC3"), "{err}");
}

#[test]
fn spm_special_tokens_and_space_prefix_after_them() {
    use spm_ids::*;
    let tok = build(&tiny_spm());
    // After a special token the next text gets the space prefix again (llama.cpp).
    assert_eq!(
        tok.encode("<ctrl>hello", true).expect("encode"),
        [CTRL, SPACE_HELLO]
    );
    // Without special parsing, "<ctrl>" is text (bytes here); "<user>" is always a piece.
    let plain = tok.encode("<ctrl><user>", false).expect("encode");
    assert!(
        !plain.contains(&CTRL) && plain.ends_with(&[USER]),
        "{plain:?}"
    );
    assert_eq!(
        tok.encode("<user>hello", false).expect("encode"),
        [USER, SPACE_HELLO]
    );
    // The user-defined "  " is cut out before spaces become ▁.
    assert_eq!(
        spm_without_space_prefix()
            .encode("a  b", false)
            .expect("encode"),
        [A, SPACES, B]
    );
}

#[test]
fn spm_decoding_follows_llama_cpp() {
    use spm_ids::*;
    let tok = build(&tiny_spm());
    // The first token loses one leading space (the space prefix); later ones keep theirs.
    assert_eq!(
        tok.decode(&[SPACE_HELLO, SPACE_HELLO], false)
            .expect("decode"),
        "hello hello"
    );
    // After BOS nothing is stripped: llama.cpp strips only from the very first token.
    assert_eq!(
        tok.decode(&[BOS, SPACE_HELLO], true).expect("decode"),
        " hello"
    );
    assert_eq!(
        tok.decode(&[BOS, SPACE_HELLO], false).expect("decode"),
        "<s> hello"
    );
    assert_eq!(
        tok.decode(&[BYTE0 + 0xC3, BYTE0 + 0xA9, CTRL, USER], true)
            .expect("decode"),
        "é<user>"
    );
    // Half a character is U+FFFD.
    assert_eq!(
        tok.decode(&[BYTE0 + 0xC3], true).expect("decode"),
        "\u{FFFD}"
    );
    assert_eq!(tok.token_bytes(SPACE_H), Some(&b" h"[..]));
    assert_eq!(tok.token_bytes(BYTE0 + 0x0A), Some(&b"\n"[..]));
    // Without the space prefix nothing is stripped.
    assert_eq!(
        spm_without_space_prefix()
            .decode(&[SPACE_HELLO], false)
            .expect("decode"),
        " hello"
    );
}

#[test]
fn spm_digest_depends_on_scores() {
    let a = spm_without_space_prefix();
    let b = build(&spm_with_score(spm_ids::BC, -11.0));
    assert_eq!(a.digest(), spm_without_space_prefix().digest());
    assert_ne!(a.digest(), b.digest());
    assert_ne!(a.digest(), build(&tiny_bpe()).digest());
}

#[test]
fn short_score_array_is_an_error() {
    let mut md = tiny_spm();
    set(
        &mut md,
        "tokenizer.ggml.scores",
        Value::Array(vec![Value::F32(0.0)]),
    );
    let err = build_err(&md);
    assert!(err.contains("tokenizer.ggml.scores"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Hostile input

/// Runs `f`, failing if it takes longer than a bound no O(n log n) tokenizer comes near on a
/// megabyte (an O(n²) merge takes hours there).
fn within_bound<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(30), "{what} took {took:?}");
    out
}

#[test]
fn a_megabyte_of_spaces_is_fast_for_both_kinds() {
    let spaces = " ".repeat(1 << 20);
    let spm = spm_without_space_prefix();
    let ids = within_bound("SPM, spaces", || spm.encode(&spaces, false)).expect("encode");
    // The user-defined "  " claims every pair.
    assert_eq!(ids.len(), 1 << 19);
    let bpe = build(&tiny_bpe());
    let ids = within_bound("BPE, spaces", || bpe.encode(&spaces, false)).expect("encode");
    assert_eq!(bpe.decode(&ids, false).expect("decode"), spaces);
}

#[test]
fn a_megabyte_of_mergeable_text_is_fast() {
    let spm = spm_without_space_prefix();
    // "hello", then "▁hello" 179,999 times, then the last "▁".
    let text = "hello ".repeat(180_000);
    let ids = within_bound("SPM, words", || spm.encode(&text, false)).expect("encode");
    assert_eq!(ids.len(), 180_001);
    let text = "ab".repeat(1 << 19);
    let ids = within_bound("SPM, pairs", || spm.encode(&text, false)).expect("encode");
    assert_eq!(ids.len(), 1 << 19);
    let text = "<ctrl>\0".repeat(100_000);
    let ids = within_bound("SPM, specials", || spm.encode(&text, true)).expect("encode");
    assert_eq!(ids.len(), 200_000);
}

#[test]
fn odd_characters_round_trip() {
    let text = "\u{FFFD}\u{0}\u{1F}\u{7F}\u{FEFF}\u{10FFFF}\u{E000} \u{2581}\u{2581}";
    let spm = spm_without_space_prefix();
    let ids = spm.encode(text, true).expect("encode");
    assert_eq!(
        spm.decode(&ids, false).expect("decode"),
        text.replace('\u{2581}', " ")
    );
    let bpe = build(&tiny_bpe());
    // The tiny BPE vocabulary has no byte tokens for most of these: its BPE drops them, but it
    // must not fail or panic.
    bpe.encode(text, true).expect("encode");
}
