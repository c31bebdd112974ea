//! Speculative decoding without a draft model: draft tokens come from what agentd already
//! holds — what the radix tree holds after the sequence's whole context (an earlier sequence's
//! output after the same tokens: a retried or repeated request), else prompt lookup over the
//! sequence's own tokens (the most recent earlier occurrence of its last few tokens — tool
//! results quoted back, code re-emitted, JSON shapes that recur — and what follows it) —
//! run as extra decode rows of the sequence in the same batched step, and are accepted up to
//! the first token the sampler does not pick.
//!
//! Exactness: every row's token is drawn by the sequence's own sampler from that row's logits,
//! exactly as a decode step would draw it (the same mask, penalties over the same history, the
//! same random stream), and a draft token is kept only when it is the token drawn. For a
//! draft that is one fixed token this is the speculative-sampling acceptance rule (accept with
//! probability p(d), else draw from p without d), so the output distribution is unchanged; with
//! greedy decoding the tokens are identical, and since a row's logits never depend on how many
//! rows share the step, so are the bits. A constraint's grammar is advanced only by accepted
//! tokens, and each verified row is masked by the grammar as it stands after the tokens before it.
//!
//! Adaptive: each sequence's draft length doubles after a fully accepted draft and shrinks to
//! one more than what was accepted otherwise; after a run of drafts with nothing accepted the
//! sequence stops drafting for a while. In a busy batch (more than [`SpecConfig::small_batch`]
//! sequences decoding) a draft row costs about as much as a real one, so only sequences whose
//! recent acceptance is high draft (an estimate that recovers slowly while they do not, so they
//! are tried again); above [`SpecConfig::max_batch`] nobody drafts.

/// How the scheduler speculates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpecConfig {
    /// Draft at all.
    pub enabled: bool,
    /// The longest draft.
    pub max_draft: usize,
    /// The fewest trailing tokens that must match an earlier occurrence.
    pub min_match: usize,
    /// The longest trailing run looked up.
    pub max_match: usize,
    /// No drafts while more sequences than this decode in a step.
    pub max_batch: usize,
    /// Up to this many decoding sequences, any sequence drafts; above it (the extra rows then
    /// cost about as much as real ones), only sequences whose recent acceptance is at least
    /// [`SpecConfig::busy_acceptance`].
    pub small_batch: usize,
    /// The acceptance a sequence needs to draft in a batch above `small_batch`.
    pub busy_acceptance: f32,
}

impl Default for SpecConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_draft: 8,
            min_match: 2,
            max_match: 6,
            max_batch: 16,
            small_batch: 2,
            busy_acceptance: 0.75,
        }
    }
}

impl SpecConfig {
    /// Speculation off.
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }
}

/// One sequence's speculation state.
#[derive(Debug, Clone, Default)]
pub struct SpecState {
    /// The next draft's length (0 before the first draft, which is `max_draft / 2` long).
    pub next: usize,
    /// Drafts in a row with nothing accepted.
    pub misses: u32,
    /// Steps left before drafting again after too many misses.
    pub cooldown: u32,
    /// Recent acceptance (accepted over drafted, a moving average); `None` before any draft.
    pub rate: Option<f32>,
}

/// The moving average's weight for the newest draft.
const RATE_WEIGHT: f32 = 0.3;
/// How much a sequence's acceptance recovers per step without a draft, so one shut out of a
/// busy batch is tried again now and then.
const RATE_RECOVERY: f32 = 0.02;

/// Drafts in a row with nothing accepted before a sequence pauses drafting.
const MISSES_BEFORE_PAUSE: u32 = 3;
/// Decode steps a paused sequence waits before drafting again.
const PAUSE_STEPS: u32 = 16;

impl SpecState {
    /// How many tokens to draft now (0: none), at most `room`, while `batch` sequences decode.
    pub fn want(&self, cfg: &SpecConfig, room: usize, batch: usize) -> usize {
        if !cfg.enabled || room == 0 || self.cooldown > 0 || batch > cfg.max_batch {
            return 0;
        }
        if batch > cfg.small_batch && self.rate.unwrap_or(0.0) < cfg.busy_acceptance {
            return 0;
        }
        let next = if self.next == 0 {
            (cfg.max_draft / 2).max(1)
        } else {
            self.next
        };
        next.min(cfg.max_draft).min(room)
    }

    /// A decode step ran without a draft (a paused sequence counts down; the acceptance
    /// estimate recovers a little, up to what a busy batch needs).
    pub fn tick(&mut self, cfg: &SpecConfig) {
        self.cooldown = self.cooldown.saturating_sub(1);
        let r = self.rate.get_or_insert(0.0);
        if *r < cfg.busy_acceptance {
            *r = (*r + RATE_RECOVERY).min(cfg.busy_acceptance);
        }
    }

