//! The daemon's TOML configuration file (`agentd serve --config PATH`).
//!
//! Precedence, highest first: command-line flags, then environment variables (`AGENTD_*`), then
//! this file, then built-in defaults. Unknown keys are errors, so a typo never silently falls
//! back to a default.
//!
//! ```toml
//! socket = "/run/agentd/agentd.sock"
//! socket_group = "agentd"  # the socket's group (a name or a numeric gid, as a string)
//! grace_seconds = 10
//! kv_memory = "2GiB"
//! page_size = 16
//! max_batch = 64
//! step_tokens = 512
//! cache_dir = "/var/lib/agentd/kv-cache"
//! disk_cache = "8GiB"
//! kv_tier = "redis://10.0.0.1:6379,redis://10.0.0.2:6379"  # shared KV tier (Redis Cluster)
//! kv_tier_timeout_ms = 500
//! node = 1            # this daemon's number behind `agentd route` (0-127, unique per cluster)
//! operators = [1000]  # uids allowed the admin RPCs, besides the daemon's own
//!
//! [limits]            # per tenant
//! sessions = 4096
//! generations = 256
//! request_tokens = 8192
//! request_pages = 1024
//!
//! [tenants]           # Unix uid = tenant name; uids not listed are refused
//! 1000 = "alice"
//! 1001 = "alice"      # two users, one tenant
//! 1002 = "bob"
//!
//! [tcp]               # optional TCP listener; every call needs a bearer token
//! listen = "127.0.0.1:7070"
//! [tcp.tokens]        # token = tenant name (the same names as [tenants])
//! "s3cret-token-of-alice" = "alice"
//!
//! [http]              # optional OpenAI-compatible HTTP API (bearer tokens: [tcp.tokens]);
//!                     # `http = "127.0.0.1:8080"` alone is the short form
//! listen = "127.0.0.1:8080"
//! max_body = "8MiB"   # larger request bodies get 413
//! public = false      # without tokens, refuse a non-loopback address unless true
//! metrics_token = "a-long-random-scrape-token"  # needed for /metrics when tokens exist
//! ```

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A named tenant's id: derived from the name alone (the top bit set, so it never equals a
/// uid-based tenant), so it stays the same when other tenants are added or removed. Cached
/// prefixes on disk and restored registrations are keyed by it.
pub fn tenant_id(name: &str) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(name.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) | (1 << 63)
}

/// What can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (the message gives line and column).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What and where.
        message: String,
    },
}

/// Per-tenant limits in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Open sessions.
    pub sessions: Option<usize>,
    /// Generations waiting or running at once.
    pub generations: Option<usize>,
    /// Prompt plus `max_tokens` of one request.
    pub request_tokens: Option<usize>,
    /// KV pages one request may need.
    pub request_pages: Option<usize>,
}

/// The optional TCP listener.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpFile {
    /// Address to listen on, e.g. "127.0.0.1:7070".
    pub listen: Option<String>,
    /// Bearer token → tenant name.
    #[serde(default)]
    pub tokens: BTreeMap<String, String>,
}

/// The optional HTTP listener (the OpenAI-compatible API and `/metrics`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    /// Address to listen on, e.g. "127.0.0.1:8080".
    pub listen: Option<String>,
    /// The largest request body, e.g. "8MiB".
    pub max_body: Option<String>,
    /// Listen beyond loopback without bearer tokens.
    pub public: Option<bool>,
    /// The bearer token `/metrics` needs.
    pub metrics_token: Option<String>,
}

/// `http` as an address alone or as a table.
fn http_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HttpFile, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::String(listen) => Ok(HttpFile {
            listen: Some(listen),
            ..HttpFile::default()
        }),
        table => HttpFile::deserialize(table).map_err(serde::de::Error::custom),
    }
}

/// The file's contents; every key is optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The Unix socket.
    pub socket: Option<PathBuf>,
    /// The socket's group, set at start: a group name, or a numeric gid as a string.
    pub socket_group: Option<String>,
    /// Seconds running streams may go on after SIGTERM/SIGINT.
    pub grace_seconds: Option<u64>,
    /// One tenant per Unix user (ignored when `tenants` is given).
    pub tenant_per_uid: Option<bool>,
    /// KV memory, e.g. "2GiB".
    pub kv_memory: Option<String>,
    /// Tokens per KV page.
    pub page_size: Option<usize>,
    /// Most sequences decoding at once.
    pub max_batch: Option<usize>,
    /// Most tokens one engine step computes.
    pub step_tokens: Option<usize>,
    /// Per-tenant limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// Unix uid (as a string key) → tenant name.
    pub tenants: Option<BTreeMap<String, String>>,
    /// The TCP listener and its bearer tokens.
    #[serde(default)]
    pub tcp: TcpFile,
    /// The HTTP listener: `http = "ADDR"`, or an `[http]` table.
    #[serde(default, deserialize_with = "http_key")]
    pub http: HttpFile,
    /// Where cached prefixes are kept on disk.
    pub cache_dir: Option<PathBuf>,
    /// Disk budget for cached prefixes, e.g. "2GiB"; "0" keeps nothing on disk.
    pub disk_cache: Option<String>,
    /// The shared KV tier's Redis Cluster seed nodes, comma separated (off when absent).
    pub kv_tier: Option<String>,
    /// The bound on every call to the shared tier, in milliseconds.
    pub kv_tier_timeout_ms: Option<u64>,
    /// This daemon's node number behind `agentd route` (0–127).
    pub node: Option<u8>,
    /// Unix uids allowed the admin RPCs (publish, unpin, evict, list every tenant's prefixes),
    /// besides the daemon's own uid.
    #[serde(default)]
    pub operators: Vec<u32>,
}

