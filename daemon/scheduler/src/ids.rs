//! What ids and namespaces are made of: the node number a daemon behind `agentd route` puts in
//! its ids, and the cache namespace of a published prefix, the same on every daemon.

/// Where a node number sits in an id ([`crate::SchedulerConfig::node`]).
pub(crate) const NODE_SHIFT: u32 = 56;

/// The node number an id made by a daemon started with a node number carries (bits 56–62).
pub fn node_of_id(id: u64) -> u8 {
    ((id >> NODE_SHIFT) & 0x7f) as u8
}

/// The cache namespace of a published prefix: derived from its tokens alone (SHA-256), so that
/// the same prefix published on several daemons is cached under the same namespace everywhere
/// and the shared tier's pages of one daemon are hits on the others. 63 bits, never 0.
pub fn published_namespace(tokens: &[u32]) -> u64 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"agentd-published-prefix");
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let d = h.finalize();
    (u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) >> 1).max(1)
}
