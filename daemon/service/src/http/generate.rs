//! `POST /v1/chat/completions` and `POST /v1/completions`: a stateless request is a session of
//! its own (so its prompt shares cached prefixes with every other request and session of the
//! tenant), one generation, and the session closed when the reply ends or the client goes away
//! ([`SessionGuard`]: dropping the response stream closes it at once, which cancels the
//! generation and frees its pages).

use super::error::ApiError;
use super::params::{self, GenParams, Prompt, ToolMode};
use super::toolcalls::{Piece, ToolCallParser};
use super::HttpState;
use crate::status::to_status;
use agentd_engine::constraint::ConstraintSpec;
use agentd_engine::{FinishReason, GenerateOptions, TokenLogprob};
use agentd_scheduler::{Event, SchedulerHandle, SessionId, TenantId, Usage};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

/// Closes a request's session when dropped (the reply is done, or its stream was dropped
/// because the client went away): the scheduler cancels a generation still running and frees
/// its pages at its next step.
struct SessionGuard {
    sched: SchedulerHandle,
    tenant: TenantId,
    id: SessionId,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let (sched, tenant, id) = (self.sched.clone(), self.tenant, self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = sched.close(tenant, id).await {
                    tracing::debug!(error = %e, "closing a finished request's session");
                }
            });
        }
    }
}

/// Counts a running HTTP generation (see [`HttpState::drained`]).
struct Inflight(Arc<std::sync::atomic::AtomicUsize>);

