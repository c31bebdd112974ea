//! The scheduler's public value types: ids, configuration, events, usage, statistics, errors.

use crate::cache::{RadixError, TreeStats};
use agentd_engine::{EngineError, ExecError, FinishReason, ModelDigests};
use agentd_store::{StoreConfig, StoreError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// A tenant: whose sessions and private prefixes these are. The service layer derives it from
/// the caller's identity; the scheduler only keeps tenants apart.
pub type TenantId = u64;

/// A session: a token log owned by one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SessionId(pub u64);

/// A registered (pinned) prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PrefixId(pub u64);

/// What an append adds to a session's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendInput {
    /// These tokens.
    Tokens(Vec<u32>),
    /// Messages, rendered by the caller (off the scheduler thread) in both forms: as the log's
    /// first turn, and as a continuation of a log that already has turns. The scheduler takes
    /// the form that fits the log when it appends, so no emptiness check can go stale. Each
    /// form is its tokens, or why the template refused it (reported only if it is the one
    /// needed).
    Rendered {
        /// The rendering for an empty log.
        first: std::result::Result<Vec<u32>, String>,
        /// The rendering after earlier turns.
        continuing: std::result::Result<Vec<u32>, String>,
    },
}

/// The session after an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Tokens in the log.
    pub tokens: usize,
    /// The log's epoch (bumped by rewrites).
    pub epoch: u64,
}

/// How the scheduler uses memory and compute.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens per KV page.
    pub page_size: usize,
    /// Bytes of KV memory to preallocate (all layers, keys and values).
    pub kv_memory: usize,
    /// The most sequences running at once (the decode batch).
    pub max_batch: usize,
    /// Tokens one engine step computes at most, decode rows included (chunked prefill).
    pub step_tokens: usize,
    /// Reuse cached prefixes (off: every request computes its whole prompt; for benchmarks).
    pub cache: bool,
    /// What one tenant may use.
    pub limits: TenantLimits,
    /// The disk tier, if any: cached prefixes survive restarts.
    pub store: Option<DiskTierConfig>,
    /// The shared tier, if any: full pages exported to it and loaded from it
    /// ([`crate::shared_tier`]).
    pub shared: Option<crate::SharedTierConfig>,
    /// Speculative decoding from the sequence's own tokens ([`crate::spec`]).
    pub speculation: crate::SpecConfig,
    /// The draft model's pool and pacing, when the scheduler is given one
    /// ([`crate::draft_model`]).
    pub draft: crate::DraftConfig,
    /// This daemon's node number in a cluster behind `agentd route` (0–127): session, prefix
    /// and request ids then carry it in bits 56–62, so a router sends each call to the daemon
    /// that made the id. `None`: ids are 63 random bits.
    pub node: Option<u8>,
}

/// Where the disk tier lives and what the KV in it was computed by.
#[derive(Debug, Clone)]
pub struct DiskTierConfig {
    /// The directory and byte budget.
    pub store: StoreConfig,
    /// The model's digests ([`agentd_engine::LoadedModel::digests`]): records written for
    /// another model, tokenizer or template are never read.
    pub digests: ModelDigests,
}

/// Per-tenant limits. Going over one is [`SchedError::LimitExceeded`], naming the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantLimits {
    /// Open sessions.
    pub sessions: usize,
    /// Generations waiting or running at once.
    pub concurrent_generations: usize,
    /// Tokens one request may span: its prompt plus `max_tokens`.
    pub request_tokens: usize,
    /// KV pages one request may need (prompt plus `max_tokens`, in pages).
    pub request_pages: usize,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            sessions: 4096,
            concurrent_generations: 256,
            request_tokens: usize::MAX,
            request_pages: usize::MAX,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            page_size: 16,
            kv_memory: 1 << 30,
            max_batch: 64,
            step_tokens: 512,
            cache: true,
            limits: TenantLimits::default(),
            store: None,
            shared: None,
            speculation: crate::SpecConfig::default(),
            draft: crate::DraftConfig::default(),
            node: None,
        }
    }
}

