//! The SDK's own types for what the daemon reports: a generation's [`Usage`] and
//! [`FinishReason`], the daemon's [`Stats`] (with per-tenant [`TenantStats`]), registered
//! prefixes ([`PrefixEntry`]), the loaded model ([`ModelInfo`]) and liveness ([`Health`]).
//!
//! They are converted from the wire messages of [`crate::proto`] inside the SDK, so callers
//! never depend on the generated code: times are [`Duration`]s, the finish reason is an enum,
//! and a value this SDK version does not know (a new finish reason, a negative or non-finite
//! time) is carried or clamped, never a panic.

use crate::proto;
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// A time the daemon reports in seconds, as a [`Duration`]: a negative or NaN value (which a
/// well-behaved daemon never sends) is zero, one too large for a `Duration` is [`Duration::MAX`].
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(if s > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced its end-of-sequence (end-of-turn) token.
    Eos,
    /// One of the request's stop strings appeared; this is the one.
    Stop(String),
    /// The request's `max_tokens` were generated.
    MaxTokens,
    /// The session's log reached the model's context length.
    ContextFull,
    /// The generation was cancelled (its stream dropped, its session closed).
    Cancelled,
    /// A reason this SDK version does not know, as the daemon named it.
    Other(String),
}

impl FinishReason {
    /// From the wire's `finish_reason` and `stop` fields (`stop` is used only with `"stop"`).
    pub(crate) fn from_wire(reason: String, stop: String) -> Self {
        match reason.as_str() {
            "eos" => Self::Eos,
            "stop" => Self::Stop(stop),
            "max_tokens" => Self::MaxTokens,
            "context_full" => Self::ContextFull,
            "cancelled" => Self::Cancelled,
            _ => Self::Other(reason),
        }
    }

    /// The reason's name on the wire: `eos`, `stop`, `max_tokens`, `context_full`,
    /// `cancelled`, or for [`FinishReason::Other`] the name the daemon gave.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Eos => "eos",
            Self::Stop(_) => "stop",
            Self::MaxTokens => "max_tokens",
            Self::ContextFull => "context_full",
            Self::Cancelled => "cancelled",
            Self::Other(name) => name,
        }
    }
}

/// Writes [`FinishReason::as_str`] (the stop string is not shown).
impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one generation took and how it ended (the last event of its stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens in the session's log when the generation started (its prompt).
    pub prompt_tokens: u32,
    /// Of `prompt_tokens`, those whose KV came from the cache instead of being computed.
    pub cached_tokens: u32,
    /// Tokens generated (an end-of-sequence token that ended it is not counted).
    pub generated_tokens: u32,
    /// Why it ended.
    pub finish: FinishReason,
    /// From the request's submission to the first sampled token.
    pub ttft: Duration,
    /// From the request's submission to the generation's end.
    pub total: Duration,
    /// Times it was preempted (its KV dropped and recomputed) for lack of memory.
    pub preemptions: u32,
    /// Time the daemon spent computing the output constraint's token masks (zero without
    /// one): the wire's `constraint_seconds`, as a `Duration` like the other times.
    pub constraint: Duration,
    /// Of `cached_tokens`, those read from the daemon's shared KV tier (computed by another
    /// daemon); 0 without one.
    pub tier_cached_tokens: u32,
}

impl Usage {
    /// From the wire's `Usage`.
    pub(crate) fn from_wire(u: proto::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            cached_tokens: u.cached_tokens,
            generated_tokens: u.generated_tokens,
            finish: FinishReason::from_wire(u.finish_reason, u.stop),
            ttft: seconds(u.ttft_seconds),
            total: seconds(u.total_seconds),
            preemptions: u.preemptions,
            constraint: seconds(u.constraint_seconds),
            tier_cached_tokens: u.tier_cached_tokens,
        }
    }
}

