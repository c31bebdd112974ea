//! OpenAI request bodies → the engine's types, each refusal a 400 that names the parameter.
//!
//! Bodies are read as JSON objects and taken apart field by field (unknown fields are
//! ignored, as vLLM does), so every error can say which parameter, and which message or tool,
//! was wrong. Sampling parameters a request leaves out take agentd's defaults
//! ([`agentd_wire::sampling_defaults`]); `temperature: 0` is greedy with no repetition penalty
//! unless one is given. vLLM's extra parameters `top_k`, `min_p`, `repetition_penalty` and
//! `ignore_eos` are accepted too.

use super::error::ApiError;
use agentd_engine::constraint::{ConstraintSpec, ToolSpec};
use agentd_engine::sampling::SamplingParams;
use agentd_wire::hermes::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};
use agentd_wire::{Message, Role};
use serde_json::{Map, Value};

/// The most stop strings a request may give.
pub const MAX_STOP: usize = 16;
/// The longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// The most tools a request may declare.
pub const MAX_TOOLS: usize = 128;
/// The most choices (`n`) one request may ask for.
pub const MAX_CHOICES: usize = 16;

/// A JSON object being read, with the path that names its fields in errors.
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    /// The request body (`value` must be an object).
    pub fn root(value: &'a Value) -> Result<Self, ApiError> {
        match value {
            Value::Object(map) => Ok(Self {
                map,
                path: String::new(),
            }),
            _ => Err(ApiError::bad_request(
                "the request body must be a JSON object",
            )),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The field, `None` when absent or `null`.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A nested object.
    pub fn obj(&self, key: &str) -> Result<Option<Obj<'a>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj {
                map,
                path: self.name(key),
            })),
            Some(_) => Err(ApiError::param(self.name(key), "must be an object")),
        }
    }

    /// The object at `value`, named `path`.
    pub fn of(value: &'a Value, path: String) -> Result<Obj<'a>, ApiError> {
        match value {
            Value::Object(map) => Ok(Obj { map, path }),
            _ => Err(ApiError::param(path, "must be an object")),
        }
    }

    /// A string field.
    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::param(self.name(key), "must be a string")),
        }
    }

    /// A required string field.
    pub fn req_str(&self, key: &str) -> Result<&'a str, ApiError> {
        self.str(key)?
            .ok_or_else(|| ApiError::param(self.name(key), "is required"))
    }

    /// A boolean field.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::param(self.name(key), "must be true or false")),
        }
    }

    /// A number in `lo..=hi`.
    pub fn num(&self, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x)),
                Some(_) => Err(ApiError::param(
                    self.name(key),
                    format!("must be between {lo} and {hi}"),
                )),
                None => Err(ApiError::param(self.name(key), "must be a number")),
            },
        }
    }

    /// An integer in `lo..=hi`.
    pub fn int(&self, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
                Some(_) => Err(ApiError::param(
                    self.name(key),
                    format!("must be an integer between {lo} and {hi}"),
                )),
                None => Err(ApiError::param(self.name(key), "must be an integer")),
            },
        }
    }

    /// An array field.
    pub fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(ApiError::param(self.name(key), "must be an array")),
        }
    }
}

/// What both endpoints take besides the prompt.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// `max_tokens` / `max_completion_tokens`; `None`: up to the context.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// vLLM's `ignore_eos`.
    pub ignore_eos: bool,
    /// Log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Server-sent events.
    pub stream: bool,
    /// A last chunk with the usage (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The caller's end-user id, for the log.
    pub user: Option<String>,
    /// The model named, if any.
    pub model: Option<String>,
    /// Choices (`n`): the prompt's session forked for each further one.
    pub n: usize,
}

