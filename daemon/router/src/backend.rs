//! The daemons behind the router: one [`Backend`] per `--daemon` address, with its gRPC
//! channel, what its health checks said (node number, restart epoch, up or down) and the
//! sessions this router placed there.
//!
//! A background task per daemon ([`Backends::poll`]) calls Health every [`POLL_INTERVAL`]. A
//! daemon must report a node number (`agentd serve --node N`), unique among the daemons: one
//! without, or with a node another live daemon already has, is not used (an error is logged).
//! A new epoch means the daemon restarted: the sessions counted there are gone.

use crate::RouterError;
use agentd_wire::proto::{self, agentd_client::AgentdClient};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

/// How often each daemon's health is checked.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a health check may take before the daemon counts as down.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// A daemon's address: `unix:/path/to/agentd.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonAddr {
    /// The Unix socket.
    pub socket: PathBuf,
}

impl std::str::FromStr for DaemonAddr {
    type Err = RouterError;

    fn from_str(s: &str) -> Result<Self, RouterError> {
        match s.strip_prefix("unix:") {
            Some(p) if !p.is_empty() => Ok(Self {
                socket: PathBuf::from(p),
            }),
            _ => Err(RouterError::BadAddress(s.to_owned())),
        }
    }
}

impl std::fmt::Display for DaemonAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unix:{}", self.socket.display())
    }
}

/// What the last health checks said about a daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Its node number, once it answered (kept while it is down, so its sessions are still
    /// known to be its).
    pub node: Option<u8>,
    /// Its restart epoch, once it answered.
    pub epoch: Option<u64>,
    /// Whether the last check succeeded (and the daemon is usable).
    pub up: bool,
    /// Why it is down or unusable.
    pub error: Option<String>,
}

/// One daemon behind the router.
#[derive(Debug)]
pub struct Backend {
    /// Its address.
    pub addr: DaemonAddr,
    client: AgentdClient<Channel>,
    health: Mutex<Health>,
    /// Sessions placed there by this router and not closed.
    sessions: AtomicU64,
}

