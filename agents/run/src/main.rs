//! `agentd-run <agent> "task"`: runs one of the agents in `agents/` against the daemon on the
//! socket, or, when none answers there, against a daemon started in this process on the model
//! `--model NAME|PATH` names (a catalog name or a GGUF file; default: the default model). Its
//! prefixes persist in the default disk cache, so a second run starts warm.
//! `agentd-run bench-agents` measures concurrent agent sessions the same way.
//!
//! This is the one binary that links the daemon's crates and the agents together; the daemon's
//! own crates never depend on the SDK or the agents.

mod bench;

use agentd_engine::model::LoadOptions;
use agentd_engine::LoadedModel;
use agentd_scheduler::{DiskTierConfig, SchedulerConfig, SchedulerHandle};
use agentd_sdk::Client;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;

/// Run an agent against agentd, starting a daemon in this process when none is running.
#[derive(Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// The model of a daemon started here: a catalog name (`agentd model list`), pulled on
    /// first use, or the path of a GGUF file; default: smollm2-135m.
    #[arg(long, global = true, env = "AGENTD_MODEL", value_name = "NAME|PATH")]
    model: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Concurrent agent sessions running tool loops against a daemon in this process: tokens
    /// computed vs reused, turn latency, tool-call validity with and without the constraint,
    /// constraint cost per token; printed as JSON.
    BenchAgents {
        /// Concurrent sessions.
        #[arg(long, default_value_t = 8)]
        sessions: usize,
        /// Generations per session.
        #[arg(long, default_value_t = 3)]
        turns: usize,
        /// Tokens per generation at most.
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// Speculative decoding: on, off, or both (each on its own daemon).
        #[arg(long, default_value = "both", value_parser = ["on", "off", "both"])]
        speculate: String,
    },
}

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

/// Which agent on which task.
#[derive(Args)]
pub struct RunArgs {
    /// The agent.
    #[arg(required = true)]
    agent: Option<AgentName>,
    /// The task, in words.
    #[arg(required = true)]
    task: Option<String>,
    /// The folder the researcher (and the coordinator's researcher) may read.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// A running daemon's socket (default as for `serve`); without one there, a daemon is
    /// started in this process.
    #[arg(long, env = "AGENTD_SOCKET")]
    socket: Option<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let model = cli.model.clone();
    let load = move || -> Result<LoadedModel> {
        let value = model.unwrap_or_else(|| agentd_engine::catalog::DEFAULT_MODEL.into());
        let path = agentd_engine::catalog::resolve_model(value.as_os_str(), &mut |m| {
            eprintln!("agentd-run: {m}")
        })?;
        LoadedModel::load(&path, LoadOptions::default())
            .with_context(|| format!("loading {}", path.display()))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Some(Command::BenchAgents {
            sessions,
            turns,
            max_tokens,
            speculate,
        }) => {
            let speculation: &[bool] = match speculate.as_str() {
                "on" => &[true],
                "off" => &[false],
                _ => &[false, true],
            };
            let engine = Arc::new(load()?);
            let cfg = bench::AgentBenchConfig {
                sessions,
                turns,
                max_tokens,
            };
            let report = rt
                .block_on(bench::run_agent_bench(
                    engine,
                    SchedulerConfig::default(),
                    &cfg,
                    speculation,
                ))
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        None => run(&rt, cli.run, load),
    }
}

/// Runs the agent; `load` loads the model when a daemon must be started here.
fn run(
    rt: &tokio::runtime::Runtime,
    args: RunArgs,
    load: impl FnOnce() -> Result<LoadedModel>,
) -> Result<()> {
    let (Some(agent), Some(task)) = (args.agent, args.task.clone()) else {
        anyhow::bail!("give an agent and a task, e.g. calculator \"What is 12 times 7?\"");
    };
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
                let (c, handle, dir) = start_local(Arc::new(load()?)).await?;
                local = Some((handle, dir));
                c
            }
        };
        let agent = match agent {
            AgentName::Calculator => agentd_agents::calculator(),
            AgentName::FsResearcher => agentd_agents::fs_researcher(args.root.clone())
                .with_context(|| format!("--root {}", args.root.display()))?,
            AgentName::Coordinator => agentd_agents::coordinator(client.clone(), args.root.clone())
                .with_context(|| format!("--root {}", args.root.display()))?,
        };
        let answer = agentd_agents::stream_to_stdout(&agent, &client, &task).await?;
        println!("\nanswer: {answer}");
        if let Some((handle, _dir)) = local {
            handle.flush().await?;
        }
        Ok(())
    })
}

async fn start_local(
    engine: Arc<LoadedModel>,
) -> Result<(Client, SchedulerHandle, agentd_service::serve::LocalServer)> {
    let store = agentd_store::StoreConfig {
        dir: agentd_engine::model_files::default_cache_dir(&engine.path)?,
        budget: 2 << 30,
    };
    let cfg = SchedulerConfig {
        store: Some(DiskTierConfig {
            store,
            digests: engine.digests()?,
        }),
        ..SchedulerConfig::default()
    };
    let handle = SchedulerHandle::spawn(Box::new(engine.cpu_executor()), cfg)?;
    let local = agentd_service::serve::spawn_local(handle.clone(), engine)?;
    let client = Client::connect(&local.socket).await?;
    Ok((client, handle, local))
}
