//! Mixture-of-experts MLPs on tiny random Mixtral-style models written by the tests: against
//! candle-transformers' `quantized_llama` (which reads the per-expert layout), against a dense
//! twin, across the two tensor layouts, across batches, and the expert-load counters.
//!
//! Every file is a Llama with 3 layers, hidden 64, 4 query and 2 KV heads, SwiGLU width 128 and
//! `expert_count` experts of which 2 are used per token; the router (`ffn_gate_inp`) is F32, as
//! llama.cpp's quantizer leaves it, the other matrices are in the format under test.

use super::oracle_tests::argmax;
use super::{GgufFile, KvPages, LoadOptions, Model, RowKind, SeqStep};
use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use std::path::{Path, PathBuf};

const LAYERS: usize = 3;
const HIDDEN: usize = 64;
const FFN: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 128;
const USED: usize = 2;

/// How the file holds its MLPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// One tensor per expert, `blk.N.ffn_{gate,up,down}.E.weight` (older files; what candle's
    /// `quantized_llama` reads).
    PerExpert,
    /// llama.cpp's merged 3-D tensors, `blk.N.ffn_{gate,up,down}_exps.weight` of shape
    /// `[experts, rows, cols]` (ggml order `[cols, rows, experts]`).
    Merged,
    /// A dense MLP, `blk.N.ffn_{gate,up,down}.weight`, with the weights every expert has when
    /// [`Spec::identical`] is set (the dense twin of such a model); no `expert_count`.
    Dense,
}

/// What to write.
#[derive(Debug, Clone, Copy)]
struct Spec {
    /// Format of every matrix except the router and the norms.
    ty: GgmlDType,
    layout: Layout,
    experts: usize,
    /// Every expert of a layer has the same weights.
    identical: bool,
    /// The router is all zeros: every expert scores the same, so each token goes to experts 0
    /// and 1 with weights of exactly 1/2.
    uniform_router: bool,
}

impl Spec {
    fn new(ty: GgmlDType, layout: Layout) -> Self {
        Self {
            ty,
            layout,
            experts: 4,
            identical: false,
            uniform_router: false,
        }
    }
}

/// Values in ±0.2, a fixed function of `key` and the element index.
fn random(key: &str, shape: &[usize]) -> Tensor {
    // FNV-1a of the key seeds a multiplicative hash of the index.
    let seed = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let x = (i.wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .wrapping_mul(0x2545_f491_4f6c_dd1d);
            let x = x ^ (x >> 29);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Writes the tiny model `spec` describes to `dir/name`.
fn write(dir: &Path, name: &str, spec: Spec) -> PathBuf {
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(LAYERS as u32)),
        ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FFN as u32)),
        (
            "llama.attention.head_count".into(),
            Value::U32(HEADS as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(KV_HEADS as u32),
        ),
        ("llama.context_length".into(), Value::U32(1024)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(HEAD_DIM as u32),
        ),
    ];
    if spec.layout != Layout::Dense {
        meta.push(("llama.expert_count".into(), Value::U32(spec.experts as u32)));
        meta.push(("llama.expert_used_count".into(), Value::U32(USED as u32)));
    }
    let q = |t: &Tensor| QTensor::quantize(t, spec.ty).unwrap();
    let f32 = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
    let norm = |key: &str| (random(key, &[HIDDEN]) + 1.0).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q(&random("token_embd", &[VOCAB, HIDDEN])),
        ),
        ("output_norm.weight".into(), f32(&norm("output_norm"))),
        (
            "output.weight".into(),
            q(&random("output", &[VOCAB, HIDDEN])),
        ),
    ];
    let (q_dim, kv_dim) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for i in 0..LAYERS {
        let name = |t: &str| format!("blk.{i}.{t}.weight");
        for (t, rows, cols) in [
            ("attn_q", q_dim, HIDDEN),
            ("attn_k", kv_dim, HIDDEN),
            ("attn_v", kv_dim, HIDDEN),
            ("attn_output", HIDDEN, q_dim),
        ] {
            tensors.push((name(t), q(&random(&name(t), &[rows, cols]))));
        }
        for t in ["attn_norm", "ffn_norm"] {
            tensors.push((name(t), f32(&norm(&name(t)))));
        }
        // Expert `e`'s matrix `t` (the same for every expert when `identical`).
        let expert = |t: &str, e: usize, rows: usize, cols: usize| {
            let key = match spec.identical {
                true => format!("blk.{i}.{t}.x"),
                false => format!("blk.{i}.{t}.{e}"),
            };
            random(&key, &[rows, cols])
        };
        let mats = [
            ("ffn_gate", FFN, HIDDEN),
            ("ffn_up", FFN, HIDDEN),
            ("ffn_down", HIDDEN, FFN),
        ];
        match spec.layout {
            Layout::Dense => {
                for (t, rows, cols) in mats {
                    tensors.push((name(t), q(&expert(t, 0, rows, cols))));
                }
            }
            Layout::PerExpert | Layout::Merged => {
                let router = match spec.uniform_router {
                    true => Tensor::zeros(
                        (spec.experts, HIDDEN),
                        candle_core::DType::F32,
                        &Device::Cpu,
                    )
                    .unwrap(),
                    // Scaled up so that the experts' scores spread well apart.
                    false => {
                        (random(&name("ffn_gate_inp"), &[spec.experts, HIDDEN]) * 4.0).unwrap()
                    }
                };
                tensors.push((name("ffn_gate_inp"), f32(&router)));
                for (t, rows, cols) in mats {
                    let each: Vec<Tensor> = (0..spec.experts)
                        .map(|e| expert(t, e, rows, cols))
                        .collect();
                    if spec.layout == Layout::Merged {
                        let all = Tensor::stack(&each, 0).unwrap();
                        tensors.push((name(&format!("{t}_exps")), q(&all)));
                    } else {
                        for (e, w) in each.iter().enumerate() {
                            tensors.push((format!("blk.{i}.{t}.{e}.weight"), q(w)));
                        }
                    }
                }
            }
        }
    }
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    path
}

