//! Real runtimes: llama.cpp through the llama-cpp-2 crate (feature `llamacpp`).

mod error;
#[cfg(feature = "llamacpp")]
mod llamacpp;

pub use error::RuntimeError;
#[cfg(feature = "llamacpp")]
pub use llamacpp::{LlamaCpp, LlamaCppOptions};
