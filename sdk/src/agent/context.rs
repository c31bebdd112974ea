//! Context policy and the map of a session's log the agent keeps to compact it.
//!
//! The log after the agent's prefix is a sequence of [`Span`]s: the conversation from before
//! the run, the run's input, then replies, each reply with calls followed by their results.
//! Compaction replaces whole spans, so a rewrite always starts and ends on a message boundary,
//! never touches the prefix, and never separates a reply's calls from their results:
//!
//! - **Masking** replaces an old [`Part::Results`] span with short stubs (one per result).
//! - **Summarising** replaces every span before a *cut* (a reply's or the input's start, or
//!   the end of the log) with one message holding a summary, so the kept tail starts with a
//!   whole reply and its results.

/// The smallest cap on a tool result's tokens: a truncated result's markup and note take about
/// half of it.
pub(crate) const MIN_RESULT_TOKENS: u32 = 48;

/// How an agent keeps a session inside its context: a token budget, observation masking of
/// old tool results, and summarisation as a new epoch. The prefix (system prompt and tool list)
/// is never rewritten, so it stays cached for every session.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextPolicy {
    pub(crate) budget: Option<u32>,
    pub(crate) masking: bool,
    pub(crate) keep_results: usize,
    pub(crate) summarization: bool,
    pub(crate) keep_turns: usize,
    pub(crate) summary_tokens: u32,
    pub(crate) max_result_tokens: Option<u32>,
}

impl Default for ContextPolicy {
    fn default() -> Self {
        Self {
            budget: None,
            masking: true,
            keep_results: 3,
            summarization: true,
            keep_turns: 2,
            summary_tokens: 160,
            max_result_tokens: None,
        }
    }
}

impl ContextPolicy {
    /// Masking (last 3 results kept whole) and then summarisation (last 2 replies kept), within
    /// the daemon's context.
    pub fn new() -> Self {
        Self::default()
    }
    /// The most tokens the session's log may hold, the next reply's `max_tokens` included
    /// (default, and at most: the model's context as the daemon serves it).
    pub fn budget(mut self, tokens: u32) -> Self {
        self.budget = Some(tokens);
        self
    }
    /// Whether old tool results are replaced by short stubs when the budget is reached
    /// (default on).
    pub fn masking(mut self, on: bool) -> Self {
        self.masking = on;
        self
    }
    /// How many of the newest tool results masking keeps whole (default 3). A reply's results
    /// are masked together or not at all.
    pub fn keep_results(mut self, k: usize) -> Self {
        self.keep_results = k;
        self
    }
    /// Whether the model summarises older turns into a new epoch when masking is not enough
    /// (default on).
    pub fn summarization(mut self, on: bool) -> Self {
        self.summarization = on;
        self
    }
    /// How many of the newest replies (with their results) a summary keeps verbatim at most
    /// (default 2): as many as leave a third of the budget free, else as many as fit.
    pub fn keep_turns(mut self, n: usize) -> Self {
        self.keep_turns = n;
        self
    }
    /// The longest summary, in tokens (default 160).
    pub fn summary_tokens(mut self, n: u32) -> Self {
        self.summary_tokens = n.max(16);
        self
    }
    /// The longest tool result, in tokens (at least 48); longer ones are truncated with a
    /// note saying so (default: a quarter of the budget).
    pub fn max_result_tokens(mut self, n: u32) -> Self {
        self.max_result_tokens = Some(n.max(MIN_RESULT_TOKENS));
        self
    }
}

/// What a span of the log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Part {
    /// Conversation from before this run: summarisable, never masked.
    History,
    /// The run's input message and the generation prompt after it.
    Input,
    /// A summary message from an earlier compaction; `open` when a generation prompt follows
    /// it inside the span.
    Summary {
        /// Whether the span ends with a generation prompt.
        open: bool,
        /// Whether the summary message repeats the run's input.
        has_input: bool,
    },
    /// One assistant reply, its end of turn included, with `calls` tool calls.
    Reply {
        /// How many calls it made.
        calls: usize,
    },
    /// The results of the previous reply's calls and the generation prompt after them.
    Results {
        /// The tools called, in order.
        names: Vec<String>,
        /// Whether they were replaced by stubs.
        masked: bool,
    },
}

impl Part {
    /// Whether the span ends with the template's generation prompt.
    pub(crate) fn ends_open(&self) -> bool {
        match self {
            Part::Input | Part::Results { .. } => true,
            Part::Summary { open, .. } => *open,
            Part::History | Part::Reply { .. } => false,
        }
    }
}

/// A stretch `start..end` of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) part: Part,
    pub(crate) start: u32,
    pub(crate) end: u32,
}

impl Span {
    pub(crate) fn len(&self) -> u32 {
        self.end - self.start
    }
}

/// The spans of a session's log from `floor` (the end of the prefix) to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContextLog {
    floor: u32,
    spans: Vec<Span>,
}

impl ContextLog {
    /// A log whose first `floor` tokens are never rewritten.
    pub(crate) fn new(floor: u32) -> Self {
        Self {
            floor,
            spans: Vec::new(),
        }
    }

