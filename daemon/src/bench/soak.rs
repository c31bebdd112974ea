//! `agentd bench soak`: many sessions in multi-turn loops for minutes, watching for errors,
//! turn latency and the daemon's memory over time.
//!
//! The daemon is a child `agentd serve` (see [`super::child`]), so the resident memory read each
//! minute is the daemon's alone. One system prompt is registered as a prefix; each of
//! `sessions` workers has its own connection and runs conversations back to back: a session on
//! the prefix, then turns of (append a user message, generate a short sampled reply — the reply
//! stays in the session's log, so the next append continues after it), between 2 and 12 turns,
//! then close and start over. Now and then (1 turn in 10 after the first) a worker forks its
//! session, runs one turn on the fork and closes it, so forks share and copy pages.
//!
//! Every failed call, a stream that ends without usage, and a finish other than end of turn,
//! stop or `max_tokens` counts as an error; the worker then closes its session and starts a new
//! conversation. The report gives, per minute: turns completed, tokens generated, errors, the
//! median and 99th percentile turn latency (append + generate, at the client) and the daemon's
//! RSS at the minute's end; and the RSS change from the end of the warm-up (two minutes by
//! default) to the end, the aim being zero errors and RSS flat within 5%.

use super::child::{mib, percentile, ChildConfig, ChildDaemon};
use agentd_wire::proto::{self, agentd_client::AgentdClient, generate_event};
use agentd_wire::sampling_defaults;
use anyhow::{anyhow, bail, Context, Result};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Client = AgentdClient<Channel>;

/// Turns per conversation, drawn uniformly from this range: long enough for the cache to matter,
/// short enough that a conversation stays far inside the context.
const TURNS: std::ops::RangeInclusive<usize> = 2..=12;
/// Chance that a turn after the first is preceded by a fork that runs one turn and is closed.
const FORK_CHANCE: f64 = 0.1;
/// Error messages kept in the report.
const FIRST_ERRORS: usize = 5;

/// The shared system prompt (about 200 tokens).
const SYSTEM_PROMPT: &str = "You are Quill, the support assistant of a small bookshop that \
    sells new and second-hand books online and in its shop on Harbour Street. Answer in one or \
    two short sentences, in plain English, without lists or headings. You can look up orders, \
    stock, opening hours and delivery times, but you cannot take payments or change an order \
    that has already shipped: in those cases, say so and give the shop's telephone number, \
    01632 960 123. The shop opens from nine to six on weekdays and from ten to four on \
    Saturdays; it is closed on Sundays and public holidays. Delivery within the country takes \
    two to four working days and is free above thirty pounds; abroad it takes one to two weeks. \
    Returns are accepted within thirty days if the book is in the condition it was sold in. \
    Second-hand books are graded as fine, very good, good or fair, and the grade is written on \
    each book's page. Never invent an order number, a price or a title that the customer has \
    not given you; ask for it instead. Be friendly, and keep it brief.";

/// The user turns, drawn at random.
const QUESTIONS: &[&str] = &[
    "Hello! Are you open on Saturday afternoon?",
    "How long does delivery to Spain take?",
    "Can I return a book I bought two weeks ago?",
    "What does the grade 'very good' mean for a used book?",
    "My order has not arrived yet. What should I do?",
    "Do you have any books by Ursula K. Le Guin in stock?",
    "Can I change the address on an order that has shipped?",
    "Is delivery free if I spend forty pounds?",
    "What is your phone number?",
    "Could you recommend a short novel for a train journey?",
    "Do you buy second-hand books from customers?",
    "Thanks, that helps. One more question: are you open on Easter Monday?",
    "Can I pay by bank transfer?",
    "How do I know what condition a used book is in?",
    "I would like a gift for a ten-year-old who likes dragons.",
    "Thank you, goodbye!",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Concurrent sessions (workers, one connection each).
    pub sessions: usize,
    /// How long to run, minutes (fractions allowed).
    pub minutes: f64,
    /// The RSS baseline is taken this long after the start, minutes.
    pub warmup_minutes: f64,
    /// Most tokens per reply.
    pub max_tokens: u32,
    /// Seeds the workers' choices and each reply's sampling.
    pub seed: u64,
    /// The child daemon.
    pub daemon: ChildConfig,
}