impl Inflight {
    fn new(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One running generation: its events, its session, and the metrics it feeds.
struct Running {
    rx: UnboundedReceiver<Event>,
    _guard: SessionGuard,
    _inflight: Inflight,
    st: Arc<HttpState>,
    tenant: TenantId,
    last_token: Option<Instant>,
    /// End-of-turn tokens: streamed by the scheduler, but not part of the reply.
    stop_ids: Vec<u32>,
}

impl Running {
    /// The next event; records inter-token gaps and the finished request in the metrics.
    async fn next(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await?;
        match &ev {
            Event::Token { .. } => {
                let now = Instant::now();
                if let Some(last) = self.last_token.replace(now) {
                    self.st.svc.metrics.observe_inter_token(now - last);
                }
            }
            Event::Done(u) => self.st.svc.metrics.observe_done(self.tenant, u),
            Event::Error(_) => {}
        }
        Some(ev)
    }

    fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }
}

/// Starts `gen.n` generations after `tokens`: one session, forked for every further choice
/// (the forks share its tokens, and its KV once computed, so the prompt is computed once).
/// With a seed, choice `i` samples with seed + `i`.
async fn start(
    st: &Arc<HttpState>,
    tenant: TenantId,
    tokens: Vec<u32>,
    gen: &GenParams,
    constraint: Option<ConstraintSpec>,
    arrived: Instant,
) -> Result<Vec<Running>, ApiError> {
    let ctx = st.svc.model.model.config().context_length;
    let n = tokens.len();
    if n == 0 {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    let context_error = |param: Option<&str>, msg: String| {
        let mut e = match param {
            Some(p) => ApiError::param(p, msg),
            None => ApiError::bad_request(msg),
        };
        e.code = Some("context_length_exceeded");
        e
    };
    if n >= ctx {
        return Err(context_error(
            None,
            format!("the prompt has {n} tokens; this model's context is {ctx} tokens"),
        ));
    }
    let room = ctx - n;
    let max_tokens = match gen.max_tokens {
        Some(m) if m > room => {
            return Err(context_error(
                Some("max_tokens"),
                format!(
                    "{m} tokens after a prompt of {n} pass this model's context of {ctx} tokens; ask for at most {room}"
                ),
            ))
        }
        Some(m) => m,
        // Up to the context, within the tenant's tokens-per-request limit.
        None => room.min(st.svc.sched.limits().request_tokens.saturating_sub(n).max(1)),
    };
    let mut decs = Vec::with_capacity(gen.n);
    for i in 0..gen.n {
        let mut sampling = gen.sampling.clone();
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
        let opts = GenerateOptions {
            sampling,
            max_tokens,
            stop: gen.stop.clone(),
            ignore_eos: gen.ignore_eos,
            logprobs: gen.logprobs,
            constraint: constraint.clone(),
        };
        decs.push(st.svc.decoding(opts).await?);
    }
    let sched = st.svc.sched.clone();
    let first = sched
        .create_session(tenant, None, tokens)
        .await
        .map_err(to_status)?;
    let mut guards = vec![SessionGuard {
        sched: sched.clone(),
        tenant,
        id: first,
    }];
    for _ in 1..gen.n {
        let id = sched.fork(tenant, first).await.map_err(to_status)?;
        guards.push(SessionGuard {
            sched: sched.clone(),
            tenant,
            id,
        });
    }
    let mut runs = Vec::with_capacity(gen.n);
    for (guard, dec) in guards.into_iter().zip(decs) {
        let rx = sched
            .generate_at(tenant, guard.id, dec, arrived)
            .await
            .map_err(to_status)?;
        runs.push(Running {
            rx,
            _guard: guard,
            _inflight: Inflight::new(&st.inflight),
            st: st.clone(),
            tenant,
            last_token: None,
            stop_ids: st.svc.model.tokenizer.stop_token_ids().to_vec(),
        });
    }
    Ok(runs)
}

/// The usage of `n` choices of one prompt: the prompt counted once, the outputs summed.
fn total_usage(usages: &[Usage]) -> Value {
    let first = &usages[0];
    let completion: usize = usages.iter().map(|u| u.generated_tokens).sum();
    json!({
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    })
}

/// A generation whose event stream closed before its usage (logged as an internal error).
fn ended_without_result() -> ApiError {
    ApiError::from_status(&crate::status::internal(
        "the generation ended without a result".into(),
    ))
}

/// OpenAI's finish reason; `called` says the reply made tool calls.
fn finish_reason(f: &FinishReason, called: bool) -> &'static str {
    match f {
        FinishReason::Eos if called => "tool_calls",
        FinishReason::Eos | FinishReason::Stop(_) => "stop",
        FinishReason::MaxTokens | FinishReason::ContextFull => "length",
        FinishReason::Cancelled => "abort",
    }
}

fn fresh_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// A token's text for log-probabilities (its bytes, lossily as UTF-8) and its bytes.
fn token_text(st: &HttpState, id: u32) -> (String, Vec<u8>) {
    let bytes = st
        .svc
        .model
        .tokenizer
        .token_bytes(id)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// A finite log-probability for JSON (−∞ as OpenAI's −9999).
fn finite(lp: f32) -> f64 {
    if lp.is_finite() {
        f64::from(lp)
    } else {
        -9999.0
    }
}

/// A chat `logprobs.content` entry.
fn chat_logprob(st: &HttpState, id: u32, lp: &TokenLogprob) -> Value {
    let (token, bytes) = token_text(st, id);
    let top: Vec<Value> = lp
        .top
        .iter()
        .map(|&(t, l)| {
            let (token, bytes) = token_text(st, t);
            json!({"token": token, "logprob": finite(l), "bytes": bytes})
        })
        .collect();
    json!({"token": token, "logprob": finite(lp.logprob), "bytes": bytes, "top_logprobs": top})
}

/// The body, the caller's tenant and span fields, and the request id, common to both routes.
async fn prepare(
    st: &Arc<HttpState>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(TenantId, Value), ApiError> {
    let tenant = st.tenant(headers)?;
    let body = st.json(headers, body).await?;
    Ok((tenant, body))
}

fn note_user(gen: &GenParams) {
    if let Some(u) = &gen.user {
        tracing::Span::current().record("user", u.as_str());
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(st): State<Arc<HttpState>>, headers: HeaderMap, body: Body) -> Response {
    let arrived = Instant::now();
    match chat_inner(st, headers, body, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    st: Arc<HttpState>,
    headers: HeaderMap,
    body: Body,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let (tenant, body) = prepare(&st, &headers, body).await?;
    let req = params::chat_request(&body)?;
    drop(body);
    st.check_model(req.gen.model.as_deref())?;
    note_user(&req.gen);
    let model = st.svc.model.clone();
    let messages = req.messages;
    let tokens = st
        .svc
        .heavy(move || {
            agentd_engine::render::message_tokens(&model, &messages, false, true)
                .map_err(crate::status::invalid)
        })
        .await?;
    let runs = start(&st, tenant, tokens, &req.gen, req.constraint, arrived).await?;
    let (id, created) = (fresh_id("chatcmpl"), super::unix_now());
    let reply = |index| ChatReply {
        index,
        id: id.clone(),
        created,
        model: st.model_id().to_owned(),
        parser: (req.tools != ToolMode::Off).then(ToolCallParser::new),
        logprobs: req.gen.logprobs.is_some(),
    };
    if req.gen.stream {
        let include_usage = req.gen.include_usage;
        let streams = runs
            .into_iter()
            .enumerate()
            .map(|(i, run)| chat_choice_stream(run, reply(i), include_usage).boxed())
            .collect();
        let last = reply(0);
        let usage_chunk = move |usage: Value| {
            let mut v = last.chunk(json!({}), None, None);
            v["choices"] = json!([]);
            v["usage"] = usage;
            v
        };
        Ok(sse_response(merge_choices(streams, include_usage, usage_chunk)).into_response())
    } else {
        let results = futures_util::future::join_all(
            runs.into_iter()
                .enumerate()
                .map(|(i, run)| collect_chat(run, reply(i))),
        )
        .await;
        let (choices, usages): (Vec<Value>, Vec<Usage>) = results
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": st.model_id(),
            "system_fingerprint": fingerprint(),
            "choices": choices,
            "usage": total_usage(&usages),
        });
        Ok(with_timing(Json(body).into_response(), &usages[0]))
    }
}

/// What a chat choice's chunks and body share.
struct ChatReply {
    /// The choice's index.
    index: usize,
    id: String,
    created: u64,
    model: String,
    /// Set when the request offered tools: the text is parsed for calls.
    parser: Option<ToolCallParser>,
    logprobs: bool,
}

impl ChatReply {
    /// Pieces of `text` (all content when no tools were offered).
    fn pieces(&mut self, text: &str) -> Vec<Piece> {
        match &mut self.parser {
            Some(p) => p.push(text),
            None if text.is_empty() => Vec::new(),
            None => vec![Piece::Content(text.to_owned())],
        }
    }

    fn flush(&mut self) -> Vec<Piece> {
        self.parser
            .as_mut()
            .map_or_else(Vec::new, ToolCallParser::finish)
    }

    fn called(&self) -> bool {
        self.parser.as_ref().is_some_and(|p| !p.calls().is_empty())
    }

    fn chunk(&self, delta: Value, logprobs: Option<Vec<Value>>, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": fingerprint(),
            "choices": [{
                "index": self.index,
                "delta": delta,
                "logprobs": logprobs.map(|c| json!({"content": c})),
                "finish_reason": finish,
            }],
        })
    }
}

fn fingerprint() -> String {
    format!("agentd-{}", env!("CARGO_PKG_VERSION"))
}

/// A piece as a chunk's `delta`.
fn delta(p: &Piece) -> Value {
    match p {
        Piece::Content(t) => json!({"content": t}),
        Piece::CallStart { index, id, name } => json!({"tool_calls": [{
            "index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": ""},
        }]}),
        Piece::CallArgs { index, text } => json!({"tool_calls": [{
            "index": index, "function": {"arguments": text},
        }]}),
    }
}

