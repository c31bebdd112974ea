//! Speculative decoding with a draft model: a second, smaller [`Executor`] over the same
//! vocabulary (Qwen2.5-Coder-0.5B drafting for 1.5B) proposes the next tokens greedily, and
//! the target verifies them exactly as it verifies model-free drafts ([`crate::spec`]), so
//! greedy output stays token-identical and a constraint only ever advances by accepted tokens.
//!
//! [`Drafter`] owns the draft executor and its own small page pool (`--draft-kv-memory`),
//! separate from the scheduler's [`crate::cache::PagePool`]: nothing in the radix tree or the
//! target's pool ever names a draft page. Per session it keeps what it has fed the draft model
//! (its tokens and page table); to draft `k` tokens after a context `T` it drops the draft KV
//! past the longest common prefix of `T` and what it fed (rejected draft tokens, a rewritten
//! log), feeds what is missing (at most [`DraftConfig::prefill_chunk`] tokens a step: a long
//! prompt is caught up over a few steps, drafting nothing until then), and runs `k` greedy
//! decode steps, every drafting sequence of the step batched into each forward call.
//!
//! **Architecture Invariant:** the drafter never fails a request. A full draft pool first
//! evicts the least recently used idle sessions' draft state, then gives the sequence no model
//! draft (it falls back to the model-free drafts); a draft executor error is logged and drops
//! the state of the sequences in that call. Draft tokens only ever reach the target as
//! candidates to verify.
//!
//! [`DraftGate`] decides whether the drafter pays: it compares the measured seconds per
//! generated token of decode steps that used the drafter against steps that did not (one in
//! [`GATE_PROBE_EVERY`] steps runs without it to keep that figure fresh) and switches the
//! drafter off for a while when it is slower — on a small CPU a draft model can cost more than
//! the target steps it saves.

use crate::SessionId;
use agentd_engine::executor::{RowKind, SeqStep};
use agentd_engine::Executor;
use std::collections::HashMap;

/// How the draft model is run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DraftConfig {
    /// Bytes of the draft model's KV pool (`--draft-kv-memory`).
    pub kv_memory: usize,
    /// The most context tokens fed to the draft model for one sequence in one step (a longer
    /// catch-up, a new prompt, takes several steps and drafts nothing until it is done).
    pub prefill_chunk: usize,
    /// Switch the drafter off while it does not pay ([`DraftGate`]); off: always draft.
    pub adaptive: bool,
}

impl Default for DraftConfig {
    fn default() -> Self {
        Self {
            kv_memory: 256 << 20,
            prefill_chunk: 256,
            adaptive: true,
        }
    }
}

/// One sequence's request for a model draft.
#[derive(Debug, Clone)]
pub(crate) struct DraftJob {
    /// Whose draft state to use (a session keeps it across its generations).
    pub key: SessionId,
    /// The whole context: every token of the sequence, the one fed this step included.
    pub context: Vec<u32>,
    /// Tokens to draft.
    pub k: usize,
    /// Tokens that end the generation: a draft ends with one.
    pub stop: Vec<u32>,
}

/// What the drafter has fed the draft model for one session.
#[derive(Debug, Default)]
struct DraftSeq {
    /// Tokens whose KV is in `pages`, from position 0.
    fed: Vec<u32>,
    /// Page ids of the draft pool, in position order.
    pages: Vec<u32>,
    /// The drafter's clock when this state was last used.
    last_use: u64,
}

/// The draft model, its page pool and each session's draft state. See the module docs.
pub struct Drafter {
    exec: Box<dyn Executor>,
    page_size: usize,
    capacity: usize,
    free: Vec<u32>,
    seqs: HashMap<SessionId, DraftSeq>,
    clock: u64,
    /// Tokens the target can verify: draft tokens at or above it end the draft.
    target_vocab: usize,
    context_length: usize,
    prefill_chunk: usize,
}

