//! `agentd route`: the router in front of several daemons (`agentd_router`), configured from
//! flags and the same TOML file as `agentd serve` (its `socket`, `[tenants]`,
//! `tenant_per_uid`, `operators` and `[tcp]` keys; the daemon-only keys are ignored).

use crate::config::ConfigFile;
use agentd_router::{DaemonAddr, Placement, Policy, RouterConfig};
use agentd_service::access::{Access, Tenancy};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// `agentd route` flags.
#[derive(clap::Args)]
pub struct RouteArgs {
    /// A daemon to route to, as unix:/path/to/agentd.sock (repeat for each; every daemon needs
    /// its own `agentd serve --node N`).
    #[arg(long = "daemon", value_name = "unix:PATH", required = true)]
    daemons: Vec<String>,
    /// The router's Unix socket, where clients connect as to a daemon (default: the daemon's
    /// default path, so clients need no change).
    #[arg(long, env = "AGENTD_ROUTE_SOCKET")]
    socket: Option<PathBuf>,
    /// Also listen on TCP at this address; calls need a bearer token from the config's
    /// [tcp.tokens].
    #[arg(long)]
    tcp: Option<String>,
    /// A TOML file in `agentd serve`'s format: its tenancy, operators and TCP tokens apply.
    #[arg(long, env = "AGENTD_CONFIG")]
    config: Option<PathBuf>,
    /// Give each Unix user its own tenant (as `agentd serve --tenant-per-uid`).
    #[arg(long)]
    tenant_per_uid: bool,
    /// The daemons share this KV tier (Redis Cluster seed nodes, comma separated): placement
    /// follows the KV events the daemons publish there (what each holds; what the others can
    /// load from the tier), and defaults to `cache`.
    #[arg(long, env = "AGENTD_KV_TIER", value_name = "URLS")]
    kv_tier: Option<String>,
    /// How new sessions are placed: `cache` (fewest uncached prompt tokens plus weighted
    /// load), `round-robin`, or `least-loaded` (default without --kv-tier).
    #[arg(long)]
    placement: Option<Placement>,
    /// For `cache` placement: what one open session on a daemon costs, in prompt tokens.
    #[arg(long, default_value_t = agentd_router::placement::DEFAULT_LOAD_WEIGHT)]
    load_weight: f64,
    /// Seconds running streams may go on after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 10)]
    grace_seconds: u64,
}

/// Runs `agentd route` until SIGTERM/SIGINT.
pub fn route(args: RouteArgs) -> Result<()> {
    let file = match &args.config {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    let daemons = args
        .daemons
        .iter()
        .map(|d| d.parse::<DaemonAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    let socket = args
        .socket
        .or_else(|| file.socket.clone())
        .unwrap_or_else(agentd_wire::default_socket_path);
    if let Some(d) = daemons.iter().find(|d| d.socket == socket) {
        anyhow::bail!(
            "the router's socket {} is also a --daemon ({d}); pass --socket",
            socket.display()
        );
    }
    anyhow::ensure!(
        args.load_weight.is_finite() && args.load_weight >= 0.0,
        "--load-weight must be a number ≥ 0"
    );
    let tenancy = match file.uid_map().map_err(|e| anyhow::anyhow!(e))? {
        Some(map) => Tenancy::Map(map),
        None if args.tenant_per_uid || file.tenant_per_uid == Some(true) => Tenancy::PerUid,
        None => Tenancy::Single,
    };
    let own_uid = agentd_service::access::own_uid();
    let access = Access {
        tenancy,
        tokens: file.token_map(),
        operators: file.operators.iter().copied().chain([own_uid]).collect(),
        server: "router",
    };
    let placement = args.placement.unwrap_or(if args.kv_tier.is_some() {
        Placement::Cache
    } else {
        Placement::LeastLoaded
    });
    // With a shared tier, placement follows the daemons' KV events on it.
    let index = match &args.kv_tier {
        Some(urls) => {
            let nodes: Vec<String> = urls
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
            if let Some(bad) = nodes.iter().find(|n| !n.starts_with("redis://")) {
                anyhow::bail!("--kv-tier: {bad:?} is not a redis://HOST:PORT URL");
            }
            let index = agentd_router::KvEventIndex::follow(nodes)
                .context("--kv-tier: following the daemons' KV events")?;
            Some(std::sync::Arc::new(index) as std::sync::Arc<dyn agentd_router::PrefixIndex>)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(async { agentd_service::serve::bind_socket(&socket, None) })?;
    let tcp = match args.tcp.or_else(|| file.tcp.listen.clone()) {
        Some(addr) => {
            anyhow::ensure!(
                !access.tokens.is_empty(),
                "a TCP listener needs at least one bearer token in the config's [tcp.tokens]"
            );
            let l = std::net::TcpListener::bind(&addr)
                .with_context(|| format!("listening on TCP {addr}"))?;
            eprintln!("agentd route: listening on tcp {}", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let cfg = RouterConfig {
        daemons,
        socket: socket.clone(),
        tcp,
        access,
        policy: Policy {
            placement,
            load_weight: args.load_weight,
            ..Policy::default()
        },
        index,
        shared_tier: args.kv_tier.is_some(),
        grace: std::time::Duration::from_secs(args.grace_seconds),
    };
    eprintln!(
        "agentd route: listening on {} ({placement:?} placement)",
        socket.display()
    );
    let r = rt.block_on(agentd_router::serve(cfg, listener));
    if r.is_err() {
        let _ = std::fs::remove_file(&socket);
    }
    r?;
    eprintln!("agentd route: stopped");
    Ok(())
}
