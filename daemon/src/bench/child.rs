//! A child `agentd serve` for the benchmarks that watch the daemon's memory (`soak`, `memory`):
//! the same binary, started on a temporary socket and cache directory, so its resident memory
//! (`VmRSS` of its own pid) holds the daemon alone, not the benchmark's clients.

use crate::cli::connect::connect;
use agentd_wire::proto::{self, agentd_client::AgentdClient};
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// How to start the child daemon.
#[derive(Debug, Clone)]
pub struct ChildConfig {
    /// The binary's global flags (`--model` resolved to a path, `--threads`, `--context`, …),
    /// passed on so the child runs the same model the same way.
    pub global_args: Vec<OsString>,
    /// `agentd serve` flags after the socket and cache directory (e.g. `--kv-memory 1GiB`).
    pub serve_args: Vec<OsString>,
}

/// A running `agentd serve`; killed when dropped, its socket and cache directory removed.
pub struct ChildDaemon {
    child: Child,
    socket: PathBuf,
    // Removed on drop, after the child is killed (field order).
    _dir: tempfile::TempDir,
}

impl ChildDaemon {
    /// Starts the daemon and waits until it answers a health check (at most two minutes).
    pub async fn start(cfg: &ChildConfig) -> Result<ChildDaemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("agentd.sock");
        let mut args = cfg.global_args.clone();
        args.push("serve".into());
        args.extend(["--socket".into(), socket.clone().into_os_string()]);
        args.extend([
            "--cache-dir".into(),
            dir.path().join("cache").into_os_string(),
        ]);
        args.extend(cfg.serve_args.iter().cloned());
        Self::spawn(dir, socket, &args, "agentd serve").await
    }

    /// Starts `agentd route` on a socket of its own with `route_args` after it (the daemons,
    /// the placement, …) and waits until it answers a health check.
    pub async fn start_router(route_args: &[OsString]) -> Result<ChildDaemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("route.sock");
        let mut args: Vec<OsString> = vec!["route".into(), "--socket".into()];
        args.push(socket.clone().into_os_string());
        args.extend(route_args.iter().cloned());
        Self::spawn(dir, socket, &args, "agentd route").await
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn spawn(
        dir: tempfile::TempDir,
        socket: PathBuf,
        args: &[OsString],
        what: &str,
    ) -> Result<ChildDaemon> {
        let exe = std::env::current_exe().context("finding the agentd binary")?;
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Its warnings and errors show on the benchmark's stderr.
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let mut daemon = ChildDaemon {
            child,
            socket,
            _dir: dir,
        };
        let since = Instant::now();
        loop {
            if let Ok(mut c) = connect(&daemon.socket).await {
                if c.health(proto::HealthRequest {}).await.is_ok() {
                    return Ok(daemon);
                }
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!("{what} exited with {status} before answering");
            }
            if since.elapsed() > Duration::from_secs(120) {
                bail!("{what} did not answer within two minutes");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new client connection to the daemon.
    pub async fn client(&self) -> Result<AgentdClient<Channel>> {
        connect(&self.socket).await
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's resident memory now, bytes.
    pub fn rss(&self) -> Result<u64> {
        rss_bytes(
            &Path::new("/proc")
                .join(self.pid().to_string())
                .join("status"),
        )
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmRSS` from a `/proc/<pid>/status` file, bytes.
pub fn rss_bytes(status: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(status).with_context(|| format!("reading {}", status.display()))?;
    parse_vm_rss(&text).with_context(|| format!("no VmRSS line in {}", status.display()))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Bytes as MiB, for reports.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The `p`-quantile (0..=1) of `v` (sorted in place), nearest rank; 0 when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tagentd\nVmPeak:\t  900 kB\nVmRSS:\t  123456 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss(status), Some(123_456 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn our_own_rss_is_nonzero() {
        assert!(rss_bytes(Path::new("/proc/self/status")).unwrap() > 0);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 51.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }
}
