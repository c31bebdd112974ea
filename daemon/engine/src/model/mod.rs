//! A Llama-family model loaded from GGUF, and its forward pass.
//!
//! [`Model`] holds only weights and immutable tables; all per-sequence state lives in KV pages
//! the caller owns ([`KvPages`], held by the [`crate::CpuExecutor`]), so one model serves any
//! number of sequences; [`Model::forward_batch`] runs a batch of them in one step.
//!
//! The layer loop is embedding → L × [RMSNorm → attention → residual → RMSNorm → SwiGLU →
//! residual] → RMSNorm → output head, with every dimension read from the file ([`LlamaConfig`]).

mod config;
mod error;
mod forward;
mod gguf;
mod kv;
mod weights;

pub use config::LlamaConfig;
pub use error::{ModelError, Result};
#[cfg(test)]
pub use forward::KvCache;
pub use forward::{RowKind, SeqStep};
pub use gguf::{GgufFile, Meta};
pub use kv::KvPages;
pub use weights::LoadOptions;

use agentd_kernels::rope::RopeTable;
use weights::{load_vector, Embedding, Linear};

/// One transformer block's weights.
struct Layer {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded model: hyperparameters, weights and RoPE tables. Immutable once loaded.
pub struct Model {
    config: LlamaConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    head: Linear,
    rope: RopeTable,
}

impl Model {
    /// Loads every weight the configuration calls for from `file`. Missing tensors, wrong
    /// shapes and truncated data are errors that name the tensor.
    pub fn load(file: &mut GgufFile, opts: LoadOptions) -> Result<Self> {
        let (_, embd_shape) =
            file.tensor_info("token_embd.weight")
                .ok_or_else(|| ModelError::MissingTensor {
                    name: "token_embd.weight".into(),
                })?;
        let [vocab, _] = embd_shape[..] else {
            return Err(ModelError::BadTensor {
                name: "token_embd.weight".into(),
                reason: format!("shape {embd_shape:?}, expected [vocab, hidden]"),
            });
        };
        let mut config = LlamaConfig::from_metadata(file.meta(), vocab)?;
        if let Some(n) = opts.context {
            if n == 0 || n > config.context_length {
                return Err(ModelError::BadOption(format!(
                    "a context of {n} tokens; this model's trained context is {} (give 1..={})",
                    config.context_length, config.context_length
                )));
            }
            config.context_length = n;
        }
        let LlamaConfig {
            hidden,
            ffn,
            layers: n_layers,
            heads,
            kv_heads,
            head_dim,
            ..
        } = config;
        let embedding = Embedding::load(file, "token_embd.weight", vocab, hidden)?;
        let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            layers.push(Layer {
                attn_norm: load_vector(file, &name("attn_norm"), hidden)?,
                wq: Linear::load(file, &name("attn_q"), q_dim, hidden, opts)?,
                wk: Linear::load(file, &name("attn_k"), kv_dim, hidden, opts)?,
                wv: Linear::load(file, &name("attn_v"), kv_dim, hidden, opts)?,
                wo: Linear::load(file, &name("attn_output"), hidden, q_dim, opts)?,
                ffn_norm: load_vector(file, &name("ffn_norm"), hidden)?,
                gate: Linear::load(file, &name("ffn_gate"), ffn, hidden, opts)?,
                up: Linear::load(file, &name("ffn_up"), ffn, hidden, opts)?,
                down: Linear::load(file, &name("ffn_down"), hidden, ffn, opts)?,
            });
        }
        let output_norm = load_vector(file, "output_norm.weight", hidden)?;
        let head = match file.tensor_info("output.weight") {
            Some(_) => Linear::load(file, "output.weight", vocab, hidden, opts)?,
            None => Linear::tied(&embedding, opts)?,
        };
        let freq_factors = match file.tensor_info("rope_freqs.weight") {
            Some(_) => Some(load_vector(file, "rope_freqs.weight", config.rope_dim / 2)?),
            None => None,
        };
        let rope = RopeTable::new(
            config.context_length,
            config.rope_dim,
            config.rope_theta,
            freq_factors.as_deref(),
            config.rope_position_scale,
        );
        Ok(Self {
            config,
            embedding,
            layers,
            output_norm,
            head,
            rope,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Bytes of weights held in memory (quantized plus any dense copies).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|w| w.size_bytes())
                    .sum::<usize>()
            })
            .sum();
        layers + self.embedding.size_bytes() + self.head.size_bytes()
    }

    /// A fresh, empty per-sequence cache for this model (oracle tests).
    #[cfg(test)]
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(KvPages::new(&self.config, 0, 16))
    }
}

#[cfg(test)]
mod load_tests;
#[cfg(test)]
mod oracle_tests;
