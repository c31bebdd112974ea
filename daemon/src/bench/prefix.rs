//! `agentd bench prefix`: many agent sessions sharing one long system prompt, run with the
//! prefix cache off and on, in one namespace and in several, and one at a time; printed as JSON.
//!
//! Each session's prompt is the chat template's rendering of a shared system prompt (a tool
//! list, ≈ `system_tokens` tokens) plus its own short question; it then generates exactly
//! `gen_tokens` tokens (greedy, end-of-sequence ignored so every run does the same work). All
//! sessions of a run are submitted at once; TTFT is measured by the client from submission to
//! its first token.

use agentd_engine::sampling::SamplingParams;
use agentd_engine::{Executor, GenerateOptions, LoadedModel};
use agentd_scheduler::{Event, SchedulerConfig, SchedulerHandle, TenantId};
use agentd_wire::Message;
use anyhow::Result;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct PrefixBenchConfig {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Approximate length of the shared system prompt, in tokens.
    pub system_tokens: usize,
    /// Tokens generated per session.
    pub gen_tokens: usize,
    /// Tenant counts to run with the cache on (sessions are spread over the tenants).
    pub tenants: Vec<usize>,
    /// Also run with the cache off (slow: every session computes the whole prompt).
    pub cache_off: bool,
    /// The scheduler's settings (its `cache` flag is set per run).
    pub scheduler: SchedulerConfig,
}

impl Default for PrefixBenchConfig {
    fn default() -> Self {
        Self {
            sessions: 32,
            system_tokens: 1500,
            gen_tokens: 32,
            tenants: vec![1, 4],
            cache_off: true,
            scheduler: SchedulerConfig::default(),
        }
    }
}

/// One run's numbers.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// `"concurrent"` or `"one_at_a_time"`.
    pub mode: &'static str,
    /// Whether the prefix cache was on.
    pub cache: bool,
    /// Tenants (namespaces) the sessions were spread over.
    pub tenants: usize,
    /// Sessions run.
    pub sessions: usize,
    /// Prompt tokens the engine computed.
    pub prefill_tokens_computed: u64,
    /// Prompt tokens served from the cache.
    pub cached_tokens: u64,
    /// Time to first token, median, seconds.
    pub ttft_p50_s: f64,
    /// Time to first token, 95th percentile, seconds.
    pub ttft_p95_s: f64,
    /// Time to first token of the first session submitted (cold when run one at a time).
    pub ttft_first_s: f64,
    /// Median time to first token of the other sessions (warm when run one at a time).
    pub ttft_rest_p50_s: f64,
    /// Generated tokens over the run's wall time.
    pub aggregate_tokens_per_s: f64,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// The most KV memory in use at once (pages × page bytes).
    pub peak_kv_bytes: usize,
    /// Engine steps.
    pub steps: u64,
    /// Sequences preempted.
    pub preemptions: u64,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct PrefixBenchReport {
    /// The model file.
    pub model: String,
    /// Tokens in the shared system prompt (as rendered, up to the end of the system turn).
    pub system_prompt_tokens: usize,
    /// Tokens in each session's prompt (system prompt + question), min and max.
    pub prompt_tokens: (usize, usize),
    /// Tokens generated per session.
    pub gen_tokens: usize,
    /// KV bytes per token (all layers, K and V, f16).
    pub kv_bytes_per_token: usize,
    /// The runs.
    pub runs: Vec<RunReport>,
    /// Derived ratios (the targets).
    pub summary: serde_json::Value,
}

