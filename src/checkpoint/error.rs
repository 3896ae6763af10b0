//! Errors of reading and writing Hugging Face checkpoints. Every message names the file and the
//! thing (key, tensor, shard) it is about.

use std::path::{Path, PathBuf};

use crate::rope::RecipeError;

/// Errors of reading or writing a checkpoint directory.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: file not found ({what})", path.display())]
    MissingFile { path: PathBuf, what: &'static str },

    #[error("{}: malformed JSON at line {line}, column {column}: {reason}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },

    #[error("{}: unsupported model_type {found:?} (expected llama, mistral or ministral3)", path.display())]
    UnsupportedModelType { path: PathBuf, found: String },

    #[error("{}: {key}: {reason}", path.display())]
    InvalidConfig {
        path: PathBuf,
        key: String,
        reason: String,
    },

    #[error("{}: unsupported rope settings: {reason}", path.display())]
    UnsupportedRope { path: PathBuf, reason: String },

    #[error("{}: tensor {tensor:?} has unsupported dtype {dtype} (expected F32, F16 or BF16)", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("{}: tensor {tensor:?} not found", path.display())]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{}: tensor {tensor:?} has shape {found:?}, expected {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{}: shard {shard:?} (holding tensor {tensor:?}) not found", index.display())]
    MissingShard {
        index: PathBuf,
        shard: String,
        tensor: String,
    },

    #[error("{}: invalid safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },

    #[error("{}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },

    #[error("{}: {source}", path.display())]
    Recipe {
        path: PathBuf,
        #[source]
        source: RecipeError,
    },

    #[error("{runtime} cannot run this recipe exactly: {}; pass --allow-approximate to write the nearest {runtime} form, or use --runtime exact", gaps.join("; "))]
    NotRepresentable {
        runtime: &'static str,
        gaps: Vec<String>,
    },

    #[error("{}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CheckpointError {
    /// Wrap an io error with the path it happened on.
    pub fn io(path: &Path, source: std::io::Error) -> CheckpointError {
        CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A malformed-JSON error from serde_json, keeping its line and column.
    pub fn json(path: &Path, err: &serde_json::Error) -> CheckpointError {
        CheckpointError::Json {
            path: path.to_path_buf(),
            line: err.line(),
            column: err.column(),
            // serde_json appends " at line L column C"; the fields carry those
            reason: {
                let text = err.to_string();
                match text.rsplit_once(" at line ") {
                    Some((head, _)) => head.to_string(),
                    None => text,
                }
            },
        }
    }

    /// A bad value of one config key.
    pub fn invalid(path: &Path, key: &str, reason: impl Into<String>) -> CheckpointError {
        CheckpointError::InvalidConfig {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }
}

/// Read a whole file, naming it in the error; a missing file is `MissingFile`.
pub(crate) fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::MissingFile {
                path: path.to_path_buf(),
                what,
            }
        } else {
            CheckpointError::io(path, e)
        }
    })
}

/// Read and parse a JSON file, keeping key order.
pub(crate) fn read_json(
    path: &Path,
    what: &'static str,
) -> Result<serde_json::Value, CheckpointError> {
    let bytes = read_file(path, what)?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::json(path, &e))
}
