//! The `agentd` binary: the daemon (`serve`), one-shot generation, the client-side admin
//! subcommands and the benchmarks, over the engine, scheduler, store and service crates.
//!
//! - `config`: the TOML file and its precedence (flags > environment > file > defaults).
//! - `cli/`: subcommands that talk to a running daemon (`status`, `prefix …`).
//! - `bench/`: `agentd bench …`, each printing JSON.

mod bench;
mod cli;
mod config;
mod kv_tier;
mod logging;

use agentd_engine::model::LoadOptions;
use agentd_engine::sampling::SamplingParams;
use agentd_engine::KvDtype;
use agentd_engine::{GenerateOptions, LoadedModel};
use agentd_scheduler::{SchedulerConfig, SchedulerHandle};
use agentd_wire::{sampling_defaults, Message};
use anyhow::{Context, Result};
use bench::engine::{run_engine_bench, EngineBenchConfig};
use bench::prefix::{run_prefix_bench, PrefixBenchConfig};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use cli::serve::{serve, DraftArgs, SchedArgs, ServeArgs};
use logging::{init_logging, LogFormat};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// agentd: a local LLM runtime for agents, sharing KV-cache prefixes across sessions.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A catalog model (`agentd model list`), pulled into the data directory ($AGENTD_HOME,
    /// else the XDG data directory) on first use, or the path of a GGUF file; default:
    /// smollm2-135m (SmolLM2-135M-Instruct Q4_1).
    #[arg(long, global = true, env = "AGENTD_MODEL", value_name = "NAME|PATH")]
    model: Option<PathBuf>,
    /// Worker threads for the kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Run every matrix product in f32 on dequantised copies of the weights instead of the
    /// quantized kernels (slower, about 4 bytes per parameter; the reference for checking).
    #[arg(long, global = true)]
    exact: bool,
    /// How KV pages store keys and values: `f16`, or `q8_0` (llama.cpp's 8-bit blocks of 32
    /// with an f16 scale: about half the bytes, so --kv-memory holds about twice the tokens;
    /// needs head sizes that are a multiple of 32). Cached pages on disk of the other dtype
    /// are not used.
    #[arg(long, global = true, env = "AGENTD_KV_DTYPE", default_value_t = KvDtype::F16)]
    kv_dtype: KvDtype,
    /// Shared-prefix (cascade) attention: sequences of a step whose KV pages start alike (one
    /// system prompt) attend those pages once, as one product of all their queries. Outputs
    /// are the same bits either way; `off` is for measuring.
    #[arg(long, global = true, env = "AGENTD_SHARED_PREFIX_ATTENTION", value_enum, default_value_t = Switch::On)]
    shared_prefix_attention: Switch,
    /// Serve at most this many positions (default: the model's trained context), like
    /// llama.cpp's --ctx-size: smaller means smaller requests, not less memory per token.
    #[arg(long, global = true, env = "AGENTD_CONTEXT", value_parser = clap::value_parser!(u64).range(1..))]
    context: Option<u64>,
    /// How log lines are written to stderr: `text` for people, `json` (one object per line)
    /// for log collectors. The level comes from $AGENTD_LOG (default: warn).
    #[arg(long, global = true, env = "AGENTD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: serve the gRPC API on a Unix socket until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Route the gRPC API to several daemons (`--daemon unix:PATH`, each with its own
    /// `agentd serve --node N`): sessions go to the daemon that made them, new ones where
    /// their prefix is cached; clients connect to the router as to a daemon.
    Route(cli::route::RouteArgs),
    /// What CUDA this machine has (NVIDIA driver, NVRTC, devices), with every CUDA kernel
    /// source compiled for each device into the PTX cache. The CUDA executor itself is not
    /// built yet: agentd runs on the CPU.
    Device {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a running daemon's statistics (pool, cache hit rate, the caller's counters, the
    /// prefixes it may use) as JSON.
    Status(cli::admin::StatusArgs),
    /// List, publish, unpin or evict cached prefixes of a running daemon (publish, unpin, evict
    /// and `--all-tenants` are for operators).
    #[command(subcommand)]
    Prefix(cli::admin::PrefixCommand),
    /// Answer one question, streaming the reply to stdout (one session through the scheduler).
    Generate(GenerateArgs),
    /// Run one of the bundled agents on a task: `agentd run calculator "What is 12 times 7?"`
    /// (the `agentd-run` program installed beside this one; see `agentd run --help`).
    Run(cli::run::RunArgs),
    /// Measure performance and print JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Manage models: the catalog (list, pull, rm), the model in use (path, info), quantize.
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Args)]
struct GenerateArgs {
    /// The question (the user message).
    prompt: String,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = sampling_defaults::TEMPERATURE)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = sampling_defaults::TOP_K as usize)]
    top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = sampling_defaults::TOP_P)]
    top_p: f32,
    /// Drop tokens below this fraction of the top token's probability (0 = off).
    #[arg(long, default_value_t = sampling_defaults::MIN_P)]
    min_p: f32,
    /// Penalty for repeating recent tokens (1 = off).
    #[arg(long, default_value_t = sampling_defaults::REPETITION_PENALTY)]
    repeat_penalty: f32,
    /// Subtracted from the logits of tokens already present (0 = off).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Subtracted per occurrence of tokens already present (0 = off).
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print prompt/generation statistics to stderr at the end.
    #[arg(long)]
    stats: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// First-request TTFT on a persisted prefix after a restart vs a cold recompute, disk bytes
    /// per token, load throughput.
    Restart {
        /// Prefix lengths in tokens.
        #[arg(long, value_delimiter = ',', default_value = "1500,6000")]
        prefix_tokens: Vec<usize>,
        #[command(flatten)]
        sched: SchedArgs,
    },
    /// Next-token distributions with Q8_0 KV pages against f16 ones on the same weights: KL
    /// divergence and top-1 agreement over varied text, greedy outputs on a few prompts.
    KvQuality {
        /// Positions to score (the built-in text is repeated to reach them).
        #[arg(long, default_value_t = 1200)]
        positions: usize,
        /// Greedy tokens per prompt.
        #[arg(long, default_value_t = 48)]
        greedy_tokens: usize,
    },
    /// Prefill and decode throughput of the engine.
    Engine {
        /// Prompt lengths to prefill.
        #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
        prefill: Vec<usize>,
        /// Context lengths at which to measure decode.
        #[arg(long, value_delimiter = ',', default_value = "0,512,2048")]
        decode_contexts: Vec<usize>,
        /// Tokens per decode measurement.
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
        /// Batch sizes for the batched decode measurement.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        decode_batches: Vec<usize>,
        /// Shared context for the batched decode measurement.
        #[arg(long, default_value_t = 1500)]
        batch_context: usize,
    },
    /// The model's perplexity on a text file, computed as llama.cpp's llama-perplexity does:
    /// chunks of --context tokens (the global flag, as llama.cpp's --ctx-size; 512 when not
    /// given), each from BOS, the second half of each scored.
    Perplexity {
        /// The text to score (UTF-8; at least two chunks' worth of tokens).
        #[arg(long)]
        file: PathBuf,
        /// Score at most this many chunks (default: all).
        #[arg(long)]
        max_chunks: Option<usize>,
    },
    /// Decode tokens/s with and without speculative decoding (prompt-lookup drafts, and with
    /// --draft-model a draft model too) at batch 1 and 8, on an agent workload (tool results
    /// quoted back and edited) and on free chat.
    Spec {
        /// Tokens generated per sequence.
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// Rounds (configurations alternated); the best of each is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batches: Vec<usize>,
        #[command(flatten)]
        draft: DraftArgs,
    },
    /// The HTTP API's own overhead per 1-token chat completion (round trip minus the engine's
    /// time, from the reply's Server-Timing header), next to the gRPC figure of `bench serve`.
    Http {
        /// Requests to measure per front end.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
    },
    /// The daemon's own overhead: 1-token generations over the socket minus the engine's time.
    Serve {
        /// Generations to measure.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
    },
    /// Inter-token latency of running streams, idle, while a prefix loads from disk and while a
    /// large tool grammar compiles; CreateSession + Append latency while sessions prefill.
    Latency {
        /// Streams decoding throughout.
        #[arg(long, default_value_t = 8)]
        streams: usize,
        /// Tokens of the prefix loaded from disk.
        #[arg(long, default_value_t = 6000)]
        disk_prefix_tokens: usize,
        /// Tools in the constrained request.
        #[arg(long, default_value_t = 2000)]
        grammar_tools: usize,
        /// Sessions prefilling while session calls are timed.
        #[arg(long, default_value_t = 32)]
        prefill_sessions: usize,
        /// Prompt tokens each of them prefills.
        #[arg(long, default_value_t = 1500)]
        prefill_tokens: usize,
        /// CreateSession + Append pairs timed.
        #[arg(long, default_value_t = 50)]
        session_calls: usize,
        #[command(flatten)]
        sched: SchedArgs,
    },
    /// Several daemons behind `agentd route` on a shared KV tier: routed vs round-robin vs no
    /// shared tier (prompt tokens computed, TTFT, tokens/s), and a cold prefill against a
    /// cross-daemon hit.
    Cluster(bench::cluster::ClusterArgs),
    /// Many sessions in multi-turn loops (shared system prompt, forks, closes) against a child
    /// daemon for minutes: errors, turn latency and the daemon's RSS per minute.
    Soak {
        /// Concurrent sessions.
        #[arg(long, default_value_t = 64)]
        sessions: usize,
        /// How long to run, minutes (fractions allowed, e.g. 0.5).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// The RSS baseline is taken this many minutes after the start.
        #[arg(long, default_value_t = 2.0)]
        warmup_minutes: f64,
        /// Most tokens per reply.
        #[arg(long, default_value_t = 32)]
        max_tokens: u32,
        /// Seeds the sessions' choices and sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The child daemon's KV memory.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        kv_memory: u64,
    },
    /// Large requests (RegisterPrefix, Append, Tokenize, CreateSession of megabytes) against a
    /// child daemon: its RSS before, at the peak, and after an idle wait.
    Memory {
        /// Requests of each RPC.
        #[arg(long, default_value_t = 10)]
        requests: usize,
        /// Bytes of text (or of tokens on the wire) per request; Tokenize is capped at the
        /// daemon's 1 MiB limit.
        #[arg(long, default_value = "3MiB", value_parser = parse_size)]
        bytes: u64,
        /// The RPCs to send, in order.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "register,append,tokenize,create"
        )]
        rpcs: Vec<bench::memory::LargeRpc>,
        /// Seconds to wait after the last request before the final reading.
        #[arg(long, default_value_t = 5.0)]
        idle_seconds: f64,
        /// The child daemon's KV memory.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        kv_memory: u64,
    },
    /// Many sessions sharing one system prompt, with the prefix cache off and on.
    Prefix {
        /// Concurrent sessions.
        #[arg(long, default_value_t = 32)]
        sessions: usize,
        /// Approximate tokens in the shared system prompt.
        #[arg(long, default_value_t = 1500)]
        system_tokens: usize,
        /// Tokens generated per session.
        #[arg(long, default_value_t = 32)]
        gen_tokens: usize,
        /// Tenant counts to run with the cache on.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        tenants: Vec<usize>,
        /// Skip the (slow) run with the cache off.
        #[arg(long)]
        skip_cache_off: bool,
        #[command(flatten)]
        sched: SchedArgs,
    },
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| format!("{e} (examples: 512MiB, 2GiB, 1000000)"))
}