/// Why a drafter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DraftError {
    /// The draft pool is too small for even one sequence's first page.
    #[error("--draft-kv-memory of {bytes} bytes holds {pages} draft pages of {page_size} tokens ({page_bytes} bytes each); at least 2 are needed")]
    PoolTooSmall {
        /// The budget.
        bytes: usize,
        /// Pages it holds.
        pages: usize,
        /// Tokens per page.
        page_size: usize,
        /// Bytes per page.
        page_bytes: usize,
    },
    /// The draft executor refused to allocate its pool.
    #[error("allocating the draft model's KV pool: {0}")]
    Allocate(#[from] agentd_engine::ExecError),
}

impl Drafter {
    /// A drafter over `exec`, with a pool of `cfg.kv_memory` bytes in pages of `page_size`
    /// tokens, for a target whose logits have `target_vocab` entries.
    pub fn new(
        mut exec: Box<dyn Executor>,
        cfg: &DraftConfig,
        page_size: usize,
        target_vocab: usize,
    ) -> Result<Self, DraftError> {
        let page_bytes = exec.kv_bytes_per_token() * page_size;
        let pages = cfg.kv_memory / page_bytes.max(1);
        if pages < 2 {
            return Err(DraftError::PoolTooSmall {
                bytes: cfg.kv_memory,
                pages,
                page_size,
                page_bytes,
            });
        }
        exec.allocate(pages, page_size)?;
        tracing::info!(
            pages,
            page_size,
            bytes = pages * page_bytes,
            "draft KV pool allocated"
        );
        let context_length = exec.shape().context_length;
        Ok(Self {
            exec,
            page_size,
            capacity: pages,
            free: (0..pages as u32).rev().collect(),
            seqs: HashMap::new(),
            clock: 0,
            target_vocab,
            context_length,
            prefill_chunk: cfg.prefill_chunk.max(1),
        })
    }

    /// Pages in the draft pool.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Draft pages not held by any session.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Drops `key`'s draft state (its session closed), returning its pages.
    pub(crate) fn forget(&mut self, key: SessionId) {
        if let Some(s) = self.seqs.remove(&key) {
            self.free.extend(s.pages);
        }
    }

