//! Times the quantized product per format and kernel family on a SmolLM2-sized weight, one
//! activation row (decode) and 512 (prefill), and prints JSON lines.
//!
//! `cargo run --release -p agentd-kernels --example matmul_bench [ROWS COLS]`

use agentd_kernels::matmul::{act_kinds, matmul_many_with, Isa, QMatrix};
use agentd_kernels::quant::{QuantType, QuantizedRows};
use std::time::Instant;

/// CPU time this process has used (all threads).
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (rows, cols) = (
        *args.first().unwrap_or(&1536),
        *args.get(1).unwrap_or(&1536),
    );
    let mut seed = 1u64;
    let mut byte = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (seed >> 33) as u8
    };
    for ty in QuantType::ALL {
        if cols % ty.block_elems() != 0 {
            continue;
        }
        // Random bytes with small f16 scales (0x2000 ≈ 0.0078) in every half-word slot that a
        // format may read as a scale: good enough for timing.
        let mut gguf: Vec<u8> = (0..rows * ty.row_bytes(cols))
            .map(|_| byte() & 0x3f)
            .collect();
        if ty == QuantType::F16 {
            gguf.iter_mut().skip(1).step_by(2).for_each(|b| *b &= 0x3b);
        }
        let m = QMatrix::new(ty, rows, cols, &gguf).expect("matrix");
        for n in [1usize, 512] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut out = vec![0f32; n * rows];
            for isa in [Isa::detect()] {
                let acts = QuantizedRows::new(&x, n, cols, &act_kinds(&[&m]));
                matmul_many_with(isa, &[&m], &acts, &mut out).unwrap();
                let reps = if n == 1 { 200 } else { 5 };
                let (t, c) = (Instant::now(), cpu_seconds());
                for _ in 0..reps {
                    matmul_many_with(isa, &[&m], &acts, &mut out).unwrap();
                }
                let wall = t.elapsed().as_secs_f64() / reps as f64;
                // CPU seconds per call: the machine is shared, so wall time overstates it.
                let s = (cpu_seconds() - c) / reps as f64;
                let _ = wall;
                println!(
                    "{{\"format\":\"{ty}\",\"isa\":\"{isa:?}\",\"rows\":{rows},\"cols\":{cols},\"n\":{n},\"cpu_us\":{:.1},\"gmacs_per_cpu_s\":{:.1},\"gbytes_per_s\":{:.1}}}",
                    s * 1e6,
                    (rows * cols * n) as f64 / s / 1e9,
                    m.size_bytes() as f64 / s / 1e9
                );
            }
        }
    }
}
