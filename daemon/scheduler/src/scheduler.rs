//! The scheduler's state and its session operations: sessions as token logs, pinned prefixes,
//! the waiting queue and cache-aware, tenant-fair admission.

use super::types::*;
use crate::cache::{Namespace, NodeId, PageLease, PagePool, RadixTree};
use agentd_engine::{Decoding, Executor, ModelShape};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// The executor, shared with the thread that runs steps while the scheduler thread keeps
/// answering commands ([`super::SchedulerHandle`]); locked only for page operations and steps.
pub(super) type SharedExecutor = Arc<Mutex<Box<dyn Executor>>>;
use tokio::sync::mpsc::UnboundedSender;

/// A session: its tenant, its token log and where its shared prefix lives.
pub(super) struct Session {
    pub tenant: TenantId,
    pub tokens: Vec<u32>,
    pub epoch: u64,
    /// The namespace of the published prefix it was created from, matched besides the tenant's.
    pub published: Option<Namespace>,
    /// The request in flight, if any.
    pub busy: Option<u64>,
}

/// A registered prefix.
pub(super) struct Prefix {
    pub tenant: TenantId,
    pub ns: Namespace,
    pub tokens: Vec<u32>,
    pub pinned: bool,
}

/// Called once when a prefix registration finishes.
pub(super) type PrefixReply = Box<dyn FnOnce(Result<PrefixInfo>) + Send>;

/// A registered prefix, as returned to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PrefixInfo {
    /// Its id (to create sessions from it).
    pub id: PrefixId,
    /// Its length in tokens.
    pub tokens: usize,
}

/// What a request computes.
pub(super) enum Work {
    /// Generate tokens for a session, streaming events to `sink`.
    Generate {
        session: SessionId,
        dec: Box<Decoding>,
        sink: UnboundedSender<Event>,
    },
    /// Compute and pin a prefix.
    Prefix {
        id: PrefixId,
        reply: Option<PrefixReply>,
    },
}

/// A request waiting or running.
pub(super) struct Request {
    pub id: u64,
    pub tenant: TenantId,
    pub ns: Namespace,
    pub published: Option<Namespace>,
    /// Every token of the sequence: the prompt, then what was sampled so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub work: Work,
    pub submitted: Instant,
    pub first_token: Option<Instant>,
    /// Prompt tokens served from the cache at first admission.
    pub cached_tokens: Option<usize>,
    /// When it was first admitted.
    pub admitted: Option<Instant>,
    /// The longest match resident in memory when the disk tier was asked for more (set only
    /// when a disk load started): what `cached_tokens` holds beyond it came from disk.
    pub memory_match: Option<usize>,
    pub preemptions: u32,
    /// The disk tier was consulted for this request's match.
    pub disk_checked: bool,
    /// Its match is being read from disk or the shared tier: admission waits.
    pub loading: bool,
    /// The shared tier was consulted (after the disk tier).
    pub tier_checked: bool,
    /// The longest match resident when the shared tier was asked for more (set only when a
    /// tier load started): what `cached_tokens` holds beyond it came from the tier.
    pub tier_match: Option<usize>,
}

impl Seq {
    /// The lease on page `k` (of the whole sequence), if this sequence holds it.
    pub(super) fn page(&self, k: usize) -> Option<&PageLease> {
        k.checked_sub(self.released).and_then(|i| self.pages.get(i))
    }

    /// The page table a step reads: one id per page from position 0. Released pages are never
    /// read again; their entries repeat the first page still held.
    pub(super) fn page_table(&self) -> Vec<u32> {
        let ids = self.pages.iter().map(|pg| pg.id().0);
        let filler = self.pages.first().map_or(0, |pg| pg.id().0);
        std::iter::repeat_n(filler, self.released)
            .chain(ids)
            .collect()
    }
}

impl Request {
    /// True when the reader of a generation has gone away.
    pub fn cancelled(&self) -> bool {
        matches!(&self.work, Work::Generate { sink, .. } if sink.is_closed())
    }
}

