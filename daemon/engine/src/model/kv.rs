//! The paged KV pool's bytes: for every layer, f16 keys and values in fixed-size pages.
//!
//! Page `p` of layer `l` holds `page_size` token rows of `kv_heads × head_dim` keys (and as many
//! values), at element offset `p × page_size × kv_heads × head_dim` of that layer's buffers, the
//! layout `agentd_kernels::paged_attention` reads. Which pages are free or shared is the
//! scheduler's page pool's business; this type only holds and copies the bytes.

use super::ModelConfig;
use half::f16;

/// f16 keys and values of every layer for `num_pages` pages.
pub struct KvPages {
    page_size: usize,
    kv_row: usize,
    num_pages: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl KvPages {
    /// Pages for a model with `config`'s layers and K/V heads, all zero.
    pub fn new(config: &ModelConfig, num_pages: usize, page_size: usize) -> Self {
        let kv_row = config.kv_heads * config.head_dim;
        let len = num_pages * page_size * kv_row;
        Self {
            page_size,
            kv_row,
            num_pages,
            k: (0..config.layers).map(|_| vec![f16::ZERO; len]).collect(),
            v: (0..config.layers).map(|_| vec![f16::ZERO; len]).collect(),
        }
    }

    /// Bytes of KV one token takes across all layers (keys and values, f16).
    pub fn bytes_per_token(config: &ModelConfig) -> usize {
        config.layers * config.kv_heads * config.head_dim * 2 * std::mem::size_of::<f16>()
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
        self.k.iter().chain(&self.v).map(|b| b.len() * 2).sum()
    }

    /// Grows to at least `num_pages` pages (new pages are zero); never shrinks.
    pub fn grow(&mut self, num_pages: usize) {
        if num_pages <= self.num_pages {
            return;
        }
        let len = num_pages * self.page_size * self.kv_row;
        for b in self.k.iter_mut().chain(&mut self.v) {
            b.resize(len, f16::ZERO);
        }
        self.num_pages = num_pages;
    }

    /// Layer `layer`'s keys and values (read-only).
    pub fn layer(&self, layer: usize) -> (&[f16], &[f16]) {
        (&self.k[layer], &self.v[layer])
    }

    /// Layer `layer`'s keys and values (writable).
    pub fn layer_mut(&mut self, layer: usize) -> (&mut [f16], &mut [f16]) {
        (&mut self.k[layer], &mut self.v[layer])
    }

    /// Copies the first `tokens` rows of page `src` to page `dst` in every layer (copy on write
    /// of a partly filled page). Both ids must be below [`Self::num_pages`].
    pub fn copy_page(&mut self, src: u32, dst: u32, tokens: usize) {
        let page = self.page_size * self.kv_row;
        let n = tokens.min(self.page_size) * self.kv_row;
        let (s, d) = (src as usize * page, dst as usize * page);
        for b in self.k.iter_mut().chain(&mut self.v) {
            b.copy_within(s..s + n, d);
        }
    }

    /// Appends page `page`'s bytes to `out`: for each layer its keys, then its values, as
    /// little-endian f16 (the disk tier's page layout).
    pub fn read_page_bytes(&self, page: u32, out: &mut Vec<u8>) {
        let n = self.page_size * self.kv_row;
        let at = page as usize * n;
        for l in 0..self.k.len() {
            for half in [&self.k[l][at..at + n], &self.v[l][at..at + n]] {
                out.extend(half.iter().flat_map(|x| x.to_bits().to_le_bytes()));
            }
        }
    }

    /// Bytes of one page in [`Self::read_page_bytes`]'s layout.
    pub fn page_bytes(&self) -> usize {
        self.k.len() * 2 * self.page_size * self.kv_row * 2
    }

    /// Overwrites page `page` with bytes in [`Self::read_page_bytes`]'s layout
    /// ([`Self::page_bytes`] of them).
    pub fn write_page_bytes(&mut self, page: u32, bytes: &[u8]) {
        let n = self.page_size * self.kv_row;
        assert_eq!(bytes.len(), self.page_bytes(), "one page of bytes");
        let at = page as usize * n;
        let mut chunks = bytes.chunks_exact(n * 2);
        for l in 0..self.k.len() {
            for dst in [&mut self.k[l][at..at + n], &mut self.v[l][at..at + n]] {
                let src = chunks.next().expect("sized above");
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
            }
        }
    }
}
