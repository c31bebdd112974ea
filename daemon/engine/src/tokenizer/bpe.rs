//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): the pre-tokenizer named by
//! `tokenizer.ggml.pre` and the merges, run by the `tokenizers` crate on the text between
//! special tokens.
//!
//! Only pre-tokenizers whose regexes are reproduced here from llama.cpp's `llama-vocab.cpp` are
//! accepted; any other value is an error naming it, never a guess, since a wrong split silently
//! degrades every generation. The `gpt-2`, `llama-bpe` and `starcoder` paths were checked once,
//! by hand, against llama.cpp's own `models/ggml-vocab-*.gguf` files; `smollm` and `qwen2` are
//! pinned by the golden and fixture tests.

use std::collections::HashMap;
use std::sync::OnceLock;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::{Result, TokenizerError};

/// The `tokenizer.ggml.pre` values this module knows how to reproduce.
pub const SUPPORTED_PRE_TOKENIZERS: &str =
    "smollm, starcoder, gpt2, gpt-2, llama3, llama-v3, llama-bpe, qwen2, deepseek-r1-qwen";

/// llama.cpp's LLAMA3 split regex: the tokenizer.json one with `(?i:'s|...)` spelled out case by
/// case (llama.cpp PR 6920), which also keeps Unicode case folding from matching e.g. `'ſ`.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's QWEN2 split regex: LLAMA3's with single digits (`\p{N}` for `\p{N}{1,3}`),
/// contractions spelled out the same way.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE model with its pre-tokenizer; it sees only text between special tokens.
#[derive(Debug, Clone)]
pub(super) struct Bpe {
    inner: Tokenizer,
}

impl Bpe {
    /// The model for vocabulary `tokens`, `merges` (`"left right"` rules, by rank) and the
    /// pre-tokenizer called `pre`.
    pub(super) fn new(tokens: &[String], merges: &[&str], pre: &str) -> Result<Self> {
        let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre)?;
        let merges = merges
            .iter()
            .enumerate()
            .map(|(index, merge)| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::BadMerge {
                        index,
                        merge: merge.to_string(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .filter_map(|(id, t)| u32::try_from(id).ok().map(|id| (t.clone(), id)))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(TokenizerError::Build)?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        Ok(Self { inner })
    }

    /// Appends the ids of `text` (no special tokens in it) to `out`.
    pub(super) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(TokenizerError::Encode)?;
        out.extend_from_slice(encoding.get_ids());
        Ok(())
    }

    /// The `tokenizers` tokenizer that runs the pre-tokenizer and merges.
    pub(super) fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value, and whether BPE should take a whole
/// pre-token that is in the vocabulary as is (llama.cpp's `ignore_merges`).
fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let gpt2 = || ByteLevel::new(false, true, true);
    let regex_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(TokenizerError::Build)?;
        let bytes = ByteLevel::new(false, true, false);
        Ok(Sequence::new(vec![split.into(), bytes.into()]).into())
    };
    match pre {
        // llama.cpp (one case for both names): regexes "\p{N}" then the GPT-2 one.
        "smollm" | "starcoder" => Ok((
            Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into(),
            false,
        )),
        // llama.cpp names this "gpt-2"; "gpt2" is accepted as the same thing.
        "gpt2" | "gpt-2" => Ok((gpt2().into(), false)),
        "llama3" | "llama-v3" | "llama-bpe" => Ok((regex_then_bytes(LLAMA3_REGEX)?, true)),
        // llama.cpp: LLAMA_VOCAB_PRE_TYPE_QWEN2, merges not ignored.
        "qwen2" | "deepseek-r1-qwen" => Ok((regex_then_bytes(QWEN2_REGEX)?, false)),
        other => Err(TokenizerError::UnsupportedPre(other.to_string())),
    }
}

/// Whether a missing `tokenizer.ggml.add_bos_token` means "add BOS" for this pre-tokenizer
/// (llama.cpp turns it on for the llama3 family).
pub(super) fn adds_bos_by_default(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-v3" | "llama-bpe")
}

/// The bytes a byte-level vocabulary entry stands for: GPT-2's byte-to-character table
/// reversed (`Ġ` is a space). A character outside the table stands for its own UTF-8 bytes,
/// as in the `tokenizers` crate's byte-level decoder.
pub(super) fn byte_level_bytes(text: &str, out: &mut Vec<u8>) {
    let table = char_to_byte();
    for c in text.chars() {
        match table.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// GPT-2's table from the printable characters that stand for bytes back to the bytes.
fn char_to_byte() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 0x100u32;
        let mut table = HashMap::with_capacity(256);
        for b in 0..=255u8 {
            let c = if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
                next += 1;
                c
            };
            table.insert(c, b);
        }
        table
    })
}
