//! The prefix cache's data structures: the paged KV pool's bookkeeping ([`pool`]) and the
//! token-granular radix tree over it ([`radix`]). Pages here are ids and reference counts; their
//! bytes live in the executor's KV pool, indexed by the same [`PageId`].

pub mod pool;
pub mod radix;
mod types;

pub use pool::{PageId, PageLease, PagePool, PoolError};
pub use radix::{
    EvictReport, EvictedRun, Inserted, Match, Namespace, NodeId, RadixError, RadixTree, TreeStats,
};
