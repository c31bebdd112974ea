//! `agentd serve`: its flags (`ServeArgs`, with the scheduler's `SchedArgs` and the draft
//! model's `DraftArgs`, which other subcommands share), the config file merged under them
//! (flags and environment first), and the daemon's start: model, disk and shared tiers,
//! scheduler, listeners.

use crate::{config, kv_tier, load, parse_size};
use agentd_engine::model::LoadOptions;
use agentd_engine::{model_files, LoadedModel};
use agentd_scheduler::{SchedulerConfig, SchedulerHandle, TenantLimits};
use anyhow::{Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub(crate) struct ServeArgs {
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
pub(crate) struct DraftArgs {
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
    pub(crate) fn load(
        &self,
        target: &LoadedModel,
        opts: LoadOptions,
    ) -> Result<Option<LoadedModel>> {
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
    pub(crate) fn config(&self) -> agentd_scheduler::DraftConfig {
        agentd_scheduler::DraftConfig {
            kv_memory: self.draft_kv_memory as usize,
            ..agentd_scheduler::DraftConfig::default()
        }
    }
}

/// How the scheduler uses memory and compute.
#[derive(Args)]
pub(crate) struct SchedArgs {
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
    pub(crate) fn config(&self) -> SchedulerConfig {
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

/// `flag` when it was given on the command line or in the environment, else the config file's
/// value when it has one, else `flag` (its default).
pub(crate) fn choose<T>(sm: &ArgMatches, id: &str, flag: T, file: Option<T>) -> T {
    let given = matches!(
        sm.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    );
    match file {
        Some(v) if !given => v,
        _ => flag,
    }
}

pub(crate) fn serve(
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

/// The disk tier at `dir` with a budget of `budget` bytes, for KV computed by `model`.
pub(crate) fn disk_tier(
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
