//! The architectures agentd runs, each a short description over the shared layers of
//! [`super::forward`]: which optional parts a block has (biases, QK-norm, post-norms), the MLP's
//! activation, how RoPE pairs dimensions, and the defaults for sliding-window layers. Adding an
//! architecture whose blocks are made of these parts is one more entry in [`ARCHITECTURES`].

use agentd_kernels::rope::RopeStyle;

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU: `silu(gate) · up` (Llama, Qwen2, Mixtral).
    Silu,
    /// GeGLU with the tanh approximation: `gelu_tanh(gate) · up` (Gemma).
    GeluTanh,
}

/// One architecture (`general.architecture`), as llama.cpp builds its graph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArchSpec {
    /// The `general.architecture` value and metadata key prefix.
    pub name: &'static str,
    /// How RoPE pairs a head's dimensions.
    pub rope_style: RopeStyle,
    /// The MLP's activation.
    pub activation: Activation,
    /// Whether Q, K and V have biases (`blk.N.attn_{q,k,v}.bias`, required).
    pub qkv_bias: bool,
    /// Whether Q and K go through a per-head RMSNorm before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// Whether the attention and MLP outputs go through an RMSNorm before their residual add
    /// (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// Whether embeddings are multiplied by `√hidden` (Gemma).
    pub scale_embeddings: bool,
    /// With `attention.sliding_window` set and no `attention.sliding_window_pattern`: every
    /// n-th layer (the last of each group of n) is global, the others windowed (llama.cpp's
    /// `set_swa_pattern`). `None`: every layer is windowed.
    pub default_swa_period: Option<usize>,
    /// RoPE base of windowed layers when `rope.freq_base_swa` is absent (`None`: the global
    /// base).
    pub default_swa_rope_base: Option<f32>,
    /// Whether windowed layers ignore the file's RoPE scaling (`rope.scaling.*`) and rotate by
    /// the plain position (Gemma 3: llama.cpp's `rope_freq_scale_train_swa = 1`); otherwise
    /// they scale positions as the global layers do.
    pub swa_rope_unscaled: bool,
    /// Whether the MLP may be a mixture of experts (`expert_count`, Mixtral layout).
    pub experts: bool,
}

/// Llama 1–3, Mistral, TinyLlama, SmolLM, Mixtral (with experts).
pub const LLAMA: ArchSpec = ArchSpec {
    name: "llama",
    rope_style: RopeStyle::Adjacent,
    activation: Activation::Silu,
    qkv_bias: false,
    qk_norm: false,
    post_norms: false,
    scale_embeddings: false,
    default_swa_period: None,
    default_swa_rope_base: None,
    swa_rope_unscaled: false,
    experts: true,
};

/// Qwen2 and Qwen2.5: Llama with Q/K/V biases and NeoX RoPE.
pub const QWEN2: ArchSpec = ArchSpec {
    name: "qwen2",
    rope_style: RopeStyle::Halves,
    qkv_bias: true,
    experts: false,
    ..LLAMA
};

/// Gemma 3: QK-norm, pre- and post-norms, GeGLU, scaled embeddings, five windowed layers
/// (RoPE base 10,000, no RoPE scaling) to one global layer.
pub const GEMMA3: ArchSpec = ArchSpec {
    name: "gemma3",
    rope_style: RopeStyle::Halves,
    activation: Activation::GeluTanh,
    qkv_bias: false,
    qk_norm: true,
    post_norms: true,
    scale_embeddings: true,
    default_swa_period: Some(6),
    default_swa_rope_base: Some(10_000.0),
    swa_rope_unscaled: true,
    experts: false,
};

/// Every architecture agentd runs.
pub const ARCHITECTURES: &[ArchSpec] = &[LLAMA, QWEN2, GEMMA3];

/// The description of architecture `name`, if agentd runs it.
pub fn lookup(name: &str) -> Option<&'static ArchSpec> {
    ARCHITECTURES.iter().find(|a| a.name == name)
}

/// The names of [`ARCHITECTURES`], comma-separated (for error messages).
pub fn supported() -> String {
    ARCHITECTURES
        .iter()
        .map(|a| a.name)
        .collect::<Vec<_>>()
        .join(", ")
}
