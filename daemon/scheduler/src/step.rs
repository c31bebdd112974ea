//! One scheduler step: choose the batch (every running decode plus prefill chunks under the token
//! budget), make sure its pages exist (evicting cache, then preempting the youngest sequence),
//! run the forward pass, sample, stream, and retire finished sequences.

use super::scheduler::{Request, Scheduler, Seq, SharedDrafter, Work};
use super::types::*;
use crate::cache::PageId;
use crate::draft_model::DraftJob;
use agentd_engine::executor::{first_key_read, RowKind, SeqStep};
use agentd_engine::{ExecError, Executor, FinishReason};
use agentd_kvtier::events::EventKind;
use std::time::Instant;

/// One sequence's share of a step.
#[derive(Debug, Clone)]
struct Planned {
    seq: usize,
    /// Rows: the tokens the step computes (a decode row's draft included).
    tokens: usize,
    kind: RowKind,
    /// Draft tokens after a decode row's token, verified by this step ([`crate::spec`]).
    /// For a sequence the draft model drafts for (`model_k > 0`), the model-free fallback
    /// until the step runs, then the draft used.
    draft: Vec<u32>,
    /// Tokens the draft model is asked for at the start of the step (0: none); `tokens`
    /// reserves room for all of them.
    model_k: usize,
    /// Whether `draft` came from the draft model.
    from_model: bool,
}

/// The usage reported when a generation ends now, for `finish` (`None` for a prefix
/// registration).
fn usage(req: &Request, finish: FinishReason) -> Option<Usage> {
    let Work::Generate { dec, .. } = &req.work else {
        return None;
    };
    let now = Instant::now();
    Some(Usage {
        prompt_tokens: req.prompt_len,
        cached_tokens: req.cached_tokens.unwrap_or(0),
        disk_cached_tokens: match (req.cached_tokens, req.memory_match) {
            (Some(cached), Some(memory)) => cached
                .min(req.tier_match.unwrap_or(cached))
                .saturating_sub(memory),
            _ => 0,
        },
        tier_cached_tokens: match (req.cached_tokens, req.tier_match) {
            (Some(cached), Some(before)) => cached.saturating_sub(before),
            _ => 0,
        },
        queue: req.admitted.unwrap_or(now) - req.submitted,
        generated_tokens: dec.tokens.len(),
        finish,
        ttft: req.first_token.unwrap_or(now) - req.submitted,
        total: now - req.submitted,
        preemptions: req.preemptions,
        constraint_seconds: dec.constraint_seconds(),
    })
}

/// One sequence's rows of a step, owned, so the step can run on another thread while the
/// scheduler thread keeps answering commands.
#[derive(Debug, Clone)]
pub(super) struct OwnedStep {
    tokens: Vec<u32>,
    pos0: usize,
    table: Vec<u32>,
    kind: RowKind,
    logits: usize,
}

/// What a forward pass returns: per sequence, its logits when asked for.
pub(super) type StepOutput = std::result::Result<Vec<Option<Vec<f32>>>, ExecError>;

/// A step between [`Scheduler::begin_step`] and [`Scheduler::finish_step`]: while it is in
/// flight the running sequences and the page pool must not change (commands that would change
/// them wait; see [`super::SchedulerHandle`]).
pub(super) struct InFlight {
    plan: Vec<Planned>,
    steps: Vec<OwnedStep>,
    /// A copy-on-write failure while preparing the pages: the step is not run.
    prepared: std::result::Result<(), ExecError>,
    computed: usize,
    /// The draft model, when some sequence asks it for a draft this step.
    drafter: Option<SharedDrafter>,
    /// Per plan entry with `model_k > 0`: its index and its draft request.
    jobs: Vec<(usize, DraftJob)>,
    /// How long drafting and the forward pass took.
    seconds: f64,
}

