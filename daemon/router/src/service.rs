//! [`RouterService`]: the `agentd.v1` API in front of the daemons. Each call identifies its
//! caller with the daemon's own rules ([`Access`]) and goes on to a daemon as that caller
//! (`x-agentd-tenant`, and `x-agentd-operator` for the router's operators):
//!
//! - calls that name a session go to the daemon whose node the id carries (a fork stays there);
//! - new sessions go where [`Policy`] places them; sessions from a prefix make sure the prefix
//!   is registered on that daemon first (`prefixes`);
//! - ModelInfo and Tokenize go to any live daemon; Stats and EvictCache to all (`fanout`).
//!
//! A daemon that cannot be reached makes its calls UNAVAILABLE, naming it ("daemon node 2
//! (unix:/run/b.sock) is unavailable: …"); new sessions then go elsewhere.

use crate::backend::{Backend, Backends};
use crate::placement::{CacheNamespace, Cached, Candidate, Policy, PrefixIndex};
use crate::registry::Registry;
use agentd_scheduler::node_of_id;
use agentd_service::access::{Access, Caller, OPERATOR_HEADER, TENANT_HEADER};
use agentd_wire::proto::{self, agentd_server::Agentd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};

/// The router's service.
pub struct RouterService {
    pub(crate) backends: Arc<Backends>,
    pub(crate) access: Access,
    pub(crate) policy: Policy,
    /// What the daemons' caches hold (with `--kv-tier`), if known.
    pub(crate) index: Option<Arc<dyn PrefixIndex>>,
    /// Whether the daemons share a KV tier: a prefix registered on one daemon is then
    /// loadable by the others.
    pub(crate) shared_tier: bool,
    pub(crate) registry: Registry,
    /// Incremented per placement: ties and round-robin.
    turn: AtomicU64,
    /// Chosen at start, for Health.
    epoch: u64,
}

/// A request to a daemon on behalf of `caller`.
pub(crate) fn forward<T>(caller: &Caller, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        TENANT_HEADER,
        tonic::metadata::MetadataValue::from(caller.tenant),
    );
    if caller.operator {
        r.metadata_mut().insert(
            OPERATOR_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
    }
    r
}

impl RouterService {
    /// A service over `backends` with these access rules and placement policy; `index` tells
    /// placement what the daemons hold; `shared_tier` says whether they share a KV tier.
    pub fn new(
        backends: Arc<Backends>,
        access: Access,
        policy: Policy,
        index: Option<Arc<dyn PrefixIndex>>,
        shared_tier: bool,
    ) -> Self {
        Self {
            backends,
            access,
            policy,
            index,
            shared_tier,
            registry: Registry::default(),
            turn: AtomicU64::new(0),
            epoch: rand::random(),
        }
    }

