//! Tests for shared-prefix (cascade) attention: sequences whose page tables share leading pages,
//! their prefix attended once for all their rows, each continued over its own pages, give the
//! same bits as attending each sequence alone, for f16 and Q8_0 pages, decode and prompt rows;
//! and bad shapes are errors.
use super::tests::gen;
use super::*;
use proptest::prelude::*;

/// Sequences sharing their first `shared_pages` pages, then each on pages of its own.
struct Shared<S> {
    shape: AttentionShape,
    page_size: usize,
    k_pool: Vec<S>,
    v_pool: Vec<S>,
    tables: Vec<Vec<u32>>,
    /// Each sequence's first query position and its query rows.
    seqs: Vec<(usize, Vec<f32>)>,
}

impl<S: KvStore> Shared<S> {
    /// `own[i] = (extra keys past the shared pages before the rows, rows)`.
    fn new(
        shape: AttentionShape,
        page_size: usize,
        shared_pages: usize,
        own: &[(usize, usize)],
        seed: u32,
    ) -> Self {
        let kv_row = shape.kv_heads * shape.head_dim;
        let shared = shared_pages * page_size;
        let own_pages: Vec<usize> = own
            .iter()
            .map(|&(extra, rows)| (extra + rows).div_ceil(page_size))
            .collect();
        let num_pages = shared_pages + own_pages.iter().sum::<usize>() + 1;
        // Pages handed out back to front, so tables are not the identity.
        let mut next = num_pages as u32;
        let mut take = || {
            next -= 1;
            next
        };
        let common: Vec<u32> = (0..shared_pages).map(|_| take()).collect();
        let tables: Vec<Vec<u32>> = own_pages
            .iter()
            .map(|&n| {
                common
                    .iter()
                    .copied()
                    .chain((0..n).map(|_| take()))
                    .collect()
            })
            .collect();
        let units = num_pages * page_size * kv_row / S::ELEMS;
        let (mut k_pool, mut v_pool) = (vec![S::default(); units], vec![S::default(); units]);
        let mut write = |table: &[u32], lo: usize, hi: usize, salt: u32| {
            let k = gen((hi - lo) * kv_row, seed, salt);
            let v = gen((hi - lo) * kv_row, seed, salt + 1);
            let kv = PagedKvMut {
                k_pool: &mut k_pool,
                v_pool: &mut v_pool,
                page_size,
                page_table: table,
            };
            write_kv(shape, kv, lo, &k, &v).unwrap();
        };
        write(&tables[0], 0, shared, 10);
        let mut seqs = Vec::new();
        for (i, &(extra, rows)) in own.iter().enumerate() {
            let pos0 = shared + extra;
            write(&tables[i], shared, pos0 + rows, 20 + 2 * i as u32);
            let q = gen(rows * shape.heads * shape.head_dim, seed, 100 + i as u32);
            seqs.push((pos0, q));
        }
        Shared {
            shape,
            page_size,
            k_pool,
            v_pool,
            tables,
            seqs,
        }
    }

    fn kv(&self, i: usize) -> PagedKv<'_, S> {
        PagedKv {
            k_pool: &self.k_pool,
            v_pool: &self.v_pool,
            page_size: self.page_size,
            page_table: &self.tables[i],
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.shape.head_dim as f32).sqrt()
    }

    /// Each sequence attended alone.
    fn alone(&self) -> Vec<Vec<f32>> {
        self.seqs
            .iter()
            .enumerate()
            .map(|(i, (pos0, q))| {
                let mut out = vec![f32::NAN; q.len()];
                paged_causal_attention(self.shape, q, self.kv(i), *pos0, self.scale(), &mut out)
                    .unwrap();
                out
            })
            .collect()
    }

    /// The shared `keys` attended once for every row, then each sequence after them.
    fn cascade(&self, keys: usize) -> Vec<Vec<f32>> {
        let q_all: Vec<f32> = self.seqs.iter().flat_map(|(_, q)| q.clone()).collect();
        let states =
            paged_prefix_states(self.shape, &q_all, self.kv(0), keys, self.scale()).unwrap();
        let q_row = self.shape.heads * self.shape.head_dim;
        let mut row = 0;
        self.seqs
            .iter()
            .enumerate()
            .map(|(i, (pos0, q))| {
                let rows = q.len() / q_row;
                let prefix = states.slice(row..row + rows).unwrap();
                row += rows;
                let mut out = vec![f32::NAN; q.len()];
                paged_attention_after_prefix(
                    self.shape,
                    q,
                    self.kv(i),
                    *pos0,
                    self.scale(),
                    prefix,
                    &mut out,
                )
                .unwrap();
                out
            })
            .collect()
    }
}