/// One tenant's counters, in [`Stats::tenants`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantStats {
    /// The tenant's number.
    pub tenant: u64,
    /// Its open sessions.
    pub sessions: u32,
    /// Its generations running now.
    pub running: u32,
    /// Its generations waiting to run.
    pub waiting: u32,
    /// Prompt tokens computed for it.
    pub prefill_tokens: u64,
    /// Prompt tokens of its reused from the cache.
    pub cached_tokens: u64,
    /// Tokens generated for it.
    pub generated_tokens: u64,
}

impl TenantStats {
    /// From the wire's `TenantStats`.
    pub(crate) fn from_wire(t: proto::TenantStats) -> Self {
        Self {
            tenant: t.tenant,
            sessions: t.sessions,
            running: t.running,
            waiting: t.waiting,
            prefill_tokens: t.prefill_tokens,
            cached_tokens: t.cached_tokens,
            generated_tokens: t.generated_tokens,
        }
    }
}

/// The daemon's pool, cache and disk tier, and the caller's own counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// KV pages in the pool.
    pub pool_pages: u32,
    /// Pages free now.
    pub free_pages: u32,
    /// The most pages in use at once so far.
    pub peak_pages: u32,
    /// Tokens per page.
    pub page_size: u32,
    /// Bytes per page (all layers, keys and values).
    pub page_bytes: u64,
    /// Tokens cached in the radix tree.
    pub tree_tokens: u64,
    /// Engine steps run.
    pub steps: u64,
    /// Cached prompt tokens over all prompt tokens, every tenant's (0 to 1; 0 when none).
    pub hit_rate: f64,
    /// Sequences preempted for lack of memory so far (every tenant's).
    pub preemptions: u64,
    /// The caller's open sessions.
    pub sessions: u32,
    /// The caller's generations running now.
    pub running: u32,
    /// The caller's generations waiting to run.
    pub waiting: u32,
    /// Prompt tokens computed for the caller.
    pub prefill_tokens: u64,
    /// The caller's prompt tokens reused from the cache.
    pub cached_tokens: u64,
    /// Tokens generated for the caller.
    pub generated_tokens: u64,
    /// Every tenant's counters, from [`crate::Client::stats_all_tenants`] (operators);
    /// empty from [`crate::Client::stats`].
    pub tenants: Vec<TenantStats>,
    /// Records in the disk tier.
    pub disk_records: u32,
    /// Bytes the disk tier takes.
    pub disk_bytes: u64,
    /// The disk tier's budget in bytes.
    pub disk_budget: u64,
    /// Prompt tokens whose KV was read back from the disk tier.
    pub disk_loaded_tokens: u64,
    /// Mixture-of-experts models: rows routed to each expert, summed over the layers, in the
    /// engine's last step (operators only; empty for a dense model).
    pub expert_load_last_step: Vec<u64>,
    /// The same since the model was loaded.
    pub expert_load_total: Vec<u64>,
    /// Speculative decoding (operators only): draft tokens verified.
    pub spec_drafted: u64,
    /// Draft tokens accepted.
    pub spec_accepted: u64,
    /// Draft tokens verified at each position of a draft (0 = its first token).
    pub spec_drafted_at: Vec<u64>,
    /// Draft tokens accepted at each position of a draft.
    pub spec_accepted_at: Vec<u64>,
    /// Of `spec_drafted`, the draft model's tokens (`agentd serve --draft-model`).
    pub spec_model_drafted: u64,
    /// Of `spec_accepted`, the draft model's.
    pub spec_model_accepted: u64,
    /// The shared KV tier's counters (operators only; `None` when the daemon has none).
    pub shared_tier: Option<SharedTierStats>,
}

/// The shared KV tier's counters since the daemon started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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
    /// Pages read from the tier and checked.
    pub hit_pages: u64,
    /// Pages that failed a check (deleted from the tier, computed here).
    pub damaged_pages: u64,
    /// Calls that failed (each a miss).
    pub failures: u64,
    /// Prompt tokens whose KV was loaded from the tier.
    pub loaded_tokens: u64,
}

