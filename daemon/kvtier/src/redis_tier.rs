//! [`RedisTier`]: the shared tier on a Redis Cluster.
//!
//! **Keys.** `agkv:{tag}:hash` ([`PageKey::redis_key`]): the hash tag is per segment of
//! [`crate::key::SEGMENT_PAGES`] pages of a chain, so one segment lives in one slot and is one
//! pipeline (one round trip), while segments — of one chain, and of different chains — spread
//! over the slots and so over the primaries. A lookup or a read sends one pipeline per segment,
//! all at once; the client keeps one multiplexed connection per node, so the pipelines bound for
//! one node share its connection and its round trip.
//!
//! **Eviction** is Redis's: the cluster runs with `maxmemory` and `maxmemory-policy
//! allkeys-lfu`, no TTLs are set, and a page is one value (header and bytes together), so an
//! eviction drops a whole page and a lookup sees a shorter run — never metadata without data.
//!
//! **Failures.** Every call is bounded by [`RedisTierConfig::timeout`] (including connecting,
//! retries and redirections); a failure is an error that the caller treats as a miss. After
//! a few consecutive failures the connection is dropped and a new one is tried at most once per
//! [`RedisTierConfig::reconnect_every`]; in between, calls fail at once instead of waiting, so
//! a Redis that is down costs its callers nothing, and the tier comes back when Redis does.
//!
//! The tier runs redis-rs's async cluster client on a small tokio runtime of its own, behind
//! the synchronous [`KvTier`] methods; they refuse (an error, not a panic) to be called from
//! inside an async runtime.

use crate::key::PageKey;
use crate::{check_call, finish_get, value, Count, Counters, KvTier, PageResult};
use crate::{PageRun, Result, TierError, TierNamespace, TierStats};
use futures_util::future::join_all;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use std::future::Future;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const NAME: &str = "redis";
/// Consecutive failed calls after which the connection is rebuilt.
const FAILURES_BEFORE_RECONNECT: u32 = 3;

/// Where the cluster is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTierConfig {
    /// Some of the cluster's nodes, as `redis://host:port` URLs (the client learns the rest).
    pub nodes: Vec<String>,
    /// The bound on every call, connecting and retries included.
    pub timeout: Duration,
    /// The shortest time between two attempts to connect while the cluster is unreachable.
    pub reconnect_every: Duration,
}

impl RedisTierConfig {
    /// The cluster reachable through `nodes`, with the default timeouts (a call: 500 ms; a new
    /// connection attempt at most every second).
    pub fn new(nodes: Vec<String>) -> Self {
        Self {
            nodes,
            timeout: Duration::from_millis(500),
            reconnect_every: Duration::from_secs(1),
        }
    }
}

enum Conn {
    Up {
        conn: ClusterConnection,
        failures: u32,
    },
    Down {
        since: Instant,
        why: String,
    },
}

/// The shared KV tier on a Redis Cluster (see the module's doc).
pub struct RedisTier {
    rt: Option<tokio::runtime::Runtime>,
    client: ClusterClient,
    conn: Mutex<Conn>,
    cfg: RedisTierConfig,
    counters: Counters,
}

impl std::fmt::Debug for RedisTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTier")
            .field("cfg", &self.cfg)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Drop for RedisTier {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which a runtime's own threads must not do.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn redis_error(op: &'static str, e: redis::RedisError) -> TierError {
    TierError::Unavailable {
        tier: NAME,
        op,
        detail: e.to_string(),
    }
}

