//! The model's tokenizer as llguidance sees it: every token's bytes in a `TokTrie`, and a way to
//! tokenize the text a grammar forces.
//!
//! Built from [`GgufTokenizer::token_bytes`], so it works the same for byte-level BPE and
//! SentencePiece vocabularies. The bytes are what `toktrie_hf_tokenizers` gives for a Hugging
//! Face tokenizer: a token that is not text (control and unknown tokens, and user-defined ones
//! spelled `<…>`) gets the `0xFF` special-token marker before its text, so grammars can name it
//! but never produce it as text; unused slots have no bytes and are never allowed; rows of the
//! embedding past the vocabulary are marked special placeholders.

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::ConstraintError;
use crate::tokenizer::{GgufTokenizer, TokenKind};

/// A [`GgufTokenizer`] with its token trie.
struct GgufTokEnv {
    tokenizer: Arc<GgufTokenizer>,
    trie: TokTrie,
}

/// The token environment for `tokenizer`, whose end of turn is its EOS, for logits of `vocab`
/// entries (at least the vocabulary's size).
pub(super) fn tok_env(
    tokenizer: Arc<GgufTokenizer>,
    vocab: usize,
) -> Result<TokEnv, ConstraintError> {
    let n = tokenizer.vocab_size();
    if vocab < n {
        return Err(ConstraintError::Unavailable(format!(
            "the model has {vocab} logits but the vocabulary {n} tokens"
        )));
    }
    let vocab_u32 = u32::try_from(vocab)
        .map_err(|_| ConstraintError::Unavailable(format!("{vocab} logits are too many")))?;
    let mut info = TokRxInfo::new(vocab_u32, tokenizer.eos_token_id());
    let mut words = Vec::with_capacity(vocab);
    for id in 0..vocab_u32 {
        let word = match (tokenizer.token_kind(id), tokenizer.token_text(id)) {
            (Some(kind), Some(text)) if is_special(kind, text) => {
                match text {
                    "<|end|>" | "<|eot_id|>" | "<|im_end|>" => info.tok_end_of_turn = Some(id),
                    "<unk>" | "<|unk|>" => info.tok_unk = Some(id),
                    "<pad>" | "<|pad|>" => info.tok_pad = Some(id),
                    _ => {}
                }
                marked(text.as_bytes())
            }
            (Some(_), Some(_)) => tokenizer.token_bytes(id).unwrap_or_default().to_vec(),
            // Embedding rows past the vocabulary.
            _ => marked(format!("<[{id}]>").as_bytes()),
        };
        words.push(word);
    }
    let trie = TokTrie::from(&info, &words);
    Ok(Arc::new(GgufTokEnv { tokenizer, trie }))
}

/// Whether llguidance should see the token as special rather than text: as
/// `toktrie_hf_tokenizers` decides for a Hugging Face added token (special, or spelled `<…>`).
fn is_special(kind: TokenKind, text: &str) -> bool {
    match kind {
        TokenKind::Control | TokenKind::Unknown => true,
        TokenKind::UserDefined => text.starts_with('<') && text.ends_with('>'),
        TokenKind::Normal | TokenKind::Byte | TokenKind::Unused => false,
    }
}

/// `text` after the special-token marker.
fn marked(text: &[u8]) -> Vec<u8> {
    let mut word = Vec::with_capacity(text.len() + 1);
    word.push(TokTrie::SPECIAL_TOKEN_MARKER);
    word.extend_from_slice(text);
    word
}

impl TokenizerEnv for GgufTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Tokenizes text a grammar forces: valid UTF-8 with the model's tokenizer (special tokens
    /// written in it recognised, as the Hugging Face tokenizer did), any invalid bytes greedily
    /// through the trie.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            // Encoding fails only for a character with no token and no byte fallback; the
            // trie's greedy walk is the best answer then.
            self.tokenizer
                .encode(text, true)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }

    /// As [`Self::tokenize_bytes`], also recognising special tokens written `<…>`.
    fn tokenize_bytes_special(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.trie.tokenize_with_special(text, |text| {
                self.tokenizer
                    .encode(text, true)
                    .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
            })
        })
    }
}