#[derive(Subcommand)]
enum ModelCommand {
    /// List the catalog's models: size, quantization, architecture, downloaded or not, default.
    List(cli::catalog::ListArgs),
    /// Fetch a catalog model into the data directory (restartable; checked by SHA-256).
    Pull(cli::catalog::PullArgs),
    /// Remove a catalog model's file (and any partial pull) from the data directory.
    Rm(cli::catalog::RmArgs),
    /// Print the path of the model that would be used, fetching the default one if needed.
    Path,
    /// Print the model's hyperparameters as JSON.
    Info,
    /// Rewrite a GGUF file in another quantization (llama.cpp's type mixtures: q4_k_m, q5_k_m,
    /// q6_k, q8_0, q4_0), printing tensors per type and sizes.
    Quantize(cli::model::QuantizeArgs),
    /// Tokenize text with a GGUF file's tokenizer (its metadata only) and print the ids.
    Tokenize(cli::tokenize::TokenizeArgs),
}

/// jemalloc rather than glibc's malloc: after large requests (megabytes of text tokenized and
/// refused) glibc kept the freed memory resident — 556 MiB after `agentd bench memory` — while
/// jemalloc gives it back and allocates faster (ARCHITECTURE.md, "Memory", has the figures).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts: a background thread returns dirty pages to the OS
/// about a second after they were freed (`dirty_decay_ms`), straight away rather than through
/// the lazier `MADV_FREE` stage (`muzzy_decay_ms: 0`), so an idle daemon shrinks back.
/// `_RJEM_MALLOC_CONF` in the environment overrides them.
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: JemallocConf =
    JemallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer that jemalloc reads as `const char *malloc_conf`.
