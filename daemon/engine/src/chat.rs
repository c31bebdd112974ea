//! Rendering chat messages through the model's own chat template.
//!
//! GGUF files carry the Hugging Face Jinja chat template under `tokenizer.chat_template`.
//! [`ChatTemplate`] compiles it once with minijinja, set up to behave like `transformers`'
//! `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on, Python string methods
//! (`.strip()`, `.startswith()`...) through minijinja-contrib's pycompat layer, a
//! `raise_exception(msg)` function, and a `tojson` filter that prints JSON the way Python's
//! `json.dumps` does (`{"a": 1, "b": [1, 2]}`), since that is the text models were trained on.
//!
//! The context a template sees: `messages` (a list of `{role, content}`), `add_generation_prompt`,
//! `bos_token`, `eos_token` and `tools` (`none` when not given, as in `transformers`).
//!
//! A file without a template falls back to a built-in one for its architecture where agentd
//! knows the format the model was trained on ([`builtin_template`]: Gemma's turns, for base
//! Gemma 3 files that ship none); any other file without one is an error that names the key.
//!
//! Tool results: the SDK sends each as a `tool` message whose content is a Hermes
//! `<tool_response>` block. Templates that speak Hermes natively (Qwen2.5's) wrap a tool
//! message in those tags themselves, so for them the outer tags of a single block are taken
//! off before rendering, and the model sees exactly the text it was trained on.

use std::collections::HashMap;
use std::io;

use agentd_wire::Message;
use candle_core::quantized::gguf_file::Value as GgufValue;
use minijinja::value::{Kwargs, Value};
use minijinja::{context, Environment, ErrorKind};
use sha2::{Digest, Sha256};

use crate::tokenizer::GgufTokenizer;

/// The GGUF metadata key that holds the chat template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// The name the template is compiled under; it shows in minijinja's error locations.
const TEMPLATE_NAME: &str = "chat_template";

/// Gemma's turn format (the Gemma 3 instruction models' template): a system message is put in
/// front of the first user turn, the assistant's role is `model`, and a `tool` message (which
/// Gemma has no role for) is a user turn carrying the `<tool_response>` block. Unlike Google's
/// template it does not insist that roles alternate, since tool results follow model turns.
pub const GEMMA_TEMPLATE: &str = "{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set role = 'model' -%}
    {%- else -%}
        {%- set role = 'user' -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first and role == 'user' else '') }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
";

/// The template to use for a file of architecture `arch` that carries none, if agentd knows
/// the format that architecture's models were trained on.
pub fn builtin_template(arch: &str) -> Option<&'static str> {
    match arch {
        "gemma" | "gemma2" | "gemma3" => Some(GEMMA_TEMPLATE),
        _ => None,
    }
}

/// The opening and closing tags of a Hermes tool result.
const TOOL_RESPONSE_TAGS: (&str, &str) = ("<tool_response>", "</tool_response>");

/// Everything that can go wrong while loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The GGUF has no chat template.
    #[error("GGUF metadata has no `{CHAT_TEMPLATE_KEY}`; this model has no chat template")]
    MissingTemplate,
    /// The chat template key holds something other than a string.
    #[error("GGUF metadata `{CHAT_TEMPLATE_KEY}` should be a string, found {found}")]
    WrongType {
        /// What it holds.
        found: String,
    },
    /// The template does not compile.
    #[error("chat template does not compile: {0:#}")]
    Syntax(#[source] minijinja::Error),
    /// The template called `raise_exception(message)`.
    #[error("chat template raised an exception: {message}")]
    Raised {
        /// The message it passed.
        message: String,
    },
    /// Rendering failed for another reason (an undefined filter, a type error...).
    #[error("rendering the chat template: {0:#}")]
    Render(#[source] minijinja::Error),
}

/// Shorthand for results in this module.
pub type Result<T, E = ChatError> = std::result::Result<T, E>;

/// The error `raise_exception` attaches to its minijinja error, so [`ChatTemplate::render`] can
/// tell a deliberate exception from a broken template.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TemplateException(String);

/// A compiled chat template plus the special token texts it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    digest: String,
    /// Whether the template wraps `tool` messages in `<tool_response>` tags itself.
    wraps_tool_responses: bool,
}