impl Stats {
    /// From the wire's `StatsReply`.
    pub(crate) fn from_wire(s: proto::StatsReply) -> Self {
        Self {
            pool_pages: s.pool_pages,
            free_pages: s.free_pages,
            peak_pages: s.peak_pages,
            page_size: s.page_size,
            page_bytes: s.page_bytes,
            tree_tokens: s.tree_tokens,
            steps: s.steps,
            hit_rate: s.hit_rate,
            preemptions: s.preemptions,
            sessions: s.sessions,
            running: s.running,
            waiting: s.waiting,
            prefill_tokens: s.prefill_tokens,
            cached_tokens: s.cached_tokens,
            generated_tokens: s.generated_tokens,
            tenants: s.tenants.into_iter().map(TenantStats::from_wire).collect(),
            disk_records: s.disk_records,
            disk_bytes: s.disk_bytes,
            disk_budget: s.disk_budget,
            disk_loaded_tokens: s.disk_loaded_tokens,
            expert_load_last_step: s.expert_load_last_step,
            expert_load_total: s.expert_load_total,
            spec_drafted: s.spec_drafted,
            spec_accepted: s.spec_accepted,
            spec_drafted_at: s.spec_drafted_at,
            spec_accepted_at: s.spec_accepted_at,
            spec_model_drafted: s.spec_model_drafted,
            spec_model_accepted: s.spec_model_accepted,
            shared_tier: s.shared_tier.map(|t| SharedTierStats {
                exported_pages: t.exported_pages,
                export_dropped_pages: t.export_dropped_pages,
                export_failed_pages: t.export_failed_pages,
                lookups: t.lookups,
                lookup_pages: t.lookup_pages,
                hit_pages: t.hit_pages,
                damaged_pages: t.damaged_pages,
                failures: t.failures,
                loaded_tokens: t.loaded_tokens,
            }),
        }
    }
}

/// A registered prefix, from [`crate::Client::list_prefixes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrefixEntry {
    /// Its id (what [`crate::Client::create_session`] and the prefix calls take).
    pub id: u64,
    /// Its length in tokens.
    pub tokens: u32,
    /// Whether its KV is pinned (never evicted).
    pub pinned: bool,
    /// Whether every tenant may start sessions from it.
    pub published: bool,
    /// Of its tokens, those whose KV is in the pool now.
    pub resident_tokens: u32,
    /// Whether the caller registered it.
    pub own: bool,
    /// The owning tenant's number, when an operator lists every tenant's prefixes; 0 otherwise.
    pub tenant: u64,
}

impl PrefixEntry {
    /// From the wire's `PrefixEntry`.
    pub(crate) fn from_wire(p: proto::PrefixEntry) -> Self {
        Self {
            id: p.prefix_id,
            tokens: p.tokens,
            pinned: p.pinned,
            published: p.published,
            resident_tokens: p.resident_tokens,
            own: p.own,
            tenant: p.tenant,
        }
    }
}

/// The loaded model's hyperparameters and the KV pool's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// The model file's name (without its directory: the daemon does not disclose paths).
    pub name: String,
    /// The model file's SHA-256, in lowercase hex.
    pub sha256: String,
    /// The context length in tokens (the longest a session's log may be).
    pub context_length: u32,
    /// Tokens in the vocabulary.
    pub vocab_size: u32,
    /// Transformer layers.
    pub layers: u32,
    /// Attention (query) heads.
    pub heads: u32,
    /// Key/value heads.
    pub kv_heads: u32,
    /// The size of one head.
    pub head_dim: u32,
    /// Tokens per KV page.
    pub page_size: u32,
    /// KV pages in the pool.
    pub pool_pages: u32,
}

impl ModelInfo {
    /// From the wire's `ModelInfoReply`.
    pub(crate) fn from_wire(m: proto::ModelInfoReply) -> Self {
        Self {
            name: m.name,
            sha256: m.sha256,
            context_length: m.context_length,
            vocab_size: m.vocab_size,
            layers: m.layers,
            heads: m.heads,
            kv_heads: m.kv_heads,
            head_dim: m.head_dim,
            page_size: m.page_size,
            pool_pages: m.pool_pages,
        }
    }
}

