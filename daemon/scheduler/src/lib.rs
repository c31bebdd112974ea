//! The scheduler: one thread that drives an [`agentd_engine::Executor`] (which owns the KV
//! pages), owns the page accounting and the radix tree of cached prefixes, runs every session's
//! work in continuous batches, and streams tokens back. It names no CPU type: tests run it on
//! [`agentd_engine::FakeExecutor`] in seconds, the daemon on the CPU executor.
//!
//! - [`cache`]: the page pool's reference counts and the token-granular radix tree.
//! - `scheduler`: sessions as token logs (create, append, fork, rewrite, close), pinned and
//!   published prefixes, and admission (tenants take turns; within a tenant the longest cached
//!   prefix goes first; a request waits rather than recompute a prefix another request is
//!   computing).
//! - `step`: one step — every running decode plus prefill chunks under a token budget
//!   in one forward pass; pages allocated (copy on write for shared partial pages); under memory
//!   pressure the cache is evicted first, then the youngest sequence is preempted and requeued.
//! - `admin`: operator actions — list every prefix, publish one (sharing its pages), unpin
//!   any, evict the unpinned cache.
//! - `persist`: the disk tier's hooks — write-through of pinned prefixes, write-back of
//!   evicted runs hit twice, loading a match's pages back from disk, restoring registrations.
//! - [`draft_model`]: speculative decoding with a smaller model over the same vocabulary —
//!   its own executor and page pool, per-session draft state, batched greedy drafts, a gate
//!   that switches it off where it does not pay.
//! - [`shared_tier`]: the shared tier's hooks — full pages exported on the disk tier's policy
//!   from a bounded queue, and the pages continuing a request's local match loaded at
//!   admission, both on tier threads.
//! - `actor`: [`SchedulerHandle`], the scheduler on its own thread behind a command channel.
//!
//! # Invariants
//! - A page's reference count is the number of radix-tree node lists naming it plus the running
//!   sequences holding it ([`Scheduler::check_invariants`]). Idle sessions hold no pages: their
//!   KV lives in the tree as cache and is re-matched on the next generation.
//! - A page with more than one reference is never written: it is copied first.
//! - Each row's numerics depend only on its kind (prompt or decode), never on the batch.

mod actor;
mod admin;
pub mod cache;
pub mod draft_model;
mod ids;
mod persist;
#[allow(clippy::module_inception)]
mod scheduler;
pub mod shared_tier;
pub mod spec;
mod step;
mod types;

pub use actor::SchedulerHandle;
pub use admin::PrefixEntry;
pub use draft_model::{DraftConfig, DraftError};
pub use ids::{node_of_id, published_namespace};
pub use persist::fingerprint;
pub use scheduler::{PrefixInfo, Scheduler};
pub use shared_tier::SharedTierConfig;
pub use spec::SpecConfig;
pub use types::*;

pub(crate) use agentd_store::common_len;

#[cfg(test)]
mod draft_tests;
#[cfg(test)]
mod persist_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod shared_tier_tests;
#[cfg(test)]
mod spec_tests;
#[cfg(test)]
mod tests;
