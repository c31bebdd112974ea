//! `agentd bench engine`: prefill and decode throughput of the forward pass, as JSON.

use agentd_engine::executor::{RowKind, SeqStep};
use agentd_engine::{CpuExecutor, EngineError, Executor, LoadedModel};

type Result<T> = std::result::Result<T, EngineError>;
use serde::Serialize;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct EngineBenchConfig {
    /// Prompt lengths for the prefill measurement.
    pub prefill_sizes: Vec<usize>,
    /// Context lengths at which decode speed is measured.
    pub decode_contexts: Vec<usize>,
    /// Tokens decoded per decode measurement.
    pub decode_tokens: usize,
    /// Prompt tokens per forward call (as in generation).
    pub prefill_chunk: usize,
    /// Batch sizes for the batched decode measurement.
    pub decode_batches: Vec<usize>,
    /// Shared context (in pages shared by the whole batch) for the batched decode measurement.
    pub batch_context: usize,
}

impl Default for EngineBenchConfig {
    fn default() -> Self {
        Self {
            prefill_sizes: vec![128, 512, 2048],
            decode_contexts: vec![0, 512, 2048],
            decode_tokens: 64,
            prefill_chunk: 512,
            decode_batches: vec![1, 8, 32],
            batch_context: 1500,
        }
    }
}

/// One prefill measurement.
#[derive(Debug, Serialize)]
pub struct PrefillResult {
    /// Prompt tokens.
    pub tokens: usize,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Prompt tokens per second.
    pub tokens_per_s: f64,
}

/// One decode measurement.
#[derive(Debug, Serialize)]
pub struct DecodeResult {
    /// Tokens already in the context when decoding starts.
    pub context: usize,
    /// Tokens decoded.
    pub tokens: usize,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
}

/// One batched decode measurement: `batch` sequences sharing `context` tokens of KV pages, each
/// decoding in the same forward step.
#[derive(Debug, Serialize)]
pub struct BatchResult {
    /// Sequences per step.
    pub batch: usize,
    /// Shared context length.
    pub context: usize,
    /// Whether the shared pages were attended once for the whole batch (shared-prefix attention)
    /// or once per sequence.
    pub shared_prefix_attention: bool,
    /// Tokens per second over the same batch without shared-prefix attention, divided into
    /// this run's (1.0 for the runs without it).
    pub speedup_vs_per_sequence: f64,
    /// Tokens per second over batch 1's in the same mode.
    pub speedup_vs_batch1: f64,
    /// Steps run.
    pub steps: usize,
    /// Seconds per step.
    pub seconds_per_step: f64,
    /// Tokens per second over the whole batch.
    pub tokens_per_s: f64,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct EngineBenchReport {
    /// The model file.
    pub model: String,
    /// Worker threads.
    pub threads: usize,
    /// Whether the AVX2 kernels ran.
    pub avx2: bool,
    /// Seconds to load the model.
    pub load_seconds: f64,
    /// Bytes of weights in memory.
    pub weight_bytes: usize,
    /// Size of the GGUF file in bytes.
    pub file_bytes: Option<u64>,
    /// Peak resident memory in MiB (Linux `VmHWM`) right after the model loaded, before any
    /// KV pool was allocated or any benchmark ran.
    pub peak_rss_mib_after_load: Option<f64>,
    /// Bytes of the largest KV pool the benchmark allocated (each measurement allocates its own
    /// pool and frees it before the next one, so at most one is live at a time).
    pub kv_pool_bytes: usize,
    /// How the KV pages store keys and values (`--kv-dtype`).
    pub kv_dtype: String,
    /// Bytes of KV one token takes across all layers.
    pub kv_bytes_per_token: usize,
    /// Tokens one GiB of KV pool holds (`--kv-memory` sizes the pool in bytes).
    pub kv_tokens_per_gib: usize,
    /// Prefill throughput per prompt length.
    pub prefill: Vec<PrefillResult>,
    /// Decode throughput per context length.
    pub decode: Vec<DecodeResult>,
    /// Batched decode throughput per batch size.
    pub batched_decode: Vec<BatchResult>,
    /// Peak resident memory of the process at the end of the benchmark, in MiB (Linux `VmHWM`).
    pub peak_rss_mib: Option<f64>,
}

/// A deterministic stream of real text tokens, `n` long.
fn text_tokens(engine: &LoadedModel, n: usize) -> Result<Vec<u32>> {
    const TEXT: &str =
        "The history of computing is a story of abstractions stacked on abstractions. \
        Early machines were programmed by rewiring panels; later, stored programs made software \
        a thing of its own. Compilers, operating systems and networks followed, each hiding the \
        layer below. fn main() { let v: Vec<u32> = (0..10).collect(); println!(\"{v:?}\"); } ";
    let base = engine.tokenizer.encode(TEXT, false)?;
    Ok(base.iter().copied().cycle().take(n).collect())
}

/// One sequence on its own CPU executor, with pages for `positions` tokens.
struct Single {
    exec: CpuExecutor,
    table: Vec<u32>,
    len: usize,
    /// Bytes of the KV pool allocated for it.
    kv_bytes: usize,
}

impl Single {
    fn new(engine: &LoadedModel, positions: usize) -> Result<Self> {
        let mut exec = engine.cpu_executor();
        let pages = positions.div_ceil(PAGE).max(1);
        exec.allocate(pages, PAGE).map_err(exec_err)?;
        let kv_bytes = pool_bytes(&exec, pages);
        Ok(Self {
            exec,
            table: (0..pages as u32).collect(),
            len: 0,
            kv_bytes,
        })
    }

