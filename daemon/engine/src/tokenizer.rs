//! A byte-level BPE tokenizer built from a GGUF file's metadata.
//!
//! GGUF files carry their tokenizer as metadata: the vocabulary (`tokenizer.ggml.tokens`), the
//! BPE merges, each token's type, the special token ids and the name of the pre-tokenizer
//! (`tokenizer.ggml.pre`). [`GgufTokenizer::from_metadata`] turns that into a
//! [`tokenizers::Tokenizer`] that splits text exactly as llama.cpp does for the same file.
//!
//! **Architecture Invariant:** only what llama.cpp would do is done. Only the `gpt2` (byte-level
//! BPE) tokenizer model is supported, and only pre-tokenizers whose regexes are reproduced here
//! from llama.cpp's `llama-vocab.cpp`; any other value is an error naming it, never a guess,
//! since a wrong split silently degrades every generation.
//!
//! Control tokens (token type 3, e.g. `<|im_start|>`) are only recognised in text when the
//! caller asks for it ([`EncodeOptions::parse_special`]): text from users must not be able to
//! forge them. User-defined tokens (type 4) are always recognised, as in llama.cpp.
//!
//! Testing: the golden tests (`tokenizer_golden_tests.rs`) compare the default model's tokenizer
//! with llama.cpp's ids. The `gpt-2`, `llama-bpe` and `starcoder` paths were checked once, by
//! hand, the same way against llama.cpp's own `models/ggml-vocab-*.gguf` files (its vocabulary
//! test inputs plus the golden strings, with and without special parsing and BOS: all equal);
//! those files are not in this repository, so only the `smollm` path is pinned by CI.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, Decoder, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GGUF token type of a control token (`<|im_start|>`, `<|endoftext|>`...).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of a user-defined token, matched in text like a control token but always.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The `tokenizer.ggml.pre` values this module knows how to reproduce.
pub const SUPPORTED_PRE_TOKENIZERS: &str =
    "smollm, starcoder, gpt2, gpt-2, llama3, llama-v3, llama-bpe";

/// Vocabulary entries that end a turn when the model emits them, as in llama.cpp's list of
/// end-of-generation tokens.
const STOP_TOKEN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
];

