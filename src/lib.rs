//! abf: context extension for RoPE language models (entropy-aware ABF), from fine-tuning to a
//! verified GGUF.
//!
//! One idea runs through the crate: a context-extension recipe ([`rope::Recipe`]) is a single
//! typed value. Training, config rewriting, GGUF metadata and the verifier read and write it.

pub mod checkpoint;
pub mod cli;
pub mod convert;
pub mod eval;
pub mod fsutil;
pub mod gguf;
pub mod imatrix;
pub mod model;
pub mod quant;
pub mod release;
pub mod rope;
pub mod runtime;
mod simd;
pub mod train;
pub mod verify;
