//! What the disk tier writes: the fingerprint every record carries, the record metadata kept in
//! sled, the blob file layout (header, pages, descriptor), and the chained page hashes the index
//! is keyed by.
//!
//! A blob file is self-describing: `header | pages | descriptor`, where the descriptor is the
//! record's metadata as first written (the same JSON sled holds), so a record can be rebuilt
//! from its blob alone when sled lost it (an orphan after a crash, or a damaged database).

use crate::Namespace;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped whenever the layout of a record or a blob changes. Version 2: blobs end with their
/// record's descriptor.
pub const FORMAT_VERSION: u32 = 2;

/// Everything the KV bytes depend on. A record whose fingerprint differs from the running
/// daemon's in any field is dropped, never served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// SHA-256 of the GGUF file.
    pub model_sha256: String,
    /// Element type of the stored K/V ("f16", or "q8_0": blocks of 32 int8 values and one f16
    /// scale).
    pub kv_dtype: String,
    /// Tokens per page.
    pub page_size: u32,
    /// Layers, K/V heads and head dimension: the page layout.
    pub layers: u32,
    /// K/V heads per layer.
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// SHA-256 of the tokenizer's serialised form.
    pub tokenizer_digest: String,
    /// SHA-256 of the chat template's source.
    pub template_digest: String,
}

impl Fingerprint {
    /// The first field in which `self` (a record's) differs from `current`, by name.
    pub fn mismatch(&self, current: &Fingerprint) -> Option<&'static str> {
        let fields: [(&'static str, bool); 9] = [
            (
                "format_version",
                self.format_version != current.format_version,
            ),
            ("model_sha256", self.model_sha256 != current.model_sha256),
            ("kv_dtype", self.kv_dtype != current.kv_dtype),
            ("page_size", self.page_size != current.page_size),
            ("layers", self.layers != current.layers),
            ("kv_heads", self.kv_heads != current.kv_heads),
            ("head_dim", self.head_dim != current.head_dim),
            (
                "tokenizer_digest",
                self.tokenizer_digest != current.tokenizer_digest,
            ),
            (
                "template_digest",
                self.template_digest != current.template_digest,
            ),
        ];
        fields.iter().find(|(_, differs)| *differs).map(|(n, _)| *n)
    }

    /// Bytes of one page's K/V across all layers (keys then values, layer by layer).
    pub fn page_bytes(&self) -> usize {
        let row = self.kv_heads as usize * self.head_dim as usize;
        let row_bytes = match self.kv_dtype.as_str() {
            // 34 bytes (an f16 scale and 32 int8 values) per block of 32.
            "q8_0" => row.div_ceil(32) * 34,
            _ => row * 2,
        };
        self.layers as usize * 2 * self.page_size as usize * row_bytes
    }
}

/// One record: the KV of pages `first_page..` of a token sequence, in one blob file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordMeta {
    /// What the bytes depend on.
    pub fingerprint: Fingerprint,
    /// The namespace the sequence is cached in.
    pub ns: Namespace,
    /// The whole sequence from position 0 to the record's end (the KV of a page is only valid
    /// after exactly these earlier tokens).
    pub tokens: Vec<u32>,
    /// The first page the blob holds; pages before it come from memory or other records.
    pub first_page: u32,
    /// CRC-32 of each page's bytes in the blob, in order.
    pub page_crc: Vec<u32>,
    /// Kept through disk-budget eviction as long as possible (a pinned prefix's KV).
    pub pinned: bool,
    /// Loads from disk so far.
    pub hits: u64,
    /// Seconds since the Unix epoch of the last write or load (for LRU on disk).
    pub last_use: u64,
    /// CRC-32 of the fields above (see [`RecordMeta::compute_crc`]).
    pub meta_crc: u32,
}

impl RecordMeta {
    /// Pages in the blob.
    pub fn pages(&self, page_size: usize) -> usize {
        self.tokens.len().div_ceil(page_size) - self.first_page as usize
    }

