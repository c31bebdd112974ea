//! The index's rules on fakes: events and heartbeats against a model of what each node holds.

use super::*;
use crate::test_support::{fingerprint, ns};
use proptest::prelude::*;
use std::collections::BTreeSet;

fn keys(tokens: &[u32]) -> Vec<PageKey> {
    PageRun::new(&ns(1), tokens).keys().to_vec()
}

fn hashes(k: &[PageKey]) -> Vec<[u8; 32]> {
    k.iter().map(|k| *k.hash()).collect()
}

fn hb(node: u8, epoch: u64) -> Heartbeat {
    Heartbeat {
        node,
        epoch,
        fingerprint: fingerprint(),
    }
}

fn ev(node: u8, epoch: u64, kind: EventKind, k: &[PageKey]) -> KvEvent {
    KvEvent {
        node,
        epoch,
        kind,
        keys: hashes(k),
    }
}

#[test]
fn a_node_matches_the_leading_pages_it_holds_while_its_heartbeat_is_current() {
    let tokens: Vec<u32> = (0..16 * 6).collect();
    let k = keys(&tokens);
    let mut idx = KvIndex::new();
    idx.apply(&ev(3, 10, EventKind::Stored, &k[..4]));
    // No heartbeat yet: the node is not counted.
    assert_eq!(idx.matched_pages(3, &k), 0);
    idx.heartbeat(3, Some(&hb(3, 10)));
    assert_eq!(idx.matched_pages(3, &k), 4);
    assert_eq!(idx.held_anywhere(&k), 4);
    assert_eq!(idx.matched_pages(4, &k), 0);
    assert_eq!(idx.fingerprint(3), Some(&fingerprint()));
    // A page removed in the middle cuts the run there.
    idx.apply(&ev(3, 10, EventKind::Removed, &k[1..2]));
    assert_eq!(idx.matched_pages(3, &k), 1);
    // Another node holding the rest does not extend node 3's run, but the cluster's.
    idx.heartbeat(5, Some(&hb(5, 7)));
    idx.apply(&ev(5, 7, EventKind::Stored, &k));
    assert_eq!(idx.matched_pages(3, &k), 1);
    assert_eq!(idx.held_anywhere(&k), 6);
}

#[test]
fn a_restart_purges_the_old_epochs_entries_and_ignores_its_late_events() {
    let tokens: Vec<u32> = (100..100 + 16 * 3).collect();
    let k = keys(&tokens);
    let mut idx = KvIndex::new();
    idx.heartbeat(1, Some(&hb(1, 100)));
    idx.apply(&ev(1, 100, EventKind::Stored, &k));
    assert_eq!(idx.matched_pages(1, &k), 3);
    // The daemon restarts: its new heartbeat purges what the old run held.
    idx.heartbeat(1, Some(&hb(1, 200)));
    assert_eq!(idx.matched_pages(1, &k), 0);
    assert_eq!(idx.node_pages(1), 0);
    assert!(idx.is_empty());
    // An old run's event read late (the stream replayed) is ignored.
    idx.apply(&ev(1, 100, EventKind::Stored, &k));
    assert_eq!(idx.matched_pages(1, &k), 0);
    // A new run's event before its heartbeat is read also purges and moves the epoch.
    idx.apply(&ev(1, 300, EventKind::Stored, &k[..1]));
    assert_eq!(idx.epoch(1), Some(300));
    assert_eq!(idx.matched_pages(1, &k), 1);
    // A heartbeat with an older epoch (the clock stepped back before a restart) is a restart
    // too: the heartbeat names the node's current run.
    idx.heartbeat(1, Some(&hb(1, 250)));
    assert_eq!(idx.epoch(1), Some(250));
    assert_eq!(idx.node_pages(1), 0);
}

#[test]
fn an_expired_heartbeat_purges_the_node_and_marks_it_down() {
    let tokens: Vec<u32> = (0..32).collect();
    let k = keys(&tokens);
    let mut idx = KvIndex::new();
    idx.heartbeat(2, Some(&hb(2, 5)));
    idx.apply(&ev(2, 5, EventKind::Stored, &k));
    assert_eq!(idx.alive_nodes(), vec![2]);
    idx.heartbeat(2, None);
    assert!(!idx.is_alive(2));
    assert_eq!(idx.held_anywhere(&k), 0);
    assert_eq!(idx.node_pages(2), 0);
    // The same run's heartbeat coming back (Redis was slow) revives it, empty.
    idx.heartbeat(2, Some(&hb(2, 5)));
    assert!(idx.is_alive(2));
    assert_eq!(idx.matched_pages(2, &k), 0);
}