    /// The log's length.
    pub(crate) fn len(&self) -> u32 {
        self.spans.last().map_or(self.floor, |s| s.end)
    }

    pub(crate) fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// Records that the log grew to `end` with `part`. A length that does not grow is ignored.
    pub(crate) fn push(&mut self, part: Part, end: u32) {
        let start = self.len();
        if end > start {
            self.spans.push(Span { part, start, end });
        }
    }

    /// Replaces spans `range` by `part` (none: removed) of `new_len` tokens, moving the later
    /// spans. Returns the first token position the rewrite touched.
    pub(crate) fn replace(
        &mut self,
        range: std::ops::Range<usize>,
        part: Option<Part>,
        new_len: u32,
    ) -> u32 {
        let start = self
            .spans
            .get(range.start)
            .map_or_else(|| self.len(), |s| s.start);
        let old_end = if range.is_empty() {
            start
        } else {
            self.spans[range.end - 1].end
        };
        let new_end = start + new_len;
        let tail: Vec<Span> = self.spans.drain(range.start..).skip(range.len()).collect();
        if let Some(part) = part.filter(|_| new_len > 0) {
            self.spans.push(Span {
                part,
                start,
                end: new_end,
            });
        }
        for mut s in tail {
            s.start = s.start - old_end + new_end;
            s.end = s.end - old_end + new_end;
            self.spans.push(s);
        }
        start
    }

    /// The unmasked results spans to mask so that at least the newest `keep` results stay
    /// whole, newest first (so rewriting them in this order leaves the others' offsets valid).
    pub(crate) fn mask_plan(&self, keep: usize) -> Vec<usize> {
        let mut kept = 0;
        let mut plan = Vec::new();
        for (i, s) in self.spans.iter().enumerate().rev() {
            if let Part::Results { names, masked } = &s.part {
                if kept >= keep {
                    if !masked {
                        plan.push(i);
                    }
                } else {
                    kept += names.len();
                }
            }
        }
        plan
    }

    /// Where a summary may end, the most spans kept first, keeping at most `keep_turns`
    /// replies: the start of a reply or of the input, or the end of the log unless it is a
    /// reply whose results are still to be appended. A cut `c` means
    /// spans `..c` are summarised; the region always holds something besides an old summary.
    pub(crate) fn summary_cuts(&self, keep_turns: usize) -> Vec<usize> {
        let n = self.spans.len();
        let kept_replies = |c: usize| {
            self.spans[c..]
                .iter()
                .filter(|s| matches!(s.part, Part::Reply { .. }))
                .count()
        };
        // A last reply with calls has its results still to come: the end is no cut then.
        let pending = matches!(
            self.spans.last(),
            Some(Span { part: Part::Reply { calls }, .. }) if *calls > 0
        );
        (1..=n)
            .filter(|&c| {
                if c == n {
                    !pending
                } else {
                    matches!(self.spans[c].part, Part::Reply { .. } | Part::Input)
                }
            })
            .filter(|&c| kept_replies(c) <= keep_turns)
            .filter(|&c| {
                self.spans[..c]
                    .iter()
                    .any(|s| !matches!(s.part, Part::Summary { .. }))
            })
            .collect()
    }

    /// Whether spans `..cut` hold the run's input (verbatim, or repeated by a summary).
    pub(crate) fn input_before(&self, cut: usize) -> bool {
        self.spans[..cut].iter().any(|s| {
            matches!(
                s.part,
                Part::Input
                    | Part::Summary {
                        has_input: true,
                        ..
                    }
            )
        })
    }

