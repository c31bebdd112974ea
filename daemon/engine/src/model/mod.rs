//! A decoder-only transformer loaded from GGUF (Llama, Qwen2, Gemma 3; see [`arch`]), and its
//! forward pass.
//!
//! [`Model`] holds only weights and immutable tables; all per-sequence state lives in KV pages
//! the caller owns ([`KvPages`], held by the [`crate::CpuExecutor`]), so one model serves any
//! number of sequences; [`Model::forward_batch`] runs a batch of them in one step.
//!
//! The layer loop is embedding (× a scale) → L × [RMSNorm → attention (Q/K/V biases, QK-norm,
//! RoPE, the layer's window) → optional post-norm → residual → RMSNorm → MLP (SwiGLU or GeGLU,
//! dense or a mixture of experts) → optional post-norm → residual] → RMSNorm → output head, with
//! every dimension and optional part read from the file ([`ModelConfig`]).

pub mod arch;
mod config;
mod error;
mod experts;
mod forward;
mod gguf;
mod kv;
mod weights;

pub use config::ModelConfig;
pub use error::{ModelError, Result};
#[cfg(test)]
pub use forward::KvCache;
pub use forward::{RowKind, SeqStep};
pub use gguf::{GgufFile, Meta};
pub use kv::{check_kv_dtype, KvPages};
pub use weights::LoadOptions;

use agentd_kernels::rope::RopeTable;
use weights::{load_vector, Embedding, Linear};

/// One transformer block's weights; the optional parts are present exactly when the
/// architecture has them.
struct Layer {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    /// Q, K and V biases (Qwen2).
    qkv_bias: Option<[Vec<f32>; 3]>,
    /// Per-head RMSNorm weights of Q and K (Gemma 3).
    qk_norm: Option<[Vec<f32>; 2]>,
    wo: Linear,
    /// RMSNorm of the attention output before the residual add (Gemma).
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    mlp: Mlp,
    /// RMSNorm of the MLP output before the residual add (Gemma).
    post_ffn_norm: Option<Vec<f32>>,
    /// Keys each query sees (`None`: the whole context).
    window: Option<usize>,
    /// Index of this layer's table in [`Model::ropes`].
    rope: usize,
}

/// Rows routed to each expert (see [`Model::expert_load`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExpertLoad {
    /// In the last forward step, summed over the layers.
    pub last_step: Vec<u64>,
    /// Since the model was loaded, summed over the layers.
    pub total: Vec<u64>,
}