/// What a generation stream carries.
#[derive(Debug, Clone)]
pub enum Event {
    /// One sampled token and the text that became final with it (may be empty; the text of a
    /// multi-token character comes with its last token). The end-of-turn token is sent too.
    Token {
        /// The token id.
        id: u32,
        /// Text to show.
        text: String,
        /// Its log-probability, when the generation asked for them.
        logprob: Option<Box<agentd_engine::TokenLogprob>>,
    },
    /// The generation ended; nothing follows.
    Done(Usage),
    /// The generation failed; nothing follows.
    Error(SchedError),
}

/// Accounting for one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Usage {
    /// Tokens in the prompt (the session's whole log when the request started).
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the cache instead of being computed.
    pub cached_tokens: usize,
    /// Of `cached_tokens`, those read back from the disk tier for this request.
    pub disk_cached_tokens: usize,
    /// Of `cached_tokens`, those read from the shared tier for this request.
    pub tier_cached_tokens: usize,
    /// Tokens generated (an end-of-turn token is not counted).
    pub generated_tokens: usize,
    /// Why it ended.
    pub finish: FinishReason,
    /// From submission to the first admission (waiting for a batch slot, memory or a disk
    /// load).
    pub queue: Duration,
    /// From submission to the first sampled token.
    pub ttft: Duration,
    /// From submission to the end.
    pub total: Duration,
    /// Times the request was preempted (its KV dropped and recomputed) for lack of memory.
    pub preemptions: u32,
    /// Seconds spent computing the output constraint's masks (0 without one).
    pub constraint_seconds: f64,
}

/// Counters for one tenant.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TenantStats {
    /// Open sessions.
    pub sessions: usize,
    /// Requests running now.
    pub running: usize,
    /// Requests waiting.
    pub waiting: usize,
    /// Prompt tokens computed.
    pub prefill_tokens: u64,
    /// Prompt tokens served from the cache.
    pub cached_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
}

/// A snapshot of the scheduler.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SchedStats {
    /// Pages in the KV pool.
    pub pool_pages: usize,
    /// Pages free now.
    pub free_pages: usize,
    /// The most pages in use at once so far.
    pub peak_pages: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Bytes per page (all layers, keys and values).
    pub page_bytes: usize,
    /// Nodes, tokens and pages in the radix tree.
    #[serde(skip)]
    pub tree: TreeStats,
    /// Tokens cached in the tree.
    pub tree_tokens: usize,
    /// Engine steps run.
    pub steps: u64,
    /// Prompt tokens computed.
    pub prefill_tokens: u64,
    /// Prompt tokens served from the cache.
    pub cached_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Sequences preempted for lack of memory.
    pub preemptions: u64,
    /// Pages freed by evicting cached prefixes.
    pub evicted_pages: u64,
    /// Pages running sequences let go of because every layer's sliding window had left them
    /// behind.
    pub window_released_pages: u64,
    /// Speculative decoding: draft tokens verified.
    pub spec_drafted: u64,
    /// Draft tokens accepted.
    pub spec_accepted: u64,
    /// Of `spec_drafted`, the tokens the draft model proposed ([`crate::draft_model`]).
    pub spec_model_drafted: u64,
    /// Of `spec_accepted`, the draft model's.
    pub spec_model_accepted: u64,
    /// Draft tokens verified at each position of a draft (0 = its first token).
    pub spec_drafted_at: Vec<u64>,
    /// Draft tokens accepted at each position of a draft.
    pub spec_accepted_at: Vec<u64>,
    /// Per tenant.
    pub tenants: BTreeMap<TenantId, TenantStats>,
    /// Prompt tokens whose KV was read back from disk.
    pub disk_loaded_tokens: u64,
    /// The disk tier's counters, when there is one.
    pub disk: Option<agentd_store::StoreStats>,
    /// The shared tier's counters, when there is one.
    pub shared_tier: Option<SharedTierStats>,
}

