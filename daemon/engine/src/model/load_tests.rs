//! Loading tiny GGUF files written by the tests themselves: every hyperparameter comes from the
//! metadata, and malformed files give errors that name the key or tensor — never a panic.

use super::{GgufFile, LoadOptions, Model, ModelError};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

/// The shape of a tiny Llama: 2 layers, 4 query heads, 2 KV heads, head size 16.
struct Tiny {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    context: usize,
}

const TINY: Tiny = Tiny {
    layers: 2,
    hidden: 64,
    ffn: 128,
    heads: 4,
    kv_heads: 2,
    vocab: 96,
    context: 6000,
};

/// What to change when writing the file.
#[derive(Default)]
struct Edit {
    drop_key: Option<&'static str>,
    drop_tensor: Option<&'static str>,
    set_key: Option<(&'static str, Value)>,
    wrong_shape: Option<&'static str>,
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let x = (i.wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .wrapping_mul(0x2545_f491_4f6c_dd1d);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn write_tiny(dir: &Path, name: &str, edit: Edit) -> PathBuf {
    let t = TINY;
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(t.layers as u32)),
        ("llama.embedding_length".into(), Value::U32(t.hidden as u32)),
        ("llama.feed_forward_length".into(), Value::U32(t.ffn as u32)),
        (
            "llama.attention.head_count".into(),
            Value::U32(t.heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(t.kv_heads as u32),
        ),
        ("llama.context_length".into(), Value::U32(t.context as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
    ];
    meta.retain(|(k, _)| Some(k.as_str()) != edit.drop_key);
    if let Some((k, v)) = edit.set_key {
        meta.retain(|(key, _)| key != k);
        meta.push((k.into(), v));
    }
    let (q, kv) = (
        t.heads * t.hidden / t.heads,
        t.kv_heads * t.hidden / t.heads,
    );
    let mut tensors: Vec<(String, Vec<usize>, GgmlDType)> = vec![
        (
            "token_embd.weight".into(),
            vec![t.vocab, t.hidden],
            GgmlDType::Q8_0,
        ),
        ("output_norm.weight".into(), vec![t.hidden], GgmlDType::F32),
    ];
    for i in 0..t.layers {
        for (n, shape, ty) in [
            ("attn_norm", vec![t.hidden], GgmlDType::F32),
            ("attn_q", vec![q, t.hidden], GgmlDType::Q4_1),
            ("attn_k", vec![kv, t.hidden], GgmlDType::Q4_1),
            ("attn_v", vec![kv, t.hidden], GgmlDType::Q8_0),
            ("attn_output", vec![t.hidden, q], GgmlDType::Q4_0),
            ("ffn_norm", vec![t.hidden], GgmlDType::F32),
            // F32 has no quantized kernel: gate (dense) shares its input with up (F16 panels).
            ("ffn_gate", vec![t.ffn, t.hidden], GgmlDType::F32),
            ("ffn_up", vec![t.ffn, t.hidden], GgmlDType::F16),
            ("ffn_down", vec![t.hidden, t.ffn], GgmlDType::Q4_1),
        ] {
            tensors.push((format!("blk.{i}.{n}.weight"), shape, ty));
        }
    }
    tensors.retain(|(n, _, _)| Some(n.as_str()) != edit.drop_tensor);
    let qtensors: Vec<(String, QTensor)> = tensors
        .iter()
        .enumerate()
        .map(|(i, (n, shape, ty))| {
            let mut shape = shape.clone();
            if Some(n.as_str()) == edit.wrong_shape {
                shape[0] += 32;
            }
            let base = if shape.len() == 1 {
                (random(&shape, i as u64) + 1.0).unwrap()
            } else {
                random(&shape, i as u64)
            };
            (n.clone(), QTensor::quantize(&base, *ty).unwrap())
        })
        .collect();
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    path
}

fn load(path: &Path) -> Result<Model, ModelError> {
    let mut file = GgufFile::open(path)?;
    Model::load(&mut file, LoadOptions::default())
}

fn load_err(edit: Edit) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny(dir.path(), "m.gguf", edit);
    match load(&path) {
        Ok(_) => panic!("loading should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tiny_model_reads_every_hyperparameter_from_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&write_tiny(dir.path(), "m.gguf", Edit::default())).unwrap();
    let c = model.config();
    assert_eq!(
        (c.layers, c.hidden, c.ffn, c.heads, c.kv_heads, c.head_dim),
        (2, 64, 128, 4, 2, 16)
    );
    assert_eq!((c.vocab, c.context_length), (96, 6000));
    let logits = model.forward(&[1, 2, 3], &mut model.new_cache()).unwrap();
    assert_eq!(logits.len(), 96);
    assert!(logits.iter().all(|x| x.is_finite()));
}

#[test]
fn sequences_run_past_4096_positions_up_to_the_context_length() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&write_tiny(dir.path(), "m.gguf", Edit::default())).unwrap();
    let mut cache = model.new_cache();
    let prompt: Vec<u32> = (0..5000).map(|i| (i % 96) as u32).collect();
    for chunk in prompt.chunks(1024) {
        model.forward(chunk, &mut cache).unwrap();
    }
    let logits = model.forward(&[5], &mut cache).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    assert_eq!(cache.len(), 5001);
    let err = model.forward(&vec![1; 1000], &mut cache).unwrap_err();
    assert!(
        err.to_string().contains("6001 tokens needed") && err.to_string().contains("6000"),
        "{err}"
    );
}

#[test]
fn exact_and_quantized_decode_agree_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny(dir.path(), "m.gguf", Edit::default());
    let fast = load(&path).unwrap();
    let mut file = GgufFile::open(&path).unwrap();
    let exact = Model::load(
        &mut file,
        LoadOptions {
            exact: true,
            context: None,
            kv_dtype: crate::executor::KvDtype::F16,
        },
    )
    .unwrap();
    let (mut a, mut b) = (fast.new_cache(), exact.new_cache());
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    for t in [3u32, 14, 15, 92, 65] {
        la = fast.forward(&[t], &mut a).unwrap();
        lb = exact.forward(&[t], &mut b).unwrap();
    }
    let max = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 0.05, "quantized vs exact decode differ by {max}");
    // The same tokens as one prompt chunk: prompt rows through the same mixed products.
    let prompt = [3u32, 14, 15, 92, 65];
    let pa = fast.forward(&prompt, &mut fast.new_cache()).unwrap();
    let pb = exact.forward(&prompt, &mut exact.new_cache()).unwrap();
    let max = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 0.05, "quantized vs exact prefill differ by {max}");
}

