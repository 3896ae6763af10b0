//! Hugging Face checkpoints: config.json, safetensors (the one mmap), tokenizer files, the
//! checkpoint writer and the config rewriter (patch-config).

pub mod config;
pub mod dir;
pub mod error;
pub mod keys;
pub mod patch_config;
pub mod safetensors;
pub mod tokenizer;
pub mod writer;

pub use config::{HfConfig, ModelConfig, ModelType, RecipeSource, RopeForm, CONFIG_FILE};
pub use dir::Checkpoint;
pub use error::CheckpointError;
pub use patch_config::{patch_config, write_patched, PatchFiles, PatchOutput, PatchedConfig};
pub use safetensors::{
    SafetensorStore, SharedStore, TensorDtype, TensorView, INDEX_FILE, WEIGHTS_FILE,
};
pub use tokenizer::{GenerationConfig, TokenizerConfig, TokenizerFiles};
pub use writer::{
    save_checkpoint, write_json, write_safetensors, SaveReport, SaveSpec, StagedDir, TensorData,
    DEFAULT_SHARD_BYTES,
};
