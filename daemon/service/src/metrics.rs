//! The daemon's Prometheus metrics, named after vLLM's (`vllm:` → `agentd:`), so dashboards
//! built for vLLM work with a prefix change.
//!
//! Per-request figures (token counters, prefix-cache queries and hits, latency histograms) are
//! recorded when a generation ends, by whichever front end ran it (gRPC or HTTP), so both count.
//! Gauges (running and waiting requests, KV pool use, the disk tier) and the preemption counter
//! are read from the scheduler's statistics at each scrape. Labels: `model_name` on every
//! metric; `tenant` on the token counters and request gauges, whose values are the tenant names
//! the configuration gives (`default` for a single-tenant daemon, `other` for tenants it does
//! not name), so the number of series is bounded by the configuration.

use agentd_engine::FinishReason;
use agentd_scheduler::{SchedStats, TenantId, Usage};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::Mutex;

/// Every metric the daemon exports, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    tenant_names: HashMap<TenantId, String>,
    single_tenant: bool,
    /// Whether a disk tier exists (the external-cache counters count only then).
    disk_tier: bool,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    prefix_cache_queries: IntCounterVec,
    prefix_cache_hits: IntCounterVec,
    external_prefix_cache_queries: IntCounter,
    external_prefix_cache_hits: IntCounter,
    request_success: IntCounterVec,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    e2e_request_latency: Histogram,
    request_queue_time: Histogram,
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
    constraint_time: Histogram,
    num_requests_running: IntGaugeVec,
    num_requests_waiting: IntGaugeVec,
    num_sessions: IntGaugeVec,
    kv_cache_usage: Gauge,
    kv_cache_pages: IntGauge,
    disk_cache_bytes: IntGauge,
    disk_cache_records: IntGauge,
    num_preemptions: IntCounter,
    spec_draft_tokens: IntCounter,
    spec_accepted_tokens: IntCounter,
    spec_accepted_per_pos: IntCounterVec,
    spec_model_draft_tokens: IntCounter,
    spec_model_accepted_tokens: IntCounter,
    shared_tier_pages: IntCounterVec,
    shared_tier_lookups: IntCounter,
    shared_tier_failures: IntCounter,
    /// Serialises scrapes: the preemption counter follows the scheduler's total by deltas.
    scrape: Mutex<()>,
}

/// Latency buckets in seconds (vLLM's time-to-first-token buckets).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Inter-token latency buckets in seconds (vLLM's).
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Token-count buckets (1, 2, 5 per decade, as vLLM's).
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0, 100000.0,
];

