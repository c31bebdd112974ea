//! `agentd bench cluster`: several daemons behind `agentd route`, agent sessions over a few long
//! system prompts, in three set-ups side by side:
//!
//! - `routed`: the daemons share a KV tier on Redis Cluster and publish KV events; the router
//!   places each session where its prefix is cached (`--placement cache`);
//! - `round-robin`: the same shared tier, sessions dealt to the daemons in turn;
//! - `no-tier`: no shared tier, sessions dealt in turn (every daemon computes every prompt).
//!
//! Each set-up starts fresh daemons (child processes of this binary, `--node 1..`, own data
//! directories) and a fresh router; the prompts carry the set-up's name, so no set-up finds
//! another's pages in the tier. The workload is the SDK's agent flow through the router:
//! register each system prompt as a prefix, then per session: create it from the prefix,
//! append a user message, generate `max_tokens` tokens greedily, close it; `concurrency`
//! sessions at once, prompts interleaved.
//!
//! Reported per set-up: prompt tokens computed (the daemons' prefill counters, registrations
//! included), tokens loaded from the shared tier, TTFT p50/p95 at the client (from creating the
//! session to the first token, so a session whose prefix had to be registered on its daemon
//! pays for that), aggregate generated tokens per second, sessions per daemon. In `routed`, a
//! probe then measures a cold prefill against a cross-daemon hit directly on two daemons:
//! the TTFT of a prompt computed on one, and of the same prompt on another after the first
//! pinned (and so exported) it.
//!
//! Without `--kv-tier` the benchmark starts a three-primary Redis Cluster of its own
//! (`redis-server` must be installed).

use super::child::{percentile, ChildConfig, ChildDaemon};
use super::redis_cluster::BenchRedis;
use crate::cli::connect::connect;
use agentd_wire::proto::{self, agentd_client::AgentdClient, generate_event};
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Client = AgentdClient<Channel>;

/// What to run.
#[derive(Debug, Clone)]
pub struct ClusterBenchConfig {
    /// How to start each daemon (model and global flags, KV memory).
    pub daemon: ChildConfig,
    /// Daemons behind the router.
    pub daemons: usize,
    /// Agent sessions per set-up.
    pub sessions: usize,
    /// Distinct system prompts.
    pub prompts: usize,
    /// Tokens per system prompt, about.
    pub prompt_tokens: usize,
    /// Tokens generated per session.
    pub max_tokens: u32,
    /// Sessions in flight at once.
    pub concurrency: usize,
    /// A running Redis Cluster's seed URLs; without, the benchmark starts one.
    pub kv_tier: Option<String>,
    /// The set-ups to run, in order.
    pub modes: Vec<Mode>,
}

/// One set-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Shared tier and KV events; placement by cache.
    Routed,
    /// Shared tier; placement in turn.
    RoundRobin,
    /// No shared tier; placement in turn.
    NoTier,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Routed => "routed",
            Mode::RoundRobin => "round-robin",
            Mode::NoTier => "no-tier",
        }
    }
}

/// The report.
#[derive(Debug, Serialize)]
pub struct ClusterReport {
    /// Daemons behind the router.
    pub daemons: usize,
    /// Sessions per set-up.
    pub sessions: usize,
    /// System prompts.
    pub prompts: usize,
    /// Tokens of each system prompt, as the model's chat template renders it.
    pub prompt_tokens: Vec<usize>,
    /// Tokens generated per session.
    pub max_tokens: u32,
    /// Sessions in flight at once.
    pub concurrency: usize,
    /// One entry per set-up.
    pub modes: Vec<ModeReport>,
    /// Cold prefill against a cross-daemon hit (in the `routed` set-up).
    pub probe: Option<ProbeReport>,
}

