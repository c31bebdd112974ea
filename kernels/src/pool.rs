//! Keeping the rayon workers awake through a burst of small parallel products.
//!
//! A decode step runs about five parallel regions per layer (the fused Q/K/V product, attention,
//! the output product, gate and up, down), each tens of microseconds long, with a little serial
//! work between them. Called from outside the pool, each region injects a job, wakes a sleeping
//! worker and puts the caller to sleep until the job is done: two wake-ups per region, which on
//! a virtual machine cost as much as the region itself. [`hot`] instead runs the whole step on a
//! worker and keeps every other worker spinning for its duration, running whatever work
//! appears (`rayon::yield_now`), so a region starts on every core at once and the caller never
//! sleeps. The workers go back to sleep when the step ends.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    /// Whether this thread is running a spinner (a nested one returns at once).
    static SPINNING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `body` on a worker of the current rayon pool, with the pool's other workers spinning
/// (and taking any job they find) until it returns. From inside the pool, or on a pool of one
/// thread, it just runs `body`.
pub fn hot<R: Send>(body: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 || rayon::current_thread_index().is_some() {
        return body();
    }
    let active = AtomicBool::new(true);
    rayon::scope(|s| {
        let home = rayon::current_thread_index();
        for _ in 1..threads {
            let active = &active;
            s.spawn(move |_| spin(active, home));
        }
        let result = body();
        active.store(false, Ordering::Release);
        result
    })
}

/// Takes pending jobs, or spins, until `active` is cleared. A spinner picked up by the thread
/// running the body (`home`, while it waits for a job of its own), or by a thread already
/// spinning, returns at once: spinning there would block the work the body waits for.
fn spin(active: &AtomicBool, home: Option<usize>) {
    if rayon::current_thread_index() == home || SPINNING.get() {
        return;
    }
    SPINNING.set(true);
    while active.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => {}
            _ => {
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
}