/// A running sequence: a request plus the pages holding its KV.
pub(super) struct Seq {
    pub req: Request,
    /// One lease per page from page [`Seq::released`] on: positions `k*page_size..` are in
    /// `pages[k - released]`; dropping the sequence releases them.
    pub pages: Vec<PageLease>,
    /// Leading pages this sequence has let go of because every layer's window has left them
    /// behind (models whose every layer is windowed); 0 otherwise. A sequence with released
    /// pages no longer extends the cache: the tree holds runs of KV from position 0.
    pub released: usize,
    /// Tokens whose KV is in the pages.
    pub kv_len: usize,
    /// The tree node this sequence holds locked.
    pub node: Option<NodeId>,
    /// Admission order (larger = younger).
    pub admitted: u64,
    /// Whether the next token is a sampled one (a decode row).
    pub decoding: bool,
    /// Its speculative-decoding state.
    pub spec: crate::spec::SpecState,
}

/// The scheduler: drives an [`Executor`] (which owns the KV pages) and owns the page
/// accounting, the radix tree, the sessions and the queues. Single-threaded;
/// [`super::SchedulerHandle`] runs it on its own thread.
pub struct Scheduler {
    pub(super) exec: SharedExecutor,
    pub(super) shape: ModelShape,
    pub(super) cfg: SchedulerConfig,
    pub(super) tree: RadixTree,
    pub(super) sessions: HashMap<SessionId, Session>,
    pub(super) prefixes: HashMap<PrefixId, Prefix>,
    pub(super) waiting: VecDeque<Request>,
    pub(super) running: Vec<Seq>,
    pub(super) stats: SchedStats,
    pub(super) admit_clock: u64,
    last_tenant: Option<TenantId>,
    /// The disk tier.
    pub(super) store: Option<agentd_store::Store>,
    /// Reads the disk tier's pages off this thread.
    pub(super) reader: Option<super::persist::DiskReader>,
    /// The shared tier's threads.
    pub(super) shared: Option<super::shared_tier::SharedTier>,
    /// Wakes the scheduler thread when a disk load finishes (set by the actor).
    pub(super) waker: Waker,
    /// The draft model, when there is one: locked by the executor thread while it drafts
    /// (inside a step) and by this thread only between steps.
    pub(super) drafter: Option<SharedDrafter>,
    /// Whether the draft model pays ([`crate::draft_model::DraftGate`]).
    pub(super) gate: crate::draft_model::DraftGate,
    /// Tokens sampled in the step being finished (for the gate).
    pub(super) step_sampled: usize,
}

/// The draft model, shared with the executor thread, which drafts at the start of a step.
pub(super) type SharedDrafter = Arc<Mutex<crate::draft_model::Drafter>>;

/// Wakes the scheduler thread from another thread; set once by the actor that runs it.
pub(super) type Waker = Arc<std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>>;

/// Candidates looked at per tenant per admission (bounds admission work per step).
const ADMIT_LOOKAHEAD: usize = 16;

impl Scheduler {
    /// A scheduler driving `exec`, whose KV pool it allocates: `cfg.kv_memory` bytes.
    pub fn new(exec: Box<dyn Executor>, cfg: SchedulerConfig) -> Result<Self> {
        Self::with_drafter(exec, None, cfg)
    }

