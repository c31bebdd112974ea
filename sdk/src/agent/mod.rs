//! The agent layer: tools, the tool-call loop with daemon-enforced calls, and a shared prefix.
//!
//! - [`tool`]: the [`Tool`] trait and [`tool_fn`] (an async function over a serde type, its
//!   schema derived by schemars).
//! - [`hermes`]: the Hermes tool-call format (system prompt, call parsing, results).
//! - [`Agent`]: system prompt + tools + sampling + turn budget + [`ContextPolicy`]. Every
//!   session of an agent starts from one registered prefix (the system prompt and tool list,
//!   byte-identical), and every generation is constrained by the daemon so calls always parse
//!   and match a schema.
//! - [`context`]: keeping a long run inside the context (masking old results, summarising
//!   older turns as a new epoch) without ever rewriting the prefix.

pub mod context;
pub mod hermes;
mod run;
pub mod tool;

pub use context::ContextPolicy;
pub use hermes::ToolCall;
pub use tool::{tool_fn, Tool, ToolFuture};

use crate::client::{Client, GenerateOptions, Session};
use crate::{Error, Message, Usage};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};

/// When the model must call a tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model chooses between text and calls (the default).
    #[default]
    Auto,
    /// The first reply must be tool calls; later ones choose.
    RequiredFirst,
    /// Every reply must be tool calls; the run ends at the turn budget (pipelines, benchmarks).
    Always,
}

/// What happens during a run, for [`Agent::run_stream`].
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// Text the model produced (calls included, as they stream).
    Text(String),
    /// A tool call is about to run.
    ToolCallStarted {
        /// Which tool.
        name: String,
        /// With what.
        arguments: serde_json::Value,
    },
    /// A tool call finished (or failed, or timed out: `is_error`).
    ToolCallFinished {
        /// Which tool.
        name: String,
        /// Its result or error text, as the model sees it.
        result: String,
        /// Whether it failed.
        is_error: bool,
    },
    /// One generation ended.
    TurnFinished(Usage),
    /// The log was compacted to stay inside the context budget.
    Compacted(Compaction),
    /// The run ended.
    Done(RunOutput),
    /// The run failed.
    Failed(Error),
}

/// What a compaction did.
#[derive(Debug, Clone, PartialEq)]
pub enum CompactionKind {
    /// Old tool results were replaced by short stubs.
    Masked {
        /// How many results.
        results: usize,
    },
    /// Older turns were replaced by the model's summary (a new epoch after the prefix).
    Summarized {
        /// The summary's text.
        summary: String,
        /// How many of the newest replies (with their results) were kept verbatim.
        kept_replies: usize,
    },
}

/// One compaction of a session's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Compaction {
    /// Masking or summarising.
    pub kind: CompactionKind,
    /// The log's length before.
    pub tokens_before: u32,
    /// The log's length after.
    pub tokens_after: u32,
    /// The first position rewritten: the tokens before it (the prefix, at least) keep their
    /// cached KV.
    pub start: u32,
    /// The session's epoch after it.
    pub epoch: u64,
}

impl std::fmt::Display for Compaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            CompactionKind::Masked { results } => write!(f, "masked {results} old tool results")?,
            CompactionKind::Summarized { kept_replies, .. } => write!(
                f,
                "summarised older turns, kept the last {kept_replies} replies"
            )?,
        }
        write!(
            f,
            ": {} -> {} tokens, rewritten from token {} (epoch {})",
            self.tokens_before, self.tokens_after, self.start, self.epoch
        )
    }
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The final reply's text (outside any tool calls).
    pub answer: String,
    /// Every message of the run: the input, the replies, the tool results.
    pub transcript: Vec<Message>,
    /// One usage per generation.
    pub usages: Vec<Usage>,
    /// The compactions the context policy made, in order.
    pub compactions: Vec<Compaction>,
    /// False when the turn budget ran out before a reply without calls.
    pub finished: bool,
}

struct Inner {
    instructions: String,
    tools: Vec<Arc<dyn Tool>>,
    options: GenerateOptions,
    max_turns: usize,
    tool_timeout: Duration,
    tool_choice: ToolChoice,
    constrained: bool,
    max_calls: u32,
    context: ContextPolicy,
    setup: OnceCell<Setup>,
}

