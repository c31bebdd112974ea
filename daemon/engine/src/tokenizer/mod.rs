//! A GGUF model's tokenizer, built from the file's metadata, that gives llama.cpp's token ids.
//!
//! GGUF files carry their tokenizer as metadata: the vocabulary (`tokenizer.ggml.tokens`), each
//! token's type, the special token ids and either BPE merges and a pre-tokenizer name
//! (`tokenizer.ggml.model = gpt2`) or token scores (`tokenizer.ggml.model = llama`, the
//! SentencePiece style of Llama 2, Mistral and Gemma). [`GgufTokenizer::from_metadata`] reads
//! them; encoding then runs in two stages, as in llama.cpp's `llama_vocab::tokenize`:
//!
//! 1. `special`: special tokens written in the text are cut out as whole pieces — user-defined
//!    ones always, control and unknown ones only with [`EncodeOptions::parse_special`] (text
//!    from users must not be able to forge `<|im_start|>`) — longest first, as llama.cpp does.
//! 2. Each text fragment between them goes to the model: `bpe` (byte-level BPE on the
//!    `tokenizers` crate, pre-tokenizer by `tokenizer.ggml.pre`) or `spm` (llama.cpp's
//!    score-ordered merge with byte fallback; spaces become `▁`, and with
//!    `tokenizer.ggml.add_space_prefix` a space goes before the first fragment and before each
//!    fragment that follows a special token).
//!
//! Decoding turns each id into the bytes it stands for ([`GgufTokenizer::token_bytes`]:
//! `▁` back to a space, `<0xNN>` to its byte, byte-level characters to their bytes) and the
//! whole into UTF-8, lossily.
//!
//! **Architecture Invariant:** only what llama.cpp would do is done. Unknown tokenizer models or
//! pre-tokenizers are errors naming them, never guesses, since a wrong split silently degrades
//! every generation; the token attributes get llama.cpp's adjustments (its end-of-generation
//! texts become control tokens, so Qwen's `</s>` is one), and [`GgufTokenizer::stop_token_ids`]
//! is llama.cpp's end-of-generation set.
//!
//! Testing: `golden_tests.rs` pins the default model (SmolLM2) against llama.cpp's ids;
//! `fixture_tests.rs` checks about thirty strings per vocabulary (SmolLM2, Qwen 2.5, Gemma 3)
//! whose ids `bench/tokenizer_compare.py` took from llama.cpp, when those files are on disk;
//! that script compares whole corpora (hundreds of strings per vocabulary, with and without
//! special parsing). `tests.rs` covers a tiny hand-built vocabulary of each kind.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

mod bpe;
mod metadata;
mod special;
mod spm;

pub use bpe::SUPPORTED_PRE_TOKENIZERS;

use metadata::{
    get_bool_opt, get_f32_array, get_i32_array, get_str, get_str_array, get_str_opt,
    get_token_id_opt,
};
use special::{attr, Fragment, NamedIds, SpecialMatcher};

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
    /// `tokenizer.ggml.model` names a tokenizer other than byte-level BPE or SentencePiece.
    #[error(
        "unsupported tokenizer.ggml.model `{0}`: only `gpt2` (byte-level BPE) and `llama` \
         (SentencePiece) are supported"
    )]
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
    /// A per-token array is shorter than the vocabulary.
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
    /// A SentencePiece vocabulary has no token for a character of the text, nor for one of its
    /// bytes (llama.cpp throws here too).
    #[error("the vocabulary has no byte-fallback token for byte 0x{byte:02X}")]
    NoByteToken {
        /// The byte.
        byte: u8,
    },
    /// The special tokens could not be compiled into a matcher.
    #[error("building the special-token matcher: {0}")]
    Special(String),
    /// The `tokenizers` crate refused to build the BPE model.
    #[error("building the tokenizer: {0}")]
    Build(#[source] tokenizers::Error),
    /// The `tokenizers` crate failed to encode text.
    #[error("encoding text: {0}")]
    Encode(#[source] tokenizers::Error),
}

/// Shorthand for results in this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// How [`GgufTokenizer::encode_with`] should treat its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncodeOptions {
    /// Control tokens written in the text (e.g. `<|im_start|>`) become their ids; when false they
    /// are tokenized as the plain text they spell. User-defined tokens are recognised either way.
    pub parse_special: bool,
    /// Add the special tokens the GGUF asks for around a whole prompt, as llama.cpp's
    /// `add_special`: BOS first if `tokenizer.ggml.add_bos_token`, EOS last if
    /// `tokenizer.ggml.add_eos_token`.
    pub add_bos: bool,
}

