//! [`SchedulerHandle`]: the scheduler on its own thread, driven by commands over a channel (actor
//! style: no lock is shared with callers), with its steps overlapped with commands.
//!
//! The scheduler thread plans a step ([`Scheduler::begin_step`]), hands it to the executor
//! thread, and keeps answering commands while the step runs: commands that only read or touch
//! idle sessions and the queues ("light": create, append, fork, rewrite, session tokens,
//! generate, stats, list prefixes) run at once, so session calls are answered in milliseconds
//! even during a long prefill chunk; commands that would change the running sequences, the page
//! pool or the executor's pages (close, evict, publish, pin, flush, invariant checks) wait for
//! the step to finish. When idle it sleeps on the channel. The thread stops when every handle
//! is dropped, after cancelling what is still running.

use super::admin::PrefixEntry;
use super::scheduler::{PrefixInfo, Scheduler};
use super::step::{InFlight, StepOutput};
use super::types::*;
use agentd_engine::{Decoding, Executor, ModelShape};
use std::collections::VecDeque;
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::{mpsc as tmpsc, oneshot};

type Command = Box<dyn FnOnce(&mut Scheduler) + Send>;

/// How long the scheduler thread may be held (by one command, or one step) before it is
/// logged as a stall: every running stream waits that long for its next token.
pub const STALL: std::time::Duration = std::time::Duration::from_millis(250);

/// Logs steps longer than [`STALL`], at most once a minute (a long prefill or a large batch under load
/// would otherwise log every step), with how many were not logged in between.
#[derive(Default)]
struct StallLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl StallLog {
    fn step(&mut self, took: std::time::Duration, tokens: usize) {
        if took <= STALL {
            return;
        }
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(60))
        {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(
            ms = took.as_millis() as u64,
            tokens,
            unlogged = self.unlogged,
            "a step held every running stream for {} ms",
            took.as_millis()
        );
        self.last = Some(now);
        self.unlogged = 0;
    }
}

/// Whether a command may run while a step is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Touches only idle sessions, the waiting queue, or reads.
    Light,
    /// May change the running sequences, the pool or the pages: waits for the step.
    Heavy,
}

enum Msg {
    Command(Command, Kind),
    /// The executor thread finished a step.
    StepDone(Box<(InFlight, StepOutput)>),
    /// Something the scheduler waits for (a disk load) finished.
    Wake,
    /// The last handle was dropped.
    Shutdown,
}

/// Sends [`Msg::Shutdown`] when the last handle goes away.
struct Alive(mpsc::Sender<Msg>);

impl Drop for Alive {
    fn drop(&mut self) {
        let _ = self.0.send(Msg::Shutdown);
    }
}

/// A cloneable handle to the scheduler thread. The thread stops when every handle is dropped,
/// after cancelling what is still running.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Msg>,
    _alive: Arc<Alive>,
    shape: ModelShape,
    limits: crate::TenantLimits,
}

impl SchedulerHandle {
    /// Builds the scheduler over `exec` (allocating the KV pool, opening the disk tier) and
    /// starts its thread.
    pub fn spawn(exec: Box<dyn Executor>, cfg: SchedulerConfig) -> Result<Self> {
        Self::spawn_with_drafter(exec, None, cfg)
    }