fn load(path: &Path, exact: bool) -> Model {
    let mut file = GgufFile::open(path).unwrap();
    Model::load(
        &mut file,
        LoadOptions {
            exact,
            context: None,
            kv_dtype: crate::executor::KvDtype::F16,
        },
    )
    .unwrap()
}

/// candle-transformers' `quantized_llama` on the same file.
fn candle_model(path: &Path) -> quantized_llama::ModelWeights {
    let mut f = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut f).unwrap();
    quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap()
}

fn candle_logits(m: &mut quantized_llama::ModelWeights, tokens: &[u32], pos: usize) -> Vec<f32> {
    let x = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&x, pos)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!(
            "{what}: logit {i} differs ({} vs {}; max |Δ| {})",
            a[i],
            b[i],
            max_diff(a, b)
        );
    }
}

const PROMPT: &[u32] = &[5, 17, 99, 3, 64, 120, 7, 42, 42, 1, 88];

/// Our logits after `PROMPT` and after each of `steps`, fed one decode step at a time.
fn run(model: &Model, steps: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut out = vec![model.forward(PROMPT, &mut cache).unwrap()];
    for &t in steps {
        out.push(model.forward(&[t], &mut cache).unwrap());
    }
    out
}

/// Prompt and 6 decode steps (candle's greedy tokens) against candle's `quantized_llama`:
/// checks the top tokens agree and returns the largest |Δlogit| as a fraction of the logit range.
fn against_candle(spec: Spec) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "moe.gguf", spec);
    let ours = load(&path, false);
    assert_eq!(ours.config().experts, spec.experts);
    let mut theirs = candle_model(&path);
    let mut cache = ours.new_cache();
    let mut a = ours.forward(PROMPT, &mut cache).unwrap();
    let mut b = candle_logits(&mut theirs, PROMPT, 0);
    let mut worst = 0f32;
    for step in 0..=6 {
        let d = max_diff(&a, &b);
        let range =
            b.iter().cloned().fold(f32::MIN, f32::max) - b.iter().cloned().fold(f32::MAX, f32::min);
        eprintln!(
            "{:?} step {step}: max |Δlogit| {d:.2e} over a range of {range:.2}",
            spec.ty
        );
        worst = worst.max(d / range);
        assert_eq!(
            argmax(&a),
            argmax(&b),
            "{:?} step {step}: top token",
            spec.ty
        );
        let t = argmax(&b);
        a = ours.forward(&[t], &mut cache).unwrap();
        b = candle_logits(&mut theirs, &[t], PROMPT.len() + step);
    }
    worst
}

/// F32 weights: both sides run f32 products (candle dequantises F32 to a dense matmul, we
/// multiply dense f32 too), so they differ only in summation order, in our f16 KV pages and in
/// how the router's softmax is rounded. Measured: 1.2e-4 of the logit range (4e-4 of ≈ 4).
#[test]
fn f32_experts_match_candle_quantized_llama() {
    let d = against_candle(Spec::new(GgmlDType::F32, Layout::PerExpert));
    assert!(d < 1e-3, "max |Δlogit| / range {d}");
}

