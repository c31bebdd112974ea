//! The gRPC service (`agentd.v1.Agentd`): each RPC checks its input, finds the caller's tenant
//! from the connection, does the request's slow preparation on the caller's side (rendering and
//! tokenizing messages, compiling a constraint on a blocking worker), and forwards to the
//! scheduler thread through [`SchedulerHandle`].
//!
//! - [`serve`]: the Unix socket (permissions, stale sockets, a live daemon already there) and
//!   graceful shutdown on SIGTERM/SIGINT.
//! - `request`: wire requests → the engine's types (messages, sampling, constraints), with
//!   their checks.
//! - `status`: scheduler errors → gRPC statuses.
//! - [`http`]: the OpenAI-compatible HTTP API and `/metrics` on the same service.
//! - [`metrics`]: Prometheus metrics, fed by both front ends.
//! - [`access`]: who is calling — tenancy from the connection, operators, and the delegation
//!   headers `agentd route` sends as an operator (shared with the router).
//! - [`authority`]: the Unix socket's connections rewritten so that any gRPC client's
//!   `:authority` (grpc-core sends the socket path) is one h2 accepts.

pub mod access;
pub mod authority;
#[cfg(test)]
mod fuzz_tests;
pub mod http;
pub mod metrics;
mod request;
pub mod serve;
mod status;