/// What a vocabulary entry is, from its GGUF token type after llama.cpp's adjustments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Ordinary text.
    Normal,
    /// One byte of a character the vocabulary has no token for (`<0x41>`).
    Byte,
    /// A control token (`<|im_start|>`, `<end_of_turn>`): not text.
    Control,
    /// A token matched as a whole piece wherever its text is written (Gemma's `<table>`, runs
    /// of spaces).
    UserDefined,
    /// The unknown token.
    Unknown,
    /// Padding or a reserved slot: never produced from text, decoded as nothing.
    Unused,
}

/// Which algorithm turns text fragments into ids.
#[derive(Debug, Clone)]
enum Model {
    /// Byte-level BPE (`gpt2`), boxed: the `tokenizers` tokenizer is large.
    Bpe(Box<bpe::Bpe>),
    /// SentencePiece-style merges by score (`llama`).
    Spm(spm::Spm),
}

/// A GGUF model's tokenizer: text to token ids and back, plus the special ids generation needs.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    model: Model,
    /// The raw vocabulary, indexed by id.
    tokens: Vec<String>,
    /// Each token's attribute bits (`special::attr`).
    attrs: Vec<u16>,
    /// Finds special tokens written in text.
    specials: SpecialMatcher,
    /// Every token's bytes ([`Self::token_bytes`]), concatenated.
    piece_bytes: Vec<u8>,
    /// Where token `i`'s bytes are in `piece_bytes`: `piece_ends[i - 1]..piece_ends[i]`.
    piece_ends: Vec<usize>,
    bos: Option<u32>,
    eos: u32,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    stop_ids: Vec<u32>,
    digest: String,
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata (`Content::metadata`).
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model_name = get_str(md, "tokenizer.ggml.model")?;
        let is_spm = match model_name {
            "gpt2" => false,
            "llama" => true,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        // llama.cpp names an empty entry "[EMPTY_i]", so that it is never matched in text.
        let tokens: Vec<String> = get_str_array(md, "tokenizer.ggml.tokens")?
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.to_string()
                }
            })
            .collect();
        let vocab_size = tokens.len();
        let per_token = |key: &'static str, len: usize| -> Result<()> {
            if len < vocab_size {
                return Err(TokenizerError::LengthMismatch {
                    key,
                    len,
                    vocab_size,
                });
            }
            Ok(())
        };
        let mut attrs: Vec<u16> = match md.get("tokenizer.ggml.token_type") {
            // llama.cpp treats a missing type array as "all normal".
            None => vec![attr::NORMAL; vocab_size],
            Some(_) => {
                let types = get_i32_array(md, "tokenizer.ggml.token_type")?;
                per_token("tokenizer.ggml.token_type", types.len())?;
                types[..vocab_size]
                    .iter()
                    .map(|&t| special::attr_from_type(t))
                    .collect()
            }
        };

        let id = |key: &'static str| get_token_id_opt(md, key, vocab_size);
        // llama.cpp's defaults for SentencePiece vocabularies: BOS 1, EOS 2.
        let default_id = |id: u32| (is_spm && (id as usize) < vocab_size).then_some(id);
        let eos = id("tokenizer.ggml.eos_token_id")?.or(default_id(2)).ok_or(
            TokenizerError::MissingKey {
                key: "tokenizer.ggml.eos_token_id",
            },
        )?;
        let bos = id("tokenizer.ggml.bos_token_id")?.or(default_id(1));
        let pre = if is_spm {
            None
        } else {
            Some(get_str(md, "tokenizer.ggml.pre")?)
        };
        let add_bos = get_bool_opt(md, "tokenizer.ggml.add_bos_token")?
            .unwrap_or(is_spm || pre.is_some_and(bpe::adds_bos_by_default));
        let add_eos = get_bool_opt(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix =
            get_bool_opt(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(is_spm);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::MissingKey {
                key: "tokenizer.ggml.bos_token_id",
            });
        }
        let named = NamedIds {
            eos: Some(eos),
            eot: id("tokenizer.ggml.eot_token_id")?,
            eom: id("tokenizer.ggml.eom_token_id")?,
            fim_pre: id("tokenizer.ggml.prefix_token_id")?
                .or(id("tokenizer.ggml.fim_pre_token_id")?),
            fim_suf: id("tokenizer.ggml.suffix_token_id")?
                .or(id("tokenizer.ggml.fim_suf_token_id")?),
            fim_mid: id("tokenizer.ggml.middle_token_id")?
                .or(id("tokenizer.ggml.fim_mid_token_id")?),
            fim_pad: id("tokenizer.ggml.fim_pad_token_id")?,
            fim_rep: id("tokenizer.ggml.fim_rep_token_id")?,
            fim_sep: id("tokenizer.ggml.fim_sep_token_id")?,
        };
        let general_name = get_str_opt(md, "general.name")?.unwrap_or_default();
        let eog = special::adjust_attrs(&tokens, &mut attrs, named, general_name);
        let mut stop_ids = vec![eos];
        stop_ids.extend(eog.into_iter().filter(|&id| id != eos));

        let mut digest_input = DigestInput::new(model_name, pre.unwrap_or(""));
        let model = match pre {
            Some(pre) => {
                let merges = get_str_array(md, "tokenizer.ggml.merges")?;
                digest_input.strings(&merges);
                Model::Bpe(Box::new(bpe::Bpe::new(&tokens, &merges, pre)?))
            }
            None => {
                let scores = match md.get("tokenizer.ggml.scores") {
                    None => vec![0.0; vocab_size],
                    Some(_) => {
                        let scores = get_f32_array(md, "tokenizer.ggml.scores")?;
                        per_token("tokenizer.ggml.scores", scores.len())?;
                        scores
                    }
                };
                digest_input.floats(&scores[..vocab_size]);
                Model::Spm(spm::Spm::new(&tokens, &scores))
            }
        };
        let specials = SpecialMatcher::new(&tokens, &attrs)?;

        let mut piece_bytes = Vec::new();
        let mut piece_ends = Vec::with_capacity(vocab_size);
        for (text, &a) in tokens.iter().zip(&attrs) {
            token_piece(text, a, is_spm, &mut piece_bytes);
            piece_ends.push(piece_bytes.len());
        }

        digest_input.strings(&tokens);
        digest_input.attrs(&attrs);
        digest_input.ids(&[
            bos.map_or(u32::MAX, |b| b),
            eos,
            u32::from(add_bos),
            u32::from(add_eos),
            u32::from(add_space_prefix),
        ]);
        digest_input.ids(&stop_ids);
        Ok(Self {
            model,
            tokens,
            attrs,
            specials,
            piece_bytes,
            piece_ends,
            bos,
            eos,
            add_bos,
            add_eos,
            add_space_prefix,
            stop_ids,
            digest: digest_input.finish(),
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
    /// *and* the GGUF says `tokenizer.ggml.add_bos_token = true` (and EOS appended likewise).
    pub fn encode_with(&self, text: &str, options: EncodeOptions) -> Result<Vec<u32>> {
        let fragments =
            self.specials
                .partition(text, options.parse_special, &self.tokens, &self.attrs);
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if options.add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        match &self.model {
            Model::Bpe(bpe) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(t) => bpe.encode(t, &mut ids)?,
                        Fragment::Token(id) => ids.push(id),
                    }
                }
            }
            Model::Spm(spm) => {
                // llama.cpp: a space goes before the first text and any text after a special
                // token, when the vocabulary asks for a space prefix.
                let mut after_special = true;
                let mut escaped = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(t) => {
                            escaped.clear();
                            if self.add_space_prefix && after_special {
                                escaped.push_str(spm::SPACE_MARKER);
                            }
                            for c in t.chars() {
                                match c {
                                    ' ' => escaped.push_str(spm::SPACE_MARKER),
                                    c => escaped.push(c),
                                }
                            }
                            spm.encode(&escaped, &mut ids)?;
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            ids.push(id);
                            after_special = true;
                        }
                    }
                }
            }
        }
        if options.add_bos && self.add_eos {
            ids.push(self.eos);
        }
        Ok(ids)
    }

    /// Turns token ids back into text; with `skip_special_tokens`, control and unknown tokens
    /// are left out. Bytes that do not form valid UTF-8 become U+FFFD. An id outside the
    /// vocabulary is an error.
    ///
    /// As llama.cpp's `detokenize` (without removing BOS/EOS): when the vocabulary adds a space
    /// prefix, one space is taken off the start of the *first* token's text — and only that
    /// token's, so after a leading BOS nothing is stripped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            let piece = self
                .token_bytes(id)
                .ok_or_else(|| TokenizerError::IdOutOfRange {
                    what: "decode".to_string(),
                    id: u64::from(id),
                    vocab_size: self.vocab_size(),
                })?;
            let hidden = self.attrs[id as usize] & (attr::CONTROL | attr::UNKNOWN) != 0;
            if skip_special_tokens && hidden {
                continue;
            }
            let piece = match piece {
                [b' ', rest @ ..] if i == 0 && self.add_space_prefix => rest,
                piece => piece,
            };
            bytes.extend_from_slice(piece);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes `id` stands for in text (llama.cpp's `token_to_piece` with special tokens
    /// shown): the text with `▁` as a space for SentencePiece tokens, the bytes behind the
    /// characters for byte-level ones, the byte of a `<0xNN>` token, the raw text of control,
    /// user-defined and unknown tokens, nothing for unused ones. `None` outside the
    /// vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let end = *self.piece_ends.get(i)?;
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] };
        self.piece_bytes.get(start..end)
    }

    /// What kind of entry `id` is; `None` outside the vocabulary.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        let a = *self.attrs.get(id as usize)?;
        Some(if a & attr::CONTROL != 0 {
            TokenKind::Control
        } else if a & attr::UNKNOWN != 0 {
            TokenKind::Unknown
        } else if a & attr::USER_DEFINED != 0 {
            TokenKind::UserDefined
        } else if a & attr::NORMAL != 0 {
            TokenKind::Normal
        } else if a & attr::BYTE != 0 {
            TokenKind::Byte
        } else {
            TokenKind::Unused
        })
    }

    /// Number of tokens in the vocabulary (`tokenizer.ggml.tokens`; the embedding may have more
    /// rows).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The beginning-of-sequence token, if the GGUF names one (SentencePiece vocabularies
    /// default to 1, as in llama.cpp).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token (SentencePiece vocabularies default to 2, as in llama.cpp).
    pub fn eos_token_id(&self) -> u32 {
        self.eos
    }

    /// Whether the GGUF asks for BOS at the start of a prompt (`tokenizer.ggml.add_bos_token`;
    /// absent, true for SentencePiece and the llama3 pre-tokenizers, as in llama.cpp).
    pub fn add_bos_token(&self) -> bool {
        self.add_bos
    }

    /// The raw vocabulary string of `id` (e.g. `Ġhello` or `▁hello`), as chat templates want
    /// for `bos_token`/`eos_token`; `None` outside the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Ids that end generation: llama.cpp's end-of-generation set — EOS, the
    /// `tokenizer.ggml.eot_token_id`/`eom_token_id` and FIM pad/repository/separator tokens
    /// when named, and every token whose text is on llama.cpp's list (`<|im_end|>`,
    /// `<|endoftext|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, …). EOS comes first, then the
    /// others in id order; there are no duplicates.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Whether `id` is a control token (GGUF token type 3, or made one by llama.cpp's
    /// adjustments, e.g. an end-of-generation token).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// A SHA-256 (hex) of everything that decides this tokenizer's ids: the vocabulary, its
    /// attributes, merges or scores, the pre-tokenizer and the special ids and flags. KV
    /// computed under one digest is only reused under the same digest.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The `tokenizers` crate tokenizer that runs a byte-level BPE vocabulary's pre-tokenizer
    /// and merges (on text without special tokens); `None` for SentencePiece vocabularies,
    /// which do not use that crate. For the bytes of each token use [`Self::token_bytes`].
    pub fn inner(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.model {
            Model::Bpe(bpe) => Some(bpe.inner()),
            Model::Spm(_) => None,
        }
    }
}

