//! A typed async client for the agentd daemon over its Unix socket.

use crate::error::Error;
use crate::proto::agentd_client::AgentdClient;
use crate::proto::{self, generate_event};
use crate::types::{Health, ModelInfo, PrefixEntry, Stats, Usage};
use hyper_util::rt::TokioIo;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::UnixStream;
use tokio_stream::Stream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::{InterceptedService, Interceptor};
use tonic::transport::{Channel, Endpoint, Uri};

pub use agentd_wire::default_socket_path;

fn wire_messages(messages: &[crate::Message]) -> Vec<proto::Message> {
    messages
        .iter()
        .map(|m| proto::Message {
            role: m.role.as_str().to_owned(),
            content: m.content.clone(),
        })
        .collect()
}

/// Adds `authorization: Bearer <token>` to every call (TCP connections); nothing on the Unix
/// socket, where the daemon knows the caller from its credentials.
#[derive(Clone, Debug)]
struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Rpc = AgentdClient<InterceptedService<Channel, Auth>>;

/// A connection to the daemon. Cheap to clone (clones share the connection).
#[derive(Clone, Debug)]
pub struct Client {
    rpc: Rpc,
}

impl Client {
    /// Connects to the daemon listening on the Unix socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_owned();
        let shown = path.display().to_string();
        // The URI is required by the API but unused: every connection goes to the socket.
        let channel = Endpoint::try_from("http://agentd.local")
            .map_err(|e| Error::Unavailable(e.to_string()))?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|e| {
                // The transport error's own text is generic; the cause says what happened.
                let mut why = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    why = c.to_string();
                    cause = c.source();
                }
                Error::Unavailable(format!("{shown}: {why} (is `agentd serve` running?)"))
            })?;
        Ok(Self {
            rpc: AgentdClient::with_interceptor(channel, Auth(None)),
        })
    }

    /// Connects over TCP (`addr` like `127.0.0.1:7070`), authenticating every call with a
    /// bearer token from the daemon's configuration.
    pub async fn connect_tcp(addr: &str, token: &str) -> Result<Self, Error> {
        let header = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Error::InvalidArgument("the token is not valid header text".into()))?;
        let channel = Endpoint::try_from(format!("http://{addr}"))
            .map_err(|e| Error::InvalidArgument(format!("address {addr}: {e}")))?
            .connect()
            .await
            .map_err(|e| Error::Unavailable(format!("{addr}: {e}")))?;
        Ok(Self {
            rpc: AgentdClient::with_interceptor(channel, Auth(Some(header))),
        })
    }

    /// Connects to the daemon at [`default_socket_path`].
    pub async fn connect_default() -> Result<Self, Error> {
        Self::connect(default_socket_path()).await
    }

    /// The daemon's version and readiness, once it answers.
    pub async fn health(&self) -> Result<Health, Error> {
        let reply = self.rpc.clone().health(proto::HealthRequest {}).await?;
        Ok(Health::from_wire(reply.into_inner()))
    }

    /// The loaded model's hyperparameters and the pool's shape.
    pub async fn model_info(&self) -> Result<ModelInfo, Error> {
        let reply = self
            .rpc
            .clone()
            .model_info(proto::ModelInfoRequest {})
            .await?;
        Ok(ModelInfo::from_wire(reply.into_inner()))
    }

    /// Tokenises `text`; with `parse_special`, control-token strings become control tokens.
    pub async fn tokenize(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, Error> {
        let req = proto::TokenizeRequest {
            text: text.to_owned(),
            parse_special,
        };
        Ok(self.rpc.clone().tokenize(req).await?.into_inner().tokens)
    }

    /// Computes and pins `tokens` as a prefix sessions can start from; returns its id.
    pub async fn register_prefix(&self, tokens: Vec<u32>) -> Result<u64, Error> {
        let req = proto::RegisterPrefixRequest {
            tokens,
            publish: false,
            messages: Vec::new(),
        };
        Ok(self
            .rpc
            .clone()
            .register_prefix(req)
            .await?
            .into_inner()
            .prefix_id)
    }

    /// Renders `messages` with the model's chat template (a system prompt, say), computes and
    /// pins them as a prefix; returns its id.
    pub async fn register_prefix_messages(
        &self,
        messages: &[crate::Message],
    ) -> Result<u64, Error> {
        let req = proto::RegisterPrefixRequest {
            tokens: Vec::new(),
            publish: false,
            messages: wire_messages(messages),
        };
        Ok(self
            .rpc
            .clone()
            .register_prefix(req)
            .await?
            .into_inner()
            .prefix_id)
    }

    /// Opens a session whose log starts with the prefix `prefix` (if any) and then `tokens`.
    pub async fn create_session(
        &self,
        prefix: Option<u64>,
        tokens: Vec<u32>,
    ) -> Result<Session, Error> {
        let req = proto::CreateSessionRequest {
            prefix_id: prefix.unwrap_or(0),
            tokens,
        };
        let reply = self.rpc.clone().create_session(req).await?.into_inner();
        Ok(Session {
            client: self.clone(),
            id: reply.session_id,
        })
    }

    /// A handle on an existing session by id (for a client that reconnects). Nothing is checked
    /// until it is used: an id that is not the caller's gives [`Error::NotFound`] then.
    pub fn session(&self, id: u64) -> Session {
        Session {
            client: self.clone(),
            id,
        }
    }

    /// The pool, the cache and the caller's own counters.
    pub async fn stats(&self) -> Result<Stats, Error> {
        self.stats_request(false).await
    }

    /// Operators: the stats with every tenant's counters in `tenants`.
    pub async fn stats_all_tenants(&self) -> Result<Stats, Error> {
        self.stats_request(true).await
    }

    async fn stats_request(&self, all_tenants: bool) -> Result<Stats, Error> {
        let req = proto::StatsRequest { all_tenants };
        let reply = self.rpc.clone().stats(req).await?;
        Ok(Stats::from_wire(reply.into_inner()))
    }

    /// Unpins and forgets one of the caller's own prefixes (its KV becomes ordinary cache).
    pub async fn drop_prefix(&self, prefix: u64) -> Result<(), Error> {
        let req = proto::PrefixRef { prefix_id: prefix };
        self.rpc.clone().drop_prefix(req).await?;
        Ok(())
    }

    /// The prefixes the caller may use (its own and the published ones); with `all_tenants`,
    /// every tenant's (operators only).
    pub async fn list_prefixes(&self, all_tenants: bool) -> Result<Vec<PrefixEntry>, Error> {
        let req = proto::ListPrefixesRequest { all_tenants };
        let reply = self.rpc.clone().list_prefixes(req).await?.into_inner();
        Ok(reply
            .prefixes
            .into_iter()
            .map(PrefixEntry::from_wire)
            .collect())
    }

    /// Operators: publishes a copy of any tenant's prefix for every tenant (sharing its KV);
    /// returns the published prefix's id.
    pub async fn publish_prefix(&self, prefix: u64) -> Result<u64, Error> {
        let req = proto::PrefixRef { prefix_id: prefix };
        Ok(self
            .rpc
            .clone()
            .publish_prefix(req)
            .await?
            .into_inner()
            .prefix_id)
    }

    /// Operators: unpins and forgets any prefix, of any tenant.
    pub async fn unpin_prefix(&self, prefix: u64) -> Result<(), Error> {
        let req = proto::PrefixRef { prefix_id: prefix };
        self.rpc.clone().unpin_prefix(req).await?;
        Ok(())
    }

    /// Operators: evicts unpinned cache no running request uses, up to `pages` pages (`None`:
    /// all of it); returns the pages freed.
    pub async fn evict_cache(&self, pages: Option<u32>) -> Result<u32, Error> {
        let req = proto::EvictCacheRequest {
            pages: pages.unwrap_or(0),
        };
        Ok(self
            .rpc
            .clone()
            .evict_cache(req)
            .await?
            .into_inner()
            .freed_pages)
    }
}

