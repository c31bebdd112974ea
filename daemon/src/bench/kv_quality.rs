//! `agentd bench kv-quality`: what Q8_0 KV pages cost in quality against f16 pages, on the same
//! weights: the KL divergence of next-token distributions and top-1 agreement over varied text
//! (prose, code, dialogue, a table, JSON, a list), every position scored, and greedy outputs on
//! a few chat prompts compared token by token. Prints JSON.

use agentd_engine::executor::{RowKind, SeqStep};
use agentd_engine::{CpuExecutor, EngineError, Executor, KvDtype, LoadedModel};
use agentd_wire::{Message, Role};
use serde::Serialize;

type Result<T> = std::result::Result<T, EngineError>;

/// Paragraphs of different kinds, so the scored positions are not one register of text.
const PARAGRAPHS: &[&str] = &[
    "The river had been rising for three days before anyone in the village took it seriously. \
     Old Marta, who had seen the flood of 1962, moved her chickens to the hayloft on the first \
     morning; by the third, the baker was stacking sandbags against his door and the school had \
     closed. Nobody drowned, but the bridge was gone by Sunday, and with it the only road to the \
     market town.\n\n",
    "```python\ndef merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and \
     j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n\
     \x20           out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n```\n\n",
    "User: Can you help me plan a trip to Lisbon in October?\nAssistant: Of course. October is \
     mild, around 22 degrees during the day. I would suggest three days: the old town of Alfama \
     on the first, Belém and its monastery on the second, and a day trip to Sintra on the \
     third.\nUser: What should I eat?\nAssistant: Try pastéis de nata, grilled sardines and \
     bacalhau.\n\n",
    "| Quarter | Revenue ($M) | Growth |\n|---|---|---|\n| Q1 2023 | 41.2 | 3.1% |\n| Q2 2023 \
     | 44.9 | 9.0% |\n| Q3 2023 | 43.7 | -2.7% |\n| Q4 2023 | 52.3 | 19.7% |\n\n",
    "{\"id\": 8841, \"name\": \"sensor-17\", \"location\": {\"lat\": 52.52, \"lon\": 13.405}, \
     \"readings\": [{\"t\": \"2024-03-01T10:00:00Z\", \"temp_c\": 4.5}, {\"t\": \
     \"2024-03-01T11:00:00Z\", \"temp_c\": 5.1}], \"status\": \"ok\"}\n\n",
    "Steps to replace a bicycle inner tube:\n1. Shift to the smallest cog and open the brake.\n\
     2. Remove the wheel and let out any remaining air.\n3. Lever one side of the tyre off the \
     rim.\n4. Pull out the old tube and check the tyre for thorns.\n5. Inflate the new tube \
     slightly, fit it, and reseat the tyre.\n\n",
    "Photosynthesis converts light energy into chemical energy. In the light-dependent \
     reactions, water is split and oxygen released, while ATP and NADPH are formed; the Calvin \
     cycle then uses them to fix carbon dioxide into sugars. The overall efficiency is low, \
     rarely above two percent in crops, yet it feeds almost every food chain on Earth.\n\n",
];

/// Chat prompts for the greedy comparison.
const PROMPTS: &[&str] = &[
    "Write a short poem about the sea.",
    "Explain what a hash map is in two sentences.",
    "List three tips for sleeping better.",
    "What is 17 times 23? Show your work.",
];

/// The report.
#[derive(Debug, Serialize)]
pub struct KvQualityReport {
    /// The model file.
    pub model: String,
    /// Positions scored.
    pub positions: usize,
    /// Distinct tokens among them.
    pub distinct_tokens: usize,
    /// Mean KL(p_f16 ‖ p_q8_0) of the next-token distributions, in nats.
    pub kl_mean: f64,
    /// The 99th percentile of the per-position KL.
    pub kl_p99: f64,
    /// The largest per-position KL.
    pub kl_max: f64,
    /// Fraction of positions whose most likely next token is the same.
    pub top1_agreement: f64,
    /// Bytes of KV per token, f16 and q8_0.
    pub kv_bytes_per_token: [usize; 2],
    /// Greedy generations, f16 against q8_0.
    pub greedy: Vec<GreedyResult>,
    /// Prompts whose greedy outputs are identical token for token.
    pub greedy_identical: usize,
}

/// One prompt's greedy outputs.
#[derive(Debug, Serialize)]
pub struct GreedyResult {
    /// The user message.
    pub prompt: String,
    /// Tokens generated with each dtype.
    pub tokens: usize,
    /// Leading tokens the two outputs share.
    pub common_prefix: usize,
    /// The f16 output.
    pub f16: String,
    /// The q8_0 output.
    pub q8_0: String,
}

fn exec_err(e: agentd_engine::ExecError) -> EngineError {
    match e {
        agentd_engine::ExecError::Model(m) => m.into(),
        other => EngineError::InvalidRequest(other.to_string()),
    }
}

/// One sequence in its own executor of `dtype`.
struct Seq {
    exec: CpuExecutor,
    table: Vec<u32>,
    len: usize,
}

impl Seq {
    fn new(engine: &LoadedModel, dtype: KvDtype, positions: usize) -> Result<Self> {
        let mut exec = CpuExecutor::with_kv_dtype(engine.model.clone(), dtype).map_err(exec_err)?;
        let pages = positions.div_ceil(16);
        exec.allocate(pages, 16).map_err(exec_err)?;
        Ok(Seq {
            exec,
            table: (0..pages as u32).collect(),
            len: 0,
        })
    }

