//! `coordinator ROOT "task"`: the coordinator (calculator and file researcher over ROOT as
//! tools) against the default daemon socket (or $AGENTD_SOCKET), streaming what happens.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(root), Some(task)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: coordinator ROOT \"task\"");
    };
    let client = agentd_sdk::Client::connect_default().await?;
    let agent = agentd_agents::coordinator(client.clone(), root.into())?;
    let answer = agentd_agents::stream_to_stdout(&agent, &client, &task).await?;
    println!("\nanswer: {answer}");
    Ok(())
}
