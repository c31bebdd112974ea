//! One page's value in a tier: a header and the page's K/V bytes in one buffer, so metadata and
//! data are stored, evicted and deleted together — never apart.
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `AGKT` |
//! | 4..6 | [`TIER_VERSION`] |
//! | 6..8 | reserved, zero |
//! | 8..40 | namespace digest ([`TierNamespace::digest`]) |
//! | 40..72 | parent page's chained hash (zeros for a chain's first page) |
//! | 72..76 | token count `n` |
//! | 76..84 | K/V byte count `b` |
//! | 84..88 | CRC-32 of the whole value with these four bytes zero |
//! | 88..88+4n | the page's tokens |
//! | then `b` bytes | the page's K/V bytes |
//!
//! [`decode`] checks all of it against what the reader expects: the checksum (any single
//! changed byte fails it, CRC-32 catches every burst of up to 32 bits), the lengths, the
//! namespace, the parent, the tokens, that the chained hash of those is the key the value was
//! read under, and the page's byte count for the namespace's layout. A value failing any check
//! is never served.

use crate::key::{chain_hash, PageRun, TierNamespace, TIER_VERSION};

const MAGIC: &[u8; 4] = b"AGKT";
/// Bytes of a value's header before its tokens.
pub const HEADER_LEN: usize = 88;
const CRC_AT: usize = 84;

/// Why a stored value is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Shorter than its header, or its lengths do not add up to its size.
    #[error("the value is {len} bytes, its header says {expected}")]
    Length {
        /// Bytes stored.
        len: usize,
        /// Bytes the header accounts for.
        expected: usize,
    },
    /// Not a tier value.
    #[error("the value does not start with AGKT")]
    Magic,
    /// Written by another version of the tier.
    #[error("the value has format version {0}")]
    Version(u16),
    /// The checksum fails: the value was damaged.
    #[error("the value's checksum does not match (damaged)")]
    Checksum,
    /// Written for another namespace (model, tokenizer, template, dtype, layout or tenant).
    #[error("the value belongs to another namespace")]
    Namespace,
    /// Its K/V byte count is not a page of this namespace's layout.
    #[error("the value holds {got} K/V bytes, a page is {expected}")]
    PageBytes {
        /// Bytes in the value.
        got: usize,
        /// Bytes of one page.
        expected: usize,
    },
    /// Its tokens are not the page's.
    #[error("the value holds other tokens")]
    Tokens,
    /// Its parent is not the page's parent.
    #[error("the value follows another page")]
    Parent,
    /// Its contents hash to another key than the one it was stored under.
    #[error("the value is stored under another page's key")]
    Key,
}

