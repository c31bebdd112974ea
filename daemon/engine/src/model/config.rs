//! A model's hyperparameters, read from GGUF metadata (never assumed), and the features of its
//! architecture ([`super::arch`]).

use super::arch::{self, Activation, ArchSpec};
use super::error::{ModelError, Result};
use super::gguf::Meta;
use agentd_kernels::rope::RopeStyle;
use candle_core::quantized::gguf_file::Value;

/// Everything the forward pass needs to know about the network's shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// `general.architecture` (the metadata key prefix).
    pub architecture: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Residual stream width.
    pub hidden: usize,
    /// SwiGLU inner width.
    pub ffn: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates.
    pub rope_dim: usize,
    /// RoPE frequency base.
    pub rope_theta: f32,
    /// Linear RoPE position scale (1.0 when the model has none).
    pub rope_position_scale: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Longest sequence the model was trained for; sequences may not grow past it.
    pub context_length: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// How RoPE pairs a head's dimensions (`adjacent`: Llama; `halves`: NeoX, Qwen2, Gemma).
    #[serde(serialize_with = "rope_style_name")]
    pub rope_style: RopeStyle,
    /// The MLP's activation.
    pub activation: Activation,
    /// Whether Q, K and V have biases (Qwen2).
    pub qkv_bias: bool,
    /// Whether Q and K are RMS-normalised per head before RoPE (Gemma 3).
    pub qk_norm: bool,
    /// Whether attention and MLP outputs are RMS-normalised before the residual add (Gemma).
    pub post_norms: bool,
    /// Factor on the embeddings (`√hidden` for Gemma, else 1).
    pub embedding_scale: f32,
    /// Factor on the attention scores (`1/√head_dim` unless the architecture says otherwise).
    pub attention_scale: f32,
    /// Keys a windowed layer's query sees, itself included (`attention.sliding_window`).
    pub sliding_window: Option<usize>,
    /// The layers that attend within [`ModelConfig::sliding_window`] (the others see the whole
    /// context).
    pub windowed_layers: Vec<usize>,
    /// RoPE frequency base of the windowed layers.
    pub rope_theta_swa: f32,
    /// Linear RoPE position scale of the windowed layers (the global one, or 1.0 where the
    /// architecture says windowed layers are unscaled).
    pub rope_position_scale_swa: f32,
    /// Experts per MLP (`expert_count`; 0: a dense MLP).
    pub experts: usize,
    /// Experts each token is routed to (`expert_used_count`).
    pub experts_used: usize,
}

fn rope_style_name<S: serde::Serializer>(
    style: &RopeStyle,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(match style {
        RopeStyle::Adjacent => "adjacent",
        RopeStyle::Halves => "halves",
    })
}

