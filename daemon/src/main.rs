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
use agentd_engine::model_files;
use agentd_engine::sampling::SamplingParams;
use agentd_engine::KvDtype;
use agentd_engine::{GenerateOptions, LoadedModel};
use agentd_scheduler::{SchedulerConfig, SchedulerHandle, TenantLimits};
use agentd_wire::{sampling_defaults, Message};
use anyhow::{Context, Result};
use bench::engine::{run_engine_bench, EngineBenchConfig};
use bench::prefix::{run_prefix_bench, PrefixBenchConfig};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
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
struct ServeArgs {
    /// A TOML configuration file (flags and environment variables override it).
    #[arg(long, env = "AGENTD_CONFIG")]
    config: Option<PathBuf>,
    /// The Unix socket (default: $XDG_RUNTIME_DIR/agentd/agentd.sock, else agentd.sock in the
    /// data directory).
    #[arg(long, env = "AGENTD_SOCKET")]
    socket: Option<PathBuf>,
    /// Give the socket (mode 0660) to this group at start, so its members may connect: a group
    /// name or a numeric gid.
    #[arg(long, env = "AGENTD_SOCKET_GROUP", value_name = "NAME")]
    socket_group: Option<String>,
    /// Give each Unix user (the socket peer's uid) its own tenant; default: one tenant.
    #[arg(long)]
    tenant_per_uid: bool,
    /// Also listen on TCP at this address (e.g. 127.0.0.1:7070); calls must carry a bearer token
    /// from the config file's [tcp.tokens].
    #[arg(long)]
    tcp: Option<String>,
    /// Also serve the OpenAI-compatible HTTP API and /metrics at this address (e.g.
    /// 127.0.0.1:8080). With [tcp.tokens] in the config, calls need a bearer token; without,
    /// only a loopback address is accepted unless --http-public.
    #[arg(long, env = "AGENTD_HTTP", value_name = "ADDR")]
    http: Option<String>,
    /// The largest HTTP request body (larger ones get 413), e.g. 8MiB.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    http_max_body: u64,
    /// Let the HTTP API listen beyond loopback without bearer tokens (every caller is then
    /// tenant 0).
    #[arg(long)]
    http_public: bool,
    /// Seconds running streams may go on after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, default_value_t = 10)]
    grace_seconds: u64,
    /// Where cached prefixes are kept on disk across restarts (default: kv-cache/<model file>
    /// in the data directory, one folder per model).
    #[arg(long, env = "AGENTD_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Disk budget for cached prefixes, e.g. 2GiB; 0 keeps nothing on disk.
    #[arg(long, env = "AGENTD_DISK_CACHE", default_value = "2GiB", value_parser = parse_size)]
    disk_cache: u64,
    /// Share KV pages with other daemons through a Redis Cluster: its seed nodes, comma
    /// separated (redis://HOST:PORT,redis://…). Off by default.
    #[arg(long, env = "AGENTD_KV_TIER", value_name = "URLS")]
    kv_tier: Option<String>,
    /// The bound on every call to the shared tier, in milliseconds (connecting and retries
    /// included); a call that takes longer is a miss.
    #[arg(long, env = "AGENTD_KV_TIER_TIMEOUT_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    kv_tier_timeout_ms: u64,
    /// This daemon's number in a cluster behind `agentd route` (0–127, unique in the cluster):
    /// session and prefix ids carry it, so the router sends every call to the daemon that made
    /// the id, and the daemon's KV events and heartbeat are published under it.
    #[arg(long, env = "AGENTD_NODE", value_name = "N",
          value_parser = clap::value_parser!(u8).range(0..=127))]
    node: Option<u8>,
    #[command(flatten)]
    sched: SchedArgs,
    #[command(flatten)]
    draft: DraftArgs,
}

/// Speculative decoding with a draft model.
#[derive(Args, Clone)]
struct DraftArgs {
    /// Draft with this smaller model (a catalog name or a GGUF path) over the same vocabulary
    /// as --model, e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b: it proposes tokens the
    /// target verifies as it does prompt-lookup drafts (outputs unchanged). Refused at start
    /// when the vocabularies differ. Switched off while it does not pay (measured step times).
    #[arg(long, env = "AGENTD_DRAFT_MODEL", value_name = "NAME|PATH")]
    draft_model: Option<PathBuf>,
    /// KV memory of the draft model's own page pool, e.g. 256MiB.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    draft_kv_memory: u64,
}

