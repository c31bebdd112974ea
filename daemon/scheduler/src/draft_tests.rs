//! The draft model on fakes: a drafter that is always right (the target's own fake), always
//! wrong (its best token never the target's), right for a prefix of each draft, starved of
//! pages, catching a long context up in chunks, or failing outright. Every streamed token must
//! be the reference greedy token — the same as without a drafter — over several turns of
//! concurrent sessions, the target's pages and the draft pool accounted for after every run,
//! and the draft pool whole again once every session is closed.

use super::draft_model::DraftConfig;
use super::tests::{dec_with, page_bytes, reference_greedy_until};
use super::*;
use agentd_engine::executor::{KvLayout, ModelShape, SeqStep};
use agentd_engine::sampling::SamplingParams;
use agentd_engine::{ExecError, Executor, FakeExecutor, GenerateOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Large enough that prompt lookup rarely finds a draft: the drafts are the model's.
const VOCAB: usize = 64;
const CONTEXT: usize = 8192;
const PAGE: usize = 4;

/// How a fake drafter goes wrong.
#[derive(Clone, Copy)]
enum Skew {
    /// Never: the target's own logits.
    Right,
    /// Always: its best token is the target's second best.
    Wrong,
    /// At positions that are a multiple of 3.
    EveryThird,
    /// Its forward pass fails every third call.
    Failing,
}

/// A fake draft model: [`FakeExecutor`] (so its KV goes through its pages: a draft page
/// mishandled shows as a wrong draft) with its logits skewed as `skew` says.
struct FakeDrafter {
    inner: FakeExecutor,
    skew: Skew,
    calls: usize,
}

fn drafter(skew: Skew) -> Box<dyn Executor> {
    Box::new(FakeDrafter {
        inner: FakeExecutor::new(VOCAB, CONTEXT),
        skew,
        calls: 0,
    })
}

impl Executor for FakeDrafter {
    fn shape(&self) -> ModelShape {
        self.inner.shape()
    }
    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }
    fn allocate(&mut self, pages: usize, page_size: usize) -> std::result::Result<(), ExecError> {
        self.inner.allocate(pages, page_size)
    }
    fn layout(&self) -> KvLayout {
        self.inner.layout()
    }
    fn forward(
        &mut self,
        steps: &[SeqStep<'_>],
    ) -> std::result::Result<Vec<Option<Vec<f32>>>, ExecError> {
        self.calls += 1;
        if matches!(self.skew, Skew::Failing) && self.calls.is_multiple_of(3) {
            return Err(ExecError::Pool("the fake drafter fails".into()));
        }
        let mut out = self.inner.forward(steps)?;
        for (s, l) in steps.iter().zip(&mut out) {
            let Some(l) = l else { continue };
            let first = s.pos0 + s.tokens.len() - s.logits;
            for (j, row) in l.chunks_exact_mut(VOCAB).enumerate() {
                let wrong = match self.skew {
                    Skew::Right | Skew::Failing => false,
                    Skew::Wrong => true,
                    Skew::EveryThird => (first + j).is_multiple_of(3),
                };
                if wrong {
                    let best = (0..VOCAB)
                        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                        .unwrap();
                    row[best] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(out)
    }
    fn copy_page(
        &mut self,
        src: u32,
        dst: u32,
        tokens: usize,
    ) -> std::result::Result<(), ExecError> {
        self.inner.copy_page(src, dst, tokens)
    }
    fn page_bytes(&self) -> usize {
        self.inner.page_bytes()
    }
    fn read_page(&self, page: u32, out: &mut Vec<u8>) -> std::result::Result<(), ExecError> {
        self.inner.read_page(page, out)
    }
    fn write_page(&mut self, page: u32, bytes: &[u8]) -> std::result::Result<(), ExecError> {
        self.inner.write_page(page, bytes)
    }
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens,
        ..Default::default()
    }
}

/// What a run produced: each session's outputs, turn by turn, and the scheduler's figures.
struct Outcome {
    outputs: Vec<Vec<Vec<u32>>>,
    stats: SchedStats,
}

/// Runs `prompts` as concurrent sessions of `turns` generations of `max` tokens each (a few
/// tokens appended between turns), with `draft` as the draft model; checks every output
/// against the reference, the accounting after the run, and the draft pool once every session
/// is closed.
async fn run(
    draft: Option<Box<dyn Executor>>,
    draft_cfg: DraftConfig,
    prompts: &[Vec<u32>],
    turns: usize,
    max: usize,
) -> Outcome {
    let cfg = SchedulerConfig {
        page_size: PAGE,
        kv_memory: 512 * page_bytes(PAGE),
        speculation: SpecConfig {
            // Every sequence drafts, however busy the batch.
            small_batch: 8,
            ..SpecConfig::default()
        },
        draft: draft_cfg,
        ..SchedulerConfig::default()
    };
    let h = SchedulerHandle::spawn_with_drafter(
        Box::new(FakeExecutor::new(VOCAB, CONTEXT)),
        draft,
        cfg,
    )
    .unwrap();
    let mut tasks = Vec::new();
    for (n, p) in prompts.iter().enumerate() {
        let (h, p) = (h.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            let sid = h.create_session(0, None, p).await.unwrap();
            let mut outs = Vec::new();
            for turn in 0..turns {
                if turn > 0 {
                    let more = vec![(n * 7 + turn) as u32 % VOCAB as u32, 5, 9];
                    h.append(0, sid, more).await.unwrap();
                }
                let (log, _) = h.session_tokens(0, sid).await.unwrap();
                let mut rx = h
                    .generate(0, sid, dec_with(greedy(max), vec![]))
                    .await
                    .unwrap();
                let mut ids = Vec::new();
                while let Some(ev) = rx.recv().await {
                    match ev {
                        Event::Token { id, .. } => ids.push(id),
                        Event::Done(_) => break,
                        Event::Error(e) => panic!("{e}"),
                    }
                }
                assert_eq!(ids, reference_greedy_until(&log, max, VOCAB, None));
                outs.push(ids);
            }
            (sid, outs)
        }));
    }
    let mut outputs = Vec::new();
    let mut sessions = Vec::new();
    for t in tasks {
        let (sid, outs) = t.await.unwrap();
        sessions.push(sid);
        outputs.push(outs);
    }
    h.check_invariants().await.unwrap().unwrap();
    let stats = h.stats().await.unwrap();
    for sid in sessions {
        h.close(0, sid).await.unwrap();
    }
    h.check_invariants().await.unwrap().unwrap();
    if let Some((free, capacity)) = h.draft_pool().await.unwrap() {
        assert_eq!(free, capacity, "draft pages leaked");
    }
    Outcome { outputs, stats }
}

fn prompts(seed: u64, n: usize, len: usize) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            (0..len + i * 3)
                .map(|_| rng.random_range(0..VOCAB as u32))
                .collect()
        })
        .collect()
}

