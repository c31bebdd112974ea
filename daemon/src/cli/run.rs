//! `agentd run AGENT TASK`: the bundled agents (`agentd-agents`) through the `agentd-run`
//! program that is built and installed beside `agentd`. The agents live in their own crate on
//! the public SDK, so `agentd` does not link them; this subcommand hands its arguments over,
//! with the global `--model`, and exits with the agent's status.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

/// The arguments of `agentd run`: everything after `run` goes to `agentd-run`.
#[derive(Args)]
pub struct RunArgs {
    /// The agent (calculator, fs-researcher, coordinator), the task, and `agentd-run`'s own
    /// options (`--model NAME|PATH`, `--root DIR`…).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub args: Vec<OsString>,
}

/// The `agentd-run` program: beside this executable, else on `PATH`.
fn agent_runner() -> Result<PathBuf> {
    let name = format!("agentd-run{}", std::env::consts::EXE_SUFFIX);
    let exe = std::env::current_exe().context("locating the agentd executable")?;
    if let Some(dir) = exe.parent() {
        let beside = dir.join(&name);
        if beside.is_file() {
            return Ok(beside);
        }
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(&name))
        .find(|p| p.is_file());
    match on_path {
        Some(p) => Ok(p),
        None => bail!(
            "`agentd run` needs the agentd-run program, which is neither beside {} nor on \
             PATH: build it with `cargo build --release -p agentd-run` (or run \
             `cargo run --release -p agentd-run -- AGENT TASK`)",
            exe.display()
        ),
    }
}

/// Runs `agentd-run` with `args`, passing the global `--model` on.
pub fn run(args: RunArgs, model: Option<PathBuf>) -> Result<()> {
    let runner = agent_runner()?;
    let mut cmd = Command::new(&runner);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    cmd.args(&args.args);
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", runner.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}
