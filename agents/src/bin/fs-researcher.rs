//! `fs-researcher ROOT "question"`: the file-system researcher against the default daemon
//! socket (or $AGENTD_SOCKET), streaming what happens.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(root), Some(task)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: fs-researcher ROOT \"question\"");
    };
    let client = agentd_sdk::Client::connect_default().await?;
    let agent = agentd_agents::fs_researcher(root.into())?;
    let answer = agentd_agents::stream_to_stdout(&agent, &client, &task).await?;
    println!("\nanswer: {answer}");
    Ok(())
}
