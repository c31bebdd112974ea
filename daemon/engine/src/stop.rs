//! Stop strings over streamed text.
//!
//! Generation stops when the text contains one of the caller's stop strings; neither the stop
//! string nor anything after it is shown. Text arrives in chunks (one per token, from
//! [`crate::detok`]), so a stop string may be split over several chunks: [`StopMatcher`] holds back
//! the tail of the text that could still be the start of a stop string, and releases it once it
//! cannot (or at [`StopMatcher::finish`]).
//!
//! **Which stop wins.** Generation stops at the first stop string to be *completed*: among
//! occurrences, the one that ends earliest, and of those ending at the same place the longest.
//! This does not depend on how the text was chunked. With stops `"bc"` and `"abcd"`, the text
//! `"abcd"` stops at `"bc"`, since a stream would have seen `"bc"` complete first.

/// The most stop strings one [`StopMatcher`] accepts.
pub const MAX_STOP_STRINGS: usize = 16;

/// The longest stop string accepted, in bytes of UTF-8.
pub const MAX_STOP_BYTES: usize = 256;

/// Why a set of stop strings was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopError {
    /// A stop string is empty (it would match before any text).
    #[error("stop string #{index} is empty; stop strings must contain at least one character")]
    Empty {
        /// Position of the string in the list, from 0.
        index: usize,
    },
    /// More than [`MAX_STOP_STRINGS`] stop strings.
    #[error("{count} stop strings were given; at most {max} are allowed")]
    TooMany {
        /// How many were given.
        count: usize,
        /// The limit, [`MAX_STOP_STRINGS`].
        max: usize,
    },
    /// A stop string longer than [`MAX_STOP_BYTES`].
    #[error("stop string #{index} is {len} bytes long; at most {max} bytes are allowed")]
    TooLong {
        /// Position of the string in the list, from 0.
        index: usize,
        /// Its length in bytes.
        len: usize,
        /// The limit, [`MAX_STOP_BYTES`].
        max: usize,
    },
}

/// What [`StopMatcher::push`] decided about a chunk of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet: emit this text (possibly empty) and keep generating.
    Continue(String),
    /// A stop string was completed: emit `emit`, the text before it, and stop generating.
    Stopped {
        /// The not yet emitted text that precedes the stop string.
        emit: String,
        /// The stop string that matched.
        stop: String,
    },
}

/// Finds stop strings in streamed text, holding back only what could still start one.
///
/// One per generation stream. After a stop string has matched, every further
/// [`push`](Self::push) answers [`StopOutcome::Stopped`] with nothing to emit.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Length of the longest stop string, in bytes.
    max_len: usize,
    /// Text received but not yet emitted: a suffix that is a proper prefix of some stop string.
    held: String,
    /// The stop string that matched, once one has.
    stopped: Option<String>,
}

