//! `agentd bench memory`: does the daemon give memory back after large requests?
//!
//! A child `agentd serve` (see [`super::child`]) gets, after one small warm-up turn, a battery
//! of large requests, each RPC `requests` times in a row:
//!
//! - `register`: RegisterPrefix with one system message of `bytes` of text. The daemon renders
//!   and tokenizes it, then refuses it as longer than the context (OUT_OF_RANGE): the large
//!   allocations happen, the model never runs over it.
//! - `append`: Append of one user message of `bytes` of text to a fresh session (rendered as a
//!   first turn and as a continuation, then refused for the same reason).
//! - `tokenize`: Tokenize of the largest text it accepts (1 MiB), answered with its tokens.
//! - `create`: CreateSession with a token list of about `bytes` on the wire (refused).
//!
//! The report gives the daemon's RSS before, after each RPC's batch, at the peak (sampled every
//! 10 ms) and `idle_seconds` after the last request, and how much of the rise was given back.
//! It is a subcommand of its own rather than a mode of `soak`: a few large requests and an idle
//! wait have nothing in common with a long steady load but the child daemon, which both share.

use super::child::{mib, ChildConfig, ChildDaemon};
use agentd_wire::proto::{self, agentd_client::AgentdClient, generate_event};
use anyhow::{bail, Context, Result};
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

type Client = AgentdClient<Channel>;

/// The daemon's limit on a Tokenize request's text.
const TOKENIZE_LIMIT: usize = 1 << 20;

/// The large requests, by RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LargeRpc {
    /// RegisterPrefix with one long system message.
    Register,
    /// Append of one long user message.
    Append,
    /// Tokenize of the longest text accepted.
    Tokenize,
    /// CreateSession with a long token list.
    Create,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct MemoryBenchConfig {
    /// Requests of each RPC.
    pub requests: usize,
    /// Bytes of text (or of tokens on the wire) per request.
    pub bytes: usize,
    /// The RPCs, in order.
    pub rpcs: Vec<LargeRpc>,
    /// Seconds to wait after the last request before the final reading.
    pub idle_seconds: f64,
    /// The child daemon.
    pub daemon: ChildConfig,
}

