//! `agentd serve`: the Unix socket and the server's life cycle.
//!
//! The socket is created with mode 0660, in the group [`SocketGroup`] when one is configured; a
//! directory the daemon creates for it gets 0700. A socket file nobody answers on (a daemon that
//! crashed) is removed; one a live daemon answers on makes start-up fail with a message naming
//! it. Every connection on it goes through the `authority` rewrite. On SIGTERM or SIGINT the server stops
//! accepting, lets running streams finish for a grace period, then drops them (which cancels
//! their generations), flushes the disk cache, removes the socket and returns.

use super::authority::RewriteStream;
use super::{AgentdService, Tenancy};
use agentd_engine::LoadedModel;
use agentd_scheduler::SchedulerHandle;
use agentd_wire::proto::agentd_server::AgentdServer;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

/// What can stop the daemon from serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another daemon answers on the socket.
    #[error("another agentd is already listening on {0}; stop it or pass a different --socket")]
    InUse(PathBuf),
    /// Creating, binding or securing the socket failed.
    #[error("cannot set up the socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The socket's group (`--socket-group`, `socket_group`) names no group.
    #[error("unknown group {0:?} for the socket (--socket-group / socket_group): no group has this name, and it is not a numeric gid")]
    UnknownGroup(String),
    /// The group database could not be read.
    #[error("cannot look up the group {name:?} for the socket: {source}")]
    GroupLookup {
        /// The group's name.
        name: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The socket could not be given to its group.
    #[error("cannot give the socket {path} to group {group:?}: {source} (the daemon's user must be root or a member of the group)")]
    Chown {
        /// The socket path.
        path: PathBuf,
        /// The group, as configured.
        group: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("server error: {0}")]
    Server(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("HTTP server error: {0}")]
    Http(std::io::Error),
}

/// How to serve.
#[derive(Debug)]
pub struct ServeConfig {
    /// The Unix socket to listen on.
    pub socket: PathBuf,
    /// How callers map to tenants.
    pub tenancy: Tenancy,
    /// How long running streams may go on after SIGTERM/SIGINT.
    pub grace: Duration,
    /// An optional TCP listener (bound by the caller), where calls carry bearer tokens.
    pub tcp: Option<std::net::TcpListener>,
    /// Bearer token → tenant, for TCP calls.
    pub tokens: std::collections::HashMap<String, agentd_scheduler::TenantId>,
    /// Unix uids allowed the admin RPCs (besides the daemon's own, which is always one).
    pub operators: Vec<u32>,
    /// The OpenAI-compatible HTTP listener (bound by the caller), if any.
    pub http: Option<HttpListen>,
    /// The model's name for HTTP clients and metrics (the catalog name it was started by, or
    /// the file's stem).
    pub model_name: String,
    /// Tenant names from the configuration, for the metrics' `tenant` label.
    pub tenant_names: std::collections::HashMap<agentd_scheduler::TenantId, String>,
    /// This daemon's node number (`--node`), reported by Health.
    pub node: Option<u8>,
    /// Random, chosen at start (in `main`), reported by Health so `agentd route` sees restarts.
    pub epoch: u64,
}

/// The HTTP listener and how it behaves.
#[derive(Debug)]
pub struct HttpListen {
    /// Bound by the caller (so a busy port fails before the model loads).
    pub listener: std::net::TcpListener,
    /// Body limit, the metrics token.
    pub options: crate::http::HttpOptions,
}