impl RedisTier {
    /// A tier on the cluster `cfg` names. Connects once, bounded by the timeout; an unreachable
    /// cluster is not an error here (calls fail until it is reachable). Errors: no nodes, a
    /// malformed URL, or no runtime thread.
    pub fn open(cfg: RedisTierConfig) -> Result<Self> {
        let invalid = |detail: String| TierError::Invalid { tier: NAME, detail };
        if cfg.nodes.is_empty() {
            return Err(invalid("no Redis Cluster nodes given".into()));
        }
        let client = ClusterClient::builder(cfg.nodes.clone())
            .connection_timeout(cfg.timeout)
            .response_timeout(cfg.timeout)
            .retries(2)
            .min_retry_wait(20)
            .max_retry_wait(200)
            .build()
            .map_err(|e| invalid(format!("the Redis Cluster nodes: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("agentd-redis-tier")
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("cannot start the Redis tier's runtime: {e}")))?;
        let long_ago = Instant::now()
            .checked_sub(cfg.reconnect_every)
            .unwrap_or_else(Instant::now);
        let tier = Self {
            rt: Some(rt),
            client,
            conn: Mutex::new(Conn::Down {
                since: long_ago,
                why: "not connected yet".into(),
            }),
            cfg,
            counters: Counters::default(),
        };
        if Self::outside_runtime().is_ok() {
            if let Err(e) = tier.connection("connect") {
                tracing::warn!(error = %e, "the Redis tier is unreachable for now");
            }
        }
        Ok(tier)
    }

    /// Whether the tier holds a connection (it may still fail on the next call).
    pub fn is_connected(&self) -> bool {
        matches!(*self.lock(), Conn::Up { .. })
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn outside_runtime() -> Result<()> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(TierError::Invalid {
                tier: NAME,
                detail: "its synchronous calls cannot run inside an async runtime; call them \
                         from a tier thread"
                    .into(),
            });
        }
        Ok(())
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives until drop")
    }

    /// Runs `f` on the tier's runtime for at most the timeout.
    fn bounded<F: Future>(
        &self,
        f: F,
    ) -> std::result::Result<F::Output, tokio::time::error::Elapsed> {
        let after = self.cfg.timeout;
        // The timer is made inside the runtime: it needs the runtime's clock.
        self.rt()
            .block_on(async move { tokio::time::timeout(after, f).await })
    }

    /// The connection, connecting if it is down and the last attempt is old enough.
    fn connection(&self, op: &'static str) -> Result<ClusterConnection> {
        let mut state = self.lock();
        match &*state {
            Conn::Up { conn, .. } => return Ok(conn.clone()),
            Conn::Down { since, why } if since.elapsed() < self.cfg.reconnect_every => {
                return Err(TierError::Unavailable {
                    tier: NAME,
                    op,
                    detail: format!("not connected ({why}); retrying shortly"),
                });
            }
            Conn::Down { .. } => {}
        }
        let r = self.bounded(self.client.get_async_connection());
        match r {
            Ok(Ok(conn)) => {
                tracing::info!(nodes = ?self.cfg.nodes, "connected to the Redis tier");
                *state = Conn::Up {
                    conn: conn.clone(),
                    failures: 0,
                };
                Ok(conn)
            }
            Ok(Err(e)) => {
                let e = redis_error(op, e);
                *state = Conn::Down {
                    since: Instant::now(),
                    why: e.to_string(),
                };
                Err(e)
            }
            Err(_) => {
                *state = Conn::Down {
                    since: Instant::now(),
                    why: "connecting timed out".into(),
                };
                Err(TierError::Timeout {
                    tier: NAME,
                    op,
                    after: self.cfg.timeout,
                })
            }
        }
    }

    /// Counts the outcome of a call on the connection; drops the connection after several
    /// failures in a row.
    fn note(&self, failed: Option<&TierError>) {
        let mut state = self.lock();
        let Conn::Up { failures, .. } = &mut *state else {
            return;
        };
        let Some(e) = failed else {
            *failures = 0;
            return;
        };
        self.counters.add(Count::Failure);
        *failures += 1;
        if *failures >= FAILURES_BEFORE_RECONNECT {
            tracing::warn!(error = %e, "the Redis tier keeps failing; reconnecting");
            *state = Conn::Down {
                since: Instant::now(),
                why: e.to_string(),
            };
        }
    }

    /// Runs `f` on the connection within the timeout.
    pub(crate) fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: Future<Output = std::result::Result<T, redis::RedisError>>,
    {
        Self::outside_runtime()?;
        let conn = match self.connection(op) {
            Ok(c) => c,
            Err(e) => {
                self.counters.add(Count::Failure);
                return Err(e);
            }
        };
        let r = match self.bounded(f(conn)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(redis_error(op, e)),
            Err(_) => Err(TierError::Timeout {
                tier: NAME,
                op,
                after: self.cfg.timeout,
            }),
        };
        self.note(r.as_ref().err());
        r
    }