/// A system prompt in the style of an agent's tool list, of about `tokens` tokens.
fn system_prompt(engine: &LoadedModel, tokens: usize) -> String {
    let verbs = [
        "search",
        "read",
        "list",
        "update",
        "create",
        "delete",
        "summarise",
        "convert",
    ];
    let nouns = [
        "files", "orders", "tickets", "invoices", "users", "notes", "metrics", "logs",
    ];
    let mut text = String::from(
        "You are an operations agent. Answer the user's question, calling tools when needed. \
         Call a tool by writing <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\n\
         Available tools:\n",
    );
    let mut i = 0;
    while engine.tokenizer.encode(&text, false).map_or(0, |t| t.len()) < tokens {
        let (v, n) = (
            verbs[i % verbs.len()],
            nouns[(i / verbs.len()) % nouns.len()],
        );
        text += &format!(
            "- {v}_{n}_{i}: {v} the {n} that match a query. Arguments: {{\"query\": string, \
             \"limit\": integer (default {}), \"since\": ISO-8601 date}}. Returns a JSON list.\n",
            10 + i % 7
        );
        i += 1;
    }
    text
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// One session: create, generate, return (TTFT, tokens).
async fn one_session(
    h: SchedulerHandle,
    model: Arc<LoadedModel>,
    tenant: TenantId,
    prompt: Vec<u32>,
    opts: GenerateOptions,
) -> Result<(Duration, usize)> {
    let start = Instant::now();
    let sid = h.create_session(tenant, None, prompt).await?;
    let dec = model.decoding(&opts)?;
    let mut rx = h.generate(tenant, sid, dec).await?;
    let (mut ttft, mut n) = (None, 0);
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { .. } => {
                ttft.get_or_insert_with(|| start.elapsed());
                n += 1;
            }
            Event::Done(_) => break,
            Event::Error(e) => return Err(e.into()),
        }
    }
    h.close(tenant, sid).await?;
    Ok((ttft.unwrap_or_default(), n))
}

