//! Random operation sequences against the scheduler on the real model, with a pool small
//! enough to force eviction, copy-on-write and preemption: after every operation and every
//! step the page accounting holds (no leak, no double free, no freed page still held), every
//! generation ends with `Done` (or the pool-too-small error for a request larger than the pool),
//! and each session's log is its prompt followed by exactly the tokens streamed to it.

use super::tests::engine;
use super::*;
use crate::generate::GenerateOptions;
use crate::model::KvPages;
use crate::sampling::SamplingParams;
use proptest::prelude::*;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

#[derive(Debug, Clone)]
enum Op {
    Create {
        tenant: u64,
        len: usize,
    },
    Append {
        s: usize,
        len: usize,
    },
    Generate {
        s: usize,
        max: usize,
    },
    Fork {
        s: usize,
    },
    Rewrite {
        s: usize,
        a: usize,
        b: usize,
        len: usize,
    },
    Close {
        s: usize,
    },
    Drop {
        s: usize,
    },
    Pin {
        tenant: u64,
        len: usize,
    },
    Step {
        n: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..2, 1usize..40).prop_map(|(tenant, len)| Op::Create { tenant, len }),
        1 => (0usize..8, 1usize..12).prop_map(|(s, len)| Op::Append { s, len }),
        5 => (0usize..8, 1usize..12).prop_map(|(s, max)| Op::Generate { s, max }),
        1 => (0usize..8).prop_map(|s| Op::Fork { s }),
        1 => (0usize..8, 0usize..40, 0usize..40, 0usize..6)
            .prop_map(|(s, a, b, len)| Op::Rewrite { s, a, b, len }),
        1 => (0usize..8).prop_map(|s| Op::Close { s }),
        1 => (0usize..8).prop_map(|s| Op::Drop { s }),
        1 => (0u64..2, 1usize..20).prop_map(|(tenant, len)| Op::Pin { tenant, len }),
        2 => (1usize..4).prop_map(|n| Op::Step { n }),
    ]
}

/// A session the test holds: its id, tenant, the log it expects, and a stream in flight.
struct Held {
    tenant: u64,
    id: SessionId,
    log: Vec<u32>,
    stream: Option<(UnboundedReceiver<Event>, Vec<u32>)>,
}

fn tokens(seed: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| 100 + ((seed * 7919 + i * 104_729) % 900) as u32)
        .collect()
}

/// Reads what a stream has so far; returns true once it has ended.
fn drain(h: &mut Held) -> bool {
    let Some((rx, got)) = h.stream.as_mut() else {
        return true;
    };
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { id, .. } => got.push(id),
            Event::Done(u) => {
                assert!(u.cached_tokens <= u.prompt_tokens, "{u:?}");
                let (_, got) = h.stream.take().expect("stream");
                h.log.extend(got);
                return true;
            }
            Event::Error(e) => {
                assert!(matches!(e, SchedError::PoolTooSmall { .. }), "{e}");
                h.stream = None;
                return true;
            }
        }
    }
    false
}

