//! Micro-benchmark of the decode kernels: quantized matrix-vector products at SmolLM2-135M's
//! shapes, on one thread and on the whole pool. Prints JSON.
//!
//! `cargo run -p agentd-kernels --example kernel_bench`

use agentd_kernels::matvec::QMatrix;
use agentd_kernels::quant::{Q8Vector, QuantType};
use std::time::Instant;

fn bench(ty: QuantType, rows: usize, cols: usize, iters: usize) -> serde_like::Row {
    let bytes: Vec<u8> = (0..rows * ty.row_bytes(cols))
        .map(|i| (i * 7 % 251) as u8 & 0x3f)
        .collect();
    let m = QMatrix::new(ty, rows, cols, bytes).unwrap();
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.1).sin()).collect();
    let xq = Q8Vector::quantize(&x);
    let mut out = vec![0f32; rows];
    let mut time = |pool: &rayon::ThreadPool| {
        pool.install(|| {
            m.matvec(&xq, &mut out).unwrap();
            let start = Instant::now();
            for _ in 0..iters {
                m.matvec(&xq, &mut out).unwrap();
            }
            start.elapsed().as_secs_f64() / iters as f64
        })
    };
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let all = rayon::ThreadPoolBuilder::new().build().unwrap();
    let (t1, tn) = (time(&one), time(&all));
    let gb = m.size_bytes() as f64 / 1e9;
    serde_like::Row {
        ty: format!("{ty:?}"),
        rows,
        cols,
        us_1: t1 * 1e6,
        us_n: tn * 1e6,
        gbps_1: gb / t1,
        gbps_n: gb / tn,
    }
}

mod serde_like {
    pub struct Row {
        pub ty: String,
        pub rows: usize,
        pub cols: usize,
        pub us_1: f64,
        pub us_n: f64,
        pub gbps_1: f64,
        pub gbps_n: f64,
    }
    impl std::fmt::Display for Row {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "{{\"type\":\"{}\",\"rows\":{},\"cols\":{},\"us_1_thread\":{:.1},\"us_all_threads\":{:.1},\"gb_per_s_1_thread\":{:.2},\"gb_per_s_all_threads\":{:.2}}}",
                self.ty, self.rows, self.cols, self.us_1, self.us_n, self.gbps_1, self.gbps_n
            )
        }
    }
}

fn main() {
    let rows = [
        bench(QuantType::Q4_1, 576, 576, 2000),
        bench(QuantType::Q4_1, 1536, 576, 1000),
        bench(QuantType::Q4_1, 576, 1536, 1000),
        bench(QuantType::Q8_0, 49152, 576, 20),
        bench(QuantType::Q4_0, 1536, 576, 1000),
    ];
    let body: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    println!("[\n  {}\n]", body.join(",\n  "));
}