    /// Learns from a verified draft of `drafted` tokens of which `accepted` were kept.
    pub fn update(&mut self, cfg: &SpecConfig, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        let current = if self.next == 0 {
            (cfg.max_draft / 2).max(1)
        } else {
            self.next
        };
        let rate = accepted as f32 / drafted as f32;
        self.rate = Some(match self.rate {
            Some(r) => r + RATE_WEIGHT * (rate - r),
            None => rate,
        });
        if accepted == drafted {
            self.next = (current * 2).clamp(1, cfg.max_draft);
        } else {
            self.next = (accepted + 1).clamp(1, cfg.max_draft);
        }
        if accepted == 0 {
            self.misses += 1;
            if self.misses >= MISSES_BEFORE_PAUSE {
                self.misses = 0;
                self.cooldown = PAUSE_STEPS;
                self.next = 1;
            }
        } else {
            self.misses = 0;
        }
    }
}

/// Prompt lookup: the tokens that followed the most recent earlier occurrence of the longest
/// trailing run of `tokens` (between `cfg.min_match` and `cfg.max_match` long) that occurred
/// before, at most `max` of them. Empty when nothing matches.
pub fn lookup_draft(tokens: &[u32], cfg: &SpecConfig, max: usize) -> Vec<u32> {
    let n = tokens.len();
    if max == 0 || n < cfg.min_match + 1 {
        return Vec::new();
    }
    for m in (cfg.min_match..=cfg.max_match.min(n - 1)).rev() {
        let pattern = &tokens[n - m..];
        // Occurrences that end before the last token, so something follows them.
        if let Some(s) = (0..n - m).rev().find(|&s| &tokens[s..s + m] == pattern) {
            let from = s + m;
            return tokens[from..(from + max).min(n)].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_recent_match_gives_the_draft() {
        let cfg = SpecConfig::default();
        // "… 7 8 9 1 2 3 …" earlier; the sequence now ends with "8 9": draft "1 2 3".
        let t = [5, 7, 8, 9, 1, 2, 3, 4, 6, 8, 9];
        assert_eq!(lookup_draft(&t, &cfg, 3), vec![1, 2, 3]);
        // At most what follows the occurrence.
        assert_eq!(lookup_draft(&t, &cfg, 20), vec![1, 2, 3, 4, 6, 8, 9]);
        // The most recent occurrence wins.
        let t = [1, 2, 10, 1, 2, 20, 1, 2];
        assert_eq!(lookup_draft(&t, &cfg, 1), vec![20]);
        // Too short a match, or none.
        assert!(lookup_draft(&[1, 2, 3, 4], &cfg, 4).is_empty());
        assert!(lookup_draft(&[3, 9, 1, 9], &cfg, 4).is_empty());
        assert!(lookup_draft(&[1, 2, 1, 2], &cfg, 0).is_empty());
    }

    #[test]
    fn draft_length_adapts_and_pauses_after_misses() {
        let cfg = SpecConfig::default();
        let mut s = SpecState::default();
        assert_eq!(s.want(&cfg, 100, 1), 4);
        s.update(&cfg, 4, 4);
        assert_eq!(s.want(&cfg, 100, 1), 8);
        assert_eq!(s.want(&cfg, 3, 1), 3);
        s.update(&cfg, 8, 2);
        assert_eq!(s.want(&cfg, 100, 1), 3);
        for _ in 0..3 {
            s.update(&cfg, 3, 0);
        }
        for _ in 0..PAUSE_STEPS {
            assert_eq!(s.want(&cfg, 100, 1), 0);
            s.tick(&cfg);
        }
        assert_eq!(s.want(&cfg, 100, 1), 1);
        assert_eq!(SpecState::default().want(&SpecConfig::off(), 100, 1), 0);
        assert_eq!(s.want(&cfg, 100, cfg.max_batch + 1), 0);
    }

    #[test]
    fn a_busy_batch_drafts_only_for_sequences_that_accept_well() {
        let cfg = SpecConfig::default();
        let busy = cfg.small_batch + 1;
        let mut good = SpecState::default();
        good.update(&cfg, 4, 4);
        assert!(good.want(&cfg, 100, busy) > 0);
        let mut poor = SpecState::default();
        poor.update(&cfg, 4, 1);
        assert_eq!(poor.want(&cfg, 100, busy), 0);
        assert!(poor.want(&cfg, 100, 1) > 0);
        // Shut out of the busy batch, it is tried again after a while.
        let mut steps = 0;
        while poor.want(&cfg, 100, busy) == 0 {
            poor.tick(&cfg);
            steps += 1;
            assert!(steps < 100);
        }
    }
}