fn run_ops(ops: Vec<Op>) -> std::result::Result<(), TestCaseError> {
    let page_bytes = KvPages::bytes_per_token(engine().model.config()) * 4;
    let mut s = Scheduler::new(
        engine(),
        SchedulerConfig {
            page_size: 4,
            kv_memory: 24 * page_bytes,
            max_batch: 4,
            step_tokens: 16,
            cache: true,
            limits: TenantLimits::default(),
            store: None,
        },
    )
    .unwrap();
    let mut held: Vec<Held> = Vec::new();
    let opts = |max| GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: max,
        ..Default::default()
    };
    for (k, op) in ops.into_iter().enumerate() {
        let pick = |i: usize, held: &Vec<Held>| (!held.is_empty()).then(|| i % held.len());
        match op {
            Op::Create { tenant, len } => {
                let log = tokens(k, len);
                let id = s.create_session(tenant, None, log.clone()).unwrap();
                held.push(Held {
                    tenant,
                    id,
                    log,
                    stream: None,
                });
            }
            Op::Append { s: i, len } => {
                if let Some(i) = pick(i, &held) {
                    drain(&mut held[i]);
                    let extra = tokens(k, len);
                    let h = &mut held[i];
                    match s.append(h.tenant, h.id, &extra) {
                        Ok(n) => {
                            h.log.extend(&extra);
                            prop_assert_eq!(n, h.log.len());
                        }
                        Err(SchedError::SessionBusy(_)) => prop_assert!(h.stream.is_some()),
                        Err(e) => prop_assert!(false, "append: {}", e),
                    }
                }
            }
            Op::Generate { s: i, max } => {
                if let Some(i) = pick(i, &held) {
                    drain(&mut held[i]);
                    let h = &mut held[i];
                    let (tx, rx) = unbounded_channel();
                    match s.generate(h.tenant, h.id, &opts(max), tx) {
                        Ok(()) => h.stream = Some((rx, Vec::new())),
                        Err(SchedError::SessionBusy(_)) => prop_assert!(h.stream.is_some()),
                        Err(e) => prop_assert!(false, "generate: {}", e),
                    }
                }
            }
            Op::Fork { s: i } => {
                if let Some(i) = pick(i, &held) {
                    drain(&mut held[i]);
                    let (tenant, id, log) = (held[i].tenant, held[i].id, held[i].log.clone());
                    match s.fork(tenant, id) {
                        Ok(new) => held.push(Held {
                            tenant,
                            id: new,
                            log,
                            stream: None,
                        }),
                        Err(SchedError::SessionBusy(_)) => prop_assert!(held[i].stream.is_some()),
                        Err(e) => prop_assert!(false, "fork: {}", e),
                    }
                }
            }
            Op::Rewrite { s: i, a, b, len } => {
                if let Some(i) = pick(i, &held) {
                    drain(&mut held[i]);
                    let h = &mut held[i];
                    let (a, b) = (a.min(b), a.max(b));
                    let new = tokens(k, len);
                    match s.rewrite(h.tenant, h.id, a, b, &new) {
                        Ok(_) => {
                            h.log.splice(a..b, new);
                        }
                        Err(SchedError::SessionBusy(_)) => prop_assert!(h.stream.is_some()),
                        Err(SchedError::InvalidRequest(_)) => prop_assert!(b > h.log.len()),
                        Err(e) => prop_assert!(false, "rewrite: {}", e),
                    }
                }
            }
            Op::Close { s: i } => {
                if let Some(i) = pick(i, &held) {
                    let h = held.swap_remove(i);
                    s.close(h.tenant, h.id).unwrap();
                }
            }
            Op::Drop { s: i } => {
                if let Some(i) = pick(i, &held) {
                    // The reader goes away; the request is cancelled at the next step and the
                    // session keeps whatever was generated, which this test no longer tracks.
                    if held[i].stream.take().is_some() {
                        let h = held.swap_remove(i);
                        s.step();
                        s.close(h.tenant, h.id).unwrap();
                    }
                }
            }
            Op::Pin { tenant, len } => {
                s.register_prefix(
                    tenant,
                    tokens(k, len),
                    false,
                    Box::new(|r| {
                        if let Err(e) = r {
                            assert!(matches!(e, SchedError::PoolTooSmall { .. }), "{e}");
                        }
                    }),
                );
            }
            Op::Step { n } => {
                for _ in 0..n {
                    s.step();
                    s.check_invariants().map_err(TestCaseError::fail)?;
                }
            }
        }
        s.check_invariants().map_err(TestCaseError::fail)?;
        for h in &mut held {
            drain(h);
        }
    }
    // Run everything to the end.
    for _ in 0..2000 {
        if s.is_idle() {
            break;
        }
        s.step();
        s.check_invariants().map_err(TestCaseError::fail)?;
    }
    prop_assert!(s.is_idle(), "the scheduler did not finish");
    for h in &mut held {
        prop_assert!(drain(h), "a stream never ended");
        let (log, _) = s.session_tokens(h.tenant, h.id).unwrap();
        prop_assert_eq!(&log, &h.log, "session {:?}", h.id);
    }
    let st = s.stats();
    eprintln!(
        "steps {} preemptions {} evicted pages {} cached tokens {}",
        st.steps, st.preemptions, st.evicted_pages, st.cached_tokens
    );
    prop_assert_eq!(st.free_pages + st.tree.pages_held, st.pool_pages);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_keep_the_pool_consistent(ops in proptest::collection::vec(op(), 10..50)) {
        run_ops(ops)?;
    }
}
