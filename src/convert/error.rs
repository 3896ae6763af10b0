//! Errors of the conversion pipelines, naming the file, tensor or key.

use std::path::PathBuf;

use crate::checkpoint::CheckpointError;
use crate::gguf::GgufError;
use crate::rope::RecipeError;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),

    #[error(transparent)]
    Gguf(#[from] GgufError),

    #[error("recipe: {0}")]
    Recipe(#[from] RecipeError),

    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },

    #[error("tensor {tensor:?}: {reason}")]
    Tensor { tensor: String, reason: String },

    #[error("tensor {tensor:?}: unsupported ggml type {ty} (from-gguf reads F32, F16, BF16 and the types src/quant dequantizes)")]
    UnsupportedType { tensor: String, ty: String },

    #[error("tensor {tensor:?}: no GGUF name for this Hugging Face tensor")]
    UnknownHfTensor { tensor: String },

    #[error("tensor {tensor:?}: no Hugging Face name for this GGUF tensor")]
    UnknownGgufTensor { tensor: String },

    #[error("{}: tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },

    #[error("gguf key {key}: {reason}")]
    Key { key: String, reason: String },

    #[error("model: {0}")]
    Model(String),

    #[error("refused: {0}")]
    Refused(String),
}

impl ConvertError {
    pub(crate) fn tensor(tensor: &str, reason: impl Into<String>) -> ConvertError {
        ConvertError::Tensor {
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }
}
