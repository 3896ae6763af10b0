//! A whole model directory: its config and its memory-mapped weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::HfConfig;
use super::error::CheckpointError;
use super::safetensors::SafetensorStore;
use super::tokenizer::TokenizerFiles;

/// A Hugging Face model directory opened for reading.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: HfConfig,
    pub weights: Arc<SafetensorStore>,
}

impl Checkpoint {
    /// Read `config.json` and map the safetensors weights (single file or shards).
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let config = HfConfig::load(dir)?;
        let weights = Arc::new(SafetensorStore::open(dir)?);
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            weights,
        })
    }

    /// A `VarBuilder` over the weights, converting to `dtype` on `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        self.weights.var_builder(dtype, device)
    }

    /// The tokenizer files of the directory.
    pub fn tokenizer(&self) -> Result<TokenizerFiles, CheckpointError> {
        TokenizerFiles::load(&self.dir)
    }
}