async fn collect_chat(mut run: Running, mut reply: ChatReply) -> Result<(Value, Usage), ApiError> {
    let mut content = String::new();
    let mut logprobs = Vec::new();
    let usage = loop {
        match run.next().await {
            Some(Event::Token { id, text, logprob }) => {
                if let (true, Some(lp)) = (!run.is_stop(id), &logprob) {
                    logprobs.push(chat_logprob(&run.st, id, lp));
                }
                for p in reply.pieces(&text) {
                    if let Piece::Content(t) = p {
                        content.push_str(&t);
                    }
                }
            }
            Some(Event::Done(u)) => break u,
            Some(Event::Error(e)) => return Err(to_status(e).into()),
            None => return Err(ended_without_result()),
        }
    };
    for p in reply.flush() {
        if let Piece::Content(t) = p {
            content.push_str(&t);
        }
    }
    let called = reply.called();
    let calls: Vec<Value> = reply
        .parser
        .as_ref()
        .map(|p| p.calls())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({"id": c.id, "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect();
    let mut message = json!({"role": "assistant", "refusal": null});
    if called {
        let text = content.trim();
        message["content"] = if text.is_empty() {
            Value::Null
        } else {
            json!(text)
        };
        message["tool_calls"] = Value::Array(calls);
    } else {
        message["content"] = json!(content);
    }
    let choice = json!({
        "index": reply.index,
        "message": message,
        "logprobs": reply.logprobs.then(|| json!({"content": logprobs})),
        "finish_reason": finish_reason(&usage.finish, called),
    });
    Ok((choice, usage))
}

/// A `Server-Timing` header (W3C) on a whole reply: `queue` (arrival to admission, request
/// preparation included), `ttft`, `engine` (admission to end) and `total`, in milliseconds.
fn with_timing(mut r: Response, u: &Usage) -> Response {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let value = format!(
        "queue;dur={:.3}, ttft;dur={:.3}, engine;dur={:.3}, total;dur={:.3}",
        ms(u.queue),
        ms(u.ttft),
        ms(u.total.saturating_sub(u.queue)),
        ms(u.total)
    );
    if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
        r.headers_mut().insert("server-timing", v);
    }
    r
}

/// Server-sent events, ending with `data: [DONE]`.
fn sse_response(events: impl futures_util::Stream<Item = Value> + Send + 'static) -> Response {
    let events = events
        .map(|v| sse::Event::default().data(v.to_string()))
        .chain(stream::once(async { sse::Event::default().data("[DONE]") }))
        .map(Ok::<_, std::convert::Infallible>);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// An error inside a stream that already started: OpenAI's error object as one event.
fn stream_error(e: ApiError) -> Value {
    e.body()
}

/// What one choice's stream yields before the choices are merged.
enum Out {
    /// A chunk to send.
    Chunk(Value),
    /// The choice ended with this usage (its last chunks were sent before).
    Done(Usage),
    /// The choice failed: the error event, after which the whole stream ends.
    Error(Value),
}

/// The choices' streams interleaved as their chunks come; when every choice is done, a usage
/// chunk (`usage_chunk` of the summed usage) if asked for; an error ends the stream.
fn merge_choices(
    streams: Vec<futures_util::stream::BoxStream<'static, Out>>,
    include_usage: bool,
    usage_chunk: impl Fn(Value) -> Value + Send + 'static,
) -> impl futures_util::Stream<Item = Value> + Send + 'static {
    let n = streams.len();
    stream::select_all(streams)
        .scan(
            (Vec::<Usage>::new(), false),
            move |(usages, failed), out| {
                if *failed {
                    return std::future::ready(None);
                }
                let items = match out {
                    Out::Chunk(v) => vec![v],
                    Out::Done(u) => {
                        usages.push(u);
                        if usages.len() == n && include_usage {
                            vec![usage_chunk(total_usage(usages))]
                        } else {
                            Vec::new()
                        }
                    }
                    Out::Error(v) => {
                        *failed = true;
                        vec![v]
                    }
                };
                std::future::ready(Some(items))
            },
        )
        .flat_map(stream::iter)
}

/// One chat choice as chunks: the role first, then the pieces as tokens come, the finish.
fn chat_choice_stream(
    run: Running,
    reply: ChatReply,
    include_usage: bool,
) -> impl futures_util::Stream<Item = Out> + Send + 'static {
    struct S {
        run: Running,
        reply: ChatReply,
        started: bool,
        done: bool,
    }
    let with_usage = move |mut v: Value| {
        if include_usage {
            v["usage"] = Value::Null;
        }
        Out::Chunk(v)
    };
    let state = S {
        run,
        reply,
        started: false,
        done: false,
    };
    stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        let mut out = Vec::new();
        if !s.started {
            s.started = true;
            out.push(with_usage(s.reply.chunk(
                json!({"role": "assistant", "content": ""}),
                None,
                None,
            )));
            return Some((out, s));
        }
        match s.run.next().await {
            Some(Event::Token { id, text, logprob }) => {
                let lp = match (&logprob, s.run.is_stop(id)) {
                    (Some(lp), false) => Some(vec![chat_logprob(&s.run.st, id, lp)]),
                    _ => None,
                };
                let pieces = s.reply.pieces(&text);
                if pieces.is_empty() && lp.is_some() {
                    out.push(with_usage(s.reply.chunk(json!({}), lp, None)));
                } else {
                    let mut lp = lp;
                    for p in &pieces {
                        out.push(with_usage(s.reply.chunk(delta(p), lp.take(), None)));
                    }
                }
            }
            Some(Event::Done(u)) => {
                for p in s.reply.flush() {
                    out.push(with_usage(s.reply.chunk(delta(&p), None, None)));
                }
                let reason = finish_reason(&u.finish, s.reply.called());
                out.push(with_usage(s.reply.chunk(json!({}), None, Some(reason))));
                out.push(Out::Done(u));
                s.done = true;
            }
            Some(Event::Error(e)) => {
                out.push(Out::Error(stream_error(to_status(e).into())));
                s.done = true;
            }
            None => {
                out.push(Out::Error(stream_error(ended_without_result())));
                s.done = true;
            }
        }
        Some((out, s))
    })
    .flat_map(stream::iter)
}

