//! The engine: a loaded model with its tokenizer and chat template, and the streaming generation
//! loop (prefill in chunks → sample → detokenise → stop checks → decode).

use crate::chat::{ChatError, ChatTemplate};
use crate::decoding::Decoding;
use crate::detok::{Decode, DetokError};
use crate::model::{GgufFile, LoadOptions, Model, ModelError};
use crate::sampling::{SamplingError, SamplingParams};
use crate::stop::StopError;
use crate::tokenizer::{GgufTokenizer, TokenizerError};
use agentd_sdk::Message;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Anything that can stop a generation request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Loading or running the model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Building or running the tokenizer.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Rendering the chat template.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// Invalid sampling parameters.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// Invalid stop strings.
    #[error(transparent)]
    Stop(#[from] StopError),
    /// Turning tokens back into text.
    #[error(transparent)]
    Detok(#[from] DetokError),
    /// A request that cannot be served as asked (the message says why).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An output constraint that is invalid, unavailable or failed.
    #[error(transparent)]
    Constraint(#[from] crate::constraint::ConstraintError),
}

/// Result alias for engine operations.
pub type Result<T> = std::result::Result<T, EngineError>;

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string appeared (it is not part of the output).
    Stop(String),
    /// `max_tokens` were generated.
    MaxTokens,
    /// The sequence reached the model's context length.
    ContextFull,
    /// The reader of the stream cancelled.
    Cancelled,
}

/// What to generate and how.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation when they appear in the output.
    pub stop: Vec<String>,
    /// Prompt tokens per forward call during prefill.
    pub prefill_chunk: usize,
    /// Keep generating past end-of-sequence tokens until `max_tokens` (for benchmarks that need
    /// a fixed output length, as vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// What the output must match (a JSON schema, a grammar, tool calls).
    pub constraint: Option<crate::constraint::ConstraintSpec>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            prefill_chunk: 512,
            ignore_eos: false,
            constraint: None,
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateOutput {
    /// The text produced (without any stop string).
    pub text: String,
    /// The tokens sampled (an end-of-sequence token is not included).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Time spent on the prompt, up to the first sampled token.
    pub prefill_time: Duration,
    /// Time spent generating after the first token.
    pub decode_time: Duration,
}

/// A model ready to serve: weights, tokenizer and chat template from one GGUF file.
pub struct Engine {
    /// The network.
    pub model: Model,
    /// Text ↔ token ids.
    pub tokenizer: GgufTokenizer,
    /// Messages → prompt text.
    pub template: ChatTemplate,
    /// Where the model was loaded from.
    pub path: PathBuf,
    /// How long loading took.
    pub load_time: Duration,
    /// The grammar engine, built on the first constrained request.
    constraints: std::sync::OnceLock<
        std::result::Result<
            crate::constraint::ConstraintFactory,
            crate::constraint::ConstraintError,
        >,
    >,
}

impl Decode for GgufTokenizer {
    fn decode_ids(&self, ids: &[u32]) -> std::result::Result<String, DetokError> {
        self.decode(ids, true).map_err(DetokError::tokenizer)
    }
}

impl Engine {
    /// Loads the GGUF file at `path`.
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Self> {
        let _span = tracing::info_span!("load_model", path = %path.display()).entered();
        let start = Instant::now();
        let mut file = GgufFile::open(path)?;
        let tokenizer = GgufTokenizer::from_metadata(file.metadata())?;
        let template = ChatTemplate::from_metadata(file.metadata(), &tokenizer)?;
        let model = Model::load(&mut file, opts)?;
        if tokenizer.vocab_size() > model.config().vocab {
            return Err(ModelError::BadKey {
                key: "tokenizer.ggml.tokens".into(),
                reason: format!(
                    "{} tokens, but the embedding has only {} rows",
                    tokenizer.vocab_size(),
                    model.config().vocab
                ),
            }
            .into());
        }
        let load_time = start.elapsed();
        tracing::info!(
            ?load_time,
            weight_bytes = model.weight_bytes(),
            "model loaded"
        );
        Ok(Self {
            model,
            tokenizer,
            template,
            path: path.to_owned(),
            load_time,
            constraints: std::sync::OnceLock::new(),
        })
    }

    /// The grammar engine for this model's tokenizer, built on first use.
    pub fn constraint_factory(&self) -> Result<&crate::constraint::ConstraintFactory> {
        let built = self.constraints.get_or_init(|| {
            let json = self
                .tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| crate::constraint::ConstraintError::Unavailable(e.to_string()))?;
            crate::constraint::ConstraintFactory::new(
                json.as_bytes(),
                self.tokenizer.eos_token_id(),
                self.model.config().vocab,
            )
        });
        built.as_ref().map_err(|e| e.clone().into())
    }

    /// Renders `messages` through the chat template (with the assistant's generation prompt)
    /// and tokenises the result.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, None, true)?;
        Ok(self.tokenizer.encode(&text, true)?)
    }

    /// Generates a continuation of `prompt`, calling `on_text` with each piece of text as soon
    /// as it is final (whole UTF-8 characters, never part of a stop string). `on_text` returns
    /// [`ControlFlow::Break`] to cancel (a reader that went away): generation stops at once with
    /// [`FinishReason::Cancelled`].
    pub fn generate(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerateOutput> {
        let span = tracing::info_span!(
            "generate",
            prompt_tokens = prompt.len(),
            max_tokens = opts.max_tokens
        );
        let _enter = span.enter();
        let ctx = self.model.config().context_length;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if opts.max_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if opts.max_tokens > ctx {
            return Err(EngineError::InvalidRequest(format!(
                "max_tokens {} exceeds the model's context length {ctx}",
                opts.max_tokens
            )));
        }
        if opts.prefill_chunk == 0 {
            return Err(EngineError::InvalidRequest(
                "prefill_chunk must be at least 1".into(),
            ));
        }
        if prompt.len() >= ctx {
            return Err(ModelError::ContextOverflow {
                needed: prompt.len() + 1,
                limit: ctx,
            }
            .into());
        }
        let mut dec = Decoding::new(opts, self)?;
        let start = Instant::now();
        let mut cache = self.model.new_cache();
        let mut logits = Vec::new();
        for chunk in prompt.chunks(opts.prefill_chunk) {
            logits = self.model.forward(chunk, &mut cache)?;
        }
        let mut history = prompt.to_vec();
        let mut first_token_at = None;
        let finish = loop {
            let tok = dec.sample(&mut logits, &history);
            first_token_at.get_or_insert_with(Instant::now);
            history.push(tok);
            let pushed = dec.push(tok, &self.tokenizer, cache.len() >= ctx)?;
            if !pushed.text.is_empty() && on_text(&pushed.text).is_break() {
                break FinishReason::Cancelled;
            }
            if let Some(finish) = pushed.finish {
                break finish;
            }
            logits = self.model.forward(&[tok], &mut cache)?;
        };
        let (text, tokens) = (dec.text, dec.tokens);
        let first = first_token_at.unwrap_or_else(Instant::now);
        let out = GenerateOutput {
            text,
            tokens,
            finish,
            prompt_tokens: prompt.len(),
            prefill_time: first - start,
            decode_time: first.elapsed(),
        };
        tracing::info!(generated = out.tokens.len(), finish = ?out.finish, "generation finished");
        Ok(out)
    }
}