async fn run(
    engine: &Arc<LoadedModel>,
    cfg: &PrefixBenchConfig,
    prompts: &[Vec<u32>],
    cache: bool,
    tenants: usize,
    concurrent: bool,
) -> Result<RunReport> {
    let sched = SchedulerConfig {
        cache,
        ..cfg.scheduler.clone()
    };
    let h = SchedulerHandle::spawn(Box::new(engine.cpu_executor()), sched)?;
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: cfg.gen_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let start = Instant::now();
    let mut results = Vec::new();
    if concurrent {
        let tasks: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let fut = one_session(
                    h.clone(),
                    engine.clone(),
                    (i % tenants) as TenantId,
                    p.clone(),
                    opts.clone(),
                );
                tokio::spawn(fut)
            })
            .collect();
        for t in tasks {
            results.push(t.await??);
        }
    } else {
        for (i, p) in prompts.iter().enumerate() {
            results.push(
                one_session(
                    h.clone(),
                    engine.clone(),
                    (i % tenants) as TenantId,
                    p.clone(),
                    opts.clone(),
                )
                .await?,
            );
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let stats = h.stats().await?;
    let mut ttfts: Vec<f64> = results.iter().map(|r| r.0.as_secs_f64()).collect();
    let ttft_first_s = ttfts.first().copied().unwrap_or(0.0);
    let mut rest = ttfts.get(1..).unwrap_or(&[]).to_vec();
    rest.sort_by(f64::total_cmp);
    ttfts.sort_by(f64::total_cmp);
    let generated: usize = results.iter().map(|r| r.1).sum();
    let report = RunReport {
        mode: if concurrent {
            "concurrent"
        } else {
            "one_at_a_time"
        },
        cache,
        tenants,
        sessions: prompts.len(),
        prefill_tokens_computed: stats.prefill_tokens,
        cached_tokens: stats.cached_tokens,
        ttft_p50_s: percentile(&ttfts, 0.5),
        ttft_p95_s: percentile(&ttfts, 0.95),
        ttft_first_s,
        ttft_rest_p50_s: percentile(&rest, 0.5),
        aggregate_tokens_per_s: generated as f64 / wall,
        wall_s: wall,
        peak_kv_bytes: stats.peak_pages * stats.page_bytes,
        steps: stats.steps,
        preemptions: stats.preemptions,
    };
    eprintln!(
        "agentd bench prefix: {}",
        serde_json::to_string(&report).unwrap_or_default()
    );
    Ok(report)
}

/// Runs the benchmark.
pub async fn run_prefix_bench(
    engine: Arc<LoadedModel>,
    cfg: &PrefixBenchConfig,
) -> Result<PrefixBenchReport> {
    let system = system_prompt(&engine, cfg.system_tokens);
    let system_msg = Message::system(system);
    let system_prompt_tokens = engine
        .tokenizer
        .encode(
            &engine
                .template
                .render(std::slice::from_ref(&system_msg), None, false)?,
            true,
        )?
        .len();
    let mut prompts = Vec::new();
    for i in 0..cfg.sessions {
        let q = format!(
            "Order #{} from customer {} has not arrived. Which tool should I call first, and why?",
            10_000 + i * 37,
            i
        );
        prompts.push(engine.chat_prompt(&[system_msg.clone(), Message::user(q)])?);
    }
    let lens = prompts.iter().map(|p| p.len());
    let prompt_tokens = (lens.clone().min().unwrap_or(0), lens.max().unwrap_or(0));
    let mut runs = Vec::new();
    if cfg.cache_off {
        runs.push(run(&engine, cfg, &prompts, false, 1, true).await?);
    }
    for &t in &cfg.tenants {
        runs.push(run(&engine, cfg, &prompts, true, t.max(1), true).await?);
    }
    runs.push(run(&engine, cfg, &prompts, true, 1, false).await?);
    let kv_bytes_per_token = engine.cpu_executor().kv_bytes_per_token();
    let find = |mode: &str, cache: bool, tenants: usize| {
        runs.iter()
            .find(|r| r.mode == mode && r.cache == cache && r.tenants == tenants)
    };
    let own_tokens: usize = prompts
        .iter()
        .map(|p| p.len() - system_prompt_tokens + cfg.gen_tokens)
        .sum();
    let kv_bound = |namespaces: usize| {
        ((namespaces * system_prompt_tokens + own_tokens) * kv_bytes_per_token) as f64
    };
    let mut summary = serde_json::Map::new();
    if let (Some(on), Some(one)) = (find("concurrent", true, 1), find("one_at_a_time", true, 1)) {
        summary.insert(
            "concurrent_over_one_at_a_time_tokens_per_s".into(),
            (on.aggregate_tokens_per_s / one.aggregate_tokens_per_s).into(),
        );
        summary.insert(
            "peak_kv_over_one_prompt_plus_own_tokens".into(),
            (on.peak_kv_bytes as f64 / kv_bound(1)).into(),
        );
        summary.insert(
            "prefill_computed_over_one_prompt_plus_own_prompts".into(),
            (on.prefill_tokens_computed as f64
                / (system_prompt_tokens
                    + prompts
                        .iter()
                        .map(|p| p.len() - system_prompt_tokens)
                        .sum::<usize>()) as f64)
                .into(),
        );
        if let Some(off) = find("concurrent", false, 1) {
            summary.insert(
                "warm_ttft_p50_over_cold_ttft_p50".into(),
                (on.ttft_p50_s / off.ttft_p50_s).into(),
            );
        }
    }
    if let Some(one) = find("one_at_a_time", true, 1) {
        summary.insert(
            "one_at_a_time_warm_ttft_p50_over_cold_ttft".into(),
            (one.ttft_rest_p50_s / one.ttft_first_s).into(),
        );
    }
    for &t in cfg.tenants.iter().filter(|&&t| t > 1) {
        if let Some(r) = find("concurrent", true, t) {
            summary.insert(
                format!("peak_kv_over_{t}_prompts_plus_own_tokens"),
                (r.peak_kv_bytes as f64 / kv_bound(t)).into(),
            );
        }
    }
    Ok(PrefixBenchReport {
        model: engine.path.display().to_string(),
        system_prompt_tokens,
        prompt_tokens,
        gen_tokens: cfg.gen_tokens,
        kv_bytes_per_token,
        runs,
        summary: summary.into(),
    })
}