impl Metrics {
    /// The metrics of a daemon serving `model_name`; `tenant_names` labels the tenants the
    /// configuration names; `single_tenant` says every caller is tenant 0 (`default`);
    /// `disk_tier` says prefixes are also looked up on disk.
    pub fn new(
        model_name: &str,
        tenant_names: HashMap<TenantId, String>,
        single_tenant: bool,
        disk_tier: bool,
    ) -> Self {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| {
            Opts::new(format!("agentd:{name}"), help).const_label("model_name", model_name)
        };
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(
                HistogramOpts::new(format!("agentd:{name}"), help)
                    .const_label("model_name", model_name)
                    .buckets(buckets.to_vec()),
            )
            .expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique");
            h
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(opts(name, help), &[label]).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(opts(name, help)).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let gauge_vec = |name: &str, help: &str| {
            let g = IntGaugeVec::new(opts(name, help), &["tenant"]).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(opts(name, help)).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let kv_cache_usage = Gauge::with_opts(opts(
            "kv_cache_usage_perc",
            "KV pool use: 1 means every page is in use (cached or running).",
        ))
        .expect("valid gauge");
        registry
            .register(Box::new(kv_cache_usage.clone()))
            .expect("unique");
        Self {
            tenant_names,
            single_tenant,
            disk_tier,
            prompt_tokens: counter_vec(
                "prompt_tokens_total",
                "Prompt tokens of finished requests.",
                "tenant",
            ),
            generation_tokens: counter_vec(
                "generation_tokens_total",
                "Generated tokens of finished requests.",
                "tenant",
            ),
            prefix_cache_queries: counter_vec(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
                "tenant",
            ),
            prefix_cache_hits: counter_vec(
                "prefix_cache_hits_total",
                "Prompt tokens served from the prefix cache (memory and disk).",
                "tenant",
            ),
            external_prefix_cache_queries: counter(
                "external_prefix_cache_queries_total",
                "Prompt tokens looked up below memory (the disk tier): those memory did not hold.",
            ),
            external_prefix_cache_hits: counter(
                "external_prefix_cache_hits_total",
                "Prompt tokens read back from the disk tier.",
            ),
            request_success: counter_vec(
                "request_success_total",
                "Finished requests by finish reason.",
                "finished_reason",
            ),
            time_to_first_token: hist(
                "time_to_first_token_seconds",
                "From a request's arrival to its first token.",
                LATENCY_BUCKETS,
            ),
            inter_token_latency: hist(
                "inter_token_latency_seconds",
                "Between consecutive tokens of a stream.",
                ITL_BUCKETS,
            ),
            e2e_request_latency: hist(
                "e2e_request_latency_seconds",
                "From a request's arrival to its end.",
                LATENCY_BUCKETS,
            ),
            request_queue_time: hist(
                "request_queue_time_seconds",
                "From a request's arrival to its admission into the batch.",
                LATENCY_BUCKETS,
            ),
            request_prompt_tokens: hist(
                "request_prompt_tokens",
                "Prompt tokens per request.",
                TOKEN_BUCKETS,
            ),
            request_generation_tokens: hist(
                "request_generation_tokens",
                "Generated tokens per request.",
                TOKEN_BUCKETS,
            ),
            constraint_time: hist(
                "constraint_time_seconds",
                "Time a request spent on its output constraint's masks.",
                LATENCY_BUCKETS,
            ),
            num_requests_running: gauge_vec("num_requests_running", "Requests in the batch."),
            num_requests_waiting: gauge_vec(
                "num_requests_waiting",
                "Requests waiting for admission.",
            ),
            num_sessions: gauge_vec("num_sessions", "Open sessions."),
            kv_cache_usage,
            kv_cache_pages: int_gauge("kv_cache_pages", "Pages in the KV pool."),
            disk_cache_bytes: int_gauge("disk_cache_bytes", "Bytes in the disk tier."),
            disk_cache_records: int_gauge("disk_cache_records", "Records in the disk tier."),
            num_preemptions: counter(
                "num_preemptions_total",
                "Requests preempted (KV dropped, recomputed later) for lack of memory.",
            ),
            spec_draft_tokens: counter(
                "spec_decode_num_draft_tokens_total",
                "Speculative draft tokens verified.",
            ),
            spec_accepted_tokens: counter(
                "spec_decode_num_accepted_tokens_total",
                "Speculative draft tokens accepted.",
            ),
            spec_accepted_per_pos: counter_vec(
                "spec_decode_num_accepted_tokens_per_pos_total",
                "Speculative draft tokens accepted, by position in the draft.",
                "position",
            ),
            spec_model_draft_tokens: counter(
                "spec_decode_draft_model_num_draft_tokens_total",
                "Of the draft tokens verified, those the draft model (--draft-model) proposed.",
            ),
            spec_model_accepted_tokens: counter(
                "spec_decode_draft_model_num_accepted_tokens_total",
                "Of the draft tokens accepted, those the draft model (--draft-model) proposed.",
            ),
            shared_tier_pages: counter_vec(
                "kv_tier_pages_total",
                "Pages through the shared KV tier, by event: exported, export_dropped (queue \
                 full), export_failed, hit (loaded, checked), damaged (failed a check).",
                "event",
            ),
            shared_tier_lookups: counter(
                "kv_tier_lookups_total",
                "Lookups the shared KV tier answered.",
            ),
            shared_tier_failures: counter(
                "kv_tier_failures_total",
                "Calls to the shared KV tier that failed or timed out (each a miss).",
            ),
            registry,
            scrape: Mutex::new(()),
        }
    }

    /// The label value for `tenant`.
    pub fn tenant_label(&self, tenant: TenantId) -> &str {
        match self.tenant_names.get(&tenant) {
            Some(name) => name,
            None if self.single_tenant => "default",
            None => "other",
        }
    }

    /// Records a finished generation of `tenant`.
    pub fn observe_done(&self, tenant: TenantId, u: &Usage) {
        let t = self.tenant_label(tenant);
        self.prompt_tokens
            .with_label_values(&[t])
            .inc_by(u.prompt_tokens as u64);
        self.generation_tokens
            .with_label_values(&[t])
            .inc_by(u.generated_tokens as u64);
        self.prefix_cache_queries
            .with_label_values(&[t])
            .inc_by(u.prompt_tokens as u64);
        self.prefix_cache_hits
            .with_label_values(&[t])
            .inc_by(u.cached_tokens as u64);
        if self.disk_tier {
            // The tiers below memory: the disk and the shared (Redis) tier.
            let external = (u.disk_cached_tokens + u.tier_cached_tokens).min(u.cached_tokens);
            let memory = u.cached_tokens - external;
            self.external_prefix_cache_queries
                .inc_by(u.prompt_tokens.saturating_sub(memory) as u64);
            self.external_prefix_cache_hits.inc_by(external as u64);
        }
        // vLLM's finish reasons.
        let reason = match u.finish {
            FinishReason::Eos | FinishReason::Stop(_) => "stop",
            FinishReason::MaxTokens | FinishReason::ContextFull => "length",
            FinishReason::Cancelled => "abort",
        };
        self.request_success.with_label_values(&[reason]).inc();
        self.time_to_first_token.observe(u.ttft.as_secs_f64());
        self.e2e_request_latency.observe(u.total.as_secs_f64());
        self.request_queue_time.observe(u.queue.as_secs_f64());
        self.request_prompt_tokens.observe(u.prompt_tokens as f64);
        self.request_generation_tokens
            .observe(u.generated_tokens as f64);
        if u.constraint_seconds > 0.0 {
            self.constraint_time.observe(u.constraint_seconds);
        }
    }

    /// Records the time between two consecutive tokens of one stream.
    pub fn observe_inter_token(&self, gap: std::time::Duration) {
        self.inter_token_latency.observe(gap.as_secs_f64());
    }

    /// The exposition text (Prometheus' text format 0.0.4), gauges set from `stats`.
    pub fn render(&self, stats: &SchedStats) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for g in [
            &self.num_requests_running,
            &self.num_requests_waiting,
            &self.num_sessions,
        ] {
            g.reset();
        }
        for (&tenant, c) in &stats.tenants {
            let t = self.tenant_label(tenant);
            self.num_requests_running
                .with_label_values(&[t])
                .add(c.running as i64);
            self.num_requests_waiting
                .with_label_values(&[t])
                .add(c.waiting as i64);
            self.num_sessions
                .with_label_values(&[t])
                .add(c.sessions as i64);
        }
        let used = stats.pool_pages.saturating_sub(stats.free_pages);
        self.kv_cache_usage.set(if stats.pool_pages == 0 {
            0.0
        } else {
            used as f64 / stats.pool_pages as f64
        });
        self.kv_cache_pages.set(stats.pool_pages as i64);
        if let Some(d) = &stats.disk {
            self.disk_cache_bytes.set(d.bytes as i64);
            self.disk_cache_records.set(d.records as i64);
        }
        follow(&self.num_preemptions, stats.preemptions);
        if let Some(t) = &stats.shared_tier {
            for (event, n) in [
                ("exported", t.exported_pages),
                ("export_dropped", t.export_dropped_pages),
                ("export_failed", t.export_failed_pages),
                ("hit", t.hit_pages),
                ("damaged", t.damaged_pages),
            ] {
                follow(&self.shared_tier_pages.with_label_values(&[event]), n);
            }
            follow(&self.shared_tier_lookups, t.lookups);
            follow(&self.shared_tier_failures, t.failures);
        }
        follow(&self.spec_draft_tokens, stats.spec_drafted);
        follow(&self.spec_accepted_tokens, stats.spec_accepted);
        follow(&self.spec_model_draft_tokens, stats.spec_model_drafted);
        follow(&self.spec_model_accepted_tokens, stats.spec_model_accepted);
        for (pos, &n) in stats.spec_accepted_at.iter().enumerate() {
            follow(
                &self
                    .spec_accepted_per_pos
                    .with_label_values(&[&pos.to_string()]),
                n,
            );
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for metrics the registry accepted.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Moves `counter` up to `total`, a count the scheduler keeps.
fn follow(counter: &IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn usage(prompt: usize, cached: usize, disk: usize) -> Usage {
        Usage {
            prompt_tokens: prompt,
            cached_tokens: cached,
            disk_cached_tokens: disk,
            tier_cached_tokens: 0,
            generated_tokens: 3,
            finish: FinishReason::Eos,
            queue: Duration::from_millis(2),
            ttft: Duration::from_millis(20),
            total: Duration::from_millis(50),
            preemptions: 0,
            constraint_seconds: 0.0,
        }
    }

    #[test]
    fn counters_histograms_and_gauges_are_exposed_under_agentd_names() {
        let names = HashMap::from([(7, "alice".to_owned())]);
        let m = Metrics::new("smollm2", names, false, true);
        m.observe_done(7, &usage(100, 60, 20));
        m.observe_done(9, &usage(10, 0, 0));
        // 16 of 30 cached tokens came from the shared tier, 4 from disk, 10 from memory.
        m.observe_done(
            9,
            &Usage {
                tier_cached_tokens: 16,
                ..usage(40, 30, 4)
            },
        );
        m.observe_inter_token(Duration::from_millis(30));
        let mut stats = SchedStats {
            pool_pages: 10,
            free_pages: 4,
            preemptions: 2,
            spec_drafted: 12,
            spec_accepted: 9,
            spec_model_drafted: 5,
            spec_model_accepted: 3,
            ..Default::default()
        };
        stats.tenants.insert(7, Default::default());
        stats.tenants.get_mut(&7).unwrap().running = 2;
        let text = m.render(&stats);
        for line in [
            "agentd:prompt_tokens_total{model_name=\"smollm2\",tenant=\"alice\"} 100",
            "agentd:prompt_tokens_total{model_name=\"smollm2\",tenant=\"other\"} 50",
            "agentd:prefix_cache_hits_total{model_name=\"smollm2\",tenant=\"alice\"} 60",
            // Memory held 40 of the first prompt's 100 tokens, 0 of the second's 10 and 10 of
            // the third's 40; the tiers below were asked for the rest, and gave 20 + 0 + 20.
            "agentd:external_prefix_cache_queries_total{model_name=\"smollm2\"} 100",
            "agentd:external_prefix_cache_hits_total{model_name=\"smollm2\"} 40",
            "agentd:request_success_total{finished_reason=\"stop\",model_name=\"smollm2\"} 3",
            "agentd:spec_decode_num_draft_tokens_total{model_name=\"smollm2\"} 12",
            "agentd:spec_decode_draft_model_num_draft_tokens_total{model_name=\"smollm2\"} 5",
            "agentd:spec_decode_draft_model_num_accepted_tokens_total{model_name=\"smollm2\"} 3",
            "agentd:time_to_first_token_seconds_count{model_name=\"smollm2\"} 3",
            "agentd:inter_token_latency_seconds_count{model_name=\"smollm2\"} 1",
            "agentd:num_requests_running{model_name=\"smollm2\",tenant=\"alice\"} 2",
            "agentd:kv_cache_usage_perc{model_name=\"smollm2\"} 0.6",
            "agentd:num_preemptions_total{model_name=\"smollm2\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // The preemption counter follows the scheduler's total without double counting.
        assert!(m
            .render(&stats)
            .contains("agentd:num_preemptions_total{model_name=\"smollm2\"} 2"));
    }
}