impl InFlight {
    /// Drafts with the draft model where asked (each draft, or the model-free fallback when
    /// the model gives none, becomes extra decode rows of its sequence), then runs the
    /// forward pass on `exec`.
    pub(super) fn run(&mut self, exec: &mut dyn Executor) -> StepOutput {
        std::mem::replace(&mut self.prepared, Ok(()))?;
        let t0 = Instant::now();
        if let Some(d) = &self.drafter {
            let jobs: Vec<DraftJob> = self.jobs.iter().map(|(_, j)| j.clone()).collect();
            let drafts = d.lock().unwrap_or_else(|e| e.into_inner()).draft(&jobs);
            for ((i, _), model) in self.jobs.iter().zip(drafts) {
                let p = &mut self.plan[*i];
                if !model.is_empty() {
                    p.draft = model;
                    p.from_model = true;
                }
                p.tokens = 1 + p.draft.len();
                let st = &mut self.steps[*i];
                st.tokens.extend_from_slice(&p.draft);
                st.logits = 1 + p.draft.len();
            }
            self.computed = self.plan.iter().map(|p| p.tokens).sum();
        }
        let out = self.forward(exec);
        self.seconds = t0.elapsed().as_secs_f64();
        out
    }

    fn forward(&self, exec: &mut dyn Executor) -> StepOutput {
        let steps: Vec<SeqStep<'_>> = self
            .steps
            .iter()
            .map(|s| SeqStep {
                tokens: &s.tokens,
                pos0: s.pos0,
                page_table: &s.table,
                kind: s.kind,
                logits: s.logits,
            })
            .collect();
        exec.forward(&steps)
    }
}

impl Scheduler {
    /// Runs one step on this thread; returns the number of tokens computed (0 when there was
    /// nothing to do).
    pub fn step(&mut self) -> usize {
        let Some(mut f) = self.begin_step() else {
            return 0;
        };
        let exec = self.exec.clone();
        let out = f.run(&mut **exec.lock().unwrap_or_else(|e| e.into_inner()));
        self.finish_step(f, out)
    }