/// How to generate. Defaults: 256 tokens and agentd's sampling defaults
/// ([`agentd_wire::sampling_defaults`]: temperature 0.7, top-k 40, top-p 0.95, min-p 0.05,
/// repetition penalty 1.1, as the daemon and `agentd generate` use);
/// [`GenerateOptions::greedy`] for determinism.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    max_tokens: u32,
    sampling: proto::Sampling,
    stop: Vec<String>,
    constraint: Option<proto::Constraint>,
    ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: agentd_wire::sampling_defaults::wire(),
            stop: Vec::new(),
            constraint: None,
            ignore_eos: false,
        }
    }
}

impl GenerateOptions {
    /// Greedy decoding (always the most likely token), no penalties.
    pub fn greedy() -> Self {
        Self {
            sampling: proto::Sampling {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                repetition_penalty: 1.0,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                seed: None,
            },
            ..Self::default()
        }
    }
    /// The most tokens to generate.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = n;
        self
    }
    /// Generate exactly `max_tokens` tokens: end-of-sequence tokens are not sampled (unless a
    /// constraint allows nothing else), for benchmarks.
    pub fn ignore_eos(mut self, on: bool) -> Self {
        self.ignore_eos = on;
        self
    }
    /// The most tokens a generation with these options produces.
    pub fn token_limit(&self) -> u32 {
        self.max_tokens
    }
    /// Softmax temperature (0 = greedy).
    pub fn temperature(mut self, t: f32) -> Self {
        self.sampling.temperature = t;
        self
    }
    /// Keep only the `k` most likely tokens (0 = off).
    pub fn top_k(mut self, k: u32) -> Self {
        self.sampling.top_k = k;
        self
    }
    /// Nucleus sampling mass (1 = off).
    pub fn top_p(mut self, p: f32) -> Self {
        self.sampling.top_p = p;
        self
    }
    /// Divides the logits of tokens already in the context by `r` (1 = off; llama.cpp's
    /// `repeat_penalty`).
    pub fn repetition_penalty(mut self, r: f32) -> Self {
        self.sampling.repetition_penalty = r;
        self
    }
    /// The output must be one JSON value matching `schema` (enforced by the daemon).
    pub fn json_schema(mut self, schema: &serde_json::Value) -> Self {
        self.constraint = Some(proto::Constraint {
            kind: Some(proto::constraint::Kind::JsonSchema(schema.to_string())),
        });
        self
    }
    /// The output must match the Lark grammar `grammar` (llguidance's dialect).
    pub fn lark(mut self, grammar: &str) -> Self {
        self.constraint = Some(proto::Constraint {
            kind: Some(proto::constraint::Kind::Lark(grammar.to_owned())),
        });
        self
    }
    /// Free text and Hermes-style tool calls whose JSON matches one of `tools` (name, JSON
    /// schema of the arguments); with `required`, only tool calls.
    pub fn tool_calls(mut self, tools: &[(String, serde_json::Value)], required: bool) -> Self {
        let tools = tools
            .iter()
            .map(|(name, params)| proto::Tool {
                name: name.clone(),
                description: String::new(),
                parameters_json: params.to_string(),
            })
            .collect();
        self.constraint = Some(proto::Constraint {
            kind: Some(proto::constraint::Kind::ToolCalls(proto::ToolCalls {
                tools,
                required,
                max_calls: 0,
            })),
        });
        self
    }
    /// With [`GenerateOptions::tool_calls`]: at most `n` calls in the reply, which ends after
    /// the last (0: any number, the default; the daemon refuses more than 64).
    pub fn max_tool_calls(mut self, n: u32) -> Self {
        if let Some(proto::Constraint {
            kind: Some(proto::constraint::Kind::ToolCalls(t)),
        }) = &mut self.constraint
        {
            t.max_calls = n;
        }
        self
    }
    /// Seed for reproducible sampling.
    pub fn seed(mut self, seed: u64) -> Self {
        self.sampling.seed = Some(seed);
        self
    }
    /// Stop when `s` appears (repeatable).
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }
}