/// One set-up's figures.
#[derive(Debug, Serialize)]
pub struct ModeReport {
    /// Its name.
    pub mode: Mode,
    /// Prompt tokens the daemons computed, all together (registrations included).
    pub prompt_tokens_computed: u64,
    /// Of those, the sessions' own (each session's prompt tokens not found cached: its user
    /// message and the template's turn markers).
    pub session_tokens_computed: u64,
    /// The rest — system prompts computed by registrations, here or on another daemon — in
    /// system prompts' worth (the aim in `routed`: 1.0 per prompt, so `prompts` in all).
    pub system_prompts_computed: f64,
    /// Tokens the daemons loaded from the shared tier.
    pub tier_loaded_tokens: u64,
    /// Of the sessions' prompt tokens, those found cached (memory, disk or tier).
    pub session_cached_tokens: u64,
    /// Time to first token at the client, from creating the session: median.
    pub ttft_p50_ms: f64,
    /// 95th percentile.
    pub ttft_p95_ms: f64,
    /// Generated tokens per second, all sessions together, over the set-up's wall time.
    pub tokens_per_second: f64,
    /// Wall time of the sessions.
    pub wall_seconds: f64,
    /// Sessions placed on each daemon (node 1 first).
    pub sessions_per_daemon: Vec<usize>,
}

/// A cold prefill against a cross-daemon hit.
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    /// Prompts probed.
    pub prompts: usize,
    /// TTFT of a prompt computed on a daemon that has none of it: median, ms.
    pub cold_ttft_p50_ms: f64,
    /// TTFT of the same prompt on another daemon, loaded from the shared tier: median, ms.
    pub cross_daemon_hit_ttft_p50_ms: f64,
    /// Hit over cold (the aim: at most 0.2).
    pub ratio: f64,
    /// Tokens the hits loaded from the tier, all together.
    pub tier_cached_tokens: u64,
}

/// A system prompt of about `tokens` tokens, distinct per `mode` and `index`.
fn system_prompt(mode: Mode, index: usize, rules: usize) -> String {
    let mut s = format!(
        "You are the operations agent of deployment {index} (benchmark set-up {}). Follow every rule below.\n",
        mode.name()
    );
    for r in 0..rules {
        s.push_str(&format!(
            "Rule {r}: before changing service {} in region {}, read its runbook, check the \
             last {} alerts, and write what you did in ticket OPS-{}.\n",
            (r * 7 + index) % 23,
            (r + index) % 5,
            r % 9 + 2,
            1000 + r * 13 + index
        ));
    }
    s
}

fn message(role: &str, content: impl Into<String>) -> proto::Message {
    proto::Message {
        role: role.into(),
        content: content.into(),
    }
}

/// How many tokens `text` is.
async fn count_tokens(c: &mut Client, text: &str) -> Result<usize> {
    Ok(c.tokenize(proto::TokenizeRequest {
        text: text.into(),
        parse_special: false,
    })
    .await
    .context("Tokenize")?
    .into_inner()
    .tokens
    .len())
}

/// Rules per prompt so that a prompt is about `tokens` tokens.
async fn calibrate(c: &mut Client, tokens: usize) -> Result<usize> {
    let per_rule = count_tokens(c, &system_prompt(Mode::Routed, 0, 10)).await? as f64 / 10.0;
    Ok(((tokens as f64 / per_rule).round() as usize).max(1))
}

/// Runs the benchmark.
pub async fn run_cluster_bench(cfg: &ClusterBenchConfig) -> Result<ClusterReport> {
    anyhow::ensure!((1..=127).contains(&cfg.daemons), "--daemons must be 1-127");
    anyhow::ensure!(
        cfg.sessions > 0 && cfg.prompts > 0,
        "--sessions and --prompts must be at least 1"
    );
    anyhow::ensure!(cfg.concurrency > 0, "--concurrency must be at least 1");
    let own_redis = match &cfg.kv_tier {
        Some(_) => None,
        None if cfg.modes.iter().any(|m| *m != Mode::NoTier) => Some(BenchRedis::start("1gb")?),
        None => None,
    };
    let urls = cfg
        .kv_tier
        .clone()
        .or_else(|| own_redis.as_ref().map(|r| r.urls()))
        .unwrap_or_default();
    let mut report = ClusterReport {
        daemons: cfg.daemons,
        sessions: cfg.sessions,
        prompts: cfg.prompts,
        prompt_tokens: Vec::new(),
        max_tokens: cfg.max_tokens,
        concurrency: cfg.concurrency,
        modes: Vec::new(),
        probe: None,
    };
    for &mode in &cfg.modes {
        eprintln!("agentd bench cluster: {} …", mode.name());
        let (m, probe, prompt_tokens) = run_mode(cfg, mode, &urls).await?;
        eprintln!(
            "  prompt tokens computed {} ({:.2} system prompts), TTFT p50 {:.0} ms p95 {:.0} ms, {:.1} tok/s",
            m.prompt_tokens_computed, m.system_prompts_computed, m.ttft_p50_ms, m.ttft_p95_ms, m.tokens_per_second
        );
        report.modes.push(m);
        report.prompt_tokens = prompt_tokens;
        if probe.is_some() {
            report.probe = probe;
        }
    }
    Ok(report)
}