/// The parameters common to chat and completions; `logprobs` is read by the caller (its
/// shape differs between the two).
pub fn gen_params(o: &Obj<'_>, chat: bool) -> Result<GenParams, ApiError> {
    let max = if chat {
        match o.int("max_completion_tokens", 1, u32::MAX as i64)? {
            Some(n) => Some(n),
            None => o.int("max_tokens", 1, u32::MAX as i64)?,
        }
    } else {
        o.int("max_tokens", 1, u32::MAX as i64)?
    };
    let n = o.int("n", 1, MAX_CHOICES as i64)?.unwrap_or(1) as usize;
    if o.int("best_of", 1, 128)?.is_some_and(|b| b != 1) {
        return Err(ApiError::param("best_of", "only best_of = 1 is supported"));
    }
    let defaults = SamplingParams::default();
    let temperature = o.num("temperature", 0.0, 2.0)?.map(|t| t as f32);
    let greedy = temperature == Some(0.0);
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(defaults.temperature),
        top_p: o
            .num("top_p", 0.0, 1.0)?
            .map_or(defaults.top_p, |p| p as f32),
        top_k: o
            .int("top_k", -1, 1 << 20)?
            .map_or(defaults.top_k, |k| k.max(0) as usize),
        min_p: o
            .num("min_p", 0.0, 1.0)?
            .map_or(defaults.min_p, |p| p as f32),
        repetition_penalty: match o.num("repetition_penalty", 0.01, 10.0)? {
            Some(r) => r as f32,
            None if greedy => 1.0,
            None => defaults.repetition_penalty,
        },
        presence_penalty: o
            .num("presence_penalty", -2.0, 2.0)?
            .map_or(defaults.presence_penalty, |p| p as f32),
        frequency_penalty: o
            .num("frequency_penalty", -2.0, 2.0)?
            .map_or(defaults.frequency_penalty, |p| p as f32),
        seed: match o.get("seed") {
            None => None,
            Some(v) => Some(
                v.as_i64()
                    .map(|s| s as u64)
                    .or_else(|| v.as_u64())
                    .ok_or_else(|| ApiError::param("seed", "must be an integer"))?,
            ),
        },
        ..defaults
    };
    if sampling.top_p <= 0.0 {
        return Err(ApiError::param("top_p", "must be greater than 0"));
    }
    let stop = match o.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str().map(str::to_owned).ok_or_else(|| {
                    ApiError::param("stop", "must be a string or an array of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::param(
                "stop",
                "must be a string or an array of strings",
            ))
        }
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::param(
            "stop",
            format!(
                "{} stop strings are more than the limit of {MAX_STOP}",
                stop.len()
            ),
        ));
    }
    if stop
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::param(
            "stop",
            format!("each stop string must be 1 to {MAX_STOP_BYTES} bytes"),
        ));
    }
    let stream = o.bool("stream")?.unwrap_or(false);
    let include_usage = match o.obj("stream_options")? {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::param(
                "stream_options",
                "is only allowed when stream is true",
            ))
        }
        Some(so) => so.bool("include_usage")?.unwrap_or(false),
    };
    Ok(GenParams {
        max_tokens: max.map(|n| n as usize),
        sampling,
        stop,
        ignore_eos: o.bool("ignore_eos")?.unwrap_or(false),
        logprobs: None,
        stream,
        include_usage,
        user: o.str("user")?.map(crate::status::cap),
        model: o.str("model")?.map(str::to_owned),
        n,
    })
}

/// How the reply may call tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolMode {
    /// No tools offered (none given, or `tool_choice: "none"`).
    Off,
    /// Text or calls (`auto`).
    Auto,
    /// One or more calls and no text (`required`, or a named function with its tool alone).
    Required,
}

/// A parsed chat request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The conversation, tools folded into the system prompt and calls into Hermes blocks.
    pub messages: Vec<Message>,
    /// The output constraint (tool calls or `response_format`).
    pub constraint: Option<ConstraintSpec>,
    /// Whether the reply is parsed for tool calls.
    pub tools: ToolMode,
    /// Generation parameters.
    pub gen: GenParams,
}

/// A declared tool.
struct ToolDef {
    name: String,
    description: String,
    parameters: Value,
}

