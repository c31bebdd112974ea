//! Turning a logits vector into the next token id.
//!
//! [`SamplingParams`] says how to pick (greedy, or a seeded random draw after penalties and
//! truncation filters); [`Sampler`] holds the validated parameters, the random generator and the
//! scratch buffers, and picks one token per call to [`Sampler::sample`].
//!
//! The pipeline follows llama.cpp's default chain:
//! penalties → (greedy if `temperature == 0`) → top-k → top-p → min-p → temperature → softmax →
//! draw.
//!
//! **Invariants.** `sample` never panics and never allocates once its scratch buffers have grown
//! to the vocabulary size. NaN logits count as `-inf`. Candidates are ordered by logit, then by
//! ascending id, so ties are broken the same way on every run and a seeded sampler is exactly
//! reproducible. The vocabulary is never sorted: top-k uses a selection, min-p a threshold, and
//! top-p a histogram of the probability mass by logit, sorting only the bucket where the
//! cumulative mass crosses `top_p`.

use std::cmp::Ordering;
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How the next token is chosen from the model's logits.
///
/// Every field has an "off" value; [`SamplingParams::validate`] states the allowed ranges. Missing
/// fields in serialised form take their [`Default`] values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax, ties go to the lowest id). Finite, `>= 0`.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns the filter off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; `1.0` turns
    /// the filter off. In `(0, 1]`.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top token's; `0` turns the filter
    /// off. In `[0, 1)`.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens seen in the penalty window, as in
    /// Hugging Face and llama.cpp; `1.0` turns it off. Finite, `> 0`.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token seen in the penalty window; `0` turns it off.
    /// In `[-2, 2]`.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per occurrence in the penalty window; `0` turns it off.
    /// In `[-2, 2]`.
    pub frequency_penalty: f32,
    /// How many of the most recent tokens the penalties look at; `0` turns all penalties off.
    pub penalty_last_n: usize,
    /// Seed for the random draw: `Some` makes sampling reproducible, `None` seeds from OS entropy.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// agentd's one set of defaults ([`agentd_wire::sampling_defaults`]): temperature 0.7,
    /// top-k 40, top-p 0.95, min-p 0.05, repetition penalty 1.1 over the last 64 tokens,
    /// seeded from entropy.
    fn default() -> Self {
        use agentd_wire::sampling_defaults as d;
        Self {
            temperature: d::TEMPERATURE,
            top_k: d::TOP_K as usize,
            top_p: d::TOP_P,
            min_p: d::MIN_P,
            repetition_penalty: d::REPETITION_PENALTY,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: d::PENALTY_LAST_N,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Parameters for plain greedy decoding: always the most likely token, no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: None,
        }
    }

    /// Checks every field and reports all invalid ones at once, each with its value and the
    /// allowed range. NaN and infinities are rejected everywhere.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, name: &'static str, value: f32, allowed: &'static str| {
            if !ok {
                problems.push(InvalidParam {
                    name,
                    value: format!("{value:?}"),
                    allowed,
                });
            }
        };
        let t = self.temperature;
        check(
            t.is_finite() && t >= 0.0,
            "temperature",
            t,
            "a finite number >= 0 (0 means greedy)",
        );
        let p = self.top_p;
        check(
            p > 0.0 && p <= 1.0,
            "top_p",
            p,
            "0 < top_p <= 1 (1 means off)",
        );
        let m = self.min_p;
        check(
            (0.0..1.0).contains(&m),
            "min_p",
            m,
            "0 <= min_p < 1 (0 means off)",
        );
        let r = self.repetition_penalty;
        check(
            r.is_finite() && r > 0.0,
            "repetition_penalty",
            r,
            "a finite number > 0 (1 means off)",
        );
        let pp = self.presence_penalty;
        check(
            (-2.0..=2.0).contains(&pp),
            "presence_penalty",
            pp,
            "-2 <= presence_penalty <= 2 (0 means off)",
        );
        let fp = self.frequency_penalty;
        check(
            (-2.0..=2.0).contains(&fp),
            "frequency_penalty",
            fp,
            "-2 <= frequency_penalty <= 2 (0 means off)",
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SamplingError::InvalidParams(InvalidParams(problems)))
        }
    }

    fn penalties_enabled(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repetition_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

/// One rejected field of [`SamplingParams`]: its name, its value and what would be allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidParam {
    /// The field's name, as spelled in [`SamplingParams`].
    pub name: &'static str,
    /// The rejected value, formatted for people.
    pub value: String,
    /// The allowed range, in words.
    pub allowed: &'static str,
}

