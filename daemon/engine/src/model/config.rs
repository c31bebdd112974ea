//! A Llama-family model's hyperparameters, read from GGUF metadata (never assumed).

use super::error::{ModelError, Result};
use super::gguf::Meta;

/// Everything the forward pass needs to know about the network's shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
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
}

/// Architectures whose GGUF tensors and keys follow llama.cpp's `llama` layout.
const SUPPORTED: &[&str] = &["llama"];

impl LlamaConfig {
    /// Reads the hyperparameters; `vocab` comes from the embedding tensor's shape.
    pub fn from_metadata(meta: Meta<'_>, vocab: usize) -> Result<Self> {
        let arch = meta.string("general.architecture")?.to_owned();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "architecture `{arch}` (general.architecture); supported: {}",
                SUPPORTED.join(", ")
            )));
        }
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
        let head_dim = hidden / heads;
        if let Some(k) = meta.opt_usize(&key("attention.key_length"))? {
            if k != head_dim {
                return Err(ModelError::Unsupported(format!(
                    "{} = {k} differs from embedding_length / head_count = {head_dim}",
                    key("attention.key_length")
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
        })
    }

    /// Bytes of f32 K and V one token occupies across all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * self.kv_heads * self.head_dim * 2 * std::mem::size_of::<f32>()
    }
}
