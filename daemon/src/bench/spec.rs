//! `agentd bench spec`: decode speed with and without speculative decoding (prompt-lookup
//! drafts, [`agentd_scheduler::spec`]), at batch 1 and batch 8, on two workloads:
//!
//! - `agent`: tool results quoted back and edited (a file the model is asked to re-emit with a
//!   rename, a JSON record to repeat with one field changed; the reply already begun, as an
//!   agent's edit is once it starts): the workload drafts pay on;
//! - `chat`: free-form writing, where drafts rarely match and speculation must cost nothing.
//!
//! With a draft model (`--draft-model`), two more configurations run: prompt lookup plus the
//! draft model as the daemon runs it (switched off while it does not pay), and the draft model
//! forced on at every step (its raw cost and acceptance).
//!
//! All configurations run greedy on the same prompts, alternated, best of `rounds`; the report
//! says whether their outputs are token-identical (they must be), the decode tokens/s of each
//! (each sequence's tokens after the first over the time from its first token to its last,
//! summed over the batch; prompts are computed beforehand), the drafts verified and accepted,
//! and acceptance by position in the draft.

use agentd_engine::sampling::SamplingParams;
use agentd_engine::{GenerateOptions, LoadedModel};
use agentd_scheduler::{DraftConfig, Event, SchedulerConfig, SchedulerHandle, SpecConfig};
use agentd_wire::Message;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One configuration's figures on one workload and batch.
#[derive(Debug, Serialize, Clone, Default)]
pub struct Run {
    /// Decode tokens per second over the batch.
    pub decode_tokens_per_s: f64,
    /// Tokens generated over the batch.
    pub generated_tokens: usize,
    /// Draft tokens verified.
    pub drafted: u64,
    /// Draft tokens accepted.
    pub accepted: u64,
    /// Accepted over drafted.
    pub acceptance: f64,
    /// Acceptance at each position of a draft (accepted / verified there).
    pub acceptance_by_position: Vec<f64>,
    /// Of `drafted`, the draft model's tokens.
    pub model_drafted: u64,
    /// Of `accepted`, the draft model's.
    pub model_accepted: u64,
}

/// The draft model for the `draft` configurations.
pub struct Drafter {
    /// The draft model (its vocabulary checked against the target's).
    pub model: Arc<LoadedModel>,
    /// Its pool and pacing.
    pub config: DraftConfig,
}

