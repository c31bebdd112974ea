//! KV events and the index against a real six-node Redis Cluster: what two publishers announce
//! reaches a follower's index; a restarted publisher's old entries are purged by its new epoch;
//! a publisher that stops has its entries purged when its heartbeat expires; a malformed entry
//! written by someone else is skipped. Skipped, saying so, only when `redis-server` is not
//! installed (`.ci/run` installs it).

use agentd_kvtier::events::{
    heartbeat_key, EventKind, EventPublisher, EventSink, EventsConfig, IndexFollower, KvIndex,
    STREAM_KEY,
};
use agentd_kvtier::{PageKey, PageRun, RedisTierConfig, TierNamespace};
use agentd_store::format::Fingerprint;
use agentd_store::Namespace;
use std::sync::{Arc, RwLock};
use std::time::Duration;

mod support;
use support::cluster::{redis_installed, wait_for, Cluster};

fn fingerprint() -> Fingerprint {
    Fingerprint {
        format_version: 2,
        model_sha256: "model".into(),
        kv_dtype: "f16".into(),
        page_size: 16,
        layers: 2,
        kv_heads: 2,
        head_dim: 8,
        tokenizer_digest: "tok".into(),
        template_digest: "tpl".into(),
    }
}

fn namespace() -> TierNamespace {
    TierNamespace::new(fingerprint(), Namespace::Tenant(7))
}

fn config(cluster: &Cluster) -> EventsConfig {
    let mut redis = RedisTierConfig::new(cluster.urls());
    redis.timeout = Duration::from_millis(500);
    redis.reconnect_every = Duration::from_millis(200);
    EventsConfig {
        heartbeat_ttl: Duration::from_millis(900),
        poll: Duration::from_millis(50),
        ..EventsConfig::new(redis)
    }
}

fn publisher(cfg: &EventsConfig, node: u8, epoch: u64) -> EventPublisher {
    let p = EventPublisher::start(cfg.clone(), node, epoch).expect("start a publisher");
    p.set_fingerprint(fingerprint());
    p
}

fn matched(index: &Arc<RwLock<KvIndex>>, node: u8, keys: &[PageKey]) -> usize {
    index.read().unwrap().matched_pages(node, keys)
}

#[test]
fn events_reach_the_index_and_restarts_and_expired_heartbeats_purge_a_nodes_entries() {
    if !redis_installed() {
        eprintln!(
            "SKIPPED: redis-server/redis-cli are not installed (apt-get install redis-server)"
        );
        return;
    }
    let cluster = Cluster::start();
    let cfg = config(&cluster);
    let ns = namespace();
    let tokens: Vec<u32> = (0..16 * 10 + 3).map(|t| t * 7 + 2).collect();
    let keys = PageRun::new(&ns, &tokens).keys().to_vec();
    let limit = Duration::from_secs(10);

    let follower = IndexFollower::start(cfg.clone()).expect("start a follower");
    let index = follower.index();

    // Node 1 holds 10 pages, node 2 the first 4 of them.
    let one = publisher(&cfg, 1, 1_000);
    let two = publisher(&cfg, 2, 2_000);
    one.publish(EventKind::Stored, &ns, &tokens, 0);
    two.publish(EventKind::Stored, &ns, &tokens[..16 * 4], 0);
    wait_for("node 1's pages in the index", limit, || {
        matched(&index, 1, &keys) == 10 && matched(&index, 2, &keys) == 4
    });
    assert_eq!(index.read().unwrap().fingerprint(1), Some(&fingerprint()));
    assert_eq!(index.read().unwrap().held_anywhere(&keys), 10);

    // Node 1 stops holding pages 6..: its run is cut there.
    one.publish(EventKind::Removed, &ns, &tokens, 6);
    wait_for("node 1's removal", limit, || matched(&index, 1, &keys) == 6);

    // Node 1 restarts (a newer epoch): what it held before is gone from the index, before it
    // announces anything new.
    drop(one);
    let one = publisher(&cfg, 1, 3_000);
    wait_for("node 1's new epoch", limit, || {
        index.read().unwrap().epoch(1) == Some(3_000)
    });
    assert_eq!(matched(&index, 1, &keys), 0);
    assert_eq!(index.read().unwrap().node_pages(1), 0);
    assert_eq!(matched(&index, 2, &keys), 4);

    // A follower started now replays the stream and ends with the same view: node 1's old
    // epoch's events are ignored.
    let late = IndexFollower::start(cfg.clone()).expect("start a second follower");
    let late_index = late.index();
    wait_for("the late follower's view", limit, || {
        let i = late_index.read().unwrap();
        i.matched_pages(2, &keys) == 4 && i.epoch(1) == Some(3_000)
    });
    assert_eq!(matched(&late_index, 1, &keys), 0);

    // A malformed entry (someone else's) is skipped, and events after it still arrive.
    let mut conn = redis::cluster::ClusterClient::new(cluster.urls())
        .and_then(|c| c.get_connection())
        .expect("a raw connection");
    let _: String = redis::cmd("XADD")
        .arg(STREAM_KEY)
        .arg("*")
        .arg("node")
        .arg("not-a-node")
        .query(&mut conn)
        .expect("XADD");
    one.publish(EventKind::Stored, &ns, &tokens[..32], 0);
    wait_for("node 1's new pages", limit, || {
        matched(&index, 1, &keys) == 2
    });

    // Node 2 stops without a word: its heartbeat expires and its entries leave the index.
    drop(two);
    wait_for("node 2's heartbeat expiring", limit, || {
        !index.read().unwrap().is_alive(2)
    });
    assert_eq!(matched(&index, 2, &keys), 0);
    assert_eq!(index.read().unwrap().node_pages(2), 0);
    let hb: Option<Vec<u8>> = redis::cmd("GET")
        .arg(heartbeat_key(2))
        .query(&mut conn)
        .expect("GET");
    assert!(hb.is_none(), "node 2's heartbeat key expired");
    assert_eq!(one.stats().dropped, 0);
    assert!(one.stats().published >= 1);
}
