//! Errors of the evaluation commands' own inputs (texts, lengths, positions, plot paths).

use std::path::PathBuf;

/// Bad input to an evaluation: each names the file or the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: reading: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: is a GGUF file; this measurement needs a model directory (it reads inside the model)")]
    GgufInput { path: PathBuf },
    #[error("{path}: not a model directory (expected config.json and safetensors weights)")]
    NotModelDir { path: PathBuf },
    #[error("{path}: tokenizing: {message}")]
    Tokenize { path: PathBuf, message: String },
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
}
