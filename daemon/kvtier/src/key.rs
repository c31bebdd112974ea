//! What a page in a tier is called: the namespace digest that seeds every chain, the chained
//! page keys, and the Redis key a page is stored under.
//!
//! A page's key is `H(namespace digest, parent key, the page's tokens)`, SHA-256 over fixed,
//! length-prefixed fields: deterministic across processes and machines (no per-process seed),
//! so a prefix computed on one daemon has the same keys on every other daemon with the same
//! model, tokenizer, template, KV dtype, page layout and tenant namespace — and different keys
//! when any of those differs.

use agentd_store::format::Fingerprint;
use agentd_store::Namespace;
use sha2::{Digest, Sha256};
use std::fmt;

/// Pages that share one Redis Cluster hash tag: a chain is cut into segments of this many pages,
/// each segment's keys carry the tag of its first page, so one segment is one slot (one pipeline,
/// one round trip) while different segments — of one chain and of different chains — spread
/// over the cluster's slots and so over its nodes.
pub const SEGMENT_PAGES: usize = 8;

/// Prefix of every Redis key the tier writes (`agkv:{tag}:hash`), so its keys are easy to tell
/// apart from anything else in a shared cluster.
pub const KEY_PREFIX: &str = "agkv";

/// Version of the key derivation and of the value format ([`crate::value`]); folded into the
/// namespace digest, so a new version never reads an old version's pages.
pub const TIER_VERSION: u16 = 1;

/// Everything that makes a page's KV bytes valid: the running model's [`Fingerprint`] (model
/// file SHA-256, tokenizer and template digests, KV dtype, page layout) and the server-chosen
/// cache [`Namespace`] (a tenant's own, or a published prefix's). Two daemons read each other's
/// pages exactly when their `TierNamespace`s are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierNamespace {
    fingerprint: Fingerprint,
    ns: Namespace,
    digest: [u8; 32],
}

impl TierNamespace {
    /// The namespace of pages computed under `fingerprint`, cached in `ns`.
    ///
    /// The fingerprint's `format_version` (the disk tier's file format) is left out of the
    /// digest: the tier has its own [`TIER_VERSION`], and a new disk format does not change
    /// what the KV bytes are.
    pub fn new(fingerprint: Fingerprint, ns: Namespace) -> Self {
        let mut h = Sha256::new();
        h.update(b"agentd-kvtier-namespace");
        h.update(TIER_VERSION.to_le_bytes());
        let field = |h: &mut Sha256, bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(&mut h, fingerprint.model_sha256.as_bytes());
        field(&mut h, fingerprint.tokenizer_digest.as_bytes());
        field(&mut h, fingerprint.template_digest.as_bytes());
        field(&mut h, fingerprint.kv_dtype.as_bytes());
        for n in [
            fingerprint.page_size,
            fingerprint.layers,
            fingerprint.kv_heads,
            fingerprint.head_dim,
        ] {
            h.update(n.to_le_bytes());
        }
        h.update((fingerprint.page_bytes() as u64).to_le_bytes());
        let (tag, id) = match ns {
            Namespace::Tenant(t) => (0u8, t),
            Namespace::Published(p) => (1u8, p),
        };
        h.update([tag]);
        h.update(id.to_le_bytes());
        Self {
            fingerprint,
            ns,
            digest: h.finalize().into(),
        }
    }

    /// The digest that seeds every chain in this namespace and is stored in every value.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.fingerprint.page_size as usize
    }

    /// Bytes of one page's K/V (what a value's payload must be).
    pub fn page_bytes(&self) -> usize {
        self.fingerprint.page_bytes()
    }

    /// The cache namespace.
    pub fn namespace(&self) -> Namespace {
        self.ns
    }

    /// The model fingerprint.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

/// One page's place in a chain: its chained hash and the hash tag of its segment.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageKey {
    hash: [u8; 32],
    tag: [u8; 8],
}

impl PageKey {
    /// The chained hash.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The Redis key: `agkv:{<segment tag, 16 hex digits>}:<hash, 64 hex digits>`. The braces
    /// are a Redis Cluster hash tag: only the segment tag picks the slot.
    pub fn redis_key(&self) -> String {
        let mut s = String::with_capacity(KEY_PREFIX.len() + 4 + 16 + 64);
        s.push_str(KEY_PREFIX);
        s.push_str(":{");
        push_hex(&mut s, &self.tag);
        s.push_str("}:");
        push_hex(&mut s, &self.hash);
        s
    }

    /// The segment's hash tag, as bytes (equal for the pages of one segment).
    pub fn tag(&self) -> &[u8; 8] {
        &self.tag
    }
}

impl fmt::Debug for PageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        push_hex(&mut s, &self.hash[..8]);
        write!(f, "PageKey({s}…)")
    }
}

/// `H(ns, parent or zeros, the tokens)`, the tokens length-prefixed.
pub(crate) fn chain_hash(ns: &[u8; 32], parent: Option<&[u8; 32]>, tokens: &[u32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"agentd-kvtier-page");
    h.update(ns);
    h.update(parent.unwrap_or(&[0u8; 32]));
    h.update((tokens.len() as u64).to_le_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
}

/// A token sequence cut into whole pages, with each page's key: what the tier methods take, so
/// a page's key, parent and tokens can never disagree. A partial last page is left out (only
/// full pages go to a tier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRun {
    ns_digest: [u8; 32],
    page_size: usize,
    tokens: Vec<u32>,
    keys: Vec<PageKey>,
}