#[repr(transparent)]
struct JemallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a static, immutable C string literal.
unsafe impl Sync for JemallocConf {}

fn main() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    init_logging(cli.log_format);
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("starting the thread pool")?;
    }
    let cli_globals = GlobalArgs {
        model: cli.model.clone(),
        threads: cli.threads,
        exact: cli.exact,
        context: cli.context,
        kv_dtype: cli.kv_dtype,
        shared_prefix_attention: cli.shared_prefix_attention,
    };
    SHARED_PREFIX_ATTENTION.store(
        cli.shared_prefix_attention == Switch::On,
        std::sync::atomic::Ordering::Relaxed,
    );
    let opts = LoadOptions {
        exact: cli.exact,
        context: cli.context.map(|n| n as usize),
        kv_dtype: cli.kv_dtype,
    };
    match cli.command {
        Command::Serve(args) => {
            let sm = matches
                .subcommand_matches("serve")
                .context("serve arguments")?;
            serve(cli.model, opts, args, sm)
        }
        Command::Route(args) => cli::route::route(args),
        Command::Device { json } => {
            let report = cli::device::run()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                cli::device::print(&report);
            }
            Ok(())
        }
        Command::Status(args) => cli::admin::status(args),
        Command::Prefix(cmd) => cli::admin::prefix(cmd),
        Command::Generate(args) => generate(load(cli.model, opts)?, args),
        Command::Run(args) => cli::run::run(args, cli.model),
        Command::Bench(BenchCommand::Engine {
            prefill,
            decode_contexts,
            decode_tokens,
            decode_batches,
            batch_context,
        }) => {
            let engine = load(cli.model, opts)?;
            let cfg = EngineBenchConfig {
                prefill_sizes: prefill,
                decode_contexts,
                decode_tokens,
                decode_batches,
                batch_context,
                ..Default::default()
            };
            let report = run_engine_bench(&engine, &cfg)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Bench(BenchCommand::KvQuality {
            positions,
            greedy_tokens,
        }) => {
            let engine = load(cli.model, opts)?;
            let report = bench::kv_quality::run(&engine, positions, greedy_tokens)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Bench(BenchCommand::Perplexity { file, max_chunks }) => {
            let engine = load(cli.model, opts)?;
            let cfg = bench::perplexity::PerplexityConfig {
                context: cli.context.map_or(512, |n| n as usize),
                max_chunks,
            };
            let report = bench::perplexity::run_perplexity_bench(&engine, &file, &cfg)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Bench(BenchCommand::Restart {
            prefix_tokens,
            sched,
        }) => {
            let engine = Arc::new(load(cli.model, opts)?);
            print_report(bench::restart::run_restart_bench(
                engine,
                sched.config(),
                &prefix_tokens,
            ))
        }
        Command::Bench(BenchCommand::Spec {
            gen_tokens,
            rounds,
            batches,
            draft,
        }) => {
            let engine = Arc::new(load(cli.model, opts)?);
            let drafter = draft.load(&engine, opts)?.map(|d| bench::spec::Drafter {
                model: Arc::new(d),
                config: draft.config(),
            });
            print_report(bench::spec::run_spec_bench(
                engine, drafter, gen_tokens, rounds, &batches,
            ))
        }
        Command::Bench(BenchCommand::Http { iterations }) => {
            let engine = Arc::new(load(cli.model, opts)?);
            print_report(bench::http::run_http_bench(
                engine,
                SchedulerConfig::default(),
                iterations,
            ))
        }
        Command::Bench(BenchCommand::Serve { iterations }) => {
            let engine = Arc::new(load(cli.model, opts)?);
            print_report(bench::serve::run_serve_bench(
                engine,
                SchedulerConfig::default(),
                iterations,
            ))
        }
        Command::Bench(BenchCommand::Latency {
            streams,
            disk_prefix_tokens,
            grammar_tools,
            prefill_sessions,
            prefill_tokens,
            session_calls,
            sched,
        }) => {
            let engine = Arc::new(load(cli.model, opts)?);
            let cfg = bench::latency::LatencyBenchConfig {
                streams,
                disk_prefix_tokens,
                grammar_tools,
                prefill_sessions,
                prefill_tokens,
                session_calls,
                scheduler: sched.config(),
            };
            print_report(async { Ok(bench::latency::run_latency_bench(engine, &cfg).await?) })
        }
        Command::Bench(BenchCommand::Cluster(args)) => {
            let cfg = args.config(|kv| child_config(&cli_globals, kv))?;
            print_report(async { Ok(bench::cluster::run_cluster_bench(&cfg).await?) })
        }
        Command::Bench(BenchCommand::Soak {
            sessions,
            minutes,
            warmup_minutes,
            max_tokens,
            seed,
            kv_memory,
        }) => {
            let cfg = bench::soak::SoakConfig {
                sessions,
                minutes,
                warmup_minutes,
                max_tokens,
                seed,
                daemon: child_config(&cli_globals, kv_memory)?,
            };
            print_report(async { Ok(bench::soak::run_soak_bench(&cfg).await?) })
        }
        Command::Bench(BenchCommand::Memory {
            requests,
            bytes,
            rpcs,
            idle_seconds,
            kv_memory,
        }) => {
            let cfg = bench::memory::MemoryBenchConfig {
                requests,
                bytes: bytes as usize,
                rpcs,
                idle_seconds,
                daemon: child_config(&cli_globals, kv_memory)?,
            };
            print_report(async { Ok(bench::memory::run_memory_bench(&cfg).await?) })
        }
        Command::Bench(BenchCommand::Prefix {
            sessions,
            system_tokens,
            gen_tokens,
            tenants,
            skip_cache_off,
            sched,
        }) => {
            let engine = Arc::new(load(cli.model, opts)?);
            let cfg = PrefixBenchConfig {
                sessions,
                system_tokens,
                gen_tokens,
                tenants,
                cache_off: !skip_cache_off,
                scheduler: sched.config(),
            };
            print_report(async { Ok(run_prefix_bench(engine, &cfg).await?) })
        }
        Command::Model(ModelCommand::Path) => {
            println!("{}", model_path(cli.model)?.display());
            Ok(())
        }
        Command::Model(ModelCommand::Quantize(args)) => cli::model::quantize(args),
        Command::Model(ModelCommand::List(args)) => cli::catalog::list(args),
        Command::Model(ModelCommand::Pull(args)) => cli::catalog::pull(args),
        Command::Model(ModelCommand::Rm(args)) => cli::catalog::rm(args),
        Command::Model(ModelCommand::Tokenize(args)) => cli::tokenize::run(args),
        Command::Model(ModelCommand::Info) => {
            let engine = load(cli.model, opts)?;
            println!("{}", serde_json::to_string_pretty(engine.model.config())?);
            Ok(())
        }
    }
}

/// The global flags, kept to start a child daemon that runs the same model the same way.
struct GlobalArgs {
    model: Option<PathBuf>,
    threads: Option<usize>,
    exact: bool,
    context: Option<u64>,
    kv_dtype: KvDtype,
    shared_prefix_attention: Switch,
}

/// An on/off flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

impl Switch {
    fn name(self) -> &'static str {
        match self {
            Switch::On => "on",
            Switch::Off => "off",
        }
    }
}