    /// Checks the invariants: spans are contiguous from the floor, and every results span
    /// directly follows a reply that made calls.
    #[cfg(test)]
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut at = self.floor;
        for (i, s) in self.spans.iter().enumerate() {
            if s.start != at || s.end <= s.start {
                return Err(format!(
                    "span {i} is {}..{}, expected to start at {at}",
                    s.start, s.end
                ));
            }
            at = s.end;
            if let Part::Results { names, .. } = &s.part {
                match i.checked_sub(1).map(|j| &self.spans[j].part) {
                    Some(Part::Reply { calls }) if *calls == names.len() => {}
                    other => return Err(format!("results span {i} follows {other:?}")),
                }
            }
            // Only the last reply may still wait for its results.
            if let (Part::Reply { calls }, Some(next)) = (&s.part, self.spans.get(i + 1)) {
                if *calls > 0 && !matches!(next.part, Part::Results { .. }) {
                    return Err(format!(
                        "reply {i} with calls is followed by {:?}",
                        next.part
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn results(n: usize) -> Part {
        Part::Results {
            names: vec!["t".into(); n],
            masked: false,
        }
    }

    /// A log: input, then turns of (reply with `calls`, results), each span `w` tokens.
    fn log(turns: &[(usize, u32)]) -> ContextLog {
        let mut l = ContextLog::new(100);
        l.push(Part::Input, 120);
        for &(calls, w) in turns {
            let end = l.len() + w;
            l.push(Part::Reply { calls }, end);
            if calls > 0 {
                let end = l.len() + w * 3;
                l.push(results(calls), end);
            }
        }
        l
    }

    /// As [`log`], with the last reply's results not appended yet (when it made calls).
    fn log_pending(turns: &[(usize, u32)]) -> ContextLog {
        let mut l = log(turns);
        if matches!(
            l.spans.last(),
            Some(Span {
                part: Part::Results { .. },
                ..
            })
        ) {
            l.spans.pop();
        }
        l
    }

    #[test]
    fn masking_keeps_the_newest_results_whole_and_skips_masked_ones() {
        let mut l = log(&[(1, 10), (2, 10), (1, 10), (1, 10)]);
        // Results spans are at 2, 4, 6, 8 (1, 2, 1, 1 results).
        assert_eq!(l.mask_plan(2), vec![4, 2]);
        assert_eq!(l.mask_plan(0), vec![8, 6, 4, 2]);
        assert_eq!(l.mask_plan(5), Vec::<usize>::new());
        let Part::Results { names, .. } = l.spans[2].part.clone() else {
            unreachable!()
        };
        l.replace(
            2..3,
            Some(Part::Results {
                names,
                masked: true,
            }),
            5,
        );
        l.check().unwrap();
        assert_eq!(l.mask_plan(2), vec![4]);
    }

    #[test]
    fn summary_cuts_start_at_replies_and_keep_at_most_the_asked_turns() {
        let l = log(&[(1, 10), (0, 10)]);
        // Spans: input 0, reply 1, results 2, reply 3.
        assert_eq!(l.summary_cuts(5), vec![1, 3, 4]);
        assert_eq!(l.summary_cuts(1), vec![3, 4]);
        assert_eq!(l.summary_cuts(0), vec![4]);
        assert!(l.input_before(1));
        // Before the last reply's results are appended, the end is no cut: the reply would be
        // summarised and its results appended after the summary.
        let l = log_pending(&[(1, 10), (2, 10)]);
        // Spans: input 0, reply 1, results 2, reply 3 (its results pending).
        assert_eq!(l.summary_cuts(5), vec![1, 3]);
        assert_eq!(l.summary_cuts(0), Vec::<usize>::new());
    }

    #[test]
    fn replace_moves_later_spans() {
        let mut l = log(&[(1, 10), (1, 10)]);
        let len = l.len();
        let start = l.replace(
            0..3,
            Some(Part::Summary {
                open: true,
                has_input: true,
            }),
            7,
        );
        assert_eq!(start, 100);
        l.check().unwrap();
        assert_eq!(l.len(), len - (20 + 10 + 30) + 7);
        assert_eq!(l.spans()[0].end, 107);
        assert_eq!(l.spans()[1].part, Part::Reply { calls: 1 });
    }

    proptest! {
        /// Whatever the log, masking plans only unmasked results older than the kept ones, and
        /// every cut keeps replies together with their results; applying a summary at any cut
        /// and then masking keeps the map valid.
        #[test]
        fn compaction_plans_keep_calls_with_results(
            turns in prop::collection::vec((0usize..3, 1u32..40), 0..12),
            keep in 0usize..5,
            keep_turns in 0usize..4,
            pick in 0usize..100,
            pending in any::<bool>(),
        ) {
            let mut l = if pending { log_pending(&turns) } else { log(&turns) };
            l.check().unwrap();
            let waiting = matches!(l.spans.last(), Some(Span { part: Part::Reply { calls }, .. }) if *calls > 0);
            let plan = l.mask_plan(keep);
            let newer: usize = l.spans.iter().enumerate()
                .filter(|(i, _)| plan.first().is_none_or(|&p| *i > p))
                .filter_map(|(_, s)| match &s.part { Part::Results { names, .. } => Some(names.len()), _ => None })
                .sum();
            if !plan.is_empty() {
                prop_assert!(newer >= keep);
            }
            prop_assert!(plan.windows(2).all(|w| w[0] > w[1]));
            for &i in &plan {
                let unmasked = matches!(l.spans[i].part, Part::Results { masked: false, .. });
                prop_assert!(unmasked, "span {} is not unmasked results", i);
            }
            let cuts = l.summary_cuts(keep_turns);
            for &c in &cuts {
                let at_results = c < l.spans.len() && matches!(l.spans[c].part, Part::Results { .. });
                prop_assert!(!at_results, "cut {} separates a reply from its results", c);
            }
            if let Some(&c) = cuts.get(pick % cuts.len().max(1)) {
                let open = l.spans[c - 1].part.ends_open();
                let has_input = l.input_before(c);
                l.replace(0..c, Some(Part::Summary { open, has_input }), 30);
                l.check().unwrap();
                let still_waiting = matches!(l.spans.last(), Some(Span { part: Part::Reply { calls }, .. }) if *calls > 0);
                prop_assert_eq!(waiting, still_waiting, "a summary took a reply whose results are pending");
            }
            for i in l.mask_plan(keep) {
                let Part::Results { names, .. } = l.spans[i].part.clone() else { unreachable!() };
                l.replace(i..i + 1, Some(Part::Results { names, masked: true }), 4);
                l.check().unwrap();
            }
        }
    }
}