/// Always draft (the gate judges wall-clock time, meaningless on the fake).
fn always() -> DraftConfig {
    DraftConfig {
        adaptive: false,
        ..DraftConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_model_changes_no_token_whether_right_or_wrong() {
    let ps = prompts(11, 4, 21);
    let (turns, max) = (3, 40);
    let without = run(None, always(), &ps, turns, max).await;
    assert_eq!(without.stats.spec_model_drafted, 0);
    for skew in [Skew::Right, Skew::Wrong, Skew::EveryThird] {
        let with = run(Some(drafter(skew)), always(), &ps, turns, max).await;
        assert_eq!(with.outputs, without.outputs);
        let s = &with.stats;
        assert!(s.spec_model_drafted > 50, "{s:?}");
        assert!(s.spec_model_drafted <= s.spec_drafted, "{s:?}");
        match skew {
            // Its KV went through its pages correctly across turns and rejections.
            Skew::Right => assert_eq!(s.spec_model_accepted, s.spec_model_drafted, "{s:?}"),
            Skew::Wrong => assert_eq!(s.spec_model_accepted, 0, "{s:?}"),
            _ => assert!(
                s.spec_model_accepted > 0 && s.spec_model_accepted < s.spec_model_drafted,
                "{s:?}"
            ),
        }
    }
}

/// A pool of two draft pages holds no sequence's context: nobody gets a model draft, and
/// nothing fails. A pool for about one sequence at a time makes the sessions evict each
/// other's draft state, least recently used first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_pool_too_small_falls_back_to_model_free_drafts() {
    let ps = prompts(12, 4, 30);
    let (turns, max) = (2, 30);
    let without = run(None, always(), &ps, turns, max).await;
    let tiny = DraftConfig {
        kv_memory: 2 * page_bytes(PAGE),
        ..always()
    };
    let with = run(Some(drafter(Skew::Right)), tiny, &ps, turns, max).await;
    assert_eq!(with.outputs, without.outputs);
    assert_eq!(with.stats.spec_model_drafted, 0, "{:?}", with.stats);
    let one = DraftConfig {
        kv_memory: 30 * page_bytes(PAGE),
        ..always()
    };
    let with = run(Some(drafter(Skew::Right)), one, &ps, turns, max).await;
    assert_eq!(with.outputs, without.outputs);
    let s = &with.stats;
    assert!(s.spec_model_drafted > 0, "{s:?}");
    assert_eq!(s.spec_model_accepted, s.spec_model_drafted, "{s:?}");
}

/// A context longer than a chunk is fed over several steps before the first model draft.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_context_is_fed_to_the_draft_model_in_chunks() {
    let ps = prompts(13, 2, 90);
    let chunked = DraftConfig {
        prefill_chunk: 8,
        ..always()
    };
    let without = run(None, always(), &ps, 2, 40).await;
    let with = run(Some(drafter(Skew::Right)), chunked, &ps, 2, 40).await;
    assert_eq!(with.outputs, without.outputs);
    let s = &with.stats;
    assert!(s.spec_model_drafted > 0, "{s:?}");
    assert_eq!(s.spec_model_accepted, s.spec_model_drafted, "{s:?}");
}

/// A draft model whose forward pass fails loses its drafts for that step, never a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_draft_model_fails_no_request() {
    let ps = prompts(14, 3, 20);
    let without = run(None, always(), &ps, 2, 40).await;
    let with = run(Some(drafter(Skew::Failing)), always(), &ps, 2, 40).await;
    assert_eq!(with.outputs, without.outputs);
    assert!(with.stats.spec_model_accepted > 0, "{:?}", with.stats);
}
