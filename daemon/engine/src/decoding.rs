//! One generation's output side: sampling a token from logits, then turning the tokens into
//! text that is safe to stream (whole UTF-8 characters, never part of a stop string), and
//! deciding when the generation ends. Built off the engine thread ([`crate::LoadedModel::decoding`]
//! compiles the constraint there) and driven by the scheduler, one token at a time.

use crate::constraint::{Constraint, ConstraintError};
use crate::detok::{Decode, IncrementalDecoder};
use crate::loaded::{FinishReason, GenerateOptions, Result};
use crate::sampling::Sampler;
use crate::stop::{StopMatcher, StopOutcome};
use std::sync::Arc;

/// The tokenizer side a [`Decoding`] needs: ids back to text.
pub type Detokenizer = Arc<dyn Decode + Send + Sync>;

/// The state of one generation's output.
pub struct Decoding {
    sampler: Sampler,
    stop: StopMatcher,
    detok: IncrementalDecoder,
    tokenizer: Detokenizer,
    stop_ids: Vec<u32>,
    max_tokens: usize,
    constraint: Option<Constraint>,
    /// A constraint failure seen while masking, reported by the next [`Decoding::push`].
    constraint_failed: Option<ConstraintError>,
    /// End-of-sequence tokens never sampled (`ignore_eos`), unless nothing else is allowed.
    banned: Vec<u32>,
    /// How many alternatives to report with each token's log-probability (`None`: no
    /// log-probabilities).
    logprobs: Option<usize>,
    /// The last sampled token's log-probability, taken by [`Decoding::take_logprob`].
    last_logprob: Option<TokenLogprob>,
    /// The tokens sampled so far (an end-of-sequence token is not included).
    pub tokens: Vec<u32>,
    /// The text streamed so far.
    pub text: String,
}

/// A sampled token's log-probability under the model's own distribution (the raw logits,
/// before the constraint's mask, penalties and temperature: vLLM's default), with the most
/// likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The sampled token's natural-log probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The most alternatives [`GenerateOptions::logprobs`] may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// What one sampled token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Text that is now final and can be streamed (may be empty).
    pub text: String,
    /// Set when the generation is over.
    pub finish: Option<FinishReason>,
}

impl Decoding {
    /// Checks `opts` (sampling parameters, stop strings) and starts an empty output.
    /// `stop_ids` end the sequence (with `opts.ignore_eos` they are not sampled while anything
    /// else is allowed); `constraint` is the
    /// compiled form of `opts.constraint`, if any.
    pub fn new(
        opts: &GenerateOptions,
        stop_ids: Vec<u32>,
        constraint: Option<Constraint>,
        tokenizer: Detokenizer,
    ) -> Result<Self> {
        Ok(Self {
            constraint,
            constraint_failed: None,
            sampler: Sampler::new(opts.sampling.clone())?,
            stop: StopMatcher::new(opts.stop.clone())?,
            detok: IncrementalDecoder::new(),
            tokenizer,
            banned: if opts.ignore_eos {
                stop_ids.clone()
            } else {
                Vec::new()
            },
            stop_ids,
            logprobs: opts.logprobs.map(|n| n.min(MAX_TOP_LOGPROBS)),
            last_logprob: None,
            max_tokens: opts.max_tokens,
            tokens: Vec::new(),
            text: String::new(),
        })
    }