fn check<S: KvStore>(
    shape: AttentionShape,
    page_size: usize,
    chunks: usize,
    own: &[(usize, usize)],
    seed: u32,
) -> std::result::Result<(), TestCaseError> {
    let keys = chunks * CHUNK;
    let shared_pages = keys.div_ceil(page_size);
    let c = Shared::<S>::new(shape, page_size, shared_pages, own, seed);
    let (alone, cascade) = (c.alone(), c.cascade(keys));
    for (i, (a, b)) in alone.iter().zip(&cascade).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        prop_assert!(same, "{}: sequence {} differs", S::NAME, i);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn cascade_equals_attending_alone_bit_for_bit(
        kv_heads in 1usize..3, group in 1usize..=3,
        head_dim in prop_oneof![Just(32usize), Just(64), Just(128)],
        page_size in prop_oneof![Just(1usize), Just(16), Just(48), Just(256)],
        chunks in 1usize..=2,
        own in proptest::collection::vec(
            (0usize..400, prop_oneof![3 => Just(1usize), 1 => 2usize..20]), 1..6),
        seed in 0u32..1000,
    ) {
        let shape = AttentionShape { heads: kv_heads * group, kv_heads, head_dim };
        check::<f16>(shape, page_size, chunks, &own, seed)?;
        check::<BlockQ8_0>(shape, page_size, chunks, &own, seed)?;
    }
}

#[test]
fn bad_prefixes_are_errors() {
    let shape = AttentionShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
    };
    let c = Shared::<f16>::new(shape, 16, 16, &[(10, 1), (0, 1)], 1);
    let q_all: Vec<f32> = c.seqs.iter().flat_map(|(_, q)| q.clone()).collect();
    // Not whole chunks.
    assert!(paged_prefix_states(shape, &q_all, c.kv(0), 100, 0.1).is_err());
    assert!(paged_prefix_states(shape, &q_all, c.kv(0), 0, 0.1).is_err());
    // Past the page table.
    assert!(paged_prefix_states(shape, &q_all, c.kv(0), 4 * CHUNK, 0.1).is_err());
    // Ragged queries.
    assert!(paged_prefix_states(shape, &q_all[1..], c.kv(0), CHUNK, 0.1).is_err());
    let states = paged_prefix_states(shape, &q_all, c.kv(0), CHUNK, 0.1).unwrap();
    assert_eq!((states.keys(), states.rows()), (CHUNK, 2));
    assert!(states.slice(1..3).is_none());
    let one = states.slice(0..1).unwrap();
    let (pos0, q) = &c.seqs[0];
    let mut out = vec![0f32; q.len()];
    // Rows that do not match the states.
    let two = states.slice(0..2).unwrap();
    assert!(paged_attention_after_prefix(shape, q, c.kv(0), *pos0, 0.1, two, &mut out).is_err());
    // A prefix past the first query.
    assert!(
        paged_attention_after_prefix(shape, q, c.kv(0), CHUNK - 1, 0.1, one, &mut out).is_err()
    );
    paged_attention_after_prefix(shape, q, c.kv(0), *pos0, 0.1, one, &mut out).unwrap();
}
