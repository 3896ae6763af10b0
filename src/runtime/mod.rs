//! Logits backends: our candle forward, and real llama.cpp through the llama-cpp-2 crate
//! (feature `llamacpp`).

mod backend;
mod error;
#[cfg(feature = "llamacpp")]
mod llamacpp;

pub use backend::{CandleBackend, LogitsBackend};
pub use error::RuntimeError;
#[cfg(feature = "llamacpp")]
pub use llamacpp::{LlamaCpp, LlamaCppOptions};
