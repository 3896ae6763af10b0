//! Errors of the evaluations: their own inputs (texts, lengths, positions, plot paths) and the
//! runtime's (opening a model, tokenizing, logits).

use std::path::PathBuf;

use crate::runtime::RuntimeError;

/// Bad input to an evaluation: each names the file or the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: reading: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the text has {have} tokens, a window of {length} needs {need}")]
    TextTooShort {
        path: PathBuf,
        have: usize,
        length: usize,
        need: usize,
    },
    #[error("{what}: {message}")]
    BadValue { what: &'static str, message: String },
    #[error(
        "length {length} is too short for the passkey prompt, which needs at least {need} tokens"
    )]
    PasskeyTooShort { length: usize, need: usize },
    #[error("plot {path}: {message}")]
    Plot { path: PathBuf, message: String },
    /// Opening the model, tokenizing, or its logits.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("attention entropy: {0}")]
    Entropy(#[from] candle_core::Error),
}