/// llama.cpp's LLAMA3 split regex: the tokenizer.json one with `(?i:'s|...)` spelled out case by
/// case (llama.cpp PR 6920), which also keeps Unicode case folding from matching e.g. `'ſ`.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Everything that can go wrong while building or using a [`GgufTokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required metadata key is absent.
    #[error("GGUF metadata has no `{key}`")]
    MissingKey {
        /// The key.
        key: &'static str,
    },
    /// A metadata key holds the wrong kind of value.
    #[error("GGUF metadata `{key}` should be {expected}, found {found}")]
    WrongType {
        /// The key (with an element index for arrays).
        key: String,
        /// What it should hold.
        expected: &'static str,
        /// What it holds.
        found: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer other than byte-level BPE.
    #[error("unsupported tokenizer.ggml.model `{0}`: only `gpt2` (byte-level BPE) is supported")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this module does not reproduce.
    #[error(
        "unsupported tokenizer.ggml.pre `{0}`: supported pre-tokenizers are {SUPPORTED_PRE_TOKENIZERS}"
    )]
    UnsupportedPre(String),
    /// A merge rule is not two tokens separated by one space.
    #[error("tokenizer.ggml.merges[{index}] = {merge:?} is not of the form \"left right\"")]
    BadMerge {
        /// Its index.
        index: usize,
        /// The rule.
        merge: String,
    },
    /// An array has a different length from the vocabulary.
    #[error("GGUF metadata `{key}` has {len} entries but the vocabulary has {vocab_size}")]
    LengthMismatch {
        /// The key.
        key: &'static str,
        /// Its length.
        len: usize,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A token id in the metadata (or given to [`GgufTokenizer::decode`]) is not in the
    /// vocabulary.
    #[error("token id {id} from {what} is out of range for a vocabulary of {vocab_size}")]
    IdOutOfRange {
        /// Where the id came from.
        what: String,
        /// The id.
        id: u64,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The `tokenizers` crate refused to build the tokenizer.
    #[error("building the tokenizer: {0}")]
    Build(#[source] tokenizers::Error),
    /// The `tokenizers` crate failed to encode text.
    #[error("encoding text: {0}")]
    Encode(#[source] tokenizers::Error),
    /// The `tokenizers` crate failed to decode tokens.
    #[error("decoding tokens: {0}")]
    Decode(#[source] tokenizers::Error),
}

/// Shorthand for results in this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// How [`GgufTokenizer::encode_with`] should treat its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncodeOptions {
    /// Control tokens written in the text (e.g. `<|im_start|>`) become their ids; when false they
    /// are tokenized as the plain text they spell.
    pub parse_special: bool,
    /// Prepend the BOS token, if the GGUF asks for one (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

/// A GGUF model's tokenizer: text to token ids and back, plus the special ids generation needs.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// Recognises control tokens written in the text.
    parse_special: Tokenizer,
    /// Tokenizes control tokens' text like any other text.
    plain: Tokenizer,
    decoder: ByteLevelDecoder,
    /// The raw vocabulary, indexed by id.
    tokens: Vec<String>,
    /// Whether each id is a control token.
    control: Vec<bool>,
    bos: Option<u32>,
    eos: u32,
    add_bos: bool,
    stop_ids: Vec<u32>,
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata (`Content::metadata`).
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model = get_str(md, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre_name = get_str(md, "tokenizer.ggml.pre")?;
        let (pre, ignore_merges) = pre_tokenizer(pre_name)?;

        let tokens: Vec<String> = get_str_array(md, "tokenizer.ggml.tokens")?
            .into_iter()
            .map(String::from)
            .collect();
        let vocab_size = tokens.len();
        let merges = get_str_array(md, "tokenizer.ggml.merges")?
            .into_iter()
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
        let token_types = match md.get("tokenizer.ggml.token_type") {
            // llama.cpp treats a missing type array as "all normal".
            None => vec![1; vocab_size],
            Some(_) => {
                let types = get_i32_array(md, "tokenizer.ggml.token_type")?;
                if types.len() != vocab_size {
                    return Err(TokenizerError::LengthMismatch {
                        key: "tokenizer.ggml.token_type",
                        len: types.len(),
                        vocab_size,
                    });
                }
                types
            }
        };

        let id_key = |key: &'static str| -> Result<Option<u32>> {
            let Some(id) = get_u64_opt(md, key)? else {
                return Ok(None);
            };
            match u32::try_from(id) {
                Ok(id) if (id as usize) < vocab_size => Ok(Some(id)),
                _ => Err(TokenizerError::IdOutOfRange {
                    what: key.to_string(),
                    id,
                    vocab_size,
                }),
            }
        };
        let eos = id_key("tokenizer.ggml.eos_token_id")?.ok_or(TokenizerError::MissingKey {
            key: "tokenizer.ggml.eos_token_id",
        })?;
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        // llama.cpp's default when the key is absent: on for the llama3 family, off otherwise.
        let add_bos = get_bool_opt(md, "tokenizer.ggml.add_bos_token")?
            .unwrap_or(matches!(pre_name, "llama3" | "llama-v3" | "llama-bpe"));
        if add_bos && bos.is_none() {
            return Err(TokenizerError::MissingKey {
                key: "tokenizer.ggml.bos_token_id",
            });
        }

        let mut stop_ids = vec![eos];
        let named_ids = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
            .into_iter()
            .map(id_key)
            .collect::<Result<Vec<_>>>()?;
        let by_text = (0..vocab_size)
            .filter(|&id| STOP_TOKEN_TEXTS.contains(&tokens[id].as_str()))
            .filter_map(|id| u32::try_from(id).ok());
        for id in named_ids.into_iter().flatten().chain(by_text) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }

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
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let control: Vec<bool> = token_types
            .iter()
            .map(|&t| t == TOKEN_TYPE_CONTROL)
            .collect();
        let added = |wanted: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&token_types)
                .filter(|(_, &t)| t == wanted)
                .map(|(text, _)| AddedToken::from(text.clone(), special))
                .collect()
        };
        inner.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
        inner.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);

        Ok(Self {
            parse_special: inner,
            plain,
            decoder: ByteLevelDecoder::default(),
            tokens,
            control,
            bos,
            eos,
            add_bos,
            stop_ids,
        })
    }

    /// Tokenizes `text` without adding BOS. With `parse_special`, control tokens written in the
    /// text (e.g. `<|im_start|>`) become their ids; without, they are tokenized as plain text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        self.encode_with(
            text,
            EncodeOptions {
                parse_special,
                add_bos: false,
            },
        )
    }

    /// Tokenizes `text` as `options` say. BOS is prepended only when `options.add_bos` is set
    /// *and* the GGUF says `tokenizer.ggml.add_bos_token = true`.
    pub fn encode_with(&self, text: &str, options: EncodeOptions) -> Result<Vec<u32>> {
        let tokenizer = if options.parse_special {
            &self.parse_special
        } else {
            &self.plain
        };
        let encoding = tokenizer
            .encode_fast(text, false)
            .map_err(TokenizerError::Encode)?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if options.add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Turns token ids back into text; with `skip_special_tokens`, control tokens are left out.
    /// Bytes that do not form valid UTF-8 become U+FFFD. An id outside the vocabulary is an
    /// error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut pieces = Vec::with_capacity(ids.len());
        for &id in ids {
            let text = self
                .token_text(id)
                .ok_or_else(|| TokenizerError::IdOutOfRange {
                    what: "decode".to_string(),
                    id: u64::from(id),
                    vocab_size: self.vocab_size(),
                })?;
            if !(skip_special_tokens && self.is_control(id)) {
                pieces.push(text.to_string());
            }
        }
        self.decoder.decode(pieces).map_err(TokenizerError::Decode)
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The beginning-of-sequence token, if the GGUF names one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos_token_id(&self) -> u32 {
        self.eos
    }

    /// Whether the GGUF asks for BOS at the start of a prompt (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// The raw vocabulary string of `id` (byte-level encoded, e.g. `Ġhello`), as chat templates
    /// want for `bos_token`/`eos_token`; `None` outside the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Ids that end generation: EOS, `tokenizer.ggml.eot_token_id`/`eom_token_id` when present,
    /// and the end-of-turn tokens `<|im_end|>`, `<|eot_id|>`, `<|eom_id|>`, `<|end_of_text|>`,
    /// `<|endoftext|>` when in the vocabulary. EOS comes first; there are no duplicates.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Whether `id` is a control token (GGUF token type 3).
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// The underlying `tokenizers` tokenizer, recognising control tokens in text.
    pub fn inner(&self) -> &Tokenizer {
        &self.parse_special
    }
}