/// What an agent learns from the daemon once: its prefix and the template's turn markup.
#[derive(Debug)]
struct Setup {
    /// The registered prefix.
    prefix: u64,
    /// Its tokens: a session's log that starts with them is the agent's to compact.
    prefix_tokens: Vec<u32>,
    /// The template's generation prompt (what opens the assistant's turn).
    open_turn: Vec<u32>,
    /// The end of a turn (ChatML's `<|im_end|>` and newline, as Hermes calls need).
    end_turn: Vec<u32>,
    /// The daemon's context length.
    context: u32,
}

/// A tool-using agent (cheap to clone; clones share the registered prefix).
#[derive(Clone)]
pub struct Agent(Arc<Inner>);

/// Builds an [`Agent`].
pub struct AgentBuilder {
    instructions: String,
    tools: Vec<Arc<dyn Tool>>,
    options: GenerateOptions,
    max_turns: usize,
    tool_timeout: Duration,
    tool_choice: ToolChoice,
    constrained: bool,
    max_calls: u32,
    context: ContextPolicy,
}

impl AgentBuilder {
    /// Adds a tool.
    pub fn tool(mut self, tool: Arc<dyn Tool>) -> Self {
        self.tools.push(tool);
        self
    }
    /// Sampling and length per generation (default: [`GenerateOptions::default`] with 256
    /// tokens).
    pub fn options(mut self, options: GenerateOptions) -> Self {
        self.options = options;
        self
    }
    /// Generations per run at most (default 8).
    pub fn max_turns(mut self, n: usize) -> Self {
        self.max_turns = n.max(1);
        self
    }
    /// How long a tool may run before its result is a timeout error (default 30 s).
    pub fn tool_timeout(mut self, t: Duration) -> Self {
        self.tool_timeout = t;
        self
    }
    /// When the model must call a tool (default [`ToolChoice::Auto`]).
    pub fn tool_choice(mut self, c: ToolChoice) -> Self {
        self.tool_choice = c;
        self
    }
    /// Whether the daemon constrains replies to valid tool calls (default true; off only to
    /// measure what the model does alone).
    pub fn constrained(mut self, on: bool) -> Self {
        self.constrained = on;
        self
    }
    /// The most tool calls in one reply (default 0: any number). The daemon ends the reply
    /// after the last, so a small model that would repeat calls until `max_tokens` does not.
    pub fn max_calls_per_reply(mut self, n: u32) -> Self {
        self.max_calls = n;
        self
    }
    /// How a run stays inside the context (default [`ContextPolicy::default`]: the daemon's
    /// context, old results masked, then older turns summarised).
    pub fn context(mut self, policy: ContextPolicy) -> Self {
        self.context = policy;
        self
    }
    /// The agent.
    pub fn build(self) -> Agent {
        Agent(Arc::new(Inner {
            instructions: self.instructions,
            tools: self.tools,
            options: self.options,
            max_turns: self.max_turns,
            tool_timeout: self.tool_timeout,
            tool_choice: self.tool_choice,
            constrained: self.constrained,
            max_calls: self.max_calls,
            context: self.context,
            setup: OnceCell::new(),
        }))
    }
}

impl Agent {
    /// An agent with these instructions (its system prompt, before the tool list).
    pub fn builder(instructions: impl Into<String>) -> AgentBuilder {
        AgentBuilder {
            instructions: instructions.into(),
            tools: Vec::new(),
            options: GenerateOptions::default(),
            max_turns: 8,
            tool_timeout: Duration::from_secs(30),
            tool_choice: ToolChoice::Auto,
            constrained: true,
            max_calls: 0,
            context: ContextPolicy::default(),
        }
    }

    /// The system prompt: the instructions and the tools' signatures.
    pub fn system_prompt(&self) -> String {
        hermes::system_prompt(&self.0.instructions, &self.0.tools)
    }

    /// The agent's prefix (system prompt and tool list) on `client`'s daemon, registered on
    /// first use and pinned there; every session starts from it.
    pub async fn prefix(&self, client: &Client) -> Result<u64, Error> {
        Ok(self.setup(client).await?.prefix)
    }

