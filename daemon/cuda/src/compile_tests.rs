//! Every kernel source compiles with NVRTC, when NVRTC can be loaded: from the system, or from
//! the `nvidia-cuda-nvrtc-cu12` Python wheel (`.ci/run` installs it), found through python3.
//! Without NVRTC the compile tests say they were skipped and why.

use super::*;
use crate::device::preload_nvrtc;
use crate::sources::{sources_digest, SOURCES};

/// Loads NVRTC if the system has none and the Python wheel is installed; whether NVRTC loads.
fn nvrtc() -> bool {
    if nvrtc_present() {
        return true;
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import nvidia.cuda_nvrtc, os; print(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], 'lib'))",
        ])
        .output();
    let Ok(out) = out else { return false };
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    !dir.is_empty() && preload_nvrtc(Path::new(&dir)) && nvrtc_present()
}

#[test]
fn every_kernel_source_compiles_with_nvrtc_and_defines_its_kernels() {
    if !nvrtc() {
        eprintln!(
            "SKIPPED: no NVRTC (install the CUDA toolkit, or pip install nvidia-cuda-nvrtc-cu12)"
        );
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        for s in SOURCES {
            let ptx = compile_ptx(s, arch).unwrap_or_else(|e| panic!("{e}"));
            for k in s.kernels {
                assert!(
                    ptx.contains(&format!(".entry {k}(")),
                    "{} for {arch} lacks kernel {k}",
                    s.file
                );
            }
        }
    }
}

#[test]
fn a_source_nvrtc_refuses_is_an_error_with_its_log() {
    if !nvrtc() {
        eprintln!("SKIPPED: no NVRTC");
        return;
    }
    let bad = crate::sources::KernelSource {
        file: "bad.cu",
        text: "extern \"C\" __global__ void k() { undefined_thing(); }",
        kernels: &[],
    };
    match compile_ptx(&bad, "compute_80") {
        Err(CudaError::Compile { file, log }) => {
            assert_eq!(file, "bad.cu");
            assert!(log.contains("undefined_thing"), "{log}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_ptx_cache_stores_once_and_serves_after() {
    if !nvrtc() {
        eprintln!("SKIPPED: no NVRTC");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = PtxCache::new(dir.path().join("ptx"));
    let key = PtxCache::key("compute_80").unwrap();
    let (first, cached) = cache.load_or_compile(&SOURCES[0], &key).unwrap();
    assert!(!cached);
    let (again, cached) = cache.load_or_compile(&SOURCES[0], &key).unwrap();
    assert!(cached);
    assert_eq!(first, again);
    // A damaged file is compiled again and replaced.
    let path = cache.dir().join(key.file_name(&SOURCES[0]));
    std::fs::write(&path, "garbage").unwrap();
    let (fixed, cached) = cache.load_or_compile(&SOURCES[0], &key).unwrap();
    assert!(!cached);
    assert_eq!(fixed, first);
}

#[test]
fn cache_keys_change_with_everything_the_ptx_depends_on() {
    let key = CacheKey {
        nvrtc: (12, 9),
        driver: Some(12080),
        arch: "compute_90".into(),
    };
    let name = key.file_name(&SOURCES[0]);
    assert!(
        name.starts_with("elementwise-") && name.ends_with(".ptx"),
        "{name}"
    );
    let changed = [
        CacheKey {
            nvrtc: (12, 8),
            ..key.clone()
        },
        CacheKey {
            driver: Some(12090),
            ..key.clone()
        },
        CacheKey {
            arch: "compute_80".into(),
            ..key.clone()
        },
    ];
    for k in changed {
        assert_ne!(k.file_name(&SOURCES[0]), name, "{k:?}");
    }
    assert_ne!(key.file_name(&SOURCES[1]), name);
    assert_eq!(key.file_name(&SOURCES[0]), name);
    assert_eq!(sources_digest().len(), 64);
}
