//! Hugging Face checkpoints: config.json, safetensors (the one mmap), tokenizer files.

pub mod config;

pub use config::{ModelConfig, ModelType};
