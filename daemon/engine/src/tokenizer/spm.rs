//! SentencePiece-style vocabularies (`tokenizer.ggml.model = llama`): llama.cpp's
//! `llm_tokenizer_spm`, the merge of adjacent pieces by score.
//!
//! The text (spaces already replaced by `▁`) starts as one symbol per character. Every pair of
//! neighbours whose concatenation is in the vocabulary goes into a priority queue keyed by that
//! token's score (ties: the leftmost pair first). The best pair is merged and the merged symbol's
//! two new pairs are queued; entries made stale by an earlier merge are skipped when they come
//! out. At the end each symbol is its token, or, for a character that is not in the vocabulary,
//! one byte-fallback token (`<0xNN>`) per UTF-8 byte.
//!
//! **Architecture Invariant:** the queue makes a text of n characters cost O(n log n): each
//! merge removes a symbol and queues at most two pairs. A pair longer than the longest token is
//! never looked up, so no lookup hashes more than twice that many bytes.
//!
//! llama.cpp also keeps a map from each merged text to the pair that made it, to split a symbol
//! that is not a token back into its parts (`resegment`). Every merged symbol is a token by
//! construction, so that map is never consulted for one; it is left out here.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::{Result, TokenizerError};

/// The `▁` (U+2581) that stands for a space in SentencePiece vocabularies.
pub(super) const SPACE_MARKER: &str = "\u{2581}";

/// An SPM vocabulary ready to tokenize: texts to ids, scores and byte fallbacks.
#[derive(Debug, Clone)]
pub(super) struct Spm {
    by_text: HashMap<String, u32>,
    /// Each token's score; NaN made -inf and -0 made 0, so the total order agrees with `<`.
    scores: Vec<f32>,
    /// The token for each byte value: `<0xNN>`, else the one-byte text, as llama.cpp's
    /// `byte_to_token`.
    byte_tokens: Vec<Option<u32>>,
    /// The longest token text, in bytes.
    max_token_len: usize,
}

impl Spm {
    /// The model for `tokens` (texts, with `▁` for spaces) and their `scores`.
    pub(super) fn new(tokens: &[String], scores: &[f32]) -> Self {
        let mut by_text = HashMap::with_capacity(tokens.len());
        for (id, text) in tokens.iter().enumerate() {
            if let Ok(id) = u32::try_from(id) {
                // As llama.cpp's `token_to_id[word] = i`: a repeated text maps to its last id.
                by_text.insert(text.clone(), id);
            }
        }
        let scores = scores
            .iter()
            .map(|&s| {
                if s.is_nan() {
                    f32::NEG_INFINITY
                } else if s == 0.0 {
                    0.0
                } else {
                    s
                }
            })
            .collect();
        let byte_tokens = (0..=255u8)
            .map(|b| {
                let hex = format!("<0x{b:02X}>");
                by_text.get(&hex).copied().or_else(|| {
                    b.is_ascii()
                        .then(|| by_text.get(&char::from(b).to_string()).copied())
                        .flatten()
                })
            })
            .collect();
        let max_token_len = tokens.iter().map(String::len).max().unwrap_or(0);
        Self {
            by_text,
            scores,
            byte_tokens,
            max_token_len,
        }
    }

    /// Appends the ids of `text` (spaces already `▁`, no special tokens in it) to `out`. Fails
    /// only when a character is not in the vocabulary and neither are its bytes (llama.cpp
    /// throws there).
    pub(super) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if let Some(prev) = i.checked_sub(1) {
                symbols[prev].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::with_capacity(symbols.len());
        for right in 1..symbols.len() {
            self.push_pair(text, &symbols, &mut queue, Some(right - 1), Some(right));
        }
        while let Some(pair) = queue.pop() {
            let (left, right) = (pair.left, pair.right);
            let (left_len, right_len) = (symbols[left].len, symbols[right].len);
            // One side was merged away, or grew, since this pair was queued.
            if left_len == 0 || right_len == 0 || left_len + right_len != pair.len {
                continue;
            }
            symbols[left].len += right_len;
            symbols[right].len = 0;
            let next = symbols[right].next;
            symbols[left].next = next;
            if let Some(next) = next {
                symbols[next].prev = Some(left);
            }
            let prev = symbols[left].prev;
            self.push_pair(text, &symbols, &mut queue, prev, Some(left));
            self.push_pair(text, &symbols, &mut queue, Some(left), next);
        }
        let mut at = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let symbol = &symbols[i];
            let piece = &text[symbol.start..symbol.start + symbol.len];
            match self.by_text.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        let id = self.byte_tokens[usize::from(b)]
                            .ok_or(TokenizerError::NoByteToken { byte: b })?;
                        out.push(id);
                    }
                }
            }
            at = symbol.next;
        }
        Ok(())
    }

    /// Queues the pair (`left`, `right`) if both exist and their text is a token.
    fn push_pair(
        &self,
        text: &str,
        symbols: &[Symbol],
        queue: &mut BinaryHeap<Pair>,
        left: Option<usize>,
        right: Option<usize>,
    ) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let start = symbols[left].start;
        let len = symbols[left].len + symbols[right].len;
        if len > self.max_token_len {
            return;
        }
        let Some(&id) = text
            .get(start..start + len)
            .and_then(|t| self.by_text.get(t))
        else {
            return;
        };
        queue.push(Pair {
            score: self.scores.get(id as usize).copied().unwrap_or(0.0),
            left,
            right,
            len,
        });
    }
}

/// A run of the text that is one token so far; `len == 0` once merged into its left neighbour.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Two neighbouring symbols whose concatenation is a token, with that token's score.
#[derive(Debug, Clone, Copy)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    /// The concatenation's length when queued, to recognise stale entries.
    len: usize,
}

impl Ord for Pair {
    /// Higher scores first; of equal scores, the leftmost pair (llama.cpp's `llm_bigram_spm`
    /// comparator).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Pair {}
