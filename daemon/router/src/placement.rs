//! Where a new session (or a new prefix) goes: the policy, over what the router knows of each
//! daemon — up or down, the sessions it placed there, and how much of the prompt each one
//! holds in its cache ([`PrefixIndex`]).
//!
//! The cache-aware cost follows Dynamo's KV router: a daemon's cost is the prompt tokens it
//! would compute — tokens it does not hold, those another daemon holds (loadable from the
//! shared tier) counted at [`Policy::shared_fraction`] — plus [`Policy::load_weight`] × the
//! sessions open there. The lowest cost wins; ties go to the less loaded daemon, then in turn.
//!
//! **Architecture Invariant:** a daemon that is down is never chosen; no daemon up means no
//! choice (the caller answers UNAVAILABLE). The policy does no I/O: it is a function of its
//! [`Candidate`]s, tested on fakes.

/// How the router chooses a daemon for a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The lowest cost: uncached prompt tokens plus weighted load (see the module docs).
    Cache,
    /// Each live daemon in turn.
    RoundRobin,
    /// The daemon with the fewest sessions placed by this router.
    LeastLoaded,
}

impl std::str::FromStr for Placement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cache" => Ok(Self::Cache),
            "round-robin" => Ok(Self::RoundRobin),
            "least-loaded" => Ok(Self::LeastLoaded),
            other => Err(format!(
                "unknown placement {other:?}: cache, round-robin or least-loaded"
            )),
        }
    }
}

/// The cache namespace a prompt's KV is found under, chosen by the server from the caller's
/// identity (as the daemons do): a tenant's own, or a published prefix's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheNamespace {
    /// A tenant's private cache (its tenant id).
    Tenant(u64),
    /// A published prefix's cache (`agentd_scheduler::published_namespace` of its tokens).
    Published(u64),
}

/// How much of a prompt is cached, in tokens from its start (whole pages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cached {
    /// Held by the daemon itself (its memory or disk).
    pub local: usize,
    /// Held by some daemon or the shared tier: loadable by this one instead of computed.
    pub anywhere: usize,
}

/// What the router knows of the caches of the daemons behind it. Implemented over the shared
/// tier's KV events (`agentd_kvtier::events::KvIndex`); tests use fakes.
pub trait PrefixIndex: Send + Sync {
    /// How many leading tokens of `tokens`, in namespace `ns`, the daemon `node` holds
    /// (`local`), and how many it could load from the shared tier because some daemon holds
    /// them (`anywhere`, at least `local` when the tier has them). Whole pages only.
    fn cached(&self, node: u8, ns: CacheNamespace, tokens: &[u32]) -> Cached;

    /// [`PrefixIndex::cached`] for each of `nodes`, in order. Implementations that hash the
    /// prompt override it to hash once for all the daemons that share a fingerprint.
    fn cached_all(&self, nodes: &[u8], ns: CacheNamespace, tokens: &[u32]) -> Vec<Cached> {
        nodes.iter().map(|&n| self.cached(n, ns, tokens)).collect()
    }
}

/// One daemon as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Its node number.
    pub node: u8,
    /// Whether it answers (and may take new sessions).
    pub up: bool,
    /// Sessions this router placed there that are still open.
    pub sessions: u64,
    /// How much of the prompt it holds.
    pub cached: Cached,
}

/// The placement policy and its weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// The rule.
    pub placement: Placement,
    /// Cost of one open session, in prompt tokens.
    pub load_weight: f64,
    /// What a token loadable from the shared tier costs, as a fraction of computing it.
    pub shared_fraction: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            placement: Placement::LeastLoaded,
            load_weight: DEFAULT_LOAD_WEIGHT,
            shared_fraction: 0.2,
        }
    }
}

/// The default [`Policy::load_weight`]: an open session costs as much as computing this many
/// prompt tokens.
pub const DEFAULT_LOAD_WEIGHT: f64 = 64.0;

impl Policy {
    /// The cache-aware cost of placing a prompt of `prompt` tokens on `c`.
    pub fn cost(&self, prompt: usize, c: &Candidate) -> f64 {
        let local = c.cached.local.min(prompt);
        let loadable = c.cached.anywhere.min(prompt).saturating_sub(local);
        let computed = (prompt - local - loadable) as f64;
        computed + loadable as f64 * self.shared_fraction + self.load_weight * c.sessions as f64
    }

