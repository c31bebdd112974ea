//! The Redis tier against a real six-node Redis Cluster (three primaries, three replicas) that
//! the test starts on free loopback ports and stops at the end, panics included. Skipped, saying
//! so, only when `redis-server` is not installed (`.ci/run` installs it).

use agentd_kvtier::ValueError;
use agentd_kvtier::{KvTier, PageRun, RedisTier, RedisTierConfig, TierError, TierNamespace};
use agentd_store::format::Fingerprint;
use agentd_store::Namespace;

mod support;
use std::time::{Duration, Instant};
use support::cluster::{redis_cli, redis_installed, Cluster};

/// 2 layers, 2 KV heads of 8, 16 tokens a page: 2,048 bytes a page in f16.
fn namespace(tenant: u64) -> TierNamespace {
    let fp = Fingerprint {
        format_version: 2,
        model_sha256: "model".into(),
        kv_dtype: "f16".into(),
        page_size: 16,
        layers: 2,
        kv_heads: 2,
        head_dim: 8,
        tokenizer_digest: "tok".into(),
        template_digest: "tpl".into(),
    };
    TierNamespace::new(fp, Namespace::Tenant(tenant))
}

fn page(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 13 + j * 7) as u8).collect()
}

/// A raw connection, as another writer (or damage) would touch the cluster.
fn raw(cluster: &Cluster) -> redis::cluster::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.urls())
        .and_then(|c| c.get_connection())
        .expect("a raw cluster connection")
}

#[test]
fn the_redis_tier_serves_checked_pages_across_a_cluster_and_survives_a_killed_primary() {
    if !redis_installed() {
        eprintln!(
            "SKIPPED: redis-server/redis-cli are not installed (apt-get install redis-server)"
        );
        return;
    }
    let mut cluster = Cluster::start();
    let mut cfg = RedisTierConfig::new(cluster.urls());
    cfg.timeout = Duration::from_millis(500);
    cfg.reconnect_every = Duration::from_millis(200);
    let bound = cfg.timeout * 3;
    let tier = RedisTier::open(cfg).expect("open the tier");
    assert!(tier.is_connected());

    // Two chains of 40 pages (five segments each), stored and found in full.
    let ns = namespace(1);
    let tokens: Vec<u32> = (0..16 * 40 + 5).map(|t| t * 3 + 1).collect();
    let run = PageRun::new(&ns, &tokens);
    assert_eq!(run.len(), 40);
    let pages: Vec<Vec<u8>> = (0..40).map(|i| page(i, ns.page_bytes())).collect();
    let refs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    tier.put_many(&ns, &run, 0, &refs).expect("put a run");
    let other_tokens: Vec<u32> = tokens.iter().map(|t| t + 7).collect();
    let other_run = PageRun::new(&ns, &other_tokens);
    tier.put_many(&ns, &other_run, 0, &refs)
        .expect("put another run");
    assert_eq!(tier.lookup(&ns, &run, 0).unwrap(), 40);
    assert_eq!(tier.lookup(&ns, &run, 30).unwrap(), 10);
    let got = tier.get_many(&ns, &run, 0..40);
    assert_eq!(got.len(), 40);
    assert_eq!(tier.get_many(&ns, &run, 38..usize::MAX).len(), 2);
    for (i, g) in got.into_iter().enumerate() {
        assert_eq!(g.unwrap().as_deref(), Some(&pages[i][..]), "page {i}");
    }
    assert!(
        cluster.primaries_with_keys() >= 2,
        "the segments' hash tags spread the pages over the primaries"
    );

    // Another tenant asking for the same tokens finds nothing.
    let ns2 = namespace(2);
    assert_eq!(
        tier.lookup(&ns2, &PageRun::new(&ns2, &tokens), 0).unwrap(),
        0
    );

    // A page gone mid-chain (as an eviction) gives a partial run.
    let mut conn = raw(&cluster);
    let k20 = run.keys()[20].redis_key();
    let deleted: i64 = redis::cmd("DEL").arg(&k20).query(&mut conn).unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(tier.lookup(&ns, &run, 0).unwrap(), 20);
    let got = tier.get_many(&ns, &run, 0..40);
    assert_eq!(got.len(), 21);
    assert!(matches!(got[20], Ok(None)));

    // A damaged value (one byte flipped by a raw SET) is rejected and deleted.
    let k5 = run.keys()[5].redis_key();
    let mut v: Vec<u8> = redis::cmd("GET").arg(&k5).query(&mut conn).unwrap();
    let mid = v.len() / 2;
    v[mid] ^= 0x01;
    let _: () = redis::cmd("SET").arg(&k5).arg(v).query(&mut conn).unwrap();
    match tier.get(&ns, &run, 5) {
        Err(TierError::Damaged { page: 5, why, .. }) => assert_eq!(why, ValueError::Checksum),
        other => panic!("a damaged page was served: {other:?}"),
    }
    let exists: i64 = redis::cmd("EXISTS").arg(&k5).query(&mut conn).unwrap();
    assert_eq!(exists, 0, "the damaged value is deleted");
    assert_eq!(tier.lookup(&ns, &run, 0).unwrap(), 5);
    // Another page's value stored under this key: its tokens differ.
    let v6: Vec<u8> = redis::cmd("GET")
        .arg(run.keys()[6].redis_key())
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SET").arg(&k5).arg(v6).query(&mut conn).unwrap();
    assert!(matches!(
        tier.get(&ns, &run, 5),
        Err(TierError::Damaged {
            why: ValueError::Tokens,
            ..
        })
    ));
    tier.put(&ns, &run, 5, &pages[5]).unwrap();
    tier.put(&ns, &run, 20, &pages[20]).unwrap();
    assert_eq!(tier.lookup(&ns, &run, 0).unwrap(), 40);

    // Kill the primary holding page 0: every call returns within its bound, failing (a miss to
    // its caller) until a replica takes over, then the tier serves again.
    let k0 = run.keys()[0].redis_key();
    let victim = cluster.owner(&k0);
    cluster.kill(victim);
    let t0 = Instant::now();
    let mut failures = 0;
    let recovered = loop {
        let t = Instant::now();
        let put = tier.put(&ns, &run, 0, &pages[0]);
        let got = tier.get(&ns, &run, 0);
        let look = tier.lookup(&ns, &run, 0);
        assert!(
            t.elapsed() <= bound * 3,
            "three calls took {:?}",
            t.elapsed()
        );
        match (put, got, look) {
            (Ok(()), Ok(Some(b)), Ok(n)) if b == pages[0] && n >= 1 => break true,
            (put, got, look) => {
                failures += 1;
                if failures % 10 == 1 {
                    eprintln!(
                        "after {:?}: put {put:?}, get {:?}, lookup {look:?}",
                        t0.elapsed(),
                        got.map(|g| g.map(|b| b.len()))
                    );
                }
            }
        }
        if t0.elapsed() > Duration::from_secs(30) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !recovered {
        for p in &cluster.ports {
            eprintln!("{p}: {}", redis_cli(*p, &["cluster", "nodes"]));
        }
    }
    assert!(recovered, "the tier did not come back after failover");
    eprintln!(
        "failover: served again after {:?} ({failures} failed rounds)",
        t0.elapsed()
    );
    let s = tier.stats();
    assert!(s.hits >= 41 && s.rejected == 2, "{s:?}");
}
