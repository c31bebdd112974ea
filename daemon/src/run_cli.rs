//! `agentd run <agent> "task"`: runs one of the agents in agents/ against the daemon on the
//! socket, or, when none answers there, against a daemon started in this process on the default
//! model (its prefixes persist in the default disk cache, so a second run starts warm).

use agentd::scheduler::{EngineHandle, SchedulerConfig};
use agentd::service::serve::spawn_local;
use agentd_sdk::Client;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// Which agent.
#[derive(Clone, Copy, ValueEnum)]
pub enum AgentName {
    /// Evaluates expressions and converts units with tools.
    Calculator,
    /// Lists, reads and searches files under --root.
    FsResearcher,
    /// Delegates to the calculator and the researcher.
    Coordinator,
}

/// `agentd run`.
#[derive(Args)]
pub struct RunArgs {
    /// The agent.
    agent: AgentName,
    /// The task, in words.
    task: String,
    /// The folder the researcher (and the coordinator's researcher) may read.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// A running daemon's socket (default as for `serve`); without one there, a daemon is
    /// started in this process.
    #[arg(long, env = "AGENTD_SOCKET")]
    socket: Option<PathBuf>,
}

/// Runs the agent; `load` loads the engine when a daemon must be started here.
pub fn run(args: RunArgs, load: impl FnOnce() -> Result<agentd::generate::Engine>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let socket = args
            .socket
            .clone()
            .unwrap_or_else(agentd_sdk::default_socket_path);
        let mut local = None;
        let client = match Client::connect(&socket).await {
            Ok(c) if c.health().await.is_ok() => c,
            _ => {
                eprintln!(
                    "agentd: no daemon on {}; starting one here",
                    socket.display()
                );
                let (c, handle, dir) = start_local(load()?).await?;
                local = Some((handle, dir));
                c
            }
        };
        let agent = match args.agent {
            AgentName::Calculator => agentd_agents::calculator(),
            AgentName::FsResearcher => agentd_agents::fs_researcher(args.root.clone())
                .with_context(|| format!("--root {}", args.root.display()))?,
            AgentName::Coordinator => agentd_agents::coordinator(client.clone(), args.root.clone())
                .with_context(|| format!("--root {}", args.root.display()))?,
        };
        let answer = agentd_agents::stream_to_stdout(&agent, &client, &args.task).await?;
        println!("\nanswer: {answer}");
        if let Some((handle, _dir)) = local {
            handle.flush().await?;
        }
        Ok(())
    })
}

async fn start_local(
    engine: agentd::generate::Engine,
) -> Result<(Client, EngineHandle, agentd::service::serve::LocalServer)> {
    let store = agentd::store::StoreConfig {
        dir: agentd::model_store::data_dir()?.join("kv-cache"),
        budget: 2 << 30,
    };
    let cfg = SchedulerConfig {
        store: Some(store),
        ..SchedulerConfig::default()
    };
    let handle =
        EngineHandle::spawn(std::sync::Arc::new(engine), cfg).map_err(|e| anyhow::anyhow!(e))?;
    let local = spawn_local(handle.clone())?;
    let client = Client::connect(&local.socket).await?;
    Ok((client, handle, local))
}
