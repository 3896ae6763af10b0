//! A GGUF run by our candle forward, reading the file the way llama.cpp reads it: the verifier's
//! second implementation of what the runtime computes.
//!
//! The recipe is derived from the keys llama.cpp reads (`{arch}.rope.*`,
//! `mistral3.attention.temperature_scale`, `{arch}.context_length`), never from our exact
//! `abf.recipe.*` record, so a key llama.cpp would misread is misread here too. Sources:
//! llama.cpp `src/llama-model.cpp` (`load_hparams`: scaling type defaults to linear, a factor of
//! 0 means none, `n_ctx_orig_yarn` defaults to `n_ctx_train`), `src/llama-graph.cpp` (mistral3's
//! `f_attn_temp_scale` step law), ggml `rope_yarn` (mscale `attn_factor * (1 + 0.1 ln s)`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::backend::{CandleBackend, LogitsBackend};
use crate::checkpoint::{Checkpoint, ModelConfig, ModelType};
use crate::convert::tokenizer_gguf::GgufVocab;
use crate::convert::{read_hf_tensors, read_hparams, GgufHparams};
use crate::gguf::keys::ArchKey;
use crate::gguf::{open_mmap, runtime_recipe, RuntimeRecipe};
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

/// Load `path` into our forward: tensors of every supported type dequantized to f32 and q/k
/// un-permuted (`convert::read_hf_tensors`), the recipe from the runtime keys.
pub fn load_gguf_model(path: &Path, device: &Device) -> Result<GgufModel, GgufModelError> {
    let read = |reason: String| GgufModelError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let mapped = open_mmap(path).map_err(|x| read(x.to_string()))?;
    let file = &mapped.file;
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
    if file
        .tensor(crate::convert::tensor_map::ROPE_FREQS)
        .is_some()
    {
        return Err(GgufModelError::Unsupported {
            path: path.to_path_buf(),
            what: crate::convert::tensor_map::ROPE_FREQS.into(),
            reason: "per-frequency factors (llama3 scaling); verify with --backend llama.cpp"
                .into(),
        });
    }
    let tensors = read_hf_tensors(
        file,
        mapped.bytes(),
        &hp,
        crate::checkpoint::TensorDtype::F32,
    )
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
    let model = Llama::load(vb, &cfg).map_err(|x| read(x.to_string()))?;
    Ok(GgufModel {
        model,
        runtime,
        hparams: hp,
    })
}

/// The tokenizer a GGUF carries (`tokenizer.ggml.*`), rebuilt as a `tokenizers` tokenizer the way
/// `abf-convert from-gguf` rebuilds tokenizer.json.
pub struct GgufTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub add_bos: bool,
}

impl GgufTokenizer {
    pub fn load(path: &Path) -> Result<GgufTokenizer, GgufModelError> {
        let read = |reason: String| GgufModelError::Read {
            path: path.to_path_buf(),
            reason,
        };
        let mapped = open_mmap(path).map_err(|x| read(x.to_string()))?;
        let vocab = GgufVocab::read(&mapped.file.metadata)
            .map_err(|x| read(x.to_string()))?
            .ok_or_else(|| {
                read("no tokenizer.ggml.* keys: the file carries no tokenizer".into())
            })?;
        let (json, _, _) = vocab.to_hf().map_err(|x| read(x.to_string()))?;
        let bytes = serde_json::to_vec(&json).map_err(|x| read(x.to_string()))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|x| read(format!("rebuilt tokenizer: {x}")))?;
        Ok(GgufTokenizer {
            tokenizer,
            bos: vocab.bos,
            add_bos: vocab.add_bos.unwrap_or(false),
        })
    }

    /// Token ids of `text`, with BOS first when the file says `add_bos_token`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("tokenizing: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }
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
    type Err = String;
    fn from_str(s: &str) -> Result<BackendKind, String> {
        match s {
            "candle" => Ok(BackendKind::Candle),
            "llama.cpp" | "llamacpp" | "llama-cpp" => Ok(BackendKind::LlamaCpp),
            other => Err(format!(
                "unknown backend {other:?} (expected candle or llama.cpp)"
            )),
        }
    }
}

/// Whether `path` is a GGUF file (by its magic), as opposed to a model directory.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    if path.is_dir() {
        return false;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Open a model for logits: a model directory (candle, f32, the recipe of its config) or a GGUF
/// (candle, read as llama.cpp reads it; or llama.cpp itself).
pub fn open_backend(
    path: &Path,
    kind: BackendKind,
    device: &Device,
) -> anyhow::Result<Box<dyn LogitsBackend>> {
    if !path.exists() {
        anyhow::bail!("{}: no such file or directory", path.display());
    }
    let gguf = is_gguf(path);
    match (kind, gguf) {
        (BackendKind::Candle, false) => {
            let ckpt = Checkpoint::open(path)?;
            let model = Llama::load(ckpt.var_builder(DType::F32, device), &ckpt.config.model)
                .map_err(|e| anyhow::anyhow!("{}: loading: {e}", path.display()))?;
            Ok(Box::new(CandleBackend::new(model, "candle")))
        }
        (BackendKind::Candle, true) => {
            let m = load_gguf_model(path, device)?;
            Ok(Box::new(CandleBackend::new(m.model, "candle-gguf")))
        }
        (BackendKind::LlamaCpp, false) => anyhow::bail!(
            "{}: llama.cpp runs GGUF files, not model directories",
            path.display()
        ),
        (BackendKind::LlamaCpp, true) => open_llama_cpp(path),
    }
}

#[cfg(feature = "llamacpp")]
fn open_llama_cpp(path: &Path) -> anyhow::Result<Box<dyn LogitsBackend>> {
    Ok(Box::new(super::LlamaCpp::load(path)?))
}

#[cfg(not(feature = "llamacpp"))]
fn open_llama_cpp(path: &Path) -> anyhow::Result<Box<dyn LogitsBackend>> {
    anyhow::bail!(
        "{}: this build has no llama.cpp backend (rebuild with --features llamacpp)",
        path.display()
    )
}

/// Token ids of `text` for the model at `path`: a GGUF's embedded vocabulary, or a model
/// directory's tokenizer files (BOS added when the tokenizer config says so, in both cases).
pub fn tokenize_for(path: &Path, text: &str) -> anyhow::Result<Vec<u32>> {
    if is_gguf(path) {
        let t = GgufTokenizer::load(path)?;
        Ok(t.encode(text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)
    } else {
        let ckpt = Checkpoint::open(path)?;
        crate::eval::logits::tokens_for(&ckpt, crate::eval::LogitsInput::Text(text))
    }
}
