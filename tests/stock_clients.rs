//! End to end: gRPC clients that are not ours reach `agentd serve` on its Unix socket with their
//! default settings. grpc-python (grpc-core) sends the percent-encoded socket path as the
//! `:authority`, which h2 alone would refuse (every call failed with INTERNAL "Received
//! RST_STREAM with error code 1"). Needs python3 with grpcio and grpcio-tools (`.ci/run`
//! installs them); without them the test says why it skipped.

mod common;

use common::Daemon;
use std::path::Path;
use std::process::Command;

/// The client: Health, CreateSession, Append and a greedy 4-token Generate stream, on a channel
/// made with nothing but the socket's address. Prints one JSON line of what it saw.
const CLIENT: &str = r#"
import json, sys
import grpc
from agentd.v1 import agentd_pb2 as pb, agentd_pb2_grpc as rpc

channel = grpc.insecure_channel("unix:" + sys.argv[1])
stub = rpc.AgentdStub(channel)
health = stub.Health(pb.HealthRequest(), timeout=60)
session = stub.CreateSession(pb.CreateSessionRequest(), timeout=60)
appended = stub.Append(pb.AppendRequest(
    session_id=session.session_id,
    messages=[pb.Message(role="user", content="Say hello.")],
    add_generation_prompt=True,
), timeout=60)
tokens, done = [], None
for ev in stub.Generate(pb.GenerateRequest(
    session_id=session.session_id, max_tokens=4, sampling=pb.Sampling(temperature=0.0),
), timeout=120):
    if ev.HasField("token"):
        tokens.append(ev.token.id)
    else:
        done = ev.done
print(json.dumps({
    "ready": health.ready,
    "session": session.session_id,
    "log": appended.tokens,
    "tokens": tokens,
    "generated": done.generated_tokens,
    "finish": done.finish_reason,
}))
"#;

/// Why the Python side cannot run here, if it cannot.
fn python_missing() -> Option<String> {
    match Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
    {
        Err(e) => Some(format!("no python3 ({e})")),
        Ok(o) if !o.status.success() => Some(format!(
            "python3 lacks grpcio or grpcio-tools (pip install grpcio grpcio-tools): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// Generates the Python stubs of the repository's `.proto` into `out`.
fn python_stubs(out: &Path) {
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/wire/proto");
    let o = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("agentd/v1/agentd.proto")
        .output()
        .expect("running grpc_tools.protoc");
    assert!(
        o.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_python_with_default_settings_calls_over_the_unix_socket() {
    if let Some(why) = python_missing() {
        println!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    python_stubs(dir.path());
    let socket = dir.path().join("agentd.sock");
    let _daemon = Daemon::start(&socket, &["--disk-cache", "0"]).await;
    let script = dir.path().join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let socket_arg = socket.clone();
    let o = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(&script)
            .arg(&socket_arg)
            .env("PYTHONPATH", script.parent().unwrap())
            .output()
            .expect("running the Python client")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "the grpc-python client failed: {stderr}"
    );
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).expect("the client's JSON");
    assert_eq!(seen["ready"], true, "{seen}");
    assert!(seen["session"].as_u64().unwrap() > 0, "{seen}");
    assert!(seen["log"].as_u64().unwrap() > 0, "{seen}");
    let tokens = seen["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() <= 4, "{seen}");
    assert_eq!(
        seen["generated"].as_u64().unwrap() as usize,
        tokens.len(),
        "{seen}"
    );
}