/// A workload at one batch size.
#[derive(Debug, Serialize)]
pub struct Case {
    /// `agent` or `chat`.
    pub workload: &'static str,
    /// Sequences decoding at once.
    pub batch: usize,
    /// Without speculation.
    pub off: Run,
    /// With speculation.
    pub on: Run,
    /// `on` tokens/s over `off` tokens/s.
    pub speedup: f64,
    /// With speculation and the draft model (switched off while it does not pay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft: Option<Run>,
    /// `draft` tokens/s over `off` tokens/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft_speedup: Option<f64>,
    /// With the draft model drafting at every step it can.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft_forced: Option<Run>,
    /// `draft_forced` tokens/s over `off` tokens/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft_forced_speedup: Option<f64>,
    /// Whether both produced the same tokens for every sequence.
    pub identical: bool,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct SpecBenchReport {
    /// The target model's file.
    pub model: String,
    /// The draft model's file, when one was given.
    pub draft_model: Option<String>,
    /// Tokens generated per sequence.
    pub gen_tokens: usize,
    /// Every workload and batch size.
    pub cases: Vec<Case>,
}

const CODE: &str = r#"def load_config(path):
    with open(path) as f:
        raw = json.load(f)
    config = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        config[key.lower()] = value
    return config


def save_config(config, path):
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
"#;

const RECORD: &str = r#"{"id": 4182, "name": "Ada Lovelace", "email": "ada@example.org", "role": "engineer", "team": "compilers", "location": "London", "active": true, "projects": ["analytical-engine", "notes-g", "bernoulli"]}"#;

/// The `agent` workload's prompt `i`: a conversation in which a tool result came back and the
/// user asked for it edited, with the assistant's reply begun (as an agent re-emitting an
/// edited file or record has begun it).
fn agent_prompt(engine: &LoadedModel, i: usize) -> Result<Vec<u32>, BoxError> {
    let mut tokens = engine.chat_prompt(&agent_messages(i))?;
    let begun = if i.is_multiple_of(2) {
        format!("```python\ndef read_config_{i}(path):\n    with open(path) as f:\n")
    } else {
        "{\"id\": 4182, \"name\": \"Ada Lovelace\", ".to_owned()
    };
    tokens.extend(engine.tokenizer.encode(&begun, false)?);
    Ok(tokens)
}

/// The `chat` workload's prompt `i`.
fn chat_prompt(engine: &LoadedModel, i: usize) -> Result<Vec<u32>, BoxError> {
    Ok(engine.chat_prompt(&chat_messages(i))?)
}

/// Conversations for the `agent` workload (variant `i` differs in its request).
fn agent_messages(i: usize) -> Vec<Message> {
    let system = Message::system("You are a coding agent. Tool results are shown to you verbatim; when asked to edit something, reply with the complete edited text and nothing else.");
    let (call, result, ask) = if i.is_multiple_of(2) {
        (
            "read_file(\"config.py\")",
            CODE,
            format!("Rename load_config to read_config_{i} and reply with the whole file."),
        )
    } else {
        (
            "get_user(4182)",
            RECORD,
            format!("Repeat this JSON record exactly, but with \"team\" set to \"runtime-{i}\"."),
        )
    };
    vec![
        system,
        Message::user("Please help me with the task."),
        Message::assistant(format!("<tool_call>\n{call}\n</tool_call>")),
        Message::tool(format!("<tool_response>\n{result}\n</tool_response>")),
        Message::user(ask),
    ]
}

/// Conversations for the `chat` workload.
fn chat_messages(i: usize) -> Vec<Message> {
    const TOPICS: [&str; 8] = [
        "a lighthouse keeper who finds a strange map",
        "the first day of a new school in a small village",
        "a robot learning to paint",
        "a storm at sea",
        "a market in an old city at dawn",
        "a fox and a crow who become friends",
        "a journey through a desert",
        "a garden that grows in winter",
    ];
    vec![Message::user(format!(
        "Write a short story about {}.",
        TOPICS[i % TOPICS.len()]
    ))]
}

/// Runs `prompts` at once on a scheduler with `spec`; returns the tokens of each and the run's
/// figures.
async fn run(
    engine: &Arc<LoadedModel>,
    spec: SpecConfig,
    draft: Option<(&Drafter, bool)>,
    prompts: &[Vec<u32>],
    gen_tokens: usize,
) -> Result<(Vec<Vec<u32>>, Run), BoxError> {
    let cfg = SchedulerConfig {
        speculation: spec,
        draft: draft.map_or(DraftConfig::default(), |(d, adaptive)| DraftConfig {
            adaptive,
            ..d.config
        }),
        ..SchedulerConfig::default()
    };
    let h = SchedulerHandle::spawn_with_drafter(
        Box::new(engine.cpu_executor()),
        draft.map(|(d, _)| Box::new(d.model.cpu_executor()) as Box<dyn agentd_engine::Executor>),
        cfg,
    )?;
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: gen_tokens,
        ..Default::default()
    };
    // Prefill every prompt first (a one-token generation each: the prompt stays cached), so
    // the batch then starts decoding at once and the measurement is decode alone.
    let mut sessions = Vec::new();
    let warm = GenerateOptions {
        max_tokens: 1,
        ..opts.clone()
    };
    for p in prompts {
        let sid = h.create_session(0, None, p.clone()).await?;
        let mut rx = h.generate(0, sid, engine.decoding(&warm)?).await?;
        while let Some(ev) = rx.recv().await {
            if let Event::Error(e) = ev {
                return Err(e.into());
            }
        }
        sessions.push(sid);
    }
    let mut tasks = Vec::new();
    for &sid in &sessions {
        let (h, dec) = (h.clone(), engine.decoding(&opts)?);
        tasks.push(tokio::spawn(async move {
            let mut rx = h.generate(0, sid, dec).await?;
            let (mut first, mut last, mut toks) = (None, Instant::now(), Vec::new());
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::Token { id, .. } => {
                        first.get_or_insert_with(Instant::now);
                        last = Instant::now();
                        toks.push(id);
                    }
                    Event::Done(_) => break,
                    Event::Error(e) => return Err(BoxError::from(e)),
                }
            }
            Ok::<_, BoxError>((first.unwrap_or(last), last, toks))
        }));
    }
    let mut outs = Vec::new();
    let mut rate = 0.0;
    for t in tasks {
        let (first, last, toks) = t.await??;
        let secs = (last - first).as_secs_f64();
        if secs > 0.0 {
            rate += (toks.len() - 1) as f64 / secs;
        }
        outs.push(toks);
    }
    let stats = h.stats().await?;
    let generated: usize = outs.iter().map(Vec::len).sum();
    let by_pos = stats
        .spec_drafted_at
        .iter()
        .zip(&stats.spec_accepted_at)
        .map(|(&d, &a)| if d == 0 { 0.0 } else { a as f64 / d as f64 })
        .collect();
    Ok((
        outs,
        Run {
            decode_tokens_per_s: rate,
            generated_tokens: generated,
            drafted: stats.spec_drafted,
            accepted: stats.spec_accepted,
            acceptance: if stats.spec_drafted == 0 {
                0.0
            } else {
                stats.spec_accepted as f64 / stats.spec_drafted as f64
            },
            acceptance_by_position: by_pos,
            model_drafted: stats.spec_model_drafted,
            model_accepted: stats.spec_model_accepted,
        },
    ))
}

