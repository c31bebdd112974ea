//! Incremental detokenisation: turning a stream of token ids into a stream of text that never
//! splits a UTF-8 character.
//!
//! A byte-level BPE token can hold part of a character (the four bytes of 🦀 may arrive in four
//! tokens), so decoding each token alone would print replacement characters. [`IncrementalDecoder`]
//! follows TGI and vLLM: it decodes a short window of recent ids (starting with a few ids that were
//! already printed, as context) and prints only what the window's text gained, never a trailing
//! U+FFFD, which stands for a character whose remaining bytes have not arrived yet.
//!
//! Unlike TGI it prints the complete part of the text even when the window ends inside a
//! character, so text whose token boundaries rarely fall between characters still streams
//! promptly, character by character.
//!
//! The tokenizer is reached through the [`Decode`] trait, so this module does not depend on any
//! particular tokenizer.
//!
//! **Architecture Invariant.** Each push decodes a window of a bounded number of ids, so its cost
//! does not grow with the length of the generation. When a push ends on a character boundary the
//! window restarts there, keeping the ids since the previous such boundary as context (tokenizers
//! that strip a leading space then decode the window consistently). When no push has ended on one
//! for a long time the window is cut to its last few ids: the cut may fall inside a character,
//! which garbles only the start of the window, never the end that is being printed.

use std::error::Error;

/// The Unicode replacement character, which lossy decoding puts where bytes are not valid UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

/// A window with this many ids and no character boundary since its start gets cut short.
const MAX_WINDOW_IDS: usize = 32;

/// How many ids a window keeps when it is cut short. Each id holds at least one byte in practice,
/// and a garbled start (at most three bytes) and an incomplete end (at most three) then never meet.
const CUT_WINDOW_IDS: usize = 8;

/// Decodes a sequence of token ids into text; implemented by the tokenizer.
///
/// Bytes that do not form valid UTF-8 must come out as U+FFFD (lossy decoding), in particular an
/// incomplete character at the end.
pub trait Decode {
    /// Decodes `ids` into text.
    fn decode_ids(&self, ids: &[u32]) -> Result<String, DetokError>;
}

/// Why incremental detokenisation failed.
#[derive(Debug, thiserror::Error)]
pub enum DetokError {
    /// The tokenizer behind [`Decode`] could not decode the ids.
    #[error("the tokenizer could not decode token ids: {0}")]
    Tokenizer(Box<dyn Error + Send + Sync + 'static>),
}

impl DetokError {
    /// Wraps a tokenizer's own error, for implementations of [`Decode`].
    pub fn tokenizer(err: impl Into<Box<dyn Error + Send + Sync + 'static>>) -> Self {
        Self::Tokenizer(err.into())
    }
}

/// Turns token ids, pushed one at a time, into text chunks that never end inside a character.
///
/// Use one per generation stream: [`push`](Self::push) each sampled id and print what it returns,
/// then [`finish`](Self::finish) at the end of generation.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    /// The ids of the decode window, from `prefix_offset` on; earlier ids are dropped as the
    /// window moves.
    ids: Vec<u32>,
    /// Where the decode window starts in `ids`.
    prefix_offset: usize,
    /// Where the last push that ended on a character boundary ended: the next window's start.
    read_offset: usize,
    /// How many bytes of the window's decoded text have been returned already.
    emitted: usize,
}

impl IncrementalDecoder {
    /// An empty decoder, ready for the first id of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `id` and returns the text it completes, which may be empty (the id holds part of a
    /// character, or decodes to nothing).
    pub fn push(&mut self, dec: &(impl Decode + ?Sized), id: u32) -> Result<String, DetokError> {
        self.ids.push(id);
        let text = dec.decode_ids(&self.ids[self.prefix_offset..])?;
        let end = complete_len(&text);
        let out = slice_between(&text, self.emitted, end).to_owned();
        let n = self.ids.len();
        if end == text.len() {
            // A character boundary: like TGI, restart the window at the previous boundary.
            let context = dec.decode_ids(&self.ids[self.read_offset..])?;
            self.ids.drain(..self.read_offset);
            self.prefix_offset = 0;
            self.read_offset = self.ids.len();
            self.emitted = context.len();
        } else if n - self.prefix_offset > MAX_WINDOW_IDS {
            let start = n - CUT_WINDOW_IDS;
            let cut = dec.decode_ids(&self.ids[start..])?;
            self.ids.drain(..start);
            self.prefix_offset = 0;
            self.read_offset = self.read_offset.saturating_sub(start);
            // Everything up to the incomplete end has been returned, in this window's terms too.
            self.emitted = complete_len(&cut);
        } else {
            self.emitted = self.emitted.max(end);
        }
        Ok(out)
    }