    /// A scheduler driving `exec`, drafting with `draft` (a smaller model over the same
    /// vocabulary, whose own pool of `cfg.draft.kv_memory` bytes it allocates) when given;
    /// see [`crate::draft_model`]. The caller checks that the vocabularies agree.
    pub fn with_drafter(
        mut exec: Box<dyn Executor>,
        draft: Option<Box<dyn Executor>>,
        cfg: SchedulerConfig,
    ) -> Result<Self> {
        let shape = exec.shape();
        if cfg.max_batch == 0 || cfg.step_tokens == 0 {
            return Err(SchedError::InvalidRequest(
                "max_batch and step_tokens must be at least 1".into(),
            ));
        }
        let per_token = exec.kv_bytes_per_token();
        let pool = PagePool::from_budget(cfg.kv_memory, per_token, cfg.page_size)
            .map_err(|e| SchedError::InvalidRequest(e.to_string()))?;
        if pool.capacity() < 2 {
            return Err(SchedError::InvalidRequest(format!(
                "--kv-memory of {} bytes holds {} pages of {} tokens ({} bytes each); at least 2 are needed",
                cfg.kv_memory,
                pool.capacity(),
                cfg.page_size,
                per_token * cfg.page_size
            )));
        }
        exec.allocate(pool.capacity(), cfg.page_size)
            .map_err(|e| SchedError::Executor(Cause::new(e)))?;
        tracing::info!(
            pages = pool.capacity(),
            page_size = cfg.page_size,
            bytes = pool.capacity() * exec.page_bytes(),
            "KV pool allocated"
        );
        let stats = SchedStats {
            pool_pages: pool.capacity(),
            page_size: cfg.page_size,
            page_bytes: per_token * cfg.page_size,
            ..Default::default()
        };
        let store_cfg = cfg.store.clone();
        let mut s = Self {
            exec: Arc::new(Mutex::new(exec)),
            shape,
            cfg,
            tree: RadixTree::new(pool),
            sessions: HashMap::new(),
            prefixes: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats,
            admit_clock: 0,
            last_tenant: None,
            store: None,
            reader: None,
            shared: None,
            waker: Arc::new(std::sync::OnceLock::new()),
            drafter: None,
            gate: Default::default(),
            step_sampled: 0,
        };
        if let Some(d) = draft {
            let drafter =
                crate::draft_model::Drafter::new(d, &s.cfg.draft, s.cfg.page_size, shape.vocab)
                    .map_err(|e| match e {
                        crate::DraftError::Allocate(e) => SchedError::Executor(Cause::new(e)),
                        e => SchedError::InvalidRequest(e.to_string()),
                    })?;
            s.drafter = Some(Arc::new(Mutex::new(drafter)));
        }
        if let Some(store) = &store_cfg {
            s.open_store(store)?;
        }
        if let Some(shared) = &s.cfg.shared.clone() {
            s.open_shared_tier(shared)?;
        }
        Ok(s)
    }

    /// The vocabulary and context length of the model behind the executor.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    /// The drafter, between steps (`None` without a draft model).
    pub(super) fn drafter(&self) -> Option<MutexGuard<'_, crate::draft_model::Drafter>> {
        self.drafter
            .as_ref()
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The draft pool's free pages and capacity (`None` without a draft model): for tests.
    pub fn draft_pool(&self) -> Option<(usize, usize)> {
        self.drafter().map(|d| (d.free_pages(), d.capacity()))
    }

    /// The executor, for a page operation or a step (a panic in an earlier step does not
    /// poison it: its pages are only written by steps, whose sequences then fail).
    pub(super) fn exec(&self) -> MutexGuard<'_, Box<dyn Executor>> {
        self.exec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh id for a session, prefix or request: random, 63 bits (so that it fits a signed
    /// 64-bit integer in clients that have no unsigned one) and never 0, so that ids say nothing about
    /// other tenants' activity (sequential ids would: their gaps count others' sessions).
    /// With a node number ([`SchedulerConfig::node`]) the id carries it in bits 56–62 and
    /// the rest is random ([`node_of_id`] reads it back).
    pub(super) fn fresh_id(&mut self) -> u64 {
        loop {
            let id = match self.cfg.node {
                Some(n) => {
                    (u64::from(n & 0x7f) << super::ids::NODE_SHIFT) | (rand::random::<u64>() >> 8)
                }
                None => rand::random::<u64>() >> 1,
            };
            let taken = id == 0
                || self.sessions.contains_key(&SessionId(id))
                || self.prefixes.contains_key(&PrefixId(id))
                || self.waiting.iter().any(|r| r.id == id);
            if !taken {
                return id;
            }
        }
    }

    /// True when nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub(super) fn context_limit(&self) -> usize {
        self.shape.context_length
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        self.check_vocab(tokens)?;
        self.check_length(tokens.len())
    }

