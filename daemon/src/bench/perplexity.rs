//! `agentd bench perplexity --file TEXT`: the model's perplexity on a text, computed as
//! llama.cpp's `llama-perplexity` does, so the two can be compared on the same file.
//!
//! The text is tokenised once (BOS first if the model asks for one; control tokens written in
//! the text stay text) and cut into `context`-token chunks (at least two are needed; the tail
//! that does not fill a chunk is dropped). Each chunk runs from position 0 on a fresh cache, its
//! first token replaced by BOS if the model adds one; only the second half is scored: the logits
//! at positions `context/2 … context-2` predict the tokens after them, `context - 1 - context/2`
//! per chunk. Perplexity is exp(mean negative log-likelihood) over all scored tokens.

use agentd_engine::model::{KvPages, RowKind, SeqStep};
use agentd_engine::tokenizer::EncodeOptions;
use agentd_engine::LoadedModel;
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Tokens per forward call within a chunk (llama.cpp's default `--batch-size` is 2048, its
/// micro-batch 512; a chunk's scores do not depend on it).
const BATCH: usize = 512;
const PAGE: usize = 16;

/// What to measure.
#[derive(Debug, Clone)]
pub struct PerplexityConfig {
    /// Tokens per chunk (llama.cpp's `--ctx-size`, 512 by default there too).
    pub context: usize,
    /// Score at most this many chunks (llama.cpp's `--chunks`); `None`: every full chunk.
    pub max_chunks: Option<usize>,
}

/// The result, printed as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// The model file.
    pub model: String,
    /// Bytes of the text file.
    pub file_bytes: u64,
    /// Tokens per chunk.
    pub context: usize,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens whose likelihood was scored (`chunks × (context − 1 − context/2)`).
    pub tokens_scored: usize,
    /// exp(mean negative log-likelihood).
    pub perplexity: f64,
    /// Wall time of the forward passes and scoring (not loading or tokenising).
    pub seconds: f64,
    /// Tokens run through the model per second (`chunks × context / seconds`).
    pub tokens_per_s: f64,
}

/// −log softmax(`logits`)[`target`], accumulated in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    sum.ln() + max - logits[target as usize] as f64
}

/// The chunks llama-perplexity evaluates: `(chunk count, tokens scored per chunk)` for
/// `n_tokens` tokens, or an error when there are fewer than two chunks' worth.
pub fn chunking(n_tokens: usize, cfg: &PerplexityConfig) -> Result<(usize, usize)> {
    let ctx = cfg.context;
    ensure!(ctx >= 4, "--context must be at least 4 tokens, got {ctx}");
    ensure!(
        n_tokens >= 2 * ctx,
        "the text tokenizes to {n_tokens} tokens; a context of {ctx} needs at least {} \
         (as llama-perplexity: two chunks)",
        2 * ctx
    );
    let max = n_tokens / ctx;
    let chunks = cfg.max_chunks.map_or(max, |m| m.min(max));
    ensure!(chunks > 0, "--max-chunks must be at least 1");
    Ok((chunks, ctx - 1 - ctx / 2))
}

/// Measures `engine`'s perplexity on the text in `file`.
pub fn run_perplexity_bench(
    engine: &LoadedModel,
    file: &Path,
    cfg: &PerplexityConfig,
) -> Result<PerplexityReport> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let tokens = engine.tokenizer.encode_with(
        &text,
        EncodeOptions {
            parse_special: false,
            add_bos: true,
        },
    )?;
    let model = &engine.model;
    let c = model.config();
    ensure!(
        cfg.context <= c.context_length,
        "--context {} is longer than the model's context of {} tokens",
        cfg.context,
        c.context_length
    );
    let (chunks, per_chunk) = chunking(tokens.len(), cfg)?;
    let bos = engine
        .tokenizer
        .bos_token_id()
        .filter(|_| engine.tokenizer.add_bos_token());
    let ctx = cfg.context;
    let first = ctx / 2;
    let pages = ctx.div_ceil(PAGE);
    // One pool reused by every chunk: each starts again at position 0, and attention reads only
    // the positions written before it, so this is a fresh cache each time.
    let mut kv = KvPages::new(c, pages, PAGE);
    let table: Vec<u32> = (0..pages as u32).collect();
    let start = Instant::now();
    let mut total = 0f64;
    for i in 0..chunks {
        let orig = &tokens[i * ctx..(i + 1) * ctx];
        let mut chunk = orig.to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        for b0 in (0..ctx).step_by(BATCH) {
            let b1 = (b0 + BATCH).min(ctx);
            let step = SeqStep {
                tokens: &chunk[b0..b1],
                pos0: b0,
                page_table: &table,
                kind: RowKind::Prompt,
                logits: 0,
            };
            if b1 <= first {
                model.forward_batch(&[step], &mut kv)?;
                continue;
            }
            let logits = model.forward_all_logits(step, &mut kv)?;
            // Rows `j` in `first .. ctx-1` predict the original token `j + 1`.
            total += (b0.max(first)..b1.min(ctx - 1))
                .into_par_iter()
                .map(|j| {
                    let row = &logits[(j - b0) * c.vocab..(j - b0 + 1) * c.vocab];
                    nll(row, orig[j + 1])
                })
                .sum::<f64>();
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let scored = chunks * per_chunk;
    Ok(PerplexityReport {
        model: engine.path.display().to_string(),
        file_bytes: bytes.len() as u64,
        context: ctx,
        chunks,
        tokens_scored: scored,
        perplexity: (total / scored as f64).exp(),
        seconds,
        tokens_per_s: (chunks * ctx) as f64 / seconds.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_score_log_vocab() {
        let logits = vec![0.5f32; 1000];
        assert!((nll(&logits, 7) - (1000f64).ln()).abs() < 1e-9);
    }

    #[test]
    fn a_confident_right_guess_scores_near_zero() {
        let mut logits = vec![0f32; 100];
        logits[3] = 40.0;
        assert!(nll(&logits, 3) < 1e-12);
        assert!((nll(&logits, 4) - 40.0).abs() < 1e-9);
    }

    #[test]
    fn chunking_follows_llama_perplexity() {
        let cfg = |context, max_chunks| PerplexityConfig {
            context,
            max_chunks,
        };
        // 512-token chunks score tokens 257..=511 of each: 255 per chunk.
        assert_eq!(chunking(1024, &cfg(512, None)).unwrap(), (2, 255));
        assert_eq!(chunking(5000, &cfg(512, None)).unwrap(), (9, 255));
        assert_eq!(chunking(5000, &cfg(512, Some(3))).unwrap(), (3, 255));
        assert_eq!(chunking(100, &cfg(7, None)).unwrap(), (14, 3));
        let short = chunking(1023, &cfg(512, None)).unwrap_err().to_string();
        assert!(short.contains("needs at least 1024"), "{short}");
        assert!(chunking(100, &cfg(2, None)).is_err());
        assert!(chunking(5000, &cfg(512, Some(0))).is_err());
    }
}