/// `POST /v1/completions`.
pub async fn completions(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let arrived = Instant::now();
    match completions_inner(st, headers, body, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    st: Arc<HttpState>,
    headers: HeaderMap,
    body: Body,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let (tenant, body) = prepare(&st, &headers, body).await?;
    let req = params::completion_request(&body)?;
    drop(body);
    st.check_model(req.gen.model.as_deref())?;
    note_user(&req.gen);
    let echo = if req.echo {
        Some(match &req.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Tokens(ids) => st
                .svc
                .model
                .tokenizer
                .decode(ids, false)
                .map_err(|e| ApiError::param("prompt", e.to_string()))?,
        })
    } else {
        None
    };
    let tokens = match req.prompt {
        Prompt::Tokens(t) => t,
        Prompt::Text(text) => {
            let model = st.svc.model.clone();
            st.svc
                .heavy(move || {
                    model
                        .tokenizer
                        .encode_with(
                            &text,
                            agentd_engine::tokenizer::EncodeOptions {
                                parse_special: true,
                                add_bos: true,
                            },
                        )
                        .map_err(crate::status::invalid)
                })
                .await?
        }
    };
    let runs = start(&st, tenant, tokens, &req.gen, None, arrived).await?;
    let (id, created) = (fresh_id("cmpl"), super::unix_now());
    let reply = |index| TextReply {
        index,
        id: id.clone(),
        created,
        model: st.model_id().to_owned(),
        logprobs: req.gen.logprobs.is_some(),
    };
    if req.gen.stream {
        let include_usage = req.gen.include_usage;
        let streams = runs
            .into_iter()
            .enumerate()
            .map(|(i, run)| text_choice_stream(run, reply(i), echo.clone(), include_usage).boxed())
            .collect();
        let last = reply(0);
        let usage_chunk = move |usage: Value| {
            let mut v = last.body("", None, None);
            v["choices"] = json!([]);
            v["usage"] = usage;
            v
        };
        Ok(sse_response(merge_choices(streams, include_usage, usage_chunk)).into_response())
    } else {
        let results = futures_util::future::join_all(
            runs.into_iter()
                .enumerate()
                .map(|(i, run)| collect_text(run, reply(i), echo.clone())),
        )
        .await;
        let (choices, usages): (Vec<Value>, Vec<Usage>) = results
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .unzip();
        let mut body = reply(0).body("", None, None);
        body["choices"] = Value::Array(choices);
        body["usage"] = total_usage(&usages);
        Ok(with_timing(Json(body).into_response(), &usages[0]))
    }
}

