//! `agentd bench latency`: does slow work stall running streams, and are session calls answered
//! while steps run? Everything goes through the real service on a temporary socket in this
//! process, measured at the client.
//!
//! 1. Inter-token latency (ITL) of `streams` running streams: idle; while another session loads
//!    a `disk_prefix_tokens`-token prefix from the disk tier (the scheduler was restarted on the
//!    directory, so the prefix is only on disk); while a request with `grammar_tools` tools
//!    compiles its tool-call grammar. Each figure is the p99 of the gaps between consecutive
//!    tokens of the running streams during the event, next to the idle p99.
//! 2. CreateSession + Append (one chat message) latency while `prefill_sessions` sessions
//!    prefill `prefill_tokens`-token prompts of their own.

use crate::cli::connect::connect;
use agentd_engine::LoadedModel;
use agentd_scheduler::{DiskTierConfig, SchedulerConfig, SchedulerHandle};
use agentd_service::serve::spawn_local;
use agentd_wire::proto::{self, agentd_client::AgentdClient, generate_event};
use anyhow::{Context, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Client = AgentdClient<Channel>;

/// What to run.
#[derive(Debug, Clone)]
pub struct LatencyBenchConfig {
    /// Streams decoding throughout.
    pub streams: usize,
    /// The prefix loaded from disk.
    pub disk_prefix_tokens: usize,
    /// Tools in the constrained request.
    pub grammar_tools: usize,
    /// Sessions prefilling while session calls are timed.
    pub prefill_sessions: usize,
    /// Prompt tokens each of them prefills.
    pub prefill_tokens: usize,
    /// CreateSession + Append pairs timed.
    pub session_calls: usize,
    /// The scheduler's configuration (its disk tier is replaced by a temporary one).
    pub scheduler: SchedulerConfig,
}

/// Inter-token latency during one phase, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ItlFigure {
    /// Gaps measured.
    pub gaps: usize,
    /// Median gap.
    pub p50_ms: f64,
    /// 99th percentile gap.
    pub p99_ms: f64,
    /// Largest gap.
    pub max_ms: f64,
    /// How long the event took (the disk load or the grammar compile plus first token).
    pub event_ms: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct LatencyBenchReport {
    /// The model file.
    pub model: String,
    /// Streams decoding.
    pub streams: usize,
    /// ITL with nothing else going on.
    pub idle: ItlFigure,
    /// ITL while a session loads `disk_prefix_tokens` from disk.
    pub disk_load: ItlFigure,
    /// Tokens the loading request found cached (from disk).
    pub disk_cached_tokens: u32,
    /// ITL while a `grammar_tools`-tool grammar compiles.
    pub grammar: ItlFigure,
    /// `disk_load.p99_ms / idle.p99_ms`.
    pub disk_load_p99_over_idle: f64,
    /// `grammar.p99_ms / idle.p99_ms`.
    pub grammar_p99_over_idle: f64,
    /// CreateSession + Append pairs timed while sessions prefill.
    pub session_calls: usize,
    /// Their latency, median, milliseconds.
    pub create_append_p50_ms: f64,
    /// Their latency, 99th percentile, milliseconds.
    pub create_append_p99_ms: f64,
    /// Sessions prefilling meanwhile, and their prompt length.
    pub prefill_sessions: usize,
    /// See `prefill_sessions`.
    pub prefill_tokens: usize,
    /// Of those, the ones still prefilling when the last session call returned.
    pub still_prefilling: usize,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Every token's arrival time, one list per generation (a gap is only measured between two
/// tokens of the same generation).
type Arrivals = Arc<Mutex<Vec<Vec<Instant>>>>;

/// Greedy sampling (temperature 0), no penalties.
fn greedy() -> Option<proto::Sampling> {
    Some(proto::Sampling {
        repetition_penalty: 1.0,
        ..Default::default()
    })
}

async fn tokenize(c: &mut Client, text: &str) -> Result<Vec<u32>> {
    Ok(c.tokenize(proto::TokenizeRequest {
        text: text.into(),
        parse_special: true,
    })
    .await?
    .into_inner()
    .tokens)
}

async fn session(c: &mut Client, prefix: u64, tokens: Vec<u32>) -> Result<u64> {
    Ok(c.create_session(proto::CreateSessionRequest {
        prefix_id: prefix,
        tokens,
    })
    .await?
    .into_inner()
    .session_id)
}

/// Generates on `session` and returns the usage; each token's arrival goes to `arrivals`.
async fn generate(
    c: &mut Client,
    session_id: u64,
    max_tokens: u32,
    constraint: Option<proto::Constraint>,
    mut on_token: impl FnMut(Instant),
) -> Result<proto::Usage> {
    let mut stream = c
        .generate(proto::GenerateRequest {
            session_id,
            max_tokens,
            sampling: greedy(),
            stop: Vec::new(),
            constraint,
            ignore_eos: false,
        })
        .await?
        .into_inner();
    while let Some(ev) = stream.next().await {
        match ev?.event {
            Some(generate_event::Event::Token(_)) => on_token(Instant::now()),
            Some(generate_event::Event::Done(u)) => return Ok(u),
            None => {}
        }
    }
    anyhow::bail!("the stream ended without usage")
}

/// One stream: generations back to back on its own session until `stop`.
async fn stream_loop(
    mut c: Client,
    prompt: Vec<u32>,
    arrivals: Arrivals,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let id = session(&mut c, 0, prompt.clone()).await?;
        let k = {
            let mut all = arrivals.lock().expect("not poisoned");
            all.push(Vec::new());
            all.len() - 1
        };
        let arr = arrivals.clone();
        generate(&mut c, id, 200, None, |t| {
            arr.lock().expect("not poisoned")[k].push(t)
        })
        .await?;
        c.close_session(proto::SessionRef { session_id: id })
            .await?;
    }
    Ok(())
}

/// The ITL figure of the gaps that end inside `from..to`.
fn figure(arrivals: &Arrivals, from: Instant, to: Instant) -> ItlFigure {
    let all = arrivals.lock().expect("not poisoned");
    let mut gaps: Vec<f64> = all
        .iter()
        .flat_map(|ts| ts.windows(2))
        .filter(|w| w[1] >= from && w[1] <= to)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .filter(|&g| g < 60_000.0)
        .collect();
    let n = gaps.len();
    let max = gaps.iter().copied().fold(0.0, f64::max);
    ItlFigure {
        gaps: n,
        p50_ms: percentile(&mut gaps, 0.5),
        p99_ms: percentile(&mut gaps, 0.99),
        max_ms: max,
        event_ms: (to - from).as_secs_f64() * 1e3,
    }
}

fn tools_constraint(n: usize) -> proto::Constraint {
    let tools = (0..n)
        .map(|i| proto::Tool {
            name: format!("tool_{i}"),
            description: format!("Tool number {i}."),
            parameters_json: format!(
                r#"{{"type":"object","properties":{{"q{i}":{{"type":"string"}},"n":{{"type":"integer"}}}},"required":["q{i}"]}}"#
            ),
        })
        .collect();
    proto::Constraint {
        kind: Some(proto::constraint::Kind::ToolCalls(proto::ToolCalls {
            tools,
            required: true,
            max_calls: 1,
        })),
    }
}

/// Runs the benchmark.
pub async fn run_latency_bench(
    engine: Arc<LoadedModel>,
    cfg: &LatencyBenchConfig,
) -> Result<LatencyBenchReport> {
    let dir = tempfile::tempdir()?;
    let mut sched = cfg.scheduler.clone();
    sched.store = Some(DiskTierConfig {
        store: agentd_store::StoreConfig {
            dir: dir.path().to_owned(),
            budget: u64::MAX,
        },
        digests: engine.digests()?,
    });
    let unit = engine.tokenizer.encode(
        "The daemon keeps a radix tree of KV-cache prefixes so agent sessions share them. ",
        false,
    )?;
    let prefix: Vec<u32> = unit
        .iter()
        .copied()
        .cycle()
        .take(cfg.disk_prefix_tokens)
        .collect();
    // Compute the prefix, pin it (written through to disk), and restart on the directory, so
    // the prefix is only on disk.
    let prefix_id = {
        let h = SchedulerHandle::spawn(Box::new(engine.cpu_executor()), sched.clone())?;
        let info = h.register_prefix(0, prefix, false).await?;
        h.flush().await?;
        info.id.0
    };
    let since = Instant::now();
    let h = loop {
        // The previous scheduler's thread may hold the store for a moment.
        match SchedulerHandle::spawn(Box::new(engine.cpu_executor()), sched.clone()) {
            Ok(h) => break h,
            Err(e) if since.elapsed() < Duration::from_secs(20) => {
                tracing::debug!(error = %e, "waiting for the store");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let local = spawn_local(h, engine.clone())?;
    let mut c = connect(&local.socket).await?;

    let prompt = tokenize(
        &mut c,
        "<|im_start|>user\nCount from one to five hundred in words.<|im_end|>\n<|im_start|>assistant\n",
    )
    .await?;
    let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..cfg.streams {
        tasks.push(tokio::spawn(stream_loop(
            c.clone(),
            prompt.clone(),
            arrivals.clone(),
            stop.clone(),
        )));
    }
    // Warm up, then the idle figure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle = figure(&arrivals, t0, Instant::now());

    // A session on the prefix that is only on disk: admission loads it.
    let question = tokenize(
        &mut c,
        "<|im_start|>user\nSummarise the above.<|im_end|>\n<|im_start|>assistant\n",
    )
    .await?;
    let t1 = Instant::now();
    let id = session(&mut c, prefix_id, question).await?;
    let usage = generate(&mut c, id, 1, None, |_| {}).await?;
    let disk_load = figure(&arrivals, t1, Instant::now());
    let disk_cached_tokens = usage.cached_tokens;

    // A request whose grammar has `grammar_tools` tools.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ask = tokenize(
        &mut c,
        "<|im_start|>user\nCall a tool.<|im_end|>\n<|im_start|>assistant\n",
    )
    .await?;
    let t2 = Instant::now();
    let id = session(&mut c, 0, ask).await?;
    generate(
        &mut c,
        id,
        1,
        Some(tools_constraint(cfg.grammar_tools)),
        |_| {},
    )
    .await
    .context("the constrained request")?;
    let grammar = figure(&arrivals, t2, Instant::now());

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }

    // Session calls while sessions prefill long prompts of their own.
    let mut prefills = Vec::new();
    for i in 0..cfg.prefill_sessions {
        let mut c = c.clone();
        let text = format!("Session {i} says: ");
        let mut p = tokenize(&mut c, &text).await?;
        p.extend(
            unit.iter()
                .copied()
                .cycle()
                .skip(i)
                .take(cfg.prefill_tokens),
        );
        prefills.push(tokio::spawn(async move {
            let id = session(&mut c, 0, p).await?;
            generate(&mut c, id, 1, None, |_| {}).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut calls = Vec::new();
    for _ in 0..cfg.session_calls {
        let start = Instant::now();
        let id = session(&mut c, 0, Vec::new()).await?;
        c.append(proto::AppendRequest {
            session_id: id,
            tokens: Vec::new(),
            messages: vec![proto::Message {
                role: "user".into(),
                content: "What is the weather like?".into(),
            }],
            add_generation_prompt: true,
        })
        .await?;
        calls.push(start.elapsed().as_secs_f64() * 1e3);
    }
    // The prefills are not waited for: the server stops under them.
    let still_prefilling = prefills.iter().filter(|p| !p.is_finished()).count();
    local.task.abort();
    drop(prefills);
    let n = calls.len();
    Ok(LatencyBenchReport {
        model: engine.path.display().to_string(),
        streams: cfg.streams,
        disk_load_p99_over_idle: disk_load.p99_ms / idle.p99_ms.max(1e-9),
        grammar_p99_over_idle: grammar.p99_ms / idle.p99_ms.max(1e-9),
        idle,
        disk_load,
        disk_cached_tokens,
        grammar,
        session_calls: n,
        create_append_p50_ms: percentile(&mut calls, 0.5),
        create_append_p99_ms: percentile(&mut calls, 0.99),
        prefill_sessions: cfg.prefill_sessions,
        prefill_tokens: cfg.prefill_tokens,
        still_prefilling,
    })
}
