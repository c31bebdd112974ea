//! [`CpuExecutor`]: the GGUF model's forward pass on the CPU over KV pages (f16 or Q8_0) in
//! host memory.

use super::{check_page, ExecError, Executor, KvDtype, KvLayout, ModelShape, SeqStep};
use crate::model::{check_kv_dtype, KvPages, Model};
use std::sync::Arc;

/// The model's weights and the KV pages, on the CPU (rayon's thread pool runs the kernels).
pub struct CpuExecutor {
    model: Arc<Model>,
    dtype: KvDtype,
    kv: KvPages,
}

impl CpuExecutor {
    /// An executor for `model` with no pages yet ([`Executor::allocate`] makes them), storing
    /// KV as the model was loaded to ([`Model::kv_dtype`]).
    pub fn new(model: Arc<Model>) -> Self {
        let dtype = model.kv_dtype();
        Self::with_kv_dtype(model, dtype).expect("checked when the model was loaded")
    }

    /// An executor for `model` whose pages store KV as `dtype` (one loaded model can back
    /// executors of both dtypes, as the KV quality bench does); refused when the model's head
    /// size is not whole blocks of `dtype`.
    pub fn with_kv_dtype(model: Arc<Model>, dtype: KvDtype) -> Result<Self, ExecError> {
        check_kv_dtype(model.config(), dtype)?;
        let kv = KvPages::with_dtype(model.config(), dtype, 0, 16)?;
        Ok(Self { model, dtype, kv })
    }
}

impl Executor for CpuExecutor {
    fn shape(&self) -> ModelShape {
        let c = self.model.config();
        ModelShape {
            vocab: c.vocab,
            context_length: c.context_length,
            window: c
                .sliding_window
                .filter(|_| c.windowed_layers.len() == c.layers),
        }
    }

    fn kv_bytes_per_token(&self) -> usize {
        KvPages::bytes_per_token(self.model.config(), self.dtype)
    }

    fn allocate(&mut self, pages: usize, page_size: usize) -> Result<(), ExecError> {
        if page_size == 0 {
            return Err(ExecError::Pool(
                "a page must hold at least one token".into(),
            ));
        }
        self.kv = KvPages::with_dtype(self.model.config(), self.dtype, pages, page_size)?;
        Ok(())
    }

    fn layout(&self) -> KvLayout {
        let c = self.model.config();
        KvLayout {
            page_size: self.kv.page_size(),
            pages: self.kv.num_pages(),
            layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            dtype: self.dtype,
        }
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Vec<Option<Vec<f32>>>, ExecError> {
        let (model, kv) = (&self.model, &mut self.kv);
        Ok(agentd_kernels::pool::hot(|| {
            model.forward_batch(steps, kv)
        })?)
    }

    fn copy_page(&mut self, src: u32, dst: u32, tokens: usize) -> Result<(), ExecError> {
        check_page(src, self.kv.num_pages())?;
        check_page(dst, self.kv.num_pages())?;
        self.kv.copy_page(src, dst, tokens);
        Ok(())
    }

    fn page_bytes(&self) -> usize {
        self.kv.page_bytes()
    }

    fn read_page(&self, page: u32, out: &mut Vec<u8>) -> Result<(), ExecError> {
        check_page(page, self.kv.num_pages())?;
        self.kv.read_page_bytes(page, out);
        Ok(())
    }

    fn write_page(&mut self, page: u32, bytes: &[u8]) -> Result<(), ExecError> {
        check_page(page, self.kv.num_pages())?;
        if bytes.len() != self.kv.page_bytes() {
            return Err(ExecError::PageBytes {
                expected: self.kv.page_bytes(),
                got: bytes.len(),
            });
        }
        self.kv.write_page_bytes(page, bytes);
        Ok(())
    }
}