#[test]
fn events_round_trip_through_their_stream_fields_and_malformed_ones_are_refused() {
    let k = keys(&(0..48).collect::<Vec<_>>());
    let e = ev(127, u64::MAX, EventKind::Removed, &k);
    let fields: HashMap<String, Vec<u8>> = e
        .fields()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(KvEvent::parse(&fields), Some(e));
    for (field, bad) in [
        ("node", b"128".to_vec()),
        ("node", b"x".to_vec()),
        ("epoch", b"-1".to_vec()),
        ("kind", b"moved".to_vec()),
        ("keys", vec![0u8; 33]),
    ] {
        let mut f = fields.clone();
        f.insert(field.into(), bad);
        assert_eq!(KvEvent::parse(&f), None, "{field}");
    }
    let mut f = fields.clone();
    f.remove("keys");
    assert_eq!(KvEvent::parse(&f), None);
}

#[derive(Debug, Clone)]
enum Op {
    Stored {
        node: u8,
        epoch: u64,
        from: usize,
        to: usize,
    },
    Removed {
        node: u8,
        epoch: u64,
        from: usize,
        to: usize,
    },
    Beat {
        node: u8,
        epoch: Option<u64>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0u8..4;
    let epoch = 1u64..4;
    prop_oneof![
        (node.clone(), epoch.clone(), 0usize..8, 0usize..8).prop_map(|(node, epoch, a, b)| {
            Op::Stored {
                node,
                epoch,
                from: a.min(b),
                to: a.max(b),
            }
        }),
        (node.clone(), epoch.clone(), 0usize..8, 0usize..8).prop_map(|(node, epoch, a, b)| {
            Op::Removed {
                node,
                epoch,
                from: a.min(b),
                to: a.max(b),
            }
        }),
        (node, proptest::option::of(epoch)).prop_map(|(node, epoch)| Op::Beat { node, epoch }),
    ]
}

proptest! {
    /// The index answers as a simple model does: per node an epoch, a liveness and a set of
    /// pages; newer events' epochs and any other heartbeat epoch clear, older events are
    /// ignored, a missing heartbeat clears.
    #[test]
    fn the_index_matches_a_model_of_each_nodes_pages(ops in proptest::collection::vec(op(), 1..80)) {
        let k = keys(&(0..16 * 8).collect::<Vec<_>>());
        let mut idx = KvIndex::new();
        let mut model: HashMap<u8, (u64, bool, BTreeSet<usize>)> = HashMap::new();
        for op in &ops {
            match *op {
                Op::Stored { node, epoch, from, to } | Op::Removed { node, epoch, from, to } => {
                    let stored = matches!(op, Op::Stored { .. });
                    let kind = if stored { EventKind::Stored } else { EventKind::Removed };
                    idx.apply(&ev(node, epoch, kind, &k[from..to]));
                    let m = model.entry(node).or_insert((epoch, false, BTreeSet::new()));
                    if epoch < m.0 {
                        continue;
                    }
                    if epoch > m.0 {
                        *m = (epoch, m.1, BTreeSet::new());
                    }
                    for p in from..to {
                        if stored { m.2.insert(p); } else { m.2.remove(&p); }
                    }
                }
                Op::Beat { node, epoch: Some(epoch) } => {
                    idx.heartbeat(node, Some(&hb(node, epoch)));
                    let m = model.entry(node).or_insert((epoch, false, BTreeSet::new()));
                    if epoch != m.0 {
                        *m = (epoch, true, BTreeSet::new());
                    } else {
                        m.1 = true;
                    }
                }
                Op::Beat { node, epoch: None } => {
                    idx.heartbeat(node, None);
                    if let Some(m) = model.get_mut(&node) {
                        m.1 = false;
                        m.2.clear();
                    }
                }
            }
            for node in 0u8..4 {
                let want = model.get(&node).map_or(0, |(_, alive, pages)| {
                    if *alive { (0..8).take_while(|p| pages.contains(p)).count() } else { 0 }
                });
                prop_assert_eq!(idx.matched_pages(node, &k), want, "node {}", node);
                let held = model.get(&node).map_or(0, |m| m.2.len());
                prop_assert_eq!(idx.node_pages(node), held);
            }
            let anywhere = (0..8)
                .take_while(|p| model.values().any(|(_, alive, pages)| *alive && pages.contains(p)))
                .count();
            prop_assert_eq!(idx.held_anywhere(&k), anywhere);
            let distinct: BTreeSet<usize> = model.values().flat_map(|m| m.2.iter().copied()).collect();
            prop_assert_eq!(idx.len(), distinct.len());
        }
    }
}
