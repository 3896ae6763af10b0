//! The trainer's glue to the rest of abf: the recipe-driven LLaMA forward (`crate::model`) seen as
//! layers, weights from a Hugging Face checkpoint, and the output checkpoint.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::recompute::{Grads, LayerModel};
use super::TrainError;
use crate::checkpoint::{
    patch_config, save_checkpoint, HfConfig, ModelConfig, SafetensorStore, SaveSpec, TensorData,
    CONFIG_FILE, DEFAULT_SHARD_BYTES,
};
use crate::fsutil::{failpoint, sync_parent};
use crate::model::{Llama, Path as ForwardPath, Positions};
use crate::rope::Recipe;

/// The model of `crate::model` through its differentiable path, positions from 0. The position
/// tables (rotary cos/sin and the recipe's logit scales) are built once per sequence length.
pub struct LlamaLayers {
    model: Llama,
    /// The same weights detached: recomputation's first pass runs through it and builds no graph.
    frozen: Llama,
    positions: RefCell<Option<Positions>>,
}

/// Query rows per attention block in training (the forward's default is 512). Causal attention
/// computes a block's scores against keys `0 .. end of block`, so blocks of `B` rows compute
/// `T (T + B) / 2` scores of a `T`-token sequence where `T^2 / 2` are needed: 128 rows waste 25%
/// at 512 tokens (512 rows: 100%) and 6% at 2k, for more, smaller matmuls. Measured on
/// SmolLM2-135M at up to 512 tokens: ~7% more tokens/s than 512; the `small` shape at 2k: 12%
/// faster and 21% less memory (docs/training.md).
pub const TRAIN_QUERY_BLOCK: usize = 128;

impl LlamaLayers {
    /// The model seen as layers, attention in blocks of [`TRAIN_QUERY_BLOCK`] query rows.
    pub fn new(model: Llama) -> LlamaLayers {
        let mut layers = LlamaLayers {
            frozen: model.detached(),
            model,
            positions: RefCell::new(None),
        };
        layers.set_query_block(TRAIN_QUERY_BLOCK);
        layers
    }

    /// Query rows per attention block, in the forward and in the blocked backward.
    pub fn set_query_block(&mut self, rows: usize) {
        self.model.set_query_block(rows);
        self.frozen.set_query_block(rows);
    }

    fn positions(&self, len: usize) -> candle_core::Result<Positions> {
        let mut slot = self.positions.borrow_mut();
        if let Some(p) = slot.as_ref().filter(|p| p.len() == len) {
            return Ok(p.clone());
        }
        let p = self.model.positions(0, len)?;
        *slot = Some(p.clone());
        Ok(p)
    }
}

impl LayerModel for LlamaLayers {
    fn num_layers(&self) -> usize {
        self.model.config().num_hidden_layers
    }

    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.model.embed(ids)
    }

    fn layer(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let pos = self.positions(x.dim(1)?)?;
        self.model.layer(i, x, &pos, ForwardPath::Differentiable)
    }

    fn layer_untracked(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let pos = self.positions(x.dim(1)?)?;
        // no graph to keep, so the fused kernels (same function, f32 rounding) serve; they have
        // no f64 form (f64 models are the gradient checks')
        let path = match x.dtype() {
            DType::F64 => ForwardPath::Differentiable,
            _ => ForwardPath::Fast,
        };
        self.frozen.layer(i, &x.detach(), &pos, path)
    }

    fn layer_backward(
        &self,
        i: usize,
        x: &Tensor,
        grad_out: &Tensor,
        blocked_attention: bool,
        sink: &mut dyn FnMut(Grads) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        if !blocked_attention {
            return super::recompute::whole_layer_backward(self, i, x, grad_out, sink);
        }
        let pos = self.positions(x.dim(1)?)?;
        self.model
            .layer_backward(i, x, grad_out, &pos, &mut |pairs| {
                sink(Grads::Weights(pairs))
            })
    }

    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.model.head(x, ForwardPath::Differentiable)
    }

    fn head_loss_backward(
        &self,
        x: &Tensor,
        targets: &Tensor,
        mask: &Tensor,
        scale: f64,
        sink: &mut dyn FnMut(Grads) -> candle_core::Result<()>,
    ) -> candle_core::Result<(f64, Tensor)> {
        self.model
            .head_loss_backward(x, targets, mask, scale, &mut |pairs| {
                sink(Grads::Weights(pairs))
            })
    }
}

/// A factory building the model of `cfg` (recipe included) from one step's weights.
pub fn llama_factory(
    cfg: ModelConfig,
) -> impl Fn(VarBuilder<'static>) -> Result<Box<dyn LayerModel>, TrainError> {
    move |vb| Ok(Box::new(LlamaLayers::new(Llama::load(vb, &cfg)?)) as Box<dyn LayerModel>)
}