/// One minute of the run (the last may be shorter).
#[derive(Debug, Serialize)]
pub struct MinuteFigure {
    /// 1-based.
    pub minute: usize,
    /// Its length, seconds (60 but for a shorter last one).
    pub seconds: f64,
    /// Turns completed in it.
    pub turns: usize,
    /// Tokens generated by those turns.
    pub tokens: u64,
    /// Errors in it.
    pub errors: usize,
    /// Median turn latency (append + generate), milliseconds.
    pub turn_p50_ms: f64,
    /// 99th percentile turn latency, milliseconds.
    pub turn_p99_ms: f64,
    /// The daemon's resident memory at the minute's end, MiB.
    pub rss_mib: f64,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct SoakSummary {
    /// Turns completed.
    pub turns: usize,
    /// Conversations started (sessions created on the prefix).
    pub conversations: u64,
    /// Forks made.
    pub forks: u64,
    /// Median turn latency over the run, milliseconds.
    pub turn_p50_ms: f64,
    /// 99th percentile turn latency over the run, milliseconds.
    pub turn_p99_ms: f64,
    /// RSS once the model was loaded and the prefix registered, before the first turn, MiB.
    pub rss_start_mib: f64,
    /// RSS at the end of the warm-up, MiB (absent when the run is not longer than it).
    pub rss_warmup_mib: Option<f64>,
    /// RSS at the end, MiB.
    pub rss_end_mib: f64,
    /// Highest RSS seen (sampled every second), MiB.
    pub rss_peak_mib: f64,
    /// `(end - warm-up) / warm-up`, percent.
    pub rss_change_after_warmup_pct: Option<f64>,
    /// Highest RSS after the warm-up relative to the warm-up's, percent.
    pub rss_max_above_warmup_pct: Option<f64>,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Minutes run.
    pub minutes: f64,
    /// Warm-up before the RSS baseline, minutes.
    pub warmup_minutes: f64,
    /// Most tokens per reply.
    pub max_tokens: u32,
    /// The seed.
    pub seed: u64,
    /// Errors over the run.
    pub errors: usize,
    /// The first few error messages.
    pub first_errors: Vec<String>,
    /// Minute by minute.
    pub per_minute: Vec<MinuteFigure>,
    /// Over the run.
    pub summary: SoakSummary,
}

/// A completed turn.
struct Turn {
    /// When it finished, seconds since the start.
    at: f64,
    latency_ms: f64,
    tokens: u32,
}

/// What the workers record.
#[derive(Default)]
struct Log {
    turns: Vec<Turn>,
    /// (seconds since the start, message)
    errors: Vec<(f64, String)>,
    conversations: u64,
    forks: u64,
}

/// The workers' shared state: the clock and the log.
struct Shared {
    start: Instant,
    end: Instant,
    max_tokens: u32,
    prefix_id: u64,
    log: Mutex<Log>,
}

impl Shared {
    fn since_start(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().expect("the log is never poisoned")
    }

