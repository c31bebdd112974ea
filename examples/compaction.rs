//! Context compression: an agent whose tool returns long log excerpts runs for more tokens
//! than its budget. Old results are masked, then older turns summarised into a new epoch; the
//! system prompt and tool list are never rewritten, so every turn still starts from the cached
//! prefix. Prints each compaction and each turn's cached tokens.
//!
//! `cargo run -p agentd-examples --example compaction`

use agentd_sdk::agent::{tool_fn, Agent, AgentEvent, ContextPolicy, ToolChoice};
use agentd_sdk::{Client, GenerateOptions};
use tokio_stream::StreamExt;

/// Which hour of the server log to read.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Hour {
    /// The hour, 0 to 23.
    hour: u32,
}

/// Sixty lines of a made-up server log for `hour`, then where to go next (as a paginated
/// API would say).
fn log_excerpt(hour: u32) -> String {
    let mut lines: Vec<String> = (0..60)
        .map(|m| {
            let status = if (hour * 60 + m).is_multiple_of(17) {
                500
            } else {
                200
            };
            format!(
                "{hour:02}:{m:02} GET /api/orders/{} {status}",
                hour * 100 + m
            )
        })
        .collect();
    lines.push(format!(
        "(end of hour {hour}; next: read_log with hour {})",
        hour + 1
    ));
    lines.join("\n")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect_default().await?;
    let agent =
        Agent::builder("You audit server logs hour by hour and count the errors (status 500).")
            .tool(tool_fn(
                "read_log",
                "Reads one hour of the server log.",
                |h: Hour| async move { Ok::<_, String>(log_excerpt(h.hour)) },
            ))
            .options(GenerateOptions::greedy().max_tokens(48))
            .tool_choice(ToolChoice::Always)
            .max_turns(8)
            // A small budget, so this short demo compacts; by default it is the model's context.
            .context(
                ContextPolicy::new()
                    .budget(2_000)
                    .keep_results(2)
                    .keep_turns(1),
            )
            .build();
    let prefix_tokens = {
        agent.prefix(&client).await?;
        client.list_prefixes(false).await?[0].tokens
    };
    println!("prefix: {prefix_tokens} tokens, pinned");
    let session = agent.session(&client).await?;
    let mut events = agent.run_stream(
        session.clone(),
        "Read the log for hours 0 to 7 and count the errors.".into(),
    );
    while let Some(ev) = events.next().await {
        match ev {
            AgentEvent::ToolCallStarted { name, arguments } => println!("→ {name}({arguments})"),
            AgentEvent::TurnFinished(u) => println!(
                "  turn: {} prompt tokens, {} from the cache",
                u.prompt_tokens, u.cached_tokens
            ),
            AgentEvent::Compacted(c) => println!("[compaction] {c}"),
            AgentEvent::Done(out) => println!(
                "done: {} turns, {} compactions, answer {:?}",
                out.usages.len(),
                out.compactions.len(),
                out.answer
            ),
            AgentEvent::Failed(e) => anyhow::bail!(e),
            _ => {}
        }
    }
    let (log, epoch) = session.tokens().await?;
    println!("the session now holds {} tokens, epoch {epoch}", log.len());
    session.close().await?;
    Ok(())
}
