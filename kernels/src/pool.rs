//! Keeping the rayon workers awake through a burst of small parallel products.
//!
//! A decode step runs about five parallel regions per layer (the fused Q/K/V product, attention,
//! the output product, gate and up, down), each tens of microseconds long, with a little serial
//! work between them. Called from outside the pool, each region injects a job, wakes a sleeping
//! worker and puts the caller to sleep until the job is done: two wake-ups per region, which on
//! a virtual machine cost as much as the region itself. [`hot`] instead runs the whole step on a
//! worker and keeps every other worker spinning for its duration, running whatever work
//! appears (`rayon::yield_now`), so a region starts on every core at once and the caller never
//! sleeps. The workers go back to sleep when the step ends, or after a millisecond with nothing
//! to do.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

thread_local! {
    /// Whether this thread is running a spinner (a nested one returns at once).
    static SPINNING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `body` on a worker of the current rayon pool, with the pool's other workers spinning
/// (and taking any job they find) until it returns. From inside the pool, or on a pool of one
/// thread, it just runs `body`.
pub fn hot<R: Send>(body: impl FnOnce() -> R + Send) -> R {
    hot_in(None, body)
}

/// [`hot`] on `pool`, or on the current (global) pool.
fn hot_in<R: Send>(pool: Option<&rayon::ThreadPool>, body: impl FnOnce() -> R + Send) -> R {
    let threads = pool.map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
    if threads < 2 || rayon::current_thread_index().is_some() {
        return body();
    }
    let active = AtomicBool::new(true);
    match pool {
        Some(p) => p.scope(|s| section(s, &active, threads, body)),
        None => rayon::scope(|s| section(s, &active, threads, body)),
    }
}

/// Spawns a spinner for each other worker, runs `body` here, then stops the spinners.
fn section<'s, R>(
    s: &rayon::Scope<'s>,
    active: &'s AtomicBool,
    threads: usize,
    body: impl FnOnce() -> R,
) -> R {
    let home = rayon::current_thread_index();
    for _ in 1..threads {
        s.spawn(move |_| spin(active, home));
    }
    let result = body();
    active.store(false, Ordering::Release);
    result
}

/// How long a spinner waits with nothing to do before it gives up (the serial stretches between
/// a step's parallel regions are far shorter).
const IDLE_LIMIT: Duration = Duration::from_millis(1);

/// Takes pending jobs, or spins, until `active` is cleared or nothing has come for
/// [`IDLE_LIMIT`]. A spinner picked up by the thread running the body (`home`, while it waits
/// for a job of its own), or by a thread already spinning, returns at once: spinning there
/// would hold up the work the body waits for. A thread can still pick one up while it waits
/// inside one of the body's jobs (with three or more workers); the idle limit then frees that
/// job, since the body, waiting for it, gives the spinner nothing to do.
fn spin(active: &AtomicBool, home: Option<usize>) {
    if rayon::current_thread_index() == home || SPINNING.get() {
        return;
    }
    SPINNING.set(true);
    let mut last_work = Instant::now();
    while active.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => last_work = Instant::now(),
            _ => {
                if last_work.elapsed() > IDLE_LIMIT {
                    break;
                }
                for _ in 0..32 {
                    std::hint::spin_loop();
                }
            }
        }
    }
    SPINNING.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Nested parallel work inside a hot section completes with every result, sections can be
    /// entered again and again (and from several threads at once), and inside the pool `hot`
    /// is a plain call.
    #[test]
    fn hot_sections_run_nested_parallel_work() {
        let want = |round: u64| -> u64 {
            (0..1000u64)
                .map(|i| (0..10u64).map(|j| i * j + round).sum::<u64>())
                .sum()
        };
        std::thread::scope(|t| {
            for caller in 0..3u64 {
                t.spawn(move || {
                    for round in 0..40u64 {
                        let round = round * 3 + caller;
                        let got = hot(|| {
                            (0..1000u64)
                                .into_par_iter()
                                .map(|i| {
                                    (0..10u64)
                                        .into_par_iter()
                                        .map(|j| i * j + round)
                                        .sum::<u64>()
                                })
                                .sum::<u64>()
                        });
                        assert_eq!(got, want(round), "round {round}");
                    }
                });
            }
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        assert_eq!(pool.install(|| hot(|| 7)), 7);
    }

    /// On a pool of four workers, where a worker can pick up a spinner while it waits inside
    /// one of the section's own jobs, deeply nested joins still finish (the idle limit frees
    /// such a job), from several callers at once; a hang fails the test instead of stalling it.
    #[test]
    fn nested_joins_on_four_workers_never_hang() {
        fn tree(depth: u32, seed: u64) -> u64 {
            if depth == 0 {
                return seed % 7;
            }
            let (a, b) = rayon::join(
                || tree(depth - 1, seed * 3 + 1),
                || tree(depth - 1, seed * 5 + 2),
            );
            a.wrapping_add(b)
        }
        let pool = std::sync::Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(4)
                .build()
                .unwrap(),
        );
        let want = tree(10, 1);
        let (tx, rx) = std::sync::mpsc::channel();
        for caller in 0..3 {
            let (pool, tx) = (pool.clone(), tx.clone());
            std::thread::spawn(move || {
                for _ in 0..30 {
                    let got = hot_in(Some(&pool), || {
                        (0..8u64)
                            .into_par_iter()
                            .map(|_| tree(10, 1))
                            .collect::<Vec<_>>()
                    });
                    assert!(got.iter().all(|&g| g == want), "caller {caller}");
                }
                tx.send(()).unwrap();
            });
        }
        for _ in 0..3 {
            rx.recv_timeout(std::time::Duration::from_secs(120))
                .expect("a hot section hung");
        }
    }
}
