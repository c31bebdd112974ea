//! Micro-benchmark of decode attention over the paged f16 KV pool: one query row at contexts of
//! 512, 2,048 and 8,192 tokens for SmolLM2-135M's heads (9 query / 3 K/V, 64 wide),
//! Gemma-3-270M's (4 / 1, 256 wide) and Qwen2.5-0.5B's (14 / 2, 64 wide), on a one-thread pool
//! and on a pool of every core (`RAYON_NUM_THREADS` sets its size). Prints JSON, one object per
//! (shape, context), with microseconds per decoded token for one layer: wall time on one thread
//! and its CPU time (robust to other load on the machine), and wall time on every thread.
//!
//! `cargo run --release -p agentd-kernels --example attn_bench [CONTEXT…] [HxKVxD…]` (contexts
//! and head shapes to measure instead of the defaults, e.g. `8192 4x1x256`)
//!
//! After the decode rows, one row per head shape times prefill attention for a 2,048-token
//! prompt (all 2,048 query rows in one call, on the pool of every core): wall time, the
//! process's CPU time (all threads) and tokens per second, best of several rounds.

use agentd_kernels::attention::AttentionShape;
use agentd_kernels::paged_attention::{paged_causal_attention, write_kv, PagedKv, PagedKvMut};
use half::f16;
use std::time::Instant;

const PAGE_SIZE: usize = 16;

/// Prompt length for the prefill measurement.
const PREFILL_TOKENS: usize = 2048;

/// Paged K/V for positions `0..ctx` (pages in reverse order, so the walk is not one contiguous
/// stream), and `n_q` query rows.
fn setup(
    shape: AttentionShape,
    ctx: usize,
    n_q: usize,
) -> (Vec<f16>, Vec<f16>, Vec<u32>, Vec<f32>) {
    let kv_row = shape.kv_heads * shape.head_dim;
    let pages = ctx.div_ceil(PAGE_SIZE);
    let table: Vec<u32> = (0..pages as u32).rev().collect();
    let mut k_pool = vec![f16::ZERO; pages * PAGE_SIZE * kv_row];
    let mut v_pool = k_pool.clone();
    let k: Vec<f32> = (0..ctx * kv_row)
        .map(|i| ((i * 37 % 1009) as f32 / 504.5 - 1.0) * 0.5)
        .collect();
    let v: Vec<f32> = (0..ctx * kv_row)
        .map(|i| (i * 53 % 997) as f32 / 498.5 - 1.0)
        .collect();
    let kv = PagedKvMut {
        k_pool: &mut k_pool,
        v_pool: &mut v_pool,
        page_size: PAGE_SIZE,
        page_table: &table,
    };
    write_kv(shape, kv, 0, &k, &v).unwrap();
    let q: Vec<f32> = (0..n_q * shape.heads * shape.head_dim)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    (k_pool, v_pool, table, q)
}

/// Prefill attention for a [`PREFILL_TOKENS`]-token prompt in `pool`: the best round's wall
/// seconds and the process CPU seconds in that round.
fn time_prefill(shape: AttentionShape, pool: &rayon::ThreadPool) -> (f64, f64) {
    let (k_pool, v_pool, table, q) = setup(shape, PREFILL_TOKENS, PREFILL_TOKENS);
    let mut out = vec![0f32; q.len()];
    let kv = PagedKv {
        k_pool: &k_pool,
        v_pool: &v_pool,
        page_size: PAGE_SIZE,
        page_table: &table,
    };
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let mut run = || paged_causal_attention(shape, &q, kv, 0, scale, &mut out).unwrap();
    pool.install(|| {
        run();
        (0..8)
            .map(|_| {
                let (start, cpu0) = (Instant::now(), process_cpu_s());
                run();
                (start.elapsed().as_secs_f64(), process_cpu_s() - cpu0)
            })
            .fold((f64::INFINITY, f64::INFINITY), |a, b| {
                if b.0 < a.0 {
                    b
                } else {
                    a
                }
            })
    })
}

