//! The model's tokenizer as llguidance sees it: every token's bytes in a `TokTrie`, and a way to
//! tokenize the text a grammar forces.
//!
//! Built from [`GgufTokenizer::token_bytes`], so it works the same for byte-level BPE and
//! SentencePiece vocabularies. As `toktrie_hf_tokenizers` does for a Hugging Face tokenizer, a
//! token that is not text (control and unknown tokens) gets the `0xFF` special-token marker
//! before its text, so grammars can name it but never produce it as text; unused slots have no bytes and are never allowed; rows of the
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
            (Some(kind), Some(text)) if is_special(kind) => {
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

/// Whether llguidance should see the token as special rather than text: control and unknown
/// tokens. User-defined tokens are text the model writes as one token — Qwen2.5's
/// `<tool_call>` and `</tool_call>` are — so they keep their bytes: a grammar that forces the
/// text `<tool_call>` then accepts the model's own token for it, whose bytes are that text.
fn is_special(kind: TokenKind) -> bool {
    match kind {
        TokenKind::Control | TokenKind::Unknown => true,
        TokenKind::UserDefined | TokenKind::Normal | TokenKind::Byte | TokenKind::Unused => false,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::quantized::gguf_file::Value;

    use super::*;
    use crate::constraint::{ConstraintFactory, ConstraintSpec};

    /// A tiny SentencePiece tokenizer: `<unk> <s> </s>`, 256 byte tokens (3…258), then
    /// `▁` 259, `hi` 260, `▁there` 261, the control `<ctrl>` 262, the user-defined `<tag>` 263
    /// and `  ` 264.
    fn tiny_spm() -> Arc<GgufTokenizer> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
        for (text, kind) in [
            ("▁", 1),
            ("hi", 1),
            ("▁there", 1),
            ("<ctrl>", 3),
            ("<tag>", 4),
            ("  ", 4),
        ] {
            tokens.push(text.into());
            types.push(kind);
        }
        let md = HashMap::from([
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
        ]);
        Arc::new(GgufTokenizer::from_metadata(&md).expect("tokenizer"))
    }

    #[test]
    fn trie_holds_sentencepiece_bytes_and_marks_special_tokens() {
        let env = tok_env(tiny_spm(), 268).expect("token environment");
        let trie = env.tok_trie();
        assert_eq!(trie.vocab_size(), 268);
        assert_eq!(trie.token(3 + u32::from(b'A')), b"A");
        assert_eq!(trie.token(259), b" ");
        assert_eq!(trie.token(261), b" there");
        assert_eq!(trie.token(262), b"\xFF<ctrl>");
        // A user-defined token is text (Qwen2.5's `<tool_call>` is one).
        assert_eq!(trie.token(263), b"<tag>");
        assert_eq!(trie.token(264), b"  ");
        assert_eq!(trie.token(0), b"\xFF<unk>");
        // Embedding rows past the vocabulary are placeholders.
        assert_eq!(trie.token(266), b"\xFF<[266]>");
        assert_eq!(trie.eos_token(), 2);
        // Forced text is tokenized by the model's tokenizer ("  " is a user-defined piece).
        assert_eq!(env.tokenize_bytes(b"hi  hi"), [260, 264, 260]);
        assert!(tok_env(tiny_spm(), 100).is_err());
    }

    #[test]
    fn constraints_work_on_a_sentencepiece_vocabulary() {
        let tokenizer = tiny_spm();
        let factory = ConstraintFactory::new(tokenizer.clone(), 268).expect("factory");
        let spec = ConstraintSpec::Lark("start: \"hi  there\"".into());
        let mut constraint = factory.constraint(&spec).expect("constraint");
        // Greedy generation under the constraint: always the first allowed token.
        let mut out = Vec::new();
        while !constraint.is_stopped() && out.len() < 20 {
            let mut logits = vec![0.0f32; 268];
            constraint.mask(&mut logits).expect("mask");
            let Some(next) = (0..268u32).find(|&i| logits[i as usize].is_finite()) else {
                break;
            };
            if next == tokenizer.eos_token_id() {
                break;
            }
            assert!(
                next < 262 || next == 263 || next == 264,
                "a special or padding token was allowed: {next}"
            );
            constraint.commit(next).expect("commit");
            out.push(next);
        }
        assert_eq!(tokenizer.decode(&out, false).expect("decode"), "hi  there");
        assert_eq!(out[..2], [260, 264], "{out:?}");
    }
}