/// `--shared-prefix-attention`, applied to every model [`load`] loads.
static SHARED_PREFIX_ATTENTION: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(true);

/// A child `agentd serve` with the same global flags (the model resolved, fetched if needed,
/// here) and `kv_memory` bytes of KV.
fn child_config(g: &GlobalArgs, kv_memory: u64) -> Result<bench::child::ChildConfig> {
    let mut global_args: Vec<std::ffi::OsString> =
        vec!["--model".into(), model_path(g.model.clone())?.into()];
    if let Some(n) = g.threads {
        global_args.extend(["--threads".into(), n.to_string().into()]);
    }
    if let Some(n) = g.context {
        global_args.extend(["--context".into(), n.to_string().into()]);
    }
    if g.exact {
        global_args.push("--exact".into());
    }
    global_args.extend(["--kv-dtype".into(), g.kv_dtype.name().into()]);
    global_args.extend([
        "--shared-prefix-attention".into(),
        g.shared_prefix_attention.name().into(),
    ]);
    Ok(bench::child::ChildConfig {
        global_args,
        serve_args: vec!["--kv-memory".into(), kv_memory.to_string().into()],
    })
}

/// Runs a benchmark on a two-worker runtime and prints its report as JSON.
fn print_report<T: serde::Serialize>(
    bench: impl std::future::Future<
        Output = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>,
    >,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(bench).map_err(|e| anyhow::anyhow!(e))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn model_path(flag: Option<PathBuf>) -> Result<PathBuf> {
    cli::catalog::resolve(flag)
}

fn load(flag: Option<PathBuf>, opts: LoadOptions) -> Result<LoadedModel> {
    let path = model_path(flag)?;
    let engine =
        LoadedModel::load(&path, opts).with_context(|| format!("loading {}", path.display()))?;
    engine.model.set_shared_prefix_attention(
        SHARED_PREFIX_ATTENTION.load(std::sync::atomic::Ordering::Relaxed),
    );
    Ok(engine)
}

/// `agentd generate`: one session through the scheduler, its reply streamed to stdout.
fn generate(engine: LoadedModel, args: GenerateArgs) -> Result<()> {
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(Message::system(system));
    }
    messages.push(Message::user(args.prompt));
    let prompt = engine.chat_prompt(&messages)?;
    let opts = GenerateOptions {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repeat_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        max_tokens: args.max_tokens,
        stop: args.stop,
        ..GenerateOptions::default()
    };
    let dec = engine.decoding(&opts)?;
    let exec = engine.cpu_executor();
    // A pool just large enough for this one sequence.
    let page_size = 16;
    let context = agentd_engine::Executor::shape(&exec).context_length;
    let tokens = (prompt.len() + args.max_tokens).min(context);
    let pages = tokens.div_ceil(page_size) + 2;
    let cfg = SchedulerConfig {
        page_size,
        kv_memory: pages * page_size * agentd_engine::Executor::kv_bytes_per_token(&exec),
        max_batch: 1,
        ..SchedulerConfig::default()
    };
    let sched = SchedulerHandle::spawn(Box::new(exec), cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let usage = rt.block_on(async {
        let session = sched.create_session(0, None, prompt).await?;
        let mut rx = sched.generate(0, session, dec).await?;
        while let Some(ev) = rx.recv().await {
            match ev {
                agentd_scheduler::Event::Token { text, .. } => {
                    if write_err.is_some() {
                        continue;
                    }
                    // A closed stdout (`agentd generate … | head -c 10`) cancels the
                    // generation: closing the session does, and its usage still arrives.
                    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                        write_err = Some(e);
                        sched.close(0, session).await?;
                    }
                }
                agentd_scheduler::Event::Done(u) => return Ok(u),
                agentd_scheduler::Event::Error(e) => return Err(e),
            }
        }
        Err(agentd_scheduler::SchedError::Shutdown)
    })?;
    if args.stats {
        let u = &usage;
        let decode_s = (u.total - u.ttft).as_secs_f64();
        eprintln!(
            "{}",
            serde_json::json!({
                "prompt_tokens": u.prompt_tokens,
                "generated_tokens": u.generated_tokens,
                "finish": u.finish,
                "prefill_seconds": u.ttft.as_secs_f64(),
                "decode_tokens_per_s": (u.generated_tokens.saturating_sub(1)) as f64 / decode_s.max(1e-9),
            })
        );
    }
    match write_err {
        // The reader went away (`| head`): stop quietly, as other Unix tools do.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Some(e) => Err(e).context("writing to stdout"),
        None => Ok(writeln!(out)?),
    }
}
