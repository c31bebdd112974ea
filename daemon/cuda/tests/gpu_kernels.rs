//! Every CUDA kernel against its CPU twin on random inputs, on the GPU. Without a driver and a
//! device (this includes CI and any machine without an NVIDIA GPU) each test says it was
//! skipped and why; `bench/gpu_check.sh` runs them on a GPU machine.

use agentd_cuda::device::{driver_present, nvrtc_present, preload_nvrtc};
use agentd_cuda::sources::SOURCES;
use agentd_cuda::{compile_ptx, probe};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// The GPU's stream and a kernel loader, or why there is none.
fn gpu() -> Option<(Arc<CudaStream>, impl Fn(&str) -> CudaFunction)> {
    if !nvrtc_present() {
        if let Ok(dir) = std::env::var("AGENTD_NVRTC_DIR") {
            preload_nvrtc(std::path::Path::new(&dir));
        }
    }
    if !driver_present() || !nvrtc_present() {
        eprintln!("SKIPPED: no NVIDIA driver or no NVRTC on this machine");
        return None;
    }
    let p = probe();
    let Some(dev) = p.devices.first().cloned() else {
        eprintln!("SKIPPED: the driver sees no CUDA device ({:?})", p.error);
        return None;
    };
    let ctx = CudaContext::new(dev.ordinal).expect("a context on device 0");
    let stream = ctx.default_stream();
    let arch = dev.arch();
    let load = move |name: &str| {
        let src = SOURCES
            .iter()
            .find(|s| s.kernels.contains(&name))
            .expect("a known kernel");
        let ptx = compile_ptx(src, &arch).expect("the source compiles");
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .expect("the module loads");
        module.load_function(name).expect("the kernel exists")
    };
    Some((stream, load))
}

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let range = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * range,
            "{what}[{i}]: {g} vs {w} (range {range})"
        );
    }
}

#[test]
fn rms_norm_matches_the_cpu_kernel() {
    let Some((stream, load)) = gpu() else { return };
    let f = load("rms_norm_f32");
    let (rows, cols) = (5usize, 576usize);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = random(&mut rng, rows * cols, 3.0);
    let w = random(&mut rng, cols, 1.0);
    let mut want = vec![0f32; rows * cols];
    for r in 0..rows {
        agentd_kernels::norm::rms_norm(
            &x[r * cols..][..cols],
            &w,
            1e-5,
            &mut want[r * cols..][..cols],
        );
    }
    let (xd, wd) = (
        stream.clone_htod(&x).unwrap(),
        stream.clone_htod(&w).unwrap(),
    );
    let mut out = stream.alloc_zeros::<f32>(rows * cols).unwrap();
    let (c, eps) = (cols as i32, 1e-5f32);
    let mut b = stream.launch_builder(&f);
    b.arg(&xd).arg(&wd).arg(&mut out).arg(&c).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 256 * 4,
    };
    // SAFETY: the arguments match the kernel's signature; the buffers hold rows * cols.
    unsafe { b.launch(cfg) }.unwrap();
    assert_close(&stream.clone_dtoh(&out).unwrap(), &want, 1e-5, "rms_norm");
}

#[test]
fn swiglu_and_geglu_match_their_definitions() {
    let Some((stream, load)) = gpu() else { return };
    let n = 1000usize;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (g, u) = (random(&mut rng, n, 6.0), random(&mut rng, n, 2.0));
    for (name, act) in [
        (
            "swiglu_f32",
            (|x: f32| x / (1.0 + (-x).exp())) as fn(f32) -> f32,
        ),
        (
            "geglu_tanh_f32",
            agentd_kernels::vecops::gelu_tanh as fn(f32) -> f32,
        ),
    ] {
        let f = load(name);
        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| act(*g) * u).collect();
        let (gd, ud) = (
            stream.clone_htod(&g).unwrap(),
            stream.clone_htod(&u).unwrap(),
        );
        let mut out = stream.alloc_zeros::<f32>(n).unwrap();
        let nn = n as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&gd).arg(&ud).arg(&mut out).arg(&nn);
        // SAFETY: as above.
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.unwrap();
        assert_close(&stream.clone_dtoh(&out).unwrap(), &want, 1e-5, name);
    }
}