    /// Checks that every page is either free or held by exactly one session, and that each
    /// session holds the pages its fed tokens need.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let mut seen = vec![false; self.capacity];
        for p in self
            .free
            .iter()
            .chain(self.seqs.values().flat_map(|s| &s.pages))
        {
            let slot = seen
                .get_mut(*p as usize)
                .ok_or_else(|| format!("draft page {p} outside the pool"))?;
            if *slot {
                return Err(format!("draft page {p} held twice"));
            }
            *slot = true;
        }
        if let Some(p) = seen.iter().position(|s| !s) {
            return Err(format!("draft page {p} leaked"));
        }
        for (k, s) in &self.seqs {
            if s.pages.len() < s.fed.len().div_ceil(self.page_size) {
                return Err(format!(
                    "{k:?}: {} tokens in {} pages",
                    s.fed.len(),
                    s.pages.len()
                ));
            }
        }
        Ok(())
    }

    /// Truncates `key`'s draft state to its first `keep` fed tokens, returning the pages past
    /// them.
    fn truncate(&mut self, key: SessionId, keep: usize) {
        let ps = self.page_size;
        if let Some(s) = self.seqs.get_mut(&key) {
            s.fed.truncate(keep);
            let pages = keep.div_ceil(ps);
            if s.pages.len() > pages {
                self.free.extend(s.pages.drain(pages..));
            }
        }
    }

    /// Makes `key` hold pages for positions `0..positions`, evicting idle sessions' state
    /// (least recently used first, never one used in this call) when the pool runs short.
    /// False when the pages cannot be had.
    fn reserve(&mut self, key: SessionId, positions: usize) -> bool {
        let want = positions.div_ceil(self.page_size);
        let have = self.seqs.get(&key).map_or(0, |s| s.pages.len());
        let need = want.saturating_sub(have);
        while self.free.len() < need {
            let victim = self
                .seqs
                .iter()
                .filter(|(_, s)| s.last_use < self.clock && !s.pages.is_empty())
                .min_by_key(|(_, s)| s.last_use)
                .map(|(k, _)| *k);
            match victim {
                Some(v) => self.forget(v),
                None => return false,
            }
        }
        let s = self.seqs.entry(key).or_default();
        for _ in 0..need {
            s.pages.push(self.free.pop().expect("counted above"));
        }
        true
    }

    /// Greedy drafts for `jobs`, one per job (empty where there is none this step: the
    /// context is still being caught up, the pool or the draft model's context is too small,
    /// or the draft executor failed). All jobs' rows share each forward call.
    pub(crate) fn draft(&mut self, jobs: &[DraftJob]) -> Vec<Vec<u32>> {
        self.clock += 1;
        let mut drafts = vec![Vec::new(); jobs.len()];
        // Per job in this call: the tokens fed now, where from, and whether it drafts.
        struct Active {
            job: usize,
            pos0: usize,
            feed: Vec<u32>,
            drafting: bool,
        }
        let mut active: Vec<Active> = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            let n = job.context.len();
            if n == 0 || job.k == 0 || n + job.k > self.context_length {
                continue;
            }
            let clock = self.clock;
            let s = self.seqs.entry(job.key).or_default();
            s.last_use = clock;
            let common = agentd_store::common_len(&s.fed, &job.context);
            // The last context token's logits give the first draft token: feed it again when
            // its KV is all that is there.
            let keep = common.min(n - 1);
            self.truncate(job.key, keep);
            let missing = n - keep;
            let drafting = missing <= self.prefill_chunk;
            let take = missing.min(self.prefill_chunk);
            // The context fed now, plus the draft tokens fed back (all but the last).
            let positions = keep + take + if drafting { job.k - 1 } else { 0 };
            if !self.reserve(job.key, positions) {
                continue;
            }
            active.push(Active {
                job: j,
                pos0: keep,
                feed: job.context[keep..keep + take].to_vec(),
                drafting,
            });
        }
        // The first call feeds the context; each later one the last draft token.
        while !active.is_empty() {
            let tables: Vec<Vec<u32>> = active
                .iter()
                .map(|a| self.seqs[&jobs[a.job].key].pages.clone())
                .collect();
            let steps: Vec<SeqStep<'_>> = active
                .iter()
                .zip(&tables)
                .map(|(a, t)| SeqStep {
                    tokens: &a.feed,
                    pos0: a.pos0,
                    page_table: t,
                    kind: if a.feed.len() > 1 {
                        RowKind::Prompt
                    } else {
                        RowKind::Decode
                    },
                    logits: usize::from(a.drafting),
                })
                .collect();
            let out = self.exec.forward(&steps);
            drop(steps);
            let logits = match out {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "the draft model failed; dropping its drafts");
                    for a in &active {
                        self.forget(jobs[a.job].key);
                        drafts[a.job].clear();
                    }
                    return drafts;
                }
            };
            let mut next = Vec::new();
            for (a, l) in active.into_iter().zip(logits) {
                let job = &jobs[a.job];
                let s = self.seqs.get_mut(&job.key).expect("reserved");
                s.fed.extend_from_slice(&a.feed);
                if !a.drafting {
                    continue;
                }
                let Some(l) = l else { continue };
                let tok = argmax(&l);
                if tok as usize >= self.target_vocab {
                    continue;
                }
                drafts[a.job].push(tok);
                if drafts[a.job].len() < job.k && !job.stop.contains(&tok) {
                    next.push(Active {
                        job: a.job,
                        pos0: s.fed.len(),
                        feed: vec![tok],
                        drafting: true,
                    });
                }
            }
            active = next;
        }
        drafts
    }
}