/// The shared tier's counters since the scheduler started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SharedTierStats {
    /// Pages stored in the tier.
    pub exported_pages: u64,
    /// Pages not exported because the export queue was full.
    pub export_dropped_pages: u64,
    /// Pages whose export failed (the tier unavailable or too slow).
    pub export_failed_pages: u64,
    /// Lookups the tier answered.
    pub lookups: u64,
    /// Pages those lookups found.
    pub lookup_pages: u64,
    /// Pages read from the tier, checked.
    pub hit_pages: u64,
    /// Pages the tier held but that failed a check (deleted there, computed here).
    pub damaged_pages: u64,
    /// Calls that failed (unavailable, timed out): each was a miss.
    pub failures: u64,
    /// Prompt tokens whose KV was loaded from the tier into the pool.
    pub loaded_tokens: u64,
}

impl SchedStats {
    /// Cached prompt tokens over all prompt tokens (0 when none).
    pub fn hit_rate(&self) -> f64 {
        hit_rate(self.cached_tokens, self.prefill_tokens)
    }
}

impl TenantStats {
    /// This tenant's cached prompt tokens over all its prompt tokens (0 when none).
    pub fn hit_rate(&self) -> f64 {
        hit_rate(self.cached_tokens, self.prefill_tokens)
    }
}

fn hit_rate(cached: u64, computed: u64) -> f64 {
    let all = cached + computed;
    if all == 0 {
        0.0
    } else {
        cached as f64 / all as f64
    }
}

/// Why a scheduler operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    /// No such session for this tenant (never existed, closed, or another tenant's).
    #[error("session {0} not found")]
    UnknownSession(u64),
    /// No such prefix visible to this tenant.
    #[error("prefix {0} not found")]
    UnknownPrefix(u64),
    /// The session has a generation in flight.
    #[error("session {0} is busy with a generation; wait for it to finish or cancel it")]
    SessionBusy(u64),
    /// The request is malformed (the message says how).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The sequence would not fit the model's context.
    #[error("context overflow: {needed} tokens needed, the model's context is {limit}")]
    ContextOverflow {
        /// Tokens the request needs.
        needed: usize,
        /// The model's context length.
        limit: usize,
    },
    /// The request cannot fit the KV pool even with everything else evicted.
    #[error("the request needs {needed} KV pages but the pool can give it at most {available} (of {capacity}); raise --kv-memory")]
    PoolTooSmall {
        /// Pages needed.
        needed: usize,
        /// Pages it could get (capacity minus pinned prefixes).
        available: usize,
        /// Pages in the pool.
        capacity: usize,
    },
    /// A per-tenant limit would be exceeded.
    #[error("tenant limit reached: {what} is limited to {limit} (this request needs {wanted})")]
    LimitExceeded {
        /// Which limit.
        what: &'static str,
        /// Its value.
        limit: usize,
        /// What the request would take.
        wanted: usize,
    },
    /// The executor failed a step or a page operation (a bug or bad weights).
    #[error("the executor failed: {0}")]
    Executor(Cause<ExecError>),
    /// A generation's output failed (its constraint or its detokenisation).
    #[error("the generation failed: {0}")]
    Generation(Cause<EngineError>),
    /// The model's digests could not be computed.
    #[error(transparent)]
    Engine(Cause<EngineError>),
    /// The disk tier failed to open.
    #[error("the disk cache: {0}")]
    DiskTier(Cause<StoreError>),
    /// The radix tree refused an operation (a bug: its invariants say why).
    #[error("the prefix cache: {0}")]
    Cache(#[from] RadixError),
    /// The scheduler thread could not be started.
    #[error("cannot start the scheduler thread: {0}")]
    Spawn(Cause<std::io::Error>),
    /// The scheduler has shut down.
    #[error("the scheduler has shut down")]
    Shutdown,
}

/// A typed cause shared by every waiter it is reported to (errors travel to many streams, so
/// they must be cloneable; equal when they print the same).
#[derive(Debug)]
pub struct Cause<E>(pub Arc<E>);

impl<E> Cause<E> {
    /// Wraps `e`.
    pub fn new(e: E) -> Self {
        Self(Arc::new(e))
    }
}

impl<E> Clone for Cause<E> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<E: std::fmt::Display> PartialEq for Cause<E> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl<E: std::fmt::Display> Eq for Cause<E> {}

impl<E: std::fmt::Display> std::fmt::Display for Cause<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Cause<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Result alias for scheduler operations.
pub type Result<T> = std::result::Result<T, SchedError>;