#[test]
fn rope_matches_the_reference_in_both_pairings() {
    let Some((stream, load)) = gpu() else { return };
    let f = load("rope_f32");
    let (rows, heads, hd) = (3usize, 4usize, 64usize);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = random(&mut rng, rows * heads * hd, 2.0);
    let pos: Vec<i32> = vec![0, 7, 1500];
    for neox in [0i32, 1] {
        let mut want = x.clone();
        for r in 0..rows {
            for h in 0..heads {
                let v = &mut want[(r * heads + h) * hd..][..hd];
                for i in 0..hd / 2 {
                    let theta = pos[r] as f64 * 10000f64.powf(-2.0 * i as f64 / hd as f64);
                    let (s, c) = (theta.sin() as f32, theta.cos() as f32);
                    let (a, b) = if neox == 1 {
                        (i, i + hd / 2)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let (x0, x1) = (v[a], v[b]);
                    v[a] = x0 * c - x1 * s;
                    v[b] = x0 * s + x1 * c;
                }
            }
        }
        let mut xd = stream.clone_htod(&x).unwrap();
        let pd = stream.clone_htod(&pos).unwrap();
        let (h, d, base) = (heads as i32, hd as i32, 10000f32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut xd)
            .arg(&pd)
            .arg(&h)
            .arg(&d)
            .arg(&d)
            .arg(&base)
            .arg(&neox);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, heads as u32, 1),
            block_dim: (hd as u32 / 2, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        unsafe { b.launch(cfg) }.unwrap();
        assert_close(&stream.clone_dtoh(&xd).unwrap(), &want, 2e-3, "rope");
    }
}

/// GGUF blocks of `w` (rows x cols) in `format`, and the values they decode to.
fn quantize(w: &[f32], format: &str) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut decoded = Vec::with_capacity(w.len());
    for block in w.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        match format {
            "q8_0" => {
                let d = f16::from_f32(amax / 127.0);
                bytes.extend(d.to_bits().to_le_bytes());
                for v in block {
                    let q = if d.to_f32() == 0.0 {
                        0
                    } else {
                        (v / d.to_f32()).round() as i8
                    };
                    bytes.push(q as u8);
                    decoded.push(q as f32 * d.to_f32());
                }
            }
            "q4_0" | "q4_1" => {
                let (min, max) = block
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
                let (d, m) = if format == "q4_0" {
                    (f16::from_f32(amax / 8.0), 0.0)
                } else {
                    (f16::from_f32((max - min) / 15.0), min)
                };
                let m16 = f16::from_f32(m);
                bytes.extend(d.to_bits().to_le_bytes());
                if format == "q4_1" {
                    bytes.extend(m16.to_bits().to_le_bytes());
                }
                let q: Vec<u8> = block
                    .iter()
                    .map(|v| {
                        let df = d.to_f32();
                        let raw = if df == 0.0 {
                            0.0
                        } else if format == "q4_0" {
                            (v / df).round() + 8.0
                        } else {
                            ((v - m16.to_f32()) / df).round()
                        };
                        raw.clamp(0.0, 15.0) as u8
                    })
                    .collect();
                for j in 0..16 {
                    bytes.push(q[j] | (q[j + 16] << 4));
                }
                let off = if format == "q4_0" { -8.0 } else { 0.0 };
                let add = if format == "q4_0" { 0.0 } else { m16.to_f32() };
                decoded.extend(q.iter().map(|&q| (q as f32 + off) * d.to_f32() + add));
            }
            _ => unreachable!(),
        }
    }
    (bytes, decoded)
}