    /// The caller, recorded in the call's span.
    pub(crate) fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let c = self.access.caller(req)?;
        tracing::Span::current().record("tenant", c.tenant);
        Ok(c)
    }

    /// The caller, who must be an operator of the router.
    pub(crate) fn operator<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let c = self.access.operator(req)?;
        tracing::Span::current().record("tenant", c.tenant);
        Ok(c)
    }

    /// The daemon that made session `id` (its node is in the id). An id no daemon could have
    /// made is NOT_FOUND, as an unknown id is on a daemon.
    pub(crate) fn session_backend(&self, id: u64) -> Result<Arc<Backend>, Status> {
        tracing::Span::current().record("session", id);
        let node = node_of_id(id);
        let b = self
            .backends
            .by_node(node)
            .ok_or_else(|| Status::not_found(format!("session {id} not found")))?;
        tracing::Span::current().record("node", node);
        Ok(b.clone())
    }

    /// The daemon for a new session (or prefix) whose prompt is `prompt` in namespace `ns`;
    /// `held` are the nodes where its first `held_tokens` tokens are registered (pinned).
    /// UNAVAILABLE when no daemon is up.
    pub(crate) fn place(
        &self,
        prompt: &[u32],
        ns: CacheNamespace,
        held: &[u8],
        held_tokens: usize,
    ) -> Result<Arc<Backend>, Status> {
        let known: Vec<(Arc<Backend>, u8)> = self
            .backends
            .all()
            .iter()
            .filter_map(|b| b.node().map(|n| (b.clone(), n)))
            .collect();
        let up: Vec<u8> = known
            .iter()
            .filter(|(b, _)| b.is_up())
            .map(|(_, n)| *n)
            .collect();
        let cached_up = match &self.index {
            Some(index) => index.cached_all(&up, ns, prompt),
            None => vec![Default::default(); up.len()],
        };
        let candidates: Vec<Candidate> = known
            .iter()
            .map(|(b, node)| {
                let mut cached = match up.iter().position(|n| n == node) {
                    Some(i) if b.is_up() => cached_up[i],
                    _ => Cached::default(),
                };
                if held.contains(node) {
                    cached.local = cached.local.max(held_tokens);
                }
                if self.shared_tier && !held.is_empty() {
                    cached.anywhere = cached.anywhere.max(held_tokens);
                }
                Candidate {
                    node: *node,
                    up: b.is_up(),
                    sessions: b.sessions(),
                    cached,
                }
            })
            .collect();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let i = self
            .policy
            .choose(prompt.len(), &candidates, turn)
            .ok_or_else(|| self.none_up())?;
        tracing::Span::current().record("node", known[i].1);
        Ok(known[i].0.clone())
    }

    /// UNAVAILABLE: no daemon is up, with why each is down.
    pub(crate) fn none_up(&self) -> Status {
        let why: Vec<String> = self
            .backends
            .all()
            .iter()
            .map(|b| {
                format!(
                    "{}: {}",
                    b.name(),
                    b.health().error.unwrap_or_else(|| "not checked yet".into())
                )
            })
            .collect();
        Status::unavailable(format!("no daemon is available ({})", why.join("; ")))
    }

    /// Runs `f` on the first live daemon that answers (another if one is unreachable).
    pub(crate) async fn on_any<R, F, Fut>(&self, f: F) -> Result<R, Status>
    where
        F: Fn(Arc<Backend>) -> Fut,
        Fut: std::future::Future<Output = Result<R, Status>>,
    {
        let mut last = None;
        for b in self.backends.live() {
            match f(b.clone()).await.map_err(|s| b.status(s)) {
                Err(s) if s.code() == Code::Unavailable => last = Some(s),
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| self.none_up()))
    }

    /// Opens a session on a placed daemon: from `prefix` (a router prefix id, or 0) plus
    /// `tokens`. A daemon found unreachable is skipped and another chosen.
    async fn create(
        &self,
        caller: &Caller,
        prefix: u64,
        tokens: Vec<u32>,
    ) -> Result<proto::SessionReply, Status> {
        let p = match prefix {
            0 => None,
            id => Some(
                self.registry
                    .get(id, caller.tenant, false)
                    .ok_or_else(|| Status::not_found(format!("prefix {id} not found")))?,
            ),
        };
        let (prompt, ns) = match &p {
            None => (tokens.clone(), CacheNamespace::Tenant(caller.tenant)),
            Some(p) => (
                p.tokens.iter().chain(&tokens).copied().collect(),
                crate::prefixes::namespace(p),
            ),
        };
        let held_tokens = p.as_ref().map_or(0, |p| p.tokens.len());
        let mut last = None;
        for _ in 0..=self.backends.all().len() {
            let held = p.as_ref().map(|p| p.nodes()).unwrap_or_default();
            let b = self.place(&prompt, ns, &held, held_tokens)?;
            let prefix_id = match &p {
                None => 0,
                Some(p) => match self.ensure_on(p, &b).await {
                    Ok(id) => id,
                    Err(s) if s.code() == Code::Unavailable => {
                        last = Some(s);
                        continue;
                    }
                    Err(s) => return Err(s),
                },
            };
            let req = proto::CreateSessionRequest {
                prefix_id,
                tokens: tokens.clone(),
            };
            match b.client().create_session(forward(caller, req)).await {
                Ok(r) => {
                    b.opened();
                    return Ok(r.into_inner());
                }
                Err(s) => {
                    let s = b.status(s);
                    match (s.code(), &p) {
                        // Another daemon is tried (this one is marked down).
                        (Code::Unavailable, _) => last = Some(s),
                        // The daemon lost the prefix (it restarted without it): registered
                        // again on the next try.
                        (Code::NotFound, Some(p)) => {
                            if let Some(node) = b.node() {
                                p.on.lock().await.remove(&node);
                            }
                            last = Some(s);
                        }
                        _ => return Err(s),
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| self.none_up()))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateEvent, Status>> + Send>>;

/// A call on the daemon that made session `$id`, forwarded as `$caller`.
macro_rules! on_session {
    ($self:ident, $caller:expr, $id:expr, $method:ident, $msg:expr) => {{
        let b = $self.session_backend($id)?;
        let r = b
            .client()
            .$method(forward(&$caller, $msg))
            .await
            .map_err(|s| b.status(s))?;
        (b, r)
    }};
}

#[tonic::async_trait]
impl Agentd for RouterService {
    #[tracing::instrument(name = "route", skip_all, fields(method = "health"))]
    async fn health(
        &self,
        _req: Request<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthReply>, Status> {
        Ok(Response::new(proto::HealthReply {
            version: env!("CARGO_PKG_VERSION").into(),
            ready: !self.backends.live().is_empty(),
            node: 0,
            has_node: false,
            epoch: self.epoch,
        }))
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "model_info", tenant = tracing::field::Empty))]
    async fn model_info(
        &self,
        req: Request<proto::ModelInfoRequest>,
    ) -> Result<Response<proto::ModelInfoReply>, Status> {
        let c = self.caller(&req)?;
        let msg = req.into_inner();
        self.on_any(|b| {
            let req = forward(&c, msg);
            async move { b.client().model_info(req).await }
        })
        .await
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "tokenize", tenant = tracing::field::Empty))]
    async fn tokenize(
        &self,
        req: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeReply>, Status> {
        let c = self.caller(&req)?;
        let msg = req.into_inner();
        self.on_any(|b| {
            let req = forward(&c, msg.clone());
            async move { b.client().tokenize(req).await }
        })
        .await
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "register_prefix", tenant = tracing::field::Empty, node = tracing::field::Empty))]
    async fn register_prefix(
        &self,
        req: Request<proto::RegisterPrefixRequest>,
    ) -> Result<Response<proto::RegisterPrefixReply>, Status> {
        let c = if req.get_ref().publish {
            self.operator(&req)?
        } else {
            self.caller(&req)?
        };
        self.register(&c, req.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "create_session", tenant = tracing::field::Empty, node = tracing::field::Empty))]
    async fn create_session(
        &self,
        req: Request<proto::CreateSessionRequest>,
    ) -> Result<Response<proto::SessionReply>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        self.create(&c, r.prefix_id, r.tokens)
            .await
            .map(Response::new)
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "fork_session", tenant = tracing::field::Empty, session = tracing::field::Empty, node = tracing::field::Empty))]
    async fn fork_session(
        &self,
        req: Request<proto::SessionRef>,
    ) -> Result<Response<proto::SessionReply>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let (b, reply) = on_session!(self, c, r.session_id, fork_session, r);
        b.opened();
        Ok(reply)
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "close_session", tenant = tracing::field::Empty, session = tracing::field::Empty, node = tracing::field::Empty))]
    async fn close_session(
        &self,
        req: Request<proto::SessionRef>,
    ) -> Result<Response<proto::CloseReply>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let (b, reply) = on_session!(self, c, r.session_id, close_session, r);
        b.closed();
        Ok(reply)
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "append", tenant = tracing::field::Empty, session = tracing::field::Empty, node = tracing::field::Empty))]
    async fn append(
        &self,
        req: Request<proto::AppendRequest>,
    ) -> Result<Response<proto::SessionReply>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        Ok(on_session!(self, c, r.session_id, append, r).1)
    }

    type GenerateStream = EventStream;

    #[tracing::instrument(name = "route", skip_all, fields(method = "generate", tenant = tracing::field::Empty, session = tracing::field::Empty, node = tracing::field::Empty))]
    async fn generate(
        &self,
        req: Request<proto::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let (b, reply) = on_session!(self, c, r.session_id, generate, r);
        // Event by event; dropping this stream (the client went away) drops the daemon's,
        // which cancels the generation there.
        let span = tracing::Span::current();
        let stream = reply.into_inner().map(move |ev| {
            ev.map_err(|s| {
                let _in = span.enter();
                let s = b.status(s);
                tracing::warn!(code = ?s.code(), error = s.message(), "generation stream failed");
                s
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "rewrite", tenant = tracing::field::Empty, session = tracing::field::Empty, node = tracing::field::Empty))]
    async fn rewrite(
        &self,
        req: Request<proto::RewriteRequest>,
    ) -> Result<Response<proto::SessionReply>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        Ok(on_session!(self, c, r.session_id, rewrite, r).1)
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "session_tokens", tenant = tracing::field::Empty, session = tracing::field::Empty, node = tracing::field::Empty))]
    async fn session_tokens(
        &self,
        req: Request<proto::SessionRef>,
    ) -> Result<Response<proto::TokensReply>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        Ok(on_session!(self, c, r.session_id, session_tokens, r).1)
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "stats", tenant = tracing::field::Empty))]
    async fn stats(
        &self,
        req: Request<proto::StatsRequest>,
    ) -> Result<Response<proto::StatsReply>, Status> {
        let c = if req.get_ref().all_tenants {
            self.operator(&req)?
        } else {
            self.caller(&req)?
        };
        self.stats_all(&c, req.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "drop_prefix", tenant = tracing::field::Empty))]
    async fn drop_prefix(
        &self,
        req: Request<proto::PrefixRef>,
    ) -> Result<Response<proto::DropPrefixReply>, Status> {
        let c = self.caller(&req)?;
        self.forget(&c, req.into_inner().prefix_id, false)
            .await
            .map(|()| Response::new(proto::DropPrefixReply {}))
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "list_prefixes", tenant = tracing::field::Empty))]
    async fn list_prefixes(
        &self,
        req: Request<proto::ListPrefixesRequest>,
    ) -> Result<Response<proto::ListPrefixesReply>, Status> {
        let all = req.get_ref().all_tenants;
        let c = if all {
            self.operator(&req)?
        } else {
            self.caller(&req)?
        };
        self.list(&c, all).await.map(Response::new)
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "publish_prefix", tenant = tracing::field::Empty))]
    async fn publish_prefix(
        &self,
        req: Request<proto::PrefixRef>,
    ) -> Result<Response<proto::RegisterPrefixReply>, Status> {
        let c = self.operator(&req)?;
        self.publish(&c, req.into_inner().prefix_id)
            .await
            .map(Response::new)
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "unpin_prefix", tenant = tracing::field::Empty))]
    async fn unpin_prefix(
        &self,
        req: Request<proto::PrefixRef>,
    ) -> Result<Response<proto::DropPrefixReply>, Status> {
        let c = self.operator(&req)?;
        self.forget(&c, req.into_inner().prefix_id, true)
            .await
            .map(|()| Response::new(proto::DropPrefixReply {}))
    }

    #[tracing::instrument(name = "route", skip_all, fields(method = "evict_cache", tenant = tracing::field::Empty))]
    async fn evict_cache(
        &self,
        req: Request<proto::EvictCacheRequest>,
    ) -> Result<Response<proto::EvictCacheReply>, Status> {
        let c = self.operator(&req)?;
        self.evict_all(&c, req.into_inner())
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DaemonAddr, Health};
    use agentd_service::access::Tenancy;
    use proptest::prelude::*;

    /// A router over daemons with nodes `nodes` (`None`: never answered), up or down.
    fn router(nodes: &[(Option<u8>, bool)]) -> RouterService {
        let addrs = (0..nodes.len())
            .map(|i| {
                format!("unix:/nowhere/{i}.sock")
                    .parse::<DaemonAddr>()
                    .unwrap()
            })
            .collect();
        // Channels are made inside a runtime (never used here: nothing is called).
        static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        let rt = RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap());
        let _in_rt = rt.enter();
        let backends = Arc::new(Backends::new(addrs).unwrap());
        for (b, &(node, up)) in backends.all().iter().zip(nodes) {
            b.set_health(Health {
                node,
                epoch: node.map(|_| 1),
                up,
                error: (!up).then(|| "connection refused".into()),
            });
        }
        let access = Access {
            tenancy: Tenancy::Single,
            tokens: Default::default(),
            operators: Default::default(),
            server: "router",
        };
        RouterService::new(backends, access, Policy::default(), None, false)
    }

    proptest! {
        #[test]
        fn a_session_goes_to_the_daemon_whose_node_its_id_carries(
            low in 0u64..(1 << 56), node in 0u8..128, up in any::<bool>(),
        ) {
            let r = router(&[(Some(3), true), (Some(node), up), (None, false)]);
            let id = (u64::from(node) << 56) | low;
            let b = r.session_backend(id).unwrap();
            prop_assert_eq!(b.node(), Some(node));
            // Node 3 is taken by the first daemon, unless the second has it too (then either).
            if node != 3 {
                prop_assert!(Arc::ptr_eq(&b, &r.backends.all()[1]));
            }
            let other = (node + 1) % 128;
            if other != 3 {
                let e = r.session_backend((u64::from(other) << 56) | low).unwrap_err();
                prop_assert_eq!(e.code(), Code::NotFound);
            }
        }
    }

    #[test]
    fn new_sessions_go_to_live_daemons_only_and_none_up_is_unavailable_naming_them() {
        let r = router(&[(Some(1), false), (Some(2), true), (None, false)]);
        for _ in 0..4 {
            let b = r
                .place(&[1, 2, 3], CacheNamespace::Tenant(0), &[], 0)
                .unwrap();
            assert_eq!(b.node(), Some(2));
        }
        let r = router(&[(Some(1), false), (None, false)]);
        let e = r
            .place(&[1], CacheNamespace::Tenant(0), &[], 0)
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(
            e.message()
                .contains("daemon node 1 (unix:/nowhere/0.sock): connection refused"),
            "{e:?}"
        );
    }

    #[test]
    fn a_daemon_holding_a_registered_prefix_is_preferred_when_placing_by_cache() {
        let mut r = router(&[(Some(1), true), (Some(2), true)]);
        r.policy.placement = crate::Placement::Cache;
        let prompt: Vec<u32> = (0..100).collect();
        for _ in 0..4 {
            let b = r
                .place(&prompt, CacheNamespace::Tenant(0), &[2], 80)
                .unwrap();
            assert_eq!(b.node(), Some(2));
        }
    }
}