    /// Bytes of the pages in the blob (its payload).
    pub fn payload_len(&self) -> u64 {
        let ps = self.fingerprint.page_size as usize;
        (self.pages(ps) * self.fingerprint.page_bytes()) as u64
    }

    /// The record's descriptor: its JSON form, stored in sled and at the end of the blob.
    pub fn descriptor(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serialises")
    }

    /// CRC-32 over what identifies the bytes: namespace, tokens, first page, page CRCs (the
    /// fingerprint is compared field by field instead; hits and last use change over time).
    pub fn compute_crc(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&ns_bytes(self.ns));
        for t in &self.tokens {
            h.update(&t.to_le_bytes());
        }
        h.update(&self.first_page.to_le_bytes());
        for c in &self.page_crc {
            h.update(&c.to_le_bytes());
        }
        h.finalize()
    }
}

/// A registered prefix as persisted, so its id stays valid across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixRecord {
    /// Tokenizer and template the tokens were produced with (and the model).
    pub fingerprint: Fingerprint,
    /// Its id.
    pub id: u64,
    /// The tenant that registered it.
    pub tenant: u64,
    /// Where it is cached.
    pub ns: Namespace,
    /// Its tokens.
    pub tokens: Vec<u32>,
}

/// Bytes of a blob's header: `AGKV`, the format version, the record id, the payload (pages)
/// length, the descriptor's length and CRC-32, then a CRC-32 of all those, then 4 zero bytes.
pub const BLOB_HEADER_LEN: usize = 40;
const BLOB_MAGIC: &[u8; 4] = b"AGKV";

/// What a blob's header says (see [`BLOB_HEADER_LEN`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    /// The record the blob belongs to.
    pub id: u64,
    /// Bytes of pages after the header.
    pub payload: u64,
    /// Bytes of the descriptor after the pages.
    pub desc_len: u32,
    /// CRC-32 of the descriptor.
    pub desc_crc: u32,
}

impl BlobHeader {
    /// The header of record `id`'s blob holding `payload` bytes of pages, then `descriptor`.
    pub fn new(id: u64, payload: u64, descriptor: &[u8]) -> Self {
        Self {
            id,
            payload,
            desc_len: descriptor.len() as u32,
            desc_crc: crc32fast::hash(descriptor),
        }
    }

    /// The whole file's length.
    pub fn file_len(&self) -> u64 {
        BLOB_HEADER_LEN as u64 + self.payload + u64::from(self.desc_len)
    }