    fn error(&self, e: &anyhow::Error) {
        let at = self.since_start();
        self.log().errors.push((at, format!("{e:#}")));
    }
}

/// Runs the benchmark.
pub async fn run_soak_bench(cfg: &SoakConfig) -> Result<SoakReport> {
    anyhow::ensure!(cfg.sessions > 0, "--sessions must be at least 1");
    anyhow::ensure!(
        cfg.minutes > 0.0 && cfg.minutes.is_finite(),
        "--minutes must be positive"
    );
    anyhow::ensure!(cfg.max_tokens > 0, "--max-tokens must be at least 1");
    let daemon = ChildDaemon::start(&cfg.daemon).await?;
    let mut c = daemon.client().await?;
    let prefix_id = c
        .register_prefix(proto::RegisterPrefixRequest {
            messages: vec![proto::Message {
                role: "system".into(),
                content: SYSTEM_PROMPT.into(),
            }],
            ..Default::default()
        })
        .await
        .context("registering the system prompt")?
        .into_inner()
        .prefix_id;
    let mut clients = Vec::with_capacity(cfg.sessions);
    for _ in 0..cfg.sessions {
        clients.push(daemon.client().await?);
    }
    let rss_start = daemon.rss()?;

    let total = Duration::from_secs_f64(cfg.minutes * 60.0);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        start,
        end: start + total,
        max_tokens: cfg.max_tokens,
        prefix_id,
        log: Mutex::new(Log::default()),
    });
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(i as u64));
            tokio::spawn(worker(client, rng, shared.clone()))
        })
        .collect();

    // RSS every second (for the peak), kept at each minute's end, the warm-up's end and the end.
    let warmup = Duration::from_secs_f64(cfg.warmup_minutes.max(0.0) * 60.0);
    let (mut minute_rss, mut rss_peak) = (Vec::new(), rss_start);
    // The baseline and the highest figure since.
    let mut rss_warmup: Option<(u64, u64)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let rss_end = loop {
        tick.tick().await;
        let now = start.elapsed();
        let rss = daemon.rss()?;
        rss_peak = rss_peak.max(rss);
        match rss_warmup.as_mut() {
            Some((_, max)) => *max = (*max).max(rss),
            None if warmup < total && now >= warmup => rss_warmup = Some((rss, rss)),
            None => {}
        }
        if now >= total {
            minute_rss.push(rss);
            break rss;
        }
        if now.as_secs() / 60 > minute_rss.len() as u64 {
            minute_rss.push(rss);
        }
    };
    // Workers finish the turn they are in (bounded by `max_tokens`); turns ending after the
    // end are not counted.
    for w in workers {
        tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .context("a worker did not stop within two minutes of the end")??;
    }
    drop(daemon);

    let log = std::mem::take(&mut *shared.log());
    let secs = total.as_secs_f64();
    let minutes = minute_rss.len();
    let mut per_minute: Vec<MinuteFigure> = (0..minutes)
        .map(|m| MinuteFigure {
            minute: m + 1,
            seconds: (secs - 60.0 * m as f64).min(60.0),
            turns: 0,
            tokens: 0,
            errors: 0,
            turn_p50_ms: 0.0,
            turn_p99_ms: 0.0,
            rss_mib: mib(minute_rss[m]),
        })
        .collect();
    let bucket = |at: f64| ((at / 60.0) as usize).min(minutes - 1);
    let mut latencies = vec![Vec::new(); minutes];
    let mut all = Vec::new();
    for t in log.turns.iter().filter(|t| t.at <= secs) {
        let b = bucket(t.at);
        per_minute[b].turns += 1;
        per_minute[b].tokens += u64::from(t.tokens);
        latencies[b].push(t.latency_ms);
        all.push(t.latency_ms);
    }
    for (m, lat) in per_minute.iter_mut().zip(&mut latencies) {
        m.turn_p50_ms = percentile(lat, 0.5);
        m.turn_p99_ms = percentile(lat, 0.99);
    }
    for (at, _) in &log.errors {
        per_minute[bucket(*at)].errors += 1;
    }
    let pct = |a: u64, base: u64| (a as f64 - base as f64) / base as f64 * 100.0;
    let summary = SoakSummary {
        turns: all.len(),
        conversations: log.conversations,
        forks: log.forks,
        turn_p50_ms: percentile(&mut all, 0.5),
        turn_p99_ms: percentile(&mut all, 0.99),
        rss_start_mib: mib(rss_start),
        rss_warmup_mib: rss_warmup.map(|(w, _)| mib(w)),
        rss_end_mib: mib(rss_end),
        rss_peak_mib: mib(rss_peak),
        rss_change_after_warmup_pct: rss_warmup.map(|(w, _)| pct(rss_end, w)),
        rss_max_above_warmup_pct: rss_warmup.map(|(w, max)| pct(max, w)),
    };
    Ok(SoakReport {
        sessions: cfg.sessions,
        minutes: cfg.minutes,
        warmup_minutes: cfg.warmup_minutes,
        max_tokens: cfg.max_tokens,
        seed: cfg.seed,
        errors: log.errors.len(),
        first_errors: log
            .errors
            .iter()
            .take(FIRST_ERRORS)
            .map(|(_, m)| m.clone())
            .collect(),
        per_minute,
        summary,
    })
}

