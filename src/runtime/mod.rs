//! Logits backends: our candle forward (of a model directory, or of a GGUF read the way llama.cpp
//! reads it), and real llama.cpp through the llama-cpp-2 crate (feature `llamacpp`).

mod backend;
mod error;
mod gguf_candle;
#[cfg(feature = "llamacpp")]
mod llamacpp;

pub use crate::gguf::{runtime_recipe, RuntimeRecipe};
pub use backend::{CandleBackend, LogitsBackend};
pub use error::RuntimeError;
pub use gguf_candle::{
    is_gguf, load_gguf_model, open_backend, tokenize_for, BackendKind, GgufModel, GgufModelError,
    GgufTokenizer,
};
#[cfg(feature = "llamacpp")]
pub use llamacpp::{LlamaCpp, LlamaCppOptions};