    /// [`SchedulerHandle::spawn`] with a draft model ([`Scheduler::with_drafter`]).
    pub fn spawn_with_drafter(
        exec: Box<dyn Executor>,
        draft: Option<Box<dyn Executor>>,
        cfg: SchedulerConfig,
    ) -> Result<Self> {
        let limits = cfg.limits;
        let mut sched = Scheduler::with_drafter(exec, draft, cfg)?;
        let shape = sched.shape();
        let (tx, rx) = mpsc::channel::<Msg>();
        let (job_tx, job_rx) = mpsc::channel::<InFlight>();
        let exec = sched.exec.clone();
        let done = tx.clone();
        let wake = std::sync::Mutex::new(tx.clone());
        let _ = sched.waker.set(Box::new(move || {
            let _ = wake
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(Msg::Wake);
        }));
        std::thread::Builder::new()
            .name("agentd-executor".into())
            .spawn(move || {
                // Ends when the scheduler thread drops `job_tx`.
                for mut job in job_rx {
                    let out = {
                        let mut exec = exec.lock().unwrap_or_else(|e| e.into_inner());
                        let _span = tracing::debug_span!("forward").entered();
                        job.run(&mut **exec)
                    };
                    if done.send(Msg::StepDone(Box::new((job, out)))).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| SchedError::Spawn(Cause::new(e)))?;
        std::thread::Builder::new()
            .name("agentd-scheduler".into())
            .spawn(move || run(&mut sched, rx, job_tx))
            .map_err(|e| SchedError::Spawn(Cause::new(e)))?;
        let alive = Arc::new(Alive(tx.clone()));
        Ok(Self {
            tx,
            _alive: alive,
            shape,
            limits,
        })
    }

    /// The vocabulary and context length of the model behind the executor.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    /// The per-tenant limits the scheduler enforces (so callers can pick defaults inside them).
    pub fn limits(&self) -> crate::TenantLimits {
        self.limits
    }

    /// Runs `f` on the scheduler thread between steps.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Scheduler) -> T + Send + 'static,
    ) -> Result<T> {
        self.send(Kind::Heavy, f).await
    }

    /// Runs `f` on the scheduler thread at once, even while a step is in flight: `f` must not
    /// change the running sequences, the page pool or the executor's pages.
    async fn call_light<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Scheduler) -> T + Send + 'static,
    ) -> Result<T> {
        self.send(Kind::Light, f).await
    }

    async fn send<T: Send + 'static>(
        &self,
        kind: Kind,
        f: impl FnOnce(&mut Scheduler) -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        // The caller's span (its RPC, tenant and request id) follows the command onto the
        // scheduler thread, so that a command that stalls the engine is logged against it.
        let span = tracing::Span::current();
        let cmd: Command = Box::new(move |s| {
            let _in_span = span.enter();
            let t0 = Instant::now();
            let out = f(s);
            let took = t0.elapsed();
            if took > STALL {
                tracing::warn!(
                    ms = took.as_millis() as u64,
                    "a command held the scheduler thread for {} ms",
                    took.as_millis()
                );
            }
            let _ = tx.send(out);
        });
        self.tx
            .send(Msg::Command(cmd, kind))
            .map_err(|_| SchedError::Shutdown)?;
        rx.await.map_err(|_| SchedError::Shutdown)
    }

    /// See [`Scheduler::create_session`].
    pub async fn create_session(
        &self,
        tenant: TenantId,
        from: Option<PrefixId>,
        tokens: Vec<u32>,
    ) -> Result<SessionId> {
        self.call_light(move |s| s.create_session(tenant, from, tokens))
            .await?
    }

    /// See [`Scheduler::append`].
    pub async fn append(&self, tenant: TenantId, id: SessionId, tokens: Vec<u32>) -> Result<usize> {
        self.call_light(move |s| s.append(tenant, id, &tokens))
            .await?
    }

    /// One command: see [`Scheduler::append_input`].
    pub async fn append_input(
        &self,
        tenant: TenantId,
        id: SessionId,
        input: AppendInput,
    ) -> Result<Appended> {
        self.call_light(move |s| s.append_input(tenant, id, input))
            .await?
    }

    /// See [`Scheduler::fork`].
    pub async fn fork(&self, tenant: TenantId, id: SessionId) -> Result<SessionId> {
        self.call_light(move |s| s.fork(tenant, id)).await?
    }

    /// See [`Scheduler::rewrite`].
    pub async fn rewrite(
        &self,
        tenant: TenantId,
        id: SessionId,
        range: std::ops::Range<usize>,
        tokens: Vec<u32>,
    ) -> Result<u64> {
        self.call_light(move |s| s.rewrite(tenant, id, range.start, range.end, &tokens))
            .await?
    }

    /// See [`Scheduler::session_tokens`].
    pub async fn session_tokens(&self, tenant: TenantId, id: SessionId) -> Result<(Vec<u32>, u64)> {
        self.call_light(move |s| s.session_tokens(tenant, id))
            .await?
    }

    /// See [`Scheduler::close`].
    pub async fn close(&self, tenant: TenantId, id: SessionId) -> Result<()> {
        self.call(move |s| s.close(tenant, id)).await?
    }

    /// Starts a generation whose output state `dec` was built (its constraint compiled) by the
    /// caller, off this thread; the events arrive on the returned receiver. Dropping the
    /// receiver cancels the generation and frees its pages at the next step.
    pub async fn generate(
        &self,
        tenant: TenantId,
        id: SessionId,
        dec: Decoding,
    ) -> Result<tmpsc::UnboundedReceiver<Event>> {
        self.generate_at(tenant, id, dec, Instant::now()).await
    }

    /// [`SchedulerHandle::generate`] for a call that arrived at `arrived`: TTFT and latency are
    /// measured from then (the service passes the moment the RPC arrived).
    pub async fn generate_at(
        &self,
        tenant: TenantId,
        id: SessionId,
        dec: Decoding,
        arrived: Instant,
    ) -> Result<tmpsc::UnboundedReceiver<Event>> {
        let (tx, rx) = tmpsc::unbounded_channel();
        self.call_light(move |s| s.generate_at(tenant, id, dec, tx, arrived))
            .await??;
        Ok(rx)
    }

    /// Computes and pins a prefix; returns once it is cached. See [`Scheduler::register_prefix`].
    pub async fn register_prefix(
        &self,
        tenant: TenantId,
        tokens: Vec<u32>,
        publish: bool,
    ) -> Result<PrefixInfo> {
        let (tx, rx) = oneshot::channel();
        self.call(move |s| {
            s.register_prefix(
                tenant,
                tokens,
                publish,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
        })
        .await?;
        rx.await.map_err(|_| SchedError::Shutdown)?
    }

    /// See [`Scheduler::drop_prefix`].
    pub async fn drop_prefix(&self, tenant: TenantId, id: PrefixId) -> Result<()> {
        self.call(move |s| s.drop_prefix(tenant, id)).await?
    }

    /// See [`Scheduler::list_prefixes`].
    pub async fn list_prefixes(&self, tenant: Option<TenantId>) -> Result<Vec<PrefixEntry>> {
        self.call_light(move |s| s.list_prefixes(tenant)).await
    }

    /// See [`Scheduler::publish_prefix`]; returns once the published copy is pinned.
    pub async fn publish_prefix(&self, id: PrefixId) -> Result<PrefixInfo> {
        let (tx, rx) = oneshot::channel();
        self.call(move |s| {
            s.publish_prefix(
                id,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            )
        })
        .await?;
        rx.await.map_err(|_| SchedError::Shutdown)?
    }

    /// See [`Scheduler::unpin_prefix`].
    pub async fn unpin_prefix(&self, id: PrefixId) -> Result<()> {
        self.call(move |s| s.unpin_prefix(id)).await?
    }

    /// See [`Scheduler::evict_cache`].
    pub async fn evict_cache(&self, pages: Option<usize>) -> Result<usize> {
        self.call(move |s| s.evict_cache(pages)).await
    }

    /// Waits until the disk tier has made everything written so far durable.
    pub async fn flush(&self) -> Result<()> {
        self.call(|s| s.flush_store()).await
    }

    /// A snapshot of the scheduler's counters.
    pub async fn stats(&self) -> Result<SchedStats> {
        self.call_light(|s| s.stats()).await
    }

    /// The draft pool's free pages and capacity, between steps (`None` without a draft
    /// model; for tests).
    pub async fn draft_pool(&self) -> Result<Option<(usize, usize)>> {
        self.call(|s| s.draft_pool()).await
    }

    /// Checks the page accounting (for tests).
    pub async fn check_invariants(&self) -> Result<std::result::Result<(), String>> {
        self.call(|s| s.check_invariants()).await
    }
}