/// A server running in this process (see [`spawn_local`]).
pub struct LocalServer {
    /// Its socket.
    pub socket: PathBuf,
    /// The socket's temporary directory (removed when dropped).
    pub dir: tempfile::TempDir,
    /// The server task.
    pub task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

/// A server for the scheduler `sched` running `model`, in this process, on a socket in a fresh
/// temporary directory: one tenant, no TCP, a one-second grace period (for benchmarks and
/// `agentd-run`). Must be called inside a tokio runtime.
pub fn spawn_local(
    sched: SchedulerHandle,
    model: Arc<LoadedModel>,
) -> Result<LocalServer, ServeError> {
    spawn_local_with(sched, model, None)
}

/// [`spawn_local`], also serving the HTTP API on `http` (for `agentd bench http`).
pub fn spawn_local_with(
    sched: SchedulerHandle,
    model: Arc<LoadedModel>,
    http: Option<HttpListen>,
) -> Result<LocalServer, ServeError> {
    let dir = tempfile::tempdir().map_err(|source| ServeError::Socket {
        path: std::env::temp_dir(),
        source,
    })?;
    let socket = dir.path().join("agentd.sock");
    let listener = bind_socket(&socket, None)?;
    let cfg = ServeConfig {
        socket: socket.clone(),
        tenancy: Tenancy::Single,
        grace: Duration::from_secs(1),
        tcp: None,
        tokens: Default::default(),
        operators: Vec::new(),
        http,
        model_name: model_stem(&model),
        tenant_names: Default::default(),
        node: None,
        epoch: rand::random(),
    };
    let task = tokio::spawn(serve(sched, model, cfg, listener));
    Ok(LocalServer { socket, dir, task })
}

/// The model file's name without its extension.
pub fn model_stem(model: &LoadedModel) -> String {
    model
        .path
        .file_stem()
        .map_or_else(|| "model".to_owned(), |s| s.to_string_lossy().into_owned())
}

/// The group the socket is given at start (`--socket-group`, the config's `socket_group`), so
/// its members may connect (the socket's mode is 0660) without a `chgrp` after every start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    /// The group as configured: a name, or a numeric gid.
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

impl SocketGroup {
    /// Resolves a group name (with `getgrnam_r`) or, if no group has that name, a numeric gid
    /// (as chown(1) does). An unknown name is [`ServeError::UnknownGroup`], naming it.
    pub fn resolve(name: &str) -> Result<Self, ServeError> {
        let by_name = group_by_name(name).map_err(|source| ServeError::GroupLookup {
            name: name.to_owned(),
            source,
        })?;
        let gid = by_name
            .or_else(|| name.parse().ok())
            .ok_or_else(|| ServeError::UnknownGroup(name.to_owned()))?;
        Ok(Self {
            name: name.to_owned(),
            gid,
        })
    }
}

/// The gid of the group called `name`, if there is one.
fn group_by_name(name: &str) -> std::io::Result<Option<u32>> {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return Ok(None); // A NUL byte: no group has this name.
    };
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `group` is plain old data, filled in by getgrnam_r.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and `buf.len()` is the buffer's length;
        // the strings getgrnam_r stores in `buf` are not used after it.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 => return Ok((!found.is_null()).then_some(group.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // Some C libraries report "no such group" as an error.
            libc::ENOENT | libc::ESRCH => return Ok(None),
            e => return Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

/// Creates the socket's directory (0700 when the daemon creates it), clears a stale socket and
/// binds a listener with mode 0660, owned by `group` when one is given.
pub fn bind_socket(path: &Path, group: Option<&SocketGroup>) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_owned()));
        }
        tracing::warn!(path = %path.display(), "removing a stale socket");
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(group) = group {
        std::os::unix::fs::chown(path, None, Some(group.gid)).map_err(|source| {
            let _ = std::fs::remove_file(path);
            ServeError::Chown {
                path: path.to_owned(),
                group: group.name.clone(),
                source,
            }
        })?;
    }
    Ok(listener)
}