#[test]
fn out_of_vocabulary_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = load(&write_tiny(dir.path(), "m.gguf", Edit::default())).unwrap();
    let err = model.forward(&[1, 96], &mut model.new_cache()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "token id 96 is outside the vocabulary of 96 tokens"
    );
}

#[test]
fn missing_hyperparameter_is_named() {
    let err = load_err(Edit {
        drop_key: Some("llama.block_count"),
        ..Default::default()
    });
    assert_eq!(err, "GGUF metadata key `llama.block_count` is missing");
}

#[test]
fn mistyped_or_impossible_hyperparameters_are_named() {
    let err = load_err(Edit {
        set_key: Some(("llama.block_count", Value::String("two".into()))),
        ..Default::default()
    });
    assert!(
        err.contains("`llama.block_count`") && err.contains("expected an integer"),
        "{err}"
    );
    let err = load_err(Edit {
        set_key: Some(("llama.attention.head_count_kv", Value::U32(3))),
        ..Default::default()
    });
    assert!(
        err.contains("head_count_kv") && err.contains("do not divide"),
        "{err}"
    );
    let err = load_err(Edit {
        set_key: Some(("llama.context_length", Value::I32(-1))),
        ..Default::default()
    });
    assert!(err.contains("llama.context_length"), "{err}");
}

#[test]
fn unsupported_architecture_is_refused_by_name() {
    let err = load_err(Edit {
        set_key: Some(("general.architecture", Value::String("mamba".into()))),
        ..Default::default()
    });
    assert!(
        err.contains("`mamba`") && err.contains("supported: llama"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let err = load_err(Edit {
        drop_tensor: Some("blk.1.ffn_up.weight"),
        ..Default::default()
    });
    assert_eq!(err, "GGUF tensor `blk.1.ffn_up.weight` is missing");
}

#[test]
fn wrong_tensor_shape_is_named() {
    let err = load_err(Edit {
        wrong_shape: Some("blk.0.attn_k.weight"),
        ..Default::default()
    });
    assert!(
        err.starts_with("GGUF tensor `blk.0.attn_k.weight`: shape [64, 64], expected [32, 64]"),
        "{err}"
    );
}

#[test]
fn zero_alignment_is_an_error_not_a_panic() {
    let err = load_err(Edit {
        set_key: Some(("general.alignment", Value::U32(0))),
        ..Default::default()
    });
    assert!(err.contains("not a valid GGUF file"), "{err}");
}

#[test]
fn truncated_files_are_errors_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(write_tiny(dir.path(), "m.gguf", Edit::default())).unwrap();
    let cut = dir.path().join("cut.gguf");
    let lengths = (0..64)
        .chain((64..full.len()).step_by(full.len() / 97))
        .chain([full.len() - 1]);
    for len in lengths {
        std::fs::write(&cut, &full[..len]).unwrap();
        match load(&cut) {
            Ok(_) => panic!("a file cut to {len} of {} bytes loaded", full.len()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

#[test]
fn garbage_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    assert!(matches!(load(&p), Err(ModelError::Format { .. })));
    std::fs::write(&p, b"not a model at all").unwrap();
    assert!(matches!(load(&p), Err(ModelError::Format { .. })));
    let err = load(&dir.path().join("absent.gguf")).err().unwrap();
    assert!(err.to_string().contains("absent.gguf"), "{err}");
}