/// The CPU time of the whole process (every thread), in seconds.
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Microseconds per call of decode attention at context `ctx`, in `pool`: wall time, and the
/// CPU time of the thread that made the call.
fn time_decode(shape: AttentionShape, ctx: usize, pool: &rayon::ThreadPool) -> (f64, f64) {
    let (k_pool, v_pool, table, q) = setup(shape, ctx, 1);
    let mut out = vec![0f32; q.len()];
    let kv = PagedKv {
        k_pool: &k_pool,
        v_pool: &v_pool,
        page_size: PAGE_SIZE,
        page_table: &table,
    };
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let mut run = || paged_causal_attention(shape, &q, kv, ctx - 1, scale, &mut out).unwrap();
    pool.install(|| {
        // About 15 ms of work per round at ~10 GFLOP/s, at least 3 calls.
        let flops = 4 * ctx * shape.heads * shape.head_dim;
        let iters = (150_000_000 / flops).max(3);
        for _ in 0..iters {
            run();
        }
        // The best of many short rounds, to shed noise from other processes on a shared
        // machine; with it, the calling thread's CPU time per call in that round.
        (0..40)
            .map(|_| {
                let (start, cpu0) = (Instant::now(), thread_cpu_s());
                for _ in 0..iters {
                    run();
                }
                let per_call = |s: f64| s / iters as f64 * 1e6;
                (
                    per_call(start.elapsed().as_secs_f64()),
                    per_call(thread_cpu_s() - cpu0),
                )
            })
            .fold((f64::INFINITY, f64::INFINITY), |a, b| {
                if b.0 < a.0 {
                    b
                } else {
                    a
                }
            })
    })
}

/// The CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let all = rayon::ThreadPoolBuilder::new().build().unwrap();
    let mut shapes = Vec::new();
    let mut contexts = Vec::new();
    for arg in std::env::args().skip(1) {
        let nums: Vec<usize> = arg
            .split('x')
            .map(|a| {
                a.parse()
                    .expect("arguments are CONTEXT or HEADSxKV_HEADSxHEAD_DIM")
            })
            .collect();
        match nums[..] {
            [ctx] if ctx > 0 => contexts.push(ctx),
            [h, kv, d] if kv > 0 && h % kv == 0 && d > 0 => shapes.push((h, kv, d)),
            _ => panic!("bad argument {arg}"),
        }
    }
    if shapes.is_empty() {
        shapes = vec![(9, 3, 64), (4, 1, 256), (14, 2, 64)];
    }
    if contexts.is_empty() {
        contexts = vec![512, 2048, 8192];
    }
    let mut rows = Vec::new();
    for &(heads, kv_heads, head_dim) in &shapes {
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim,
        };
        for &ctx in &contexts {
            let ((t1, c1), (tn, _)) =
                (time_decode(shape, ctx, &one), time_decode(shape, ctx, &all));
            rows.push(format!(
                "{{\"heads\":{heads},\"kv_heads\":{kv_heads},\"head_dim\":{head_dim},\"context\":{ctx},\"us_1_thread\":{t1:.1},\"cpu_us_1_thread\":{c1:.1},\"us_{}_threads\":{tn:.1},\"speedup\":{:.2}}}",
                all.current_num_threads(),
                t1 / tn
            ));
        }
    }
    for &(heads, kv_heads, head_dim) in &shapes {
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim,
        };
        let (wall, cpu) = time_prefill(shape, &all);
        rows.push(format!(
            "{{\"heads\":{heads},\"kv_heads\":{kv_heads},\"head_dim\":{head_dim},\"prefill_tokens\":{PREFILL_TOKENS},\"prefill_ms_{}_threads\":{:.2},\"prefill_cpu_ms\":{:.2},\"prefill_tokens_per_s\":{:.0}}}",
            all.current_num_threads(),
            wall * 1e3,
            cpu * 1e3,
            PREFILL_TOKENS as f64 / wall
        ));
    }
    println!("[\n  {}\n]", rows.join(",\n  "));
}