impl ModelConfig {
    /// The architecture's description.
    pub fn arch(&self) -> &'static ArchSpec {
        arch::lookup(&self.architecture).expect("checked when the config was read")
    }

    /// The window of layer `layer` (`None`: it sees the whole context).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.windowed_layers.binary_search(&layer).is_ok())
    }

    /// Reads the hyperparameters; `vocab` comes from the embedding tensor's shape.
    pub fn from_metadata(meta: Meta<'_>, vocab: usize) -> Result<Self> {
        let arch = meta.string("general.architecture")?.to_owned();
        let spec = arch::lookup(&arch).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "architecture `{arch}` (general.architecture); supported: {}",
                arch::supported()
            ))
        })?;
        let key = |k: &str| format!("{arch}.{k}");
        let layers = meta.usize(&key("block_count"))?;
        let hidden = meta.usize(&key("embedding_length"))?;
        let ffn = meta.usize(&key("feed_forward_length"))?;
        let heads = meta.usize(&key("attention.head_count"))?;
        let kv_heads = meta
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(heads);
        let context_length = meta.usize(&key("context_length"))?;
        let rms_eps = meta
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| ModelError::MissingKey {
                key: key("attention.layer_norm_rms_epsilon"),
            })?;
        let rope_theta = meta.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);

        let positive = |k: &str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(ModelError::BadKey {
                    key: key(k),
                    reason: "must be positive".into(),
                });
            }
            Ok(())
        };
        positive("block_count", layers)?;
        positive("embedding_length", hidden)?;
        positive("feed_forward_length", ffn)?;
        positive("attention.head_count", heads)?;
        positive("attention.head_count_kv", kv_heads)?;
        positive("context_length", context_length)?;
        if !hidden.is_multiple_of(heads) {
            return Err(ModelError::BadKey {
                key: key("attention.head_count"),
                reason: format!("{heads} heads do not divide the embedding length {hidden}"),
            });
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(ModelError::BadKey {
                key: key("attention.head_count_kv"),
                reason: format!("{kv_heads} KV heads do not divide the {heads} query heads"),
            });
        }
        // Gemma's heads are wider than hidden / heads: the key length says so.
        let head_dim = meta
            .opt_usize(&key("attention.key_length"))?
            .unwrap_or(hidden / heads);
        positive("attention.key_length", head_dim)?;
        if let Some(v) = meta.opt_usize(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(ModelError::Unsupported(format!(
                    "{} = {v} differs from the key length {head_dim}",
                    key("attention.value_length")
                )));
            }
        }
        let rope_dim = meta
            .opt_usize(&key("rope.dimension_count"))?
            .unwrap_or(head_dim);
        if rope_dim == 0 || rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            return Err(ModelError::BadKey {
                key: key("rope.dimension_count"),
                reason: format!("{rope_dim} must be even and at most the head size {head_dim}"),
            });
        }
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(ModelError::BadKey {
                key: key("rope.freq_base"),
                reason: format!("{rope_theta} must be > 1"),
            });
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0) {
            return Err(ModelError::BadKey {
                key: key("attention.layer_norm_rms_epsilon"),
                reason: format!("{rms_eps} must be positive"),
            });
        }
        let rope_position_scale = match meta.get(&key("rope.scaling.type")) {
            None => 1.0,
            Some(_) => match meta.string(&key("rope.scaling.type"))? {
                "none" => 1.0,
                "linear" => {
                    let factor = meta.opt_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                    if !(factor.is_finite() && factor > 0.0) {
                        return Err(ModelError::BadKey {
                            key: key("rope.scaling.factor"),
                            reason: format!("{factor} must be positive"),
                        });
                    }
                    1.0 / factor
                }
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "RoPE scaling `{other}` ({}); supported: none, linear",
                        key("rope.scaling.type")
                    )))
                }
            },
        };
        let sliding_window = meta.opt_usize(&key("attention.sliding_window"))?;
        if sliding_window == Some(0) {
            return Err(ModelError::BadKey {
                key: key("attention.sliding_window"),
                reason: "must be positive".into(),
            });
        }
        let windowed_layers = match sliding_window {
            None => Vec::new(),
            Some(_) => {
                windowed_layers(meta, &key("attention.sliding_window_pattern"), spec, layers)?
            }
        };
        let rope_theta_swa = meta
            .opt_f32(&key("rope.freq_base_swa"))?
            .or(spec.default_swa_rope_base)
            .unwrap_or(rope_theta);
        if !(rope_theta_swa.is_finite() && rope_theta_swa > 1.0) {
            return Err(ModelError::BadKey {
                key: key("rope.freq_base_swa"),
                reason: format!("{rope_theta_swa} must be > 1"),
            });
        }
        let experts = meta.opt_usize(&key("expert_count"))?.unwrap_or(0);
        let experts_used = meta.opt_usize(&key("expert_used_count"))?.unwrap_or(0);
        if experts > 0 {
            if !spec.experts {
                return Err(ModelError::Unsupported(format!(
                    "{} = {experts}: experts are not supported for `{arch}`",
                    key("expert_count")
                )));
            }
            if experts_used == 0 || experts_used > experts {
                return Err(ModelError::BadKey {
                    key: key("expert_used_count"),
                    reason: format!("{experts_used} must be in 1..={experts}"),
                });
            }
        }
        // llama.cpp: Gemma 3 27B scales queries by 1/√(hidden/heads), every other size and
        // architecture by 1/√head_dim.
        let attention_scale = if spec.name == "gemma3" && layers == 62 {
            1.0 / ((hidden / heads) as f32).sqrt()
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        Ok(Self {
            architecture: arch,
            layers,
            hidden,
            ffn,
            heads,
            kv_heads,
            head_dim,
            rope_dim,
            rope_theta,
            rope_position_scale,
            rms_eps,
            context_length,
            vocab,
            rope_style: spec.rope_style,
            activation: spec.activation,
            qkv_bias: spec.qkv_bias,
            qk_norm: spec.qk_norm,
            post_norms: spec.post_norms,
            embedding_scale: if spec.scale_embeddings {
                (hidden as f32).sqrt()
            } else {
                1.0
            },
            attention_scale,
            sliding_window,
            windowed_layers,
            rope_theta_swa,
            rope_position_scale_swa: if spec.swa_rope_unscaled {
                1.0
            } else {
                rope_position_scale
            },
            experts,
            experts_used: if experts > 0 { experts_used } else { 0 },
        })
    }

    /// Bytes of f32 K and V one token occupies across all layers (the pool stores f16, half
    /// of this).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * self.kv_heads * self.head_dim * 2 * std::mem::size_of::<f32>()
    }
}