#[test]
fn quantized_matrix_vector_products_match_f32_on_the_decoded_weights() {
    let Some((stream, load)) = gpu() else { return };
    let (rows, cols, tokens) = (96usize, 576usize, 3usize);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let w = random(&mut rng, rows * cols, 1.0);
    let x = random(&mut rng, tokens * cols, 2.0);
    let quant = load("quantize_q8_1");
    let xd = stream.clone_htod(&x).unwrap();
    let mut xq = stream.alloc_zeros::<u8>(tokens * cols / 32 * 40).unwrap();
    let c = cols as i32;
    let mut b = stream.launch_builder(&quant);
    b.arg(&xd).arg(&mut xq).arg(&c);
    let cfg = LaunchConfig {
        grid_dim: ((cols / 32).div_ceil(8) as u32, tokens as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: xq holds tokens * cols / 32 blocks of 40 bytes.
    unsafe { b.launch(cfg) }.unwrap();
    for format in ["q8_0", "q4_0", "q4_1"] {
        let (bytes, decoded) = quantize(&w, format);
        let want: Vec<f32> = (0..tokens)
            .flat_map(|t| {
                let (x, decoded) = (&x, &decoded);
                (0..rows).map(move |r| {
                    (0..cols)
                        .map(|i| decoded[r * cols + i] * x[t * cols + i])
                        .sum::<f32>()
                })
            })
            .collect();
        let f = load(&format!("mmvq_{format}"));
        let wd = stream.clone_htod(&bytes).unwrap();
        let mut y = stream.alloc_zeros::<f32>(tokens * rows).unwrap();
        let r = rows as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&wd).arg(&xq).arg(&mut y).arg(&r).arg(&c);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, tokens as u32, 1),
            block_dim: (32, 4, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the buffers match the shapes given.
        unsafe { b.launch(cfg) }.unwrap();
        // The activations' 8-bit quantization allows about 1% of the output range.
        assert_close(&stream.clone_dtoh(&y).unwrap(), &want, 1e-2, format);
    }
}

#[test]
fn paged_decode_attention_matches_softmax_attention_with_gqa_and_a_window() {
    let Some((stream, load)) = gpu() else { return };
    let f = load("paged_attention_decode_f16");
    let (heads, kv_heads, hd, ps, max_pages) = (4usize, 2usize, 64usize, 16usize, 8usize);
    let lens = [1usize, 37, 128];
    let pages_total = lens.len() * max_pages;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let pool_len = pages_total * ps * kv_heads * hd;
    let k: Vec<f16> = random(&mut rng, pool_len, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let v: Vec<f16> = random(&mut rng, pool_len, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let q = random(&mut rng, lens.len() * heads * hd, 1.0);
    // Sequence s uses pages in a scrambled order.
    let table: Vec<i32> = (0..lens.len() * max_pages)
        .map(|i| ((i * 7 + 3) % pages_total) as i32)
        .collect();
    let scale = 1.0 / (hd as f32).sqrt();
    for window in [0i32, 20] {
        let mut want = vec![0f32; q.len()];
        for (s, &len) in lens.iter().enumerate() {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let first = if window > 0 {
                    len.saturating_sub(window as usize)
                } else {
                    0
                };
                let at = |key: usize, d: usize| {
                    let page = table[s * max_pages + key / ps] as usize;
                    ((page * ps + key % ps) * kv_heads + kvh) * hd + d
                };
                let qh = &q[(s * heads + h) * hd..][..hd];
                let scores: Vec<f32> = (first..len)
                    .map(|key| {
                        (0..hd)
                            .map(|d| qh[d] * scale * k[at(key, d)].to_f32())
                            .sum()
                    })
                    .collect();
                let m = scores.iter().fold(f32::MIN, |a, b| a.max(*b));
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..hd {
                    want[(s * heads + h) * hd + d] = (first..len)
                        .zip(&e)
                        .map(|(key, p)| p * v[at(key, d)].to_f32())
                        .sum::<f32>()
                        / z;
                }
            }
        }
        let kb: Vec<u16> = k.iter().map(|x| x.to_bits()).collect();
        let vb: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
        let (kd, vd) = (
            stream.clone_htod(&kb).unwrap(),
            stream.clone_htod(&vb).unwrap(),
        );
        let (qd, td) = (
            stream.clone_htod(&q).unwrap(),
            stream.clone_htod(&table).unwrap(),
        );
        let lens32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let ld = stream.clone_htod(&lens32).unwrap();
        let mut out = stream.alloc_zeros::<f32>(q.len()).unwrap();
        let ints = [heads, kv_heads, hd, ps, max_pages].map(|v| v as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(&qd).arg(&kd).arg(&vd).arg(&td).arg(&ld).arg(&mut out);
        for i in &ints {
            b.arg(i);
        }
        b.arg(&window).arg(&scale);
        let warps = 4u32;
        let cfg = LaunchConfig {
            grid_dim: (lens.len() as u32, heads as u32, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: warps * (2 + hd as u32) * 4,
        };
        // SAFETY: the buffers match the shapes given; the table points inside the pool.
        unsafe { b.launch(cfg) }.unwrap();
        assert_close(&stream.clone_dtoh(&out).unwrap(), &want, 1e-4, "attention");
    }
}