/// Appends the bytes of the token `text` with attributes `a` (llama.cpp's `token_to_piece`
/// with `special = true`).
fn token_piece(text: &str, a: u16, is_spm: bool, out: &mut Vec<u8>) {
    if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
        out.extend_from_slice(text.as_bytes());
    } else if a & attr::NORMAL != 0 {
        if is_spm {
            out.extend_from_slice(text.replace(spm::SPACE_MARKER, " ").as_bytes());
        } else {
            bpe::byte_level_bytes(text, out);
        }
    } else if a & attr::BYTE != 0 {
        out.push(byte_token_value(text));
    }
}

/// The byte of a `<0xNN>` token: up to two hex digits after `<0x`, as llama.cpp's `strtol`
/// reads them (0 when there are none).
fn byte_token_value(text: &str) -> u8 {
    let hex: String = text
        .get(3..)
        .unwrap_or("")
        .chars()
        .take(2)
        .take_while(char::is_ascii_hexdigit)
        .collect();
    u8::from_str_radix(&hex, 16).unwrap_or(0)
}

/// What goes into [`GgufTokenizer::digest`], each part length-prefixed.
struct DigestInput(sha2::Sha256);

impl DigestInput {
    fn new(model: &str, pre: &str) -> Self {
        use sha2::Digest;
        let mut d = Self(sha2::Sha256::new());
        d.0.update(b"agentd GgufTokenizer v2\0");
        d.strings(&[model, pre]);
        d
    }

    fn strings<S: AsRef<str>>(&mut self, items: &[S]) {
        use sha2::Digest;
        self.0.update((items.len() as u64).to_le_bytes());
        for s in items {
            let s = s.as_ref().as_bytes();
            self.0.update((s.len() as u64).to_le_bytes());
            self.0.update(s);
        }
    }

    fn floats(&mut self, xs: &[f32]) {
        use sha2::Digest;
        self.0.update((xs.len() as u64).to_le_bytes());
        for x in xs {
            self.0.update(x.to_le_bytes());
        }
    }

    fn attrs(&mut self, xs: &[u16]) {
        use sha2::Digest;
        self.0.update((xs.len() as u64).to_le_bytes());
        for x in xs {
            self.0.update(x.to_le_bytes());
        }
    }

    fn ids(&mut self, xs: &[u32]) {
        use sha2::Digest;
        self.0.update((xs.len() as u64).to_le_bytes());
        for x in xs {
            self.0.update(x.to_le_bytes());
        }
    }

    fn finish(self) -> String {
        use sha2::Digest;
        format!("{:x}", self.0.finalize())
    }
}

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod tests;
