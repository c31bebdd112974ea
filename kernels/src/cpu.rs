//! Which SIMD instruction sets this CPU offers, detected once at run time.

use std::sync::OnceLock;

/// The instruction sets the kernels can use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// AVX2 + FMA + F16C, the set the x86 fast paths need together.
    pub avx2: bool,
    /// AVX-VNNI on top of `avx2`: one instruction for a 4-way byte dot product.
    pub avx_vnni: bool,
    /// AVX-512 F, BW, VL and VNNI on top of `avx2`: the same byte dot product with 32 vector
    /// registers and mask registers.
    pub avx512_vnni: bool,
    /// AVX-512 F on top of `avx2`: 512-bit float registers (the attention kernels).
    pub avx512: bool,
}

/// The features of the CPU we run on (detected on first call; `AGENTD_FORCE_SCALAR=1` turns
/// the SIMD paths off, for debugging and for measuring what they buy).
pub fn features() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        let forced_off = std::env::var_os("AGENTD_FORCE_SCALAR").is_some_and(|v| v == "1");
        let avx2 = !forced_off && detect_avx2();
        Features {
            avx2,
            avx_vnni: avx2 && detect_avx_vnni(),
            avx512_vnni: avx2 && detect_avx512_vnni(),
            avx512: avx2 && detect_avx512f(),
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn detect_avx_vnni() -> bool {
    is_x86_feature_detected!("avxvnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx_vnni() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512_vnni() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512f() -> bool {
    is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512f() -> bool {
    false
}
