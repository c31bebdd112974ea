//! The prefix cache's data structures: the paged KV pool's bookkeeping ([`pool`]) and the
//! token-granular radix tree over it ([`radix`]). No I/O and no KV bytes yet: pages are ids whose
//! contents a later KV store will hold, indexed by [`PageId`].

pub mod pool;
pub mod radix;
mod types;

pub use pool::{PageId, PagePool, PoolError};
pub use radix::{
    EvictReport, EvictedRun, Inserted, Match, Namespace, NodeId, RadixError, RadixTree, TreeStats,
};
