//! The in-memory index of what is on disk: for each chain hash (namespace plus the tokens of the
//! whole pages before a page), the pages stored after it, with their tokens. Matching walks a
//! request's pages like the radix tree does, at token granularity within a page.

use super::format::{chain_next, chain_root, ChainHash};
use crate::Namespace;
use std::collections::HashMap;

/// One stored page: which record holds it, its page index, and its tokens (a full page, or the
/// first tokens of a record's last page).
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredPage {
    record: u64,
    page: u32,
    tokens: Vec<u32>,
}

/// Where the KV of one page of a match is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLoc {
    /// The record (blob) holding it.
    pub record: u64,
    /// The page index within the sequence.
    pub page: u32,
}

/// A match against the disk tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskMatch {
    /// Tokens matched (memory-resident pages before `pages[0]` included).
    pub tokens: usize,
    /// The pages to read, consecutive from the first one not resident in memory.
    pub pages: Vec<PageLoc>,
}

use crate::common_len;

/// Chain hash → pages stored after it.
#[derive(Debug, Default)]
pub struct DiskIndex {
    page_size: usize,
    next: HashMap<ChainHash, Vec<StoredPage>>,
    keys: HashMap<u64, Vec<ChainHash>>,
}

impl DiskIndex {
    /// An empty index for pages of `page_size` tokens.
    pub fn new(page_size: usize) -> Self {
        Self {
            page_size,
            ..Default::default()
        }
    }

    /// Indexes record `record`: pages `first_page..` of `tokens` in `ns`.
    pub fn add(&mut self, record: u64, ns: Namespace, tokens: &[u32], first_page: usize) {
        let ps = self.page_size;
        let mut h = chain_root(ns);
        let mut keys = Vec::new();
        for (k, page) in tokens.chunks(ps).enumerate() {
            if k >= first_page {
                self.next.entry(h).or_default().push(StoredPage {
                    record,
                    page: k as u32,
                    tokens: page.to_vec(),
                });
                keys.push(h);
            }
            if page.len() == ps {
                h = chain_next(&h, page);
            }
        }
        self.keys.insert(record, keys);
    }

    /// Forgets record `record`.
    pub fn remove(&mut self, record: u64) {
        for key in self.keys.remove(&record).unwrap_or_default() {
            if let Some(list) = self.next.get_mut(&key) {
                list.retain(|p| p.record != record);
                if list.is_empty() {
                    self.next.remove(&key);
                }
            }
        }
    }

    /// Whether record `record` is indexed.
    pub fn contains(&self, record: u64) -> bool {
        self.keys.contains_key(&record)
    }

    /// The longest prefix of `tokens` in `ns` covered by the first `resident` tokens (whose
    /// pages are in memory) followed by pages on disk. Only pages from `resident / page_size`
    /// on are read from disk.
    pub fn longest_match(&self, ns: Namespace, tokens: &[u32], resident: usize) -> DiskMatch {
        let ps = self.page_size;
        let mut h = chain_root(ns);
        let first_missing = resident / ps;
        let mut m = DiskMatch {
            tokens: 0,
            pages: Vec::new(),
        };
        for (k, page) in tokens.chunks(ps).enumerate() {
            if k >= first_missing {
                let best = self.next.get(&h).and_then(|list| {
                    list.iter()
                        .map(|p| (common_len(&p.tokens, page), p))
                        .filter(|(c, _)| *c > 0)
                        .max_by_key(|(c, _)| *c)
                });
                let Some((c, p)) = best else { break };
                m.pages.push(PageLoc {
                    record: p.record,
                    page: k as u32,
                });
                m.tokens = k * ps + c;
                if c < ps {
                    break;
                }
            }
            if page.len() < ps {
                break;
            }
            h = chain_next(&h, page);
        }
        if m.pages.is_empty() {
            m.tokens = 0;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_across_records_and_partial_pages() {
        let ns = Namespace::Tenant(1);
        let mut ix = DiskIndex::new(4);
        let seq: Vec<u32> = (0..10).collect();
        ix.add(1, ns, &seq[..6], 0); // pages 0 (full) and 1 (2 tokens)
        ix.add(2, ns, &seq, 1); // pages 1, 2 of the longer sequence
        let m = ix.longest_match(ns, &seq, 0);
        assert_eq!(m.tokens, 10);
        assert_eq!(
            m.pages
                .iter()
                .map(|p| (p.record, p.page))
                .collect::<Vec<_>>(),
            vec![(1, 0), (2, 1), (2, 2)]
        );
        // A request diverging inside page 1 matches up to the divergence.
        let mut other = seq.clone();
        other[5] = 99;
        assert_eq!(ix.longest_match(ns, &other, 0).tokens, 5);
        // Resident tokens are skipped; another namespace matches nothing.
        let m = ix.longest_match(ns, &seq, 8);
        assert_eq!(m.pages, vec![PageLoc { record: 2, page: 2 }]);
        assert_eq!(ix.longest_match(Namespace::Tenant(2), &seq, 0).tokens, 0);
        ix.remove(2);
        assert_eq!(ix.longest_match(ns, &seq, 0).tokens, 6);
        ix.remove(1);
        assert_eq!(ix.longest_match(ns, &seq, 0), DiskMatch::default());
        assert!(ix.next.is_empty());
    }
}