/// The value of page `page` of `run` holding `bytes`.
///
/// The caller checks that the page exists and that `bytes` is one page of the namespace's
/// layout (the tiers do, before encoding).
pub fn encode(ns: &TierNamespace, run: &PageRun, page: usize, bytes: &[u8]) -> Vec<u8> {
    let tokens = run.page_tokens(page);
    let parent = run.parent(page).map(|p| *p.hash()).unwrap_or([0u8; 32]);
    let mut v = Vec::with_capacity(HEADER_LEN + 4 * tokens.len() + bytes.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&TIER_VERSION.to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(ns.digest());
    v.extend_from_slice(&parent);
    v.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    v.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    for t in tokens {
        v.extend_from_slice(&t.to_le_bytes());
    }
    v.extend_from_slice(bytes);
    let crc = crc32fast::hash(&v);
    v[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    v
}

/// The K/V bytes of `raw`, read under the key of page `page` of `run`, after every check (see
/// the module's doc). Never panics, whatever `raw` holds.
pub fn decode(
    ns: &TierNamespace,
    run: &PageRun,
    page: usize,
    mut raw: Vec<u8>,
) -> Result<Vec<u8>, ValueError> {
    if raw.len() < HEADER_LEN {
        return Err(ValueError::Length {
            len: raw.len(),
            expected: HEADER_LEN,
        });
    }
    if &raw[..4] != MAGIC {
        return Err(ValueError::Magic);
    }
    let u32_at = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
    let stored_crc = u32_at(CRC_AT);
    let mut h = crc32fast::Hasher::new();
    h.update(&raw[..CRC_AT]);
    h.update(&[0; 4]);
    h.update(&raw[CRC_AT + 4..]);
    if h.finalize() != stored_crc {
        return Err(ValueError::Checksum);
    }
    let version = u16::from_le_bytes([raw[4], raw[5]]);
    if version != TIER_VERSION || raw[6..8] != [0, 0] {
        return Err(ValueError::Version(version));
    }
    let n = u32_at(72) as usize;
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(&raw[76..84]);
    let b = u64::from_le_bytes(b8);
    let expected = usize::try_from(b)
        .ok()
        .and_then(|b| n.checked_mul(4)?.checked_add(HEADER_LEN)?.checked_add(b));
    if expected != Some(raw.len()) {
        return Err(ValueError::Length {
            len: raw.len(),
            expected: expected.unwrap_or(usize::MAX),
        });
    }
    let b = b as usize;
    if raw[8..40] != ns.digest()[..] || !run.belongs_to(ns) {
        return Err(ValueError::Namespace);
    }
    if b != ns.page_bytes() {
        return Err(ValueError::PageBytes {
            got: b,
            expected: ns.page_bytes(),
        });
    }
    let want = run.page_tokens(page);
    let tokens = &raw[HEADER_LEN..HEADER_LEN + 4 * n];
    let same_tokens = n == want.len()
        && tokens
            .chunks_exact(4)
            .zip(want)
            .all(|(c, t)| c == t.to_le_bytes());
    if !same_tokens || want.is_empty() {
        return Err(ValueError::Tokens);
    }
    let parent = run.parent(page).map(|p| *p.hash()).unwrap_or([0u8; 32]);
    if raw[40..72] != parent {
        return Err(ValueError::Parent);
    }
    let key = run.key(page).ok_or(ValueError::Tokens)?;
    let has_parent = page > 0;
    let hash = chain_hash(ns.digest(), has_parent.then_some(&parent), want);
    if hash != *key.hash() {
        return Err(ValueError::Key);
    }
    raw.drain(..HEADER_LEN + 4 * n);
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::ns;
    use proptest::prelude::*;

    fn run_and_bytes(tenant: u64, tokens: &[u32], seed: u8) -> (TierNamespace, PageRun, Vec<u8>) {
        let n = ns(tenant);
        let run = PageRun::new(&n, tokens);
        let bytes = (0..n.page_bytes())
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        (n, run, bytes)
    }

    #[test]
    fn a_value_is_served_only_where_it_was_written() {
        let tokens: Vec<u32> = (100..148).collect();
        let (n, run, bytes) = run_and_bytes(1, &tokens, 7);
        let v = encode(&n, &run, 1, &bytes);
        assert_eq!(decode(&n, &run, 1, v.clone()), Ok(bytes.clone()));
        // Under another page of the same run.
        assert_eq!(decode(&n, &run, 2, v.clone()), Err(ValueError::Tokens));
        // Another tenant asking for the same tokens.
        let (n2, run2, _) = run_and_bytes(2, &tokens, 7);
        assert_eq!(decode(&n2, &run2, 1, v.clone()), Err(ValueError::Namespace));
        // The same page's tokens after a different first page.
        let mut other = tokens.clone();
        other[0] = 1;
        let run3 = PageRun::new(&n, &other);
        assert_eq!(decode(&n, &run3, 1, v.clone()), Err(ValueError::Parent));
        // Another run's page copied under this key: its tokens differ.
        let v0 = encode(&n, &run, 0, &bytes);
        assert_eq!(decode(&n, &run, 1, v0), Err(ValueError::Tokens));
        assert!(decode(&n, &run, 1, Vec::new()).is_err());
        assert!(decode(&n, &run, 1, b"hello".to_vec()).is_err());
    }

    proptest! {
        #[test]
        fn values_round_trip(tenant in 0u64..4, tokens in prop::collection::vec(any::<u32>(), 16..64), seed: u8, page in 0usize..4) {
            let (n, run, bytes) = run_and_bytes(tenant, &tokens, seed);
            prop_assume!(page < run.len());
            let v = encode(&n, &run, page, &bytes);
            prop_assert_eq!(decode(&n, &run, page, v), Ok(bytes));
        }

        #[test]
        fn any_single_byte_corruption_is_detected(tokens in prop::collection::vec(any::<u32>(), 16..40), seed: u8, at: prop::sample::Index, flip in 1u8..=255) {
            let (n, run, bytes) = run_and_bytes(3, &tokens, seed);
            let page = run.len() - 1;
            let mut v = encode(&n, &run, page, &bytes);
            let i = at.index(v.len());
            v[i] ^= flip;
            prop_assert!(decode(&n, &run, page, v).is_err(), "byte {} xor {}", i, flip);
        }

        #[test]
        fn truncated_or_extended_values_are_rejected(tokens in prop::collection::vec(any::<u32>(), 16..40), cut in 0usize..200, extra in prop::collection::vec(any::<u8>(), 1..8)) {
            let (n, run, bytes) = run_and_bytes(3, &tokens, 1);
            let v = encode(&n, &run, 0, &bytes);
            let short = v[..v.len().saturating_sub(cut + 1)].to_vec();
            prop_assert!(decode(&n, &run, 0, short).is_err());
            let mut long = v;
            long.extend_from_slice(&extra);
            prop_assert!(decode(&n, &run, 0, long).is_err());
        }
    }
}