/// What a text choice's chunks and body share.
struct TextReply {
    /// The choice's index.
    index: usize,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
}

/// The legacy completions `logprobs` object for tokens (id, logprob) whose texts start at
/// `offset` characters.
#[derive(Default)]
struct TextLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f64>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl TextLogprobs {
    fn push(&mut self, st: &HttpState, id: u32, lp: &TokenLogprob, offset: usize) {
        self.tokens.push(token_text(st, id).0);
        self.token_logprobs.push(finite(lp.logprob));
        let mut top = serde_json::Map::new();
        for &(t, l) in &lp.top {
            top.insert(token_text(st, t).0, json!(finite(l)));
        }
        self.top_logprobs.push(Value::Object(top));
        self.text_offset.push(offset);
    }

    fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

impl TextReply {
    fn body(&self, text: &str, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": fingerprint(),
            "choices": [{
                "index": self.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }],
        })
    }
}

async fn collect_text(
    mut run: Running,
    reply: TextReply,
    echo: Option<String>,
) -> Result<(Value, Usage), ApiError> {
    let mut text = echo.unwrap_or_default();
    let mut lps = TextLogprobs::default();
    let usage = loop {
        match run.next().await {
            Some(Event::Token {
                id,
                text: t,
                logprob,
            }) => {
                if let (false, Some(lp)) = (run.is_stop(id), &logprob) {
                    lps.push(&run.st, id, lp, text.chars().count());
                }
                text.push_str(&t);
            }
            Some(Event::Done(u)) => break u,
            Some(Event::Error(e)) => return Err(to_status(e).into()),
            None => return Err(ended_without_result()),
        }
    };
    let choice = json!({
        "index": reply.index,
        "text": text,
        "logprobs": reply.logprobs.then(|| lps.json()),
        "finish_reason": finish_reason(&usage.finish, false),
    });
    Ok((choice, usage))
}

