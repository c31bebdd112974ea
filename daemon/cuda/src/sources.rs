//! The CUDA C kernels (`kernels/cuda/*.cu`), built into the binary.

/// One kernel source file.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// Its file name.
    pub file: &'static str,
    /// Its CUDA C text.
    pub text: &'static str,
    /// The `extern "C"` kernels it defines.
    pub kernels: &'static [&'static str],
}

/// Every kernel source.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        file: "elementwise.cu",
        text: include_str!("../../../kernels/cuda/elementwise.cu"),
        kernels: &[
            "rms_norm_f32",
            "rope_f32",
            "swiglu_f32",
            "geglu_tanh_f32",
            "add_f32",
        ],
    },
    KernelSource {
        file: "quant.cu",
        text: include_str!("../../../kernels/cuda/quant.cu"),
        kernels: &[
            "quantize_q8_1",
            "mmvq_q8_0",
            "mmvq_q4_0",
            "mmvq_q4_1",
            "get_rows_q8_0",
            "get_rows_q4_0",
            "get_rows_q4_1",
        ],
    },
    KernelSource {
        file: "attention.cu",
        text: include_str!("../../../kernels/cuda/attention.cu"),
        kernels: &["paged_attention_decode_f16"],
    },
];

/// SHA-256 over every source's name and text, hex: part of the PTX cache key.
pub fn sources_digest() -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for s in SOURCES {
        h.update((s.file.len() as u64).to_le_bytes());
        h.update(s.file.as_bytes());
        h.update((s.text.len() as u64).to_le_bytes());
        h.update(s.text.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
