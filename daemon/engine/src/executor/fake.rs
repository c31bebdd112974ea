//! [`FakeExecutor`]: a deterministic stand-in for a model, for testing the scheduler fast and
//! with no model file.
//!
//! Each position's "KV" is one 64-bit state, `mix(state at pos - 1, token, pos)`, written into
//! the sequence's page and read back from it on the next step, so the logits of a row depend on
//! every token before it *through the pages*: a page shared with the wrong sequence, freed while
//! still in use, or not copied before a write changes the logits, and a test comparing against
//! [`FakeExecutor::reference_logits`] (the same hash over the token list alone) catches it.

use super::{check_page, ExecError, Executor, KvDtype, KvLayout, ModelShape, SeqStep};
use crate::model::ModelError;

const SEED: u64 = 0x6a09_e667_f3bc_c908;
/// Bytes per position: one u64 state.
const SLOT: usize = 8;

/// A fake model with a `vocab`-token vocabulary and a `context_length`-token context.
pub struct FakeExecutor {
    shape: ModelShape,
    page_size: usize,
    /// One state per position slot, `page_size` slots per page; `None` means never written.
    slots: Vec<Option<u64>>,
    steps: usize,
    rows: Vec<usize>,
}

impl FakeExecutor {
    /// A fake model; [`Executor::allocate`] makes its pages.
    pub fn new(vocab: usize, context_length: usize) -> Self {
        Self {
            shape: ModelShape {
                vocab,
                context_length,
                window: None,
            },
            page_size: 16,
            slots: Vec::new(),
            steps: 0,
            rows: Vec::new(),
        }
    }

    /// The same fake, as a model whose every layer sees only the last `window` keys: each
    /// step then also checks that every position its rows may read (from
    /// [`super::first_key_read`] on) still holds a written slot.
    pub fn with_window(mut self, window: usize) -> Self {
        self.shape.window = Some(window);
        self
    }

    /// Forward steps run so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Rows (tokens) computed in each step so far, in order.
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }

    /// The logits a correct executor returns after `tokens` (the whole sequence so far).
    pub fn reference_logits(tokens: &[u32], vocab: usize) -> Vec<f32> {
        let mut state = SEED;
        for (pos, &t) in tokens.iter().enumerate() {
            state = mix(state, t, pos);
        }
        logits_for(state, vocab)
    }

    fn slot(&self, table: &[u32], pos: usize) -> usize {
        table[pos / self.page_size] as usize * self.page_size + pos % self.page_size
    }

    fn pages(&self) -> usize {
        self.slots.len() / self.page_size
    }

    fn check(&self, s: &SeqStep<'_>) -> Result<(), ExecError> {
        let n = s.tokens.len();
        let bad = |reason: String| ModelError::BadTensor {
            name: "input".into(),
            reason,
        };
        if n == 0 {
            return Err(bad("no tokens to run".into()).into());
        }
        if s.pos0 + n > self.shape.context_length {
            return Err(ModelError::ContextOverflow {
                needed: s.pos0 + n,
                limit: self.shape.context_length,
            }
            .into());
        }
        if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= self.shape.vocab) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab: self.shape.vocab,
            }
            .into());
        }
        let need = (s.pos0 + n).div_ceil(self.page_size);
        if s.page_table.len() < need {
            return Err(bad(format!(
                "page table has {} pages, positions up to {} need {need}",
                s.page_table.len(),
                s.pos0 + n
            ))
            .into());
        }
        for &p in &s.page_table[..need] {
            check_page(p, self.pages())?;
        }
        if let Some(w) = self.shape.window {
            for q in super::first_key_read(s.pos0, w)..s.pos0 {
                if self.slots[self.slot(s.page_table, q)].is_none() {
                    return Err(bad(format!(
                        "position {q} is inside the window of position {} but was never written",
                        s.pos0
                    ))
                    .into());
                }
            }
        }
        Ok(())
    }
}

