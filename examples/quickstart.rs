//! Connect to a running `agentd serve`, open a session, stream a reply.
//!
//! `cargo run -p agentd-examples --example quickstart`

use agentd_sdk::{Client, Event, GenerateOptions, Message};
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect_default().await?;
    let session = client.create_session(None, vec![]).await?;
    session
        .append_messages(&[Message::user("Name three uses of a radix tree.")], true)
        .await?;
    let mut stream = session
        .generate(&GenerateOptions::default().max_tokens(96))
        .await?;
    while let Some(event) = stream.next().await {
        match event? {
            Event::Token { text, .. } => print!("{text}"),
            Event::Done(usage) => println!("\n[{usage:?}]"),
        }
    }
    session.close().await?;
    Ok(())
}