/// A block's MLP.
enum Mlp {
    /// `down(act(gate x) · up x)`.
    Dense {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// A mixture of experts (Mixtral layout).
    Experts(experts::Experts),
}

impl Mlp {
    fn size_bytes(&self) -> usize {
        match self {
            Mlp::Dense { gate, up, down } => {
                gate.size_bytes() + up.size_bytes() + down.size_bytes()
            }
            Mlp::Experts(e) => e.size_bytes(),
        }
    }
}

/// A loaded model: hyperparameters, weights and RoPE tables. Immutable once loaded.
pub struct Model {
    config: ModelConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    head: Linear,
    /// RoPE tables: the global layers' first, then the windowed layers' when their base or
    /// position scale differs.
    ropes: Vec<RopeTable>,
    /// Rows routed to each expert in the last step, summed over the layers (MoE models).
    last_expert_load: std::sync::Mutex<Vec<u64>>,
    /// The KV pages' storage ([`LoadOptions::kv_dtype`]).
    kv_dtype: crate::executor::KvDtype,
    /// Whether a step attends the leading pages its sequences share once for all of them
    /// (on by default; the output is the same bits either way, so this is for measuring).
    shared_prefix_attention: std::sync::atomic::AtomicBool,
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
        let mut config = ModelConfig::from_metadata(file.meta(), vocab)?;
        if let Some(n) = opts.context {
            if n == 0 || n > config.context_length {
                return Err(ModelError::BadOption(format!(
                    "a context of {n} tokens; this model's trained context is {} (give 1..={})",
                    config.context_length, config.context_length
                )));
            }
            config.context_length = n;
        }
        kv::check_kv_dtype(&config, opts.kv_dtype)?;
        let ModelConfig {
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
        let swa_rope = ((config.rope_theta_swa != config.rope_theta
            || config.rope_position_scale_swa != config.rope_position_scale)
            && !config.windowed_layers.is_empty()) as usize;
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            let bias = |t: &str| format!("blk.{i}.{t}.bias");
            let optional_norm = |file: &mut GgufFile, t: &str, len: usize, on: bool| {
                on.then(|| load_vector(file, &name(t), len)).transpose()
            };
            let qkv_bias = if config.qkv_bias {
                Some([
                    load_vector(file, &bias("attn_q"), q_dim)?,
                    load_vector(file, &bias("attn_k"), kv_dim)?,
                    load_vector(file, &bias("attn_v"), kv_dim)?,
                ])
            } else {
                None
            };
            let qk_norm = if config.qk_norm {
                Some([
                    load_vector(file, &name("attn_q_norm"), head_dim)?,
                    load_vector(file, &name("attn_k_norm"), head_dim)?,
                ])
            } else {
                None
            };
            let window = config.layer_window(i);
            layers.push(Layer {
                attn_norm: load_vector(file, &name("attn_norm"), hidden)?,
                wq: Linear::load(file, &name("attn_q"), q_dim, hidden, opts)?,
                wk: Linear::load(file, &name("attn_k"), kv_dim, hidden, opts)?,
                wv: Linear::load(file, &name("attn_v"), kv_dim, hidden, opts)?,
                qkv_bias,
                qk_norm,
                wo: Linear::load(file, &name("attn_output"), hidden, q_dim, opts)?,
                post_attn_norm: optional_norm(
                    file,
                    "post_attention_norm",
                    hidden,
                    config.post_norms,
                )?,
                ffn_norm: load_vector(file, &name("ffn_norm"), hidden)?,
                mlp: if config.experts > 0 {
                    Mlp::Experts(experts::Experts::load(file, i, &config, opts)?)
                } else {
                    Mlp::Dense {
                        gate: Linear::load(file, &name("ffn_gate"), ffn, hidden, opts)?,
                        up: Linear::load(file, &name("ffn_up"), ffn, hidden, opts)?,
                        down: Linear::load(file, &name("ffn_down"), hidden, ffn, opts)?,
                    }
                },
                post_ffn_norm: optional_norm(file, "post_ffw_norm", hidden, config.post_norms)?,
                window,
                rope: if window.is_some() { swa_rope } else { 0 },
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
        let n_experts = config.experts;
        let table = |theta: f32, position_scale: f32| {
            RopeTable::new(
                config.context_length,
                config.rope_dim,
                theta,
                freq_factors.as_deref(),
                position_scale,
            )
        };
        let mut ropes = vec![table(config.rope_theta, config.rope_position_scale)];
        if swa_rope == 1 {
            ropes.push(table(config.rope_theta_swa, config.rope_position_scale_swa));
        }
        Ok(Self {
            config,
            embedding,
            layers,
            output_norm,
            head,
            ropes,
            last_expert_load: std::sync::Mutex::new(vec![0; n_experts]),
            kv_dtype: opts.kv_dtype,
            shared_prefix_attention: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How KV pages for this model store keys and values ([`LoadOptions::kv_dtype`]; checked
    /// against the head size at load).
    pub fn kv_dtype(&self) -> crate::executor::KvDtype {
        self.kv_dtype
    }

    /// Turns shared-prefix (cascade) attention on or off: with it, the sequences of a step
    /// whose page tables start with the same pages attend those pages once, as one product of
    /// all their query rows, then each its own pages. Outputs are identical either way (the
    /// kernels keep each row's order of operations); only the speed differs.
    pub fn set_shared_prefix_attention(&self, on: bool) {
        self.shared_prefix_attention
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether shared-prefix attention is on (see [`Model::set_shared_prefix_attention`]).
    pub fn shared_prefix_attention(&self) -> bool {
        self.shared_prefix_attention
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Expert load of a mixture-of-experts model: rows routed to each expert in the last step
    /// and since load, summed over the layers (empty vectors for a dense model).
    pub fn expert_load(&self) -> ExpertLoad {
        let mut total = vec![0u64; self.config.experts];
        for l in &self.layers {
            if let Mlp::Experts(e) = &l.mlp {
                for (t, r) in total.iter_mut().zip(e.routed()) {
                    *t += r;
                }
            }
        }
        let last_step = self
            .last_expert_load
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        ExpertLoad { last_step, total }
    }

    fn record_expert_load(&self, load: Vec<u64>) {
        *self
            .last_expert_load
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = load;
    }

    /// Bytes of weights held in memory (quantized plus any dense copies).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo]
                    .iter()
                    .map(|w| w.size_bytes())
                    .sum::<usize>()
                    + l.mlp.size_bytes()
            })
            .sum();
        layers + self.embedding.size_bytes() + self.head.size_bytes()
    }

    /// A fresh, empty per-sequence cache for this model (oracle tests).
    #[cfg(test)]
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(KvPages::new(&self.config, 0, 16))
    }

    /// Sets the window of every windowed layer to `window` keys (tests: a short prompt then
    /// crosses the window).
    #[cfg(test)]
    pub(crate) fn set_sliding_window(&mut self, window: usize) {
        assert!(window > 0, "a window holds at least the query's own key");
        self.config.sliding_window = Some(window);
        for l in &mut self.layers {
            if l.window.is_some() {
                l.window = Some(window);
            }
        }
    }
}

#[cfg(test)]
mod arch_oracle_tests;
#[cfg(test)]
mod load_tests;
#[cfg(test)]
mod moe_tests;
#[cfg(test)]
mod oracle_tests;
