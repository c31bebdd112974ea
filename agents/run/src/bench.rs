//! `agentd-run bench-agents`: M concurrent agent sessions, each running the tool loop for K turns
//! with deterministic tools (every reply must be calls), against a daemon in this process.
//! Reports tokens computed vs reused, turn latency, tool-call validity with and without the
//! daemon's constraint, and the constraint's cost per token next to the decode time per token.

use agentd_engine::LoadedModel;
use agentd_scheduler::{SchedulerConfig, SchedulerHandle};
use agentd_sdk::agent::{tool_fn, Agent, AgentEvent, ToolChoice};
use agentd_sdk::{Client, GenerateOptions};
use agentd_service::serve::spawn_local;
use std::sync::Arc;
use tokio_stream::StreamExt;

/// How to run it.
#[derive(Debug, Clone)]
pub struct AgentBenchConfig {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Generations (turns) per session.
    pub turns: usize,
    /// Tokens per generation at most.
    pub max_tokens: u32,
}

/// One mode's numbers (constrained or not).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AgentBenchRun {
    /// Whether the daemon constrained the replies.
    pub constrained: bool,
    /// Whether the daemon speculated (prompt-lookup drafts).
    pub speculation: bool,
    /// Generations run.
    pub turns: usize,
    /// Prompt tokens computed.
    pub prompt_tokens_computed: u64,
    /// Prompt tokens reused from the cache.
    pub prompt_tokens_reused: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Per-generation latency (submission to last token), p50 and p95, seconds.
    pub turn_latency_p50_s: f64,
    /// See `turn_latency_p50_s`.
    pub turn_latency_p95_s: f64,
    /// Complete calls whose arguments the tool accepted.
    pub valid_calls: u64,
    /// Complete calls the tool refused (bad arguments, unknown tool).
    pub invalid_calls: u64,
    /// Replies that were to be calls but held none (free text, or a call cut off).
    pub replies_without_a_call: u64,
    /// `valid_calls / (valid_calls + invalid_calls + replies_without_a_call)`.
    pub validity_rate: f64,
    /// Constraint time per generated token, milliseconds.
    pub constraint_ms_per_token: f64,
    /// Decode time per generated token (after the first), milliseconds.
    pub decode_ms_per_token: f64,
    /// `constraint_ms_per_token / decode_ms_per_token`.
    pub constraint_overhead: f64,
    /// Wall time of the whole run, seconds.
    pub wall_s: f64,
}

/// The report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentBenchReport {
    /// Sessions and turns.
    pub sessions: usize,
    /// Turns per session.
    pub turns: usize,
    /// With the constraint, then without; for each speculation setting asked for.
    pub runs: Vec<AgentBenchRun>,
}

/// Two integers.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Pair {
    /// The first.
    a: i64,
    /// The second.
    b: i64,
}

/// A key to look up.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Key {
    /// One of: alpha, beta, gamma.
    key: String,
}