impl DraftArgs {
    /// Loads the draft model, if any, and checks it can draft for `target`.
    fn load(&self, target: &LoadedModel, opts: LoadOptions) -> Result<Option<LoadedModel>> {
        let Some(flag) = &self.draft_model else {
            return Ok(None);
        };
        let draft = load(Some(flag.clone()), opts).context("loading the draft model")?;
        target.check_draft_vocabulary(&draft)?;
        eprintln!(
            "agentd: drafting with {} for {}",
            draft.path.display(),
            target.path.display()
        );
        tracing::info!(draft = %draft.path.display(), target = %target.path.display(), "draft model in use");
        Ok(Some(draft))
    }

    /// The scheduler's draft settings.
    fn config(&self) -> agentd_scheduler::DraftConfig {
        agentd_scheduler::DraftConfig {
            kv_memory: self.draft_kv_memory as usize,
            ..agentd_scheduler::DraftConfig::default()
        }
    }
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

/// How the scheduler uses memory and compute.
#[derive(Args)]
struct SchedArgs {
    /// KV memory to preallocate, e.g. 512MiB, 2GiB, or bytes.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    kv_memory: u64,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    page_size: u64,
    /// Most sequences decoding at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_batch: u64,
    /// Most tokens one engine step computes (chunked prefill budget).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65536))]
    step_tokens: u64,
    /// Most open sessions per tenant.
    #[arg(long, default_value_t = 4096)]
    max_sessions: usize,
    /// Most generations per tenant waiting or running at once.
    #[arg(long, default_value_t = 256)]
    max_generations: usize,
    /// Most tokens one request may span (prompt + max_tokens); default: the model's context.
    #[arg(long)]
    max_request_tokens: Option<usize>,
    /// Most KV pages one request may need; default: no limit beyond the pool.
    #[arg(long)]
    max_request_pages: Option<usize>,
    /// Speculative decoding from each sequence's own tokens (prompt lookup): on by default;
    /// it adapts per sequence and stays off while many sequences decode.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    speculate: String,
    /// The longest speculative draft, in tokens.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=32))]
    max_draft: u64,
}

impl SchedArgs {
    fn config(&self) -> SchedulerConfig {
        SchedulerConfig {
            page_size: self.page_size as usize,
            kv_memory: self.kv_memory as usize,
            max_batch: self.max_batch as usize,
            step_tokens: self.step_tokens as usize,
            cache: true,
            limits: TenantLimits {
                sessions: self.max_sessions,
                concurrent_generations: self.max_generations,
                request_tokens: self.max_request_tokens.unwrap_or(usize::MAX),
                request_pages: self.max_request_pages.unwrap_or(usize::MAX),
            },
            store: None,
            shared: None,
            speculation: agentd_scheduler::SpecConfig {
                enabled: self.speculate == "on",
                max_draft: self.max_draft as usize,
                ..agentd_scheduler::SpecConfig::default()
            },
            draft: agentd_scheduler::DraftConfig::default(),
            node: None,
        }
    }
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

/// `flag` when it was given on the command line or in the environment, else the config file's
/// value when it has one, else `flag` (its default).
fn choose<T>(sm: &ArgMatches, id: &str, flag: T, file: Option<T>) -> T {
    let given = matches!(
        sm.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    );
    match file {
        Some(v) if !given => v,
        _ => flag,
    }
}

fn serve(
    model: Option<PathBuf>,
    opts: LoadOptions,
    args: ServeArgs,
    sm: &ArgMatches,
) -> Result<()> {
    use agentd_service::serve::{bind_socket, serve, ServeConfig, SocketGroup};
    use agentd_service::Tenancy;
    use config::ConfigFile;
    let file = match &args.config {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    let file_kv = match &file.kv_memory {
        Some(s) => Some(parse_size(s).map_err(|e| anyhow::anyhow!("config kv_memory: {e}"))?),
        None => None,
    };
    let a = &args.sched;
    let mut sched = SchedArgs {
        kv_memory: choose(sm, "kv_memory", a.kv_memory, file_kv),
        page_size: choose(
            sm,
            "page_size",
            a.page_size,
            file.page_size.map(|v| v as u64),
        ),
        max_batch: choose(
            sm,
            "max_batch",
            a.max_batch,
            file.max_batch.map(|v| v as u64),
        ),
        step_tokens: choose(
            sm,
            "step_tokens",
            a.step_tokens,
            file.step_tokens.map(|v| v as u64),
        ),
        max_sessions: choose(sm, "max_sessions", a.max_sessions, file.limits.sessions),
        max_generations: choose(
            sm,
            "max_generations",
            a.max_generations,
            file.limits.generations,
        ),
        max_request_tokens: choose(
            sm,
            "max_request_tokens",
            a.max_request_tokens,
            file.limits.request_tokens.map(Some),
        ),
        max_request_pages: choose(
            sm,
            "max_request_pages",
            a.max_request_pages,
            file.limits.request_pages.map(Some),
        ),
        speculate: a.speculate.clone(),
        max_draft: a.max_draft,
    };
    anyhow::ensure!(
        sched.page_size > 0 && sched.max_batch > 0 && sched.step_tokens > 0,
        "page_size, max_batch and step_tokens must be at least 1"
    );
    sched.page_size = sched.page_size.min(4096);
    let socket = choose(sm, "socket", args.socket, file.socket.clone().map(Some))
        .unwrap_or_else(agentd_wire::default_socket_path);
    let grace = choose(sm, "grace_seconds", args.grace_seconds, file.grace_seconds);
    let per_uid = choose(
        sm,
        "tenant_per_uid",
        args.tenant_per_uid,
        file.tenant_per_uid,
    );
    let tenancy = match file.uid_map().map_err(|e| anyhow::anyhow!(e))? {
        Some(map) => Tenancy::Map(map),
        None if per_uid => Tenancy::PerUid,
        None => Tenancy::Single,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let socket_group = choose(
        sm,
        "socket_group",
        args.socket_group,
        file.socket_group.clone().map(Some),
    )
    .map(|g| SocketGroup::resolve(&g))
    .transpose()?;
    // Bind first, so a second daemon fails at once, before loading the model.
    let listener = rt.block_on(async { bind_socket(&socket, socket_group.as_ref()) })?;
    let tokens = file.token_map();
    let tcp = match choose(sm, "tcp", args.tcp, file.tcp.listen.clone().map(Some)) {
        Some(addr) => {
            anyhow::ensure!(
                !tokens.is_empty(),
                "a TCP listener needs at least one bearer token in the config's [tcp.tokens]"
            );
            let l = std::net::TcpListener::bind(&addr)
                .with_context(|| format!("listening on TCP {addr}"))?;
            eprintln!("agentd: listening on tcp {}", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let http = match choose(sm, "http", args.http, file.http.listen.clone().map(Some)) {
        Some(addr) => {
            let file_body = match &file.http.max_body {
                Some(s) => {
                    Some(parse_size(s).map_err(|e| anyhow::anyhow!("config http.max_body: {e}"))?)
                }
                None => None,
            };
            let max_body = choose(sm, "http_max_body", args.http_max_body, file_body);
            let public = choose(sm, "http_public", args.http_public, file.http.public);
            let l = std::net::TcpListener::bind(&addr)
                .with_context(|| format!("listening on HTTP {addr}"))?;
            let local = l.local_addr()?;
            if tokens.is_empty() {
                anyhow::ensure!(
                    local.ip().is_loopback() || public,
                    "--http {addr}: without bearer tokens ([tcp.tokens] in the config) the HTTP API listens on a loopback address only; pass --http-public (http.public = true) to serve every caller as tenant 0 on {local}"
                );
                eprintln!(
                    "agentd: HTTP API on http://{local} without bearer tokens: every caller is tenant 0{}",
                    if local.ip().is_loopback() { " (loopback only)" } else { "" }
                );
            } else {
                eprintln!("agentd: HTTP API on http://{local} (bearer tokens from [tcp.tokens])");
            }
            Some(agentd_service::serve::HttpListen {
                listener: l,
                options: agentd_service::http::HttpOptions {
                    max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
                    metrics_token: file.http.metrics_token.clone(),
                },
            })
        }
        None => None,
    };
    let file_disk = match &file.disk_cache {
        Some(s) => Some(parse_size(s).map_err(|e| anyhow::anyhow!("config disk_cache: {e}"))?),
        None => None,
    };
    let disk_cache = choose(sm, "disk_cache", args.disk_cache, file_disk);
    let cache_dir: Option<PathBuf> = choose(
        sm,
        "cache_dir",
        args.cache_dir,
        file.cache_dir.clone().map(Some),
    );
    let mut sched_cfg = sched.config();
    sched_cfg.draft = args.draft.config();
    sched_cfg.node = match (args.node, file.node) {
        (Some(n), _) => Some(n),
        (None, Some(n)) if n <= 127 => Some(n),
        (None, Some(n)) => anyhow::bail!("config node = {n}: a node number is 0-127"),
        (None, None) => None,
    };
    // The name HTTP clients and metrics know the model by: the catalog name it was started
    // with, else the file's stem.
    let model_name = match &model {
        Some(v) if !v.is_file() => v.to_string_lossy().into_owned(),
        Some(_) => String::new(),
        None => agentd_engine::catalog::DEFAULT_MODEL.to_owned(),
    };
    let engine = Arc::new(load(model, opts)?);
    let model_name = if model_name.is_empty() {
        agentd_service::serve::model_stem(&engine)
    } else {
        model_name
    };
    let cache_dir = match cache_dir {
        Some(d) => d,
        None => model_files::default_cache_dir(&engine.path)?,
    };
    if disk_cache > 0 {
        sched_cfg.store = Some(disk_tier(&engine, cache_dir, disk_cache)?);
    }
    let kv_tier_nodes = choose(sm, "kv_tier", args.kv_tier, file.kv_tier.clone().map(Some));
    let kv_tier_timeout = choose(
        sm,
        "kv_tier_timeout_ms",
        args.kv_tier_timeout_ms,
        file.kv_tier_timeout_ms,
    );
    // One restart epoch for the KV events' heartbeat and Health: `agentd route` and the index
    // see the same restart.
    let epoch = agentd_kvtier::events::new_epoch();
    sched_cfg.shared = kv_tier::shared_tier(
        &engine,
        sched_cfg.store.as_ref().map(|s| &s.digests),
        kv_tier_nodes.as_deref(),
        kv_tier_timeout,
        sched_cfg.node,
        epoch,
    )?;
    let draft = args.draft.load(&engine, opts)?;
    let sched_cfg_node = sched_cfg.node;
    let handle = SchedulerHandle::spawn_with_drafter(
        Box::new(engine.cpu_executor()),
        draft.map(|d| Box::new(d.cpu_executor()) as Box<dyn agentd_engine::Executor>),
        sched_cfg,
    )?;
    let cfg = ServeConfig {
        socket: socket.clone(),
        tenancy,
        grace: std::time::Duration::from_secs(grace),
        tcp,
        tokens,
        operators: file.operators.clone(),
        http,
        model_name,
        tenant_names: file.tenant_names(),
        node: sched_cfg_node,
        // A new epoch per start: `agentd route` sees a restart (and forgets the sessions it
        // counted there) when it changes.
        epoch,
    };
    eprintln!("agentd: listening on {}", socket.display());
    rt.block_on(serve(handle, engine, cfg, listener))?;
    eprintln!("agentd: stopped");
    Ok(())
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

/// The disk tier at `dir` with a budget of `budget` bytes, for KV computed by `model`.
fn disk_tier(
    model: &LoadedModel,
    dir: PathBuf,
    budget: u64,
) -> Result<agentd_scheduler::DiskTierConfig> {
    Ok(agentd_scheduler::DiskTierConfig {
        store: agentd_store::StoreConfig { dir, budget },
        digests: model
            .digests()
            .context("hashing the model for the disk cache")?,
    })
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