impl ChatTemplate {
    /// Loads `tokenizer.chat_template` from GGUF metadata (an error naming the key if absent),
    /// with `bos_token`/`eos_token` taken from the tokenizer's vocabulary (`""` when the model
    /// has no BOS).
    pub fn from_metadata(
        md: &HashMap<String, GgufValue>,
        tokenizer: &GgufTokenizer,
    ) -> Result<Self> {
        let arch = match md.get("general.architecture") {
            Some(GgufValue::String(s)) => s.as_str(),
            _ => "",
        };
        let source = match md.get(CHAT_TEMPLATE_KEY) {
            None => match builtin_template(arch) {
                Some(source) => {
                    tracing::info!(
                        arch,
                        "the file has no chat template: using the built-in one"
                    );
                    source.to_owned()
                }
                None => return Err(ChatError::MissingTemplate),
            },
            Some(GgufValue::String(s)) => s.clone(),
            Some(other) => {
                return Err(ChatError::WrongType {
                    found: format!("{:?}", other.value_type()),
                })
            }
        };
        let text = |id: Option<u32>| {
            id.and_then(|id| tokenizer.token_text(id))
                .unwrap_or_default()
                .to_string()
        };
        Self::new(
            source,
            text(tokenizer.bos_token_id()),
            text(Some(tokenizer.eos_token_id())),
        )
    }

    /// Compiles `source` once; a syntax error is reported with minijinja's message.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let digest = format!("{:x}", Sha256::digest(source.as_bytes()));
        let wraps_tool_responses = source.contains(TOOL_RESPONSE_TAGS.0);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(ChatError::Syntax)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            digest,
            wraps_tool_responses,
        })
    }

    /// Renders `messages` (and `tools`, if given) into the prompt text; with
    /// `add_generation_prompt`, the text ends where the assistant's reply should begin.
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatError::Render)?;
        let unwrapped: Vec<Message>;
        let messages = if self.wraps_tool_responses {
            unwrapped = messages.iter().map(unwrap_tool_response).collect();
            &unwrapped[..]
        } else {
            messages
        };
        // Neither a `Message` nor a JSON value can fail to serialise.
        let messages = Value::from_serialize(messages);
        let tools = tools.map_or_else(|| Value::from(()), Value::from_serialize);
        let ctx = context! {
            messages,
            tools,
            add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template
            .render(ctx)
            .map_err(|err| match raised_message(&err) {
                Some(message) => ChatError::Raised { message },
                None => ChatError::Render(err),
            })
    }

    /// SHA-256 (lowercase hex) of the template source, to tell templates apart in caches.
    pub fn source_digest(&self) -> String {
        self.digest.clone()
    }
}

/// `message` with the outer `<tool_response>` tags taken off when it is a `tool` message made of
/// exactly one such block (a template that wraps tool messages itself adds them back).
fn unwrap_tool_response(message: &Message) -> Message {
    let (open, close) = TOOL_RESPONSE_TAGS;
    let mut m = message.clone();
    if m.role != agentd_wire::Role::Tool {
        return m;
    }
    let body = m.content.trim();
    if let Some(inner) = body.strip_prefix(open).and_then(|b| b.strip_suffix(close)) {
        if !inner.contains(open) && !inner.contains(close) {
            m.content = inner.trim_matches('\n').to_owned();
        }
    }
    m
}

/// The message given to `raise_exception`, if that is what `err` (or an error it wraps) is.
fn raised_message(err: &minijinja::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(raised) = e.downcast_ref::<TemplateException>() {
            return Some(raised.0.clone());
        }
        cause = e.source();
    }
    None
}

/// `raise_exception(msg)`: templates call it to reject inputs (e.g. roles out of order).
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(TemplateException(message)),
    )
}

/// `tojson` as `transformers` defines it: Python's `json.dumps(value, ensure_ascii=False,
/// indent=indent)`, i.e. `", "`/`": "` separators, or newlines and `indent` spaces with `indent`.
fn tojson(value: &Value, indent: Option<usize>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = " ".repeat(n);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(spaces.as_bytes());
            serde::Serialize::serialize(
                value,
                &mut serde_json::Serializer::with_formatter(&mut out, formatter),
            )
        }
        None => serde::Serialize::serialize(
            value,
            &mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter),
        ),
    };
    written.map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "cannot serialise to JSON")
            .with_source(e)
    })?;
    let json = String::from_utf8(out).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "JSON output is not UTF-8")
            .with_source(e)
    })?;
    Ok(Value::from_safe_string(json))
}