pub use access::Tenancy;
use agentd_engine::{GenerateOptions, LoadedModel};
use agentd_scheduler::{AppendInput, Event, PrefixId, SchedulerHandle, SessionId, TenantId};
use agentd_wire::proto::{self, agentd_server::Agentd, generate_event};
use request::{chat_messages, constraint_spec, finish_fields, sampling_params};
use status::to_status;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::{wrappers::UnboundedReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

/// The service: the scheduler, the model it runs (for rendering, tokenizing and compiling
/// constraints off the scheduler thread) and the tenancy rules.
pub struct AgentdService {
    sched: SchedulerHandle,
    model: Arc<LoadedModel>,
    /// Tenancy, bearer tokens (`access.tokens`, also the HTTP API's) and operators.
    access: access::Access,
    /// This daemon's node number (`--node`), for Health.
    node: Option<u8>,
    /// Chosen at random when the daemon started, for Health.
    epoch: u64,
    page_size: usize,
    pool_pages: usize,
    /// The model file's SHA-256, hashed once on first use (on a blocking worker).
    model_sha256: tokio::sync::OnceCell<String>,
    /// Bounds how many constraints compile at once: each holds a blocking worker, and one
    /// that runs past its budget keeps it until it ends.
    compiles: Arc<tokio::sync::Semaphore>,
    /// Bounds how many renderings and tokenizations run at once, leaving cores for the
    /// scheduler and the runtime's workers.
    heavy: Arc<tokio::sync::Semaphore>,
    /// The names the model answers to over HTTP; the first is its id.
    model_names: Vec<String>,
    /// Request metrics, fed by every front end.
    metrics: Arc<metrics::Metrics>,
}

/// How many constraints may compile at once.
const CONCURRENT_COMPILES: usize = 2;

/// The longest text Tokenize accepts, in bytes.
const MAX_TOKENIZE_BYTES: usize = 1 << 20;

impl AgentdService {
    /// A service over the scheduler `sched` running `model`; `tokens` maps TCP bearer tokens
    /// to tenants; `operators` are the Unix uids allowed the admin RPCs; `model_names` are the
    /// names the model answers to over HTTP (the first is its id; the file's name and stem are
    /// added); `metrics` records every request.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sched: SchedulerHandle,
        model: Arc<LoadedModel>,
        tenancy: Tenancy,
        tokens: std::collections::HashMap<String, TenantId>,
        operators: std::collections::HashSet<u32>,
        page_size: usize,
        pool_pages: usize,
        model_names: Vec<String>,
        metrics: Arc<metrics::Metrics>,
    ) -> Self {
        let mut names = model_names;
        let file = model
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let stem = model
            .path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned());
        for n in [file, stem].into_iter().flatten() {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        Self {
            model_names: names,
            metrics,
            sched,
            model,
            access: access::Access {
                tenancy,
                tokens,
                operators,
                server: "daemon",
            },
            node: None,
            epoch: 0,
            page_size,
            pool_pages,
            model_sha256: tokio::sync::OnceCell::new(),
            compiles: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_COMPILES)),
            heavy: Arc::new(tokio::sync::Semaphore::new(heavy_workers())),
        }
    }

    /// Runs `f` (rendering, tokenizing: work that grows with the request) on tokio's blocking
    /// pool, at most [`heavy_workers`] at once: it must hold neither the scheduler thread nor
    /// the runtime's workers, which answer every other call, health checks included.
    async fn heavy<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let permit = self
            .heavy
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("the daemon is shutting down"))?;
        blocking(move || {
            let _permit = permit;
            f()
        })
        .await
    }

    /// Tokens for messages (see [`agentd_engine::render::message_tokens`]), rendered off the
    /// runtime; a status on failure.
    async fn render(
        &self,
        msgs: Vec<proto::Message>,
        continuing: bool,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, Status> {
        let engine = self.model.clone();
        self.heavy(move || {
            let msgs = chat_messages(msgs)?;
            agentd_engine::render::message_tokens(&engine, &msgs, continuing, add_generation_prompt)
                .map_err(status::invalid)
        })
        .await
    }

    /// The model file's SHA-256 (hashed on first use).
    async fn model_sha256(&self) -> Result<String, Status> {
        self.model_sha256
            .get_or_try_init(|| {
                let path = self.model.path.clone();
                blocking(move || {
                    agentd_engine::model_files::sha256_file(&path)
                        .map_err(|e| status::internal(format!("hashing the model file: {e}")))
                })
            })
            .await
            .cloned()
    }

    /// Whether the caller is an operator (see [`Self::operator`]).
    fn is_operator<T>(&self, req: &Request<T>) -> bool {
        self.access.caller(req).is_ok_and(|c| c.operator)
    }

    /// Sets what Health reports: the daemon's node number and its start epoch.
    pub fn with_identity(mut self, node: Option<u8>, epoch: u64) -> Self {
        self.node = node;
        self.epoch = epoch;
        self
    }

    /// Compiles the generation's options (its constraint) on a blocking worker, within the
    /// constraint limits' time budget.
    async fn decoding(&self, opts: GenerateOptions) -> Result<agentd_engine::Decoding, Status> {
        let budget = agentd_engine::constraint::ConstraintLimits::default().max_compile;
        let deadline = tokio::time::Instant::now() + budget;
        let permit = if opts.constraint.is_some() {
            let permit = tokio::time::timeout_at(deadline, self.compiles.clone().acquire_owned())
                .await
                .map_err(|_| {
                    Status::resource_exhausted(format!(
                        "other constraints are compiling and none finished within {budget:?}; try again"
                    ))
                })?
                .map_err(|_| Status::unavailable("the daemon is shutting down"))?;
            Some(permit)
        } else {
            None
        };
        let model = self.model.clone();
        let work = tokio::task::spawn_blocking(move || {
            // Held until the compilation really ends, even when the caller gave up on it.
            let _permit = permit;
            model.decoding(&opts)
        });
        let joined = tokio::time::timeout_at(deadline, work).await.map_err(|_| {
            tracing::warn!(?budget, "a constraint's compilation ran past its budget");
            Status::invalid_argument(format!(
                "the constraint took longer than the limit of {budget:?} to compile; simplify it"
            ))
        })?;
        match joined {
            Ok(Ok(dec)) => Ok(dec),
            Ok(Err(agentd_engine::EngineError::Constraint(
                e @ agentd_engine::constraint::ConstraintError::Crashed { .. },
            ))) => {
                if let agentd_engine::constraint::ConstraintError::Crashed { detail } = &e {
                    tracing::error!(panic = %status::cap(detail), "the grammar library panicked");
                }
                Err(Status::invalid_argument(e.to_string()))
            }
            Ok(Err(e)) => Err(status::invalid(e)),
            Err(e) => Err(status::internal(format!("preparing the generation: {e}"))),
        }
    }

    /// The caller's tenant: over the Unix socket from the connection's peer credentials (or an
    /// operator's delegation header), over TCP from its bearer token; never from a request
    /// field (see [`access::Access::caller`]).
    fn tenant<T>(&self, req: &Request<T>) -> Result<TenantId, Status> {
        let span = tracing::Span::current();
        span.record("request", status::request_id());
        let tenant = self.access.caller(req)?.tenant;
        span.record("tenant", tenant);
        Ok(tenant)
    }

    /// The caller's tenant, when the caller is an operator: a Unix-socket peer whose uid is in
    /// `operators` (acting as another tenant only with `x-agentd-operator: 1`). Anyone else
    /// gets PERMISSION_DENIED.
    fn operator<T>(&self, req: &Request<T>) -> Result<TenantId, Status> {
        let tenant = self.tenant(req)?;
        self.access.operator(req)?;
        Ok(tenant)
    }
}

