//! Tests of the radix tree: targeted cases, then a property test against a naive model.

use super::*;
use proptest::prelude::*;

const A: Namespace = Namespace::Tenant(1);
const B: Namespace = Namespace::Tenant(2);

fn tree(pages: usize, ps: usize) -> RadixTree {
    RadixTree::new(PagePool::new(pages, ps).unwrap())
}

/// Allocates fresh pages for `tokens`, inserts them, and drops the caller's references.
fn put(t: &mut RadixTree, ns: Namespace, tokens: &[u32]) -> Inserted {
    let n = tokens.len().div_ceil(t.page_size());
    let pages: Vec<PageId> = (0..n).map(|_| t.pool_mut().alloc().unwrap()).collect();
    let r = t.insert(ns, tokens, &pages).unwrap();
    for p in pages {
        t.pool_mut().release(p).unwrap();
    }
    t.check_invariants().unwrap();
    r
}

#[test]
fn continuations_follow_the_most_recent_branch_within_the_namespace() {
    let mut t = tree(32, 4);
    put(&mut t, A, &[1, 2, 3, 4, 5, 6, 7, 8]);
    put(&mut t, A, &[1, 2, 3, 9, 9]);
    // The second branch was used last.
    assert_eq!(t.continuation(A, &[1, 2], 10), vec![3, 9, 9]);
    t.match_prefix(A, &[1, 2, 3, 4]);
    assert_eq!(t.continuation(A, &[1, 2], 10), vec![3, 4, 5, 6, 7, 8]);
    assert_eq!(t.continuation(A, &[1, 2], 2), vec![3, 4]);
    assert_eq!(
        t.continuation(A, &[1, 2, 3, 4, 5, 6, 7, 8], 4),
        Vec::<u32>::new()
    );
    // Only when the whole context is cached, and never across namespaces.
    assert!(t.continuation(A, &[1, 7], 4).is_empty());
    assert!(t.continuation(B, &[1, 2], 4).is_empty());
    assert!(t.continuation(A, &[1, 2], 0).is_empty());
}

#[test]
fn split_inside_a_page_shares_the_page() {
    let mut t = tree(16, 4);
    put(&mut t, A, &[1, 2, 3, 4, 5, 6, 7]); // pages P0 [1..4], P1 [5,6,7]
    let whole = t.match_prefix(A, &[1, 2, 3, 4, 5, 6, 7]);
    let p1 = whole.pages[1];
    // Diverge at position 5, inside page 1.
    put(&mut t, A, &[1, 2, 3, 4, 5, 9]);
    t.check_invariants().unwrap();
    // Upper half [0,5) and lower half [5,7) both list P1: two tree references.
    assert_eq!(t.held_pages()[&p1], 2);
    assert_eq!(t.pool().refcount(p1).unwrap(), 2);
    let m = t.match_prefix(A, &[1, 2, 3, 4, 5, 6, 0]);
    assert_eq!(m.matched_tokens, 6);
    assert_eq!(m.pages, vec![whole.pages[0], p1]);
    assert_eq!(m.last_page_tokens, 2);
    let m = t.match_prefix(A, &[1, 2, 3, 4, 5, 9]);
    assert_eq!(m.matched_tokens, 6);
    assert_eq!(m.pages[0], whole.pages[0]);
    assert_ne!(
        m.pages[1], p1,
        "the new branch uses its own copy of the boundary page"
    );
    let m = t.match_prefix(A, &[1, 2, 3, 4, 5]);
    assert_eq!((m.matched_tokens, m.last_page_tokens), (5, 1));
    assert_eq!(t.stats().nodes, 3);
    assert_eq!(t.stats().cached_tokens, 8);
    // Evict everything: every page comes back, none twice.
    let r = t.evict(usize::MAX).unwrap();
    assert_eq!(r.freed, 3);
    assert_eq!(t.pool().free_count(), 16);
    assert_eq!(t.stats(), TreeStats::default());
    t.check_invariants().unwrap();
}

#[test]
fn namespaces_are_isolated() {
    let mut t = tree(8, 2);
    put(&mut t, A, &[1, 2, 3]);
    assert_eq!(t.match_prefix(B, &[1, 2, 3]).matched_tokens, 0);
    assert_eq!(t.match_prefix(B, &[1, 2, 3]).last_node, None);
    let published = Namespace::Published(1);
    assert_eq!(t.longest_prefix_len(published, &[1, 2, 3]), 0);
    put(&mut t, B, &[1, 2]);
    assert_eq!(t.match_prefix(B, &[1, 2, 3]).matched_tokens, 2);
    assert_eq!(t.match_prefix(A, &[1, 2, 3]).matched_tokens, 3);
}

