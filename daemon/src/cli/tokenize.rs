//! `agentd model tokenize --file F.gguf [--special] [--bos] [--json] TEXT...` or
//! `--input strings.json`: a GGUF file's tokenizer on given strings, for comparing with
//! llama.cpp (`bench/tokenizer_compare.py`). Only the file's metadata is read, never its
//! weights.

use agentd_engine::model::GgufFile;
use agentd_engine::tokenizer::{EncodeOptions, GgufTokenizer};
use anyhow::{Context, Result};
use clap::Args;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// The arguments of `agentd model tokenize`.
#[derive(Args)]
pub struct TokenizeArgs {
    /// The GGUF file whose tokenizer to use (only its metadata is read).
    #[arg(long)]
    pub file: PathBuf,
    /// Recognise control tokens written in the text (`<|im_start|>`), as llama.cpp's
    /// `special = true`; without it they are tokenized as the text they spell.
    #[arg(long)]
    pub special: bool,
    /// Add BOS (and EOS) when the file asks for them, as llama.cpp's `add_special`.
    #[arg(long)]
    pub bos: bool,
    /// Print a JSON list with one list of ids per text instead of one line per text.
    #[arg(long)]
    pub json: bool,
    /// Read the texts from this JSON file (a list of strings); prints JSON.
    #[arg(long, value_name = "FILE", conflicts_with = "texts")]
    pub input: Option<PathBuf>,
    /// The texts to tokenize.
    #[arg(required_unless_present = "input")]
    pub texts: Vec<String>,
}

/// Tokenizes the texts and prints their ids: JSON (`--json`, `--input`), else one line per text
/// of `id:piece` pairs.
pub fn run(args: TokenizeArgs) -> Result<()> {
    let file = GgufFile::open(&args.file)
        .with_context(|| format!("reading the metadata of {}", args.file.display()))?;
    let tokenizer = GgufTokenizer::from_metadata(file.metadata())
        .with_context(|| format!("building the tokenizer of {}", args.file.display()))?;
    let texts = match &args.input {
        Some(path) => read_texts(path)?,
        None => args.texts.clone(),
    };
    let options = EncodeOptions {
        parse_special: args.special,
        add_bos: args.bos,
    };
    let ids = texts
        .iter()
        .map(|text| tokenizer.encode_with(text, options))
        .collect::<Result<Vec<_>, _>>()?;
    if args.json || args.input.is_some() {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for ids in &ids {
            let line: Vec<String> = ids
                .iter()
                .map(|&id| format!("{id}:{:?}", tokenizer.token_text(id).unwrap_or("?")))
                .collect();
            println!("{}", line.join(" "));
        }
    }
    Ok(())
}

/// The strings of a JSON file holding a list of strings. JSON can spell a lone UTF-16
/// surrogate (`"\ud800"`), which no Rust string can hold; those become U+FFFD.
fn read_texts(path: &Path) -> Result<Vec<String>> {
    let json =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&replace_lone_surrogates(&json))
        .with_context(|| format!("{} is not a JSON list of strings", path.display()))
}

/// `json` with every `\uXXXX` escape of a UTF-16 surrogate that is not half of a pair replaced
/// by `\uFFFD`.
fn replace_lone_surrogates(json: &str) -> Cow<'_, str> {
    let bytes = json.as_bytes();
    // The code unit of a `\uXXXX` escape at `at`, if there is one.
    let escape_at = |at: usize| -> Option<u16> {
        let esc = bytes.get(at..at + 6)?;
        if esc[0] != b'\\' || esc[1] != b'u' {
            return None;
        }
        let hex = std::str::from_utf8(&esc[2..]).ok()?;
        u16::from_str_radix(hex, 16).ok()
    };
    let is_high = |u: u16| (0xD800..0xDC00).contains(&u);
    let is_low = |u: u16| (0xDC00..0xE000).contains(&u);
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] != b'\\' {
            at += 1;
            continue;
        }
        match escape_at(at) {
            Some(u) if is_high(u) && escape_at(at + 6).is_some_and(is_low) => at += 12,
            Some(u) if is_high(u) || is_low(u) => {
                let s = out.get_or_insert_with(|| String::with_capacity(json.len()));
                s.push_str(&json[copied..at]);
                s.push_str("\\uFFFD");
                at += 6;
                copied = at;
            }
            // Any other escape: skip the backslash and the character it escapes.
            _ => at += 2,
        }
    }
    match out {
        None => Cow::Borrowed(json),
        Some(mut s) => {
            s.push_str(&json[copied..]);
            Cow::Owned(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::replace_lone_surrogates;

    fn strings(json: &str) -> Vec<String> {
        serde_json::from_str(&replace_lone_surrogates(json)).expect("valid JSON")
    }

    #[test]
    fn lone_surrogates_become_replacement_characters() {
        assert_eq!(strings(r#"["a\ud800b"]"#), ["a\u{FFFD}b"]);
        assert_eq!(strings(r#"["\udc00\ud800"]"#), ["\u{FFFD}\u{FFFD}"]);
        // A pair is one character; an escaped backslash is not an escape.
        assert_eq!(strings(r#"["\ud83e\udd80"]"#), ["🦀"]);
        assert_eq!(strings(r#"["\\ud800"]"#), ["\\ud800"]);
        assert_eq!(strings(r#"["x", "\n\u0000"]"#), ["x", "\n\0"]);
    }
}