/// One worker: conversations back to back until the end; an error is logged, then a new
/// conversation starts.
async fn worker(mut c: Client, mut rng: ChaCha8Rng, shared: Arc<Shared>) {
    while Instant::now() < shared.end {
        if let Err(e) = conversation(&mut c, &mut rng, &shared).await {
            shared.error(&e);
            // Do not spin on a daemon that fails every call.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A session on the prefix, its turns (with the odd fork), then close. The session is closed
/// even when a turn fails.
async fn conversation(c: &mut Client, rng: &mut ChaCha8Rng, shared: &Shared) -> Result<()> {
    let id = c
        .create_session(proto::CreateSessionRequest {
            prefix_id: shared.prefix_id,
            tokens: Vec::new(),
        })
        .await
        .context("CreateSession")?
        .into_inner()
        .session_id;
    shared.log().conversations += 1;
    let turns = rng.random_range(TURNS);
    let mut result = Ok(());
    for t in 0..turns {
        if Instant::now() >= shared.end {
            break;
        }
        if t > 0 && rng.random_bool(FORK_CHANCE) {
            result = fork_turn(c, id, rng, shared).await;
            if result.is_err() {
                break;
            }
        }
        result = turn(c, id, rng, shared).await;
        if result.is_err() {
            break;
        }
    }
    let closed = close(c, id).await;
    result.and(closed)
}

/// Forks `id`, runs one turn on the fork and closes it.
async fn fork_turn(c: &mut Client, id: u64, rng: &mut ChaCha8Rng, shared: &Shared) -> Result<()> {
    let fork = c
        .fork_session(proto::SessionRef { session_id: id })
        .await
        .context("ForkSession")?
        .into_inner()
        .session_id;
    shared.log().forks += 1;
    let result = turn(c, fork, rng, shared).await;
    let closed = close(c, fork).await;
    result.and(closed)
}

async fn close(c: &mut Client, id: u64) -> Result<()> {
    c.close_session(proto::SessionRef { session_id: id })
        .await
        .context("CloseSession")?;
    Ok(())
}

/// Appends a user message, generates a reply and records the turn.
async fn turn(c: &mut Client, id: u64, rng: &mut ChaCha8Rng, shared: &Shared) -> Result<()> {
    let question = QUESTIONS.choose(rng).expect("QUESTIONS is not empty");
    let seed = rng.random::<u64>();
    let began = Instant::now();
    c.append(proto::AppendRequest {
        session_id: id,
        tokens: Vec::new(),
        messages: vec![proto::Message {
            role: "user".into(),
            content: (*question).into(),
        }],
        add_generation_prompt: true,
    })
    .await
    .context("Append")?;
    let mut stream = c
        .generate(proto::GenerateRequest {
            session_id: id,
            max_tokens: shared.max_tokens,
            sampling: Some(proto::Sampling {
                seed: Some(seed),
                ..sampling_defaults::wire()
            }),
            ..Default::default()
        })
        .await
        .context("Generate")?
        .into_inner();
    let mut usage = None;
    while let Some(ev) = stream.next().await {
        if let Some(generate_event::Event::Done(u)) = ev.context("Generate stream")?.event {
            usage = Some(u);
        }
    }
    let usage = usage.ok_or_else(|| anyhow!("Generate: the stream ended without usage"))?;
    match usage.finish_reason.as_str() {
        "eos" | "stop" | "max_tokens" => {}
        other => bail!("Generate: finished with {other:?}"),
    }
    let turn = Turn {
        at: shared.since_start(),
        latency_ms: began.elapsed().as_secs_f64() * 1e3,
        tokens: usage.generated_tokens,
    };
    shared.log().turns.push(turn);
    Ok(())
}