    /// The most tokens this generation may produce.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Picks the next token from `logits` (`history`: every token of the sequence so far, for
    /// the repetition penalties).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let raw = self.logprobs.map(|_| logits.to_vec());
        if let Some(c) = &mut self.constraint {
            if let Err(e) = c.mask(logits) {
                self.constraint_failed = Some(e);
            }
        }
        if !self.banned.is_empty() {
            ban(logits, &self.banned);
        }
        let tok = self.sampler.sample(logits, history);
        if let (Some(n), Some(raw)) = (self.logprobs, raw) {
            self.last_logprob = Some(logprob_of(&raw, tok, n));
        }
        tok
    }

    /// The log-probability of the token [`Decoding::sample`] picked last, when this
    /// generation asked for them.
    pub fn take_logprob(&mut self) -> Option<TokenLogprob> {
        self.last_logprob.take()
    }

    /// Seconds spent on the constraint (masks and grammar steps) so far.
    pub fn constraint_seconds(&self) -> f64 {
        self.constraint.as_ref().map_or(0.0, |c| c.mask_seconds)
    }

    /// Whether `tok` ends the sequence (end-of-sequence or end-of-turn). With `ignore_eos`,
    /// such a token is only sampled when the constraint allows nothing else.
    pub fn is_stop_token(&self, tok: u32) -> bool {
        self.stop_ids.contains(&tok)
    }

    /// The tokens that end the sequence ([`Decoding::is_stop_token`]).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Takes the sampled token `tok`; `context_full` says the sequence has no room for another
    /// token. Returns the text that became final and whether the generation is over. When it is
    /// over for any reason but a stop string, the decoder's tail is flushed into the text.
    pub fn push(&mut self, tok: u32, context_full: bool) -> Result<Pushed> {
        if let Some(e) = self.constraint_failed.take() {
            return Err(e.into());
        }
        if self.is_stop_token(tok) {
            return self.finish(FinishReason::Eos, String::new());
        }
        if let Some(c) = &mut self.constraint {
            c.commit(tok)?;
        }
        self.tokens.push(tok);
        let piece = self.detok.push(&*self.tokenizer, tok)?;
        let text = match self.stop.push(&piece) {
            StopOutcome::Continue(s) => s,
            StopOutcome::Stopped { emit, stop } => {
                self.text.push_str(&emit);
                return Ok(Pushed {
                    text: emit,
                    finish: Some(FinishReason::Stop(stop)),
                });
            }
        };
        if self.tokens.len() >= self.max_tokens {
            return self.finish(FinishReason::MaxTokens, text);
        }
        if context_full {
            return self.finish(FinishReason::ContextFull, text);
        }
        if self.constraint.as_ref().is_some_and(|c| c.is_stopped()) {
            // The grammar is complete: the reply ends as at an end of turn.
            return self.finish(FinishReason::Eos, text);
        }
        self.text.push_str(&text);
        Ok(Pushed { text, finish: None })
    }

    fn finish(&mut self, reason: FinishReason, mut text: String) -> Result<Pushed> {
        let tail = self.detok.finish(&*self.tokenizer)?;
        let finish = match self.stop.push(&tail) {
            StopOutcome::Continue(s) => {
                text += &s;
                text += &self.stop.finish();
                reason
            }
            StopOutcome::Stopped { emit, stop } => {
                text += &emit;
                FinishReason::Stop(stop)
            }
        };
        self.text.push_str(&text);
        Ok(Pushed {
            text,
            finish: Some(finish),
        })
    }
}

/// Sets the logits of `banned` to −∞, unless no other token would be left (a grammar that only
/// allows the end): `ignore_eos` must not make a finished constraint pick a forbidden token.
fn ban(logits: &mut [f32], banned: &[u32]) {
    let other = logits
        .iter()
        .enumerate()
        .any(|(i, &l)| l > f32::NEG_INFINITY && !banned.contains(&(i as u32)));
    if other {
        for &b in banned {
            if let Some(l) = logits.get_mut(b as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// `tok`'s log-softmax in `logits` and the `n` most likely tokens' (NaN counts as −∞).
fn logprob_of(logits: &[f32], tok: u32, n: usize) -> TokenLogprob {
    let clean = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let max = logits
        .iter()
        .copied()
        .map(clean)
        .fold(f32::NEG_INFINITY, f32::max);
    let lse = if max == f32::NEG_INFINITY {
        0.0
    } else {
        let sum: f64 = logits
            .iter()
            .map(|&l| f64::from(clean(l) - max).exp())
            .sum();
        max + sum.ln() as f32
    };
    let lp = |i: usize| clean(logits.get(i).copied().unwrap_or(f32::NEG_INFINITY)) - lse;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &l) in logits.iter().enumerate() {
        let l = clean(l);
        if top.len() == n && top.last().is_none_or(|&(_, worst)| l <= worst) {
            continue;
        }
        let at = top.partition_point(|&(_, x)| x >= l);
        top.insert(at, (i as u32, l));
        top.truncate(n);
    }
    TokenLogprob {
        logprob: lp(tok as usize),
        top: top.into_iter().map(|(i, l)| (i, l - lse)).collect(),
    }
}

#[cfg(test)]
mod logprob_tests {
    use super::*;

    #[test]
    fn log_probabilities_are_a_log_softmax_with_the_best_alternatives_first() {
        let logits = [1.0f32, 3.0, f32::NAN, 2.0, f32::NEG_INFINITY];
        let lp = logprob_of(&logits, 3, 2);
        let z: f32 = [1.0f32, 3.0, 2.0].iter().map(|l| l.exp()).sum();
        assert!((lp.logprob - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((lp.top[0].1 - (3.0 - z.ln())).abs() < 1e-6);
        assert!(logprob_of(&logits, 4, 0).top.is_empty());
        assert_eq!(logprob_of(&logits, 4, 0).logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn banned_tokens_stay_possible_when_nothing_else_is() {
        let mut l = [0.5f32, 1.0, 2.0];
        ban(&mut l, &[2]);
        assert_eq!(l[2], f32::NEG_INFINITY);
        let mut only = [f32::NEG_INFINITY, f32::NEG_INFINITY, 2.0];
        ban(&mut only, &[2]);
        assert_eq!(only[2], 2.0);
    }
}
