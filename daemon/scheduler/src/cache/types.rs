//! The radix tree's public value types: namespaces, node handles, results and errors.

use super::pool::{PageId, PoolError};

pub use agentd_store::Namespace;

/// A handle on a node. Stale handles (to an evicted node) are detected by the generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    pub(super) index: u32,
    pub(super) generation: u32,
}

/// What went wrong in a [`RadixTree`](super::RadixTree) operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RadixError {
    /// The pool rejected a page operation.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// `insert` got the wrong number of pages for its tokens.
    #[error("{tokens} tokens at page size {page_size} need {expected} pages, got {got}")]
    PageCountMismatch {
        /// Tokens inserted.
        tokens: usize,
        /// The pool's page size.
        page_size: usize,
        /// Pages needed.
        expected: usize,
        /// Pages given.
        got: usize,
    },
    /// The node handle names no live node (evicted, or never existed).
    #[error("node {0:?} does not exist (evicted or stale handle)")]
    UnknownNode(NodeId),
    /// `unlock` of a node whose lock count is already 0.
    #[error("node {0:?} is not locked")]
    NotLocked(NodeId),
    /// `pin` of a prefix that is not (fully) cached.
    #[error("cannot pin {len} tokens in {ns:?}: only {matched} are cached")]
    NotCached {
        /// Namespace.
        ns: Namespace,
        /// Length of the prefix asked for.
        len: usize,
        /// How much of it is cached.
        matched: usize,
    },
    /// `unpin` of a prefix that is not pinned.
    #[error("{len} tokens in {ns:?} are not pinned")]
    NotPinned {
        /// Namespace.
        ns: Namespace,
        /// Length of the prefix asked for.
        len: usize,
    },
    /// An empty token sequence where one is required (pin).
    #[error("empty token sequence")]
    Empty,
}

/// The result of [`RadixTree::match_prefix`](super::RadixTree::match_prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// How many leading tokens are cached.
    pub matched_tokens: usize,
    /// Pages for those tokens: `ceil(matched_tokens / page_size)` of them, in order. The tree
    /// keeps its references; retain any page you keep beyond the next tree mutation.
    pub pages: Vec<PageId>,
    /// Valid tokens in the last page (`1..=page_size`; 0 when nothing matched). Below
    /// `page_size`, the caller copies that page before writing to it.
    pub last_page_tokens: usize,
    /// The deepest node the match reached (the match may end inside it); `None` when nothing
    /// matched. Lock it while a sequence uses these pages.
    pub last_node: Option<NodeId>,
}

/// The result of [`RadixTree::insert`](super::RadixTree::insert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inserted {
    /// Tokens that were already cached (their pages were not taken from the caller).
    pub already_cached: usize,
    /// The node that ends exactly at the inserted sequence (`None` for an empty sequence).
    pub last_node: Option<NodeId>,
}

/// One leaf removed by [`RadixTree::evict`](super::RadixTree::evict): the persistence tier can write it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictedRun {
    /// Namespace.
    pub ns: Namespace,
    /// The full token path from the root to the leaf's end.
    pub tokens: Vec<u32>,
    /// Where the removed run started: tokens `[start..]` are no longer cached.
    pub start: usize,
    /// The pages the run held (page indices `start / page_size ..`), released but not yet
    /// reused: their KV bytes are intact until the pool hands them out again.
    pub pages: Vec<PageId>,
    /// How many matches reached into the run while it was cached.
    pub hits: u64,
}

/// The result of [`RadixTree::evict`](super::RadixTree::evict).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    /// Pages whose last reference was dropped (now free in the pool).
    pub freed: usize,
    /// The runs removed, in eviction order.
    pub evicted: Vec<EvictedRun>,
}

/// Counts over the whole tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Non-root nodes.
    pub nodes: usize,
    /// Tokens on all edges.
    pub cached_tokens: usize,
    /// Page references the tree holds (a page shared by two nodes counts twice).
    pub page_refs: usize,
    /// Distinct pages the tree holds.
    pub pages_held: usize,
}