/// The next state after `token` at `pos` (splitmix64 finaliser over the inputs).
fn mix(prev: u64, token: u32, pos: usize) -> u64 {
    let mut z = prev ^ (u64::from(token) << 20) ^ (pos as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Logits in [-4, 4) derived from a state.
fn logits_for(state: u64, vocab: usize) -> Vec<f32> {
    (0..vocab)
        .map(|i| {
            let h = mix(state, i as u32, 0);
            (h >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0
        })
        .collect()
}

impl Executor for FakeExecutor {
    fn shape(&self) -> ModelShape {
        self.shape
    }

    fn kv_bytes_per_token(&self) -> usize {
        SLOT
    }

    fn allocate(&mut self, pages: usize, page_size: usize) -> Result<(), ExecError> {
        if page_size == 0 {
            return Err(ExecError::Pool(
                "a page must hold at least one token".into(),
            ));
        }
        self.page_size = page_size;
        self.slots = vec![None; pages * page_size];
        Ok(())
    }

    fn layout(&self) -> KvLayout {
        KvLayout {
            page_size: self.page_size,
            pages: self.pages(),
            layers: 1,
            kv_heads: 1,
            head_dim: 2,
            dtype: KvDtype::F16,
        }
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Vec<Option<Vec<f32>>>, ExecError> {
        for s in steps {
            self.check(s)?;
        }
        self.steps += 1;
        self.rows.push(steps.iter().map(|s| s.tokens.len()).sum());
        let mut out = Vec::with_capacity(steps.len());
        for s in steps {
            let mut state = match s.pos0 {
                0 => SEED,
                p => self.slots[self.slot(s.page_table, p - 1)].ok_or_else(|| {
                    ModelError::BadTensor {
                        name: "kv".into(),
                        reason: format!("position {} was never written", p - 1),
                    }
                })?,
            };
            let mut logits = Vec::new();
            let first_wanted = s.tokens.len().saturating_sub(s.logits);
            for (j, &t) in s.tokens.iter().enumerate() {
                let pos = s.pos0 + j;
                state = mix(state, t, pos);
                let at = self.slot(s.page_table, pos);
                self.slots[at] = Some(state);
                if j >= first_wanted {
                    logits.extend(logits_for(state, self.shape.vocab));
                }
            }
            out.push((s.logits > 0).then_some(logits));
        }
        Ok(out)
    }

    fn copy_page(&mut self, src: u32, dst: u32, tokens: usize) -> Result<(), ExecError> {
        check_page(src, self.pages())?;
        check_page(dst, self.pages())?;
        let ps = self.page_size;
        let n = tokens.min(ps);
        let (s, d) = (src as usize * ps, dst as usize * ps);
        self.slots.copy_within(s..s + n, d);
        Ok(())
    }

    fn page_bytes(&self) -> usize {
        self.page_size * SLOT
    }

    fn read_page(&self, page: u32, out: &mut Vec<u8>) -> Result<(), ExecError> {
        check_page(page, self.pages())?;
        let at = page as usize * self.page_size;
        for s in &self.slots[at..at + self.page_size] {
            out.extend(s.unwrap_or(0).to_le_bytes());
        }
        Ok(())
    }

    fn write_page(&mut self, page: u32, bytes: &[u8]) -> Result<(), ExecError> {
        check_page(page, self.pages())?;
        if bytes.len() != self.page_bytes() {
            return Err(ExecError::PageBytes {
                expected: self.page_bytes(),
                got: bytes.len(),
            });
        }
        let at = page as usize * self.page_size;
        for (i, b) in bytes.chunks_exact(SLOT).enumerate() {
            let v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
            self.slots[at + i] = Some(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::RowKind;

    #[test]
    fn paged_steps_match_the_reference() {
        let mut ex = FakeExecutor::new(50, 64);
        ex.allocate(8, 4).unwrap();
        let toks: Vec<u32> = (0..10).map(|i| (i * 7 % 50) as u32).collect();
        let table = [5, 2, 7];
        let first = ex
            .forward(&[SeqStep {
                tokens: &toks[..6],
                pos0: 0,
                page_table: &table,
                kind: RowKind::Prompt,
                logits: 1,
            }])
            .unwrap();
        assert_eq!(
            first[0].as_deref(),
            Some(&FakeExecutor::reference_logits(&toks[..6], 50)[..])
        );
        let second = ex
            .forward(&[SeqStep {
                tokens: &toks[6..],
                pos0: 6,
                page_table: &table,
                kind: RowKind::Prompt,
                logits: 1,
            }])
            .unwrap();
        assert_eq!(
            second[0].as_deref(),
            Some(&FakeExecutor::reference_logits(&toks, 50)[..])
        );
        assert_eq!(ex.rows(), &[6, 4]);
    }

    #[test]
    fn a_wrong_page_changes_the_logits_and_bad_input_is_refused() {
        let mut ex = FakeExecutor::new(50, 16);
        ex.allocate(4, 4).unwrap();
        let run = |ex: &mut FakeExecutor, toks: &[u32], pos0, table: &[u32]| {
            ex.forward(&[SeqStep {
                tokens: toks,
                pos0,
                page_table: table,
                kind: RowKind::Prompt,
                logits: 1,
            }])
        };
        run(&mut ex, &[1, 2, 3, 4, 5], 0, &[0, 1]).unwrap();
        run(&mut ex, &[9, 9, 9, 9, 9], 0, &[2, 3]).unwrap();
        // Continue the first sequence but point at the second's last page.
        let got = run(&mut ex, &[6], 5, &[0, 3]).unwrap();
        assert_ne!(
            got[0].as_deref(),
            Some(&FakeExecutor::reference_logits(&[1, 2, 3, 4, 5, 6], 50)[..])
        );
        assert!(run(&mut ex, &[60], 0, &[0]).is_err(), "token out of range");
        assert!(
            run(&mut ex, &[1; 5], 0, &[0]).is_err(),
            "page table too short"
        );
        assert!(run(&mut ex, &[1], 16, &[0, 1, 2, 3, 0]).is_err(), "context");
        let mut page = Vec::new();
        ex.read_page(1, &mut page).unwrap();
        ex.write_page(2, &page).unwrap();
        assert!(ex.write_page(2, &page[1..]).is_err());
        assert!(ex.read_page(4, &mut page).is_err());
    }
}
