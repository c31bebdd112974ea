//! KV events: which daemon holds which pages, published on a capped Redis Stream, and the
//! index a router builds from them ([`KvIndex`], kept current by an [`IndexFollower`]).
//!
//! **Publishing.** Each daemon (a *node*, 0–127, `agentd serve --node N`) runs one
//! [`EventPublisher`]: the scheduler hands it the token runs whose whole pages it started or
//! stopped holding (never blocking: a full queue drops the event and counts it); the
//! publisher's thread cuts them into [`PageRun`]s and appends one entry per run to the stream
//! [`STREAM_KEY`] (`XADD … MAXLEN ~ cap`, so Redis trims it), and refreshes the node's
//! heartbeat key ([`heartbeat_key`]) with a TTL. Every entry and the heartbeat carry the
//! node's *epoch*: the daemon's start time in microseconds, so a restarted daemon has a newer
//! epoch than any of its earlier runs.
//!
//! **The index.** [`KvIndex`] maps each page key to the set of nodes holding it. An event with
//! a newer epoch than the index knows for its node, or a heartbeat with any other epoch,
//! purges that node's entries first (a restarted daemon's memory is empty); events of an older
//! epoch are ignored; an expired heartbeat purges the node and marks it down. Lookups only count nodes whose
//! heartbeat is current.
//!
//! All keys share the hash tag `{events}`, so the stream and all 128 heartbeats live in one
//! slot: one `MGET` reads every heartbeat.
//!
//! Failures never reach a request: a publisher that cannot reach Redis drops its events (the
//! index is a placement hint; a page it misses is still found by the shared tier's lookup),
//! and a follower that cannot reach Redis keeps its index as it was until Redis is back.

use crate::key::PageKey;
use crate::redis_tier::RedisTier;
use crate::{PageRun, RedisTierConfig, Result, TierError, TierNamespace};
use agentd_store::format::Fingerprint;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::time::Duration;

/// The stream every daemon appends its events to.
pub const STREAM_KEY: &str = "agkv:{events}:stream";

/// The most node numbers (0–127: ids carry the node in 7 bits).
pub const MAX_NODES: usize = 128;

/// The key of node `node`'s heartbeat (a JSON [`Heartbeat`] with a TTL).
pub fn heartbeat_key(node: u8) -> String {
    format!("agkv:{{events}}:hb:{node}")
}

/// Whether a node started or stopped holding pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The node holds these pages now (in memory or on its disk).
    Stored,
    /// The node no longer holds these pages.
    Removed,
}

impl EventKind {
    fn name(self) -> &'static str {
        match self {
            EventKind::Stored => "stored",
            EventKind::Removed => "removed",
        }
    }
}

/// One stream entry: a node's pages, by their chained keys' hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    /// The publishing node.
    pub node: u8,
    /// Its epoch (start time in microseconds).
    pub epoch: u64,
    /// Stored or removed.
    pub kind: EventKind,
    /// The pages' key hashes ([`PageKey::hash`]).
    pub keys: Vec<[u8; 32]>,
}

impl KvEvent {
    /// The entry's fields, as `XADD` takes them.
    fn fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("node", self.node.to_string().into_bytes()),
            ("epoch", self.epoch.to_string().into_bytes()),
            ("kind", self.kind.name().as_bytes().to_vec()),
            ("keys", self.keys.concat()),
        ]
    }

    /// Parses an entry's fields; `None` for an entry that is not a well-formed event (logged
    /// by the caller and skipped).
    pub fn parse(fields: &HashMap<String, Vec<u8>>) -> Option<Self> {
        let text = |k: &str| fields.get(k).and_then(|v| std::str::from_utf8(v).ok());
        let node: u8 = text("node")?.parse().ok()?;
        if node as usize >= MAX_NODES {
            return None;
        }
        let epoch = text("epoch")?.parse().ok()?;
        let kind = match text("kind")? {
            "stored" => EventKind::Stored,
            "removed" => EventKind::Removed,
            _ => return None,
        };
        let raw = fields.get("keys")?;
        if raw.len() % 32 != 0 {
            return None;
        }
        let keys = raw
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        Some(Self {
            node,
            epoch,
            kind,
            keys,
        })
    }
}