impl fmt::Display for InvalidParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is {} but must be {}",
            self.name, self.value, self.allowed
        )
    }
}

/// Every rejected field of one [`SamplingParams`], in field order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidParams(pub Vec<InvalidParam>);

impl fmt::Display for InvalidParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why a [`Sampler`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// One or more fields of [`SamplingParams`] are out of range.
    #[error("invalid sampling parameters: {0}")]
    InvalidParams(InvalidParams),
    /// No seed was given and the operating system could not provide one.
    #[error("could not seed the sampler from OS entropy (pass an explicit seed instead): {0}")]
    Entropy(String),
}

/// Picks next tokens according to one [`SamplingParams`], with its own random generator.
///
/// Keep one per generation stream: the generator's state carries over between calls, so a seeded
/// sampler produces the same sequence for the same logits and history.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Surviving `(id, logit)` pairs; reused between calls.
    candidates: Vec<(u32, f32)>,
    /// Unnormalised probabilities of `candidates` at the sampling temperature; reused.
    weights: Vec<f32>,
    /// Top-p's histogram: probability mass per bucket of logits; reused.
    mass: Vec<f64>,
    /// The penalty window, sorted to count occurrences; reused.
    window: Vec<u32>,
}

impl Sampler {
    /// Validates `params` and builds a sampler, seeding it from `params.seed` or, when that is
    /// `None` and sampling is not greedy, from OS entropy.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            // Greedy decoding never draws: don't depend on the OS for a seed nobody uses.
            None if params.temperature == 0.0 => ChaCha8Rng::seed_from_u64(0),
            None => {
                ChaCha8Rng::try_from_os_rng().map_err(|e| SamplingError::Entropy(e.to_string()))?
            }
        };
        Ok(Self {
            params,
            rng,
            candidates: Vec::new(),
            weights: Vec::new(),
            mass: Vec::new(),
            window: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token id from `logits` (one entry per vocabulary id).
    ///
    /// `logits` is used as scratch and holds the penalised logits afterwards; `history` is every
    /// token so far (prompt and generated), of which the last `penalty_last_n` are penalised. Ids
    /// in `history` outside the vocabulary are ignored. If every logit is NaN or `-inf` the lowest
    /// id (0) is returned, as is 0 for an empty `logits` slice.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        self.apply_penalties(logits, history);
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }

        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, &l)| l > f32::NEG_INFINITY)
                .map(|(i, &l)| (i as u32, l)),
        );
        if cands.is_empty() {
            return 0;
        }

        // Top-k: a selection, not a sort.
        let k = self.params.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
        }

        // Every later filter keeps the most likely token, so this stays the maximum.
        let max = cands
            .iter()
            .fold(f32::NEG_INFINITY, |m, &(_, l)| if l > m { l } else { m });

        // Top-p then min-p. Both keep a prefix of the candidates in descending order, and min-p's
        // prefix depends only on the maximum, so filtering by min-p first (cheap, no sort) keeps
        // the same set as long as top-p's mass is measured over the candidates before min-p.
        let top_p_target = (self.params.top_p < 1.0).then(|| {
            self.mass.clear();
            self.mass.resize(TOP_P_BUCKETS, 0.0);
            let mut total = 0.0f64;
            for &(_, l) in cands.iter() {
                let w = f64::from(weight(l, max, 1.0));
                self.mass[bucket(l, max)] += w;
                total += w;
            }
            f64::from(self.params.top_p) * total
        });
        if self.params.min_p > 0.0 {
            let threshold = max + self.params.min_p.ln();
            cands.retain(|&(_, l)| l >= threshold);
        }
        if let Some(target) = top_p_target {
            truncate_top_p(cands, &self.mass, max, target);
        }

        // Never empty (every filter keeps the top token), but a slip must not panic.
        let Some(&(first, _)) = cands.first() else {
            return 0;
        };
        if cands.len() == 1 {
            return first;
        }

        // Temperature, softmax (unnormalised) and the draw.
        let t = self.params.temperature;
        self.weights.clear();
        self.weights
            .extend(cands.iter().map(|&(_, l)| weight(l, max, t)));
        let total: f64 = self.weights.iter().map(|&w| f64::from(w)).sum();
        let r = self.rng.random::<f64>() * total;
        let mut cum = 0.0f64;
        let mut last_positive = first;
        for (&(id, _), &w) in cands.iter().zip(&self.weights) {
            if w > 0.0 {
                cum += f64::from(w);
                last_positive = id;
                if cum > r {
                    return id;
                }
            }
        }
        // Rounding left `r` just above the running sum.
        last_positive
    }

    /// Applies the repetition, presence and frequency penalties in place to the tokens in the
    /// last `penalty_last_n` entries of `history`.
    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        if !self.params.penalties_enabled() {
            return;
        }
        let start = history.len().saturating_sub(self.params.penalty_last_n);
        self.window.clear();
        self.window.extend_from_slice(&history[start..]);
        self.window.sort_unstable();
        let rep = self.params.repetition_penalty;
        let presence = self.params.presence_penalty;
        let frequency = self.params.frequency_penalty;
        for run in self.window.chunk_by(|a, b| a == b) {
            let Some(l) = logits.get_mut(run[0] as usize) else {
                continue;
            };
            let count = run.len() as f32;
            if *l > 0.0 {
                *l /= rep;
            } else {
                *l *= rep;
            }
            *l -= count * frequency + presence;
        }
    }
}