/// What a generation stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A sampled token and the text that became final with it.
    Token {
        /// Token id.
        id: u32,
        /// Text (may be empty).
        text: String,
    },
    /// The end: prompt, cached and generated token counts, timings and the finish reason.
    Done(Usage),
}

/// The events of one generation. Dropping it cancels the generation in the daemon.
#[derive(Debug)]
pub struct GenerateStream {
    inner: tonic::Streaming<proto::GenerateEvent>,
}

impl Stream for GenerateStream {
    type Item = Result<Event, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(ev))) => Poll::Ready(Some(match ev.event {
                Some(generate_event::Event::Token(t)) => Ok(Event::Token {
                    id: t.id,
                    text: t.text,
                }),
                Some(generate_event::Event::Done(u)) => Ok(Event::Done(Usage::from_wire(u))),
                None => Err(Error::Daemon {
                    code: tonic::Code::Internal,
                    message: "empty event".into(),
                }),
            })),
            Poll::Ready(Some(Err(s))) => Poll::Ready(Some(Err(s.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A session: a token log in the daemon, whose KV is shared through the prefix cache.
#[derive(Clone, Debug)]
pub struct Session {
    client: Client,
    id: u64,
}

impl Session {
    /// The session's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The client this session talks through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Appends tokens; returns the log's new length.
    pub async fn append(&self, tokens: Vec<u32>) -> Result<u32, Error> {
        self.append_request(tokens, Vec::new(), false).await
    }

    /// Appends chat messages, rendered by the model's template after what the session holds;
    /// with `add_generation_prompt`, the log then ends where the assistant's reply begins.
    /// Returns the log's new length.
    pub async fn append_messages(
        &self,
        messages: &[crate::Message],
        add_generation_prompt: bool,
    ) -> Result<u32, Error> {
        self.append_request(Vec::new(), wire_messages(messages), add_generation_prompt)
            .await
    }

    async fn append_request(
        &self,
        tokens: Vec<u32>,
        messages: Vec<proto::Message>,
        add_generation_prompt: bool,
    ) -> Result<u32, Error> {
        let req = proto::AppendRequest {
            session_id: self.id,
            tokens,
            messages,
            add_generation_prompt,
        };
        let mut rpc = self.client.rpc.clone();
        Ok(rpc.append(req).await?.into_inner().tokens)
    }

    /// Starts a generation continuing the log.
    pub async fn generate(&self, opts: &GenerateOptions) -> Result<GenerateStream, Error> {
        let req = proto::GenerateRequest {
            session_id: self.id,
            max_tokens: opts.max_tokens,
            sampling: Some(opts.sampling),
            stop: opts.stop.clone(),
            constraint: opts.constraint.clone(),
            ignore_eos: opts.ignore_eos,
        };
        let inner = self.client.rpc.clone().generate(req).await?.into_inner();
        Ok(GenerateStream { inner })
    }

    /// A new session sharing this one's whole log (and its cached KV).
    pub async fn fork(&self) -> Result<Session, Error> {
        let req = proto::SessionRef {
            session_id: self.id,
        };
        let reply = self
            .client
            .rpc
            .clone()
            .fork_session(req)
            .await?
            .into_inner();
        Ok(Session {
            client: self.client.clone(),
            id: reply.session_id,
        })
    }

    /// Replaces tokens `start..end` of the log with `tokens` (a new epoch: the tokens before
    /// `start` keep their cached KV); returns the new epoch.
    pub async fn rewrite(&self, start: u32, end: u32, tokens: Vec<u32>) -> Result<u64, Error> {
        let req = proto::RewriteRequest {
            session_id: self.id,
            start,
            end,
            tokens,
            messages: Vec::new(),
            add_generation_prompt: false,
        };
        Ok(self
            .client
            .rpc
            .clone()
            .rewrite(req)
            .await?
            .into_inner()
            .epoch)
    }

    /// Replaces tokens `start..end` of the log with `messages`, rendered by the model's
    /// template as if appended after the tokens before `start` (with `add_generation_prompt`,
    /// ending where the assistant's reply begins). Returns the log's new length and epoch.
    pub async fn rewrite_messages(
        &self,
        start: u32,
        end: u32,
        messages: &[crate::Message],
        add_generation_prompt: bool,
    ) -> Result<(u32, u64), Error> {
        let req = proto::RewriteRequest {
            session_id: self.id,
            start,
            end,
            tokens: Vec::new(),
            messages: wire_messages(messages),
            add_generation_prompt,
        };
        let r = self.client.rpc.clone().rewrite(req).await?.into_inner();
        Ok((r.tokens, r.epoch))
    }

    /// The log and its epoch.
    pub async fn tokens(&self) -> Result<(Vec<u32>, u64), Error> {
        let req = proto::SessionRef {
            session_id: self.id,
        };
        let r = self
            .client
            .rpc
            .clone()
            .session_tokens(req)
            .await?
            .into_inner();
        Ok((r.tokens, r.epoch))
    }

    /// Closes the session (cancelling a generation in flight).
    pub async fn close(self) -> Result<(), Error> {
        let req = proto::SessionRef {
            session_id: self.id,
        };
        self.client.rpc.clone().close_session(req).await?;
        Ok(())
    }
}