    /// Where the descriptor starts.
    pub fn desc_offset(&self) -> u64 {
        BLOB_HEADER_LEN as u64 + self.payload
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; BLOB_HEADER_LEN] {
        let mut h = [0u8; BLOB_HEADER_LEN];
        h[..4].copy_from_slice(BLOB_MAGIC);
        h[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[8..16].copy_from_slice(&self.id.to_le_bytes());
        h[16..24].copy_from_slice(&self.payload.to_le_bytes());
        h[24..28].copy_from_slice(&self.desc_len.to_le_bytes());
        h[28..32].copy_from_slice(&self.desc_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..32]);
        h[32..36].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Reads a header, checking its magic, its checksum and its version.
    pub fn decode(h: &[u8]) -> Result<Self, Damage> {
        if h.len() < BLOB_HEADER_LEN {
            return Err(Damage::ShortHeader);
        }
        if &h[..4] != BLOB_MAGIC {
            return Err(Damage::Magic);
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(4) != FORMAT_VERSION {
            // Earlier versions put the checksum elsewhere: the version says more.
            return Err(Damage::Fingerprint("format_version"));
        }
        if u32_at(32) != crc32fast::hash(&h[..32]) {
            return Err(Damage::HeaderChecksum);
        }
        Ok(Self {
            id: u64_at(8),
            payload: u64_at(16),
            desc_len: u32_at(24),
            desc_crc: u32_at(28),
        })
    }
}

/// Why a record on disk cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// The blob is shorter than its header.
    #[error("the blob is shorter than its header")]
    ShortHeader,
    /// The blob does not start with the magic bytes.
    #[error("the blob does not start with AGKV")]
    Magic,
    /// The header's own checksum fails.
    #[error("the blob header's checksum does not match")]
    HeaderChecksum,
    /// The header is intact but belongs to another record, version or length.
    #[error("the blob header names another record, version or length")]
    HeaderMismatch,
    /// The record's metadata checksum fails.
    #[error("the metadata checksum does not match")]
    MetaChecksum,
    /// The metadata's page checksums do not cover its pages.
    #[error("the page checksums do not match the page count")]
    PageCount,
    /// The blob's length differs from the metadata's.
    #[error("the blob has {len} bytes, {expected} expected")]
    BlobLength {
        /// Bytes on disk.
        len: u64,
        /// Bytes the metadata says.
        expected: u64,
    },
    /// One page's checksum fails.
    #[error("page {page} fails its checksum (the blob is damaged)")]
    PageChecksum {
        /// The page.
        page: u32,
    },
    /// The record was written for another model, tokenizer, template or layout.
    #[error("written for a different {0}")]
    Fingerprint(&'static str),
    /// The blob's descriptor fails its checksum.
    #[error("the blob's descriptor fails its checksum")]
    DescriptorChecksum,
}

/// Checks a blob header against the record it should belong to (`id`, with `payload` bytes of
/// pages); says what is wrong.
pub fn check_blob_header(h: &[u8], id: u64, payload: u64) -> Result<BlobHeader, Damage> {
    let header = BlobHeader::decode(h)?;
    if header.id != id || header.payload != payload {
        return Err(Damage::HeaderMismatch);
    }
    Ok(header)
}

fn ns_bytes(ns: Namespace) -> [u8; 9] {
    let (tag, v) = match ns {
        Namespace::Tenant(t) => (0u8, t),
        Namespace::Published(p) => (1u8, p),
    };
    let mut b = [0u8; 9];
    b[0] = tag;
    b[1..].copy_from_slice(&v.to_le_bytes());
    b
}

/// A chained hash over whole pages: `root(ns)`, then `next(h, page k's tokens)` for each page.
/// Equal hashes mean equal namespaces and equal tokens before the page.
pub type ChainHash = [u8; 32];

/// The chain's start for namespace `ns`.
pub fn chain_root(ns: Namespace) -> ChainHash {
    let mut h = Sha256::new();
    h.update(b"agentd-kv-chain");
    h.update(ns_bytes(ns));
    h.finalize().into()
}

/// The chain after one more full page of `tokens`.
pub fn chain_next(prev: &ChainHash, tokens: &[u32]) -> ChainHash {
    let mut h = Sha256::new();
    h.update(prev);
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_chains_detect_what_differs() {
        let header = BlobHeader::new(7, 100, b"{}");
        let h = header.encode();
        assert_eq!(check_blob_header(&h, 7, 100), Ok(header));
        assert_eq!(header.file_len(), BLOB_HEADER_LEN as u64 + 102);
        assert!(check_blob_header(&h, 8, 100).is_err());
        assert!(check_blob_header(&h, 7, 101).is_err());
        for i in [10, 26, 30] {
            let mut bad = h;
            bad[i] ^= 1;
            assert_eq!(check_blob_header(&bad, 7, 100), Err(Damage::HeaderChecksum));
        }
        let a = chain_next(&chain_root(Namespace::Tenant(1)), &[1, 2]);
        assert_ne!(a, chain_next(&chain_root(Namespace::Tenant(2)), &[1, 2]));
        assert_ne!(a, chain_next(&chain_root(Namespace::Published(1)), &[1, 2]));
        assert_ne!(a, chain_next(&chain_root(Namespace::Tenant(1)), &[1, 3]));
    }
}
