//! A throwaway Redis Cluster for `agentd bench cluster` when no `--kv-tier` is given: three
//! primaries (no replicas) of Debian's `redis-server` on free loopback ports, in a temporary
//! directory, `maxmemory-policy allkeys-lfu` as in production; killed when dropped.

use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The running servers; killed and their directory removed when dropped.
pub struct BenchRedis {
    ports: Vec<u16>,
    servers: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for BenchRedis {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback port whose cluster bus port (port + 10000) is free too.
fn free_port(taken: &[u16]) -> Result<u16> {
    for _ in 0..1000 {
        let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
        let p = l.local_addr()?.port();
        if p > 55_000 || taken.contains(&p) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free loopback port pair for Redis")
}

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn wait(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !ok() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the bench's Redis Cluster: {what} not within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

impl BenchRedis {
    /// Starts three primaries with `maxmemory` each and forms the cluster.
    pub fn start(maxmemory: &str) -> Result<Self> {
        for bin in ["redis-server", "redis-cli"] {
            let found = Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                bail!("{bin} is not installed (apt-get install redis-server), or pass --kv-tier redis://HOST:PORT,… of a running cluster");
            }
        }
        let dir = tempfile::tempdir()?;
        let mut me = BenchRedis {
            ports: Vec::new(),
            servers: Vec::new(),
            _dir: dir,
        };
        for _ in 0..3 {
            let p = free_port(&me.ports)?;
            let d = me._dir.path().join(p.to_string());
            std::fs::create_dir_all(&d)?;
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                .args(["--appendonly", "no", "--save", ""])
                .args([
                    "--maxmemory",
                    maxmemory,
                    "--maxmemory-policy",
                    "allkeys-lfu",
                ])
                .arg("--dir")
                .arg(&d)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting redis-server")?;
            me.ports.push(p);
            me.servers.push(child);
        }
        for &p in &me.ports {
            wait("PING", || cli(p, &["ping"]).contains("PONG"))?;
        }
        let addrs: Vec<String> = me.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        for &p in &me.ports {
            wait("cluster_state:ok", || {
                cli(p, &["cluster", "info"]).contains("cluster_state:ok")
            })?;
        }
        Ok(me)
    }

    /// The seed URLs, as `--kv-tier` takes them.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}