impl ConfigFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        let cfg: Self = toml::from_str(&text).map_err(|e| parse(e.to_string()))?;
        cfg.uid_map().map_err(parse)?;
        if let Some(short) = cfg.tcp.tokens.keys().find(|t| t.len() < 16) {
            return Err(parse(format!(
                "[tcp.tokens]: token {:?}… is shorter than 16 characters",
                &short[..short.len().min(3)]
            )));
        }
        Ok(cfg)
    }

    /// Tenant names from `[tenants]` and `[tcp.tokens]`, each with its [`tenant_id`].
    fn tenant_ids(&self) -> HashMap<&String, u64> {
        self.tenants
            .iter()
            .flat_map(|t| t.values())
            .chain(self.tcp.tokens.values())
            .map(|name| (name, tenant_id(name)))
            .collect()
    }

    /// Tenant id → name, for every tenant the file names (metrics labels).
    pub fn tenant_names(&self) -> HashMap<u64, String> {
        self.tenant_ids()
            .into_iter()
            .map(|(name, id)| (id, name.clone()))
            .collect()
    }

    /// `[tcp.tokens]` as bearer token → tenant id.
    pub fn token_map(&self) -> HashMap<String, u64> {
        let ids = self.tenant_ids();
        self.tcp
            .tokens
            .iter()
            .map(|(tok, name)| (tok.clone(), ids[name]))
            .collect()
    }

    /// The `[tenants]` table as uid → tenant id (see [`tenant_id`]), or `None` when the file
    /// has no such table.
    pub fn uid_map(&self) -> Result<Option<HashMap<u32, u64>>, String> {
        let Some(t) = &self.tenants else {
            return Ok(None);
        };
        let ids = self.tenant_ids();
        let mut map = HashMap::new();
        for (uid, name) in t {
            let uid: u32 = uid
                .parse()
                .map_err(|_| format!("[tenants]: key {uid:?} is not a Unix uid"))?;
            map.insert(uid, ids[name]);
        }
        Ok(Some(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys_and_bad_uids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(
            &p,
            "kv_memory = \"64MiB\"\n[limits]\nsessions = 2\n[tenants]\n1000 = \"b\"\n1001 = \"a\"\n1002 = \"b\"\n",
        )
        .unwrap();
        let c = ConfigFile::load(&p).unwrap();
        assert_eq!(c.limits.sessions, Some(2));
        let m = c.uid_map().unwrap().unwrap();
        assert_eq!(
            (m[&1000], m[&1001], m[&1002]),
            (tenant_id("b"), tenant_id("a"), tenant_id("b"))
        );
        assert_ne!(tenant_id("a"), tenant_id("b"));
        std::fs::write(&p, "kv_memroy = \"1GiB\"\n").unwrap();
        let e = ConfigFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("kv_memroy"), "{e}");
        std::fs::write(&p, "[tenants]\nroot = \"a\"\n").unwrap();
        let e = ConfigFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("not a Unix uid"), "{e}");
        std::fs::write(
            &p,
            "[tcp]\nlisten = \"127.0.0.1:1\"\n[tcp.tokens]\nshort = \"a\"\n",
        )
        .unwrap();
        let e = ConfigFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("shorter than 16"), "{e}");
        std::fs::write(
            &p,
            "[tenants]\n0 = \"b\"\n[tcp.tokens]\n\"a-long-enough-token-1\" = \"a\"\n",
        )
        .unwrap();
        let c = ConfigFile::load(&p).unwrap();
        assert_eq!(c.token_map()["a-long-enough-token-1"], tenant_id("a"));
        assert_eq!(c.uid_map().unwrap().unwrap()[&0], tenant_id("b"));
        // `http` as an address or as a table; a wrong key inside the table is named.
        std::fs::write(&p, "http = \"127.0.0.1:8080\"\n").unwrap();
        let c = ConfigFile::load(&p).unwrap();
        assert_eq!(c.http.listen.as_deref(), Some("127.0.0.1:8080"));
        std::fs::write(
            &p,
            "[http]\nlisten = \"127.0.0.1:9\"\nmax_body = \"1MiB\"\n",
        )
        .unwrap();
        let c = ConfigFile::load(&p).unwrap();
        assert_eq!(
            (c.http.listen.as_deref(), c.http.max_body.as_deref()),
            (Some("127.0.0.1:9"), Some("1MiB"))
        );
        std::fs::write(&p, "[http]\nlisen = \"127.0.0.1:9\"\n").unwrap();
        let e = ConfigFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = ConfigFile::load(&dir.path().join("missing.toml")).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
    }

    #[test]
    fn socket_group_is_a_name_or_a_gid_given_as_a_string() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        for (text, want) in [
            ("socket_group = \"agentd\"\n", Some("agentd")),
            ("socket_group = \"1001\"\n", Some("1001")),
            ("", None),
        ] {
            std::fs::write(&p, text).unwrap();
            let c = ConfigFile::load(&p).unwrap();
            assert_eq!(c.socket_group.as_deref(), want, "{text}");
        }
        std::fs::write(&p, "socket_group = 1001\n").unwrap();
        let e = ConfigFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("socket_group") && e.contains("string"), "{e}");
    }
}
