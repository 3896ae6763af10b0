use std::path::PathBuf;

use crate::gguf::GgufError;

/// Why an importance matrix could not be read, written or collected. Messages name the file and,
/// where one is at fault, the tensor or key.
#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Gguf { path: PathBuf, source: GgufError },
    /// The file's bytes do not hold a valid matrix.
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    /// Collecting over the model failed.
    #[error("imatrix: {0}")]
    Collect(String),
}

impl ImatrixError {
    pub(crate) fn format(path: &std::path::Path, reason: impl Into<String>) -> ImatrixError {
        ImatrixError::Format {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
