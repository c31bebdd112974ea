//! The agent layer: tools, the tool-call loop with daemon-enforced calls, and a shared prefix.
//!
//! - [`tool`]: the [`Tool`] trait and [`tool_fn`] (an async function over a serde type, its
//!   schema derived by schemars).
//! - [`hermes`]: the Hermes tool-call format (system prompt, call parsing, results).
//! - [`Agent`]: system prompt + tools + sampling + turn budget. Every session of an agent
//!   starts from one registered prefix (the system prompt and tool list, byte-identical), and
//!   every generation is constrained by the daemon so calls always parse and match a schema.

pub mod hermes;
pub mod tool;

pub use hermes::ToolCall;
pub use tool::{tool_fn, Tool, ToolFuture};

use crate::client::{Client, Event, GenerateOptions, Session};
use crate::{proto, Error, Message};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};
use tokio_stream::StreamExt;

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
    TurnFinished(proto::Usage),
    /// The run ended.
    Done(RunOutput),
    /// The run failed.
    Failed(Error),
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The final reply's text (outside any tool calls).
    pub answer: String,
    /// Every message of the run: the input, the replies, the tool results.
    pub transcript: Vec<Message>,
    /// One usage per generation.
    pub usages: Vec<proto::Usage>,
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
    prefix: OnceCell<u64>,
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
            prefix: OnceCell::new(),
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
        }
    }

    /// The system prompt: the instructions and the tools' signatures.
    pub fn system_prompt(&self) -> String {
        hermes::system_prompt(&self.0.instructions, &self.0.tools)
    }

    /// The agent's prefix (system prompt and tool list) on `client`'s daemon, registered on
    /// first use and pinned there; every session starts from it.
    pub async fn prefix(&self, client: &Client) -> Result<u64, Error> {
        self.0
            .prefix
            .get_or_try_init(|| async {
                client
                    .register_prefix_messages(&[Message::system(self.system_prompt())])
                    .await
            })
            .await
            .copied()
    }

    /// A new session starting from the agent's prefix.
    pub async fn session(&self, client: &Client) -> Result<Session, Error> {
        let prefix = self.prefix(client).await?;
        client.create_session(Some(prefix), Vec::new()).await
    }

    /// Runs the tool loop on `session` for `input` until a reply without calls or the turn
    /// budget.
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
        let a = &self.0;
        let emit = |e: AgentEvent| {
            if let Some(tx) = events {
                let _ = tx.send(e);
            }
        };
        let specs: Vec<(String, serde_json::Value)> = a
            .tools
            .iter()
            .map(|t| (t.name().to_owned(), t.parameters()))
            .collect();
        let mut out = RunOutput {
            answer: String::new(),
            transcript: vec![Message::user(input)],
            usages: Vec::new(),
            finished: false,
        };
        session
            .append_messages(&[Message::user(input)], true)
            .await?;
        for turn in 0..a.max_turns {
            let required = match a.tool_choice {
                ToolChoice::Auto => false,
                ToolChoice::RequiredFirst => turn == 0,
                ToolChoice::Always => true,
            };
            let opts = if specs.is_empty() || !a.constrained {
                a.options.clone()
            } else {
                a.options.clone().tool_calls(&specs, required)
            };
            let mut stream = session.generate(&opts).await?;
            let (mut reply, mut usage) = (String::new(), None);
            while let Some(ev) = stream.next().await {
                match ev? {
                    Event::Token { text, .. } => {
                        if !text.is_empty() {
                            emit(AgentEvent::Text(text.clone()));
                        }
                        reply.push_str(&text);
                    }
                    Event::Done(u) => usage = Some(u),
                }
            }
            let usage = usage.ok_or_else(|| Error::Unavailable("the stream ended early".into()))?;
            if usage.finish_reason != "eos" {
                // Close the turn so the next message renders as ChatML expects.
                let end = session.client().tokenize("<|im_end|>\n", true).await?;
                session.append(end).await?;
            }
            emit(AgentEvent::TurnFinished(usage.clone()));
            out.usages.push(usage);
            out.transcript.push(Message::assistant(reply.clone()));
            let (calls, text) = hermes::parse_calls(&reply);
            out.answer = text;
            if calls.is_empty() {
                out.finished = true;
                return Ok(out);
            }
            let results = self.call_tools(&calls, &emit).await;
            session.append_messages(&results, true).await?;
            out.transcript.extend(results);
        }
        Ok(out)
    }

    /// Runs `calls` concurrently; their results, in call order, as `tool` messages.
    async fn call_tools(&self, calls: &[ToolCall], emit: &impl Fn(AgentEvent)) -> Vec<Message> {
        let timeout = self.0.tool_timeout;
        let handles: Vec<_> = calls
            .iter()
            .map(|c| {
                emit(AgentEvent::ToolCallStarted {
                    name: c.name.clone(),
                    arguments: c.arguments.clone(),
                });
                let tool = self.0.tools.iter().find(|t| t.name() == c.name).cloned();
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
            results.push(Message::tool(hermes::tool_response(&c.name, &text)));
        }
        results
    }
}
