//! The texts an evaluation reads, cut into windows of token ids.

use std::path::Path;

use super::error::EvalError;

/// Read a UTF-8 text file, naming it on error.
pub fn read_text(path: &Path) -> Result<String, EvalError> {
    std::fs::read_to_string(path).map_err(|source| EvalError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Up to `max` non-overlapping windows of exactly `length` tokens cut from the start of `ids`
/// (a text tokenized without BOS); with `bos` each window is BOS followed by `length - 1` text
/// tokens. `path` names the text in the error when not even one window fits.
pub fn windows(
    ids: &[u32],
    length: usize,
    max: usize,
    bos: Option<u32>,
    path: &Path,
) -> Result<Vec<Vec<u32>>, EvalError> {
    let body = length - usize::from(bos.is_some());
    if length < 2 || body == 0 {
        return Err(EvalError::BadValue {
            what: "length",
            message: format!("a window needs at least 2 tokens, got {length}"),
        });
    }
    let count = (ids.len() / body).min(max);
    if count == 0 {
        return Err(EvalError::TextTooShort {
            path: path.to_path_buf(),
            have: ids.len(),
            length,
            need: body,
        });
    }
    Ok(ids
        .chunks_exact(body)
        .take(count)
        .map(|chunk| bos.into_iter().chain(chunk.iter().copied()).collect())
        .collect())
}
