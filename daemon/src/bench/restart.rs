//! `agentd bench restart`: how warm the first request on a persisted prefix is after a restart.
//!
//! For each prefix length: a cold request computes the prefix (its TTFT is the cold recompute),
//! the prefix is registered (pinned, so written through to disk) and flushed, the scheduler is
//! dropped and a new one opened on the same directory (a restart: the tree and the KV pool start
//! empty, only the disk remains), and the same request runs again. The OS page cache may still
//! hold the blob, so the load is from memory-speed storage; the report says how many bytes it
//! read and how fast.

use agentd_engine::sampling::SamplingParams;
use agentd_engine::{GenerateOptions, LoadedModel};
use agentd_scheduler::{
    DiskTierConfig, Event, SchedError, SchedulerConfig, SchedulerHandle, Usage,
};
use agentd_store::StoreConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One prefix length's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestartRun {
    /// Tokens in the prefix.
    pub prefix_tokens: usize,
    /// TTFT of the request computing the prefix from nothing.
    pub cold_ttft_s: f64,
    /// TTFT of the same request as the first one after a restart.
    pub restart_ttft_s: f64,
    /// `restart_ttft_s / cold_ttft_s`.
    pub ttft_ratio: f64,
    /// Prompt tokens the first request after the restart served from the cache.
    pub restart_cached_tokens: usize,
    /// Opening the store and the KV pool on restart (the model is already loaded).
    pub reopen_s: f64,
    /// Bytes of blobs on disk for the prefix.
    pub disk_bytes: u64,
    /// `disk_bytes / prefix_tokens`.
    pub disk_bytes_per_token: f64,
    /// Bytes read back from disk, and how fast (read, checksum, copy into the pool).
    pub loaded_bytes: u64,
    /// MiB/s of that.
    pub load_mib_per_s: f64,
}

/// The report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestartReport {
    /// One entry per prefix length.
    pub runs: Vec<RestartRun>,
}

async fn first_token(
    h: &SchedulerHandle,
    model: &LoadedModel,
    tokens: Vec<u32>,
) -> Result<Usage, Box<dyn std::error::Error + Send + Sync>> {
    let sid = h.create_session(1, None, tokens).await?;
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: 1,
        ..Default::default()
    };
    let mut rx = h.generate(1, sid, model.decoding(&opts)?).await?;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Done(u) => {
                h.close(1, sid).await?;
                return Ok(u);
            }
            Event::Error(e) => return Err(e.into()),
            Event::Token { .. } => {}
        }
    }
    Err(SchedError::Shutdown.into())
}

fn spawn_retrying(
    engine: &LoadedModel,
    cfg: &SchedulerConfig,
) -> Result<SchedulerHandle, SchedError> {
    let start = Instant::now();
    loop {
        match SchedulerHandle::spawn(Box::new(engine.cpu_executor()), cfg.clone()) {
            Ok(h) => return Ok(h),
            // The previous scheduler's thread may still hold the store for a moment.
            Err(_) if start.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the benchmark for each length in `prefix_lengths` with `sched` (its store is replaced
/// by a temporary one).
pub async fn run_restart_bench(
    engine: Arc<LoadedModel>,
    sched: SchedulerConfig,
    prefix_lengths: &[usize],
) -> Result<RestartReport, Box<dyn std::error::Error + Send + Sync>> {
    let mut runs = Vec::new();
    let text = "The daemon keeps a radix tree of KV-cache prefixes so that agent sessions sharing a system prompt pay for its prefill once. ";
    let unit = engine.tokenizer.encode(text, false)?;
    let question = engine.tokenizer.encode(
        "<|im_start|>user\nSummarise the rules.<|im_end|>\n<|im_start|>assistant\n",
        true,
    )?;
    let digests = engine.digests()?;
    for &n in prefix_lengths {
        let dir = tempfile::tempdir()?;
        let cfg = SchedulerConfig {
            store: Some(DiskTierConfig {
                store: StoreConfig {
                    dir: dir.path().to_owned(),
                    budget: u64::MAX,
                },
                digests: digests.clone(),
            }),
            ..sched.clone()
        };
        let prefix: Vec<u32> = unit.iter().copied().cycle().take(n).collect();
        let mut prompt = prefix.clone();
        prompt.extend(&question);
        let h = spawn_retrying(&engine, &cfg)?;
        let cold = first_token(&h, &engine, prompt.clone()).await?;
        h.register_prefix(1, prefix.clone(), false).await?;
        h.flush().await?;
        let disk_bytes = h.stats().await?.disk.map_or(0, |d| d.bytes);
        drop(h);
        let t0 = Instant::now();
        let h = spawn_retrying(&engine, &cfg)?;
        let reopen_s = t0.elapsed().as_secs_f64();
        let warm = first_token(&h, &engine, prompt).await?;
        let disk = h.stats().await?.disk.unwrap_or_default();
        drop(h);
        runs.push(RestartRun {
            prefix_tokens: n,
            cold_ttft_s: cold.ttft.as_secs_f64(),
            restart_ttft_s: warm.ttft.as_secs_f64(),
            ttft_ratio: warm.ttft.as_secs_f64() / cold.ttft.as_secs_f64(),
            restart_cached_tokens: warm.cached_tokens,
            reopen_s,
            disk_bytes,
            disk_bytes_per_token: disk_bytes as f64 / n as f64,
            loaded_bytes: disk.loaded_bytes,
            load_mib_per_s: disk.loaded_bytes as f64
                / (1 << 20) as f64
                / disk.load_seconds.max(1e-9),
        });
    }
    Ok(RestartReport { runs })
}
