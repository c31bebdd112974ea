//! [`SchedulerHandle`]: the scheduler on its own thread, driven by commands over a channel (actor
//! style: no lock is shared with callers). While work is pending the thread alternates between
//! draining commands and running steps; when idle it sleeps on the channel.

use super::admin::PrefixEntry;
use super::scheduler::{PrefixInfo, Scheduler};
use super::types::*;
use agentd_engine::{Decoding, Executor, ModelShape};
use std::sync::mpsc;
use tokio::sync::{mpsc as tmpsc, oneshot};

type Command = Box<dyn FnOnce(&mut Scheduler) + Send>;

/// A cloneable handle to the scheduler thread. The thread stops when every handle is dropped,
/// after cancelling what is still running.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    shape: ModelShape,
}

impl SchedulerHandle {
    /// Builds the scheduler over `exec` (allocating the KV pool, opening the disk tier) and
    /// starts its thread.
    pub fn spawn(exec: Box<dyn Executor>, cfg: SchedulerConfig) -> Result<Self> {
        let mut sched = Scheduler::new(exec, cfg)?;
        let shape = sched.shape();
        let (tx, rx) = mpsc::channel::<Command>();
        std::thread::Builder::new()
            .name("agentd-scheduler".into())
            .spawn(move || run(&mut sched, rx))
            .map_err(|e| SchedError::Spawn(Cause::new(e)))?;
        Ok(Self { tx, shape })
    }

    /// The vocabulary and context length of the model behind the executor.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Scheduler) -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move |s| {
                let _ = tx.send(f(s));
            }))
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
        self.call(move |s| s.create_session(tenant, from, tokens))
            .await?
    }

    /// See [`Scheduler::append`].
    pub async fn append(&self, tenant: TenantId, id: SessionId, tokens: Vec<u32>) -> Result<usize> {
        self.call(move |s| s.append(tenant, id, &tokens)).await?
    }

    /// One command: see [`Scheduler::append_input`].
    pub async fn append_input(
        &self,
        tenant: TenantId,
        id: SessionId,
        input: AppendInput,
    ) -> Result<Appended> {
        self.call(move |s| s.append_input(tenant, id, input))
            .await?
    }

    /// See [`Scheduler::fork`].
    pub async fn fork(&self, tenant: TenantId, id: SessionId) -> Result<SessionId> {
        self.call(move |s| s.fork(tenant, id)).await?
    }

    /// See [`Scheduler::rewrite`].
    pub async fn rewrite(
        &self,
        tenant: TenantId,
        id: SessionId,
        range: std::ops::Range<usize>,
        tokens: Vec<u32>,
    ) -> Result<u64> {
        self.call(move |s| s.rewrite(tenant, id, range.start, range.end, &tokens))
            .await?
    }

    /// See [`Scheduler::session_tokens`].
    pub async fn session_tokens(&self, tenant: TenantId, id: SessionId) -> Result<(Vec<u32>, u64)> {
        self.call(move |s| s.session_tokens(tenant, id)).await?
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
        let (tx, rx) = tmpsc::unbounded_channel();
        self.call(move |s| s.generate(tenant, id, dec, tx))
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
        self.call(move |s| s.list_prefixes(tenant)).await
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
        self.call(|s| s.stats()).await
    }

    /// Checks the page accounting (for tests).
    pub async fn check_invariants(&self) -> Result<std::result::Result<(), String>> {
        self.call(|s| s.check_invariants()).await
    }
}

fn run(sched: &mut Scheduler, rx: mpsc::Receiver<Command>) {
    loop {
        if sched.is_idle() {
            match rx.recv() {
                Ok(cmd) => cmd(sched),
                Err(_) => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => cmd(sched),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    sched.cancel_all();
                    return;
                }
            }
        }
        if !sched.is_idle() {
            sched.step();
        }
    }
    sched.cancel_all();
}
