//! The paged KV pool's bytes: for every layer, keys and values in fixed-size pages, as f16 or
//! as Q8_0 blocks ([`KvDtype`]).
//!
//! Page `p` of layer `l` holds `page_size` token rows of `kv_heads × head_dim` keys (and as many
//! values), at element offset `p × page_size × kv_heads × head_dim` of that layer's buffers, the
//! layout `agentd_kernels::paged_attention` reads (for Q8_0, offsets in elements divided by 32
//! index the blocks). Which pages are free or shared is the scheduler's page pool's business;
//! this type only holds and copies the bytes.

use super::error::{ModelError, Result};
use super::ModelConfig;
use crate::executor::KvDtype;
use agentd_kernels::kv_store::{BlockQ8_0, KvStore, BLOCK_Q8_0_BYTES};
use half::f16;

/// A storage unit's host form (the disk tier's page bytes): little-endian f16 bits, or a Q8_0
/// block's scale bits then its 32 values.
pub trait HostBytes: KvStore {
    /// Bytes per unit.
    const BYTES: usize;
    /// Appends the unit's bytes.
    fn put(&self, out: &mut Vec<u8>);
    /// The unit from [`Self::BYTES`] bytes.
    fn get(bytes: &[u8]) -> Self;
}

impl HostBytes for f16 {
    const BYTES: usize = 2;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend(self.to_bits().to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
}

impl HostBytes for BlockQ8_0 {
    const BYTES: usize = BLOCK_Q8_0_BYTES;
    fn put(&self, out: &mut Vec<u8>) {
        out.extend(self.to_bytes());
    }
    fn get(b: &[u8]) -> Self {
        BlockQ8_0::from_bytes(b)
    }
}

/// Every layer's keys and values in units of `S`.
pub struct Layers<S> {
    /// Units per token row.
    row: usize,
    /// Per layer: the key pool.
    pub k: Vec<Vec<S>>,
    /// Per layer: the value pool.
    pub v: Vec<Vec<S>>,
}

impl<S: HostBytes> Layers<S> {
    fn new(layers: usize, row: usize, len: usize) -> Self {
        Layers {
            row,
            k: (0..layers).map(|_| vec![S::default(); len]).collect(),
            v: (0..layers).map(|_| vec![S::default(); len]).collect(),
        }
    }

    fn resize(&mut self, len: usize) {
        for b in self.k.iter_mut().chain(&mut self.v) {
            b.resize(len, S::default());
        }
    }

    fn size_bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|b| b.len() * S::BYTES)
            .sum()
    }

    fn copy_rows(&mut self, src: usize, dst: usize, rows: usize) {
        let (s, d, n) = (src * self.row, dst * self.row, rows * self.row);
        for b in self.k.iter_mut().chain(&mut self.v) {
            b.copy_within(s..s + n, d);
        }
    }

    fn read_rows(&self, row0: usize, rows: usize, out: &mut Vec<u8>) {
        let (at, n) = (row0 * self.row, rows * self.row);
        for l in 0..self.k.len() {
            for part in [&self.k[l][at..at + n], &self.v[l][at..at + n]] {
                for u in part {
                    u.put(out);
                }
            }
        }
    }

    fn write_rows(&mut self, row0: usize, rows: usize, bytes: &[u8]) {
        let (at, n) = (row0 * self.row, rows * self.row);
        let mut chunks = bytes.chunks_exact(n * S::BYTES);
        for l in 0..self.k.len() {
            for dst in [&mut self.k[l][at..at + n], &mut self.v[l][at..at + n]] {
                let src = chunks.next().expect("sized by the caller");
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(S::BYTES)) {
                    *d = S::get(b);
                }
            }
        }
    }
}

/// The pools in their storage type.
pub enum Pools {
    /// f16 values.
    F16(Layers<f16>),
    /// Q8_0 blocks of 32 values.
    Q8_0(Layers<BlockQ8_0>),
}

/// Keys and values of every layer for `num_pages` pages.
pub struct KvPages {
    page_size: usize,
    kv_row: usize,
    num_pages: usize,
    dtype: KvDtype,
    pools: Pools,
}

/// Checks that `config`'s heads can be stored as `dtype` (Q8_0 needs head sizes that are whole
/// blocks of 32), naming the head size when they cannot.
pub fn check_kv_dtype(config: &ModelConfig, dtype: KvDtype) -> Result<()> {
    if !config.head_dim.is_multiple_of(dtype.block()) {
        return Err(ModelError::BadOption(format!(
            "--kv-dtype {dtype} stores keys and values in blocks of {} values, but this model's \
             heads have {} (attention.key_length); use --kv-dtype f16",
            dtype.block(),
            config.head_dim
        )));
    }
    Ok(())
}

