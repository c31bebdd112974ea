//! The radix tree that maps token runs to KV pages, token-granular, one root per namespace.
//!
//! Like SGLang's RadixAttention, but an edge may end anywhere inside a page.
//!
//! # Page ownership (the invariants)
//! - Page `k` of a sequence holds the KV of its tokens at positions `k*page_size ..
//!   (k+1)*page_size`. A node covering token positions `[start, end)` (its depth in the tree)
//!   stores exactly the pages that overlap that range: page indices `start / page_size ..=
//!   (end - 1) / page_size`, in order.
//! - Each entry in a node's page list is one reference the tree holds in the [`PagePool`]. A page
//!   listed by two nodes (a boundary inside a page, e.g. after a split) is retained twice.
//!   Evicting a node releases exactly its list. So the pool's count for a page equals the number
//!   of node lists naming it plus the references held outside the tree.
//! - A page a node stores is valid for every position from the page's start up to the node's end
//!   (its inserter had the whole prefix). So for a match, page `k` is taken from the deepest
//!   matched node that overlaps it.
//! - Roots hold no tokens and no pages and are never evicted. A match never leaves its namespace.
//! - A node's lock count is the number of locks taken on it or on any node below it
//!   ([`RadixTree::lock`] walks up to the root). Only leaves with lock count 0 and pin count 0
//!   are evicted, least recently used first.
//! - A pin marks the node that ends exactly at the pinned prefix; as only leaves are evicted,
//!   the whole prefix stays.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use super::pool::{PageId, PagePool, PoolError};
pub use super::types::{
    EvictReport, EvictedRun, Inserted, Match, Namespace, NodeId, RadixError, TreeStats,
};

#[derive(Debug)]
struct Node {
    generation: u32,
    ns: Namespace,
    parent: Option<u32>,
    start: usize,
    tokens: Vec<u32>,
    pages: Vec<PageId>,
    children: BTreeMap<u32, u32>,
    lock: u32,
    pins: u32,
    last_access: u64,
    /// Matches that reached into this node.
    hits: u64,
}

impl Node {
    fn end(&self) -> usize {
        self.start + self.tokens.len()
    }
}

/// A token-granular radix tree over a [`PagePool`], which it owns.
#[derive(Debug)]
pub struct RadixTree {
    pool: PagePool,
    nodes: Vec<Option<Node>>,
    generations: Vec<u32>,
    free_slots: Vec<u32>,
    roots: HashMap<Namespace, u32>,
    clock: u64,
}

use crate::common_len;

impl RadixTree {
    /// An empty tree over `pool`.
    pub fn new(pool: PagePool) -> Self {
        Self {
            pool,
            nodes: Vec::new(),
            generations: Vec::new(),
            free_slots: Vec::new(),
            roots: HashMap::new(),
            clock: 0,
        }
    }

    /// The pool (read-only).
    pub fn pool(&self) -> &PagePool {
        &self.pool
    }

    /// The pool, to allocate, retain and release pages held outside the tree.
    pub fn pool_mut(&mut self) -> &mut PagePool {
        &mut self.pool
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.pool.page_size()
    }

    fn node(&self, i: u32) -> &Node {
        self.nodes[i as usize].as_ref().expect("live node index")
    }

    fn node_mut(&mut self, i: u32) -> &mut Node {
        self.nodes[i as usize].as_mut().expect("live node index")
    }

    fn id(&self, i: u32) -> NodeId {
        NodeId {
            index: i,
            generation: self.node(i).generation,
        }
    }

    fn resolve(&self, id: NodeId) -> Result<u32, RadixError> {
        match self.nodes.get(id.index as usize) {
            Some(Some(n)) if n.generation == id.generation => Ok(id.index),
            _ => Err(RadixError::UnknownNode(id)),
        }
    }

    fn new_node(&mut self, mut node: Node) -> u32 {
        if let Some(i) = self.free_slots.pop() {
            node.generation = self.generations[i as usize];
            self.nodes[i as usize] = Some(node);
            i
        } else {
            let i = self.nodes.len() as u32;
            node.generation = 0;
            self.nodes.push(Some(node));
            self.generations.push(0);
            i
        }
    }