    /// Runs `tokens`; returns the logits of the last `logits` of them, row after row.
    fn run(&mut self, tokens: &[u32], kind: RowKind, logits: usize) -> Result<Vec<f32>> {
        let step = SeqStep {
            tokens,
            pos0: self.len,
            page_table: &self.table,
            kind,
            logits,
        };
        let out = self.exec.forward(&[step]).map_err(exec_err)?;
        self.len += tokens.len();
        Ok(out.into_iter().next().flatten().unwrap_or_default())
    }
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len())
        .max_by(|&i, &j| v[i].total_cmp(&v[j]))
        .unwrap_or(0)
}

/// Runs the comparison: `positions` scored positions, `greedy_tokens` per greedy prompt.
pub fn run(
    engine: &LoadedModel,
    positions: usize,
    greedy_tokens: usize,
) -> Result<KvQualityReport> {
    let text: String = PARAGRAPHS.concat();
    let base = engine.tokenizer.encode(&text, false)?;
    let tokens: Vec<u32> = base.iter().copied().cycle().take(positions + 1).collect();
    let ctx = engine.model.config().context_length;
    if tokens.len() > ctx {
        return Err(EngineError::InvalidRequest(format!(
            "{positions} positions exceed the model's context of {ctx}"
        )));
    }
    let vocab = engine.model.config().vocab;
    let mut seqs = [
        Seq::new(engine, KvDtype::F16, tokens.len())?,
        Seq::new(engine, KvDtype::Q8_0, tokens.len())?,
    ];
    let mut kls = Vec::with_capacity(positions);
    let mut agree = 0usize;
    // Every position's logits, a chunk at a time (the next token after position i is scored).
    for chunk in tokens[..positions].chunks(256) {
        let [a, b] = &mut seqs;
        let la = a.run(chunk, RowKind::Prompt, chunk.len())?;
        let lb = b.run(chunk, RowKind::Prompt, chunk.len())?;
        for (ra, rb) in la.chunks_exact(vocab).zip(lb.chunks_exact(vocab)) {
            let (pa, pb) = (log_softmax(ra), log_softmax(rb));
            kls.push(
                pa.iter()
                    .zip(&pb)
                    .map(|(x, y)| x.exp() * (x - y))
                    .sum::<f64>(),
            );
            agree += usize::from(argmax(ra) == argmax(rb));
        }
    }
    let n = kls.len().max(1);
    let kl_mean = kls.iter().sum::<f64>() / n as f64;
    let mut sorted = kls.clone();
    sorted.sort_by(f64::total_cmp);
    let kl_p99 = sorted.get(n * 99 / 100).copied().unwrap_or(0.0);
    let kl_max = sorted.last().copied().unwrap_or(0.0);
    let mut distinct = tokens[..positions].to_vec();
    distinct.sort_unstable();
    distinct.dedup();

    let mut greedy = Vec::new();
    for prompt in PROMPTS {
        let ids = engine.chat_prompt(&[Message::new(Role::User, *prompt)])?;
        let outs: Vec<Vec<u32>> = [KvDtype::F16, KvDtype::Q8_0]
            .into_iter()
            .map(|d| greedy_run(engine, d, &ids, greedy_tokens))
            .collect::<Result<_>>()?;
        let common = outs[0]
            .iter()
            .zip(&outs[1])
            .take_while(|(a, b)| a == b)
            .count();
        greedy.push(GreedyResult {
            prompt: prompt.to_string(),
            tokens: outs[0].len().max(outs[1].len()),
            common_prefix: common,
            f16: engine.tokenizer.decode(&outs[0], true)?,
            q8_0: engine.tokenizer.decode(&outs[1], true)?,
        });
    }
    let greedy_identical = greedy
        .iter()
        .filter(|g| g.f16 == g.q8_0 && g.common_prefix == g.tokens)
        .count();
    Ok(KvQualityReport {
        model: engine.path.display().to_string(),
        positions: kls.len(),
        distinct_tokens: distinct.len(),
        kl_mean,
        kl_p99,
        kl_max,
        top1_agreement: agree as f64 / n as f64,
        kv_bytes_per_token: [
            seqs[0].exec.kv_bytes_per_token(),
            seqs[1].exec.kv_bytes_per_token(),
        ],
        greedy,
        greedy_identical,
    })
}

/// Greedy decoding of `max` tokens after `prompt` with `dtype` pages (stops at an end token).
fn greedy_run(
    engine: &LoadedModel,
    dtype: KvDtype,
    prompt: &[u32],
    max: usize,
) -> Result<Vec<u32>> {
    let mut seq = Seq::new(engine, dtype, prompt.len() + max + 1)?;
    let stops = engine.tokenizer.stop_token_ids();
    let mut logits = seq.run(prompt, RowKind::Prompt, 1)?;
    let mut out = Vec::new();
    for _ in 0..max {
        let t = argmax(&logits) as u32;
        if stops.contains(&t) {
            break;
        }
        out.push(t);
        logits = seq.run(&[t], RowKind::Decode, 1)?;
    }
    Ok(out)
}