/// How many renderings and tokenizations may run at once: half the cores, at least one.
fn heavy_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Runs `f` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| status::internal(format!("a blocking task failed: {e}")))?
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agentd for AgentdService {
    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "health", session = tracing::field::Empty))]
    async fn health(
        &self,
        _req: Request<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthReply>, Status> {
        Ok(Response::new(proto::HealthReply {
            version: env!("CARGO_PKG_VERSION").into(),
            ready: true,
            node: self.node.map_or(0, u32::from),
            has_node: self.node.is_some(),
            epoch: self.epoch,
        }))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "model_info", session = tracing::field::Empty))]
    async fn model_info(
        &self,
        req: Request<proto::ModelInfoRequest>,
    ) -> Result<Response<proto::ModelInfoReply>, Status> {
        self.tenant(&req)?;
        let sha256 = self.model_sha256().await?;
        let e = &self.model;
        let c = e.model.config();
        Ok(Response::new(proto::ModelInfoReply {
            name: e
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256,
            context_length: c.context_length as u32,
            vocab_size: c.vocab as u32,
            layers: c.layers as u32,
            heads: c.heads as u32,
            kv_heads: c.kv_heads as u32,
            head_dim: c.head_dim as u32,
            page_size: self.page_size as u32,
            pool_pages: self.pool_pages as u32,
        }))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "tokenize", session = tracing::field::Empty))]
    async fn tokenize(
        &self,
        req: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeReply>, Status> {
        self.tenant(&req)?;
        let r = req.into_inner();
        if r.text.len() > MAX_TOKENIZE_BYTES {
            return Err(Status::invalid_argument(format!(
                "text of {} bytes is longer than the limit of {MAX_TOKENIZE_BYTES}",
                r.text.len()
            )));
        }
        let model = self.model.clone();
        let tokens = self
            .heavy(move || {
                model
                    .tokenizer
                    .encode(&r.text, r.parse_special)
                    .map_err(status::invalid)
            })
            .await?;
        Ok(Response::new(proto::TokenizeReply { tokens }))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "register_prefix", session = tracing::field::Empty))]
    async fn register_prefix(
        &self,
        req: Request<proto::RegisterPrefixRequest>,
    ) -> Result<Response<proto::RegisterPrefixReply>, Status> {
        let tenant = self.tenant(&req)?;
        let mut r = req.get_ref().clone();
        if !r.messages.is_empty() {
            if !r.tokens.is_empty() {
                return Err(Status::invalid_argument(
                    "give either tokens or messages, not both",
                ));
            }
            r.tokens = self
                .render(std::mem::take(&mut r.messages), false, false)
                .await?;
        }
        let tenant = if r.publish {
            self.operator(&req)?
        } else {
            tenant
        };
        let info = self
            .sched
            .register_prefix(tenant, r.tokens, r.publish)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::RegisterPrefixReply {
            prefix_id: info.id.0,
            tokens: info.tokens as u32,
        }))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "create_session", session = tracing::field::Empty))]
    async fn create_session(
        &self,
        req: Request<proto::CreateSessionRequest>,
    ) -> Result<Response<proto::SessionReply>, Status> {
        let tenant = self.tenant(&req)?;
        let r = req.into_inner();
        let from = (r.prefix_id != 0).then_some(PrefixId(r.prefix_id));
        let id = self
            .sched
            .create_session(tenant, from, r.tokens)
            .await
            .map_err(to_status)?;
        self.session_reply(tenant, id).await
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "fork_session", session = tracing::field::Empty))]
    async fn fork_session(
        &self,
        req: Request<proto::SessionRef>,
    ) -> Result<Response<proto::SessionReply>, Status> {
        let tenant = self.tenant(&req)?;
        let id = SessionId(req.into_inner().session_id);
        let new = self.sched.fork(tenant, id).await.map_err(to_status)?;
        self.session_reply(tenant, new).await
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "close_session", session = tracing::field::Empty))]
    async fn close_session(
        &self,
        req: Request<proto::SessionRef>,
    ) -> Result<Response<proto::CloseReply>, Status> {
        let tenant = self.tenant(&req)?;
        let id = SessionId(req.into_inner().session_id);
        self.sched.close(tenant, id).await.map_err(to_status)?;
        Ok(Response::new(proto::CloseReply {}))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "append", session = tracing::field::Empty))]
    async fn append(
        &self,
        req: Request<proto::AppendRequest>,
    ) -> Result<Response<proto::SessionReply>, Status> {
        let tenant = self.tenant(&req)?;
        let r = req.into_inner();
        let id = SessionId(r.session_id);
        tracing::Span::current().record("session", r.session_id);
        let input = match (r.tokens.is_empty(), r.messages.is_empty()) {
            (true, true) => {
                return Err(Status::invalid_argument(
                    "nothing to append: give tokens or messages",
                ))
            }
            (false, false) => {
                return Err(Status::invalid_argument(
                    "give either tokens or messages, not both",
                ))
            }
            (false, true) => AppendInput::Tokens(r.tokens),
            // Rendered here, in both forms; the scheduler picks the one that fits the log in
            // the same command that appends it.
            (true, false) => {
                let model = self.model.clone();
                let add_generation_prompt = r.add_generation_prompt;
                let messages = r.messages;
                self.heavy(move || {
                    let msgs = chat_messages(messages)?;
                    let (first, continuing) = agentd_engine::render::message_tokens_both(
                        &model,
                        &msgs,
                        add_generation_prompt,
                    );
                    Ok(AppendInput::Rendered {
                        first: first.map_err(|e| status::cap(&e.to_string())),
                        continuing: continuing.map_err(|e| status::cap(&e.to_string())),
                    })
                })
                .await?
            }
        };
        let done = self
            .sched
            .append_input(tenant, id, input)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::SessionReply {
            session_id: id.0,
            tokens: done.tokens as u32,
            epoch: done.epoch,
        }))
    }

    type GenerateStream = EventStream;

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "generate", session = tracing::field::Empty))]
    async fn generate(
        &self,
        req: Request<proto::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // TTFT and latency are measured from here, the moment the call arrived.
        let arrived = std::time::Instant::now();
        let tenant = self.tenant(&req)?;
        let r = req.into_inner();
        tracing::Span::current().record("session", r.session_id);
        let opts = GenerateOptions {
            sampling: sampling_params(r.sampling),
            max_tokens: r.max_tokens as usize,
            stop: r.stop,
            constraint: r.constraint.map(constraint_spec).transpose()?,
            ignore_eos: r.ignore_eos,
            ..GenerateOptions::default()
        };
        // Checking the options and compiling the constraint (a large grammar takes a while)
        // happen on a blocking worker, never on the scheduler thread, and fail here, before
        // the stream starts.
        let dec = self.decoding(opts).await?;
        let rx = self
            .sched
            .generate_at(tenant, SessionId(r.session_id), dec, arrived)
            .await
            .map_err(to_status)?;
        // Errors in the stream are logged in the call's span.
        let span = tracing::Span::current();
        let metrics = self.metrics.clone();
        let mut last_token: Option<std::time::Instant> = None;
        let stream = UnboundedReceiverStream::new(rx).map(move |ev| match ev {
            Event::Token { id, text, .. } => {
                let now = std::time::Instant::now();
                if let Some(last) = last_token.replace(now) {
                    metrics.observe_inter_token(now - last);
                }
                Ok(proto::GenerateEvent {
                    event: Some(generate_event::Event::Token(proto::TokenEvent { id, text })),
                })
            }
            Event::Done(u) => {
                metrics.observe_done(tenant, &u);
                let (finish_reason, stop) = finish_fields(&u.finish);
                Ok(proto::GenerateEvent {
                    event: Some(generate_event::Event::Done(proto::Usage {
                        prompt_tokens: u.prompt_tokens as u32,
                        cached_tokens: u.cached_tokens as u32,
                        generated_tokens: u.generated_tokens as u32,
                        finish_reason,
                        stop,
                        ttft_seconds: u.ttft.as_secs_f64(),
                        total_seconds: u.total.as_secs_f64(),
                        preemptions: u.preemptions,
                        constraint_seconds: u.constraint_seconds,
                        tier_cached_tokens: u.tier_cached_tokens as u32,
                    })),
                })
            }
            Event::Error(e) => {
                let _in_span = span.enter();
                Err(to_status(e))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "rewrite", session = tracing::field::Empty))]
    async fn rewrite(
        &self,
        req: Request<proto::RewriteRequest>,
    ) -> Result<Response<proto::SessionReply>, Status> {
        let tenant = self.tenant(&req)?;
        let r = req.into_inner();
        let id = SessionId(r.session_id);
        tracing::Span::current().record("session", r.session_id);
        let tokens = match (r.tokens.is_empty(), r.messages.is_empty()) {
            (false, false) => {
                return Err(Status::invalid_argument(
                    "give either tokens or messages, not both",
                ))
            }
            (_, true) if r.add_generation_prompt => {
                return Err(Status::invalid_argument(
                    "add_generation_prompt needs messages",
                ))
            }
            (_, true) => r.tokens,
            (true, false) => {
                // Rendered as an append after the tokens before `start`, which a rewrite at 0
                // does not have.
                self.render(r.messages, r.start > 0, r.add_generation_prompt)
                    .await?
            }
        };
        self.sched
            .rewrite(tenant, id, r.start as usize..r.end as usize, tokens)
            .await
            .map_err(to_status)?;
        self.session_reply(tenant, id).await
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "session_tokens", session = tracing::field::Empty))]
    async fn session_tokens(
        &self,
        req: Request<proto::SessionRef>,
    ) -> Result<Response<proto::TokensReply>, Status> {
        let tenant = self.tenant(&req)?;
        let id = SessionId(req.into_inner().session_id);
        let (tokens, epoch) = self
            .sched
            .session_tokens(tenant, id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::TokensReply { tokens, epoch }))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "stats", session = tracing::field::Empty))]
    async fn stats(
        &self,
        req: Request<proto::StatsRequest>,
    ) -> Result<Response<proto::StatsReply>, Status> {
        let all = req.get_ref().all_tenants;
        let tenant = if all {
            self.operator(&req)?
        } else {
            self.tenant(&req)?
        };
        let s = self.sched.stats().await.map_err(to_status)?;
        let tenants = s
            .tenants
            .iter()
            .filter(|_| all)
            .map(|(&t, c)| proto::TenantStats {
                tenant: t,
                sessions: c.sessions as u32,
                running: c.running as u32,
                waiting: c.waiting as u32,
                prefill_tokens: c.prefill_tokens,
                cached_tokens: c.cached_tokens,
                generated_tokens: c.generated_tokens,
            })
            .collect();
        let own = s.tenants.get(&tenant).cloned().unwrap_or_default();
        let mut reply = proto::StatsReply {
            pool_pages: s.pool_pages as u32,
            free_pages: s.free_pages as u32,
            peak_pages: s.peak_pages as u32,
            page_size: s.page_size as u32,
            page_bytes: s.page_bytes as u64,
            tree_tokens: s.tree_tokens as u64,
            steps: s.steps,
            hit_rate: s.hit_rate(),
            preemptions: s.preemptions,
            sessions: own.sessions as u32,
            running: own.running as u32,
            waiting: own.waiting as u32,
            prefill_tokens: own.prefill_tokens,
            cached_tokens: own.cached_tokens,
            generated_tokens: own.generated_tokens,
            tenants,
            disk_records: s.disk.as_ref().map_or(0, |d| d.records as u32),
            disk_bytes: s.disk.as_ref().map_or(0, |d| d.bytes),
            disk_budget: s.disk.as_ref().map_or(0, |d| d.budget),
            disk_loaded_tokens: s.disk_loaded_tokens,
            expert_load_last_step: Vec::new(),
            expert_load_total: Vec::new(),
            spec_drafted: s.spec_drafted,
            spec_accepted: s.spec_accepted,
            spec_drafted_at: s.spec_drafted_at.clone(),
            spec_accepted_at: s.spec_accepted_at.clone(),
            spec_model_drafted: s.spec_model_drafted,
            spec_model_accepted: s.spec_model_accepted,
            shared_tier: s.shared_tier.map(request::shared_tier_stats),
        };
        if self.model.model.config().experts > 0 {
            let load = self.model.model.expert_load();
            reply.expert_load_last_step = load.last_step;
            reply.expert_load_total = load.total;
        }
        // The pool-wide figures count every tenant's work: only operators see them. Others
        // see the pool's fixed shape and their own figures (their own hit rate included).
        if !self.is_operator(&req) {
            reply = proto::StatsReply {
                hit_rate: own.hit_rate(),
                free_pages: 0,
                peak_pages: 0,
                tree_tokens: 0,
                steps: 0,
                preemptions: 0,
                disk_records: 0,
                disk_bytes: 0,
                disk_loaded_tokens: 0,
                expert_load_last_step: Vec::new(),
                expert_load_total: Vec::new(),
                spec_drafted: 0,
                spec_accepted: 0,
                spec_drafted_at: Vec::new(),
                spec_accepted_at: Vec::new(),
                spec_model_drafted: 0,
                spec_model_accepted: 0,
                shared_tier: None,
                ..reply
            };
        }
        Ok(Response::new(reply))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "drop_prefix", session = tracing::field::Empty))]
    async fn drop_prefix(
        &self,
        req: Request<proto::PrefixRef>,
    ) -> Result<Response<proto::DropPrefixReply>, Status> {
        let tenant = self.tenant(&req)?;
        let id = PrefixId(req.into_inner().prefix_id);
        self.sched
            .drop_prefix(tenant, id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::DropPrefixReply {}))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "list_prefixes"))]
    async fn list_prefixes(
        &self,
        req: Request<proto::ListPrefixesRequest>,
    ) -> Result<Response<proto::ListPrefixesReply>, Status> {
        let all = req.get_ref().all_tenants;
        let tenant = if all {
            self.operator(&req)?
        } else {
            self.tenant(&req)?
        };
        let entries = self
            .sched
            .list_prefixes((!all).then_some(tenant))
            .await
            .map_err(to_status)?;
        let prefixes = entries
            .into_iter()
            .map(|e| proto::PrefixEntry {
                prefix_id: e.id.0,
                tokens: e.tokens as u32,
                pinned: e.pinned,
                published: e.published,
                resident_tokens: e.resident_tokens as u32,
                own: e.tenant == tenant,
                tenant: if all { e.tenant } else { 0 },
            })
            .collect();
        Ok(Response::new(proto::ListPrefixesReply { prefixes }))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "publish_prefix"))]
    async fn publish_prefix(
        &self,
        req: Request<proto::PrefixRef>,
    ) -> Result<Response<proto::RegisterPrefixReply>, Status> {
        self.operator(&req)?;
        let id = PrefixId(req.into_inner().prefix_id);
        let info = self.sched.publish_prefix(id).await.map_err(to_status)?;
        Ok(Response::new(proto::RegisterPrefixReply {
            prefix_id: info.id.0,
            tokens: info.tokens as u32,
        }))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "unpin_prefix"))]
    async fn unpin_prefix(
        &self,
        req: Request<proto::PrefixRef>,
    ) -> Result<Response<proto::DropPrefixReply>, Status> {
        self.operator(&req)?;
        let id = PrefixId(req.into_inner().prefix_id);
        self.sched.unpin_prefix(id).await.map_err(to_status)?;
        Ok(Response::new(proto::DropPrefixReply {}))
    }

    #[tracing::instrument(name = "rpc", skip_all, fields(tenant = tracing::field::Empty, request = tracing::field::Empty, method = "evict_cache"))]
    async fn evict_cache(
        &self,
        req: Request<proto::EvictCacheRequest>,
    ) -> Result<Response<proto::EvictCacheReply>, Status> {
        self.operator(&req)?;
        let pages = req.into_inner().pages;
        let freed = self
            .sched
            .evict_cache((pages > 0).then_some(pages as usize))
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::EvictCacheReply {
            freed_pages: freed as u32,
        }))
    }
}

impl AgentdService {
    async fn session_reply(
        &self,
        tenant: TenantId,
        id: SessionId,
    ) -> Result<Response<proto::SessionReply>, Status> {
        let (tokens, epoch) = self
            .sched
            .session_tokens(tenant, id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::SessionReply {
            session_id: id.0,
            tokens: tokens.len() as u32,
            epoch,
        }))
    }
}