/// Q8_0 weights: both sides round each product's input to Q8_0 blocks the same way (amax/127,
/// round half away from zero, f16 scale), but the f16 KV pages move inputs by ~5e-4 relative
/// and a few percent of the elements then round to the neighbouring step; that adds up to about
/// as much as the 8-bit rounding itself (our own default-vs-`exact` gap on this file is
/// ≈ 1.3e-2, ours-vs-candle ≤ 1.7e-2 = 0.4% of the range).
#[test]
fn q8_0_experts_match_candle_quantized_llama() {
    let d = against_candle(Spec::new(GgmlDType::Q8_0, Layout::PerExpert));
    assert!(d < 1e-2, "max |Δlogit| / range {d}");
}

/// A model whose experts are all equal computes its dense twin's MLP.
///
/// With a uniform router every token goes to experts 0 and 1 with weights of exactly 1/2
/// (`exp(0) / (exp(0) + exp(0))`), and both experts' outputs equal the dense MLP's output `y`
/// bit for bit (the same products on the same rows; a row's product never depends on the other
/// rows). The mixture adds `0 + y/2 + y/2`, and halving and adding two halves are exact in
/// binary floating point, so the logits are bit-identical, in every format.
///
/// With a random router the two weights only sum to 1 within rounding (one ulp or so), so
/// `w₁y + w₂y` differs from `y` by about 1e-7 relative; with F32 weights (no 8-bit rounding of
/// activations downstream that could amplify a last-bit change to a whole quantization step)
/// that stays below 1e-5 in the logits.
#[test]
fn identical_experts_equal_the_dense_twin() {
    let dir = tempfile::tempdir().unwrap();
    let steps = [3, 77, 120];
    for ty in [GgmlDType::Q8_0, GgmlDType::F32] {
        let dense = run(
            &load(
                &write(
                    dir.path(),
                    "dense.gguf",
                    Spec {
                        identical: true,
                        ..Spec::new(ty, Layout::Dense)
                    },
                ),
                false,
            ),
            &steps,
        );
        let uniform = Spec {
            identical: true,
            uniform_router: true,
            ..Spec::new(ty, Layout::PerExpert)
        };
        let moe = run(
            &load(&write(dir.path(), "uniform.gguf", uniform), false),
            &steps,
        );
        for (i, (a, b)) in moe.iter().zip(&dense).enumerate() {
            assert_bits_eq(a, b, &format!("{ty:?}, uniform router, step {i}"));
        }
    }
    let random_router = Spec {
        identical: true,
        ..Spec::new(GgmlDType::F32, Layout::PerExpert)
    };
    let moe = run(
        &load(&write(dir.path(), "random.gguf", random_router), false),
        &steps,
    );
    let dense = run(
        &load(
            &write(
                dir.path(),
                "dense.gguf",
                Spec {
                    identical: true,
                    ..Spec::new(GgmlDType::F32, Layout::Dense)
                },
            ),
            false,
        ),
        &steps,
    );
    for (i, (a, b)) in moe.iter().zip(&dense).enumerate() {
        let d = max_diff(a, b);
        eprintln!("F32, random router, step {i}: max |Δlogit| {d:.2e}");
        assert!(d <= 1e-5, "step {i}: {d}");
    }
}

/// llama.cpp's merged `ffn_*_exps` tensors hold the same bytes as the per-expert tensors, expert
/// after expert, so the two files give the same logits bit for bit (quantized, dense f32, and
/// `exact`).
#[test]
fn merged_expert_tensors_equal_per_expert_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let steps = [9, 100, 2, 2];
    for ty in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::F32] {
        let per = write(dir.path(), "per.gguf", Spec::new(ty, Layout::PerExpert));
        let merged = write(dir.path(), "merged.gguf", Spec::new(ty, Layout::Merged));
        for exact in [false, true] {
            let a = run(&load(&per, exact), &steps);
            let b = run(&load(&merged, exact), &steps);
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                assert_bits_eq(a, b, &format!("{ty:?}, exact {exact}, step {i}"));
            }
        }
    }
}

/// One sequence's step: tokens already cached, then the new ones.
struct Seq {
    history: Vec<u32>,
    new: Vec<u32>,
}

fn kind(tokens: &[u32]) -> RowKind {
    if tokens.len() == 1 {
        RowKind::Decode
    } else {
        RowKind::Prompt
    }
}

/// Each sequence's logits for its new tokens, run alone in its own cache.
fn alone(model: &Model, seqs: &[Seq]) -> Vec<Vec<f32>> {
    seqs.iter()
        .map(|s| {
            let mut cache = model.new_cache();
            if !s.history.is_empty() {
                model.forward(&s.history, &mut cache).unwrap();
            }
            model.forward(&s.new, &mut cache).unwrap()
        })
        .collect()
}