    /// The index in `candidates` of the daemon to use for a prompt of `prompt` tokens, or
    /// `None` when none is up. `turn` (a counter the caller increments per choice) breaks
    /// ties and drives round-robin.
    pub fn choose(&self, prompt: usize, candidates: &[Candidate], turn: u64) -> Option<usize> {
        let up: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].up)
            .collect();
        if up.is_empty() {
            return None;
        }
        // Rotating the order first makes every tie-break fair across calls.
        let start = (turn % up.len() as u64) as usize;
        let order = up[start..].iter().chain(&up[..start]).copied();
        match self.placement {
            Placement::RoundRobin => Some(up[start]),
            Placement::LeastLoaded => order.min_by_key(|&i| candidates[i].sessions),
            Placement::Cache => order.min_by(|&a, &b| {
                let (ca, cb) = (&candidates[a], &candidates[b]);
                self.cost(prompt, ca)
                    .total_cmp(&self.cost(prompt, cb))
                    .then(ca.sessions.cmp(&cb.sessions))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(placement: Placement) -> Policy {
        Policy {
            placement,
            ..Policy::default()
        }
    }

    fn candidate(node: u8, up: bool, sessions: u64, local: usize, anywhere: usize) -> Candidate {
        Candidate {
            node,
            up,
            sessions,
            cached: Cached { local, anywhere },
        }
    }

    fn any_candidates() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec((any::<bool>(), 0u64..50, 0usize..600, 0usize..600), 0..6)
            .prop_map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (up, s, l, a))| candidate(i as u8, up, s, l, a.max(l)))
                    .collect()
            })
    }

    fn any_placement() -> impl Strategy<Value = Placement> {
        prop_oneof![
            Just(Placement::Cache),
            Just(Placement::RoundRobin),
            Just(Placement::LeastLoaded)
        ]
    }

    proptest! {
        #[test]
        fn a_down_daemon_is_never_chosen_and_none_up_is_no_choice(
            cands in any_candidates(), placement in any_placement(),
            prompt in 0usize..700, turn in any::<u64>(),
        ) {
            let chosen = policy(placement).choose(prompt, &cands, turn);
            match chosen {
                Some(i) => prop_assert!(cands[i].up),
                None => prop_assert!(cands.iter().all(|c| !c.up)),
            }
        }

        #[test]
        fn the_daemon_holding_the_prefix_wins_unless_its_load_is_far_higher(
            prompt in 32usize..2000, held_pages in 1usize..100, shared in any::<bool>(),
            holder_sessions in 0u64..40, other_sessions in 0u64..40, turn in any::<u64>(),
        ) {
            let held = (held_pages * 16).min(prompt);
            let p = policy(Placement::Cache);
            // The other daemon could load the prefix from the shared tier, or not.
            let anywhere = if shared { held } else { 0 };
            let cands = [
                candidate(1, true, holder_sessions, held, held),
                candidate(2, true, other_sessions, 0, anywhere),
            ];
            let chosen = p.choose(prompt, &cands, turn).unwrap();
            // What the holder saves: the prefix's tokens, or only loading them from the tier.
            let saved = held as f64 * if shared { p.shared_fraction } else { 1.0 };
            let extra_load = p.load_weight * (holder_sessions as f64 - other_sessions as f64);
            if holder_sessions <= other_sessions {
                prop_assert_eq!(chosen, 0);
            }
            // (Away from the exact tie, where float rounding decides.)
            if extra_load > saved + 1e-6 {
                prop_assert_eq!(chosen, 1, "load {} over savings {}", extra_load, saved);
            }
            if extra_load < saved - 1e-6 {
                prop_assert_eq!(chosen, 0);
            }
        }

        #[test]
        fn round_robin_cycles_through_the_live_daemons(
            cands in any_candidates(), turn in 0u64..1000, prompt in 0usize..100,
        ) {
            let live = cands.iter().filter(|c| c.up).count();
            prop_assume!(live > 0);
            let p = policy(Placement::RoundRobin);
            let mut seen: Vec<usize> = (0..live as u64)
                .map(|k| p.choose(prompt, &cands, turn + k).unwrap())
                .collect();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), live);
        }

        #[test]
        fn least_loaded_takes_a_daemon_with_the_fewest_sessions(
            cands in any_candidates(), turn in any::<u64>(),
        ) {
            let p = policy(Placement::LeastLoaded);
            if let Some(i) = p.choose(0, &cands, turn) {
                let least = cands.iter().filter(|c| c.up).map(|c| c.sessions).min().unwrap();
                prop_assert_eq!(cands[i].sessions, least);
            }
        }
    }

    #[test]
    fn equal_daemons_take_turns_under_every_policy() {
        for placement in [
            Placement::Cache,
            Placement::RoundRobin,
            Placement::LeastLoaded,
        ] {
            let cands = [candidate(1, true, 0, 0, 0), candidate(2, true, 0, 0, 0)];
            let p = policy(placement);
            let a = p.choose(10, &cands, 0).unwrap();
            let b = p.choose(10, &cands, 1).unwrap();
            assert_ne!(a, b, "{placement:?}");
        }
    }

    #[test]
    fn placement_names_parse_and_an_unknown_one_is_named() {
        assert_eq!("cache".parse(), Ok(Placement::Cache));
        assert_eq!("round-robin".parse(), Ok(Placement::RoundRobin));
        assert_eq!("least-loaded".parse(), Ok(Placement::LeastLoaded));
        let e = "nearest".parse::<Placement>().unwrap_err();
        assert!(e.contains("\"nearest\""), "{e}");
    }
}