#[test]
fn eviction_is_lru_over_leaves() {
    let mut t = tree(16, 2);
    put(&mut t, A, &[1, 1]);
    put(&mut t, A, &[2, 2]);
    put(&mut t, A, &[3, 3]);
    t.match_prefix(A, &[1, 1]); // 1 is now the most recent, 2 the least
    let r = t.evict(1).unwrap();
    assert_eq!(r.freed, 1);
    assert_eq!(r.evicted[0].tokens, vec![2, 2]);
    let r = t.evict(1).unwrap();
    assert_eq!(r.evicted[0].tokens, vec![3, 3]);
    assert_eq!(t.longest_prefix_len(A, &[1, 1]), 2);
    // A parent becomes evictable once its only child goes.
    put(&mut t, A, &[1, 1, 5, 5]);
    let r = t.evict(2).unwrap();
    assert_eq!(r.evicted.len(), 2);
    assert_eq!((r.evicted[0].start, r.evicted[1].start), (2, 0));
    t.check_invariants().unwrap();
}

#[test]
fn locked_and_pinned_are_never_evicted() {
    let mut t = tree(16, 2);
    let locked = put(&mut t, A, &[1, 2, 3]).last_node.unwrap();
    put(&mut t, A, &[4, 5, 6]);
    put(&mut t, B, &[7, 8, 9]);
    t.lock(locked).unwrap();
    t.pin(A, &[4, 5]).unwrap();
    let r = t.evict(usize::MAX).unwrap();
    // Only [4,5,6]'s tail (position 2) and B's leaf can go.
    assert_eq!(r.evicted.len(), 2);
    assert_eq!(t.longest_prefix_len(A, &[1, 2, 3]), 3);
    assert_eq!(t.longest_prefix_len(A, &[4, 5, 6]), 2);
    assert_eq!(t.longest_prefix_len(B, &[7, 8, 9]), 0);
    t.unlock(locked).unwrap();
    assert_eq!(t.unlock(locked), Err(RadixError::NotLocked(locked)));
    t.unpin(A, &[4, 5]).unwrap();
    assert!(matches!(
        t.unpin(A, &[4, 5]),
        Err(RadixError::NotPinned { .. })
    ));
    t.evict(usize::MAX).unwrap();
    assert_eq!(t.stats().nodes, 0);
    assert_eq!(t.pool().free_count(), 16);
    // The evicted handle is stale now.
    assert_eq!(t.lock(locked), Err(RadixError::UnknownNode(locked)));
    t.check_invariants().unwrap();
}

#[test]
fn lock_survives_a_split_below_it() {
    let mut t = tree(16, 3);
    let n = put(&mut t, A, &[1, 2, 3, 4, 5]).last_node.unwrap();
    t.lock(n).unwrap();
    put(&mut t, A, &[1, 2, 9]); // splits the locked node at 2
    t.check_invariants().unwrap();
    t.evict(usize::MAX).unwrap();
    assert_eq!(t.longest_prefix_len(A, &[1, 2, 3, 4, 5]), 5);
    t.unlock(n).unwrap();
    t.evict(usize::MAX).unwrap();
    assert_eq!(t.pool().free_count(), 16);
    t.check_invariants().unwrap();
}

#[test]
fn bad_inputs_are_typed_errors() {
    let mut t = tree(4, 2);
    let p = t.pool_mut().alloc().unwrap();
    assert!(matches!(
        t.insert(A, &[1, 2, 3], &[p]),
        Err(RadixError::PageCountMismatch {
            expected: 2,
            got: 1,
            ..
        })
    ));
    t.pool_mut().release(p).unwrap();
    assert!(matches!(
        t.insert(A, &[1], &[p]),
        Err(RadixError::Pool(PoolError::NotAllocated { .. }))
    ));
    assert!(matches!(t.pin(A, &[1]), Err(RadixError::NotCached { .. })));
    assert_eq!(t.pin(A, &[]), Err(RadixError::Empty));
    t.check_invariants().unwrap();
    assert_eq!(t.pool().free_count(), 4);
}

// ---------------------------------------------------------------------------------------------
// Property test against a naive model: a list of cached (namespace, tokens) entries.