/// The pre-tokenizer for a `tokenizer.ggml.pre` value, and whether BPE should take a whole
/// pre-token that is in the vocabulary as is (llama.cpp's `ignore_merges`).
fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let gpt2 = || ByteLevel::new(false, true, true);
    match pre {
        // llama.cpp (one case for both names): regexes "\p{N}" then the GPT-2 one.
        "smollm" | "starcoder" => Ok((
            Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into(),
            false,
        )),
        // llama.cpp names this "gpt-2"; "gpt2" is accepted as the same thing.
        "gpt2" | "gpt-2" => Ok((gpt2().into(), false)),
        "llama3" | "llama-v3" | "llama-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_REGEX.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(TokenizerError::Build)?;
            let bytes = ByteLevel::new(false, true, false);
            Ok((Sequence::new(vec![split.into(), bytes.into()]).into(), true))
        }
        other => Err(TokenizerError::UnsupportedPre(other.to_string())),
    }
}

fn describe(value: &Value) -> String {
    format!("{:?}", value.value_type())
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &'static str) -> Result<&'a Value> {
    md.get(key).ok_or(TokenizerError::MissingKey { key })
}

fn get_str<'a>(md: &'a HashMap<String, Value>, key: &'static str) -> Result<&'a str> {
    match get(md, key)? {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(key.to_string(), "a string", other)),
    }
}

fn wrong_type(key: String, expected: &'static str, found: &Value) -> TokenizerError {
    TokenizerError::WrongType {
        key,
        expected,
        found: describe(found),
    }
}

fn get_array<'a>(md: &'a HashMap<String, Value>, key: &'static str) -> Result<&'a [Value]> {
    match get(md, key)? {
        Value::Array(items) => Ok(items),
        other => Err(wrong_type(key.to_string(), "an array", other)),
    }
}

fn get_str_array<'a>(md: &'a HashMap<String, Value>, key: &'static str) -> Result<Vec<&'a str>> {
    get_array(md, key)?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(wrong_type(format!("{key}[{i}]"), "a string", other)),
        })
        .collect()
}

fn get_i32_array(md: &HashMap<String, Value>, key: &'static str) -> Result<Vec<i32>> {
    get_array(md, key)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            as_i64(v)
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| wrong_type(format!("{key}[{i}]"), "a 32-bit integer", v))
        })
        .collect()
}

fn as_i64(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(n) => Some(n.into()),
        Value::I8(n) => Some(n.into()),
        Value::U16(n) => Some(n.into()),
        Value::I16(n) => Some(n.into()),
        Value::U32(n) => Some(n.into()),
        Value::I32(n) => Some(n.into()),
        Value::U64(n) => i64::try_from(n).ok(),
        Value::I64(n) => Some(n),
        _ => None,
    }
}

fn get_u64_opt(md: &HashMap<String, Value>, key: &'static str) -> Result<Option<u64>> {
    let Some(value) = md.get(key) else {
        return Ok(None);
    };
    as_i64(value)
        .and_then(|n| u64::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| wrong_type(key.to_string(), "a non-negative integer", value))
}

