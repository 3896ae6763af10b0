//! Importance matrices (llama.cpp's `llama-imatrix`): per weight a linear layer multiplies, the
//! sum over activation rows of each input column's square, and the rows summed. Collected by our
//! forward (`collect`), stored in llama.cpp's GGUF form (`gguf_file`), read from it or from the
//! legacy `.dat` form (`legacy`), and turned into per-column quantization weights (`matrix`).

mod collect;
mod error;
mod gguf_file;
mod legacy;
mod matrix;

pub use collect::{collect, CollectOptions, CollectReport};
pub use error::ImatrixError;
pub use gguf_file::{parse_gguf, to_gguf_bytes, write_gguf};
pub use legacy::parse_legacy;
pub use matrix::{read, Entry, ImportanceMatrix};