#[derive(Debug, Clone)]
enum Op {
    /// Insert a sequence; keep it running (locked, caller holds its pages) if `hold`.
    Insert {
        ns: bool,
        tokens: Vec<u32>,
        hold: bool,
    },
    /// Match a query and compare with the model.
    Match { ns: bool, tokens: Vec<u32> },
    /// Finish the running sequence with this index (mod count): unlock and release.
    Finish(usize),
    /// Pin a prefix of a cached entry (index mod count, length fraction).
    Pin(usize, usize),
    /// Unpin a pinned prefix.
    Unpin(usize),
    /// Evict this many pages.
    Evict(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let toks = || prop::collection::vec(0u32..3, 0..10);
    prop_oneof![
        4 => (any::<bool>(), toks(), prop::bool::weighted(0.3))
            .prop_map(|(ns, tokens, hold)| Op::Insert { ns, tokens, hold }),
        3 => (any::<bool>(), toks()).prop_map(|(ns, tokens)| Op::Match { ns, tokens }),
        1 => any::<usize>().prop_map(Op::Finish),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(i, l)| Op::Pin(i, l)),
        1 => any::<usize>().prop_map(Op::Unpin),
        1 => (0usize..6).prop_map(Op::Evict),
    ]
}

struct Holder {
    ns: Namespace,
    tokens: Vec<u32>,
    pages: Vec<PageId>,
    node: Option<NodeId>,
}

struct Model {
    entries: Vec<(Namespace, Vec<u32>)>,
}

impl Model {
    fn lcp(&self, ns: Namespace, q: &[u32]) -> usize {
        self.entries
            .iter()
            .filter(|(n, _)| *n == ns)
            .map(|(_, e)| common_len(e, q))
            .max()
            .unwrap_or(0)
    }

    /// Applies an eviction as the tree reports it: the leaf's run `[start..]` is gone, and as it
    /// was a leaf, every entry through its first token was a prefix of its path.
    fn evicted(&mut self, runs: &[EvictedRun]) {
        for r in runs {
            for (ns, e) in &mut self.entries {
                if *ns == r.ns && e.len() > r.start && e[..=r.start] == r.tokens[..=r.start] {
                    assert!(
                        r.tokens.starts_with(e),
                        "evicted a node that was not a leaf"
                    );
                    e.truncate(r.start);
                }
            }
        }
        self.entries.retain(|(_, e)| !e.is_empty());
    }
}

fn check(t: &RadixTree, model: &Model, holders: &[Holder], pins: &[(Namespace, Vec<u32>)]) {
    t.check_invariants().unwrap();
    // Exact accounting: each page's references = the tree's + the running sequences'.
    let mut refs = t.held_pages();
    for h in holders {
        for &p in &h.pages {
            *refs.entry(p).or_insert(0) += 1;
        }
    }
    for i in 0..t.pool().capacity() as u32 {
        let p = PageId(i);
        let want = refs.get(&p).copied().unwrap_or(0);
        assert_eq!(
            t.pool().refcount(p).unwrap(),
            want,
            "{p}: leaked or over-released"
        );
    }
    // Every model entry matches in full; locked and pinned sequences are still cached.
    for (ns, e) in &model.entries {
        assert_eq!(t.longest_prefix_len(*ns, e), e.len());
    }
    for h in holders {
        assert_eq!(t.longest_prefix_len(h.ns, &h.tokens), h.tokens.len());
    }
    for (ns, p) in pins {
        assert_eq!(t.longest_prefix_len(*ns, p), p.len());
    }
    let cached: usize = t.stats().cached_tokens;
    assert!(cached <= model.entries.iter().map(|(_, e)| e.len()).sum::<usize>());
}

/// What each page was written with: the namespace and the sequence prefix up to the page's end
/// (a page's KV depends on every token before it, so the whole prefix is its content).
type Contents = std::collections::HashMap<PageId, (Namespace, Vec<u32>)>;

/// The pages a match returns hold exactly the matched tokens' KV, in the same namespace.
fn check_contents(contents: &Contents, ns: Namespace, q: &[u32], m: &Match, ps: usize) {
    for (k, p) in m.pages.iter().enumerate() {
        let upto = ((k + 1) * ps).min(m.matched_tokens);
        let (pns, written) = &contents[p];
        assert_eq!(*pns, ns, "{p} crosses namespaces");
        assert!(written.len() >= upto, "{p} holds too few tokens");
        assert_eq!(written[..upto], q[..upto], "{p} holds other tokens");
    }
}