    fn root(&mut self, ns: Namespace) -> u32 {
        if let Some(&r) = self.roots.get(&ns) {
            return r;
        }
        let r = self.new_node(Node {
            generation: 0,
            ns,
            parent: None,
            start: 0,
            tokens: Vec::new(),
            pages: Vec::new(),
            children: BTreeMap::new(),
            lock: 0,
            pins: 0,
            last_access: 0,
            hits: 0,
        });
        self.roots.insert(ns, r);
        r
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Walks `tokens` from the root of `ns`: the path of (node, tokens matched in it).
    fn walk(&self, ns: Namespace, tokens: &[u32]) -> Vec<(u32, usize)> {
        let mut path = Vec::new();
        let Some(&root) = self.roots.get(&ns) else {
            return path;
        };
        let mut cur = root;
        let mut pos = 0;
        while pos < tokens.len() {
            let Some(&child) = self.node(cur).children.get(&tokens[pos]) else {
                break;
            };
            let n = self.node(child);
            let c = common_len(&n.tokens, &tokens[pos..]);
            path.push((child, c));
            pos += c;
            if c < n.tokens.len() {
                break;
            }
            cur = child;
        }
        path
    }

    /// What the tree holds after the whole of `tokens` in `ns` (what an earlier sequence
    /// computed after the same context), following the most recently used branch, at most
    /// `max` tokens; empty unless all of `tokens` is cached. LRU order is not touched.
    pub fn continuation(&self, ns: Namespace, tokens: &[u32], max: usize) -> Vec<u32> {
        let path = self.walk(ns, tokens);
        if max == 0 || path.iter().map(|&(_, c)| c).sum::<usize>() != tokens.len() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut cur = match path.last() {
            Some(&(node, c)) => {
                let n = self.node(node);
                out.extend_from_slice(&n.tokens[c..]);
                node
            }
            None => return Vec::new(),
        };
        while out.len() < max {
            let next = self
                .node(cur)
                .children
                .values()
                .copied()
                .max_by_key(|&c| self.node(c).last_access);
            let Some(next) = next else {
                break;
            };
            out.extend_from_slice(&self.node(next).tokens);
            cur = next;
        }
        out.truncate(max);
        out
    }

    /// The length of the longest cached prefix of `tokens` in `ns`, without touching LRU order.
    pub fn longest_prefix_len(&self, ns: Namespace, tokens: &[u32]) -> usize {
        self.walk(ns, tokens).iter().map(|&(_, c)| c).sum()
    }

    /// The longest cached prefix of `tokens` in `ns`, at token granularity; marks the matched
    /// nodes as used now (for LRU).
    pub fn match_prefix(&mut self, ns: Namespace, tokens: &[u32]) -> Match {
        let path = self.walk(ns, tokens);
        let now = self.tick();
        let ps = self.page_size();
        let matched: usize = path.iter().map(|&(_, c)| c).sum();
        let n_pages = matched.div_ceil(ps);
        let mut pages = Vec::with_capacity(n_pages);
        for &(i, c) in &path {
            let node = self.node_mut(i);
            node.last_access = now;
            node.hits += 1;
            // Pages of this node overlapping the matched part [start, start + c).
            let first = node.start / ps;
            let last = (node.start + c - 1) / ps;
            for k in first..=last {
                let page = node.pages[k - first];
                if k < pages.len() {
                    pages[k] = page; // deeper node wins for a shared boundary page
                } else {
                    pages.push(page);
                }
            }
        }
        debug_assert_eq!(pages.len(), n_pages);
        Match {
            matched_tokens: matched,
            pages,
            last_page_tokens: if matched == 0 {
                0
            } else {
                matched - (n_pages - 1) * ps
            },
            last_node: path.last().map(|&(i, _)| self.id(i)),
        }
    }

    /// Splits node `i` after its first `at` tokens (`0 < at < len`): a new node takes the upper
    /// part and `i` keeps the lower part (so handles to `i`, its children, pins and the locks taken
    /// on it stay valid). The new node inherits `i`'s lock count, as every lock through `i` passes
    /// it. A page straddling the split point is listed by both and retained once more. Returns the
    /// new upper node.
    fn split(&mut self, i: u32, at: usize) -> Result<u32, RadixError> {
        let ps = self.page_size();
        let n = self.node(i);
        let (start, ns, parent) = (n.start, n.ns, n.parent.expect("roots are never split"));
        let split_pos = start + at;
        let first = start / ps;
        let upper_last = (split_pos - 1) / ps;
        let lower_first = split_pos / ps;
        let upper_pages = n.pages[..=upper_last - first].to_vec();
        if upper_last == lower_first {
            self.pool.retain(upper_pages[upper_last - first])?;
        }
        let n = self.node_mut(i);
        let upper_tokens: Vec<u32> = n.tokens.drain(..at).collect();
        n.pages.drain(..lower_first - first);
        n.start = split_pos;
        let (lock, last_access, hits) = (n.lock, n.last_access, n.hits);
        let lower_first_token = n.tokens[0];
        let upper_first_token = upper_tokens[0];
        let mut children = BTreeMap::new();
        children.insert(lower_first_token, i);
        let u = self.new_node(Node {
            generation: 0,
            ns,
            parent: Some(parent),
            start,
            tokens: upper_tokens,
            pages: upper_pages,
            children,
            lock,
            pins: 0,
            last_access,
            hits,
        });
        self.node_mut(i).parent = Some(u);
        self.node_mut(parent).children.insert(upper_first_token, u);
        Ok(u)
    }

    /// Caches `tokens` in `ns` with `pages` (`ceil(len / page_size)` of them, page `k` holding
    /// tokens `k*page_size..`). Parts already cached keep the tree's pages; for the new suffix the
    /// tree retains the caller's pages it stores. The caller keeps its own references.
    pub fn insert(
        &mut self,
        ns: Namespace,
        tokens: &[u32],
        pages: &[PageId],
    ) -> Result<Inserted, RadixError> {
        let ps = self.page_size();
        let expected = tokens.len().div_ceil(ps);
        if pages.len() != expected {
            return Err(RadixError::PageCountMismatch {
                tokens: tokens.len(),
                page_size: ps,
                expected,
                got: pages.len(),
            });
        }
        for &p in pages {
            if self.pool.refcount(p)? == 0 {
                return Err(PoolError::NotAllocated { page: p }.into());
            }
        }
        let now = self.tick();
        let mut cur = self.root(ns);
        let mut pos = 0;
        while pos < tokens.len() {
            let Some(&child) = self.node(cur).children.get(&tokens[pos]) else {
                break;
            };
            let c = common_len(&self.node(child).tokens, &tokens[pos..]);
            let reached = if c < self.node(child).tokens.len() {
                self.split(child, c)?
            } else {
                child
            };
            self.node_mut(reached).last_access = now;
            pos += c;
            cur = reached;
            if reached != child {
                break;
            }
        }
        let already_cached = pos;
        if pos < tokens.len() {
            let first = pos / ps;
            let last = (tokens.len() - 1) / ps;
            let own = pages[first..=last].to_vec();
            for &p in &own {
                self.pool.retain(p)?;
            }
            let leaf = self.new_node(Node {
                generation: 0,
                ns,
                parent: Some(cur),
                start: pos,
                tokens: tokens[pos..].to_vec(),
                pages: own,
                children: BTreeMap::new(),
                lock: 0,
                pins: 0,
                last_access: now,
                hits: 0,
            });
            self.node_mut(cur).children.insert(tokens[pos], leaf);
            cur = leaf;
        }
        Ok(Inserted {
            already_cached,
            last_node: (!tokens.is_empty()).then(|| self.id(cur)),
        })
    }

    /// Locks `node` and its ancestors against eviction (a count; pair with [`Self::unlock`]).
    pub fn lock(&mut self, node: NodeId) -> Result<(), RadixError> {
        let mut cur = Some(self.resolve(node)?);
        while let Some(i) = cur {
            let n = self.node_mut(i);
            n.lock += 1;
            cur = n.parent;
        }
        Ok(())
    }

    /// Undoes one [`Self::lock`] of `node`.
    pub fn unlock(&mut self, node: NodeId) -> Result<(), RadixError> {
        let i = self.resolve(node)?;
        if self.node(i).lock == 0 {
            return Err(RadixError::NotLocked(node));
        }
        let mut cur = Some(i);
        while let Some(i) = cur {
            let n = self.node_mut(i);
            n.lock = n.lock.saturating_sub(1);
            cur = n.parent;
        }
        Ok(())
    }

    /// The node's lock count (locks on it or below it).
    pub fn lock_count(&self, node: NodeId) -> Result<u32, RadixError> {
        Ok(self.node(self.resolve(node)?).lock)
    }

    /// Finds (splitting if needed) the node ending exactly at `tokens.len()`.
    fn node_ending_at(&mut self, ns: Namespace, tokens: &[u32]) -> Result<u32, RadixError> {
        if tokens.is_empty() {
            return Err(RadixError::Empty);
        }
        let path = self.walk(ns, tokens);
        let matched: usize = path.iter().map(|&(_, c)| c).sum();
        if matched < tokens.len() {
            return Err(RadixError::NotCached {
                ns,
                len: tokens.len(),
                matched,
            });
        }
        let &(i, c) = path.last().expect("non-empty match");
        if c < self.node(i).tokens.len() {
            return self.split(i, c);
        }
        Ok(i)
    }

    /// Pins a cached prefix: it is never evicted until unpinned (a count).
    pub fn pin(&mut self, ns: Namespace, tokens: &[u32]) -> Result<(), RadixError> {
        let i = self.node_ending_at(ns, tokens)?;
        self.node_mut(i).pins += 1;
        Ok(())
    }

    /// Undoes one [`Self::pin`] of the same prefix.
    pub fn unpin(&mut self, ns: Namespace, tokens: &[u32]) -> Result<(), RadixError> {
        let not_pinned = RadixError::NotPinned {
            ns,
            len: tokens.len(),
        };
        let path = self.walk(ns, tokens);
        match path.last() {
            Some(&(i, c))
                if c == self.node(i).tokens.len()
                    && self.node(i).end() == tokens.len()
                    && self.node(i).pins > 0 =>
            {
                self.node_mut(i).pins -= 1;
                Ok(())
            }
            _ => Err(not_pinned),
        }
    }

    fn evictable(&self, i: u32) -> bool {
        let n = self.node(i);
        n.parent.is_some() && n.children.is_empty() && n.lock == 0 && n.pins == 0
    }

    fn path_tokens(&self, i: u32) -> Vec<u32> {
        let mut runs = Vec::new();
        let mut cur = Some(i);
        while let Some(c) = cur {
            let n = self.node(c);
            runs.push(&n.tokens);
            cur = n.parent;
        }
        runs.into_iter().rev().flatten().copied().collect()
    }

    /// Evicts unlocked, unpinned leaves, least recently used first, until `n_pages_wanted`
    /// pages are free again in the pool or nothing more can be evicted.
    pub fn evict(&mut self, n_pages_wanted: usize) -> Result<EvictReport, RadixError> {
        let mut report = EvictReport::default();
        let mut heap: BinaryHeap<Reverse<(u64, u32)>> = (0..self.nodes.len() as u32)
            .filter(|&i| self.nodes[i as usize].is_some() && self.evictable(i))
            .map(|i| Reverse((self.node(i).last_access, i)))
            .collect();
        while report.freed < n_pages_wanted {
            let Some(Reverse((_, i))) = heap.pop() else {
                break;
            };
            let tokens = self.path_tokens(i);
            let node = self.nodes[i as usize].take().expect("live leaf");
            self.generations[i as usize] = node.generation.wrapping_add(1);
            self.free_slots.push(i);
            for &p in &node.pages {
                if self.pool.release(p)? {
                    report.freed += 1;
                }
            }
            let parent = node.parent.expect("roots are never evicted");
            self.node_mut(parent).children.remove(&node.tokens[0]);
            report.evicted.push(EvictedRun {
                ns: node.ns,
                tokens,
                start: node.start,
                pages: node.pages,
                hits: node.hits,
            });
            if self.evictable(parent) {
                heap.push(Reverse((self.node(parent).last_access, parent)));
            }
        }
        Ok(report)
    }

    /// Counts over the tree.
    pub fn stats(&self) -> TreeStats {
        let mut s = TreeStats::default();
        let held = self.held_pages();
        for n in self.nodes.iter().flatten().filter(|n| n.parent.is_some()) {
            s.nodes += 1;
            s.cached_tokens += n.tokens.len();
            s.page_refs += n.pages.len();
        }
        s.pages_held = held.len();
        s
    }

    /// For each page the tree references, how many references it holds.
    pub fn held_pages(&self) -> BTreeMap<PageId, u32> {
        let mut m = BTreeMap::new();
        for n in self.nodes.iter().flatten() {
            for &p in &n.pages {
                *m.entry(p).or_insert(0) += 1;
            }
        }
        m
    }

    /// Checks the tree's structure and its accounting against the pool: page lists match the
    /// node ranges, parent/child links agree, lock counts cover the children's, every held page
    /// has at least as many pool references as the tree holds. Returns a message on violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants().map_err(|e| e.to_string())?;
        let ps = self.page_size();
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            if let Some(parent) = n.parent {
                if n.tokens.is_empty() {
                    return Err(format!("node {i} has an empty edge"));
                }
                let want = (n.end() - 1) / ps - n.start / ps + 1;
                if n.pages.len() != want {
                    return Err(format!(
                        "node {i} covers [{}, {}) but lists {} pages, want {want}",
                        n.start,
                        n.end(),
                        n.pages.len()
                    ));
                }
                let p = self.node(parent);
                if p.end() != n.start
                    || p.ns != n.ns
                    || p.children.get(&n.tokens[0]) != Some(&(i as u32))
                {
                    return Err(format!("node {i} disagrees with its parent"));
                }
            } else {
                if !n.tokens.is_empty()
                    || !n.pages.is_empty()
                    || self.roots.get(&n.ns) != Some(&(i as u32))
                {
                    return Err(format!(
                        "root {i} holds tokens/pages or is not its namespace's root"
                    ));
                }
            }
            let child_locks: u32 = n.children.values().map(|&c| self.node(c).lock).sum();
            if n.lock < child_locks {
                return Err(format!(
                    "node {i} lock {} below its children's {child_locks}",
                    n.lock
                ));
            }
            for (&t, &c) in &n.children {
                if self.node(c).tokens[0] != t || self.node(c).parent != Some(i as u32) {
                    return Err(format!("child link {i} -> {c} is inconsistent"));
                }
            }
        }
        for (p, held) in self.held_pages() {
            let rc = self.pool.refcount(p).map_err(|e| e.to_string())?;
            if rc < held {
                return Err(format!(
                    "{p} held {held} times by the tree but has {rc} references"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "radix_tests.rs"]
mod tests;
