use std::path::PathBuf;

/// Why a runtime could not load a model or compute logits. Messages name the file.
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
}