/// The index of the largest logit (the first of equals).
fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Decode steps that use the drafter between two steps without it (which keep the
/// without-drafter figure current).
pub const GATE_PROBE_EVERY: u64 = 16;
/// Steps of each kind measured before the gate judges.
const GATE_MIN_SAMPLES: u32 = 4;
/// Decode steps the drafter stays off after it was found not to pay.
const GATE_OFF_STEPS: u64 = 256;
/// The moving averages' weight for the newest step.
const GATE_WEIGHT: f64 = 0.2;

/// Whether the draft model pays, from measured step times (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct DraftGate {
    /// Seconds per generated token in pure decode steps with the drafter (its time
    /// included), a moving average, and how many steps it has seen.
    with: Option<f64>,
    with_n: u32,
    /// The same without the drafter.
    without: Option<f64>,
    without_n: u32,
    /// Pure decode steps counted.
    steps: u64,
    /// The drafter is off until this step.
    off_until: u64,
}

impl DraftGate {
    /// Whether this step may use the drafter (`adaptive` false: always).
    pub fn use_now(&self, adaptive: bool) -> bool {
        if !adaptive {
            return true;
        }
        if self.steps < self.off_until {
            return false;
        }
        // Now and then a step without it, to keep that figure current.
        self.steps % GATE_PROBE_EVERY != GATE_PROBE_EVERY - 1
    }

    /// Learns from a step that took `seconds` (drafting included) and produced `tokens`, with
    /// the drafter (`drafted`) or without. Only steps of decode rows alone (`decode_only`) are
    /// measured: prompt rows would make a step's time say nothing about decoding.
    pub fn record(&mut self, decode_only: bool, drafted: bool, seconds: f64, tokens: usize) {
        self.steps += 1;
        if !decode_only || tokens == 0 {
            return;
        }
        let per = seconds / tokens as f64;
        let (avg, n) = if drafted {
            (&mut self.with, &mut self.with_n)
        } else {
            (&mut self.without, &mut self.without_n)
        };
        *avg = Some(avg.map_or(per, |a| a + GATE_WEIGHT * (per - a)));
        *n += 1;
        if let (Some(w), Some(wo)) = (self.with, self.without) {
            if self.with_n >= GATE_MIN_SAMPLES && self.without_n >= GATE_MIN_SAMPLES && w > wo {
                tracing::info!(
                    with_ms = w * 1e3,
                    without_ms = wo * 1e3,
                    "the draft model does not pay here; off for {GATE_OFF_STEPS} decode steps"
                );
                self.off_until = self.steps + GATE_OFF_STEPS;
                // Measured afresh when it comes back.
                self.with = None;
                self.with_n = 0;
            }
        }
    }

    /// Whether the gate has switched the drafter off now.
    pub fn is_off(&self) -> bool {
        self.steps < self.off_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_turns_a_drafter_that_costs_more_than_it_saves_off_and_retries_it() {
        let mut g = DraftGate::default();
        assert!(g.use_now(true));
        // A drafter that doubles the tokens per step for 1.5x the time pays.
        for _ in 0..64 {
            let drafted = g.use_now(true);
            if drafted {
                g.record(true, true, 0.15, 2);
            } else {
                g.record(true, false, 0.1, 1);
            }
        }
        assert!(!g.is_off());
        // One that costs 3x for 1.2x the tokens does not.
        let mut g = DraftGate::default();
        // Steps with prompt rows say nothing.
        for _ in 0..10 {
            g.record(false, true, 10.0, 1);
        }
        let mut steps = 0;
        while !g.is_off() {
            let drafted = g.use_now(true);
            if drafted {
                g.record(true, true, 0.3, 6);
            } else {
                g.record(true, false, 0.1, 5);
            }
            steps += 1;
            assert!(steps < 200, "never switched off");
        }
        for _ in 0..GATE_OFF_STEPS {
            assert!(!g.use_now(true));
            g.record(true, false, 0.1, 5);
        }
        assert!(
            (0..2).any(|_| {
                let on = g.use_now(true);
                g.record(true, false, 0.1, 5);
                on
            }),
            "tried again after a while"
        );
    }
}
