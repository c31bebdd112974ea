//! `agentd serve --kv-tier`: the shared KV tier on a Redis Cluster, for the scheduler.

use agentd_engine::{LoadedModel, ModelDigests};
use agentd_kvtier::events::{EventPublisher, EventSink, EventsConfig};
use agentd_kvtier::{RedisTier, RedisTierConfig};
use agentd_scheduler::SharedTierConfig;
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;

/// Exports queued at most before more are dropped (each is one run's pages).
const EXPORT_QUEUE: usize = 64;

/// The shared tier on the cluster whose seed nodes `nodes` lists (comma separated URLs), or
/// `None` when `nodes` is absent or empty. `digests`: the model's, if already computed for the
/// disk tier. With a node number (`--node`), the daemon also publishes its KV events and
/// heartbeat under it, with restart epoch `epoch`. An unreachable cluster is not an error
/// (logged: its calls fail fast until it comes back); a malformed node list is.
pub fn shared_tier(
    model: &LoadedModel,
    digests: Option<&ModelDigests>,
    nodes: Option<&str>,
    timeout_ms: u64,
    node: Option<u8>,
    epoch: u64,
) -> Result<Option<SharedTierConfig>> {
    let nodes = parse_nodes(nodes.unwrap_or_default())?;
    if nodes.is_empty() {
        tracing::info!("shared KV tier off");
        return Ok(None);
    }
    let digests = match digests {
        Some(d) => d.clone(),
        None => model
            .digests()
            .context("hashing the model for the shared KV tier")?,
    };
    let cfg = RedisTierConfig {
        timeout: Duration::from_millis(timeout_ms),
        ..RedisTierConfig::new(nodes.clone())
    };
    let tier = RedisTier::open(cfg.clone()).context("--kv-tier")?;
    let events = match node {
        Some(n) => {
            let publisher = EventPublisher::start(EventsConfig::new(cfg), n, epoch)
                .context("the KV events publisher")?;
            tracing::info!(node = n, epoch, "publishing KV events and a heartbeat");
            Some(Arc::new(publisher) as Arc<dyn EventSink>)
        }
        None => {
            tracing::info!("no --node: KV events are not published (agentd route cannot see this daemon's cache)");
            None
        }
    };
    if tier.is_connected() {
        tracing::info!(nodes = ?nodes, timeout_ms, "shared KV tier on: Redis Cluster reachable");
        eprintln!("agentd: shared KV tier on {} (reachable)", nodes.join(","));
    } else {
        tracing::warn!(nodes = ?nodes, timeout_ms, "shared KV tier on, but the Redis Cluster is unreachable for now: requests compute what it would hold");
        eprintln!(
            "agentd: shared KV tier on {} (unreachable for now)",
            nodes.join(",")
        );
    }
    Ok(Some(SharedTierConfig {
        tier: Arc::new(tier),
        digests,
        export_queue: EXPORT_QUEUE,
        events,
    }))
}

/// The seed nodes in `--kv-tier`'s value: comma-separated `redis://` URLs, blanks ignored.
fn parse_nodes(value: &str) -> Result<Vec<String>> {
    let nodes: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(bad) = nodes.iter().find(|n| !n.starts_with("redis://")) {
        anyhow::bail!("--kv-tier: {bad:?} is not a redis://HOST:PORT URL");
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::parse_nodes;

    #[test]
    fn kv_tier_nodes_are_comma_separated_redis_urls() {
        assert_eq!(
            parse_nodes(" redis://a:1, redis://b:2 ,").unwrap(),
            ["redis://a:1", "redis://b:2"]
        );
        assert!(parse_nodes("").unwrap().is_empty());
        let e = parse_nodes("redis://a:1,b:2").unwrap_err().to_string();
        assert!(e.contains("\"b:2\""), "{e}");
    }
}