    fn check_vocab(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.shape.vocab;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(SchedError::InvalidRequest(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    /// A log of `len` tokens must leave room for one generated token.
    fn check_length(&self, len: usize) -> Result<()> {
        let limit = self.context_limit();
        if len >= limit {
            return Err(SchedError::ContextOverflow {
                needed: len + 1,
                limit,
            });
        }
        Ok(())
    }

    fn check_session_limit(&self, tenant: TenantId) -> Result<()> {
        let open = self
            .sessions
            .values()
            .filter(|s| s.tenant == tenant)
            .count();
        let limit = self.cfg.limits.sessions;
        if open >= limit {
            return Err(SchedError::LimitExceeded {
                what: "open sessions",
                limit,
                wanted: open + 1,
            });
        }
        Ok(())
    }

    /// Checks a generation of `max_tokens` after `log_len` tokens against `tenant`'s limits.
    fn check_generation_limits(
        &self,
        tenant: TenantId,
        log_len: usize,
        max_tokens: usize,
    ) -> Result<()> {
        let l = self.cfg.limits;
        let in_flight = self.waiting.iter().filter(|r| r.tenant == tenant).count()
            + self
                .running
                .iter()
                .filter(|s| s.req.tenant == tenant)
                .count();
        let over = |what, limit: usize, wanted: usize| {
            (wanted > limit).then_some(SchedError::LimitExceeded {
                what,
                limit,
                wanted,
            })
        };
        let tokens = log_len + max_tokens;
        let checks = [
            over(
                "concurrent generations",
                l.concurrent_generations,
                in_flight + 1,
            ),
            over(
                "tokens per request (prompt + max_tokens)",
                l.request_tokens,
                tokens,
            ),
            over(
                "KV pages per request",
                l.request_pages,
                tokens.div_ceil(self.cfg.page_size),
            ),
        ];
        match checks.into_iter().flatten().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn session(&self, tenant: TenantId, id: SessionId) -> Result<&Session> {
        match self.sessions.get(&id) {
            Some(s) if s.tenant == tenant => Ok(s),
            _ => Err(SchedError::UnknownSession(id.0)),
        }
    }

    fn idle_session(&mut self, tenant: TenantId, id: SessionId) -> Result<&mut Session> {
        let s = match self.sessions.get_mut(&id) {
            Some(s) if s.tenant == tenant => s,
            _ => return Err(SchedError::UnknownSession(id.0)),
        };
        if s.busy.is_some() {
            return Err(SchedError::SessionBusy(id.0));
        }
        Ok(s)
    }

    /// A prefix `tenant` may use: its own, or a published one.
    fn visible_prefix(&self, tenant: TenantId, id: PrefixId) -> Result<&Prefix> {
        match self.prefixes.get(&id) {
            Some(p) if p.tenant == tenant || matches!(p.ns, Namespace::Published(_)) => Ok(p),
            _ => Err(SchedError::UnknownPrefix(id.0)),
        }
    }

    /// Opens a session for `tenant` whose log starts with the prefix `from` (if any) followed by
    /// `tokens`.
    pub fn create_session(
        &mut self,
        tenant: TenantId,
        from: Option<PrefixId>,
        tokens: Vec<u32>,
    ) -> Result<SessionId> {
        let (mut log, published) = match from {
            Some(p) => {
                let p = self.visible_prefix(tenant, p)?;
                let published = matches!(p.ns, Namespace::Published(_)).then_some(p.ns);
                (p.tokens.clone(), published)
            }
            None => (Vec::new(), None),
        };
        log.extend_from_slice(&tokens);
        self.check_tokens(&log)?;
        self.check_session_limit(tenant)?;
        let id = SessionId(self.fresh_id());
        self.sessions.insert(
            id,
            Session {
                tenant,
                tokens: log,
                epoch: 0,
                published,
                busy: None,
            },
        );
        Ok(id)
    }

    /// Appends `tokens` to an idle session's log; returns the new length.
    pub fn append(&mut self, tenant: TenantId, id: SessionId, tokens: &[u32]) -> Result<usize> {
        self.append_input(tenant, id, AppendInput::Tokens(tokens.to_vec()))
            .map(|a| a.tokens)
    }

    /// Appends to an idle session's log in one step: tokens, or messages the caller rendered
    /// both as a first turn and as a continuation (the choice depends on whether the log is
    /// empty, decided here, atomically with the append). Returns the new length and epoch.
    pub fn append_input(
        &mut self,
        tenant: TenantId,
        id: SessionId,
        input: AppendInput,
    ) -> Result<Appended> {
        let len = self.session(tenant, id)?.tokens.len();
        let add = match input {
            AppendInput::Tokens(t) => t,
            AppendInput::Rendered { first, continuing } => {
                if len == 0 { first } else { continuing }.map_err(SchedError::InvalidRequest)?
            }
        };
        self.check_vocab(&add)?;
        self.check_length(len + add.len())?;
        let s = self.idle_session(tenant, id)?;
        s.tokens.extend_from_slice(&add);
        Ok(Appended {
            tokens: s.tokens.len(),
            epoch: s.epoch,
        })
    }

    /// A new session with a copy of an idle session's log. Its KV is shared through the cache:
    /// every full page is reused and only the last partial page is copied when written.
    pub fn fork(&mut self, tenant: TenantId, id: SessionId) -> Result<SessionId> {
        let s = self.idle_session(tenant, id)?;
        let (tokens, published, epoch) = (s.tokens.clone(), s.published, s.epoch);
        self.check_session_limit(tenant)?;
        let new = SessionId(self.fresh_id());
        self.sessions.insert(
            new,
            Session {
                tenant,
                tokens,
                epoch,
                published,
                busy: None,
            },
        );
        Ok(new)
    }

    /// Replaces tokens `start..end` of an idle session's log with `tokens` (compaction) and
    /// starts a new epoch; returns it. Everything before `start` keeps its cache hits.
    pub fn rewrite(
        &mut self,
        tenant: TenantId,
        id: SessionId,
        start: usize,
        end: usize,
        tokens: &[u32],
    ) -> Result<u64> {
        let old = &self.session(tenant, id)?.tokens;
        if start > end || end > old.len() {
            return Err(SchedError::InvalidRequest(format!(
                "rewrite range {start}..{end} is not inside the session's {} tokens",
                old.len()
            )));
        }
        let mut log = old[..start].to_vec();
        log.extend_from_slice(tokens);
        log.extend_from_slice(&old[end..]);
        self.check_tokens(&log)?;
        let s = self.idle_session(tenant, id)?;
        s.tokens = log;
        s.epoch += 1;
        Ok(s.epoch)
    }

    /// The session's token log and epoch.
    pub fn session_tokens(&self, tenant: TenantId, id: SessionId) -> Result<(Vec<u32>, u64)> {
        let s = self.session(tenant, id)?;
        Ok((s.tokens.clone(), s.epoch))
    }

    /// Closes a session; a generation in flight is cancelled and everything it held is freed.
    pub fn close(&mut self, tenant: TenantId, id: SessionId) -> Result<()> {
        let busy = self.session(tenant, id)?.busy;
        if let Some(req) = busy {
            self.cancel_request(req);
        }
        self.sessions.remove(&id);
        if let Some(mut d) = self.drafter() {
            d.forget(id);
        }
        Ok(())
    }

    /// Starts a generation continuing the session's log; events go to `sink`.
    pub fn generate(
        &mut self,
        tenant: TenantId,
        id: SessionId,
        dec: Decoding,
        sink: UnboundedSender<Event>,
    ) -> Result<()> {
        self.generate_at(tenant, id, dec, sink, Instant::now())
    }

    /// [`Scheduler::generate`] for a call that arrived at `arrived` (TTFT and latency in the
    /// usage are measured from then).
    pub fn generate_at(
        &mut self,
        tenant: TenantId,
        id: SessionId,
        dec: Decoding,
        sink: UnboundedSender<Event>,
        arrived: Instant,
    ) -> Result<()> {
        let limit = self.context_limit();
        let max_tokens = dec.max_tokens();
        let s = self.session(tenant, id)?;
        if s.busy.is_some() {
            return Err(SchedError::SessionBusy(id.0));
        }
        if s.tokens.is_empty() {
            return Err(SchedError::InvalidRequest(
                "the session is empty: append a prompt first".into(),
            ));
        }
        if max_tokens == 0 {
            return Err(SchedError::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if max_tokens > limit {
            return Err(SchedError::InvalidRequest(format!(
                "max_tokens {max_tokens} exceeds the model's context length {limit}"
            )));
        }
        if s.tokens.len() >= limit {
            return Err(SchedError::ContextOverflow {
                needed: s.tokens.len() + 1,
                limit,
            });
        }
        self.check_generation_limits(tenant, s.tokens.len(), max_tokens)?;
        let (tokens, published) = (s.tokens.clone(), s.published);
        let rid = self.fresh_id();
        self.sessions.get_mut(&id).expect("checked").busy = Some(rid);
        let prompt_len = tokens.len();
        self.waiting.push_back(Request {
            id: rid,
            tenant,
            ns: Namespace::Tenant(tenant),
            published,
            tokens,
            prompt_len,
            work: Work::Generate {
                session: id,
                dec: Box::new(dec),
                sink,
            },
            submitted: arrived,
            first_token: None,
            cached_tokens: None,
            admitted: None,
            memory_match: None,
            preemptions: 0,
            disk_checked: false,
            loading: false,
            tier_checked: false,
            tier_match: None,
        });
        Ok(())
    }

    /// Registers `tokens` as a pinned prefix of `tenant` (or, with `publish`, one every tenant
    /// may start sessions from). `reply` gets the result once its KV is computed and pinned.
    pub fn register_prefix(
        &mut self,
        tenant: TenantId,
        tokens: Vec<u32>,
        publish: bool,
        reply: PrefixReply,
    ) {
        if tokens.is_empty() {
            return reply(Err(SchedError::InvalidRequest(
                "the prefix is empty".into(),
            )));
        }
        if let Err(e) = self.check_tokens(&tokens) {
            return reply(Err(e));
        }
        let id = PrefixId(self.fresh_id());
        let ns = if publish {
            Namespace::Published(super::ids::published_namespace(&tokens))
        } else {
            Namespace::Tenant(tenant)
        };
        let info = PrefixInfo {
            id,
            tokens: tokens.len(),
        };
        self.prefixes.insert(
            id,
            Prefix {
                tenant,
                ns,
                tokens: tokens.clone(),
                pinned: false,
            },
        );
        // Already cached: pin it now.
        if self.cfg.cache && self.tree.longest_prefix_len(ns, &tokens) == tokens.len() {
            return reply(self.pin_prefix(id).map(|()| info));
        }
        let rid = self.fresh_id();
        self.waiting.push_back(Request {
            id: rid,
            tenant,
            ns,
            published: None,
            prompt_len: tokens.len(),
            tokens,
            work: Work::Prefix {
                id,
                reply: Some(reply),
            },
            submitted: Instant::now(),
            first_token: None,
            cached_tokens: None,
            admitted: None,
            memory_match: None,
            preemptions: 0,
            disk_checked: false,
            loading: false,
            tier_checked: false,
            tier_match: None,
        });
    }

    pub(super) fn pin_prefix(&mut self, id: PrefixId) -> Result<()> {
        let p = self.prefixes.get_mut(&id).expect("registered prefix");
        if !self.cfg.cache || p.pinned {
            return Ok(());
        }
        self.tree.pin(p.ns, &p.tokens)?;
        p.pinned = true;
        self.persist_prefix(id);
        Ok(())
    }

    /// Unpins and forgets a prefix of `tenant` (its KV becomes ordinary cache).
    pub fn drop_prefix(&mut self, tenant: TenantId, id: PrefixId) -> Result<()> {
        match self.prefixes.get(&id) {
            Some(p) if p.tenant == tenant => {}
            _ => return Err(SchedError::UnknownPrefix(id.0)),
        }
        self.unpin_prefix(id)
    }

    /// Cancels a request wherever it is, freeing what it holds.
    pub(super) fn cancel_request(&mut self, rid: u64) {
        if let Some(i) = self.waiting.iter().position(|r| r.id == rid) {
            let req = self.waiting.remove(i).expect("found");
            self.finish_waiting(req);
        } else if let Some(i) = self.running.iter().position(|s| s.req.id == rid) {
            self.retire(i, Some(agentd_engine::FinishReason::Cancelled));
        }
    }

    /// Longest cached prefix of `req` in its namespaces: (length, namespace).
    pub(super) fn cached_len(&self, req: &Request) -> (usize, Namespace) {
        if !self.cfg.cache {
            return (0, req.ns);
        }
        let own = self.tree.longest_prefix_len(req.ns, &req.tokens);
        match req.published {
            Some(p) => {
                let shared = self.tree.longest_prefix_len(p, &req.tokens);
                if shared > own {
                    (shared, p)
                } else {
                    (own, req.ns)
                }
            }
            None => (own, req.ns),
        }
    }

    /// Picks the next request to admit: tenants take turns; within a tenant, a preempted
    /// request first, else the longest cached prefix among the first few waiting. A request
    /// whose prompt shares more with a prefill in flight than the cache holds waits for that
    /// prefill to land in the cache instead of computing the same tokens twice.
    fn pick(&self) -> Option<usize> {
        let mut tenants: Vec<TenantId> = self.waiting.iter().map(|r| r.tenant).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let start = match self.last_tenant {
            Some(t) => tenants.iter().position(|&x| x > t).unwrap_or(0),
            None => 0,
        };
        let ps = self.cfg.page_size;
        for k in 0..tenants.len() {
            let tenant = tenants[(start + k) % tenants.len()];
            let mut best: Option<(bool, usize, usize)> = None;
            for (i, r) in self
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, r)| r.tenant == tenant && !r.loading)
                .take(ADMIT_LOOKAHEAD)
            {
                let (cached, _) = self.cached_len(r);
                let in_flight = self.cfg.cache
                    && self.running.iter().any(|s| {
                        !s.decoding
                            && (s.req.ns == r.ns || Some(s.req.ns) == r.published)
                            && crate::common_len(&s.req.tokens[..s.req.prompt_len], &r.tokens)
                                > cached + ps
                    });
                if in_flight {
                    continue;
                }
                let key = (r.preemptions > 0, cached, usize::MAX - i);
                if best.is_none_or(|b| key > b) {
                    best = Some(key);
                }
            }
            if let Some((_, _, inv)) = best {
                return Some(usize::MAX - inv);
            }
        }
        None
    }

    /// Moves waiting requests into the running batch while there is room.
    pub(super) fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch {
            let Some(i) = self.pick() else { break };
            if self.begin_disk_load(i) || self.begin_tier_load(i) {
                continue;
            }
            let (cached, _) = self.cached_len(&self.waiting[i]);
            let ps = self.cfg.page_size;
            let len = self.waiting[i].tokens.len();
            let need = (len + 1).div_ceil(ps) - cached.min(len.saturating_sub(1)) / ps;
            let available = self.pages_available();
            if need > available {
                if self.running.is_empty() {
                    let req = self.waiting.remove(i).expect("picked");
                    let err = SchedError::PoolTooSmall {
                        needed: need,
                        available,
                        capacity: self.tree.pool().capacity(),
                    };
                    self.fail_waiting(req, err);
                    continue;
                }
                break; // wait for running sequences to finish
            }
            if self.tree.pool().free_count() < need {
                self.evict(need - self.tree.pool().free_count());
                if self.tree.pool().free_count() < need && !self.running.is_empty() {
                    break;
                }
            }
            let req = self.waiting.remove(i).expect("picked");
            self.last_tenant = Some(req.tenant);
            self.start(req);
        }
    }

    /// Pages a sequence could get with all unpinned cache evicted and nothing else running.
    pub(super) fn pages_available(&self) -> usize {
        let pinned: usize = self
            .prefixes
            .values()
            .filter(|p| p.pinned)
            .map(|p| p.tokens.len().div_ceil(self.cfg.page_size))
            .sum();
        self.tree.pool().capacity().saturating_sub(pinned)
    }

    /// Evicts cached prefixes until `pages` more pages are free (or nothing is left to evict).
    pub(super) fn evict(&mut self, pages: usize) {
        match self.tree.evict(pages) {
            Ok(report) => {
                self.stats.evicted_pages += report.freed as u64;
                self.announce_evicted(&report.evicted);
                self.persist_evicted(report.evicted);
            }
            Err(e) => tracing::error!(error = %e, "eviction failed"),
        }
    }

    /// Admits `req`: matches its cached prefix, takes references on those pages and locks the
    /// matched node.
    fn start(&mut self, mut req: Request) {
        let ps = self.cfg.page_size;
        let (mut pages, mut kv_len, mut node) = (Vec::new(), 0, None);
        let (cached, ns) = self.cached_len(&req);
        if cached > 0 {
            let m = self.tree.match_prefix(ns, &req.tokens);
            // The last token is always run, to get its logits.
            kv_len = m.matched_tokens.min(req.tokens.len() - 1);
            pages = m.pages[..kv_len.div_ceil(ps)]
                .iter()
                .map(|&p| self.tree.pool().lease(p).expect("tree pages are live"))
                .collect();
            if let Some(n) = m.last_node {
                self.tree.lock(n).expect("matched node is live");
                node = Some(n);
            }
        }
        req.cached_tokens.get_or_insert(kv_len);
        req.admitted.get_or_insert_with(Instant::now);
        let t = self.stats.tenants.entry(req.tenant).or_default();
        t.cached_tokens += kv_len as u64;
        self.stats.cached_tokens += kv_len as u64;
        self.admit_clock += 1;
        self.running.push(Seq {
            req,
            pages,
            released: 0,
            kv_len,
            node,
            admitted: self.admit_clock,
            decoding: false,
            spec: Default::default(),
        });
    }
}
