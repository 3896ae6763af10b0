use crate::gguf::types::GgmlType;

/// Why a tensor could not be quantized or dequantized. Messages name the type; callers add
/// the tensor name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("tensor type {ty} is not supported for quantization or dequantization")]
    Unsupported { ty: GgmlType },
    #[error(
        "{ty}: row length {row_len} is not a positive multiple of the block size {block_size}"
    )]
    RowLength {
        ty: GgmlType,
        row_len: usize,
        block_size: usize,
    },
    #[error("{ty}: {n_elements} elements are not a whole number of rows of {row_len}")]
    PartialRow {
        ty: GgmlType,
        n_elements: usize,
        row_len: usize,
    },
    #[error("{ty}: {n_elements} elements are not a whole number of blocks of {block_size}")]
    PartialBlock {
        ty: GgmlType,
        n_elements: usize,
        block_size: usize,
    },
    #[error("{ty}: {n_elements} elements take {expected} bytes, got {got}")]
    ByteLength {
        ty: GgmlType,
        n_elements: usize,
        expected: usize,
        got: usize,
    },
    #[error("{ty}: importance weights have {got} values for rows of {row_len}")]
    WeightsLength {
        ty: GgmlType,
        row_len: usize,
        got: usize,
    },
    #[error("{ty}: importance weight of column {column} is {value}, not finite and non-negative")]
    BadWeight {
        ty: GgmlType,
        column: usize,
        value: String,
    },
    #[error("{ty}: {n_elements} elements overflow the address space")]
    TooLarge { ty: GgmlType, n_elements: usize },
}
