//! GGUF: the type and key tables, reader, writer and patcher (ours; candle's writes v2 and
//! ignores alignment).

pub mod types;

pub use types::{GgmlType, TypeInfo};
