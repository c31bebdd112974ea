//! Real agents built only on the public SDK ([`agentd_sdk::agent`]):
//!
//! - [`fs_researcher`]: lists, reads and searches files under one root; paths outside it are
//!   refused.
//! - [`calculator`]: evaluates expressions with exmex and converts units.
//! - [`coordinator`]: delegates to the other two, exposed to it as tools.
//!
//! [`stream_to_stdout`] runs one and prints what happens.

pub mod calc;
pub mod fs;

use agentd_sdk::agent::{tool_fn, Agent, AgentEvent, RunOutput, ToolChoice};
use agentd_sdk::{Client, GenerateOptions};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_stream::StreamExt;

fn options() -> GenerateOptions {
    GenerateOptions::greedy().max_tokens(120)
}

/// The file-system researcher over `root`.
pub fn fs_researcher(root: PathBuf) -> std::io::Result<Agent> {
    let root = Arc::new(fs::Root::new(root)?);
    let (r1, r2, r3) = (root.clone(), root.clone(), root);
    Ok(Agent::builder(
        "You are a research assistant for a folder of files. List, read and search files to answer; cite the files you used.",
    )
    .tool(tool_fn("list_files", "Lists a folder under the root.", move |a: fs::PathArg| {
        let r = r1.clone();
        async move { r.list(&a.path) }
    }))
    .tool(tool_fn("read_file", "Reads a text file under the root.", move |a: fs::PathArg| {
        let r = r2.clone();
        async move { r.read(&a.path) }
    }))
    .tool(tool_fn("search", "Finds lines containing a word, in every file under the root.", move |a: fs::SearchArg| {
        let r = r3.clone();
        async move { r.search(&a.word) }
    }))
    .options(options())
    .tool_choice(ToolChoice::RequiredFirst)
    .max_calls_per_reply(1)
    .max_turns(4)
    .build())
}

/// The calculator and units agent.
pub fn calculator() -> Agent {
    Agent::builder("You are a calculator. Use the tools for every computation and unit conversion, then state the result with its unit.")
        .tool(tool_fn("evaluate", "Evaluates an arithmetic expression such as (2+3)*4^2 or sqrt(2).", |a: calc::ExprArg| async move {
            calc::evaluate(&a.expression)
        }))
        .tool(tool_fn("convert", "Converts a value between units of length, mass, time or temperature.", |a: calc::ConvertArg| async move {
            calc::convert(a.value, &a.from, &a.to)
        }))
        .options(options())
        .tool_choice(ToolChoice::RequiredFirst)
        .max_calls_per_reply(1)
        .max_turns(4)
        .build()
}

/// A question for a sub-agent.
#[derive(serde::Deserialize, schemars::JsonSchema)]
pub struct Question {
    /// The question, in full.
    pub question: String,
}

/// What a sub-agent's run gives its caller: its answer, or, when it ended without one (the
/// turn budget ran out on calls), what its last tool call returned.
fn delegated_answer(out: &RunOutput) -> String {
    if !out.answer.is_empty() {
        return out.answer.clone();
    }
    match out
        .transcript
        .iter()
        .rev()
        .find(|m| m.role == agentd_sdk::Role::Tool)
    {
        Some(m) => format!("(no final answer; its last tool result:) {}", m.content),
        None => "(the sub-agent gave no answer)".into(),
    }
}

/// The coordinator: `calculator` and `fs_researcher` (over `root`) as tools; each delegated
/// question runs in a fresh session of the sub-agent on `client`'s daemon.
pub fn coordinator(client: Client, root: PathBuf) -> std::io::Result<Agent> {
    let calc = calculator();
    let research = fs_researcher(root)?;
    let delegate = |agent: Agent, client: Client| {
        move |q: Question| {
            let (agent, client) = (agent.clone(), client.clone());
            async move {
                let s = agent.session(&client).await.map_err(|e| e.to_string())?;
                let out = agent
                    .run(&s, &q.question)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = s.close().await;
                Ok::<_, String>(delegated_answer(&out))
            }
        }
    };
    Ok(Agent::builder("You are a coordinator. Send arithmetic to ask_calculator and questions about the files to ask_researcher, then combine their answers.")
        .tool(tool_fn("ask_calculator", "Asks the calculator agent.", delegate(calc, client.clone())))
        .tool(tool_fn("ask_researcher", "Asks the file researcher agent.", delegate(research, client)))
        .options(options())
        .tool_choice(ToolChoice::RequiredFirst)
        .max_calls_per_reply(2)
        .max_turns(3)
        .tool_timeout(std::time::Duration::from_secs(120))
        .build())
}

/// Runs `agent` on `task` in a new session, printing text, tool calls and results as they
/// happen; returns the final answer.
pub async fn stream_to_stdout(
    agent: &Agent,
    client: &Client,
    task: &str,
) -> anyhow::Result<String> {
    use std::io::Write;
    let s = agent.session(client).await?;
    let mut events = agent.run_stream(s.clone(), task.to_owned());
    let mut answer = None;
    while let Some(ev) = events.next().await {
        match ev {
            AgentEvent::Text(t) => print!("{t}"),
            AgentEvent::ToolCallStarted { name, arguments } => println!("\n→ {name}({arguments})"),
            AgentEvent::ToolCallFinished {
                name,
                result,
                is_error,
            } => {
                println!(
                    "← {name}{}: {result}",
                    if is_error { " (error)" } else { "" }
                )
            }
            AgentEvent::TurnFinished(u) => println!(
                "\n[turn: {} prompt tokens, {} cached, {} generated, {}]",
                u.prompt_tokens, u.cached_tokens, u.generated_tokens, u.finish
            ),
            AgentEvent::Compacted(c) => println!("\n[context: {c}]"),
            AgentEvent::Done(out) => answer = Some(out.answer),
            AgentEvent::Failed(e) => anyhow::bail!(e),
        }
        std::io::stdout().flush()?;
    }
    let _ = s.close().await;
    answer.ok_or_else(|| anyhow::anyhow!("the run ended without an answer"))
}