fn get_bool_opt(md: &HashMap<String, Value>, key: &'static str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(key.to_string(), "a bool", other)),
    }
}

#[cfg(test)]
#[path = "tokenizer_golden_tests.rs"]
mod golden;

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny byte-level vocabulary: single characters, two merges, and control tokens.
    fn tiny_metadata() -> HashMap<String, Value> {
        let tokens = ["<|hi|>", "</hi>", "h", "i", "hi", "Ġ", "Ġhi", "<", "|", ">"];
        let types = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1];
        let strs =
            |xs: &[&str]| Value::Array(xs.iter().map(|s| Value::String(s.to_string())).collect());
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
            ("tokenizer.ggml.merges".to_string(), strs(&["h i", "Ġ hi"])),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1)),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(0)),
            (
                "tokenizer.ggml.add_bos_token".to_string(),
                Value::Bool(true),
            ),
        ])
    }

    fn build_err(md: &HashMap<String, Value>) -> String {
        match GgufTokenizer::from_metadata(md) {
            Ok(_) => "built without error".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tiny_vocabulary_round_trips() {
        let tok = GgufTokenizer::from_metadata(&tiny_metadata()).expect("tokenizer");
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
        let with_bos = EncodeOptions {
            parse_special: true,
            add_bos: true,
        };
        assert_eq!(tok.encode_with("hi", with_bos).expect("encode"), [0, 4]);
        assert_eq!(
            tok.decode(&[0, 4, 6, 1], false).expect("decode"),
            "<|hi|>hi hi</hi>"
        );
        assert_eq!(tok.decode(&[0, 4, 6, 1], true).expect("decode"), "hi hi");
        assert_eq!(tok.stop_token_ids(), [1]);
        assert!(tok.is_control(0) && !tok.is_control(4) && !tok.is_control(99));
        assert_eq!(tok.token_text(6), Some("Ġhi"));
    }

    #[test]
    fn llama3_pre_tokenizer_builds_and_adds_bos() {
        // No llama3 reference model is at hand: this checks that the regex compiles under onig
        // and that the llama3 defaults (BOS on when the key is absent) apply.
        let mut md = tiny_metadata();
        md.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("llama-bpe".into()),
        );
        md.remove("tokenizer.ggml.add_bos_token");
        let tok = GgufTokenizer::from_metadata(&md).expect("tokenizer");
        assert!(tok.add_bos_token());
        let with_bos = EncodeOptions {
            parse_special: true,
            add_bos: true,
        };
        assert_eq!(
            tok.encode_with("hi hi", with_bos).expect("encode"),
            [0, 4, 6]
        );
    }

    #[test]
    fn tokenizer_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<GgufTokenizer>();
    }

    #[test]
    fn decode_rejects_unknown_id() {
        let tok = GgufTokenizer::from_metadata(&tiny_metadata()).expect("tokenizer");
        let err = tok
            .decode(&[4, 10], false)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("token id 10"), "{err}");
    }

    #[test]
    fn missing_tokens_key_is_named() {
        let mut md = tiny_metadata();
        md.remove("tokenizer.ggml.tokens");
        let err = build_err(&md);
        assert!(err.contains("tokenizer.ggml.tokens"), "{err}");
    }

    #[test]
    fn mistyped_key_is_named() {
        let mut md = tiny_metadata();
        md.insert(
            "tokenizer.ggml.eos_token_id".into(),
            Value::String("1".into()),
        );
        let err = build_err(&md);
        assert!(err.contains("tokenizer.ggml.eos_token_id"), "{err}");
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        let mut md = tiny_metadata();
        md.insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
        let err = build_err(&md);
        assert!(err.contains("`qwen2`") && err.contains("smollm"), "{err}");
        // llama.cpp's "default" is a different regex set from GPT-2's; it is not guessed at.
        md.insert("tokenizer.ggml.pre".into(), Value::String("default".into()));
        assert!(build_err(&md).contains("`default`"));
    }

    #[test]
    fn sentencepiece_model_is_unsupported() {
        let mut md = tiny_metadata();
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        let err = build_err(&md);
        assert!(err.contains("`llama`") && err.contains("gpt2"), "{err}");
    }

    #[test]
    fn malformed_merge_is_named() {
        let mut md = tiny_metadata();
        md.insert(
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::String("hi".into())]),
        );
        let err = build_err(&md);
        assert!(err.contains("tokenizer.ggml.merges[0]"), "{err}");
    }

    #[test]
    fn out_of_range_eos_is_an_error() {
        let mut md = tiny_metadata();
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1000));
        let err = build_err(&md);
        assert!(
            err.contains("1000") && err.contains("eos_token_id"),
            "{err}"
        );
    }
}