/// One text choice as chunks: the echoed prompt first if asked, the text as tokens come, the
/// finish.
fn text_choice_stream(
    run: Running,
    reply: TextReply,
    echo: Option<String>,
    include_usage: bool,
) -> impl futures_util::Stream<Item = Out> + Send + 'static {
    struct S {
        run: Running,
        reply: TextReply,
        echo: Option<String>,
        offset: usize,
        done: bool,
    }
    let with_usage = move |mut v: Value| {
        if include_usage {
            v["usage"] = Value::Null;
        }
        Out::Chunk(v)
    };
    let state = S {
        run,
        reply,
        echo,
        offset: 0,
        done: false,
    };
    stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        let mut out = Vec::new();
        if let Some(echo) = s.echo.take() {
            s.offset = echo.chars().count();
            out.push(with_usage(s.reply.body(&echo, None, None)));
            return Some((out, s));
        }
        match s.run.next().await {
            Some(Event::Token { id, text, logprob }) => {
                let lp = match (&logprob, s.run.is_stop(id)) {
                    (Some(lp), false) => {
                        let mut l = TextLogprobs::default();
                        l.push(&s.run.st, id, lp, s.offset);
                        Some(l.json())
                    }
                    _ => None,
                };
                s.offset += text.chars().count();
                if !text.is_empty() || lp.is_some() {
                    out.push(with_usage(s.reply.body(&text, lp, None)));
                }
            }
            Some(Event::Done(u)) => {
                out.push(with_usage(s.reply.body(
                    "",
                    None,
                    Some(finish_reason(&u.finish, false)),
                )));
                out.push(Out::Done(u));
                s.done = true;
            }
            Some(Event::Error(e)) => {
                out.push(Out::Error(stream_error(to_status(e).into())));
                s.done = true;
            }
            None => {
                out.push(Out::Error(stream_error(ended_without_result())));
                s.done = true;
            }
        }
        Some((out, s))
    })
    .flat_map(stream::iter)
}