/// Which of `layers` layers are windowed: `pattern_key` as an array of booleans (one per layer),
/// as a period n (the last layer of each n is global; 0: all windowed), or absent (the
/// architecture's default period, or every layer).
fn windowed_layers(
    meta: Meta<'_>,
    pattern_key: &str,
    spec: &ArchSpec,
    layers: usize,
) -> Result<Vec<usize>> {
    let bad = |reason: String| ModelError::BadKey {
        key: pattern_key.to_owned(),
        reason,
    };
    let period = match meta.get(pattern_key) {
        Some(Value::Array(flags)) => {
            if flags.len() != layers {
                return Err(bad(format!("{} flags for {layers} layers", flags.len())));
            }
            return flags
                .iter()
                .enumerate()
                .filter_map(|(i, f)| match f {
                    Value::Bool(true) => Some(Ok(i)),
                    Value::Bool(false) => None,
                    other => Some(Err(bad(format!(
                        "expected booleans, found {:?}",
                        other.value_type()
                    )))),
                })
                .collect();
        }
        Some(_) => meta.opt_usize(pattern_key)?,
        None => spec.default_swa_period,
    };
    // llama.cpp's `set_swa_pattern`: layer i is windowed when i % n < n - 1, all for n = 0.
    Ok(match period {
        None | Some(0) => (0..layers).collect(),
        Some(n) => (0..layers).filter(|i| i % n < n - 1).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A Gemma 3 header (the 270M's shape) plus `extra`.
    fn gemma3(extra: &[(&str, Value)]) -> HashMap<String, Value> {
        let mut m: HashMap<String, Value> = [
            ("general.architecture", Value::String("gemma3".into())),
            ("gemma3.block_count", Value::U32(18)),
            ("gemma3.embedding_length", Value::U32(640)),
            ("gemma3.feed_forward_length", Value::U32(2048)),
            ("gemma3.attention.head_count", Value::U32(4)),
            ("gemma3.attention.head_count_kv", Value::U32(1)),
            ("gemma3.attention.key_length", Value::U32(256)),
            ("gemma3.context_length", Value::U32(32768)),
            ("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
            ("gemma3.rope.freq_base", Value::F32(1e6)),
            ("gemma3.attention.sliding_window", Value::U32(512)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            m.insert((*k).to_owned(), v.clone());
        }
        m
    }

    #[test]
    fn gemma3_windows_rope_bases_and_scales_follow_llama_cpp() {
        let c = ModelConfig::from_metadata(Meta(&gemma3(&[])), 262_144).unwrap();
        assert_eq!(
            c.windowed_layers,
            [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16]
        );
        assert_eq!(c.layer_window(4), Some(512));
        assert_eq!(c.layer_window(5), None);
        assert_eq!((c.rope_theta, c.rope_theta_swa), (1e6, 10_000.0));
        assert_eq!(c.attention_scale, 1.0 / 16.0);
        assert_eq!(c.embedding_scale, 640f32.sqrt());
        // Linear RoPE scaling (Gemma 3 4B and up) applies to the global layers only.
        let scaled = gemma3(&[
            ("gemma3.rope.scaling.type", Value::String("linear".into())),
            ("gemma3.rope.scaling.factor", Value::F32(8.0)),
        ]);
        let c = ModelConfig::from_metadata(Meta(&scaled), 262_144).unwrap();
        assert_eq!(
            (c.rope_position_scale, c.rope_position_scale_swa),
            (0.125, 1.0)
        );
        // A pattern period from the file.
        let period = gemma3(&[("gemma3.attention.sliding_window_pattern", Value::U32(3))]);
        let c = ModelConfig::from_metadata(Meta(&period), 262_144).unwrap();
        assert_eq!(c.windowed_layers, [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16]);
    }

    #[test]
    fn windowed_layers_of_other_architectures_keep_the_global_scale() {
        let m: HashMap<String, Value> = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(2)),
            ("llama.embedding_length", Value::U32(64)),
            ("llama.feed_forward_length", Value::U32(128)),
            ("llama.attention.head_count", Value::U32(4)),
            ("llama.context_length", Value::U32(4096)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.attention.sliding_window", Value::U32(1024)),
            ("llama.rope.scaling.type", Value::String("linear".into())),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let c = ModelConfig::from_metadata(Meta(&m), 100).unwrap();
        assert_eq!(c.windowed_layers, [0, 1]);
        assert_eq!((c.rope_theta, c.rope_theta_swa), (10_000.0, 10_000.0));
        assert_eq!(
            (c.rope_position_scale, c.rope_position_scale_swa),
            (0.25, 0.25)
        );
    }

    /// Window, expert and architecture metadata that cannot work is refused with an error that
    /// names the key (or the architecture), never a panic or a model that runs wrongly.
    #[test]
    fn bad_window_expert_and_architecture_metadata_name_the_key() {
        let llama = |extra: &[(&str, Value)]| -> HashMap<String, Value> {
            let mut m: HashMap<String, Value> = [
                ("general.architecture", Value::String("llama".into())),
                ("llama.block_count", Value::U32(2)),
                ("llama.embedding_length", Value::U32(64)),
                ("llama.feed_forward_length", Value::U32(128)),
                ("llama.attention.head_count", Value::U32(4)),
                ("llama.context_length", Value::U32(4096)),
                ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            for (k, v) in extra {
                m.insert((*k).to_owned(), v.clone());
            }
            m
        };
        let err = |m: HashMap<String, Value>| {
            ModelConfig::from_metadata(Meta(&m), 100)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "accepted".into())
        };
        let e = err(llama(&[("llama.attention.sliding_window", Value::U32(0))]));
        assert!(e.contains("llama.attention.sliding_window"), "{e}");
        let e = err(llama(&[("llama.expert_count", Value::U32(4))]));
        assert!(e.contains("llama.expert_used_count"), "{e}");
        let e = err(llama(&[
            ("llama.expert_count", Value::U32(4)),
            ("llama.expert_used_count", Value::U32(5)),
        ]));
        assert!(
            e.contains("llama.expert_used_count") && e.contains("1..=4"),
            "{e}"
        );
        let mut qwen = llama(&[]);
        qwen.insert("general.architecture".into(), Value::String("qwen2".into()));
        for (k, v) in llama(&[]) {
            if let Some(rest) = k.strip_prefix("llama.") {
                qwen.insert(format!("qwen2.{rest}"), v);
            }
        }
        qwen.insert("qwen2.expert_count".into(), Value::U32(4));
        qwen.insert("qwen2.expert_used_count".into(), Value::U32(2));
        let e = err(qwen);
        assert!(e.contains("experts are not supported for `qwen2`"), "{e}");
        let mut other = llama(&[]);
        other.insert("general.architecture".into(), Value::String("mamba".into()));
        let e = err(other);
        assert!(e.contains("mamba"), "{e}");
    }
}