/// One session's outcome.
struct SessionResult {
    node: usize,
    ttft: f64,
    generated: u64,
    cached: u64,
    computed: u64,
}

async fn run_mode(
    cfg: &ClusterBenchConfig,
    mode: Mode,
    urls: &str,
) -> Result<(ModeReport, Option<ProbeReport>, Vec<usize>)> {
    let with_tier = mode != Mode::NoTier;
    let mut daemons = Vec::with_capacity(cfg.daemons);
    for i in 0..cfg.daemons {
        let mut d = cfg.daemon.clone();
        d.serve_args
            .extend(["--node".into(), (i + 1).to_string().into()]);
        if with_tier {
            d.serve_args.extend(["--kv-tier".into(), urls.into()]);
        }
        daemons.push(ChildDaemon::start(&d).await?);
    }
    let mut route_args: Vec<OsString> = Vec::new();
    for d in &daemons {
        route_args.push("--daemon".into());
        let mut a = OsString::from("unix:");
        a.push(d.socket());
        route_args.push(a);
    }
    route_args.push("--placement".into());
    route_args.push(
        if mode == Mode::Routed {
            "cache"
        } else {
            "round-robin"
        }
        .into(),
    );
    if with_tier {
        route_args.extend(["--kv-tier".into(), urls.into()]);
    }
    let router = ChildDaemon::start_router(&route_args).await?;
    let mut c = connect(router.socket()).await?;

    let rules = calibrate(&mut c, cfg.prompt_tokens).await?;
    let mut prefixes = Vec::with_capacity(cfg.prompts);
    let mut prompt_tokens = Vec::with_capacity(cfg.prompts);
    for p in 0..cfg.prompts {
        let r = c
            .register_prefix(proto::RegisterPrefixRequest {
                messages: vec![message("system", system_prompt(mode, p, rules))],
                ..Default::default()
            })
            .await
            .context("RegisterPrefix through the router")?
            .into_inner();
        prefixes.push(r.prefix_id);
        prompt_tokens.push(r.tokens as usize);
    }

    let gate = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency));
    let t0 = Instant::now();
    let mut tasks = Vec::with_capacity(cfg.sessions);
    for i in 0..cfg.sessions {
        let (c, gate, prefix) = (c.clone(), gate.clone(), prefixes[i % prefixes.len()]);
        let max_tokens = cfg.max_tokens;
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("never closed");
            session(c, prefix, i, max_tokens).await
        }));
    }
    let mut results = Vec::with_capacity(cfg.sessions);
    for t in tasks {
        results.push(t.await.context("a session task")??);
    }
    let wall = t0.elapsed().as_secs_f64();

    let (mut computed, mut loaded) = (0u64, 0u64);
    for d in &daemons {
        let s = d
            .client()
            .await?
            .stats(proto::StatsRequest::default())
            .await
            .context("Stats of a daemon")?
            .into_inner();
        computed += s.prefill_tokens;
        loaded += s.shared_tier.map_or(0, |t| t.loaded_tokens);
    }
    let mut per_daemon = vec![0usize; cfg.daemons];
    for r in &results {
        if let Some(n) = r.node.checked_sub(1).and_then(|i| per_daemon.get_mut(i)) {
            *n += 1;
        }
    }
    let mut ttfts: Vec<f64> = results.iter().map(|r| r.ttft * 1e3).collect();
    let generated: u64 = results.iter().map(|r| r.generated).sum();
    let mean_prompt = prompt_tokens.iter().sum::<usize>() as f64 / prompt_tokens.len() as f64;
    let session_computed: u64 = results.iter().map(|r| r.computed).sum();
    let report = ModeReport {
        mode,
        prompt_tokens_computed: computed,
        session_tokens_computed: session_computed,
        system_prompts_computed: computed.saturating_sub(session_computed) as f64 / mean_prompt,
        tier_loaded_tokens: loaded,
        session_cached_tokens: results.iter().map(|r| r.cached).sum(),
        ttft_p50_ms: percentile(&mut ttfts, 0.5),
        ttft_p95_ms: percentile(&mut ttfts, 0.95),
        tokens_per_second: generated as f64 / wall,
        wall_seconds: wall,
        sessions_per_daemon: per_daemon,
    };
    drop(router);
    let probe = if mode == Mode::Routed && daemons.len() >= 2 {
        Some(probe(&daemons, mode, rules, cfg.prompts).await?)
    } else {
        None
    };
    Ok((report, probe, prompt_tokens))
}