/// The daemon's answer to a health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// The daemon's version.
    pub version: String,
    /// Whether it is ready to serve.
    pub ready: bool,
    /// The daemon's node number (`agentd serve --node`), if it has one; `agentd route` has none.
    pub node: Option<u8>,
    /// Random, chosen when the daemon started: a new value means it restarted.
    pub epoch: u64,
}

impl Health {
    /// From the wire's `HealthReply`.
    pub(crate) fn from_wire(h: proto::HealthReply) -> Self {
        Self {
            version: h.version,
            ready: h.ready,
            node: h.has_node.then(|| u8::try_from(h.node).unwrap_or(u8::MAX)),
            epoch: h.epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(reason: &str, stop: &str) -> proto::Usage {
        proto::Usage {
            prompt_tokens: 10,
            cached_tokens: 4,
            generated_tokens: 3,
            finish_reason: reason.into(),
            stop: stop.into(),
            ttft_seconds: 0.25,
            total_seconds: 1.5,
            preemptions: 1,
            constraint_seconds: 0.0,
            tier_cached_tokens: 2,
        }
    }

    #[test]
    fn finish_reasons_round_trip_their_names() {
        for (name, want) in [
            ("eos", FinishReason::Eos),
            ("stop", FinishReason::Stop("\n\n".into())),
            ("max_tokens", FinishReason::MaxTokens),
            ("context_full", FinishReason::ContextFull),
            ("cancelled", FinishReason::Cancelled),
            ("timed_out", FinishReason::Other("timed_out".into())),
            ("", FinishReason::Other(String::new())),
        ] {
            let u = Usage::from_wire(usage(name, "\n\n"));
            assert_eq!(u.finish, want);
            assert_eq!(u.finish.as_str(), name);
            assert_eq!(u.finish.to_string(), name);
        }
    }

    #[test]
    fn usage_converts_every_field() {
        let u = Usage::from_wire(usage("eos", ""));
        assert_eq!(
            u,
            Usage {
                prompt_tokens: 10,
                cached_tokens: 4,
                generated_tokens: 3,
                finish: FinishReason::Eos,
                ttft: Duration::from_millis(250),
                total: Duration::from_millis(1500),
                preemptions: 1,
                constraint: Duration::ZERO,
                tier_cached_tokens: 2,
            }
        );
    }

    #[test]
    fn odd_times_never_panic() {
        assert_eq!(seconds(-1.0), Duration::ZERO);
        assert_eq!(seconds(f64::NAN), Duration::ZERO);
        assert_eq!(seconds(f64::NEG_INFINITY), Duration::ZERO);
        assert_eq!(seconds(f64::INFINITY), Duration::MAX);
        assert_eq!(seconds(1e300), Duration::MAX);
    }

    #[test]
    fn stats_keep_every_tenant() {
        let s = Stats::from_wire(proto::StatsReply {
            sessions: 2,
            hit_rate: 0.5,
            tenants: vec![proto::TenantStats {
                tenant: 1000,
                sessions: 2,
                ..Default::default()
            }],
            disk_loaded_tokens: 7,
            ..Default::default()
        });
        assert_eq!(s.sessions, 2);
        assert_eq!(s.hit_rate, 0.5);
        assert_eq!(s.disk_loaded_tokens, 7);
        assert_eq!(s.tenants.len(), 1);
        assert_eq!(s.tenants[0].tenant, 1000);
        assert_eq!(s.tenants[0].sessions, 2);
    }

    #[test]
    fn finish_reason_serializes_by_its_wire_name() {
        let json = |r: FinishReason| serde_json::to_value(r).unwrap();
        assert_eq!(
            json(FinishReason::MaxTokens),
            serde_json::json!("max_tokens")
        );
        assert_eq!(
            json(FinishReason::Stop("x".into())),
            serde_json::json!({ "stop": "x" })
        );
    }
}
