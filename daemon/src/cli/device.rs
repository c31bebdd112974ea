//! `agentd device`: what CUDA this machine has (driver, NVRTC, devices), and every CUDA kernel
//! source compiled for each device's architecture into the PTX cache (`ptx/` in the data
//! directory). Works, and says what is missing, on a machine without a GPU.

use agentd_cuda::{probe, sources::SOURCES, PtxCache};
use anyhow::Result;
use serde::Serialize;

/// What `agentd device --json` prints.
#[derive(Debug, Serialize)]
pub struct DeviceReport {
    /// The driver's CUDA version (e.g. 12080), if a driver loaded.
    pub driver_version: Option<i32>,
    /// NVRTC's version, "major.minor", if NVRTC loaded.
    pub nvrtc_version: Option<String>,
    /// Why the driver or a device could not be used.
    pub error: Option<String>,
    /// The devices.
    pub devices: Vec<DeviceEntry>,
}

/// One device and its kernels.
#[derive(Debug, Serialize)]
pub struct DeviceEntry {
    /// `cuda:N`.
    pub device: String,
    /// Its name.
    pub name: String,
    /// Compute capability, "major.minor".
    pub compute_capability: String,
    /// Device memory, MiB.
    pub memory_mib: u64,
    /// Per kernel source: "compiled", "cached", or the compiler's error.
    pub kernels: Vec<(String, String)>,
}

/// Probes the machine and compiles the kernels for each device.
pub fn run() -> Result<DeviceReport> {
    let p = probe();
    let cache = PtxCache::new(agentd_engine::model_files::data_dir()?.join("ptx"));
    let mut devices = Vec::new();
    for d in &p.devices {
        let arch = d.arch();
        let kernels = match PtxCache::key(&arch) {
            Ok(key) => SOURCES
                .iter()
                .map(|s| {
                    let outcome = match cache.load_or_compile(s, &key) {
                        Ok((_, true)) => "cached".to_owned(),
                        Ok((_, false)) => "compiled".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    (s.file.to_owned(), outcome)
                })
                .collect(),
            Err(e) => vec![("*".to_owned(), e.to_string())],
        };
        devices.push(DeviceEntry {
            device: format!("cuda:{}", d.ordinal),
            name: d.name.clone(),
            compute_capability: format!("{}.{}", d.compute_capability.0, d.compute_capability.1),
            memory_mib: (d.total_memory >> 20) as u64,
            kernels,
        });
    }
    Ok(DeviceReport {
        driver_version: p.driver_version,
        nvrtc_version: p.nvrtc_version.map(|(a, b)| format!("{a}.{b}")),
        error: p.error,
        devices,
    })
}

/// Prints the report for a person.
pub fn print(r: &DeviceReport) {
    match r.driver_version {
        Some(v) => println!("NVIDIA driver: CUDA {}.{}", v / 1000, (v % 1000) / 10),
        None => println!("NVIDIA driver: none"),
    }
    println!(
        "NVRTC: {}",
        r.nvrtc_version
            .as_deref()
            .unwrap_or("none (kernels cannot be compiled)")
    );
    if let Some(e) = &r.error {
        println!("note: {e}");
    }
    if r.devices.is_empty() {
        println!("no CUDA device: agentd runs on the CPU");
    }
    for d in &r.devices {
        println!(
            "{}: {} (compute {}, {} MiB)",
            d.device, d.name, d.compute_capability, d.memory_mib
        );
        for (file, outcome) in &d.kernels {
            println!("  {file}: {outcome}");
        }
    }
}