    /// The first half of a step: admission, the batch, its pages (evicting, preempting, copying
    /// shared pages). `None` when there is nothing to run.
    pub(super) fn begin_step(&mut self) -> Option<InFlight> {
        self.poll_store();
        self.apply_disk_loads();
        self.apply_tier_loads();
        self.reap_cancelled();
        self.admit();
        let plan = loop {
            let plan = self.plan();
            if plan.is_empty() {
                return None;
            }
            let need: usize = plan.iter().map(|p| self.pages_needed(p)).sum();
            let free = self.tree.pool().free_count();
            if need <= free {
                break plan;
            }
            self.evict(need - free);
            if need <= self.tree.pool().free_count() {
                break plan;
            }
            self.preempt_youngest();
        };
        let prepared: std::result::Result<(), ExecError> =
            plan.iter().try_for_each(|p| self.prepare_pages(p));
        let used = self.tree.pool().used_count();
        self.stats.peak_pages = self.stats.peak_pages.max(used);
        let mut jobs = Vec::new();
        let steps = plan
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let s = &self.running[p.seq];
                let own = if p.model_k > 0 {
                    1
                } else {
                    p.tokens - p.draft.len()
                };
                let mut tokens = s.req.tokens[s.kv_len..s.kv_len + own].to_vec();
                if p.model_k > 0 {
                    if let Work::Generate { session, dec, .. } = &s.req.work {
                        jobs.push((
                            i,
                            DraftJob {
                                key: *session,
                                context: s.req.tokens.clone(),
                                k: p.model_k,
                                stop: dec.stop_ids().to_vec(),
                            },
                        ));
                    }
                } else {
                    tokens.extend_from_slice(&p.draft);
                }
                let last = s.kv_len + own == s.req.tokens.len()
                    && matches!(s.req.work, Work::Generate { .. });
                OwnedStep {
                    tokens,
                    pos0: s.kv_len,
                    table: s.page_table(),
                    kind: p.kind,
                    // The last token's logits, and each draft row's.
                    logits: match (last, p.model_k) {
                        (false, _) => 0,
                        (true, 0) => 1 + p.draft.len(),
                        (true, _) => 1,
                    },
                }
            })
            .collect();
        let computed = plan.iter().map(|p| p.tokens).sum();
        Some(InFlight {
            plan,
            steps,
            prepared,
            computed,
            drafter: (!jobs.is_empty()).then(|| self.drafter.clone()).flatten(),
            jobs,
            seconds: 0.0,
        })
    }

    /// The second half of a step: sample, stream, cache progress, retire. Returns the tokens
    /// computed.
    pub(super) fn finish_step(&mut self, f: InFlight, result: StepOutput) -> usize {
        let InFlight {
            plan,
            computed,
            jobs,
            seconds,
            ..
        } = f;
        let span = tracing::debug_span!("step", seqs = plan.len(), tokens = computed);
        let _enter = span.enter();
        self.stats.steps += 1;
        self.step_sampled = 0;
        let decode_only = plan.iter().all(|p| p.kind == RowKind::Decode);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // An executor error is a bug or bad weights: fail this batch, keep serving.
                tracing::error!(error = %e, "forward pass failed");
                let e = Cause::new(e);
                let mut seqs: Vec<usize> = plan.iter().map(|p| p.seq).collect();
                seqs.sort_unstable_by_key(|&s| std::cmp::Reverse(s));
                for i in seqs {
                    let mut seq = self.running.swap_remove(i);
                    self.release_seq_pages(&mut seq);
                    self.fail_waiting(seq.req, SchedError::Executor(e.clone()));
                }
                return computed;
            }
        };
        let mut done: Vec<(usize, Option<FinishReason>)> = Vec::new();
        for (p, logits) in plan.iter().zip(logits) {
            if !p.draft.is_empty() {
                if let Some(finish) = self.verify(p, logits) {
                    done.push((p.seq, finish));
                }
                continue;
            }
            if p.model_k > 0 {
                // Room was reserved for a draft that did not come: after this row, the
                // pages past the next write go back.
                self.running[p.seq].kv_len += 1;
                self.running[p.seq].spec.tick(&self.cfg.speculation);
                if let Some(mut logits) = logits {
                    if let Some(finish) = self.sample(p.seq, &mut logits) {
                        done.push((p.seq, finish));
                    }
                }
                self.trim_pages(p.seq);
                self.release_behind_window(p.seq);
                continue;
            }
            let seq = &mut self.running[p.seq];
            seq.kv_len += p.tokens;
            if p.kind == RowKind::Decode {
                seq.spec.tick(&self.cfg.speculation);
            }
            if p.kind == RowKind::Prompt {
                let t = self.stats.tenants.entry(seq.req.tenant).or_default();
                t.prefill_tokens += p.tokens as u64;
                self.stats.prefill_tokens += p.tokens as u64;
            }
            match logits {
                Some(mut logits) => {
                    if let Some(finish) = self.sample(p.seq, &mut logits) {
                        done.push((p.seq, finish));
                    }
                }
                None if self.running[p.seq].kv_len == self.running[p.seq].req.tokens.len() => {
                    // A prefix registration is complete.
                    done.push((p.seq, None));
                }
                None => {}
            }
            if p.kind == RowKind::Prompt {
                self.cache_progress(p.seq);
            }
            self.release_behind_window(p.seq);
        }
        if self.drafter.is_some() {
            let drafted = !jobs.is_empty();
            self.gate
                .record(decode_only, drafted, seconds, self.step_sampled);
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, finish) in done {
            self.retire(i, finish);
        }
        computed
    }

    /// Drops running sequence `i`'s pages past the one its next token is written to (held for
    /// draft positions that were rejected or never drafted).
    fn trim_pages(&mut self, i: usize) {
        let ps = self.cfg.page_size;
        let seq = &mut self.running[i];
        let keep = (seq.kv_len / ps + 1).saturating_sub(seq.released);
        if seq.pages.len() > keep {
            seq.pages.truncate(keep);
        }
    }

    /// Verifies running sequence `p.seq`'s draft: samples each row's token in order, keeping
    /// a draft token only when it is the token sampled, until a mismatch or the end of the
    /// generation. The KV of the kept positions stays; pages holding only rejected positions
    /// go back to the pool. Returns `Some(finish)` when the generation is over.
    fn verify(&mut self, p: &Planned, logits: Option<Vec<f32>>) -> Option<Option<FinishReason>> {
        let Some(mut logits) = logits else {
            // Not sampled (cannot happen for a decode row): the draft is dropped.
            self.running[p.seq].kv_len += 1;
            return None;
        };
        let k = p.draft.len();
        let vocab = logits.len() / (k + 1);
        // The fed token's KV is kept; each accepted draft token adds its own.
        self.running[p.seq].kv_len += 1;
        let mut accepted = 0;
        let mut finish = None;
        for (j, row) in logits.chunks_exact_mut(vocab).enumerate() {
            if let Some(f) = self.sample(p.seq, row) {
                finish = Some(f);
                break;
            }
            let picked = self.running[p.seq].req.tokens.last().copied();
            if j == k || picked != Some(p.draft[j]) {
                break;
            }
            self.running[p.seq].kv_len += 1;
            accepted += 1;
        }
        let st = &mut self.stats;
        st.spec_drafted += k as u64;
        st.spec_accepted += accepted as u64;
        if p.from_model {
            st.spec_model_drafted += k as u64;
            st.spec_model_accepted += accepted as u64;
        }
        let max = self.cfg.speculation.max_draft.max(k);
        st.spec_drafted_at.resize(max, 0);
        st.spec_accepted_at.resize(max, 0);
        for j in 0..k {
            st.spec_drafted_at[j] += 1;
            if j < accepted {
                st.spec_accepted_at[j] += 1;
            }
        }
        let cfg = self.cfg.speculation;
        self.running[p.seq].spec.update(&cfg, k, accepted);
        // Keep the pages up to the one the next token is written to.
        self.trim_pages(p.seq);
        self.release_behind_window(p.seq);
        finish
    }

    /// Draft tokens for decoding sequence `i` this step (see [`crate::spec`]), at most
    /// `budget`: none when its state says so, or where the context or its `max_tokens` end
    /// within the draft. With `model` (the draft model drafts this step) and no continuation
    /// in the tree, the second value is how many tokens to ask the draft model for, and the
    /// first is the prompt-lookup fallback.
    fn draft(&self, i: usize, budget: usize, batch: usize, model: bool) -> (Vec<u32>, usize) {
        let s = &self.running[i];
        let Work::Generate { dec, .. } = &s.req.work else {
            return (Vec::new(), 0);
        };
        let cfg = &self.cfg.speculation;
        // Positions kv_len (the fed token) and kv_len + 1.. (the draft) must fit the context;
        // tokens past max_tokens would be dropped anyway.
        let context_room = self.context_limit().saturating_sub(s.kv_len + 2);
        let output_room = dec.max_tokens().saturating_sub(dec.tokens.len() + 1);
        let room = context_room.min(output_room).min(budget);
        let want = s.spec.want(cfg, room, batch);
        if want == 0 {
            return (Vec::new(), 0);
        }
        // What an earlier sequence produced after this very context, else prompt lookup.
        let from_tree = [Some(s.req.ns), s.req.published]
            .into_iter()
            .flatten()
            .map(|ns| self.tree.continuation(ns, &s.req.tokens, want))
            .find(|d| !d.is_empty());
        if let Some(d) = from_tree {
            return (d, 0);
        }
        // A full-length prompt-lookup draft costs nothing to make and, where it matches (code
        // or a record re-emitted), is as good as the model's: `agentd bench spec` measured
        // the 0.5B drafter slower than lookup alone there on a 2-core CPU. The draft model
        // drafts where lookup finds less.
        let lookup = crate::spec::lookup_draft(&s.req.tokens, cfg, want);
        let model_k = if model && lookup.len() < want {
            want
        } else {
            0
        };
        (lookup, model_k)
    }

    /// The batch: every decoding sequence gets its one token (and, while few sequences decode,
    /// a draft to verify), then prefill chunks in admission order while the step's token budget
    /// lasts (at least one chunk per step).
    fn plan(&self) -> Vec<Planned> {
        let mut plan = Vec::new();
        let mut budget = self.cfg.step_tokens;
        let decoding = self.running.iter().filter(|s| s.decoding).count();
        // The draft model runs only while few sequences decode (adaptive mode): its own
        // forward calls and prompt feeding cost about a third of a target step, which a busy
        // batch does not earn back (`agentd bench spec`: 0.42× at batch 8 on a 2-core CPU).
        let adaptive = self.cfg.draft.adaptive;
        let model = self.drafter.is_some()
            && (!adaptive || decoding <= self.cfg.speculation.small_batch)
            && self.gate.use_now(adaptive);
        for (i, s) in self.running.iter().enumerate() {
            if s.decoding {
                let (draft, model_k) =
                    self.draft(i, budget.saturating_sub(decoding), decoding, model);
                let tokens = 1 + draft.len().max(model_k);
                budget = budget.saturating_sub(tokens);
                plan.push(Planned {
                    seq: i,
                    tokens,
                    kind: RowKind::Decode,
                    draft,
                    model_k,
                    from_model: false,
                });
            }
        }
        let mut prefills: Vec<usize> = (0..self.running.len())
            .filter(|&i| !self.running[i].decoding)
            .collect();
        prefills.sort_by_key(|&i| self.running[i].admitted);
        for (k, i) in prefills.into_iter().enumerate() {
            let s = &self.running[i];
            // A resumed (preempted) sequence recomputes its sampled tokens as decode rows, as
            // they were first computed, so preemption never changes a sequence's numerics; its
            // prompt stays prompt rows. So a chunk never crosses the prompt's end.
            let (pending, kind) = if s.kv_len < s.req.prompt_len {
                (s.req.prompt_len - s.kv_len, RowKind::Prompt)
            } else {
                (s.req.tokens.len() - s.kv_len, RowKind::Decode)
            };
            let n = pending.min(if k == 0 { budget.max(1) } else { budget });
            if n == 0 {
                break;
            }
            plan.push(Planned {
                seq: i,
                tokens: n,
                kind,
                draft: Vec::new(),
                model_k: 0,
                from_model: false,
            });
            budget -= n.min(budget);
        }
        plan
    }

    /// Page indices a step of `p` writes to: `first..=last`.
    fn write_range(&self, p: &Planned) -> (usize, usize) {
        let s = &self.running[p.seq];
        let ps = self.cfg.page_size;
        (s.kv_len / ps, (s.kv_len + p.tokens - 1) / ps)
    }

    /// New pages `p` needs: pages not yet held, plus shared pages it must copy before writing.
    fn pages_needed(&self, p: &Planned) -> usize {
        let s = &self.running[p.seq];
        let (first, last) = self.write_range(p);
        (first..=last)
            .filter(|&k| match s.page(k) {
                Some(pg) => self.tree.pool().refcount(pg.id()).unwrap_or(0) > 1,
                None => true,
            })
            .count()
    }

    /// Allocates the pages `p` writes to, copying a shared page before writing into it (copy on
    /// write: a partial page matched from the cache, or one this sequence shares after a fork
    /// or after caching its own prefix). Enough pages must be free.
    fn prepare_pages(&mut self, p: &Planned) -> std::result::Result<(), ExecError> {
        let (first, last) = self.write_range(p);
        let ps = self.cfg.page_size;
        for k in first..=last {
            let s = &self.running[p.seq];
            let held = k - s.released;
            match s.page(k).map(|l| l.id()) {
                Some(old) if self.tree.pool().refcount(old).unwrap_or(0) > 1 => {
                    let new = self.tree.pool().lease_new().expect("pages were reserved");
                    let new_id = new.id();
                    let valid = s.kv_len.saturating_sub(k * ps).min(ps);
                    // The new page replaces the shared one (whose lease is dropped: others
                    // still hold it) before the copy, so a failed copy leaves every page
                    // accounted for.
                    self.running[p.seq].pages[held] = new;
                    self.exec().copy_page(old.0, new_id.0, valid)?;
                }
                Some(_) => {}
                None => {
                    let new = self.tree.pool().lease_new().expect("pages were reserved");
                    self.running[p.seq].pages.push(new);
                }
            }
        }
        Ok(())
    }

    /// Samples the next token of running sequence `i`; returns `Some(finish)` when it is done.
    fn sample(&mut self, i: usize, logits: &mut [f32]) -> Option<Option<FinishReason>> {
        let ctx = self.context_limit();
        self.step_sampled += 1;
        let seq = &mut self.running[i];
        let Work::Generate { dec, sink, .. } = &mut seq.req.work else {
            return None;
        };
        let tok = dec.sample(logits, &seq.req.tokens);
        seq.req.first_token.get_or_insert_with(Instant::now);
        seq.req.tokens.push(tok);
        seq.decoding = true;
        let pushed = match dec.push(tok, seq.kv_len >= ctx) {
            Ok(p) => p,
            Err(e) => {
                let _ = sink.send(Event::Error(SchedError::Generation(Cause::new(e))));
                return Some(Some(FinishReason::Cancelled));
            }
        };
        if !dec.is_stop_token(tok) {
            let t = self.stats.tenants.entry(seq.req.tenant).or_default();
            t.generated_tokens += 1;
            self.stats.generated_tokens += 1;
        }
        if sink
            .send(Event::Token {
                id: tok,
                text: pushed.text,
                logprob: dec.take_logprob().map(Box::new),
            })
            .is_err()
        {
            return Some(Some(FinishReason::Cancelled));
        }
        pushed.finish.map(Some)
    }

    /// Makes the computed part of running sequence `i` visible in the cache (so requests that
    /// share it hit, even before this one finishes), moving its lock to the new node.
    fn cache_progress(&mut self, i: usize) {
        if !self.cfg.cache || self.running[i].released > 0 {
            return;
        }
        let ps = self.cfg.page_size;
        let s = &self.running[i];
        let n = s.kv_len;
        let pages: Vec<PageId> = s.pages[..n.div_ceil(ps)].iter().map(|l| l.id()).collect();
        let res = self.tree.insert(s.req.ns, &s.req.tokens[..n], &pages);
        match res {
            Ok(ins) => {
                let s = &self.running[i];
                self.announce(
                    EventKind::Stored,
                    s.req.ns,
                    &s.req.tokens[..n],
                    ins.already_cached / ps,
                );
                if let Some(node) = ins.last_node {
                    if self.tree.lock(node).is_ok() {
                        if let Some(old) = self.running[i].node.replace(node) {
                            let _ = self.tree.unlock(old);
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "caching a prefix failed"),
        }
        let ns = self.running[i].req.ns;
        self.pin_restored(ns);
    }

    /// For a model whose every layer is windowed: lets running sequence `i` go of the pages
    /// wholly below the first key its next query reads ([`first_key_read`]). With the cache on
    /// this starts once the prompt is computed (and so cached whole, reusable by later
    /// requests however long it is); after that, the sequence no longer extends the cache. A
    /// page only it held returns to the pool; one the tree also holds stays cached, and the
    /// sequence's lock on the tree is dropped with the first release, so that cached prefix
    /// can be evicted like any other.
    fn release_behind_window(&mut self, i: usize) {
        let Some(window) = self.shape.window else {
            return;
        };
        let ps = self.cfg.page_size;
        let s = &mut self.running[i];
        if self.cfg.cache && !s.decoding {
            return;
        }
        // Keep at least the page the next token is written to.
        let behind = (first_key_read(s.kv_len, window) / ps).min(s.kv_len / ps);
        if behind <= s.released {
            return;
        }
        let n = (behind - s.released).min(s.pages.len().saturating_sub(1));
        if n == 0 {
            return;
        }
        s.pages.drain(..n);
        s.released += n;
        self.stats.window_released_pages += n as u64;
        if let Some(node) = s.node.take() {
            let _ = self.tree.unlock(node);
        }
    }

    /// Drops a sequence's page leases (releasing its references) and its lock.
    pub(super) fn release_seq_pages(&mut self, seq: &mut Seq) {
        seq.pages.clear();
        if let Some(n) = seq.node.take() {
            let _ = self.tree.unlock(n);
        }
    }

    /// Removes running sequence `i`: caches what it computed, frees its pages, and finishes its
    /// request (`finish` is `None` for a completed prefix registration).
    pub(super) fn retire(&mut self, i: usize, finish: Option<FinishReason>) {
        if self.cfg.cache && !matches!(finish, Some(FinishReason::Cancelled)) {
            self.cache_progress(i);
        }
        let mut seq = self.running.swap_remove(i);
        self.release_seq_pages(&mut seq);
        let mut req = seq.req;
        let done = usage(&req, finish.clone().unwrap_or(FinishReason::Cancelled));
        match (&mut req.work, finish) {
            (Work::Prefix { id, reply }, _) => {
                let id = *id;
                let res = self.pin_prefix(id).map(|()| super::PrefixInfo {
                    id,
                    tokens: req.tokens.len(),
                });
                if let Some(reply) = reply.take() {
                    reply(res);
                }
            }
            (Work::Generate { session, sink, .. }, _) => {
                if let Some(s) = self.sessions.get_mut(session) {
                    s.busy = None;
                    s.tokens = std::mem::take(&mut req.tokens);
                }
                if let Some(u) = done {
                    let _ = sink.send(Event::Done(u));
                }
            }
        }
    }

    /// Frees a running sequence for lack of memory and puts its request back at the head of the
    /// queue: it keeps its tokens and its output so far and recomputes (or re-matches) its KV.
    /// The only sequence left that still does not fit is failed instead.
    fn preempt_youngest(&mut self) {
        let Some(i) = (0..self.running.len()).max_by_key(|&i| self.running[i].admitted) else {
            return;
        };
        let mut seq = self.running.swap_remove(i);
        self.release_seq_pages(&mut seq);
        if self.running.is_empty() {
            let ps = self.cfg.page_size;
            let err = SchedError::PoolTooSmall {
                needed: (seq.req.tokens.len() + 1).div_ceil(ps),
                available: self.pages_available(),
                capacity: self.tree.pool().capacity(),
            };
            self.fail_waiting(seq.req, err);
            return;
        }
        let mut req = seq.req;
        req.preemptions += 1;
        self.stats.preemptions += 1;
        tracing::info!(request = req.id, "preempted for lack of KV pages");
        self.waiting.push_front(req);
    }

    /// Ends a request that holds no pages with an error.
    pub(super) fn fail_waiting(&mut self, mut req: Request, err: SchedError) {
        match &mut req.work {
            Work::Prefix { id, reply } => {
                self.prefixes.remove(id);
                if let Some(reply) = reply.take() {
                    reply(Err(err));
                }
            }
            Work::Generate { session, sink, .. } => {
                if let Some(s) = self.sessions.get_mut(session) {
                    s.busy = None;
                }
                let _ = sink.send(Event::Error(err));
            }
        }
    }

    /// Ends a waiting request as cancelled.
    pub(super) fn finish_waiting(&mut self, mut req: Request) {
        let done = usage(&req, FinishReason::Cancelled);
        match &mut req.work {
            Work::Prefix { .. } => self.fail_waiting(req, SchedError::Shutdown),
            Work::Generate { session, sink, .. } => {
                if let Some(s) = self.sessions.get_mut(session) {
                    s.busy = None;
                }
                if let Some(u) = done {
                    let _ = sink.send(Event::Done(u));
                }
            }
        }
    }

    /// Frees every request whose reader has gone away.
    fn reap_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .waiting
            .iter()
            .filter(|r| r.cancelled())
            .map(|r| r.id)
            .chain(
                self.running
                    .iter()
                    .filter(|s| s.req.cancelled())
                    .map(|s| s.req.id),
            )
            .collect();
        for rid in gone {
            tracing::info!(request = rid, "stream closed; cancelling");
            self.cancel_request(rid);
        }
    }

    /// Cancels everything (shutdown).
    pub fn cancel_all(&mut self) {
        let ids: Vec<u64> = self
            .waiting
            .iter()
            .map(|r| r.id)
            .chain(self.running.iter().map(|s| s.req.id))
            .collect();
        for rid in ids {
            self.cancel_request(rid);
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SchedStats {
        let mut s = self.stats.clone();
        s.free_pages = self.tree.pool().free_count();
        s.tree = self.tree.stats();
        s.tree_tokens = s.tree.cached_tokens;
        s.disk = self.store.as_ref().map(|st| st.stats());
        s.shared_tier = self.shared.as_ref().map(|t| t.stats());
        for t in s.tenants.values_mut() {
            (t.sessions, t.running, t.waiting) = (0, 0, 0);
        }
        for sess in self.sessions.values() {
            s.tenants.entry(sess.tenant).or_default().sessions += 1;
        }
        for q in &self.running {
            s.tenants.entry(q.req.tenant).or_default().running += 1;
        }
        for r in &self.waiting {
            s.tenants.entry(r.tenant).or_default().waiting += 1;
        }
        s
    }

    /// Checks the pool and tree accounting, and that every page a running sequence holds is
    /// live: for tests.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.tree.check_invariants()?;
        let mut refs = self.tree.held_pages();
        for s in &self.running {
            for p in &s.pages {
                *refs.entry(p.id()).or_insert(0) += 1;
            }
        }
        for (p, n) in &refs {
            let rc = self.tree.pool().refcount(*p).map_err(|e| e.to_string())?;
            if rc != *n {
                return Err(format!("{p}: {n} holders but refcount {rc}"));
            }
        }
        let used = self.tree.pool().used_count();
        if used != refs.len() {
            return Err(format!(
                "{used} pages in use but {} have holders (leak)",
                refs.len()
            ));
        }
        if let Some(d) = self.drafter() {
            d.check_invariants()?;
        }
        Ok(())
    }
}
