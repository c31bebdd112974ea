//! The client-side subcommands of the `agentd` binary: `status` and `prefix …`, which talk to a
//! running daemon over its socket and print JSON.

use super::connect::connect;
use agentd_wire::proto::{self, agentd_client::AgentdClient};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tonic::transport::Channel;

/// Where the daemon is.
#[derive(Args)]
pub struct SocketArg {
    /// The daemon's socket (default as for `serve`).
    #[arg(long, env = "AGENTD_SOCKET")]
    socket: Option<PathBuf>,
}

/// `agentd status`.
#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Every tenant's counters and prefixes (operators only).
    #[arg(long)]
    all_tenants: bool,
}

/// `agentd prefix …`.
#[derive(Subcommand)]
pub enum PrefixCommand {
    /// The prefixes the caller may use (with --all-tenants, every tenant's: operators only).
    List {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        all_tenants: bool,
    },
    /// Publish a copy of a prefix (any tenant's) for every tenant; prints the new id.
    Publish {
        #[command(flatten)]
        socket: SocketArg,
        /// The prefix id.
        id: u64,
    },
    /// Unpin and forget a prefix of any tenant.
    Unpin {
        #[command(flatten)]
        socket: SocketArg,
        /// The prefix id.
        id: u64,
    },
    /// Evict unpinned cache no running request uses; prints the pages freed.
    Evict {
        #[command(flatten)]
        socket: SocketArg,
        /// At most this many pages (default: all that can be).
        #[arg(long)]
        pages: Option<u32>,
    },
}

type Client = AgentdClient<Channel>;

fn block_on<T>(socket: SocketArg, f: impl AsyncFnOnce(Client) -> Result<T>) -> Result<T> {
    let path = socket
        .socket
        .unwrap_or_else(agentd_wire::default_socket_path);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let c = connect(&path).await?;
        f(c).await
    })
}

fn prefix_json(p: &proto::PrefixEntry) -> serde_json::Value {
    serde_json::json!({
        "id": p.prefix_id,
        "tokens": p.tokens,
        "pinned": p.pinned,
        "published": p.published,
        "resident_tokens": p.resident_tokens,
        "own": p.own,
        "tenant": p.tenant,
    })
}

fn tenant_json(s: &proto::TenantStats) -> serde_json::Value {
    serde_json::json!({
        "tenant": s.tenant,
        "sessions": s.sessions,
        "running": s.running,
        "waiting": s.waiting,
        "prefill_tokens": s.prefill_tokens,
        "cached_tokens": s.cached_tokens,
        "generated_tokens": s.generated_tokens,
    })
}

fn print(json: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(json)?);
    Ok(())
}

/// `agentd status`: the pool, the cache, the caller's counters and prefixes as JSON.
pub fn status(args: StatusArgs) -> Result<()> {
    let all = args.all_tenants;
    let socket = args
        .socket
        .socket
        .clone()
        .unwrap_or_else(agentd_wire::default_socket_path);
    let (s, prefixes) = block_on(args.socket, async move |mut c| {
        let s = c
            .stats(proto::StatsRequest { all_tenants: all })
            .await?
            .into_inner();
        let list = c
            .list_prefixes(proto::ListPrefixesRequest { all_tenants: all })
            .await?
            .into_inner()
            .prefixes;
        Ok((s, list))
    })?;
    let mut json = serde_json::json!({
        "socket": socket.display().to_string(),
        "pool": {
            "pages": s.pool_pages,
            "free_pages": s.free_pages,
            "peak_pages": s.peak_pages,
            "page_size": s.page_size,
            "page_bytes": s.page_bytes,
        },
        "cache": {
            "tree_tokens": s.tree_tokens,
            "hit_rate": s.hit_rate,
        },
        "engine": { "steps": s.steps, "preemptions": s.preemptions },
        "speculation": {
            "drafted": s.spec_drafted,
            "accepted": s.spec_accepted,
            "acceptance": if s.spec_drafted == 0 {
                0.0
            } else {
                s.spec_accepted as f64 / s.spec_drafted as f64
            },
            "drafted_by_position": s.spec_drafted_at,
            "accepted_by_position": s.spec_accepted_at,
            "model_drafted": s.spec_model_drafted,
            "model_accepted": s.spec_model_accepted,
        },
        "disk": {
            "records": s.disk_records,
            "bytes": s.disk_bytes,
            "budget": s.disk_budget,
            "loaded_tokens": s.disk_loaded_tokens,
        },
        "shared_tier": s.shared_tier.as_ref().map(|t| serde_json::json!({
            "exported_pages": t.exported_pages,
            "export_dropped_pages": t.export_dropped_pages,
            "export_failed_pages": t.export_failed_pages,
            "lookups": t.lookups,
            "lookup_pages": t.lookup_pages,
            "hit_pages": t.hit_pages,
            "damaged_pages": t.damaged_pages,
            "failures": t.failures,
            "loaded_tokens": t.loaded_tokens,
        })),
        "tenant": tenant_json(&proto::TenantStats {
            tenant: 0,
            sessions: s.sessions,
            running: s.running,
            waiting: s.waiting,
            prefill_tokens: s.prefill_tokens,
            cached_tokens: s.cached_tokens,
            generated_tokens: s.generated_tokens,
        }),
        "prefixes": prefixes.iter().map(prefix_json).collect::<Vec<_>>(),
    });
    if all {
        json["tenants"] = s.tenants.iter().map(tenant_json).collect();
    }
    print(&json)
}

/// `agentd prefix …`.
pub fn prefix(cmd: PrefixCommand) -> Result<()> {
    let json = match cmd {
        PrefixCommand::List {
            socket,
            all_tenants,
        } => block_on(socket, async move |mut c| {
            let req = proto::ListPrefixesRequest { all_tenants };
            let list = c.list_prefixes(req).await?.into_inner().prefixes;
            Ok(serde_json::json!(list
                .iter()
                .map(prefix_json)
                .collect::<Vec<_>>()))
        })?,
        PrefixCommand::Publish { socket, id } => block_on(socket, async move |mut c| {
            let req = proto::PrefixRef { prefix_id: id };
            let published = c.publish_prefix(req).await?.into_inner().prefix_id;
            Ok(serde_json::json!({ "published": published }))
        })?,
        PrefixCommand::Unpin { socket, id } => block_on(socket, async move |mut c| {
            c.unpin_prefix(proto::PrefixRef { prefix_id: id }).await?;
            Ok(serde_json::json!({ "unpinned": id }))
        })?,
        PrefixCommand::Evict { socket, pages } => block_on(socket, async move |mut c| {
            let req = proto::EvictCacheRequest {
                pages: pages.unwrap_or(0),
            };
            let freed = c.evict_cache(req).await?.into_inner().freed_pages;
            Ok(serde_json::json!({ "freed_pages": freed }))
        })?,
    };
    print(&json)
}
