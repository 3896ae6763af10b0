//! Opening what an evaluation runs: a model directory as a [`CandleBackend`] with its tokenizer.
//!
//! GGUF files open through the verifier's `abf::runtime::open_backend` (candle or llama.cpp); the
//! commands only see `&mut dyn LogitsBackend` and an [`Encoder`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};

use super::error::EvalError;
use crate::checkpoint::Checkpoint;
use crate::convert::read_hparams;
use crate::gguf::open_mmap;
use crate::gguf::recipe::read_recipe;
use crate::model::Llama;
use crate::runtime::{
    is_gguf, open_backend, runtime_recipe, BackendKind, CandleBackend, GgufTokenizer, LogitsBackend,
};

/// Text to token ids with a model's tokenizer: no special tokens from the tokenizer's own
/// post-processor, and BOS first when `tokenizer_config.json` says `add_bos_token: true` (as
/// transformers' `LlamaTokenizer` does), which keeps one rule for every tokenizer.
pub struct Encoder {
    pub tokenizer: tokenizers::Tokenizer,
    /// Prepended to every encoded text when set.
    pub bos: Option<u32>,
    /// Where the tokenizer came from, for error messages.
    pub source: PathBuf,
}

impl Encoder {
    /// Token ids of `text` without BOS.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EvalError::Tokenize {
                path: self.source.clone(),
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text`, BOS first when the model adds one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        let mut ids = self.encode_plain(text)?;
        if let Some(bos) = self.bos {
            ids.insert(0, bos);
        }
        Ok(ids)
    }
}

/// A model opened for evaluation through the logits interface only.
pub struct EvalModel {
    pub path: PathBuf,
    pub backend: Box<dyn LogitsBackend>,
    pub encoder: Encoder,
    /// The pretraining window c of the model's recipe (for position bands).
    pub original_context: u64,
}

/// A model directory loaded as our forward (for measurements inside the model: entropy).
pub struct ModelDir {
    pub path: PathBuf,
    pub model: Llama,
    pub encoder: Encoder,
    pub original_context: u64,
}

/// Open `path` as a logits backend with its tokenizer: a model directory runs on our candle
/// forward in `dtype` on `device`; a GGUF runs on `kind` (our candle reading of it as llama.cpp
/// reads it, in f32, or llama.cpp itself) with the tokenizer the file carries.
pub fn open_model(
    path: &Path,
    kind: BackendKind,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<EvalModel> {
    if is_gguf(path) {
        let backend = open_backend(path, kind, device)?;
        let tk = GgufTokenizer::load(path)?;
        return Ok(EvalModel {
            path: path.to_path_buf(),
            backend,
            encoder: Encoder {
                tokenizer: tk.tokenizer,
                bos: if tk.add_bos { tk.bos } else { None },
                source: path.to_path_buf(),
            },
            original_context: gguf_original_context(path)?,
        });
    }
    if kind != BackendKind::Candle {
        anyhow::bail!(
            "{}: the {kind} backend runs GGUF files; a model directory runs on candle",
            path.display()
        );
    }
    let dir = open_dir(path, dtype, device)?;
    let name = format!("candle {}", path.display());
    Ok(EvalModel {
        path: dir.path,
        backend: Box::new(CandleBackend::new(dir.model, name)),
        encoder: dir.encoder,
        original_context: dir.original_context,
    })
}

/// The pretraining window of a GGUF's model: our exact `abf.recipe.*` keys when present, else
/// what the runtime keys say (for a plain llama file, its context length).
fn gguf_original_context(path: &Path) -> anyhow::Result<u64> {
    let mapped = open_mmap(path)?;
    let meta = &mapped.file.metadata;
    if let Some(r) = read_recipe(meta)? {
        return Ok(r.original_context);
    }
    let hp = read_hparams(meta).with_context(|| format!("{}", path.display()))?;
    let rt = runtime_recipe(meta, hp.head_dim)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(rt.recipe.original_context)
}

/// Load a model directory (config.json, safetensors, tokenizer.json) as our forward in `dtype`
/// on `device`, with its tokenizer.
pub fn open_dir(path: &Path, dtype: DType, device: &Device) -> anyhow::Result<ModelDir> {
    if is_gguf(path) {
        return Err(EvalError::GgufInput {
            path: path.to_path_buf(),
        }
        .into());
    }
    if !path.is_dir() {
        return Err(EvalError::NotModelDir {
            path: path.to_path_buf(),
        }
        .into());
    }
    let ckpt = Checkpoint::open(path)?;
    let cfg = ckpt.config.model.clone();
    let model = Llama::load(ckpt.var_builder(dtype, device), &cfg)
        .with_context(|| format!("loading {}", path.display()))?;
    let tk = ckpt
        .tokenizer()
        .with_context(|| format!("{}: tokenizer", path.display()))?;
    let bos = if tk.config.add_bos_token.unwrap_or(false) {
        cfg.bos_token_id
    } else {
        None
    };
    Ok(ModelDir {
        path: path.to_path_buf(),
        model,
        encoder: Encoder {
            tokenizer: tk.tokenizer,
            bos,
            source: path.to_path_buf(),
        },
        original_context: cfg.recipe.original_context,
    })
}

/// Read a UTF-8 text file, naming it on error.
pub fn read_text(path: &Path) -> Result<String, EvalError> {
    std::fs::read_to_string(path).map_err(|source| EvalError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Up to `max` non-overlapping windows of exactly `length` tokens cut from the start of `ids`
/// (a text tokenized without BOS); with `bos` each window is BOS followed by `length - 1` text
/// tokens. `path` names the text in the error when not even one window fits.
pub fn windows(
    ids: &[u32],
    length: usize,
    max: usize,
    bos: Option<u32>,
    path: &Path,
) -> Result<Vec<Vec<u32>>, EvalError> {
    let body = length - usize::from(bos.is_some());
    if length < 2 || body == 0 {
        return Err(EvalError::BadValue {
            what: "length",
            message: format!("a window needs at least 2 tokens, got {length}"),
        });
    }
    let count = (ids.len() / body).min(max);
    if count == 0 {
        return Err(EvalError::TextTooShort {
            path: path.to_path_buf(),
            have: ids.len(),
            length,
            need: body,
        });
    }
    Ok(ids
        .chunks_exact(body)
        .take(count)
        .map(|chunk| bos.into_iter().chain(chunk.iter().copied()).collect())
        .collect())
}
