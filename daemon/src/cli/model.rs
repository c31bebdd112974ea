//! `agentd model quantize IN OUT --type T`: rewrites a GGUF file in another quantization
//! (`agentd_engine::quantize`), then prints a short summary.

use agentd_engine::quantize::{quantize_file, QuantFormat};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// The arguments of `agentd model quantize`.
#[derive(Args)]
pub struct QuantizeArgs {
    /// The GGUF file to read (any type candle reads: F32, F16, Q4_0 … Q8_0, K-quants).
    pub input: PathBuf,
    /// The GGUF file to write (replaced if it exists; never the input).
    pub output: PathBuf,
    /// The mixture, as llama.cpp's llama-quantize names it: q4_k_m, q5_k_m, q6_k, q8_0, q4_0.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_format)]
    pub format: QuantFormat,
}

fn parse_format(s: &str) -> std::result::Result<QuantFormat, String> {
    s.parse::<QuantFormat>().map_err(|e| e.to_string())
}

/// Runs the conversion and prints what it wrote: tensors per type, sizes and time.
pub fn quantize(args: QuantizeArgs) -> Result<()> {
    let report = quantize_file(&args.input, &args.output, args.format).with_context(|| {
        format!(
            "quantizing {} to {}",
            args.input.display(),
            args.output.display()
        )
    })?;
    let types: Vec<String> = report
        .by_type
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{}: {} tensors ({}; {} copied unchanged), {:.1} MiB -> {:.1} MiB, {:.1} s",
        args.output.display(),
        report.tensors,
        types.join(", "),
        report.copied,
        mib(report.input_bytes),
        mib(report.output_bytes),
        report.seconds
    );
    Ok(())
}