/// Reads a `/v1/chat/completions` body.
pub fn chat_request(body: &Value) -> Result<ChatRequest, ApiError> {
    let o = Obj::root(body)?;
    let mut gen = gen_params(&o, true)?;
    let logprobs = o.bool("logprobs")?.unwrap_or(false);
    let top = o.int(
        "top_logprobs",
        0,
        agentd_engine::decoding::MAX_TOP_LOGPROBS as i64,
    )?;
    if top.is_some() && !logprobs {
        return Err(ApiError::param("top_logprobs", "needs logprobs to be true"));
    }
    gen.logprobs = logprobs.then(|| top.unwrap_or(0) as usize);

    let tools = tool_defs(&o)?;
    let named = |name: &str| {
        tools.iter().position(|t| t.name == name).ok_or_else(|| {
            ApiError::param(
                "tool_choice",
                format!(
                    "names the function {:?}, which is not in tools",
                    crate::status::cap(name)
                ),
            )
        })
    };
    // (mode, the tools the constraint allows)
    let (mode, allowed): (ToolMode, Vec<usize>) = match o.get("tool_choice") {
        None if tools.is_empty() => (ToolMode::Off, vec![]),
        None => (ToolMode::Auto, (0..tools.len()).collect()),
        Some(Value::String(s)) => match s.as_str() {
            "none" => (ToolMode::Off, vec![]),
            "auto" if tools.is_empty() => (ToolMode::Off, vec![]),
            "auto" => (ToolMode::Auto, (0..tools.len()).collect()),
            "required" if tools.is_empty() => {
                return Err(ApiError::param("tool_choice", "is \"required\" but no tools are given"))
            }
            "required" => (ToolMode::Required, (0..tools.len()).collect()),
            other => {
                return Err(ApiError::param(
                    "tool_choice",
                    format!(
                        "must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, not {:?}",
                        crate::status::cap(other)
                    ),
                ))
            }
        },
        Some(v @ Value::Object(_)) => {
            let c = Obj::of(v, "tool_choice".into())?;
            let f = c
                .obj("function")?
                .ok_or_else(|| ApiError::param("tool_choice.function", "is required"))?;
            (ToolMode::Required, vec![named(f.req_str("name")?)?])
        }
        Some(_) => return Err(ApiError::param("tool_choice", "must be a string or an object")),
    };
    let parallel = o.bool("parallel_tool_calls")?.unwrap_or(true);

    let mut messages = chat_messages(&o)?;
    if mode != ToolMode::Off {
        let sigs: Vec<String> = tools
            .iter()
            .map(|t| agentd_wire::hermes::signature(&t.name, &t.description, &t.parameters))
            .collect();
        match messages.first_mut() {
            Some(m) if m.role == Role::System => {
                m.content = agentd_wire::hermes::system_prompt(&m.content, &sigs)
            }
            _ => messages.insert(
                0,
                Message::system(agentd_wire::hermes::system_prompt("", &sigs)),
            ),
        }
    }

    let format = response_format(&o)?;
    let constraint = match (&mode, format) {
        (ToolMode::Off, f) => f,
        (_, Some(_)) => {
            return Err(ApiError::param(
                "response_format",
                "cannot be combined with tool calls; set tool_choice to \"none\" or drop response_format",
            ))
        }
        (m, None) => Some(ConstraintSpec::ToolCalls {
            tools: allowed
                .iter()
                .map(|&i| ToolSpec {
                    name: tools[i].name.clone(),
                    parameters: tools[i].parameters.clone(),
                })
                .collect(),
            required: *m == ToolMode::Required,
            max_calls: usize::from(!parallel),
        }),
    };
    Ok(ChatRequest {
        messages,
        constraint,
        tools: mode,
        gen,
    })
}

/// `tools`: each `{"type": "function", "function": {"name", "description"?, "parameters"?}}`.
fn tool_defs(o: &Obj<'_>) -> Result<Vec<ToolDef>, ApiError> {
    let Some(list) = o.array("tools")? else {
        return Ok(Vec::new());
    };
    if list.len() > MAX_TOOLS {
        return Err(ApiError::param(
            "tools",
            format!(
                "{} tools are more than the limit of {MAX_TOOLS}",
                list.len()
            ),
        ));
    }
    let mut out: Vec<ToolDef> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let path = format!("tools[{i}]");
        let t = Obj::of(t, path.clone())?;
        match t.str("type")? {
            Some("function") | None => {}
            Some(other) => {
                return Err(ApiError::param(
                    format!("{path}.type"),
                    format!("must be \"function\", not {:?}", crate::status::cap(other)),
                ))
            }
        }
        let f = t
            .obj("function")?
            .ok_or_else(|| ApiError::param(format!("{path}.function"), "is required"))?;
        let name = f.req_str("name")?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(ApiError::param(
                format!("{path}.function.name"),
                "must be 1 to 64 characters of a-z, A-Z, 0-9, underscores, dots and dashes",
            ));
        }
        if out.iter().any(|d| d.name == name) {
            return Err(ApiError::param(
                format!("{path}.function.name"),
                format!("{name:?} is declared twice"),
            ));
        }
        let parameters = match f.get("parameters") {
            None => serde_json::json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(ApiError::param(
                    format!("{path}.function.parameters"),
                    "must be a JSON schema object",
                ))
            }
        };
        out.push(ToolDef {
            name: name.to_owned(),
            description: f.str("description")?.unwrap_or("").to_owned(),
            parameters,
        });
    }
    Ok(out)
}

