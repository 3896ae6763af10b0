//! Errors of reading, writing and patching GGUF files. Every variant names the field, key or
//! tensor and, when reading, the byte offset where the problem was found.

use std::path::PathBuf;

/// A GGUF error. Messages are lowercase and name what went wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("truncated at byte {offset} reading {what} (needs {needed} bytes, {left} left)")]
    Truncated {
        offset: u64,
        what: String,
        needed: u64,
        left: u64,
    },
    #[error("bad magic {found:02x?} at byte 0 (expected \"GGUF\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported gguf version {version} at byte 4 (this reader knows 2 and 3{hint})")]
    UnsupportedVersion { version: u32, hint: &'static str },
    #[error("{what} at byte {offset} is {len} bytes long but only {left} bytes are left")]
    StringTooLong {
        offset: u64,
        what: String,
        len: u64,
        left: u64,
    },
    #[error("{what} at byte {offset} is not valid UTF-8")]
    NotUtf8 { offset: u64, what: String },
    #[error("{what} at byte {offset} is {count}, more than the {left} bytes left could hold")]
    CountTooLarge {
        offset: u64,
        what: String,
        count: u64,
        left: u64,
    },
    #[error("bad value type code {code} for key {key:?} at byte {offset}")]
    BadValueType { offset: u64, key: String, code: u32 },
    #[error(
        "key {key:?} at byte {offset} is an array of arrays, which gguf readers do not accept"
    )]
    NestedArray { offset: u64, key: String },
    #[error("key {key:?} at byte {offset} has boolean byte {byte} (expected 0 or 1)")]
    BadBool { offset: u64, key: String, byte: u8 },
    #[error("duplicate key {key:?} at byte {offset}")]
    DuplicateKey { offset: u64, key: String },
    #[error("duplicate tensor {name:?} at byte {offset}")]
    DuplicateTensor { offset: u64, name: String },
    #[error("general.alignment is {value}; it must be a power of two")]
    BadAlignment { value: u64 },
    #[error("key {key:?} has type {found}, expected {expected}")]
    KeyWrongType {
        key: String,
        expected: String,
        found: String,
    },
    #[error("tensor {name:?} at byte {offset} has {n_dims} dimensions (at most 4)")]
    TooManyDims {
        offset: u64,
        name: String,
        n_dims: u32,
    },
    #[error("tensor {name:?} at byte {offset}: dimensions {dims:?} overflow")]
    DimOverflow {
        offset: u64,
        name: String,
        dims: Vec<u64>,
    },
    #[error(
        "tensor {name:?}: row of {row} elements is not a whole number of {ty} blocks of {block}"
    )]
    PartialBlock {
        name: String,
        row: u64,
        ty: String,
        block: u64,
    },
    #[error(
        "tensor {name:?}: offset {tensor_offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedOffset {
        name: String,
        tensor_offset: u64,
        alignment: u64,
    },
    #[error("tensor {name:?}: offset {tensor_offset} should be {expected} (the running sum of padded sizes of the tensors before it)")]
    OffsetNotRunningSum {
        name: String,
        tensor_offset: u64,
        expected: u64,
    },
    #[error(
        "tensor {name:?}: data [{start}, {end}) runs past the end of the file ({file_len} bytes)"
    )]
    TensorPastEnd {
        name: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("tensor {name:?}: name is {len} bytes; ggml allows at most 63")]
    TensorNameTooLong { name: String, len: usize },
    #[error("tensor {name:?}: {reason}")]
    TensorData { name: String, reason: String },
    #[error("writer: {0}")]
    WriterState(String),
    #[error("value {value:?} for {key:?}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error("key {key:?} is missing")]
    MissingKey { key: String },
    #[error("{0}")]
    Refused(String),
    #[error("{}: split part {no} of {count} is missing (looked for {})", first.display(), part.display())]
    SplitPartMissing {
        first: PathBuf,
        part: PathBuf,
        no: u32,
        count: u16,
    },
    #[error("split part {}: {source}", part.display())]
    InSplitPart {
        part: PathBuf,
        source: Box<GgufError>,
    },
    #[error("{}: {key} is {count} but the file is not named PREFIX{postfix}", path.display())]
    SplitName {
        path: PathBuf,
        key: &'static str,
        count: u16,
        postfix: String,
    },
    #[error("{}: is part {no} of a split set of {count}; open the first part{}", path.display(), first.as_ref().map(|f| format!(" {}", f.display())).unwrap_or_default())]
    SplitNotFirst {
        path: PathBuf,
        no: u32,
        count: u16,
        first: Option<PathBuf>,
    },
    #[error("split part {}: {key} is {found}, expected {expected}", part.display())]
    SplitKey {
        part: PathBuf,
        key: &'static str,
        found: String,
        expected: i64,
    },
    #[error("{}: the split set holds {found} tensors but {key} says {expected}", first.display())]
    SplitTensorCount {
        first: PathBuf,
        key: &'static str,
        found: u64,
        expected: i64,
    },
    #[error("tensor {name:?} is in both split parts {} and {}", first.display(), second.display())]
    SplitDuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("split: {0}")]
    Split(String),
    #[error("recipe: {0}")]
    Recipe(#[from] crate::rope::RecipeError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Stream(#[from] std::io::Error),
}

impl GgufError {
    /// Attach a path to an I/O error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> GgufError {
        GgufError::Io {
            path: path.into(),
            source,
        }
    }
}
