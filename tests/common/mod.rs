//! Helpers shared by the end-to-end tests of `agentd serve`: a daemon process on a temporary
//! socket with the real model, and small client utilities.
#![allow(dead_code)] // each test target uses a different subset

use agentd_sdk::{Client, Event};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

pub fn model() -> PathBuf {
    agentd_engine::model_files::ensure_default_model(&mut |m| eprintln!("{m}"))
        .expect("the default model")
}

/// The stdout of a finished `agentd` command, after checking that it succeeded (its stderr is
/// the failure message otherwise).
pub fn success_stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "agentd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

/// A daemon process on its own socket; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

/// `agentd serve` on `socket` with the real model, 256 MiB of KV, and (unless `extra` names
/// one) a disk cache next to the socket.
pub fn spawn(socket: &Path, extra: &[&str]) -> Child {
    spawn_model(&model(), socket, extra)
}

/// As [`spawn`], with the model file `model`.
pub fn spawn_model(model: &Path, socket: &Path, extra: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
    cmd.arg("--model")
        .arg(model)
        .args(["serve", "--socket"])
        .arg(socket)
        .args(["--kv-memory", "256MiB"]);
    if !extra.contains(&"--cache-dir") {
        cmd.arg("--cache-dir").arg(socket.with_extension("cache"));
    }
    cmd.args(extra)
        .env("AGENTD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting agentd serve")
}

impl Daemon {
    pub async fn start(socket: &Path, extra: &[&str]) -> Daemon {
        Self::start_model(&model(), socket, extra).await
    }

    /// As [`Daemon::start`], with the model file `model`.
    pub async fn start_model(model: &Path, socket: &Path, extra: &[&str]) -> Daemon {
        let mut child = spawn_model(model, socket, extra);
        let start = Instant::now();
        loop {
            if let Ok(c) = Client::connect(socket).await {
                if c.health().await.is_ok() {
                    break;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "agentd serve exited with {status}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "agentd did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Daemon {
            child,
            socket: socket.to_owned(),
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn wait(mut self) -> Output {
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        child.wait_with_output().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port free at the time of the call, for a daemon's TCP listener.
pub fn free_loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

pub fn chatml(user: &str) -> String {
    format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}

pub async fn run(stream: agentd_sdk::GenerateStream) -> (String, agentd_sdk::Usage) {
    let mut stream = stream;
    let mut text = String::new();
    while let Some(ev) = stream.next().await {
        match ev.expect("stream event") {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Done(u) => return (text, u),
        }
    }
    panic!("stream ended without usage");
}

/// A raw gRPC client on the socket, for requests the SDK would not build.
pub async fn raw_client(
    socket: &Path,
) -> agentd_sdk::proto::agentd_client::AgentdClient<tonic::transport::Channel> {
    let socket = socket.to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://x")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap();
    agentd_sdk::proto::agentd_client::AgentdClient::new(channel)
}