/// `response_format`: `text`, `json_object` or `json_schema`.
fn response_format(o: &Obj<'_>) -> Result<Option<ConstraintSpec>, ApiError> {
    let Some(rf) = o.obj("response_format")? else {
        return Ok(None);
    };
    match rf.req_str("type")? {
        "text" => Ok(None),
        "json_object" => Ok(Some(ConstraintSpec::JsonSchema(
            serde_json::json!({"type": "object"}),
        ))),
        "json_schema" => {
            let js = rf
                .obj("json_schema")?
                .ok_or_else(|| ApiError::param("response_format.json_schema", "is required"))?;
            let schema = match js.get("schema") {
                // OpenAI allows a schema-less json_schema: any JSON object.
                None => serde_json::json!({"type": "object"}),
                Some(s @ Value::Object(_)) => s.clone(),
                Some(_) => {
                    return Err(ApiError::param(
                        "response_format.json_schema.schema",
                        "must be a JSON schema object",
                    ))
                }
            };
            Ok(Some(ConstraintSpec::JsonSchema(schema)))
        }
        other => Err(ApiError::param(
            "response_format.type",
            format!(
                "must be \"text\", \"json_object\" or \"json_schema\", not {:?}",
                crate::status::cap(other)
            ),
        )),
    }
}

