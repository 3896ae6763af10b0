//! A GGUF run by our candle forward, reading the file the way llama.cpp reads it: the verifier's
//! second implementation of what the runtime computes.
//!
//! The recipe is derived from the keys llama.cpp reads (`{arch}.rope.*`,
//! `mistral3.attention.temperature_scale`, `{arch}.context_length`), never from our exact
//! `abf.recipe.*` record, so a key llama.cpp would misread is misread here too. Sources:
//! llama.cpp `src/llama-model.cpp` (`load_hparams`: scaling type defaults to linear, a factor of
//! 0 means none, `n_ctx_orig_yarn` defaults to `n_ctx_train`), `src/llama-graph.cpp` (mistral3's
//! `f_attn_temp_scale` step law), ggml `rope_yarn` (mscale `attn_factor * (1 + 0.1 ln s)`).
//! `rope_freqs.weight` (Llama 3's factors) divides frequency `j` as ggml-cpu `ggml_rope_cache_init`
//! does (`theta / ff[j]`): the model carries the divisors next to the keys' recipe, so
//! [`GgufModel::runtime`] of such a file is the plain recipe the keys describe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::checkpoint::{ModelConfig, ModelType};
use crate::convert::tokenizer_gguf::GgufVocab;
use crate::convert::{read_hf_tensors, read_hparams, read_rope_freqs, GgufHparams};
use crate::gguf::keys::ArchKey;
use crate::gguf::{open_set, runtime_recipe, RuntimeRecipe};
use crate::model::Llama;

/// Why a GGUF could not be read into our forward. Messages name the file and key or tensor.
#[derive(Debug, thiserror::Error)]
pub enum GgufModelError {
    #[error("{}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{}: {key}: {reason}", path.display())]
    Key {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{}: {what} is not supported by the candle GGUF backend: {reason}", path.display())]
    Unsupported {
        path: PathBuf,
        what: String,
        reason: String,
    },
}

/// A GGUF loaded into our [`Llama`] (f32 weights), with its runtime recipe.
pub struct GgufModel {
    pub model: Llama,
    pub runtime: RuntimeRecipe,
    pub hparams: GgufHparams,
}

/// Load `path` (a GGUF file, or the first part of a split set) into our forward: tensors of every supported type dequantized to f32 and q/k
/// un-permuted (`convert::read_hf_tensors`), the recipe from the runtime keys.
pub fn load_gguf_model(path: &Path, device: &Device) -> Result<GgufModel, GgufModelError> {
    let read = |reason: String| GgufModelError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let set = open_set(path).map_err(|x| read(x.to_string()))?;
    let file = &set.file;
    let hp = read_hparams(&file.metadata).map_err(|x| read(x.to_string()))?;
    let runtime = runtime_recipe(&file.metadata, hp.head_dim).map_err(|e| GgufModelError::Key {
        path: path.to_path_buf(),
        key: format!("{}.rope.*", hp.arch),
        reason: e.to_string(),
    })?;
    if runtime.rope_dim != hp.head_dim {
        return Err(GgufModelError::Unsupported {
            path: path.to_path_buf(),
            what: ArchKey::RopeDimensionCount.key(&hp.arch),
            reason: format!(
                "partial rotary dimension {} of head size {}",
                runtime.rope_dim, hp.head_dim
            ),
        });
    }
    // llama3 scaling: llama.cpp divides frequency j by rope_freqs[j] on top of the keys' recipe
    let freq_factors = read_rope_freqs(&set).map_err(|x| read(x.to_string()))?;
    let tensors = read_hf_tensors(&set, &hp, crate::checkpoint::TensorDtype::F32)
        .map_err(|x| read(x.to_string()))?;
    let vocab = tensors
        .vocab_rows
        .ok_or_else(|| read("no token_embd.weight".into()))?;
    let mut map = HashMap::with_capacity(tensors.tensors.len());
    for t in tensors.tensors {
        let tensor = Tensor::from_raw_buffer(&t.data, DType::F32, &t.shape, device)
            .map_err(|x| read(format!("{}: {x}", t.name)))?;
        map.insert(t.name, tensor);
    }
    let vocab_meta = GgufVocab::read(&file.metadata).ok().flatten();
    let cfg = ModelConfig {
        model_type: ModelType::Llama,
        vocab_size: vocab,
        hidden_size: hp.hidden,
        intermediate_size: hp.ff,
        num_hidden_layers: hp.layers,
        num_attention_heads: hp.heads,
        num_key_value_heads: hp.kv_heads,
        head_dim: hp.head_dim,
        rms_norm_eps: hp.eps,
        tie_word_embeddings: !tensors.has_output,
        max_position_embeddings: runtime.recipe.context,
        bos_token_id: vocab_meta.as_ref().and_then(|v| v.bos),
        eos_token_id: vocab_meta.as_ref().and_then(|v| v.eos),
        recipe: runtime.recipe.clone(),
    };
    let vb = VarBuilder::from_tensors(map, DType::F32, device);
    let mut model = Llama::load(vb, &cfg).map_err(|x| read(x.to_string()))?;
    if let Some(ff) = freq_factors {
        let ff = ff.into_iter().map(f64::from).collect();
        model
            .set_freq_factors(Some(ff))
            .map_err(|x| GgufModelError::Unsupported {
                path: path.to_path_buf(),
                what: crate::convert::tensor_map::ROPE_FREQS.into(),
                reason: x.to_string(),
            })?;
    }
    Ok(GgufModel {
        model,
        runtime,
        hparams: hp,
    })
}

/// Which engine runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Our candle forward (a model directory, or a GGUF read as llama.cpp reads it).
    Candle,
    /// Real llama.cpp (GGUF only; feature `llamacpp`).
    LlamaCpp,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Candle => "candle",
            BackendKind::LlamaCpp => "llama.cpp",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = super::RuntimeError;
    fn from_str(s: &str) -> Result<BackendKind, super::RuntimeError> {
        match s {
            "candle" => Ok(BackendKind::Candle),
            "llama.cpp" | "llamacpp" | "llama-cpp" => Ok(BackendKind::LlamaCpp),
            other => Err(super::RuntimeError::UnknownEngine(other.to_string())),
        }
    }
}