/// What a node's heartbeat says: who it is, since when, and what its KV is computed by (so a
/// router computes the same page keys the node publishes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node.
    pub node: u8,
    /// Its epoch.
    pub epoch: u64,
    /// The model, tokenizer, template, KV dtype and page layout its pages are valid for.
    pub fingerprint: Fingerprint,
}

/// The index of which node holds which page (see the module's doc).
#[derive(Debug, Default)]
pub struct KvIndex {
    /// Per page hash: the nodes holding it, one bit per node.
    holders: HashMap<[u8; 32], u128>,
    nodes: HashMap<u8, NodeState>,
}

#[derive(Debug, Default)]
struct NodeState {
    epoch: u64,
    alive: bool,
    keys: HashSet<[u8; 32]>,
    fingerprint: Option<Fingerprint>,
}

impl KvIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// The node's state, purged and moved to `epoch` when that is newer; `None` when `epoch`
    /// is older than the node's (a stale event from an earlier run).
    fn at_epoch(&mut self, node: u8, epoch: u64) -> Option<&mut NodeState> {
        let known = self.nodes.get(&node).map(|s| s.epoch);
        match known {
            Some(e) if epoch < e => return None,
            Some(e) if epoch > e => {
                self.purge(node);
                self.nodes.get_mut(&node).expect("known").epoch = epoch;
            }
            Some(_) => {}
            None => {
                self.nodes.insert(
                    node,
                    NodeState {
                        epoch,
                        ..NodeState::default()
                    },
                );
            }
        }
        self.nodes.get_mut(&node)
    }

    /// Drops every entry of `node` (its epoch and liveness stay).
    fn purge(&mut self, node: u8) {
        let Some(state) = self.nodes.get_mut(&node) else {
            return;
        };
        let bit = 1u128 << node;
        for k in state.keys.drain() {
            if let Some(m) = self.holders.get_mut(&k) {
                *m &= !bit;
                if *m == 0 {
                    self.holders.remove(&k);
                }
            }
        }
    }

    /// Applies one event: ignored when older than the node's epoch; a newer epoch purges
    /// the node's entries first.
    pub fn apply(&mut self, ev: &KvEvent) {
        if ev.node as usize >= MAX_NODES {
            return;
        }
        let bit = 1u128 << ev.node;
        if self.at_epoch(ev.node, ev.epoch).is_none() {
            return;
        }
        let Self { holders, nodes } = self;
        let state = nodes.get_mut(&ev.node).expect("at_epoch keeps the node");
        match ev.kind {
            EventKind::Stored => {
                for k in &ev.keys {
                    if state.keys.insert(*k) {
                        *holders.entry(*k).or_default() |= bit;
                    }
                }
            }
            EventKind::Removed => {
                for k in &ev.keys {
                    if state.keys.remove(k) {
                        if let Some(m) = holders.get_mut(k) {
                            *m &= !bit;
                            if *m == 0 {
                                holders.remove(k);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Records node `node`'s heartbeat: `Some` when current (an epoch other than the node's,
    /// newer or older, is a restart: the node's entries are purged), `None` when it expired or
    /// is missing (the node's entries are purged and the node is down until a heartbeat comes
    /// back).
    pub fn heartbeat(&mut self, node: u8, hb: Option<&Heartbeat>) {
        if node as usize >= MAX_NODES {
            return;
        }
        match hb {
            Some(hb) => {
                // The heartbeat is the authority on the node's current run: any other epoch
                // (older too, after a clock stepped back) is a restart.
                if self.nodes.get(&node).is_some_and(|s| s.epoch != hb.epoch) {
                    self.purge(node);
                    self.nodes.get_mut(&node).expect("known").epoch = hb.epoch;
                }
                let state = self
                    .at_epoch(node, hb.epoch)
                    .expect("the epoch is the node's");
                state.alive = true;
                state.fingerprint = Some(hb.fingerprint.clone());
            }
            None => {
                self.purge(node);
                if let Some(state) = self.nodes.get_mut(&node) {
                    state.alive = false;
                }
            }
        }
    }

    /// How many of `keys`, from the first on, node `node` holds (0 when the node is down).
    pub fn matched_pages(&self, node: u8, keys: &[PageKey]) -> usize {
        if !self.is_alive(node) {
            return 0;
        }
        let bit = 1u128 << node;
        keys.iter()
            .take_while(|k| self.holders.get(k.hash()).is_some_and(|m| m & bit != 0))
            .count()
    }

    /// How many of `keys`, from the first on, some live node holds (so the shared tier should
    /// have them too).
    pub fn held_anywhere(&self, keys: &[PageKey]) -> usize {
        let alive = self.alive_mask();
        keys.iter()
            .take_while(|k| self.holders.get(k.hash()).is_some_and(|m| m & alive != 0))
            .count()
    }

    /// Whether node `node`'s heartbeat is current.
    pub fn is_alive(&self, node: u8) -> bool {
        self.nodes.get(&node).is_some_and(|s| s.alive)
    }

    /// The nodes whose heartbeat is current, in order.
    pub fn alive_nodes(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self
            .nodes
            .iter()
            .filter(|(_, s)| s.alive)
            .map(|(&n, _)| n)
            .collect();
        v.sort_unstable();
        v
    }

    fn alive_mask(&self) -> u128 {
        self.nodes
            .iter()
            .filter(|(_, s)| s.alive)
            .fold(0, |m, (&n, _)| m | (1u128 << n))
    }

    /// Node `node`'s epoch, if the index has heard of it.
    pub fn epoch(&self, node: u8) -> Option<u64> {
        self.nodes.get(&node).map(|s| s.epoch)
    }

    /// The fingerprint node `node`'s last heartbeat gave.
    pub fn fingerprint(&self, node: u8) -> Option<&Fingerprint> {
        self.nodes.get(&node).and_then(|s| s.fingerprint.as_ref())
    }

    /// How many pages node `node` holds, as far as the index knows.
    pub fn node_pages(&self, node: u8) -> usize {
        self.nodes.get(&node).map_or(0, |s| s.keys.len())
    }

    /// Distinct pages held by any node.
    pub fn len(&self) -> usize {
        self.holders.len()
    }

    /// True when no page is indexed.
    pub fn is_empty(&self) -> bool {
        self.holders.is_empty()
    }
}

/// How a publisher or follower talks to the cluster.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// The cluster (the shared tier's nodes and timeout).
    pub redis: RedisTierConfig,
    /// The stream's length at which Redis trims it (`MAXLEN ~`).
    pub stream_cap: usize,
    /// The heartbeat's TTL; it is refreshed every third of it.
    pub heartbeat_ttl: Duration,
    /// Events queued at most before more are dropped.
    pub queue: usize,
    /// How often a follower polls the stream and the heartbeats.
    pub poll: Duration,
}

impl EventsConfig {
    /// Defaults: a stream of about 100,000 entries, a 3 s heartbeat, a queue of 1,024 events,
    /// a 100 ms poll.
    pub fn new(redis: RedisTierConfig) -> Self {
        Self {
            redis,
            stream_cap: 100_000,
            heartbeat_ttl: Duration::from_secs(3),
            queue: 1024,
            poll: Duration::from_millis(100),
        }
    }
}

/// A new epoch: now, in microseconds since the Unix epoch (newer than any earlier run's).
pub fn new_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// Where the scheduler reports the pages it started or stopped holding.
pub trait EventSink: Send + Sync {
    /// What this node's pages are computed by (the model, tokenizer, template, KV dtype and
    /// page layout), told once at start, before any event: the heartbeat announces it.
    fn set_fingerprint(&self, fingerprint: Fingerprint);

    /// Whole pages `first_page..` of `tokens` (in `ns`) are held now / no longer held.
    fn publish(&self, kind: EventKind, ns: &TierNamespace, tokens: &[u32], first_page: usize);
}

/// Counters of a publisher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Events appended to the stream.
    pub published: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Events (and heartbeats) that Redis refused or did not answer in time.
    pub failed: u64,
}

#[derive(Default)]
struct PublisherCounters {
    published: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

enum Job {
    Fingerprint(Fingerprint),
    Event {
        kind: EventKind,
        ns: TierNamespace,
        tokens: Vec<u32>,
        first_page: usize,
    },
}

/// A node's event publisher and heartbeat (see the module's doc). Dropping it stops its
/// thread and deletes nothing: the heartbeat expires by its TTL.
pub struct EventPublisher {
    jobs: Option<mpsc::SyncSender<Job>>,
    counters: Arc<PublisherCounters>,
    thread: Option<std::thread::JoinHandle<()>>,
    node: u8,
    epoch: u64,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("node", &self.node)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl EventPublisher {
    /// Starts node `node`'s publisher with epoch `epoch`; its heartbeat starts once the
    /// scheduler has told it the fingerprint ([`EventSink::set_fingerprint`]). An unreachable
    /// cluster is not an error (events are dropped until it is reachable); a bad node number
    /// or config is.
    pub fn start(cfg: EventsConfig, node: u8, epoch: u64) -> Result<Self> {
        if node as usize >= MAX_NODES {
            return Err(TierError::Invalid {
                tier: "events",
                detail: format!("node {node} is not 0-127"),
            });
        }
        let redis = RedisTier::open(cfg.redis.clone())?;
        let (jobs, rx) = mpsc::sync_channel::<Job>(cfg.queue.max(1));
        let counters = Arc::new(PublisherCounters::default());
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("agentd-kv-events".into())
            .spawn(move || publish_loop(&redis, &cfg, node, epoch, rx, &c))
            .map_err(|e| TierError::Invalid {
                tier: "events",
                detail: format!("cannot start the events thread: {e}"),
            })?;
        Ok(Self {
            jobs: Some(jobs),
            counters,
            thread: Some(thread),
            node,
            epoch,
        })
    }

    /// The node's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The counters.
    pub fn stats(&self) -> EventStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EventStats {
            published: g(&self.counters.published),
            dropped: g(&self.counters.dropped),
            failed: g(&self.counters.failed),
        }
    }
}

impl EventSink for EventPublisher {
    fn set_fingerprint(&self, fingerprint: Fingerprint) {
        if let Some(jobs) = &self.jobs {
            // Blocks only if the queue is full, which it is not before any event.
            let _ = jobs.send(Job::Fingerprint(fingerprint));
        }
    }

    fn publish(&self, kind: EventKind, ns: &TierNamespace, tokens: &[u32], first_page: usize) {
        let ps = ns.page_size().max(1);
        let full = tokens.len() / ps;
        if full <= first_page {
            return;
        }
        let Some(jobs) = &self.jobs else { return };
        let job = Job::Event {
            kind,
            ns: ns.clone(),
            tokens: tokens[..full * ps].to_vec(),
            first_page,
        };
        if jobs.try_send(job).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for EventPublisher {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn publish_loop(
    redis: &RedisTier,
    cfg: &EventsConfig,
    node: u8,
    epoch: u64,
    rx: mpsc::Receiver<Job>,
    c: &PublisherCounters,
) {
    let every = (cfg.heartbeat_ttl / 3).max(Duration::from_millis(10));
    let ttl_ms = cfg.heartbeat_ttl.as_millis().max(1) as u64;
    let mut heartbeat: Option<Vec<u8>> = None;
    let beat = |heartbeat: &Option<Vec<u8>>| {
        let Some(value) = heartbeat.clone() else {
            return;
        };
        let key = heartbeat_key(node);
        let r = redis.call("heartbeat", |mut conn| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl_ms)
                .query_async::<()>(&mut conn)
                .await
        });
        if let Err(e) = r {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, node, "the KV events heartbeat failed");
        }
    };
    let mut last_beat = std::time::Instant::now();
    loop {
        let wait = every.saturating_sub(last_beat.elapsed());
        match rx.recv_timeout(wait) {
            Ok(Job::Fingerprint(fingerprint)) => {
                let hb = Heartbeat {
                    node,
                    epoch,
                    fingerprint,
                };
                heartbeat = Some(serde_json::to_vec(&hb).expect("a heartbeat serializes"));
                beat(&heartbeat);
                last_beat = std::time::Instant::now();
            }
            Ok(Job::Event {
                kind,
                ns,
                tokens,
                first_page,
            }) => {
                let run = PageRun::new(&ns, &tokens);
                let keys: Vec<[u8; 32]> = run.keys()[first_page.min(run.len())..]
                    .iter()
                    .map(|k| *k.hash())
                    .collect();
                if !keys.is_empty() {
                    let ev = KvEvent {
                        node,
                        epoch,
                        kind,
                        keys,
                    };
                    let cap = cfg.stream_cap;
                    let r = redis.call("publish an event", |mut conn| async move {
                        let mut cmd = redis::cmd("XADD");
                        cmd.arg(STREAM_KEY).arg("MAXLEN").arg("~").arg(cap).arg("*");
                        for (k, v) in ev.fields() {
                            cmd.arg(k).arg(v);
                        }
                        cmd.query_async::<String>(&mut conn).await
                    });
                    match r {
                        Ok(_) => c.published.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            tracing::debug!(error = %e, "publishing a KV event failed");
                            c.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if last_beat.elapsed() >= every {
            beat(&heartbeat);
            last_beat = std::time::Instant::now();
        }
    }
}

/// Keeps a [`KvIndex`] current from the stream and the heartbeats, on a thread of its own
/// (see the module's doc). Dropping it stops the thread.
pub struct IndexFollower {
    index: Arc<RwLock<KvIndex>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for IndexFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexFollower").finish_non_exhaustive()
    }
}

impl IndexFollower {
    /// Starts following the cluster `cfg` names, reading the stream from its oldest entry.
    pub fn start(cfg: EventsConfig) -> Result<Self> {
        let redis = RedisTier::open(cfg.redis.clone())?;
        let index = Arc::new(RwLock::new(KvIndex::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (i, s) = (index.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("agentd-kv-index".into())
            .spawn(move || follow_loop(&redis, &cfg, &i, &s))
            .map_err(|e| TierError::Invalid {
                tier: "events",
                detail: format!("cannot start the index thread: {e}"),
            })?;
        Ok(Self {
            index,
            stop,
            thread: Some(thread),
        })
    }

    /// The index (read it briefly: the follower takes the write lock to apply events).
    pub fn index(&self) -> Arc<RwLock<KvIndex>> {
        self.index.clone()
    }
}

impl Drop for IndexFollower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Entries read per `XREAD`.
const READ_COUNT: usize = 512;

type StreamEntries = Vec<(String, HashMap<String, Vec<u8>>)>;
type StreamReply = Option<Vec<(String, StreamEntries)>>;

fn follow_loop(redis: &RedisTier, cfg: &EventsConfig, index: &RwLock<KvIndex>, stop: &AtomicBool) {
    let mut last_id = "0-0".to_string();
    let mut last_beats = std::time::Instant::now() - cfg.heartbeat_ttl;
    while !stop.load(Ordering::Relaxed) {
        // Heartbeats first, every poll: a node's epoch must be known before its events are.
        if last_beats.elapsed() >= cfg.poll {
            last_beats = std::time::Instant::now();
            let keys: Vec<String> = (0..MAX_NODES as u8).map(heartbeat_key).collect();
            let r = redis.call("read heartbeats", |mut conn| async move {
                redis::cmd("MGET")
                    .arg(keys)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                    .await
            });
            match r {
                Ok(values) => {
                    let mut idx = index.write().unwrap_or_else(|e| e.into_inner());
                    for (node, v) in values.iter().enumerate() {
                        let hb = v
                            .as_ref()
                            .and_then(|b| serde_json::from_slice::<Heartbeat>(b).ok())
                            .filter(|h| h.node as usize == node);
                        let known = idx.epoch(node as u8).is_some();
                        if hb.is_some() || known {
                            idx.heartbeat(node as u8, hb.as_ref());
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "reading KV heartbeats failed"),
            }
        }
        let from = last_id.clone();
        let r = redis.call("read events", |mut conn| async move {
            redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("STREAMS")
                .arg(STREAM_KEY)
                .arg(from)
                .query_async::<StreamReply>(&mut conn)
                .await
        });
        let mut more = false;
        match r {
            Ok(Some(streams)) => {
                let mut idx = index.write().unwrap_or_else(|e| e.into_inner());
                for (_, entries) in streams {
                    more |= entries.len() >= READ_COUNT;
                    for (id, fields) in entries {
                        match KvEvent::parse(&fields) {
                            Some(ev) => idx.apply(&ev),
                            None => tracing::warn!(id, "a malformed KV event was skipped"),
                        }
                        last_id = id;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading KV events failed"),
        }
        if !more {
            std::thread::sleep(cfg.poll);
        }
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