impl StopMatcher {
    /// Builds a matcher for `stops`, rejecting empty strings, more than [`MAX_STOP_STRINGS`]
    /// strings, and strings longer than [`MAX_STOP_BYTES`]. An empty list never stops.
    pub fn new(stops: Vec<String>) -> Result<Self, StopError> {
        if stops.len() > MAX_STOP_STRINGS {
            return Err(StopError::TooMany {
                count: stops.len(),
                max: MAX_STOP_STRINGS,
            });
        }
        for (index, s) in stops.iter().enumerate() {
            if s.is_empty() {
                return Err(StopError::Empty { index });
            }
            if s.len() > MAX_STOP_BYTES {
                return Err(StopError::TooLong {
                    index,
                    len: s.len(),
                    max: MAX_STOP_BYTES,
                });
            }
        }
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Ok(Self {
            stops,
            max_len,
            held: String::new(),
            stopped: None,
        })
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// Feeds newly decoded text. Returns the text that is safe to emit now, holding back a tail
    /// that could still be the start of a stop string, or reports the stop string that completed.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if let Some(stop) = &self.stopped {
            return StopOutcome::Stopped {
                emit: String::new(),
                stop: stop.clone(),
            };
        }
        self.held.push_str(text);
        if let Some((start, index)) = self.first_completed() {
            let emit = self.held[..start].to_owned();
            let stop = self.stops[index].clone();
            self.held.clear();
            self.stopped = Some(stop.clone());
            return StopOutcome::Stopped { emit, stop };
        }
        let keep_from = self.hold_back_from();
        let emit = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        StopOutcome::Continue(emit)
    }

    /// Releases the held-back tail at the end of generation (empty after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The occurrence in `held` that completes first (earliest end, then longest), as its start
    /// and the index of its stop string.
    fn first_completed(&self) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, index)
        for (index, stop) in self.stops.iter().enumerate() {
            // The first occurrence of a string is also the one that ends first.
            if let Some(start) = self.held.find(stop.as_str()) {
                let end = start + stop.len();
                if best.is_none_or(|(e, s, _)| (end, start) < (e, s)) {
                    best = Some((end, start, index));
                }
            }
        }
        best.map(|(_, start, index)| (start, index))
    }

    /// Where the tail that must be held back starts: the earliest character boundary from which
    /// the rest of `held` is a proper prefix of some stop string (`held.len()` if none).
    fn hold_back_from(&self) -> usize {
        let len = self.held.len();
        // A proper prefix is at most `max_len - 1` bytes long.
        let mut from = len.saturating_sub(self.max_len.saturating_sub(1));
        while from < len {
            if self.held.is_char_boundary(from) {
                let tail = &self.held.as_bytes()[from..];
                if self.stops.iter().any(|s| s.as_bytes().starts_with(tail)) {
                    return from;
                }
            }
            from += 1;
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Streams `chunks` through a matcher for `stops` and returns everything emitted (including
    /// `finish`) and the stop string that matched. Checks that nothing is emitted after a stop.
    fn run(stops: &[&str], chunks: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
            .expect("test stop strings are valid");
        let mut out = String::new();
        let mut stopped: Option<String> = None;
        for chunk in chunks {
            match m.push(chunk) {
                StopOutcome::Continue(text) => {
                    assert!(stopped.is_none(), "continued after a stop");
                    out += &text;
                }
                StopOutcome::Stopped { emit, stop } => {
                    if let Some(previous) = &stopped {
                        assert_eq!(emit, "", "emitted text after the stop");
                        assert_eq!(&stop, previous);
                    } else {
                        out += &emit;
                        stopped = Some(stop);
                    }
                }
            }
        }
        assert_eq!(m.is_stopped(), stopped.is_some());
        let tail = m.finish();
        if stopped.is_some() {
            assert_eq!(tail, "", "finish released text after a stop");
        }
        out += &tail;
        (out, stopped)
    }

    /// Checks that streaming `chunks` emits `expected` and stops at `stop`.
    fn check(stops: &[&str], chunks: &[&str], expected: &str, stop: Option<&str>) {
        let (out, got) = run(stops, chunks);
        assert_eq!(out, expected);
        assert_eq!(got.as_deref(), stop);
    }

    #[test]
    fn stop_split_across_many_pushes() {
        check(
            &["</answer>"],
            &["The answer is 4", "</", "ans", "w", "er", ">", " and more"],
            "The answer is 4",
            Some("</answer>"),
        );
    }

    #[test]
    fn only_a_possible_stop_prefix_is_held_back() {
        let mut m = StopMatcher::new(vec!["STOP".into()]).unwrap();
        assert_eq!(m.push("go ST"), StopOutcome::Continue("go ".into()));
        assert_eq!(m.push("O"), StopOutcome::Continue(String::new()));
        let stopped = StopOutcome::Stopped {
            emit: String::new(),
            stop: "STOP".into(),
        };
        assert_eq!(m.push("P!"), stopped);
        assert_eq!(m.push("more"), stopped);
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn partial_match_that_is_not_a_stop_is_released() {
        check(&["STOP"], &["go ST", "OR", "E"], "go STORE", None);
        check(&["STOP"], &["go ST"], "go ST", None);
        let mut m = StopMatcher::new(vec!["STOP".into()]).unwrap();
        assert_eq!(m.push("go ST"), StopOutcome::Continue("go ".into()));
        assert_eq!(m.push("OR"), StopOutcome::Continue("STOR".into()));
    }

    #[test]
    fn overlapping_candidates() {
        // "ab" completes before "abc" could.
        check(&["abc", "ab"], &["xa", "bc"], "x", Some("ab"));
        check(&["abc", "ab"], &["xabc"], "x", Some("ab"));
        // Ending at the same place, the longer one cuts earlier.
        check(&["bc", "abc"], &["xabc"], "x", Some("abc"));
        // "bc" completes before "abcd" does, whatever the chunking.
        check(&["abcd", "bc"], &["abcd"], "a", Some("bc"));
        check(&["abcd", "bc"], &["ab", "cd"], "a", Some("bc"));
        // A stop that starts inside a held-back partial match of another.
        check(&["aab"], &["a", "a", "a", "b"], "a", Some("aab"));
    }

    #[test]
    fn text_before_the_stop_is_emitted_once_and_nothing_after() {
        check(&["\n\n"], &["one\n", "\ntwo", "three"], "one", Some("\n\n"));
        check(&["x"], &["x", "y"], "", Some("x"));
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut m = StopMatcher::new(vec![]).unwrap();
        assert_eq!(m.push("abc"), StopOutcome::Continue("abc".into()));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn held_back_tail_is_cut_on_char_boundaries() {
        // '€' is E2 82 AC and '₂' is E2 82 82: they share two bytes, but neither is a prefix of
        // the other, so nothing of "₂" may be held back for the stop "€x".
        let mut m = StopMatcher::new(vec!["€x".into()]).unwrap();
        assert_eq!(m.push("a₂"), StopOutcome::Continue("a₂".into()));
        assert_eq!(m.push("b€"), StopOutcome::Continue("b".into()));
        assert_eq!(m.finish(), "€");
        check(&["🦀🦀"], &["🦀", "é", "🦀", "🦀"], "🦀é", Some("🦀🦀"));
    }

    #[test]
    fn new_rejects_bad_stop_strings() {
        let err = StopMatcher::new(vec!["ok".into(), String::new()]).unwrap_err();
        assert_eq!(err, StopError::Empty { index: 1 });
        assert_eq!(
            err.to_string(),
            "stop string #1 is empty; stop strings must contain at least one character"
        );
        let err = StopMatcher::new(vec!["s".into(); 17]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "17 stop strings were given; at most 16 are allowed"
        );
        let err = StopMatcher::new(vec!["é".repeat(129)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stop string #0 is 258 bytes long; at most 256 bytes are allowed"
        );
        assert!(StopMatcher::new(vec!["s".into(); 16]).is_ok());
        assert!(StopMatcher::new(vec!["s".repeat(256)]).is_ok());
    }

    /// What streaming must produce: `text` cut at the first stop string to complete (earliest
    /// end, then longest), found by brute force.
    fn reference(text: &str, stops: &[String]) -> (String, Option<String>) {
        for end in 1..=text.len() {
            if !text.is_char_boundary(end) {
                continue;
            }
            let hit = stops
                .iter()
                .filter(|s| text[..end].ends_with(s.as_str()))
                .max_by_key(|s| s.len());
            if let Some(stop) = hit {
                return (text[..end - stop.len()].to_owned(), Some(stop.clone()));
            }
        }
        (text.to_owned(), None)
    }

    /// Short strings over an alphabet small enough for stop strings to occur, with multi-byte
    /// characters that share leading bytes.
    fn small_string(max_chars: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!['a', 'b', '€', '₂', '🦀']),
            0..max_chars,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        #[test]
        fn streamed_output_is_text_cut_at_the_first_stop(
            text in small_string(40),
            stops in prop::collection::vec(small_string(4).prop_filter("non-empty", |s| !s.is_empty()), 0..4),
            cuts in prop::collection::vec(0usize..40, 0..12),
        ) {
            let chars: Vec<(usize, char)> = text.char_indices().collect();
            let mut bounds: Vec<usize> = cuts
                .iter()
                .filter_map(|&c| chars.get(c).map(|&(i, _)| i))
                .collect();
            bounds.push(0);
            bounds.push(text.len());
            bounds.sort_unstable();
            bounds.dedup();
            let chunks: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            prop_assert_eq!(run(&stop_refs, &chunks), reference(&text, &stops));
        }
    }
}
