use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::gguf::GgufError;

use super::gguf_candle::GgufModelError;

/// Why a runtime could not open a model, tokenize for it or compute logits. Messages name the
/// file (or the backend, for a model built in memory).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("llama.cpp backend failed to initialise: {0}")]
    Backend(String),
    #[error("{}: no such file", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: llama.cpp could not load the model: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("{}: llama.cpp could not create a context of {n_ctx} tokens (out of memory?)", path.display())]
    Context { path: PathBuf, n_ctx: usize },
    #[error("{}: {n_tokens} tokens do not fit in a context of {n_ctx}", path.display())]
    ContextTooSmall {
        path: PathBuf,
        n_tokens: usize,
        n_ctx: usize,
    },
    #[error("{}: no tokens to evaluate", path.display())]
    NoTokens { path: PathBuf },
    #[error("{}: token {token} at position {pos} is outside the vocabulary of {n_vocab}", path.display())]
    TokenOutOfRange {
        path: PathBuf,
        token: u32,
        pos: usize,
        n_vocab: usize,
    },
    #[error("{}: llama_decode failed at positions {start}..{end}: {reason}", path.display())]
    Decode {
        path: PathBuf,
        start: usize,
        end: usize,
        reason: String,
    },
    #[error("{}: {what} is too large for llama.cpp", path.display())]
    TooLarge { path: PathBuf, what: &'static str },

    // --- opening (runtime::open)
    #[error("unknown backend {0:?} (expected candle or llama.cpp)")]
    UnknownEngine(String),
    #[error("{}: not a model directory (expected config.json and safetensors weights) or GGUF file", path.display())]
    NotAModel { path: PathBuf },
    #[error("{}: is a GGUF file; this needs a model directory (it reads inside the model)", path.display())]
    GgufInput { path: PathBuf },
    #[error("{}: the {engine} engine runs GGUF files; a model directory runs on candle", path.display())]
    EngineNeedsGguf { path: PathBuf, engine: &'static str },
    #[error("{}: this build has no llama.cpp engine (rebuild with --features llamacpp)", path.display())]
    NoLlamaCpp { path: PathBuf },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{}: {source}", path.display())]
    Gguf { path: PathBuf, source: GgufError },
    #[error(transparent)]
    GgufModel(#[from] GgufModelError),
    #[error("{}: runtime recipe: {reason}", path.display())]
    Recipe { path: PathBuf, reason: String },
    #[error("{}: loading the model: {source}", path.display())]
    Model {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{}: tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{}: tokenizing: {reason}", path.display())]
    Tokenize { path: PathBuf, reason: String },

    // --- logits of a backend built in memory (no file to name)
    #[error("{backend}: no tokens to run")]
    Empty { backend: String },
    #[error("{backend}: token {token} at position {pos} is outside the vocabulary of {n_vocab}")]
    OutOfVocab {
        backend: String,
        token: u32,
        pos: usize,
        n_vocab: usize,
    },
    #[error("{backend}: {rows} x {n_vocab} f32 logits do not fit in memory")]
    LogitsTooLarge {
        backend: String,
        rows: usize,
        n_vocab: usize,
    },
    #[error("{backend}: forward: {source}")]
    Forward {
        backend: String,
        source: candle_core::Error,
    },
    /// An error of the caller's row consumer, passed through `for_each_logits` unchanged.
    #[error(transparent)]
    Consumer(Box<dyn std::error::Error + Send + Sync>),
}

impl RuntimeError {
    /// Wrap an error of a `for_each_logits` row consumer.
    pub fn consumer(e: impl std::error::Error + Send + Sync + 'static) -> RuntimeError {
        RuntimeError::Consumer(Box::new(e))
    }
}