/// Orders candidates by descending logit, then ascending id: a total order, so every selection
/// and sort below gives the same result on every run.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// `exp((l - max) / t)`, with `l == max` giving exactly 1 so that a `+inf` maximum works.
fn weight(l: f32, max: f32, t: f32) -> f32 {
    if l == max {
        1.0
    } else {
        ((l - max) / t).exp()
    }
}

/// The index of the largest logit, the lowest one among equals (0 if all are `-inf`).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// How many buckets top-p's histogram has.
const TOP_P_BUCKETS: usize = 512;

/// How far below the top logit the histogram's buckets reach, evenly spaced; anything further
/// (probability under 1e-13 of the top token's) lands in the last bucket.
const TOP_P_SPAN: f32 = 30.0;

/// Top-p's histogram bucket for logit `l`: 0 for the top logit `max`, higher for lower logits, so
/// buckets follow the candidates' descending order.
fn bucket(l: f32, max: f32) -> usize {
    if l == max {
        return 0;
    }
    let scaled = (max - l) * ((TOP_P_BUCKETS - 1) as f32 / TOP_P_SPAN);
    // `as` saturates, so an infinite distance lands in the last bucket.
    (scaled as usize).min(TOP_P_BUCKETS - 1)
}

/// Top-p: keeps the shortest descending prefix of `cands` whose unnormalised mass (weights relative
/// to `max` at temperature 1) reaches `target`.
///
/// `mass` is the histogram of the mass per [`bucket`], taken before min-p filtered `cands`. Whole
/// buckets above the one where the cumulative mass crosses `target` are kept without sorting; only
/// that bucket is sorted and cut. If min-p already cut shorter than top-p would, its cut stands:
/// both filters keep a prefix, so together they keep the shorter one.
fn truncate_top_p(cands: &mut Vec<(u32, f32)>, mass: &[f64], max: f32, target: f64) {
    let mut cum = 0.0f64;
    let Some(crossing) = mass.iter().position(|&m| {
        let reached = cum + m >= target;
        if !reached {
            cum += m;
        }
        reached
    }) else {
        // Rounding kept the total just under the target: keep everything.
        return;
    };
    cands.retain(|&(_, l)| bucket(l, max) <= crossing);
    // Move the crossing bucket's candidates to the end and sort just them.
    let mut split = 0;
    for i in 0..cands.len() {
        if bucket(cands[i].1, max) < crossing {
            cands.swap(i, split);
            split += 1;
        }
    }
    cands[split..].sort_unstable_by(by_logit_desc);
    let mut keep = cands.len();
    for (i, &(_, l)) in cands[split..].iter().enumerate() {
        cum += f64::from(weight(l, max, 1.0));
        if cum >= target {
            keep = split + i + 1;
            break;
        }
    }
    cands.truncate(keep);
}

#[cfg(test)]
#[path = "sampling_tests.rs"]
mod tests;