fn agent(cfg: &AgentBenchConfig, constrained: bool) -> Agent {
    Agent::builder("You are a bookkeeping agent. Use the tools to look up values and add them.")
        .tool(tool_fn("add", "Adds two integers.", |p: Pair| async move {
            Ok::<_, String>(p.a.saturating_add(p.b).to_string())
        }))
        .tool(tool_fn(
            "lookup",
            "Looks up a stored value.",
            |k: Key| async move {
                match k.key.as_str() {
                    "alpha" => Ok("12".to_owned()),
                    "beta" => Ok("30".to_owned()),
                    "gamma" => Ok("7".to_owned()),
                    other => Err(format!("no value named {other:?}")),
                }
            },
        ))
        .options(
            GenerateOptions::default()
                .seed(11)
                .max_tokens(cfg.max_tokens),
        )
        .tool_choice(ToolChoice::Always)
        .max_turns(cfg.turns)
        .constrained(constrained)
        .build()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run_mode(client: &Client, cfg: &AgentBenchConfig, constrained: bool) -> AgentBenchRun {
    let agent = agent(cfg, constrained);
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..cfg.sessions {
        let (agent, client) = (agent.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let s = agent.session(&client).await.ok()?;
            let task = format!("Add the values alpha and beta, then add {i}.");
            let events: Vec<AgentEvent> = agent.run_stream(s.clone(), task).collect().await;
            let _ = s.close().await;
            Some(events)
        }));
    }
    let mut r = AgentBenchRun {
        constrained,
        ..Default::default()
    };
    let (mut latencies, mut constraint_s, mut decode_s, mut decode_tokens) =
        (Vec::new(), 0.0, 0.0, 0u64);
    for t in tasks {
        let Ok(Some(events)) = t.await else { continue };
        // Per turn: its TurnFinished comes first, then the calls its reply held.
        let mut calls_in_turn: Option<u64> = None;
        for ev in events {
            match ev {
                AgentEvent::ToolCallFinished {
                    result, is_error, ..
                } => {
                    *calls_in_turn.get_or_insert(0) += 1;
                    let refused = is_error
                        && (result.contains("invalid arguments")
                            || result.contains("no tool named"));
                    if refused {
                        r.invalid_calls += 1;
                    } else {
                        r.valid_calls += 1;
                    }
                }
                AgentEvent::TurnFinished(u) => {
                    if calls_in_turn == Some(0) {
                        r.replies_without_a_call += 1;
                    }
                    calls_in_turn = Some(0);
                    r.turns += 1;
                    r.prompt_tokens_computed += u64::from(u.prompt_tokens - u.cached_tokens);
                    r.prompt_tokens_reused += u64::from(u.cached_tokens);
                    r.generated_tokens += u64::from(u.generated_tokens);
                    latencies.push(u.total.as_secs_f64());
                    constraint_s += u.constraint.as_secs_f64();
                    if u.generated_tokens > 1 {
                        decode_s += u.total.as_secs_f64() - u.ttft.as_secs_f64();
                        decode_tokens += u64::from(u.generated_tokens - 1);
                    }
                }
                _ => {}
            }
        }
        if calls_in_turn == Some(0) {
            r.replies_without_a_call += 1;
        }
    }
    let attempts = r.valid_calls + r.invalid_calls + r.replies_without_a_call;
    r.validity_rate = r.valid_calls as f64 / attempts.max(1) as f64;
    r.wall_s = t0.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    r.turn_latency_p50_s = percentile(&latencies, 0.5);
    r.turn_latency_p95_s = percentile(&latencies, 0.95);
    r.constraint_ms_per_token = 1e3 * constraint_s / r.generated_tokens.max(1) as f64;
    r.decode_ms_per_token = 1e3 * decode_s / decode_tokens.max(1) as f64;
    r.constraint_overhead = r.constraint_ms_per_token / r.decode_ms_per_token.max(1e-9);
    r
}

/// Runs the benchmark on `engine` with `sched`.
pub async fn run_agent_bench(
    engine: Arc<LoadedModel>,
    sched: SchedulerConfig,
    cfg: &AgentBenchConfig,
    speculation: &[bool],
) -> Result<AgentBenchReport, Box<dyn std::error::Error + Send + Sync>> {
    let mut runs = Vec::new();
    for &spec in speculation {
        // A fresh daemon per setting, so neither inherits the other's cache.
        let sched = SchedulerConfig {
            speculation: agentd_scheduler::SpecConfig {
                enabled: spec,
                ..sched.speculation
            },
            ..sched.clone()
        };
        let handle = SchedulerHandle::spawn(Box::new(engine.cpu_executor()), sched)?;
        let local = spawn_local(handle, engine.clone())?;
        let client = Client::connect(&local.socket).await?;
        for constrained in [true, false] {
            let mut run = run_mode(&client, cfg, constrained).await;
            run.speculation = spec;
            runs.push(run);
        }
        local.task.abort();
    }
    Ok(AgentBenchReport {
        sessions: cfg.sessions,
        turns: cfg.turns,
        runs,
    })
}