/// A serde_json formatter with Python's default separators: `", "` and `": "`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template from SmolLM2-135M-Instruct.Q4_1.gguf, copied from its metadata.
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn template(source: &str) -> Result<ChatTemplate> {
        ChatTemplate::new(source.to_string(), "<s>".to_string(), "</s>".to_string())
    }

    /// Renders `messages` with `source` and compares with `expected`.
    fn check(source: &str, messages: &[Message], add_generation_prompt: bool, expected: &str) {
        let rendered = template(source)
            .and_then(|t| t.render(messages, None, add_generation_prompt))
            .map_err(|e| e.to_string());
        assert_eq!(rendered.as_deref(), Ok(expected));
    }

    fn err_text(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Ok(v) => format!("unexpected success: {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn smollm2_renders_all_roles_and_generation_prompt() {
        let messages = [
            Message::system("Be brief."),
            Message::user("What is 2+2?"),
            Message::assistant("4"),
            Message::tool("{\"result\": 4}"),
        ];
        let expected = "<|im_start|>system\nBe brief.<|im_end|>\n\
                        <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
                        <|im_start|>assistant\n4<|im_end|>\n\
                        <|im_start|>tool\n{\"result\": 4}<|im_end|>\n\
                        <|im_start|>assistant\n";
        check(SMOLLM2_TEMPLATE, &messages, true, expected);
    }

    #[test]
    fn gemma_template_folds_system_into_first_user_turn_and_tool_results_into_user_turns() {
        let messages = [
            Message::system("Use tools."),
            Message::user("What is 6*7?"),
            Message::assistant("<tool_call>\n{\"name\": \"mul\"}\n</tool_call>"),
            Message::tool("<tool_response>\n42\n</tool_response>"),
        ];
        let expected = "<bos><start_of_turn>user\nUse tools.\n\nWhat is 6*7?<end_of_turn>\n\
                        <start_of_turn>model\n<tool_call>\n{\"name\": \"mul\"}\n</tool_call><end_of_turn>\n\
                        <start_of_turn>user\n<tool_response>\n42\n</tool_response><end_of_turn>\n\
                        <start_of_turn>model\n";
        let t = ChatTemplate::new(GEMMA_TEMPLATE.into(), "<bos>".into(), "<eos>".into()).unwrap();
        assert_eq!(t.render(&messages, None, true).unwrap(), expected);
        // Without a system message the first user turn has no prefix; no messages at all is
        // just the BOS.
        let t_out = t.render(&[Message::user("hi")], None, false).unwrap();
        assert_eq!(t_out, "<bos><start_of_turn>user\nhi<end_of_turn>\n");
        assert_eq!(t.render(&[], None, false).unwrap(), "<bos>");
    }

    #[test]
    fn builtin_template_is_only_for_known_architectures() {
        assert_eq!(builtin_template("gemma3"), Some(GEMMA_TEMPLATE));
        assert_eq!(builtin_template("llama"), None);
    }

    #[test]
    fn hermes_native_templates_get_tool_results_without_outer_tags() {
        let source = "{% for m in messages %}{% if m.role == 'tool' %}<tool_response>\n{{ m.content }}\n</tool_response>{% else %}{{ m.content }}{% endif %}|{% endfor %}";
        let one = Message::tool("<tool_response>\n{\"a\": 1}\n</tool_response>");
        check(
            source,
            std::slice::from_ref(&one),
            false,
            "<tool_response>\n{\"a\": 1}\n</tool_response>|",
        );
        // Two blocks in one message, or a user message, are left as they are.
        let two = Message::tool(
            "<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response>",
        );
        check(
            source,
            std::slice::from_ref(&two),
            false,
            &format!("<tool_response>\n{}\n</tool_response>|", two.content),
        );
        let user = Message::user("<tool_response>\nx\n</tool_response>");
        check(
            source,
            std::slice::from_ref(&user),
            false,
            &format!("{}|", user.content),
        );
        // A template that does not speak Hermes sees the content unchanged.
        check(SMOLLM2_TEMPLATE, std::slice::from_ref(&one), false, &format!("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>tool\n{}<|im_end|>\n", one.content));
    }

    #[test]
    fn smollm2_inserts_default_system_message() {
        let expected = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained \
                        by Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n";
        check(SMOLLM2_TEMPLATE, &[Message::user("hi")], false, expected);
    }

    #[test]
    fn smollm2_template_from_real_model() {
        let path = crate::model_files::ensure_default_model(&mut |line| eprintln!("{line}"))
            .expect("default model");
        let mut file = std::fs::File::open(path).expect("open model");
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("GGUF");
        let tokenizer = GgufTokenizer::from_metadata(&content.metadata).expect("tokenizer");
        let chat = ChatTemplate::from_metadata(&content.metadata, &tokenizer).expect("template");
        assert_eq!(
            chat.source_digest(),
            format!("{:x}", Sha256::digest(SMOLLM2_TEMPLATE.as_bytes()))
        );
        assert_eq!(chat.bos_token, "<|im_start|>");
        assert_eq!(chat.eos_token, "<|im_end|>");
    }

    #[test]
    fn missing_template_names_the_key() {
        let err = err_text(ChatTemplate::from_metadata(
            &HashMap::new(),
            &tiny_tokenizer(),
        ));
        assert!(err.contains(CHAT_TEMPLATE_KEY), "{err}");
    }

    fn tiny_tokenizer() -> GgufTokenizer {
        let strs = |xs: &[&str]| {
            GgufValue::Array(
                xs.iter()
                    .map(|s| GgufValue::String(s.to_string()))
                    .collect(),
            )
        };
        let md = HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                GgufValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                GgufValue::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                strs(&["<s>", "</s>", "a"]),
            ),
            ("tokenizer.ggml.merges".to_string(), strs(&[])),
            ("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(1)),
        ]);
        GgufTokenizer::from_metadata(&md).expect("tiny tokenizer")
    }

    #[test]
    fn syntax_error_is_reported() {
        let err = err_text(template("{% for m in messages %}{{ m.content }}"));
        assert!(
            err.contains("does not compile") && err.contains("syntax error"),
            "{err}"
        );
    }

    #[test]
    fn raise_exception_carries_its_message() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must start with user') }}{% endif %}";
        let err = err_text(
            template(source).and_then(|t| t.render(&[Message::assistant("x")], None, false)),
        );
        assert_eq!(
            err,
            "chat template raised an exception: Conversation roles must start with user"
        );
    }

    #[test]
    fn python_string_methods_and_special_tokens_work() {
        let source = "{{ bos_token }}{% for m in messages %}{{ m.content.strip() | upper }}{% endfor %}{{ eos_token }}";
        check(source, &[Message::user("  hi  ")], false, "<s>HI</s>");
    }

    #[test]
    fn trim_and_lstrip_blocks_match_transformers() {
        let source = "{% for m in messages %}\n    {{ m.role }}\n{% endfor %}";
        check(
            source,
            &[Message::user("a"), Message::assistant("b")],
            false,
            "    user\n    assistant\n",
        );
    }

    #[test]
    fn tools_are_none_unless_given_and_tojson_is_pythonic() {
        let source = "{% if tools is not none %}{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}{% else %}no tools{% endif %}";
        let t = template(source).expect("template");
        assert_eq!(
            t.render(&[], None, false)
                .map_err(|e| e.to_string())
                .as_deref(),
            Ok("no tools")
        );
        let tools = serde_json::json!([{"name": "get_weather", "parameters": {"city": "Zürich", "days": [1, 2]}}]);
        let rendered = t
            .render(&[], Some(&tools), false)
            .map_err(|e| e.to_string());
        let expected = "[{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich\", \"days\": [1, 2]}}]|\
                        {\n  \"name\": \"get_weather\",\n  \"parameters\": {\n    \"city\": \"Zürich\",\n    \"days\": [\n      1,\n      2\n    ]\n  }\n}";
        assert_eq!(rendered.as_deref(), Ok(expected));
    }

    #[test]
    fn template_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn source_digest_is_sha256_of_source() {
        let t = template("hello").expect("template");
        assert_eq!(
            t.source_digest(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