/// The weights of a checkpoint directory on `device`, in file order. With tied embeddings an
/// `lm_head.weight` in the file is left out: the head is `embed_tokens` (as transformers ties it).
pub fn load_weights(
    dir: &Path,
    cfg: &ModelConfig,
    device: &Device,
) -> Result<Vec<(String, Tensor)>, TrainError> {
    let store = SafetensorStore::open(dir).map_err(ckpt)?;
    let mut out = Vec::new();
    for name in store.names() {
        if cfg.tie_word_embeddings && name == "lm_head.weight" {
            continue;
        }
        if name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        out.push((name.to_string(), store.load(name, device).map_err(ckpt)?));
    }
    Ok(out)
}

pub(crate) fn ckpt(e: crate::checkpoint::CheckpointError) -> TrainError {
    TrainError::Checkpoint(Box::new(e))
}

/// The checkpoint's dtype: that of its first floating-point tensor.
pub fn checkpoint_dtype(weights: &[(String, Tensor)]) -> DType {
    weights
        .iter()
        .map(|(_, t)| t.dtype())
        .find(|d| d.is_float())
        .unwrap_or(DType::F32)
}

/// The export's staging directory inside `out`.
pub const EXPORT_STAGE: &str = ".export.tmp";

/// Write the trained model into `out` (which may hold the run's log and checkpoint): weights,
/// config.json with the recipe in its block and `max_position_embeddings` = the target window,
/// and the source's tokenizer files.
///
/// The files are built in a staging directory (`StagedDir`: fsynced, renamed into place only when
/// complete), then moved into `out` with config.json as the commit mark: an old config.json is
/// removed first and the new one moved in last, so at any instant `out` either has no config.json
/// (no loader takes it for a model) or holds the whole new export. (`out` itself cannot be
/// renamed into place: it holds the run's checkpoint and log.)
pub fn export(
    out: &Path,
    source: &Path,
    hf: &HfConfig,
    recipe: &Recipe,
    tensors: &[(String, Tensor)],
) -> Result<Vec<PathBuf>, TrainError> {
    let patched = patch_config(hf, recipe, crate::rope::Target::Exact, false).map_err(ckpt)?;
    let config = Value::Object(patched.config);
    let data: Vec<TensorData<'static>> = tensors
        .iter()
        .map(|(n, t)| TensorData::from_candle(n, t))
        .collect::<Result<_, _>>()
        .map_err(ckpt)?;
    let stage = out.join(EXPORT_STAGE);
    // what a killed export left: the stage, and StagedDir's own `..export.tmp.PID.tmp`
    for entry in std::fs::read_dir(out).map_err(|e| TrainError::io(out, e))? {
        let p = entry.map_err(|e| TrainError::io(out, e))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if p.is_dir() && (name == EXPORT_STAGE || name.starts_with(&format!(".{EXPORT_STAGE}."))) {
            std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
        }
    }
    let report = save_checkpoint(
        &stage,
        &SaveSpec {
            config: &config,
            tensors: &data,
            tokenizer_dir: Some(source),
            max_shard_bytes: DEFAULT_SHARD_BYTES,
        },
    )
    .map_err(ckpt)?;
    let config_path = out.join(CONFIG_FILE);
    let sync = |p: &Path| sync_parent(p).map_err(|e| TrainError::io(p, e));
    if config_path.exists() {
        std::fs::remove_file(&config_path).map_err(|e| TrainError::io(&config_path, e))?;
        sync(&config_path)?;
    }
    // weights of an earlier export that this one does not overwrite would be stale
    for entry in std::fs::read_dir(out).map_err(|e| TrainError::io(out, e))? {
        let p = entry.map_err(|e| TrainError::io(out, e))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if p.is_file() && name.starts_with("model") && name.contains(".safetensors") {
            std::fs::remove_file(&p).map_err(|e| TrainError::io(&p, e))?;
        }
    }
    let mut moved = Vec::new();
    for entry in std::fs::read_dir(&report.dir).map_err(|e| TrainError::io(&report.dir, e))? {
        let p = entry.map_err(|e| TrainError::io(&report.dir, e))?.path();
        match p.file_name() {
            Some(name) if name != CONFIG_FILE => {
                let dst = out.join(name);
                std::fs::rename(&p, &dst).map_err(|e| TrainError::io(&dst, e))?;
                moved.push(dst);
            }
            _ => {}
        }
    }
    sync(&config_path)?;
    failpoint("export-partial");
    std::fs::rename(report.dir.join(CONFIG_FILE), &config_path)
        .map_err(|e| TrainError::io(&config_path, e))?;
    sync(&config_path)?;
    moved.push(config_path);
    std::fs::remove_dir_all(&report.dir).map_err(|e| TrainError::io(&report.dir, e))?;
    moved.sort();
    Ok(moved)
}
