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
    /// The tokens sampled so far (an end-of-sequence token is not included).
    pub tokens: Vec<u32>,
    /// The text streamed so far.
    pub text: String,
}

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
    /// `stop_ids` end the sequence (ignored when `opts.ignore_eos`); `constraint` is the
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
            stop_ids: if opts.ignore_eos {
                Vec::new()
            } else {
                stop_ids
            },
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
        if let Some(c) = &mut self.constraint {
            if let Err(e) = c.mask(logits) {
                self.constraint_failed = Some(e);
            }
        }
        self.sampler.sample(logits, history)
    }

    /// Seconds spent on the constraint (masks and grammar steps) so far.
    pub fn constraint_seconds(&self) -> f64 {
        self.constraint.as_ref().map_or(0.0, |c| c.mask_seconds)
    }

    /// Whether `tok` ends the sequence (end-of-sequence or end-of-turn).
    pub fn is_stop_token(&self, tok: u32) -> bool {
        self.stop_ids.contains(&tok)
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
