//! `calculator "question"`: the calculator and units agent against the default daemon socket
//! (or $AGENTD_SOCKET), streaming what happens.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(task) = std::env::args().nth(1) else {
        anyhow::bail!("usage: calculator \"question\"");
    };
    let client = agentd_sdk::Client::connect_default().await?;
    let answer =
        agentd_agents::stream_to_stdout(&agentd_agents::calculator(), &client, &task).await?;
    println!("\nanswer: {answer}");
    Ok(())
}