impl Backend {
    /// A backend for `addr`; nothing connects until the first call.
    pub fn new(addr: DaemonAddr) -> Result<Self, RouterError> {
        let socket = addr.socket.clone();
        let channel = Endpoint::try_from("http://agentd.local")
            .map_err(|e| RouterError::BadAddress(format!("{addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }));
        Ok(Self {
            addr,
            client: AgentdClient::new(channel),
            health: Mutex::new(Health::default()),
            sessions: AtomicU64::new(0),
        })
    }

    /// A client on the daemon's channel (cheap: clones share the connection).
    pub fn client(&self) -> AgentdClient<Channel> {
        self.client.clone()
    }

    /// What the health checks said last.
    pub fn health(&self) -> Health {
        self.health.lock().expect("health lock").clone()
    }

    /// Sets what the health checks said (tests of routing and placement).
    #[cfg(test)]
    pub(crate) fn set_health(&self, h: Health) {
        *self.health.lock().expect("health lock") = h;
    }

    /// Its node number, if known.
    pub fn node(&self) -> Option<u8> {
        self.health().node
    }

    /// Whether it is up and usable.
    pub fn is_up(&self) -> bool {
        self.health().up
    }

    /// Sessions this router placed there and that are open.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Counts a session opened there.
    pub fn opened(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session closed there.
    pub fn closed(&self) {
        let _ = self
            .sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// Its name in messages: `daemon node 2 (unix:/path)`.
    pub fn name(&self) -> String {
        match self.node() {
            Some(n) => format!("daemon node {n} ({})", self.addr),
            None => format!("daemon {}", self.addr),
        }
    }

    /// Marks it down after a failed call, so new sessions go elsewhere until a health check
    /// succeeds again.
    pub fn mark_down(&self, why: &str) {
        let mut h = self.health.lock().expect("health lock");
        if h.up {
            tracing::warn!(daemon = %self.addr, node = ?h.node, error = why, "daemon down");
        }
        h.up = false;
        h.error = Some(why.to_owned());
    }

    /// A daemon's status as the router's caller sees it: statuses the daemon sent pass
    /// through; a failure to reach it (the connection refused or broken) becomes UNAVAILABLE
    /// naming the daemon, and marks it down.
    pub fn status(&self, s: Status) -> Status {
        if is_transport(&s) {
            let why = cause(&s);
            self.mark_down(&why);
            return Status::unavailable(format!("{} is unavailable: {why}", self.name()));
        }
        match s.code() {
            Code::Internal | Code::Unknown | Code::DataLoss => {
                tracing::error!(daemon = %self.addr, code = ?s.code(), error = s.message(), "daemon call failed");
            }
            code => {
                tracing::debug!(daemon = %self.addr, ?code, error = s.message(), "daemon refused a call")
            }
        }
        s
    }

    /// Runs one health check and records what it said. `taken` says whether another backend
    /// already uses a node number.
    async fn check(&self, taken: impl Fn(u8) -> bool) {
        let mut client = self.client();
        let reply = tokio::time::timeout(HEALTH_TIMEOUT, client.health(proto::HealthRequest {}))
            .await
            .map_err(|_| format!("no answer to a health check within {HEALTH_TIMEOUT:?}"))
            .and_then(|r| r.map_err(|s| cause(&s)));
        let mut h = self.health.lock().expect("health lock");
        match reply {
            Err(why) => {
                if h.up || h.error.as_deref() != Some(&why) {
                    tracing::warn!(daemon = %self.addr, node = ?h.node, error = %why, "daemon down");
                }
                h.up = false;
                h.error = Some(why);
            }
            Ok(r) => {
                let r = r.into_inner();
                let node = u8::try_from(r.node).ok().filter(|&n| n <= 127);
                let unusable = match node {
                    _ if !r.has_node => Some(format!(
                        "{} has no node number: start it with `agentd serve --node N`, unique per daemon",
                        self.addr
                    )),
                    None => Some(format!("{} reports node {}, out of 0-127", self.addr, r.node)),
                    Some(n) if taken(n) => Some(format!(
                        "{} reports node {n}, which another daemon behind this router has: every daemon needs its own --node",
                        self.addr
                    )),
                    Some(_) => None,
                };
                if let Some(why) = unusable {
                    if h.error.as_deref() != Some(&why) {
                        tracing::error!(daemon = %self.addr, "{why}");
                    }
                    h.up = false;
                    h.error = Some(why);
                    return;
                }
                if h.epoch.is_some_and(|e| e != r.epoch) || (h.node.is_some() && h.node != node) {
                    tracing::warn!(daemon = %self.addr, ?node, "daemon restarted: forgetting the sessions counted there");
                    self.sessions.store(0, Ordering::Relaxed);
                }
                if !h.up {
                    tracing::info!(daemon = %self.addr, ?node, "daemon up");
                }
                *h = Health {
                    node,
                    epoch: Some(r.epoch),
                    up: r.ready,
                    error: (!r.ready).then(|| "not ready".to_owned()),
                };
            }
        }
    }
}

/// Whether a status is the transport's (the daemon could not be reached, or the connection
/// broke) rather than the daemon's own answer.
fn is_transport(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        // A connection reset mid-call surfaces as UNKNOWN with the h2/hyper error as source.
        Code::Unknown => std::error::Error::source(s).is_some(),
        _ => false,
    }
}

/// The innermost cause of a status, for messages ("Connection refused (os error 111)").
fn cause(s: &Status) -> String {
    let mut why = s.message().to_owned();
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        why = c.to_string();
        cause = c.source();
    }
    why
}

/// Every daemon behind the router.
#[derive(Debug)]
pub struct Backends {
    all: Vec<Arc<Backend>>,
}

impl Backends {
    /// Backends for `addrs` (at least one, no address twice).
    pub fn new(addrs: Vec<DaemonAddr>) -> Result<Self, RouterError> {
        if addrs.is_empty() {
            return Err(RouterError::NoDaemons);
        }
        for (i, a) in addrs.iter().enumerate() {
            if addrs[..i].contains(a) {
                return Err(RouterError::BadAddress(format!("{a} is given twice")));
            }
        }
        let all = addrs
            .into_iter()
            .map(|a| Backend::new(a).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Self { all })
    }

    /// Every backend, in `--daemon` order.
    pub fn all(&self) -> &[Arc<Backend>] {
        &self.all
    }

    /// The backend whose node is `node` (up or down), if any daemon reported it.
    pub fn by_node(&self, node: u8) -> Option<&Arc<Backend>> {
        self.all.iter().find(|b| {
            let h = b.health();
            h.node == Some(node) && (h.up || !is_conflict(&h))
        })
    }

    /// The backends that are up.
    pub fn live(&self) -> Vec<Arc<Backend>> {
        self.all.iter().filter(|b| b.is_up()).cloned().collect()
    }

    /// Checks every daemon's health once, in `--daemon` order.
    pub async fn check_all(&self) {
        for (i, b) in self.all.iter().enumerate() {
            let others: Vec<Health> = self
                .all
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, o)| o.health())
                .collect();
            b.check(|n| others.iter().any(|o| o.up && o.node == Some(n)))
                .await;
        }
    }

    /// Daemons reporting the same node number, as an error naming them (for start-up).
    pub fn duplicate_nodes(&self) -> Option<String> {
        let dup: Vec<String> = self
            .all
            .iter()
            .filter_map(|b| b.health().error.filter(|e| e.contains("another daemon")))
            .collect();
        (!dup.is_empty()).then(|| dup.join("; "))
    }

    /// Checks every daemon's health every [`POLL_INTERVAL`], forever.
    pub async fn poll(self: Arc<Self>) {
        loop {
            self.check_all().await;
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Whether a backend was refused for a node number another one has.
fn is_conflict(h: &Health) -> bool {
    h.error
        .as_deref()
        .is_some_and(|e| e.contains("another daemon"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_addresses_are_unix_paths() {
        let a: DaemonAddr = "unix:/run/a.sock".parse().unwrap();
        assert_eq!(a.socket, PathBuf::from("/run/a.sock"));
        assert_eq!(a.to_string(), "unix:/run/a.sock");
        for bad in ["/run/a.sock", "unix:", "tcp://127.0.0.1:1"] {
            let e = bad.parse::<DaemonAddr>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[tokio::test]
    async fn a_daemon_nobody_answers_for_is_down_and_named_in_statuses() {
        let dir = std::env::temp_dir().join(format!("agentd-router-{}", std::process::id()));
        let addr: DaemonAddr = format!("unix:{}/none.sock", dir.display()).parse().unwrap();
        let backends = Backends::new(vec![addr.clone()]).unwrap();
        backends.check_all().await;
        let b = &backends.all()[0];
        assert!(!b.is_up());
        assert!(backends.live().is_empty());
        let s = b.status(Status::unavailable("transport error"));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains(&addr.to_string()), "{s:?}");
        // The daemon's own answers pass through.
        let s = b.status(Status::not_found("session 7 not found"));
        assert_eq!(s.message(), "session 7 not found");
    }

    #[test]
    fn an_address_given_twice_or_none_is_refused() {
        let a: DaemonAddr = "unix:/a.sock".parse().unwrap();
        assert!(Backends::new(vec![a.clone(), a]).is_err());
        assert!(matches!(Backends::new(vec![]), Err(RouterError::NoDaemons)));
    }
}