fn run(sched: &mut Scheduler, rx: mpsc::Receiver<Msg>, jobs: mpsc::Sender<InFlight>) {
    let mut deferred: VecDeque<Command> = VecDeque::new();
    let mut shutdown = false;
    let mut stalls = StallLog::default();
    while !shutdown {
        // Between steps every command runs, the ones deferred during the last step first.
        while let Some(cmd) = deferred.pop_front() {
            cmd(sched);
        }
        if sched.is_idle() {
            match rx.recv() {
                Ok(Msg::Command(cmd, _)) => cmd(sched),
                Ok(Msg::Wake) => {}
                Ok(Msg::Shutdown) | Err(_) => break,
                Ok(Msg::StepDone(_)) => unreachable!("no step is in flight"),
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Msg::Command(cmd, _)) => cmd(sched),
                Ok(Msg::Wake) => {}
                Ok(Msg::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => {
                    shutdown = true;
                    break;
                }
                Ok(Msg::StepDone(_)) => unreachable!("no step is in flight"),
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if shutdown || sched.is_idle() {
            continue;
        }
        let started = Instant::now();
        let Some(job) = sched.begin_step() else {
            // Work is waiting but none can run: its pages are being read from disk. Sleep
            // until the load (or a command) arrives; the timeout only guards against a lost
            // wake-up.
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(Msg::Command(cmd, _)) => cmd(sched),
                Ok(Msg::Wake) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Ok(Msg::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => shutdown = true,
                Ok(Msg::StepDone(_)) => unreachable!("no step is in flight"),
            }
            continue;
        };
        if jobs.send(job).is_err() {
            tracing::error!("the executor thread is gone");
            break;
        }
        // While the step runs, light commands are answered; the rest wait for it.
        let (job, out) = loop {
            match rx.recv() {
                Ok(Msg::StepDone(done)) => break *done,
                Ok(Msg::Command(cmd, Kind::Light)) => cmd(sched),
                Ok(Msg::Command(cmd, Kind::Heavy)) => deferred.push_back(cmd),
                Ok(Msg::Wake) => {}
                Ok(Msg::Shutdown) => shutdown = true,
                Err(_) => unreachable!("the executor thread holds a sender"),
            }
        };
        let tokens = sched.finish_step(job, out);
        stalls.step(started.elapsed(), tokens);
    }
    sched.cancel_all();
}