impl PageRun {
    /// The full pages of `tokens` (from position 0) in namespace `ns`.
    pub fn new(ns: &TierNamespace, tokens: &[u32]) -> Self {
        let ps = ns.page_size().max(1);
        let pages = tokens.len() / ps;
        let mut keys: Vec<PageKey> = Vec::with_capacity(pages);
        for (i, page) in tokens.chunks_exact(ps).enumerate() {
            let hash = chain_hash(ns.digest(), keys.last().map(|k| &k.hash), page);
            let tag = if i % SEGMENT_PAGES == 0 {
                hash[..8].try_into().expect("8 bytes")
            } else {
                keys[i - i % SEGMENT_PAGES].tag
            };
            keys.push(PageKey { hash, tag });
        }
        Self {
            ns_digest: *ns.digest(),
            page_size: ps,
            tokens: tokens[..pages * ps].to_vec(),
            keys,
        }
    }

    /// Whole pages in the run.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the tokens do not fill one page.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every page's key, in order.
    pub fn keys(&self) -> &[PageKey] {
        &self.keys
    }

    /// Page `i`'s key, if the run has that page.
    pub fn key(&self, i: usize) -> Option<&PageKey> {
        self.keys.get(i)
    }

    /// The key of page `i`'s parent (`None` for the first page or past the run).
    pub fn parent(&self, i: usize) -> Option<&PageKey> {
        i.checked_sub(1).and_then(|p| self.keys.get(p))
    }

    /// Page `i`'s tokens (empty past the run).
    pub fn page_tokens(&self, i: usize) -> &[u32] {
        if i >= self.keys.len() {
            return &[];
        }
        &self.tokens[i * self.page_size..(i + 1) * self.page_size]
    }

    /// The run's tokens (whole pages only).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Whether the run was cut for namespace `ns` (its keys mean nothing in another).
    pub fn belongs_to(&self, ns: &TierNamespace) -> bool {
        self.ns_digest == *ns.digest() && self.page_size == ns.page_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fingerprint, ns};

    #[test]
    fn chain_keys_are_deterministic_and_differ_by_everything_the_bytes_depend_on() {
        let tokens: Vec<u32> = (0..40).collect();
        let base = PageRun::new(&ns(1), &tokens);
        assert_eq!(base.len(), 2, "a partial last page is left out");
        assert_eq!(base, PageRun::new(&ns(1), &tokens));
        // A known value pins the derivation (no per-process seed; a change must bump
        // TIER_VERSION, or daemons of two versions would read each other's pages).
        assert_eq!(
            base.keys()[0].redis_key(),
            "agkv:{7af211df40229d26}:7af211df40229d26266e070617bad37104448172bc524ece6a04b466055b20a9"
        );

        let other_ns =
            |fp: Fingerprint, n: Namespace| PageRun::new(&TierNamespace::new(fp, n), &tokens);
        let mut variants = vec![
            PageRun::new(&ns(2), &tokens),
            other_ns(fingerprint(), Namespace::Published(1)),
        ];
        let mut fp = fingerprint();
        fp.model_sha256 = "another model".into();
        variants.push(other_ns(fp, Namespace::Tenant(1)));
        let mut fp = fingerprint();
        fp.kv_dtype = "q8_0".into();
        variants.push(other_ns(fp, Namespace::Tenant(1)));
        let mut fp = fingerprint();
        fp.tokenizer_digest = "another tokenizer".into();
        variants.push(other_ns(fp, Namespace::Tenant(1)));
        let mut fp = fingerprint();
        fp.template_digest = "another template".into();
        variants.push(other_ns(fp, Namespace::Tenant(1)));
        let mut fp = fingerprint();
        fp.layers += 1;
        variants.push(other_ns(fp, Namespace::Tenant(1)));
        for v in &variants {
            assert_ne!(v.keys()[0], base.keys()[0]);
            assert_ne!(v.keys()[1], base.keys()[1]);
        }
        // The disk format's version is not part of what the bytes are.
        let mut fp = fingerprint();
        fp.format_version += 1;
        assert_eq!(other_ns(fp, Namespace::Tenant(1)), base);

        // A page's key depends on every token before it.
        let mut changed = tokens.clone();
        changed[3] = 999;
        let c = PageRun::new(&ns(1), &changed);
        assert_ne!(c.keys()[0], base.keys()[0]);
        assert_ne!(c.keys()[1], base.keys()[1]);
        let mut changed = tokens.clone();
        changed[20] = 999;
        let c = PageRun::new(&ns(1), &changed);
        assert_eq!(c.keys()[0], base.keys()[0]);
        assert_ne!(c.keys()[1], base.keys()[1]);
    }

    #[test]
    fn segments_share_a_hash_tag_and_chains_spread_over_tags() {
        let tokens: Vec<u32> = (0..16 * 20).collect();
        let run = PageRun::new(&ns(1), &tokens);
        assert_eq!(run.len(), 20);
        let tags: Vec<_> = run.keys().iter().map(|k| *k.tag()).collect();
        for (i, t) in tags.iter().enumerate() {
            assert_eq!(*t, tags[i - i % SEGMENT_PAGES], "page {i}");
        }
        assert_ne!(tags[0], tags[SEGMENT_PAGES]);
        assert_ne!(tags[SEGMENT_PAGES], tags[2 * SEGMENT_PAGES]);
        let other = PageRun::new(&ns(2), &tokens);
        assert_ne!(other.keys()[0].tag(), run.keys()[0].tag());
        // The tag is the only part in braces.
        let k = run.keys()[3].redis_key();
        let tag = &k[k.find('{').unwrap() + 1..k.find('}').unwrap()];
        assert_eq!(tag.len(), 16);
        assert!(run.keys()[0].redis_key().contains(tag));
        assert_eq!(run.parent(0), None);
        assert_eq!(run.parent(3), Some(&run.keys()[2]));
        assert_eq!(run.page_tokens(1), &tokens[16..32]);
        assert!(run.page_tokens(20).is_empty());
    }
}