fn run(ps: usize, capacity: usize, ops: Vec<Op>) {
    let mut t = tree(capacity, ps);
    let mut contents = Contents::new();
    let mut model = Model { entries: vec![] };
    let mut holders: Vec<Holder> = vec![];
    let mut pins: Vec<(Namespace, Vec<u32>)> = vec![];
    let ns_of = |b: bool| if b { A } else { B };
    for op in ops {
        match op {
            Op::Insert { ns, tokens, hold } => {
                let ns = ns_of(ns);
                let m = t.match_prefix(ns, &tokens);
                assert_eq!(m.matched_tokens, model.lcp(ns, &tokens));
                check_contents(&contents, ns, &tokens, &m, ps);
                // Reuse full matched pages; copy the partial one and compute the rest afresh.
                let full = m.matched_tokens / ps;
                let need = tokens.len().div_ceil(ps);
                let mut pages = m.pages[..full].to_vec();
                for &p in &pages {
                    t.pool_mut().retain(p).unwrap();
                }
                let fresh = need - full;
                if t.pool().free_count() < fresh {
                    let r = t.evict(fresh - t.pool().free_count()).unwrap();
                    model.evicted(&r.evicted);
                }
                let mut ok = true;
                for k in full..need {
                    match t.pool_mut().alloc() {
                        Some(p) => {
                            let end = ((k + 1) * ps).min(tokens.len());
                            contents.insert(p, (ns, tokens[..end].to_vec()));
                            pages.push(p);
                        }
                        None => ok = false,
                    }
                }
                if ok {
                    let r = t.insert(ns, &tokens, &pages).unwrap();
                    if !tokens.is_empty() {
                        model.entries.push((ns, tokens.clone()));
                    }
                    if hold && !tokens.is_empty() {
                        t.lock(r.last_node.unwrap()).unwrap();
                        holders.push(Holder {
                            ns,
                            tokens,
                            pages,
                            node: r.last_node,
                        });
                        pages = vec![];
                    }
                }
                for p in pages {
                    t.pool_mut().release(p).unwrap();
                }
            }
            Op::Match { ns, tokens } => {
                let ns = ns_of(ns);
                let m = t.match_prefix(ns, &tokens);
                assert_eq!(m.matched_tokens, model.lcp(ns, &tokens));
                assert_eq!(m.pages.len(), m.matched_tokens.div_ceil(ps));
                check_contents(&contents, ns, &tokens, &m, ps);
                if m.matched_tokens > 0 {
                    assert_eq!(
                        m.last_page_tokens,
                        m.matched_tokens - (m.pages.len() - 1) * ps
                    );
                }
            }
            Op::Finish(i) if !holders.is_empty() => {
                let h = holders.remove(i % holders.len());
                t.unlock(h.node.unwrap()).unwrap();
                for p in h.pages {
                    t.pool_mut().release(p).unwrap();
                }
            }
            Op::Pin(i, l) if !model.entries.is_empty() => {
                let (ns, e) = model.entries[i % model.entries.len()].clone();
                let len = 1 + l % e.len();
                t.pin(ns, &e[..len]).unwrap();
                pins.push((ns, e[..len].to_vec()));
            }
            Op::Unpin(i) if !pins.is_empty() => {
                let (ns, p) = pins.remove(i % pins.len());
                t.unpin(ns, &p).unwrap();
            }
            Op::Evict(n) => {
                let r = t.evict(n).unwrap();
                model.evicted(&r.evicted);
            }
            _ => {}
        }
        check(&t, &model, &holders, &pins);
    }
    // Tear down: nothing may leak.
    for h in holders {
        t.unlock(h.node.unwrap()).unwrap();
        for p in h.pages {
            t.pool_mut().release(p).unwrap();
        }
    }
    for (ns, p) in pins {
        t.unpin(ns, &p).unwrap();
    }
    t.evict(usize::MAX).unwrap();
    assert_eq!(t.stats(), TreeStats::default());
    assert_eq!(t.pool().free_count(), capacity);
    t.check_invariants().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn tree_agrees_with_naive_model(
        ps in 1usize..=4,
        capacity in 6usize..24,
        ops in prop::collection::vec(op_strategy(), 1..60),
    ) {
        run(ps, capacity, ops);
    }
}