    /// Deletes values that failed a check (best effort: a failure is only logged).
    fn delete_rejected(&self, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let keys = keys.to_vec();
        let r = self.call("delete a rejected value", |conn| async move {
            let dels = keys.into_iter().map(|k| {
                let mut c = conn.clone();
                async move { redis::cmd("DEL").arg(k).query_async::<i64>(&mut c).await }
            });
            join_all(dels)
                .await
                .into_iter()
                .collect::<redis::RedisResult<Vec<_>>>()
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "deleting a rejected value failed");
        }
    }
}

/// `range`'s pages of `run` grouped by segment (consecutive pages sharing a hash tag, so one
/// slot): each group's page indices.
fn segments(run: &PageRun, range: Range<usize>) -> Vec<Range<usize>> {
    let keys = run.keys();
    let end = range.end.min(keys.len());
    let mut out: Vec<Range<usize>> = Vec::new();
    for i in range.start..end {
        match out.last_mut() {
            Some(r) if keys[r.start].tag() == keys[i].tag() => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

fn redis_keys(keys: &[PageKey], r: Range<usize>) -> Vec<String> {
    keys[r].iter().map(PageKey::redis_key).collect()
}

impl KvTier for RedisTier {
    fn name(&self) -> &'static str {
        NAME
    }

    fn lookup(&self, ns: &TierNamespace, run: &PageRun, from: usize) -> Result<usize> {
        if !run.belongs_to(ns) {
            return check_call(NAME, ns, run, 0, None).map(|()| 0);
        }
        let groups: Vec<Vec<String>> = segments(run, from..run.len())
            .into_iter()
            .map(|r| redis_keys(run.keys(), r))
            .collect();
        if groups.is_empty() {
            return Ok(0);
        }
        let answers = self.call("lookup", |conn| async move {
            let asks = groups.into_iter().map(|keys| {
                let mut c = conn.clone();
                async move {
                    let mut pipe = redis::pipe();
                    for k in &keys {
                        pipe.cmd("EXISTS").arg(k);
                    }
                    pipe.query_async::<Vec<bool>>(&mut c).await
                }
            });
            // A failed segment ends the run there; only the first one failing fails the call.
            let mut out = Vec::new();
            for r in join_all(asks).await {
                match r {
                    Ok(v) => out.push(v),
                    Err(e) if out.is_empty() => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(out)
        })?;
        let n = answers
            .iter()
            .flatten()
            .take_while(|present| **present)
            .count();
        self.counters.add(Count::Lookup { pages: n });
        Ok(n)
    }

    fn get(&self, ns: &TierNamespace, run: &PageRun, page: usize) -> PageResult {
        self.get_many(ns, run, page..page + 1)
            .pop()
            .unwrap_or_else(|| check_call(NAME, ns, run, page, None).map(|()| None))
    }

    fn get_many(&self, ns: &TierNamespace, run: &PageRun, pages: Range<usize>) -> Vec<PageResult> {
        if pages.is_empty() {
            return Vec::new();
        }
        if let Err(e) = check_call(NAME, ns, run, pages.start, None) {
            return vec![Err(e)];
        }
        let pages = pages.start..pages.end.min(run.len());
        let groups = segments(run, pages.clone());
        let keys: Vec<Vec<String>> = groups
            .iter()
            .map(|r| redis_keys(run.keys(), r.clone()))
            .collect();
        let fetched = self.call("get", |conn| async move {
            let reads = keys.into_iter().map(|keys| {
                let mut c = conn.clone();
                async move {
                    let mut pipe = redis::pipe();
                    for k in &keys {
                        pipe.cmd("GET").arg(k);
                    }
                    pipe.query_async::<Vec<Option<Vec<u8>>>>(&mut c).await
                }
            });
            Ok(join_all(reads).await)
        });
        let fetched = match fetched {
            Ok(f) => f,
            Err(e) => return vec![Err(e)],
        };
        let mut out = Vec::with_capacity(pages.len());
        let mut rejected = Vec::new();
        'groups: for (range, group) in groups.into_iter().zip(fetched) {
            let values = match group {
                Ok(v) if v.len() == range.len() => v,
                Ok(_) => {
                    out.push(Err(TierError::Unavailable {
                        tier: NAME,
                        op: "get",
                        detail: "a pipeline answered the wrong number of values".into(),
                    }));
                    break;
                }
                Err(e) => {
                    self.counters.add(Count::Failure);
                    out.push(Err(redis_error("get", e)));
                    break;
                }
            };
            for (page, raw) in range.zip(values) {
                let r = finish_get(NAME, &self.counters, ns, run, page, raw);
                let served = matches!(r, Ok(Some(_)));
                if matches!(r, Err(TierError::Damaged { .. })) {
                    rejected.push(run.keys()[page].redis_key());
                }
                out.push(r);
                if !served {
                    break 'groups;
                }
            }
        }
        self.delete_rejected(&rejected);
        out
    }

    fn put(&self, ns: &TierNamespace, run: &PageRun, page: usize, bytes: &[u8]) -> Result<()> {
        self.put_many(ns, run, page, &[bytes])
    }

    fn put_many(
        &self,
        ns: &TierNamespace,
        run: &PageRun,
        first: usize,
        pages: &[&[u8]],
    ) -> Result<()> {
        for (i, b) in pages.iter().enumerate() {
            check_call(NAME, ns, run, first + i, Some(b))?;
        }
        let groups: Vec<Vec<(String, Vec<u8>)>> = segments(run, first..first + pages.len())
            .into_iter()
            .map(|r| {
                r.map(|p| {
                    let v = value::encode(ns, run, p, pages[p - first]);
                    (run.keys()[p].redis_key(), v)
                })
                .collect()
            })
            .collect();
        let sizes: Vec<usize> = groups.iter().flatten().map(|(_, v)| v.len()).collect();
        self.call("put", |conn| async move {
            let writes = groups.into_iter().map(|kvs| {
                let mut c = conn.clone();
                async move {
                    let mut pipe = redis::pipe();
                    for (k, v) in &kvs {
                        pipe.cmd("SET").arg(k).arg(v.as_slice()).ignore();
                    }
                    pipe.query_async::<()>(&mut c).await
                }
            });
            join_all(writes)
                .await
                .into_iter()
                .collect::<redis::RedisResult<Vec<()>>>()
        })?;
        for bytes in sizes {
            self.counters.add(Count::Put { bytes });
        }
        Ok(())
    }

    fn remove(&self, _ns: &TierNamespace, key: &PageKey) -> Result<()> {
        let k = key.redis_key();
        let n = self.call("remove", |mut conn| async move {
            redis::cmd("DEL").arg(k).query_async::<i64>(&mut conn).await
        })?;
        if n > 0 {
            self.counters.add(Count::Remove);
        }
        Ok(())
    }

    fn stats(&self) -> TierStats {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::ns;

    #[test]
    fn segments_follow_the_hash_tags() {
        let n = ns(1);
        let run = PageRun::new(&n, &(0..16 * 20).collect::<Vec<u32>>());
        assert_eq!(segments(&run, 0..20), vec![0..8, 8..16, 16..20]);
        assert_eq!(segments(&run, 5..11), vec![5..8, 8..11]);
        assert_eq!(segments(&run, 18..40), vec![18..20]);
        assert!(segments(&run, 20..20).is_empty());
    }

    #[test]
    fn an_unreachable_cluster_fails_fast_and_never_panics() {
        // A port nothing listens on: connecting is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let mut cfg = RedisTierConfig::new(vec![format!("redis://127.0.0.1:{port}")]);
        cfg.timeout = Duration::from_millis(300);
        let tier = RedisTier::open(cfg).unwrap();
        assert!(!tier.is_connected());
        let n = ns(1);
        let run = PageRun::new(&n, &(0..32).collect::<Vec<u32>>());
        let t0 = Instant::now();
        for _ in 0..20 {
            assert!(tier.lookup(&n, &run, 0).is_err());
            assert!(tier.get(&n, &run, 0).is_err());
            assert!(tier.put(&n, &run, 0, &vec![0; n.page_bytes()]).is_err());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t0.elapsed()
        );
        assert!(tier.stats().failures >= 60);
        assert!(RedisTier::open(RedisTierConfig::new(vec![])).is_err());
        assert!(RedisTier::open(RedisTierConfig::new(vec!["not a url".into()])).is_err());
    }

    #[test]
    fn calls_from_inside_a_runtime_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tier =
                RedisTier::open(RedisTierConfig::new(vec!["redis://127.0.0.1:1".into()])).unwrap();
            let n = ns(1);
            let run = PageRun::new(&n, &(0..16).collect::<Vec<u32>>());
            assert!(matches!(
                tier.lookup(&n, &run, 0),
                Err(TierError::Invalid { .. })
            ));
            // Dropping it here does not panic either.
        });
    }
}