/// Resolves on SIGTERM or SIGINT (logged); never, if the handlers cannot be installed. The
/// daemon's and `agentd route`'s graceful shutdown wait on it.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until the process is killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// Serves the scheduler `sched` running `model` on `cfg.socket` until SIGTERM or SIGINT.
pub async fn serve(
    sched: SchedulerHandle,
    model: Arc<LoadedModel>,
    cfg: ServeConfig,
    listener: UnixListener,
) -> Result<(), ServeError> {
    let stats = sched.stats().await.map_err(|e| ServeError::Socket {
        path: cfg.socket.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    let operators = cfg.operators.iter().copied().chain([own_uid]).collect();
    let flush = sched.clone();
    let single = cfg.tenancy == Tenancy::Single && cfg.tokens.is_empty();
    let metrics = Arc::new(crate::metrics::Metrics::new(
        &cfg.model_name,
        cfg.tenant_names.clone(),
        single,
        stats.disk.is_some(),
    ));
    let service = std::sync::Arc::new(
        AgentdService::new(
            sched,
            model,
            cfg.tenancy,
            cfg.tokens,
            operators,
            stats.page_size,
            stats.pool_pages,
            vec![cfg.model_name.clone()],
            metrics,
        )
        .with_identity(cfg.node, cfg.epoch),
    );
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (signalled_tx, signalled_rx) = tokio::sync::watch::channel(false);
    let mut rx = signalled_rx.clone();
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
            // Every connection's header blocks re-encoded, so any client's :authority is one h2
            // accepts (see `authority`).
            UnixListenerStream::new(listener).map(|conn| conn.map(RewriteStream::new)),
            stopped(signalled_rx.clone()),
        );
    let http = match cfg.http {
        Some(h) => {
            let err = |source| ServeError::Socket {
                path: cfg.socket.clone(),
                source,
            };
            h.listener.set_nonblocking(true).map_err(err)?;
            let l = tokio::net::TcpListener::from_std(h.listener).map_err(err)?;
            let state = Arc::new(crate::http::HttpState::new(
                service.clone(),
                h.options,
                closing.clone(),
            ));
            let app = crate::http::router(state.clone());
            let signal = stopped(signalled_rx.clone());
            // After the signal the listener stays open, answering 503, until the HTTP
            // generations in flight end (or the grace period cuts them off).
            let server = axum::serve(l, app)
                .with_graceful_shutdown(async move { state.drained(signal).await });
            Some(async move { server.await.map_err(ServeError::Http) })
        }
        None => None,
    };
    let tcp = match cfg.tcp {
        Some(l) => {
            l.set_nonblocking(true)
                .map_err(|source| ServeError::Socket {
                    path: cfg.socket.clone(),
                    source,
                })?;
            let l = tokio::net::TcpListener::from_std(l).map_err(|source| ServeError::Socket {
                path: cfg.socket.clone(),
                source,
            })?;
            let server = tonic::transport::Server::builder()
                .add_service(AgentdServer::from_arc(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    stopped(signalled_rx.clone()),
                );
            Some(server)
        }
        None => None,
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        closing.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = signalled_tx.send(true);
    });
    let server = async move {
        let grpc = async move {
            match tcp {
                Some(tcp) => tokio::try_join!(uds, tcp).map(|_| ()),
                None => uds.await,
            }
            .map_err(ServeError::from)
        };
        match http {
            Some(http) => tokio::try_join!(grpc, http).map(|_| ()),
            None => grpc.await,
        }
    };
    let grace = cfg.grace;
    let grace_over = async move {
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        r = server => r,
        () = grace_over => {
            tracing::warn!(?grace, "grace period over; cancelling the streams still running");
            Ok(())
        }
    };
    drop(signalled_rx);
    // Make the disk tier durable before exiting.
    if let Err(e) = flush.flush().await {
        tracing::warn!(error = %e, "flushing the disk cache failed");
    }
    let _ = std::fs::remove_file(&cfg.socket);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The current user's primary group's name, from `id -gn`.
    fn primary_group() -> String {
        let o = std::process::Command::new("id")
            .arg("-gn")
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn a_socket_group_is_a_name_or_a_numeric_gid_and_an_unknown_one_is_named() {
        // SAFETY: getgid has no preconditions.
        let gid = unsafe { libc::getgid() };
        let name = primary_group();
        assert_eq!(SocketGroup::resolve(&name).unwrap().gid, gid);
        assert_eq!(SocketGroup::resolve("4242").unwrap().gid, 4242);
        for bad in ["no-such-group-agentd", "nul\0byte", ""] {
            let e = SocketGroup::resolve(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn the_socket_is_bound_in_its_group_with_mode_0660() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let group = SocketGroup::resolve(&primary_group()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _listener = rt
            .block_on(async { bind_socket(&path, Some(&group)) })
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.gid(), meta.mode() & 0o777), (group.gid, 0o660));
    }
}
