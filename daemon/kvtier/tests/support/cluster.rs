//! A six-node Redis Cluster (three primaries, three replicas) on free loopback ports, started
//! by a test and stopped when dropped, panics included. Used by `daemon/kvtier/tests/` and, by
//! path, by the daemon's end-to-end test `tests/kv_tier.rs`.
#![allow(dead_code)] // each test target uses a different subset

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Six `redis-server` processes in cluster mode; killed when dropped.
pub struct Cluster {
    pub ports: Vec<u16>,
    pub servers: Vec<Option<Child>>,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.servers.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A loopback port that is free, and whose cluster bus port (port + 10000) is free too.
pub fn free_port(taken: &[u16]) -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let p = l.local_addr().expect("its address").port();
        if p > 55_000 || taken.contains(&p) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut ports = Vec::new();
        let mut cluster = Cluster {
            ports: Vec::new(),
            servers: Vec::new(),
            _dir: dir,
        };
        for _ in 0..6 {
            let p = free_port(&ports);
            ports.push(p);
            let d = cluster._dir.path().join(p.to_string());
            std::fs::create_dir_all(&d).expect("a node's directory");
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{p}.conf")])
                .args(["--cluster-node-timeout", "1000"])
                .args(["--appendonly", "no", "--save", ""])
                // A replica syncs at once (not after the default 5 s), so it can take over.
                .args(["--repl-diskless-sync-delay", "0"])
                .args(["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lfu"])
                .args(["--dir", path_str(&d)])
                .args(["--logfile", path_str(&d.join("redis.log"))])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            cluster.servers.push(Some(child));
        }
        cluster.ports = ports.clone();
        for &p in &ports {
            wait_for("a node answers PING", Duration::from_secs(10), || {
                redis_cli(p, &["ping"]).contains("PONG")
            });
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for &p in &ports {
            wait_for("cluster_state:ok", Duration::from_secs(20), || {
                redis_cli(p, &["cluster", "info"]).contains("cluster_state:ok")
            });
        }
        // A replica that never synced does not take over its primary: wait for every link.
        for &p in &ports {
            wait_for("replicas in sync", Duration::from_secs(20), || {
                let info = redis_cli(p, &["info", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            });
        }
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The node that serves `key` now (a primary answers, the others redirect).
    pub fn owner(&self, key: &str) -> usize {
        (0..self.ports.len())
            .find(|&i| {
                self.servers[i].is_some()
                    && redis_cli(self.ports[i], &["exists", key])
                        .trim()
                        .parse::<i64>()
                        .is_ok()
            })
            .expect("a node owns the key")
    }

    /// Primaries holding at least one key.
    pub fn primaries_with_keys(&self) -> usize {
        self.ports
            .iter()
            .filter(|p| redis_cli(**p, &["role"]).starts_with("master"))
            .filter(|p| redis_cli(**p, &["dbsize"]).trim() != "0")
            .count()
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

pub fn redis_installed() -> bool {
    let ok = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    ok("redis-server") && ok("redis-cli")
}

impl Cluster {
    /// Kills every node (SIGKILL): the cluster is gone.
    pub fn stop_all(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}
