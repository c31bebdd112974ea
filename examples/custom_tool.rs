//! A custom tool: an async function over a serde type becomes a tool whose JSON schema (and
//! descriptions, from the doc comments) the model's calls must match.
//!
//! `cargo run -p agentd-examples --example custom_tool`

use agentd_sdk::agent::{tool_fn, Agent, ToolChoice};
use agentd_sdk::Client;

/// Where to look up the time.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct TimeZone {
    /// An offset from UTC in hours, e.g. 2 or -5.
    utc_offset: i32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect_default().await?;
    let agent = Agent::builder("You tell the time. Use the tool.")
        .tool(tool_fn(
            "current_hour",
            "The hour of the day at a UTC offset.",
            |tz: TimeZone| async move {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|e| e.to_string())?
                    .as_secs() as i64;
                let hour = (secs / 3600 + i64::from(tz.utc_offset)).rem_euclid(24);
                Ok::<_, String>(format!("{hour}:00"))
            },
        ))
        .tool_choice(ToolChoice::RequiredFirst)
        .build();
    let session = agent.session(&client).await?;
    let out = agent
        .run(&session, "What hour is it in New York (UTC-5)?")
        .await?;
    for m in &out.transcript {
        println!("{}: {}", m.role, m.content);
    }
    Ok(())
}
