//! A gRPC channel to a daemon's Unix socket, for the binary's client-side subcommands and
//! benchmarks (the daemon's crates do not depend on the SDK).

use agentd_wire::proto::agentd_client::AgentdClient;
use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use std::path::Path;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated client over a connection to the socket at `path`.
pub async fn connect(path: &Path) -> Result<AgentdClient<Channel>> {
    let socket = path.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = Endpoint::try_from("http://agentd.local")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .with_context(|| format!("{} (is `agentd serve` running?)", path.display()))?;
    Ok(AgentdClient::new(channel))
}