    /// Flushes what remains at the end of generation, lossily (an incomplete character comes out
    /// as U+FFFD), and resets the decoder for a new stream.
    pub fn finish(&mut self, dec: &(impl Decode + ?Sized)) -> Result<String, DetokError> {
        let pending = self.read_offset < self.ids.len();
        let out = if pending {
            let text = dec.decode_ids(&self.ids[self.prefix_offset..])?;
            slice_between(&text, self.emitted, text.len()).to_owned()
        } else {
            String::new()
        };
        *self = Self::new();
        Ok(out)
    }
}

/// The length of `text` without a trailing U+FFFD (an incomplete character, as far as we know).
fn complete_len(text: &str) -> usize {
    text.strip_suffix(REPLACEMENT).map_or(text.len(), str::len)
}

/// `text[from..to]`, where `to` is a character boundary of `text`. Tokenizers decode a window
/// consistently as it grows, so `from` (the length already returned) is a boundary too; if a
/// tokenizer does not, the start moves forward to the next boundary rather than split a character.
fn slice_between(text: &str, from: usize, to: usize) -> &str {
    let mut from = from;
    while from < to && !text.is_char_boundary(from) {
        from += 1;
    }
    text.get(from..to).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;

    /// A byte-level tokenizer: id `i` is the byte string `vocab[i]`, decoded lossily. It counts
    /// how many ids it has decoded, to check the cost of incremental decoding.
    struct Bytes {
        vocab: Vec<Vec<u8>>,
        decoded: Cell<usize>,
    }

    impl Bytes {
        /// A vocabulary of the given pieces; ids are their indices.
        fn new(pieces: Vec<Vec<u8>>) -> Self {
            Self {
                vocab: pieces,
                decoded: Cell::new(0),
            }
        }
    }

    impl Decode for Bytes {
        fn decode_ids(&self, ids: &[u32]) -> Result<String, DetokError> {
            self.decoded.set(self.decoded.get() + ids.len());
            let mut bytes = Vec::new();
            for &id in ids {
                let piece = self
                    .vocab
                    .get(id as usize)
                    .ok_or_else(|| DetokError::tokenizer(format!("unknown token id {id}")))?;
                bytes.extend_from_slice(piece);
            }
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    /// Splits `text` into byte pieces at `cuts` (byte offsets, any order, may split characters),
    /// streams them through a decoder and checks that the chunks contain no replacement character
    /// (unless `text` does) and add up to `text`. Returns the chunks.
    fn check(text: &str, cuts: &[usize]) -> Vec<String> {
        let mut cuts: Vec<usize> = cuts
            .iter()
            .copied()
            .filter(|&c| c > 0 && c < text.len())
            .collect();
        cuts.push(0);
        cuts.push(text.len());
        cuts.sort_unstable();
        cuts.dedup();
        let pieces: Vec<Vec<u8>> = cuts
            .windows(2)
            .map(|w| text.as_bytes()[w[0]..w[1]].to_vec())
            .collect();
        let dec = Bytes::new(pieces);
        let mut d = IncrementalDecoder::new();
        let mut chunks = Vec::new();
        for id in 0..dec.vocab.len() as u32 {
            chunks.push(d.push(&dec, id).expect("ids are in the vocabulary"));
        }
        let last = d.finish(&dec).expect("ids are in the vocabulary");
        if !text.contains('\u{FFFD}') {
            for c in &chunks {
                assert!(!c.contains('\u{FFFD}'), "chunk {c:?} of {text:?}");
            }
        }
        chunks.push(last);
        assert_eq!(chunks.concat(), text);
        chunks
    }

    /// Every byte offset of `text`: each byte its own token.
    fn every_byte(text: &str) -> Vec<usize> {
        (1..text.len()).collect()
    }

    #[test]
    fn multibyte_characters_split_across_ids() {
        for text in [
            "café",
            "한국어 텍스트",
            "rust 🦀 crab",
            "family: 👨\u{200d}👩\u{200d}👧\u{200d}👦!",
        ] {
            let chunks = check(text, &every_byte(text));
            assert!(chunks.iter().all(|c| c.chars().count() <= 1), "{chunks:?}");
        }
        // Uneven splits: 'é' is C3 A9, '🦀' is F0 9F A6 80.
        let chunks = check("é🦀x", &[2, 3, 4]);
        assert_eq!(chunks, ["é", "", "", "🦀x", ""]);
    }

    #[test]
    fn text_is_emitted_as_soon_as_a_character_completes() {
        let dec = Bytes::new(vec![b"a".to_vec(), vec![0xF0, 0x9F], vec![0xA6, 0x80]]);
        let mut d = IncrementalDecoder::new();
        assert_eq!(d.push(&dec, 0).unwrap(), "a");
        assert_eq!(d.push(&dec, 1).unwrap(), "");
        assert_eq!(d.push(&dec, 2).unwrap(), "🦀");
        assert_eq!(d.finish(&dec).unwrap(), "");
    }

    #[test]
    fn finish_flushes_an_incomplete_character_lossily_and_resets() {
        let dec = Bytes::new(vec![b"ok".to_vec(), vec![0xE2, 0x82]]);
        let mut d = IncrementalDecoder::new();
        assert_eq!(d.push(&dec, 0).unwrap(), "ok");
        assert_eq!(d.push(&dec, 1).unwrap(), "");
        assert_eq!(d.finish(&dec).unwrap(), "\u{FFFD}");
        assert_eq!(d.push(&dec, 0).unwrap(), "ok");
    }

    #[test]
    fn invalid_bytes_stream_out_and_the_window_stays_bounded() {
        // A model spewing 0xFF bytes: every decode ends in U+FFFD; the window must not pile up.
        let dec = Bytes::new(vec![vec![0xFF]]);
        let mut d = IncrementalDecoder::new();
        let mut out = String::new();
        for _ in 0..100 {
            out += &d.push(&dec, 0).unwrap();
            assert!(d.ids.len() <= MAX_WINDOW_IDS);
        }
        assert_eq!(out, "\u{FFFD}".repeat(99));
        out += &d.finish(&dec).unwrap();
        assert_eq!(out, "\u{FFFD}".repeat(100));
    }

    #[test]
    fn tokens_never_aligned_with_characters_still_stream() {
        // Regression: with tokens that always end inside a character, waiting for a decode that
        // does not end in U+FFFD (as TGI does) waits forever, and flushing after a while printed
        // U+FFFD in the middle of valid text. Here 'é' (C3 A9) comes as C3, then A9 C3, A9 C3, …
        let text = "é".repeat(200);
        let cuts: Vec<usize> = (1..text.len()).step_by(2).collect();
        let chunks = check(&text, &cuts);
        assert_eq!(chunks[0], "");
        assert!(
            chunks[1..chunks.len() - 1].iter().all(|c| c == "é"),
            "{chunks:?}"
        );
    }

    #[test]
    fn decode_window_stays_bounded() {
        let text = "héllo wörld 🦀 ".repeat(1000);
        let dec = Bytes::new(text.bytes().map(|b| vec![b]).collect());
        let mut d = IncrementalDecoder::new();
        let mut out = String::new();
        for id in 0..dec.vocab.len() as u32 {
            out += &d.push(&dec, id).unwrap();
            assert!(d.ids.len() <= 8, "window grew to {}", d.ids.len());
        }
        out += &d.finish(&dec).unwrap();
        assert_eq!(out, text);
        let per_id = dec.decoded.get() / dec.vocab.len();
        assert!(per_id <= 8, "{per_id} ids decoded per pushed id");
    }

    #[test]
    fn tokenizer_errors_are_passed_on() {
        let dec = Bytes::new(vec![]);
        let err = IncrementalDecoder::new().push(&dec, 7).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the tokenizer could not decode token ids: unknown token id 7"
        );
    }

    #[test]
    fn slice_between_never_splits_a_character() {
        assert_eq!(slice_between("abc", 2, 3), "c");
        // An inconsistent tokenizer: the returned length falls inside a character.
        assert_eq!(slice_between("é!", 1, 3), "!");
        assert_eq!(slice_between("ab", 4, 2), "");
        assert_eq!(slice_between("é", 1, 2), "");
    }

    proptest! {
        #[test]
        fn random_text_random_byte_splits(
            text in any::<String>(),
            cuts in prop::collection::vec(0usize..200, 0..40),
        ) {
            check(&text, &cuts);
        }
    }
}
