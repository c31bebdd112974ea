//! Many sessions on one system prompt: it is computed once (a registered, pinned prefix) and
//! every session's first turn reuses it. Prints each session's cached tokens and the daemon's
//! hit rate.
//!
//! `cargo run -p agentd-examples --example shared_prefix`

use agentd_sdk::{Client, Event, GenerateOptions, Message};
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect_default().await?;
    let system = Message::system(
        "You are a terse assistant for a logistics company. Answer in one sentence.".repeat(8),
    );
    let prefix = client.register_prefix_messages(&[system]).await?;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let s = client.create_session(Some(prefix), vec![]).await?;
            s.append_messages(
                &[Message::user(format!("Ship {i} is late. What now?"))],
                true,
            )
            .await?;
            let mut stream = s
                .generate(&GenerateOptions::greedy().max_tokens(24))
                .await?;
            let mut cached = 0;
            while let Some(ev) = stream.next().await {
                if let Event::Done(u) = ev? {
                    cached = u.cached_tokens;
                }
            }
            s.close().await?;
            anyhow::Ok(cached)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        println!("session {i}: {} prompt tokens from the cache", t.await??);
    }
    let stats = client.stats().await?;
    println!(
        "hit rate {:.2}, {} tokens in the tree",
        stats.hit_rate, stats.tree_tokens
    );
    Ok(())
}
