//! [`LoadedModel`]: one GGUF file loaded as a model, its tokenizer and its chat template, with
//! what every request needs from them off the engine thread (prompt rendering, constraint
//! compilation into a [`Decoding`], the digests the disk tier checks), and the options and
//! errors of a generation.

use crate::chat::{ChatError, ChatTemplate};
use crate::decoding::Decoding;
use crate::detok::{Decode, DetokError};
use crate::model::{GgufFile, LoadOptions, Model, ModelError};
use crate::sampling::{SamplingError, SamplingParams};
use crate::stop::StopError;
use crate::tokenizer::{GgufTokenizer, TokenizerError};
use agentd_wire::Message;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// Finding, fetching or hashing a model file.
    #[error(transparent)]
    ModelFile(#[from] crate::model_files::ModelFileError),
    /// An output constraint that is invalid, unavailable or failed.
    #[error(transparent)]
    Constraint(#[from] crate::constraint::ConstraintError),
    /// A draft model whose tokens do not mean what the target's mean.
    #[error("the draft model {draft} cannot draft for {target}: {reason}")]
    DraftVocabulary {
        /// The target model's file.
        target: PathBuf,
        /// The draft model's file.
        draft: PathBuf,
        /// The first difference found.
        reason: String,
    },
}

/// What KV computed by a model depends on, besides the page layout: recorded by the disk tier
/// so that pages are only ever read back by the same model, tokenizer and template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDigests {
    /// SHA-256 of the GGUF file.
    pub model_sha256: String,
    /// SHA-256 of the tokenizer's serialised form.
    pub tokenizer_digest: String,
    /// SHA-256 of the chat template's source.
    pub template_digest: String,
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
    /// Keep generating past end-of-sequence tokens until `max_tokens` (for benchmarks that need
    /// a fixed output length, as vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// Report each token's log-probability with this many most likely alternatives (at most
    /// [`crate::decoding::MAX_TOP_LOGPROBS`]); `None`: none.
    pub logprobs: Option<usize>,
    /// What the output must match (a JSON schema, a grammar, tool calls).
    pub constraint: Option<crate::constraint::ConstraintSpec>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_tokens: 256,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            constraint: None,
        }
    }
}

/// A model ready to serve: weights, tokenizer and chat template from one GGUF file.
pub struct LoadedModel {
    /// The network (shared with the [`crate::CpuExecutor`] that runs it).
    pub model: Arc<Model>,
    /// Text ↔ token ids.
    pub tokenizer: Arc<GgufTokenizer>,
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

impl LoadedModel {
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
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            template,
            path: path.to_owned(),
            load_time,
            constraints: std::sync::OnceLock::new(),
        })
    }

    /// The grammar engine for this model's tokenizer, built on first use.
    pub fn constraint_factory(&self) -> Result<&crate::constraint::ConstraintFactory> {
        let built = self.constraints.get_or_init(|| {
            crate::constraint::ConstraintFactory::new(
                self.tokenizer.clone(),
                self.model.config().vocab,
            )
        });
        built.as_ref().map_err(|e| e.clone().into())
    }

    /// An executor that runs this model on the CPU (its KV pool is allocated by the scheduler).
    pub fn cpu_executor(&self) -> crate::CpuExecutor {
        crate::CpuExecutor::new(self.model.clone())
    }

    /// The state of one generation's output for `opts`: checks the sampling parameters and stop
    /// strings and compiles the constraint (which can take a while for a large grammar: call it
    /// off the engine thread).
    pub fn decoding(&self, opts: &GenerateOptions) -> Result<Decoding> {
        let constraint = match &opts.constraint {
            Some(spec) => Some(self.constraint_factory()?.constraint(spec)?),
            None => None,
        };
        Decoding::new(
            opts,
            self.tokenizer.stop_token_ids().to_vec(),
            constraint,
            self.tokenizer.clone(),
        )
    }

    /// What KV computed by this model depends on besides the page layout: the file's SHA-256
    /// (read from disk: takes a moment for a large file), the tokenizer's and the template's.
    pub fn digests(&self) -> Result<ModelDigests> {
        let model_sha256 = crate::model_files::sha256_file(&self.path)?;
        Ok(ModelDigests {
            model_sha256,
            tokenizer_digest: self.tokenizer.digest().to_string(),
            template_digest: self.template.source_digest(),
        })
    }

    /// Checks that `draft` may draft tokens for this model (speculative decoding with a draft
    /// model): every token id must stand for the same token in both vocabularies — the same
    /// number of tokens, the same text and kind for each id — so a drafted id means to the
    /// target what it meant to the draft model. Qwen2.5-Coder 0.5B and 1.5B share one; the
    /// embeddings may differ in padding rows, which are never drafted (ids past the target's
    /// logits end a draft).
    pub fn check_draft_vocabulary(&self, draft: &LoadedModel) -> Result<()> {
        let (t, d) = (&self.tokenizer, &draft.tokenizer);
        let mismatch = |reason: String| EngineError::DraftVocabulary {
            target: self.path.clone(),
            draft: draft.path.clone(),
            reason,
        };
        if t.vocab_size() != d.vocab_size() {
            return Err(mismatch(format!(
                "its vocabulary has {} tokens, the target's {}",
                d.vocab_size(),
                t.vocab_size()
            )));
        }
        if let Some(id) = (0..t.vocab_size() as u32).find(|&id| {
            t.token_text(id) != d.token_text(id) || t.token_kind(id) != d.token_kind(id)
        }) {
            return Err(mismatch(format!(
                "token {id} is {:?} for the target but {:?} for the draft model",
                t.token_text(id).unwrap_or_default(),
                d.token_text(id).unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Renders `messages` through the chat template (with the assistant's generation prompt)
    /// and tokenises the result.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, None, true)?;
        Ok(self.tokenizer.encode(&text, true)?)
    }
}