/// A message's text: a string, or an array of `{"type": "text", "text"}` parts.
fn content_text(m: &Obj<'_>, path: &str) -> Result<String, ApiError> {
    match m.get("content") {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                let p = Obj::of(p, format!("{path}.content[{j}]"))?;
                match p.req_str("type")? {
                    "text" => text.push_str(p.req_str("text")?),
                    other => {
                        return Err(ApiError::param(
                            format!("{path}.content[{j}].type"),
                            format!(
                                "only text parts are supported, not {:?}",
                                crate::status::cap(other)
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err(ApiError::param(
            format!("{path}.content"),
            "must be a string or an array of content parts",
        )),
    }
}

/// `messages` → chat messages: `developer` is `system`; an assistant's `tool_calls` become
/// Hermes `<tool_call>` blocks after its text (the arguments text as sent, which is the text
/// the model wrote); a `tool` message becomes a `<tool_response>` block named after the call
/// its `tool_call_id` answers.
fn chat_messages(o: &Obj<'_>) -> Result<Vec<Message>, ApiError> {
    let list = o
        .array("messages")?
        .ok_or_else(|| ApiError::param("messages", "is required"))?;
    if list.is_empty() {
        return Err(ApiError::param("messages", "must not be empty"));
    }
    if list.len() > crate::request::MAX_MESSAGES {
        return Err(ApiError::param(
            "messages",
            format!(
                "{} messages are more than the limit of {}",
                list.len(),
                crate::request::MAX_MESSAGES
            ),
        ));
    }
    let mut calls: std::collections::HashMap<String, String> = Default::default();
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let path = format!("messages[{i}]");
        let m = Obj::of(m, path.clone())?;
        let role = m.req_str("role")?;
        let text = content_text(&m, &path)?;
        let msg = match role {
            "system" | "developer" => Message::new(Role::System, text),
            "user" => Message::new(Role::User, text),
            "assistant" => {
                let mut content = text;
                for (j, c) in m.array("tool_calls")?.into_iter().flatten().enumerate() {
                    let cpath = format!("{path}.tool_calls[{j}]");
                    let c = Obj::of(c, cpath.clone())?;
                    let f = c.obj("function")?.ok_or_else(|| {
                        ApiError::param(format!("{cpath}.function"), "is required")
                    })?;
                    let name = f.req_str("name")?;
                    let args = f.str("arguments")?.unwrap_or("{}");
                    if serde_json::from_str::<Value>(args).is_err() {
                        return Err(ApiError::param(
                            format!("{cpath}.function.arguments"),
                            "must be a JSON text",
                        ));
                    }
                    if let Some(id) = c.str("id")? {
                        calls.insert(id.to_owned(), name.to_owned());
                    }
                    let name_json = Value::String(name.to_owned()).to_string();
                    content.push_str(&format!(
                        "{TOOL_CALL_OPEN}\n{{\"name\": {name_json}, \"arguments\": {}}}\n{TOOL_CALL_CLOSE}\n",
                        args.trim()
                    ));
                }
                Message::new(Role::Assistant, content)
            }
            "tool" => {
                let name = match m.str("tool_call_id")? {
                    Some(id) => calls.get(id).cloned().ok_or_else(|| {
                        ApiError::param(
                            format!("{path}.tool_call_id"),
                            format!(
                                "{:?} answers no tool call of an earlier assistant message",
                                crate::status::cap(id)
                            ),
                        )
                    })?,
                    None => m
                        .str("name")?
                        .ok_or_else(|| {
                            ApiError::param(format!("{path}.tool_call_id"), "is required")
                        })?
                        .to_owned(),
                };
                Message::new(Role::Tool, agentd_wire::hermes::tool_response(&name, &text))
            }
            other => {
                return Err(ApiError::param(
                    format!("{path}.role"),
                    format!(
                        "must be system, developer, user, assistant or tool, not {:?}",
                        crate::status::cap(other)
                    ),
                ))
            }
        };
        out.push(msg);
    }
    Ok(out)
}

/// A `/v1/completions` prompt: text, or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Text, tokenized with control tokens recognised (and BOS where the model wants one).
    Text(String),
    /// Token ids as given.
    Tokens(Vec<u32>),
}

/// A parsed completions request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Put the prompt in front of the text.
    pub echo: bool,
    /// Generation parameters.
    pub gen: GenParams,
}

/// Reads a `/v1/completions` body.
pub fn completion_request(body: &Value) -> Result<CompletionRequest, ApiError> {
    let o = Obj::root(body)?;
    let mut gen = gen_params(&o, false)?;
    gen.logprobs = o
        .int(
            "logprobs",
            0,
            agentd_engine::decoding::MAX_TOP_LOGPROBS as i64,
        )?
        .map(|n| n as usize);
    if o.str("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::param("suffix", "is not supported"));
    }
    let echo = o.bool("echo")?.unwrap_or(false);
    if echo && gen.logprobs.is_some() {
        return Err(ApiError::param(
            "echo",
            "cannot be combined with logprobs (prompt log-probabilities are not computed)",
        ));
    }
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(|| {
                        ApiError::param("prompt", "token ids must be non-negative integers")
                    })
            })
            .collect()
    };
    let prompt = match o.get("prompt") {
        None => return Err(ApiError::param("prompt", "is required")),
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) && !a.is_empty() => {
            Prompt::Tokens(ids(a)?)
        }
        Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
            Value::String(s) => Prompt::Text(s.clone()),
            Value::Array(t) if !t.is_empty() => Prompt::Tokens(ids(t)?),
            _ => {
                return Err(ApiError::param(
                    "prompt",
                    "must be a string, an array of token ids, or one of either in an array",
                ))
            }
        },
        Some(Value::Array(a)) if a.len() > 1 => {
            return Err(ApiError::param(
                "prompt",
                "batches of prompts are not supported: send one request per prompt (they run in one batch on the daemon)",
            ))
        }
        Some(_) => {
            return Err(ApiError::param(
                "prompt",
                "must be a non-empty string or array of token ids",
            ))
        }
    };
    if matches!(&prompt, Prompt::Text(s) if s.is_empty()) {
        return Err(ApiError::param("prompt", "must not be empty"));
    }
    Ok(CompletionRequest { prompt, echo, gen })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(body: Value) -> (u16, Option<String>, String) {
        let e = chat_request(&body).unwrap_err();
        (e.status.as_u16(), e.param, e.message)
    }

    #[test]
    fn bad_parameters_are_400s_that_name_the_parameter() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        for (body, param) in [
            (json!({}), "messages"),
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0].type",
            ),
            (json!({"messages": msgs, "temperature": 3}), "temperature"),
            (
                json!({"messages": msgs, "temperature": "hot"}),
                "temperature",
            ),
            (json!({"messages": msgs, "max_tokens": 0}), "max_tokens"),
            (json!({"messages": msgs, "n": 17}), "n"),
            (json!({"messages": msgs, "n": 0}), "n"),
            (json!({"messages": msgs, "stop": [1]}), "stop"),
            (json!({"messages": msgs, "top_logprobs": 3}), "top_logprobs"),
            (
                json!({"messages": msgs, "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                json!({"messages": msgs, "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                json!({"messages": msgs, "tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice",
            ),
            (
                json!({"messages": msgs, "response_format": {"type": "xml"}}),
                "response_format.type",
            ),
            (
                json!({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "1"}]}),
                "messages[0].tool_call_id",
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
        ] {
            let (status, p, msg) = err(body.clone());
            assert_eq!((status, p.as_deref()), (400, Some(param)), "{body} → {msg}");
            assert!(msg.starts_with(param), "{msg}");
        }
    }

    #[test]
    fn tools_calls_and_results_become_hermes_text_and_a_constraint() {
        let body = json!({
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "parallel_tool_calls": false,
            "temperature": 0
        });
        let r = chat_request(&body).unwrap();
        assert_eq!(r.tools, ToolMode::Auto);
        assert!(r.messages[0]
            .content
            .starts_with("Be brief.\n\nYou may call functions."));
        assert!(r.messages[0].content.contains("\"name\":\"get_weather\""));
        assert_eq!(r.messages[1].content, "Weather?");
        assert_eq!(
            r.messages[2].content,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
        );
        assert_eq!(
            r.messages[3].content,
            "<tool_response>\n{\"name\":\"get_weather\",\"content\":\"sunny\"}\n</tool_response>"
        );
        match r.constraint {
            Some(ConstraintSpec::ToolCalls {
                tools,
                required,
                max_calls,
            }) => {
                assert_eq!((tools.len(), required, max_calls), (1, false, 1))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.gen.sampling.temperature, 0.0);
        assert_eq!(r.gen.sampling.repetition_penalty, 1.0);
        // `none` leaves the tools out entirely.
        let mut none = body.clone();
        none["tool_choice"] = json!("none");
        let r = chat_request(&none).unwrap();
        assert_eq!((r.tools, r.constraint), (ToolMode::Off, None));
        assert_eq!(r.messages[0].content, "Be brief.");
    }

    #[test]
    fn completion_prompts_are_text_or_token_ids() {
        let r = completion_request(&json!({"prompt": "Once", "max_tokens": 3})).unwrap();
        assert!(matches!(r.prompt, Prompt::Text(ref s) if s == "Once"));
        let r = completion_request(&json!({"prompt": [[1, 2, 3]]})).unwrap();
        assert!(matches!(r.prompt, Prompt::Tokens(ref t) if t == &[1, 2, 3]));
        for body in [
            json!({}),
            json!({"prompt": ""}),
            json!({"prompt": ["a", "b"]}),
            json!({"prompt": [-1]}),
        ] {
            let e = completion_request(&body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"), "{body}");
        }
    }
}

#[cfg(test)]
mod fuzz_tests {
    use super::*;
    use proptest::prelude::*;

    /// Random JSON values, biased towards the fields the parsers read.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::String),
            prop_oneof![
                Just("user"),
                Just("assistant"),
                Just("tool"),
                Just("system"),
                Just("function"),
                Just("none"),
                Just("auto"),
                Just("required"),
                Just("json_object"),
                Just("json_schema"),
                Just("text"),
                Just("object"),
            ]
            .prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            let key = prop_oneof![
                Just("messages"),
                Just("role"),
                Just("content"),
                Just("tools"),
                Just("function"),
                Just("name"),
                Just("parameters"),
                Just("tool_choice"),
                Just("tool_calls"),
                Just("arguments"),
                Just("tool_call_id"),
                Just("response_format"),
                Just("type"),
                Just("json_schema"),
                Just("schema"),
                Just("max_tokens"),
                Just("temperature"),
                Just("stop"),
                Just("stream"),
                Just("stream_options"),
                Just("include_usage"),
                Just("logprobs"),
                Just("top_logprobs"),
                Just("n"),
                Just("prompt"),
                Just("echo"),
                Just("seed"),
                Just("text"),
                Just("id"),
                Just("top_p"),
                Just("top_k"),
            ]
            .prop_map(str::to_owned);
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(key, inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        /// No body makes either parser panic; every refusal is a 400 with a short message.
        #[test]
        fn hostile_bodies_are_refused_cleanly(body in value()) {
            for result in [chat_request(&body).map(|_| ()), completion_request(&body).map(|_| ())] {
                if let Err(e) = result {
                    prop_assert_eq!(e.status.as_u16(), 400, "{}", e.message);
                    prop_assert!(!e.message.is_empty() && e.message.len() <= 4096);
                }
            }
        }
    }
}
