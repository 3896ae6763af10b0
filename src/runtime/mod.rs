//! Logits backends: our candle forward (of a model directory, or of a GGUF read the way llama.cpp
//! reads it), and real llama.cpp through the llama-cpp-2 crate (feature `llamacpp`). `open` is
//! the one way in to a model (backend, tokenizer, recipe window).

mod arithmetic;
mod backend;
mod error;
mod gguf_candle;
#[cfg(feature = "llamacpp")]
mod llamacpp;
mod open;

pub use crate::gguf::{runtime_recipe, RuntimeRecipe};
pub use arithmetic::{activation_rounding, llamacpp_activation_type};
pub use backend::{CandleBackend, LogitsBackend, RowFn};
pub use error::RuntimeError;
pub use gguf_candle::{load_gguf_model, BackendKind, GgufModel, GgufModelError};
#[cfg(feature = "llamacpp")]
pub use llamacpp::{LlamaCpp, LlamaCppOptions};
pub use open::{
    is_gguf, load_llama, model_source, open_backend, open_dir, open_forward, open_model,
    original_context, Encoder, ModelDir, ModelSource, OpenModel,
};
