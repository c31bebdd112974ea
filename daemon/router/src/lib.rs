//! `agentd route`: the `agentd.v1` gRPC API in front of several daemons, so the SDK and the
//! agents use a cluster exactly as they use one daemon.
//!
//! - [`service::RouterService`]: the API. Callers are identified with the daemon's own rules
//!   ([`agentd_service::access`]: peer credentials on the Unix socket, bearer tokens on TCP)
//!   and their calls forwarded to a daemon as them, through the daemon's delegation headers
//!   (the router is an operator of every daemon: it runs as the daemons' uid or one in their
//!   `operators`).
//! - [`backend`]: the daemons, their health checks (node number, restart epoch, up or down)
//!   and the sessions placed on each.
//! - [`placement`]: where new sessions go — the [`placement::PrefixIndex`] trait (what each
//!   daemon's cache holds) and the [`placement::Policy`] (cache-aware cost, round-robin or
//!   least-loaded), tested on fakes.
//! - [`kv_index`]: [`kv_index::KvEventIndex`], the `PrefixIndex` over the shared tier's KV
//!   events (`agentd route --kv-tier`).
//! - [`registry`]: the router's prefixes — whose, published or not, their tokens and their
//!   id on each daemon.
//! - `prefixes`, `fanout`: prefix calls on every daemon that has the prefix; Stats and
//!   EvictCache on all.
//!
//! **Architecture Invariant:** the router keeps no session state beyond counts: a session's id
//! carries the node of the daemon that made it (bits 56–62), so any call naming a session goes
//! straight there, and a router restart loses nothing but the prefix registry and the counts.
//! The tenant is never taken from a request: the router identifies its caller and the daemon
//! accepts the router's word only because the router is its operator.

pub mod backend;
mod fanout;
pub mod kv_index;
pub mod placement;
mod prefixes;
pub mod registry;
pub mod service;

pub use backend::{Backends, DaemonAddr};
pub use fanout::sum_stats;
pub use kv_index::KvEventIndex;
pub use placement::{CacheNamespace, Cached, Placement, Policy, PrefixIndex};
pub use service::RouterService;

use agentd_service::access::Access;
use agentd_wire::proto::agentd_server::AgentdServer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

/// What can stop the router.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// A `--daemon` address that is not `unix:/path`, or one given twice.
    #[error("bad daemon address {0:?}: give unix:/path/to/agentd.sock, each daemon once")]
    BadAddress(String),
    /// No `--daemon` at all.
    #[error("no daemons: give at least one --daemon unix:/path/to/agentd.sock")]
    NoDaemons,
    /// Two daemons report the same node number.
    #[error("daemons share a node number: {0}")]
    DuplicateNodes(String),
    /// The router's socket or TCP listener could not be set up.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// The socket or address.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("server error: {0}")]
    Server(#[from] tonic::transport::Error),
}

/// How to route.
pub struct RouterConfig {
    /// The daemons.
    pub daemons: Vec<DaemonAddr>,
    /// The router's Unix socket (bound by the caller, see
    /// [`agentd_service::serve::bind_socket`]).
    pub socket: PathBuf,
    /// An optional TCP listener (bound by the caller), where calls carry bearer tokens.
    pub tcp: Option<std::net::TcpListener>,
    /// Tenancy, bearer tokens and operators, as the daemon's.
    pub access: Access,
    /// The placement policy.
    pub policy: Policy,
    /// What the daemons' caches hold, if known (the shared tier's KV events).
    pub index: Option<Arc<dyn PrefixIndex>>,
    /// Whether the daemons share a KV tier.
    pub shared_tier: bool,
    /// How long running streams may go on after SIGTERM/SIGINT.
    pub grace: Duration,
}

/// How long start-up waits for every daemon's first health check.
const START_WAIT: Duration = Duration::from_secs(10);

/// Checks the daemons, then serves the router on `listener` (and `cfg.tcp`) until SIGTERM or
/// SIGINT. Fails at start when two daemons share a node number.
pub async fn serve(cfg: RouterConfig, listener: UnixListener) -> Result<(), RouterError> {
    let backends = Arc::new(Backends::new(cfg.daemons)?);
    let started = tokio::time::Instant::now();
    loop {
        backends.check_all().await;
        if let Some(dup) = backends.duplicate_nodes() {
            return Err(RouterError::DuplicateNodes(dup));
        }
        if backends.all().iter().all(|b| b.is_up()) || started.elapsed() > START_WAIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for b in backends.all() {
        match b.health() {
            h if h.up => tracing::info!(daemon = %b.addr, node = ?h.node, "daemon up"),
            h => tracing::warn!(daemon = %b.addr, error = ?h.error, "daemon not available yet"),
        }
    }
    let poller = tokio::spawn(backends.clone().poll());
    let service = Arc::new(RouterService::new(
        backends,
        cfg.access,
        cfg.policy,
        cfg.index,
        cfg.shared_tier,
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    };
    let uds = tonic::transport::Server::builder()
        .add_service(AgentdServer::from_arc(service.clone()))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener)
                .map(|c| c.map(agentd_service::authority::RewriteStream::new)),
            stopped(stop_rx.clone()),
        );
    let tcp = match cfg.tcp {
        Some(l) => {
            let err = |source| RouterError::Listen {
                what: "tcp".into(),
                source,
            };
            l.set_nonblocking(true).map_err(err)?;
            let l = tokio::net::TcpListener::from_std(l).map_err(err)?;
            Some(
                tonic::transport::Server::builder()
                    .add_service(AgentdServer::from_arc(service))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(l),
                        stopped(stop_rx.clone()),
                    ),
            )
        }
        None => None,
    };
    tokio::spawn(async move {
        agentd_service::serve::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let server = async move {
        match tcp {
            Some(tcp) => tokio::try_join!(uds, tcp).map(|_| ()),
            None => uds.await,
        }
    };
    let grace = cfg.grace;
    let mut rx = stop_rx.clone();
    let grace_over = async move {
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        r = server => r.map_err(RouterError::from),
        () = grace_over => {
            tracing::warn!(?grace, "grace period over; dropping the streams still running");
            Ok(())
        }
    };
    poller.abort();
    let _ = std::fs::remove_file(&cfg.socket);
    result
}