/// Runs every workload at batch 1 and 8, speculation off and on alternated, best of `rounds`.
pub async fn run_spec_bench(
    engine: Arc<LoadedModel>,
    drafter: Option<Drafter>,
    gen_tokens: usize,
    rounds: usize,
    batches: &[usize],
) -> Result<SpecBenchReport, BoxError> {
    let mut cases = Vec::new();
    type MakePrompt = fn(&LoadedModel, usize) -> Result<Vec<u32>, BoxError>;
    for (workload, make) in [("agent", agent_prompt as MakePrompt), ("chat", chat_prompt)] {
        for &batch in batches {
            let prompts = (0..batch)
                .map(|i| make(&engine, i))
                .collect::<Result<Vec<_>, _>>()?;
            let (mut off, mut on) = (Run::default(), Run::default());
            let (mut draft, mut forced) = (Run::default(), Run::default());
            let mut identical = true;
            let best = |best: &mut Run, r: Run| {
                if r.decode_tokens_per_s > best.decode_tokens_per_s {
                    *best = r;
                }
            };
            for _ in 0..rounds.max(1) {
                let spec = SpecConfig::default();
                let (a, r) = run(&engine, SpecConfig::off(), None, &prompts, gen_tokens).await?;
                best(&mut off, r);
                let (b, r) = run(&engine, spec, None, &prompts, gen_tokens).await?;
                best(&mut on, r);
                identical &= a == b;
                if let Some(d) = &drafter {
                    for (adaptive, into) in [(true, &mut draft), (false, &mut forced)] {
                        let (c, r) =
                            run(&engine, spec, Some((d, adaptive)), &prompts, gen_tokens).await?;
                        best(into, r);
                        identical &= a == c;
                    }
                }
            }
            let speedup = |r: &Run| {
                if off.decode_tokens_per_s > 0.0 {
                    r.decode_tokens_per_s / off.decode_tokens_per_s
                } else {
                    0.0
                }
            };
            let with_draft = drafter.is_some();
            cases.push(Case {
                workload,
                batch,
                speedup: speedup(&on),
                draft_speedup: with_draft.then(|| speedup(&draft)),
                draft_forced_speedup: with_draft.then(|| speedup(&forced)),
                draft: with_draft.then_some(draft),
                draft_forced: with_draft.then_some(forced),
                off,
                on,
                identical,
            });
        }
    }
    Ok(SpecBenchReport {
        model: engine.path.display().to_string(),
        draft_model: drafter.map(|d| d.model.path.display().to_string()),
        gen_tokens,
        cases,
    })
}