/// One RPC's batch.
#[derive(Debug, Serialize)]
pub struct Phase {
    /// The RPC.
    pub rpc: LargeRpc,
    /// Requests sent.
    pub requests: usize,
    /// Bytes of text or tokens in each.
    pub bytes: usize,
    /// Answered with OK.
    pub ok: usize,
    /// The first refusal's status code and message (trimmed), if any.
    pub refused_with: Option<String>,
    /// Seconds for the batch.
    pub seconds: f64,
    /// RSS right after it, MiB.
    pub rss_after_mib: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct MemoryBenchReport {
    /// RSS after the warm-up turn, before the first large request, MiB.
    pub rss_before_mib: f64,
    /// Each RPC's batch.
    pub phases: Vec<Phase>,
    /// Highest RSS seen, MiB.
    pub rss_peak_mib: f64,
    /// RSS right after the last request, MiB.
    pub rss_after_mib: f64,
    /// Seconds waited with no requests.
    pub idle_seconds: f64,
    /// RSS after that wait, MiB.
    pub rss_idle_mib: f64,
    /// `rss_idle - rss_before`, MiB: what the battery left resident.
    pub retained_mib: f64,
    /// `(peak - idle) / (peak - before)`, percent: how much of the rise was given back.
    pub returned_pct: f64,
}

/// Runs the benchmark.
pub async fn run_memory_bench(cfg: &MemoryBenchConfig) -> Result<MemoryBenchReport> {
    let daemon = Arc::new(ChildDaemon::start(&cfg.daemon).await?);
    let mut c = daemon.client().await?;
    warm_up(&mut c).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = daemon.rss()?;

    // The peak, sampled on its own task while the requests run.
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (daemon, peak, stop) = (daemon.clone(), peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(rss) = daemon.rss() {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let text = filler_text(cfg.bytes);
    let mut phases = Vec::new();
    for &rpc in &cfg.rpcs {
        let bytes = match rpc {
            LargeRpc::Tokenize => cfg.bytes.min(TOKENIZE_LIMIT),
            _ => cfg.bytes,
        };
        let started = Instant::now();
        let (mut ok, mut refused_with) = (0, None);
        for _ in 0..cfg.requests {
            match send(&mut c, rpc, &text[..bytes]).await? {
                Ok(()) => ok += 1,
                Err(status) => {
                    refused_with.get_or_insert_with(|| {
                        let msg: String = status.message().chars().take(160).collect();
                        format!("{:?}: {msg}", status.code())
                    });
                }
            }
        }
        phases.push(Phase {
            rpc,
            requests: cfg.requests,
            bytes,
            ok,
            refused_with,
            seconds: started.elapsed().as_secs_f64(),
            rss_after_mib: mib(daemon.rss()?),
        });
    }
    let after = daemon.rss()?;
    tokio::time::sleep(Duration::from_secs_f64(cfg.idle_seconds.max(0.0))).await;
    let idle = daemon.rss()?;
    stop.store(true, Ordering::Relaxed);
    sampler.await?;
    let peak = peak.load(Ordering::Relaxed).max(after).max(idle);
    let rise = peak.saturating_sub(before);
    Ok(MemoryBenchReport {
        rss_before_mib: mib(before),
        phases,
        rss_peak_mib: mib(peak),
        rss_after_mib: mib(after),
        idle_seconds: cfg.idle_seconds,
        rss_idle_mib: mib(idle),
        retained_mib: mib(idle) - mib(before),
        returned_pct: if rise == 0 {
            100.0
        } else {
            peak.saturating_sub(idle) as f64 / rise as f64 * 100.0
        },
    })
}

/// One small turn, so the baseline is a daemon that has served a request.
async fn warm_up(c: &mut Client) -> Result<()> {
    let id = c
        .create_session(proto::CreateSessionRequest::default())
        .await?
        .into_inner()
        .session_id;
    c.append(proto::AppendRequest {
        session_id: id,
        messages: vec![proto::Message {
            role: "user".into(),
            content: "Say hello.".into(),
        }],
        add_generation_prompt: true,
        ..Default::default()
    })
    .await?;
    let mut stream = c
        .generate(proto::GenerateRequest {
            session_id: id,
            max_tokens: 8,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut done = false;
    while let Some(ev) = stream.next().await {
        done |= matches!(ev?.event, Some(generate_event::Event::Done(_)));
    }
    if !done {
        bail!("the warm-up turn ended without usage");
    }
    c.close_session(proto::SessionRef { session_id: id })
        .await?;
    Ok(())
}

/// Sends one large request; the daemon's refusal is a result, a broken connection an error.
async fn send(
    c: &mut Client,
    rpc: LargeRpc,
    text: &str,
) -> Result<std::result::Result<(), tonic::Status>> {
    let message = |role: &str| proto::Message {
        role: role.into(),
        content: text.into(),
    };
    let answer = match rpc {
        LargeRpc::Register => c
            .register_prefix(proto::RegisterPrefixRequest {
                messages: vec![message("system")],
                ..Default::default()
            })
            .await
            .map(drop),
        LargeRpc::Append => {
            let id = c
                .create_session(proto::CreateSessionRequest::default())
                .await
                .context("CreateSession for the append")?
                .into_inner()
                .session_id;
            let r = c
                .append(proto::AppendRequest {
                    session_id: id,
                    messages: vec![message("user")],
                    add_generation_prompt: true,
                    ..Default::default()
                })
                .await
                .map(drop);
            c.close_session(proto::SessionRef { session_id: id })
                .await
                .context("CloseSession after the append")?;
            r
        }
        LargeRpc::Tokenize => c
            .tokenize(proto::TokenizeRequest {
                text: text.into(),
                parse_special: false,
            })
            .await
            .map(drop),
        LargeRpc::Create => c
            .create_session(proto::CreateSessionRequest {
                prefix_id: 0,
                tokens: wire_tokens(text.len()),
            })
            .await
            .map(drop),
    };
    match answer {
        Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
            Err(s).context("the daemon stopped answering")
        }
        other => Ok(other),
    }
}

/// About `bytes` of English-like text: words drawn (with a fixed seed) from a small list, so
/// it tokenizes like prose, one or two tokens a word.
fn filler_text(bytes: usize) -> String {
    const WORDS: &str = "the daemon keeps a radix tree of cached prefixes so agent sessions \
        share them and every request is scheduled in batches while memory pages are copied on \
        write when two tenants fork one conversation into many branches with tools grammar \
        tokens model weights disk tier restart fast";
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut s = String::with_capacity(bytes + 16);
    // A full stop after every 17th word.
    for sep in std::iter::repeat_n(" ", 16).chain([". "]).cycle() {
        if s.len() >= bytes {
            break;
        }
        s.push_str(words.choose(&mut rng).expect("WORDS is not empty"));
        s.push_str(sep);
    }
    s.truncate(bytes);
    s
}

/// A token list that takes about `bytes` on the wire (ids below 16,384 take two bytes each).
fn wire_tokens(bytes: usize) -> Vec<u32> {
    (0..bytes / 2).map(|i| 200 + (i % 16_000) as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_text_has_the_size_asked_for_and_is_ascii() {
        let t = filler_text(100_000);
        assert_eq!(t.len(), 100_000);
        assert!(t.is_ascii());
        assert_eq!(t, filler_text(100_000));
    }
}