/// One agent session through the router.
async fn session(mut c: Client, prefix: u64, i: usize, max_tokens: u32) -> Result<SessionResult> {
    let began = Instant::now();
    let id = c
        .create_session(proto::CreateSessionRequest {
            prefix_id: prefix,
            tokens: Vec::new(),
        })
        .await
        .context("CreateSession through the router")?
        .into_inner()
        .session_id;
    c.append(proto::AppendRequest {
        session_id: id,
        messages: vec![message(
            "user",
            format!(
                "Ticket {i}: service {} in region {} is slow. What do you check first?",
                i % 23,
                i % 5
            ),
        )],
        add_generation_prompt: true,
        ..Default::default()
    })
    .await
    .context("Append through the router")?;
    let (ttft, usage) = generate(&mut c, id, max_tokens, began).await?;
    c.close_session(proto::SessionRef { session_id: id })
        .await
        .context("CloseSession through the router")?;
    Ok(SessionResult {
        node: ((id >> 56) & 0x7f) as usize,
        ttft,
        generated: u64::from(usage.generated_tokens),
        cached: u64::from(usage.cached_tokens),
        computed: u64::from(usage.prompt_tokens.saturating_sub(usage.cached_tokens)),
    })
}

/// Generates greedily; the seconds from `began` to the first token, and the usage.
async fn generate(
    c: &mut Client,
    id: u64,
    max_tokens: u32,
    began: Instant,
) -> Result<(f64, proto::Usage)> {
    let mut stream = c
        .generate(proto::GenerateRequest {
            session_id: id,
            max_tokens,
            sampling: Some(proto::Sampling::default()),
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .context("Generate")?
        .into_inner();
    let (mut first, mut usage) = (None, None);
    while let Some(ev) = stream.next().await {
        match ev.context("Generate stream")?.event {
            Some(generate_event::Event::Token(_)) => {
                first.get_or_insert_with(|| began.elapsed().as_secs_f64());
            }
            Some(generate_event::Event::Done(u)) => usage = Some(u),
            None => {}
        }
    }
    let usage = usage.ok_or_else(|| anyhow!("Generate: the stream ended without usage"))?;
    if usage.finish_reason != "max_tokens" {
        bail!("Generate finished with {:?}", usage.finish_reason);
    }
    Ok((first.unwrap_or(usage.ttft_seconds), usage))
}

/// Per probe prompt: computed on daemon A (cold), pinned there (so exported), then the same
/// prompt on daemon B (loaded from the tier).
async fn probe(
    daemons: &[ChildDaemon],
    mode: Mode,
    rules: usize,
    prompts: usize,
) -> Result<ProbeReport> {
    let (mut cold, mut hit, mut tier_tokens) = (Vec::new(), Vec::new(), 0u64);
    let page_size = daemons[0]
        .client()
        .await?
        .model_info(proto::ModelInfoRequest {})
        .await
        .context("ModelInfo")?
        .into_inner()
        .page_size
        .max(1) as usize;
    for p in 0..prompts {
        let a = &daemons[p % daemons.len()];
        let b = &daemons[(p + 1) % daemons.len()];
        let (mut ca, cb) = (a.client().await?, b.client().await?);
        let text = system_prompt(mode, 1000 + p, rules);
        let tokens = ca
            .tokenize(proto::TokenizeRequest {
                text,
                parse_special: false,
            })
            .await
            .context("Tokenize")?
            .into_inner()
            .tokens;
        let ask = |mut c: Client, tokens: Vec<u32>| async move {
            let began = Instant::now();
            let id = c
                .create_session(proto::CreateSessionRequest {
                    prefix_id: 0,
                    tokens,
                })
                .await
                .context("CreateSession")?
                .into_inner()
                .session_id;
            let r = generate(&mut c, id, 1, began).await;
            c.close_session(proto::SessionRef { session_id: id })
                .await?;
            r
        };
        let mut with_question = tokens.clone();
        with_question.extend_from_slice(&tokens[..8.min(tokens.len())]);
        let (t, _) = ask(ca.clone(), with_question.clone()).await?;
        cold.push(t * 1e3);
        let before = exported_pages(&mut ca).await?;
        ca.register_prefix(proto::RegisterPrefixRequest {
            tokens: tokens.clone(),
            ..Default::default()
        })
        .await
        .context("RegisterPrefix on the first daemon")?;
        // Wait for the pin's export (at most 10 s), so the second daemon can find it.
        let pages = (tokens.len() / page_size) as u64;
        let since = Instant::now();
        while exported_pages(&mut ca).await? < before + pages
            && since.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (t, usage) = ask(cb, with_question).await?;
        hit.push(t * 1e3);
        tier_tokens += u64::from(usage.tier_cached_tokens);
    }
    let cold_p50 = percentile(&mut cold, 0.5);
    let hit_p50 = percentile(&mut hit, 0.5);
    Ok(ProbeReport {
        prompts,
        cold_ttft_p50_ms: cold_p50,
        cross_daemon_hit_ttft_p50_ms: hit_p50,
        ratio: if cold_p50 > 0.0 {
            hit_p50 / cold_p50
        } else {
            0.0
        },
        tier_cached_tokens: tier_tokens,
    })
}

async fn exported_pages(c: &mut Client) -> Result<u64> {
    Ok(c.stats(proto::StatsRequest::default())
        .await
        .context("Stats")?
        .into_inner()
        .shared_tier
        .map_or(0, |t| t.exported_pages))
}

/// `agentd bench cluster`'s flags.
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Daemons behind the router.
    #[arg(long, default_value_t = 3)]
    daemons: usize,
    /// Agent sessions per set-up.
    #[arg(long, default_value_t = 96)]
    sessions: usize,
    /// Distinct system prompts.
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// Tokens per system prompt, about.
    #[arg(long, default_value_t = 1500)]
    prompt_tokens: usize,
    /// Tokens generated per session.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Sessions in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// A running Redis Cluster (redis://HOST:PORT,…); default: start one (needs redis-server).
    #[arg(long, value_name = "URLS")]
    kv_tier: Option<String>,
    /// The set-ups, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "routed,round-robin,no-tier"
    )]
    modes: Vec<Mode>,
    /// Each daemon's KV memory.
    #[arg(long, default_value = "512MiB", value_parser = crate::parse_size)]
    kv_memory: u64,
}

impl ClusterArgs {
    /// The benchmark's configuration, each daemon started as `daemon` (with `kv_memory`).
    pub fn config(
        self,
        daemon: impl FnOnce(u64) -> Result<ChildConfig>,
    ) -> Result<ClusterBenchConfig> {
        Ok(ClusterBenchConfig {
            daemon: daemon(self.kv_memory)?,
            daemons: self.daemons,
            sessions: self.sessions,
            prompts: self.prompts,
            prompt_tokens: self.prompt_tokens,
            max_tokens: self.max_tokens,
            concurrency: self.concurrency,
            kv_tier: self.kv_tier,
            modes: self.modes,
        })
    }
}