/// The sequences' histories run one by one into one shared pool (pages interleaved across
/// sequences), then all their new tokens in one [`Model::forward_batch`] step.
fn together(model: &Model, seqs: &[Seq]) -> Vec<Vec<f32>> {
    let ps = 16;
    let per_seq = 4;
    let n = seqs.len();
    let mut kv = KvPages::new(model.config(), n * per_seq, ps);
    // Sequence i owns pages i, i + n, i + 2n, ... (in reverse, to mix things up).
    let tables: Vec<Vec<u32>> = (0..n)
        .map(|i| (0..per_seq).rev().map(|j| (i + j * n) as u32).collect())
        .collect();
    for (s, table) in seqs.iter().zip(&tables) {
        assert!(s.history.len() + s.new.len() <= per_seq * ps);
        if !s.history.is_empty() {
            let step = SeqStep {
                tokens: &s.history,
                pos0: 0,
                page_table: table,
                kind: kind(&s.history),
                logits: 0,
            };
            model.forward_batch(&[step], &mut kv).unwrap();
        }
    }
    let steps: Vec<SeqStep<'_>> = seqs
        .iter()
        .zip(&tables)
        .map(|(s, table)| SeqStep {
            tokens: &s.new,
            pos0: s.history.len(),
            page_table: table,
            kind: kind(&s.new),
            logits: 1,
        })
        .collect();
    model
        .forward_batch(&steps, &mut kv)
        .unwrap()
        .into_iter()
        .map(|l| l.expect("asked for logits"))
        .collect()
}

/// A row's logits never depend on the rows it shares a step with: decode and prompt rows of
/// several sequences, routed together to each expert, give the same bits as each sequence run
/// alone.
#[test]
fn rows_give_the_same_bits_alone_and_in_a_multi_sequence_batch() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = [
        Seq {
            history: (0..19).map(|i| (i * 7 % VOCAB) as u32).collect(),
            new: vec![40],
        },
        Seq {
            history: vec![],
            new: vec![9, 8, 7, 6, 5, 4, 3, 2, 1, 77, 66, 120, 121, 122, 1, 1, 2],
        },
        Seq {
            history: vec![100, 101, 102],
            new: vec![33],
        },
        Seq {
            history: vec![60; 30],
            new: (0..9).map(|i| (i * 13 % VOCAB) as u32).collect(),
        },
    ];
    for ty in [GgmlDType::Q8_0, GgmlDType::F32] {
        let model = load(
            &write(dir.path(), "moe.gguf", Spec::new(ty, Layout::Merged)),
            false,
        );
        let a = alone(&model, &seqs);
        let b = together(&model, &seqs);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert_bits_eq(a, b, &format!("{ty:?}, sequence {i}"));
        }
        // The batch's rows really went to different experts.
        let load = model.expert_load().last_step;
        assert!(load.iter().filter(|&&n| n > 0).count() >= 3, "{load:?}");
    }
}

/// `expert_load()`: the last step's counts add up to rows × experts used × layers, and the
/// totals to the sum over all steps.
#[test]
fn expert_load_counts_every_routed_row() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        experts: 8,
        ..Spec::new(GgmlDType::Q8_0, Layout::Merged)
    };
    let model = load(&write(dir.path(), "moe.gguf", spec), false);
    let fresh = model.expert_load();
    assert_eq!(fresh.last_step, vec![0; 8]);
    assert_eq!(fresh.total, vec![0; 8]);
    let per_row = (USED * LAYERS) as u64;
    let mut cache = model.new_cache();
    model.forward(PROMPT, &mut cache).unwrap();
    let after_prompt = model.expert_load();
    assert_eq!(after_prompt.last_step.len(), 8);
    assert_eq!(
        after_prompt.last_step.iter().sum::<u64>(),
        PROMPT.len() as u64 * per_row
    );
    assert_eq!(after_prompt.total, after_prompt.last_step);
    model.forward(&[4], &mut cache).unwrap();
    let after_decode = model.expert_load();
    assert_eq!(after_decode.last_step.iter().sum::<u64>(), per_row);
    // Each layer sends the row to 2 distinct experts, so no expert gets it more than 3 times.
    assert!(after_decode.last_step.iter().all(|&n| n <= LAYERS as u64));
    let sum: Vec<u64> = after_prompt
        .last_step
        .iter()
        .zip(&after_decode.last_step)
        .map(|(a, b)| a + b)
        .collect();
    assert_eq!(after_decode.total, sum);
    // A dense model has no experts to count.
    let dense = load(
        &write(
            dir.path(),
            "dense.gguf",
            Spec::new(GgmlDType::Q8_0, Layout::Dense),
        ),
        false,
    );
    dense.forward(PROMPT, &mut dense.new_cache()).unwrap();
    let none = dense.expert_load();
    assert!(none.last_step.is_empty() && none.total.is_empty());
}