    /// Runs the next `tokens` (one: a decode row; more: prompt rows); the last one's logits.
    fn run(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let step = SeqStep {
            tokens,
            pos0: self.len,
            page_table: &self.table,
            kind: if tokens.len() == 1 {
                RowKind::Decode
            } else {
                RowKind::Prompt
            },
            logits: 1,
        };
        let out = self.exec.forward(&[step]).map_err(exec_err)?;
        self.len += tokens.len();
        Ok(out.into_iter().next().flatten().unwrap_or_default())
    }
}

const PAGE: usize = 16;

/// Bytes of a KV pool of `pages` pages of [`PAGE`] tokens on `exec`.
fn pool_bytes(exec: &CpuExecutor, pages: usize) -> usize {
    pages * PAGE * exec.kv_bytes_per_token()
}

fn exec_err(e: agentd_engine::ExecError) -> EngineError {
    match e {
        agentd_engine::ExecError::Model(m) => m.into(),
        other => EngineError::InvalidRequest(other.to_string()),
    }
}

fn prefill(engine: &LoadedModel, tokens: &[u32], chunk: usize, extra: usize) -> Result<Single> {
    let mut seq = Single::new(engine, tokens.len() + extra)?;
    for c in tokens.chunks(chunk) {
        seq.run(c)?;
    }
    Ok(seq)
}

/// Runs the measurements.
pub fn run_engine_bench(
    engine: &LoadedModel,
    cfg: &EngineBenchConfig,
) -> Result<EngineBenchReport> {
    // Read before anything is allocated: the model is loaded, nothing else is.
    let peak_rss_mib_after_load = peak_rss_mib();
    let file_bytes = std::fs::metadata(&engine.path).ok().map(|m| m.len());
    let mut kv_pool_bytes = 0;
    let longest = cfg
        .prefill_sizes
        .iter()
        .chain(&cfg.decode_contexts)
        .chain(std::iter::once(&cfg.batch_context))
        .copied()
        .max()
        .unwrap_or(0);
    let ctx = engine.model.config().context_length;
    if longest + cfg.decode_tokens + 1 > ctx {
        return Err(EngineError::InvalidRequest(format!(
            "benchmark needs {} positions, the model's context length is {ctx}",
            longest + cfg.decode_tokens + 1
        )));
    }
    let tokens = text_tokens(engine, longest.max(1) + 1)?;
    // Warm up caches, the thread pool and lazily initialised tables.
    prefill(
        engine,
        &tokens[..32.min(tokens.len())],
        cfg.prefill_chunk,
        0,
    )?;

    let mut prefill_results = Vec::new();
    for &n in &cfg.prefill_sizes {
        let start = Instant::now();
        let seq = prefill(engine, &tokens[..n], cfg.prefill_chunk, 0)?;
        let seconds = start.elapsed().as_secs_f64();
        kv_pool_bytes = kv_pool_bytes.max(seq.kv_bytes);
        drop(seq);
        prefill_results.push(PrefillResult {
            tokens: n,
            seconds,
            tokens_per_s: n as f64 / seconds,
        });
    }
    let mut decode_results = Vec::new();
    for &context in &cfg.decode_contexts {
        let mut seq = prefill(
            engine,
            &tokens[..context.max(1)],
            cfg.prefill_chunk,
            cfg.decode_tokens,
        )?;
        let mut tok = tokens[context.max(1) - 1];
        let start = Instant::now();
        for _ in 0..cfg.decode_tokens {
            let logits = seq.run(&[tok])?;
            tok = argmax(&logits);
        }
        let seconds = start.elapsed().as_secs_f64();
        kv_pool_bytes = kv_pool_bytes.max(seq.kv_bytes);
        decode_results.push(DecodeResult {
            context,
            tokens: cfg.decode_tokens,
            seconds,
            tokens_per_s: cfg.decode_tokens as f64 / seconds,
        });
    }
    // Each batch size with shared-prefix attention off and on, alternated, the best of two
    // rounds each (these machines are noisy).
    let mut batched_decode: Vec<BatchResult> = Vec::new();
    let was = engine.model.shared_prefix_attention();
    for &b in &cfg.decode_batches {
        let mut best: [Option<BatchResult>; 2] = [None, None];
        for _round in 0..2 {
            for (slot, on) in [false, true].into_iter().enumerate() {
                engine.model.set_shared_prefix_attention(on);
                let (mut result, kv_bytes) = batched_decode_bench(engine, &tokens, cfg, b)?;
                result.shared_prefix_attention = on;
                kv_pool_bytes = kv_pool_bytes.max(kv_bytes);
                if best[slot]
                    .as_ref()
                    .is_none_or(|r| r.tokens_per_s < result.tokens_per_s)
                {
                    best[slot] = Some(result);
                }
            }
        }
        let [Some(off), Some(mut on)] = best else {
            continue;
        };
        on.speedup_vs_per_sequence = on.tokens_per_s / off.tokens_per_s;
        batched_decode.push(off);
        batched_decode.push(on);
    }
    engine.model.set_shared_prefix_attention(was);
    for i in 0..batched_decode.len() {
        let mode = batched_decode[i].shared_prefix_attention;
        let base = batched_decode
            .iter()
            .find(|r| r.batch == 1 && r.shared_prefix_attention == mode)
            .map(|r| r.tokens_per_s);
        if let Some(base) = base {
            batched_decode[i].speedup_vs_batch1 = batched_decode[i].tokens_per_s / base;
        }
    }
    Ok(EngineBenchReport {
        model: engine.path.display().to_string(),
        threads: rayon::current_num_threads(),
        avx2: agentd_kernels::cpu::features().avx2,
        load_seconds: engine.load_time.as_secs_f64(),
        weight_bytes: engine.model.weight_bytes(),
        file_bytes,
        peak_rss_mib_after_load,
        kv_pool_bytes,
        kv_dtype: engine.model.kv_dtype().name().into(),
        kv_bytes_per_token: engine.cpu_executor().kv_bytes_per_token(),
        kv_tokens_per_gib: (1usize << 30) / engine.cpu_executor().kv_bytes_per_token(),
        prefill: prefill_results,
        decode: decode_results,
        batched_decode,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// `batch` sequences over one shared prefix of `cfg.batch_context` tokens (full pages shared, the
/// partial last page copied per sequence), decoding `cfg.decode_tokens` steps together. Also
/// returns the bytes of the KV pool it allocated.
fn batched_decode_bench(
    engine: &LoadedModel,
    tokens: &[u32],
    cfg: &EngineBenchConfig,
    batch: usize,
) -> Result<(BatchResult, usize)> {
    let ps = PAGE;
    let ctx = cfg.batch_context.clamp(1, tokens.len());
    let steps = cfg.decode_tokens;
    let shared_pages = ctx.div_ceil(ps);
    let own_pages = (ctx % ps + steps).div_ceil(ps) + 1;
    let mut kv = engine.cpu_executor();
    let pages = shared_pages + batch * own_pages;
    kv.allocate(pages, ps).map_err(exec_err)?;
    let kv_bytes = pool_bytes(&kv, pages);
    let shared: Vec<u32> = (0..shared_pages as u32).collect();
    for (k, chunk) in tokens[..ctx].chunks(cfg.prefill_chunk).enumerate() {
        let step = SeqStep {
            tokens: chunk,
            pos0: k * cfg.prefill_chunk,
            page_table: &shared,
            kind: RowKind::Prompt,
            logits: 0,
        };
        kv.forward(&[step]).map_err(exec_err)?;
    }
    let full = ctx / ps;
    let mut tables: Vec<Vec<u32>> = Vec::with_capacity(batch);
    for b in 0..batch {
        let first = (shared_pages + b * own_pages) as u32;
        let own: Vec<u32> = (first..first + own_pages as u32).collect();
        if !ctx.is_multiple_of(ps) {
            kv.copy_page(shared[full], own[0], ctx % ps)
                .map_err(exec_err)?;
        }
        tables.push(shared[..full].iter().chain(&own).copied().collect());
    }
    let mut next: Vec<u32> = vec![tokens[ctx - 1]; batch];
    let start = Instant::now();
    for i in 0..steps {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let seqs: Vec<SeqStep<'_>> = toks
            .iter()
            .zip(&tables)
            .map(|(t, table)| SeqStep {
                tokens: t,
                pos0: ctx + i,
                page_table: table,
                kind: RowKind::Decode,
                logits: 1,
            })
            .collect();
        let out = kv.forward(&seqs).map_err(exec_err)?;
        next = out
            .iter()
            .map(|l| argmax(l.as_deref().unwrap_or(&[0.0])))
            .collect();
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok((
        BatchResult {
            batch,
            context: ctx,
            shared_prefix_attention: engine.model.shared_prefix_attention(),
            speedup_vs_per_sequence: 1.0,
            speedup_vs_batch1: 0.0,
            steps,
            seconds_per_step: seconds / steps as f64,
            tokens_per_s: (batch * steps) as f64 / seconds,
        },
        kv_bytes,
    ))
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

/// Peak resident set size of this process in MiB, from `/proc/self/status` (Linux only).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