    async fn setup(&self, client: &Client) -> Result<&Setup, Error> {
        self.0
            .setup
            .get_or_try_init(|| async {
                let prefix = client
                    .register_prefix_messages(&[Message::system(self.system_prompt())])
                    .await?;
                let context = client.model_info().await?.context_length;
                // A probe session shows the prefix's tokens and the template's generation
                // prompt: a message appended with it, minus the same message without.
                let probe = client.create_session(Some(prefix), Vec::new()).await?;
                let learned = async {
                    let (prefix_tokens, _) = probe.tokens().await?;
                    let base = prefix_tokens.len() as u32;
                    let with = probe.append_messages(&[Message::user(".")], true).await?;
                    let (log, _) = probe.tokens().await?;
                    let (without, _) = probe
                        .rewrite_messages(base, with, &[Message::user(".")], false)
                        .await?;
                    let open_turn = log[without as usize..with as usize].to_vec();
                    Ok::<_, Error>((prefix_tokens, open_turn))
                }
                .await;
                let _ = probe.close().await;
                let (prefix_tokens, open_turn) = learned?;
                let end_turn = client.tokenize("<|im_end|>\n", true).await?;
                Ok::<_, Error>(Setup {
                    prefix,
                    prefix_tokens,
                    open_turn,
                    end_turn,
                    context,
                })
            })
            .await
    }

    /// A new session starting from the agent's prefix.
    pub async fn session(&self, client: &Client) -> Result<Session, Error> {
        let prefix = self.prefix(client).await?;
        client.create_session(Some(prefix), Vec::new()).await
    }

    /// Runs the tool loop on `session` for `input` until a reply without calls or the turn
    /// budget, compacting the log by the agent's [`ContextPolicy`] whenever the next step would
    /// not fit.
    pub async fn run(&self, session: &Session, input: &str) -> Result<RunOutput, Error> {
        self.run_inner(session, input, None).await
    }

    /// As [`Agent::run`], streaming what happens; the last event is `Done` or `Failed`.
    pub fn run_stream(
        &self,
        session: Session,
        input: String,
    ) -> tokio_stream::wrappers::UnboundedReceiverStream<AgentEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let agent = self.clone();
        tokio::spawn(async move {
            let last = match agent.run_inner(&session, &input, Some(&tx)).await {
                Ok(out) => AgentEvent::Done(out),
                Err(e) => AgentEvent::Failed(e),
            };
            let _ = tx.send(last);
        });
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
    }

    async fn run_inner(
        &self,
        session: &Session,
        input: &str,
        events: Option<&mpsc::UnboundedSender<AgentEvent>>,
    ) -> Result<RunOutput, Error> {
        let emit = |e: AgentEvent| {
            if let Some(tx) = events {
                let _ = tx.send(e);
            }
        };
        let setup = self.setup(session.client()).await?;
        run::Run::new(&self.0, setup, session, input, &emit)
            .run()
            .await
    }
}

/// Runs `calls` concurrently; their result texts (errors as `error: …`), in call order.
async fn call_tools(
    agent: &Inner,
    calls: &[ToolCall],
    emit: &(dyn Fn(AgentEvent) + Send + Sync),
) -> Vec<String> {
    let timeout = agent.tool_timeout;
    let handles: Vec<_> = calls
        .iter()
        .map(|c| {
            emit(AgentEvent::ToolCallStarted {
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            });
            let tool = agent.tools.iter().find(|t| t.name() == c.name).cloned();
            let (name, args) = (c.name.clone(), c.arguments.clone());
            tokio::spawn(async move {
                let Some(tool) = tool else {
                    return Err(format!("there is no tool named {name:?}"));
                };
                match tokio::time::timeout(timeout, tool.call(args)).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("{name} timed out after {timeout:?}")),
                }
            })
        })
        .collect();
    let mut results = Vec::new();
    for (c, h) in calls.iter().zip(handles) {
        let r = h
            .await
            .unwrap_or_else(|e| Err(format!("the tool panicked: {e}")));
        let (text, is_error) = match r {
            Ok(t) => (t, false),
            Err(e) => (format!("error: {e}"), true),
        };
        emit(AgentEvent::ToolCallFinished {
            name: c.name.clone(),
            result: text.clone(),
            is_error,
        });
        results.push(text);
    }
    results
}