impl KvPages {
    /// f16 pages for a model with `config`'s layers and K/V heads, all zero.
    pub fn new(config: &ModelConfig, num_pages: usize, page_size: usize) -> Self {
        Self::build(config, KvDtype::F16, num_pages, page_size)
    }

    /// Pages of `dtype` for a model with `config`'s layers and K/V heads, all zero; refused
    /// when the heads are not whole blocks of `dtype` ([`check_kv_dtype`]).
    pub fn with_dtype(
        config: &ModelConfig,
        dtype: KvDtype,
        num_pages: usize,
        page_size: usize,
    ) -> Result<Self> {
        check_kv_dtype(config, dtype)?;
        Ok(Self::build(config, dtype, num_pages, page_size))
    }

    fn build(config: &ModelConfig, dtype: KvDtype, num_pages: usize, page_size: usize) -> Self {
        let kv_row = config.kv_heads * config.head_dim;
        let units = kv_row / dtype.block();
        let len = num_pages * page_size * units;
        let pools = match dtype {
            KvDtype::F16 => Pools::F16(Layers::new(config.layers, units, len)),
            KvDtype::Q8_0 => Pools::Q8_0(Layers::new(config.layers, units, len)),
        };
        Self {
            page_size,
            kv_row,
            num_pages,
            dtype,
            pools,
        }
    }

    /// Bytes of KV one token takes across all layers (keys and values) when stored as
    /// `dtype`: what the scheduler sizes the pool by.
    pub fn bytes_per_token(config: &ModelConfig, dtype: KvDtype) -> usize {
        config.layers * 2 * dtype.row_bytes(config.kv_heads * config.head_dim)
    }

    /// The storage type.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages held.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Elements of one token row (`kv_heads × head_dim`).
    pub fn kv_row(&self) -> usize {
        self.kv_row
    }

    /// Bytes held for all pages.
    pub fn size_bytes(&self) -> usize {
        match &self.pools {
            Pools::F16(p) => p.size_bytes(),
            Pools::Q8_0(p) => p.size_bytes(),
        }
    }

    /// Grows to at least `num_pages` pages (new pages are zero); never shrinks.
    pub fn grow(&mut self, num_pages: usize) {
        if num_pages <= self.num_pages {
            return;
        }
        let len = num_pages * self.page_size * self.kv_row / self.dtype.block();
        match &mut self.pools {
            Pools::F16(p) => p.resize(len),
            Pools::Q8_0(p) => p.resize(len),
        }
        self.num_pages = num_pages;
    }

    /// Every layer's pools (read-only).
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Every layer's pools (writable).
    pub fn pools_mut(&mut self) -> &mut Pools {
        &mut self.pools
    }

    /// Copies the first `tokens` rows of page `src` to page `dst` in every layer (copy on write
    /// of a partly filled page). Both ids must be below [`Self::num_pages`].
    pub fn copy_page(&mut self, src: u32, dst: u32, tokens: usize) {
        let ps = self.page_size;
        let (s, d, n) = (src as usize * ps, dst as usize * ps, tokens.min(ps));
        match &mut self.pools {
            Pools::F16(p) => p.copy_rows(s, d, n),
            Pools::Q8_0(p) => p.copy_rows(s, d, n),
        }
    }

    /// Appends page `page`'s bytes to `out`: for each layer its keys, then its values, as
    /// little-endian f16 or as Q8_0 blocks (an f16 scale, then 32 int8 values): the disk tier's
    /// page layout.
    pub fn read_page_bytes(&self, page: u32, out: &mut Vec<u8>) {
        let ps = self.page_size;
        match &self.pools {
            Pools::F16(p) => p.read_rows(page as usize * ps, ps, out),
            Pools::Q8_0(p) => p.read_rows(page as usize * ps, ps, out),
        }
    }

    /// Bytes of one page in [`Self::read_page_bytes`]'s layout.
    pub fn page_bytes(&self) -> usize {
        let layers = match &self.pools {
            Pools::F16(p) => p.k.len(),
            Pools::Q8_0(p) => p.k.len(),
        };
        layers * 2 * self.page_size * self.dtype.row_bytes(self.kv_row)
    }

    /// Overwrites page `page` with bytes in [`Self::read_page_bytes`]'s layout
    /// ([`Self::page_bytes`] of them).
    pub fn write_page_bytes(&mut self, page: u32, bytes: &[u8]) {
        assert_eq!(bytes.len(), self.page_bytes(), "one page of bytes");
        let ps = self.page_size;
        match &mut self.pools {
            Pools::F16(p) => p.write_rows(page as usize * ps, ps, bytes),
            Pools::Q8_0(p) => p.write_rows(page as usize * ps, ps, bytes),
        }
    }
}
