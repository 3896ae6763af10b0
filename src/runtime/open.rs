//! The one way in to a model: a checkpoint directory or a GGUF file, by path, opened as a
//! [`LogitsBackend`] on an engine (our candle forward, or llama.cpp), with its tokenizer
//! ([`Encoder`]) and the pretraining window of its recipe; or a checkpoint directory opened as
//! our [`Llama`] for measurements inside the model (entropy, the verifier's reference).
//!
//! Everything that tokenizes a text for a model or loads a model from disk goes through here,
//! so the BOS rule and the engine/path rules exist once.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::backend::{CandleBackend, LogitsBackend};
use super::error::RuntimeError;
use super::gguf_candle::{load_gguf_model, BackendKind};
use crate::checkpoint::{Checkpoint, ModelConfig, TokenizerFiles};
use crate::convert::tokenizer_gguf::GgufVocab;
use crate::gguf::recipe::read_recipe;
use crate::gguf::{open_set, Metadata};
use crate::model::Llama;

/// What a model path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSource {
    /// A checkpoint directory: config.json, safetensors weights, tokenizer files.
    Dir,
    /// One GGUF file, or the first part of a split set (`name-00001-of-0000N.gguf`): every
    /// opener below reads it through `gguf::open_set`, which finds and checks the other parts,
    /// and llama.cpp loads the set from the same path.
    Gguf,
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

/// What `path` holds, or why it is not a model.
pub fn model_source(path: &Path) -> Result<ModelSource, RuntimeError> {
    if !path.exists() {
        return Err(RuntimeError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        Ok(ModelSource::Dir)
    } else if is_gguf(path) {
        Ok(ModelSource::Gguf)
    } else {
        Err(RuntimeError::NotAModel {
            path: path.to_path_buf(),
        })
    }
}

/// Text to token ids with a model's tokenizer: no special tokens from the tokenizer's own
/// post-processor, and BOS first when the model says so (`add_bos_token` in
/// tokenizer_config.json, as transformers' `LlamaTokenizer` does; `tokenizer.ggml.add_bos_token`
/// in a GGUF), which keeps one rule for every tokenizer.
pub struct Encoder {
    pub tokenizer: tokenizers::Tokenizer,
    /// Prepended to every encoded text when set.
    pub bos: Option<u32>,
    /// Where the tokenizer came from, for error messages.
    pub source: PathBuf,
}

impl Encoder {
    /// The tokenizer of the model at `path`: a directory's tokenizer files or the vocabulary a
    /// GGUF carries.
    pub fn open(path: &Path) -> Result<Encoder, RuntimeError> {
        match model_source(path)? {
            ModelSource::Dir => Encoder::from_checkpoint(&Checkpoint::open(path)?),
            ModelSource::Gguf => {
                let mapped = open_set(path).map_err(|e| gguf_err(path, e))?;
                Encoder::from_gguf(path, &mapped.file.metadata)
            }
        }
    }

    /// The tokenizer files of an opened checkpoint directory.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Encoder, RuntimeError> {
        Ok(Encoder::from_files(
            ckpt.tokenizer()?,
            ckpt.config.model.bos_token_id,
            &ckpt.dir,
        ))
    }

    /// Tokenizer files already read from `source` (a model directory, or a tokenizer being
    /// built), with the model's BOS id (`bos_token_id` of config.json), added when the files say.
    pub fn from_files(files: TokenizerFiles, bos_token_id: Option<u32>, source: &Path) -> Encoder {
        let bos = if files.config.add_bos_token.unwrap_or(false) {
            bos_token_id
        } else {
            None
        };
        Encoder {
            tokenizer: files.tokenizer,
            bos,
            source: source.to_path_buf(),
        }
    }

    /// The `tokenizer.ggml.*` vocabulary of the GGUF at `path` (metadata `meta`), rebuilt as a
    /// `tokenizers` tokenizer the way `abf-convert from-gguf` rebuilds tokenizer.json.
    pub fn from_gguf(path: &Path, meta: &Metadata) -> Result<Encoder, RuntimeError> {
        let err = |reason: String| RuntimeError::Tokenizer {
            path: path.to_path_buf(),
            reason,
        };
        let vocab = GgufVocab::read(meta)
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err("no tokenizer.ggml.* keys: the file carries no tokenizer".into()))?;
        let (json, _, _) = vocab.to_hf().map_err(|e| err(e.to_string()))?;
        let bytes = serde_json::to_vec(&json).map_err(|e| err(e.to_string()))?;
        let tokenizer = crate::checkpoint::tokenizer::tokenizer_from_bytes(&bytes)
            .map_err(|e| err(format!("rebuilt tokenizer: {e}")))?;
        Ok(Encoder {
            tokenizer,
            bos: if vocab.add_bos.unwrap_or(false) {
                vocab.bos
            } else {
                None
            },
            source: path.to_path_buf(),
        })
    }

    /// Token ids of `text` without BOS.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, RuntimeError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| RuntimeError::Tokenize {
                path: self.source.clone(),
                reason: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text`, BOS first when the model adds one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, RuntimeError> {
        let mut ids = self.encode_plain(text)?;
        if let Some(bos) = self.bos {
            ids.insert(0, bos);
        }
        Ok(ids)
    }
}

/// A model opened for logits, with its tokenizer.
pub struct OpenModel {
    pub path: PathBuf,
    pub backend: Box<dyn LogitsBackend>,
    pub encoder: Encoder,
    /// The pretraining window c of the model's recipe (for position bands).
    pub original_context: u64,
}

/// A checkpoint directory loaded as our forward, with its tokenizer.
pub struct ModelDir {
    pub path: PathBuf,
    pub model: Llama,
    pub encoder: Encoder,
    pub original_context: u64,
}

/// Open `path` for logits with its tokenizer: a model directory runs on our candle forward in
/// `dtype` on `device`; a GGUF runs on `engine` (our candle reading of it as llama.cpp reads it,
/// in f32, or llama.cpp itself) with the tokenizer the file carries.
pub fn open_model(
    path: &Path,
    engine: BackendKind,
    dtype: DType,
    device: &Device,
) -> Result<OpenModel, RuntimeError> {
    match model_source(path)? {
        ModelSource::Dir => {
            need_candle(path, engine)?;
            let dir = open_dir(path, dtype, device)?;
            let name = format!("candle {}", path.display());
            Ok(OpenModel {
                path: dir.path,
                backend: Box::new(CandleBackend::new(dir.model, name)),
                encoder: dir.encoder,
                original_context: dir.original_context,
            })
        }
        ModelSource::Gguf => {
            let (encoder, original_context) = {
                let mapped = open_set(path).map_err(|e| gguf_err(path, e))?;
                let meta = &mapped.file.metadata;
                (
                    Encoder::from_gguf(path, meta)?,
                    gguf_original_context(path, meta)?,
                )
            };
            Ok(OpenModel {
                path: path.to_path_buf(),
                backend: gguf_backend(path, engine, device)?,
                encoder,
                original_context,
            })
        }
    }
}

/// Open `path` for logits only (no tokenizer): a model directory on candle in f32 with the
/// recipe of its config, or a GGUF on `engine`.
pub fn open_backend(
    path: &Path,
    engine: BackendKind,
    device: &Device,
) -> Result<Box<dyn LogitsBackend>, RuntimeError> {
    match model_source(path)? {
        ModelSource::Dir => {
            need_candle(path, engine)?;
            let ckpt = Checkpoint::open(path)?;
            let model = load_llama(&ckpt, &ckpt.config.model, DType::F32, device)?;
            Ok(Box::new(CandleBackend::new(model, "candle")))
        }
        ModelSource::Gguf => gguf_backend(path, engine, device),
    }
}

/// Load a checkpoint directory as our forward in `dtype` on `device`, with its tokenizer.
pub fn open_dir(path: &Path, dtype: DType, device: &Device) -> Result<ModelDir, RuntimeError> {
    match model_source(path)? {
        ModelSource::Dir => {}
        ModelSource::Gguf => {
            return Err(RuntimeError::GgufInput {
                path: path.to_path_buf(),
            })
        }
    }
    let ckpt = Checkpoint::open(path)?;
    let model = load_llama(&ckpt, &ckpt.config.model, dtype, device)?;
    Ok(ModelDir {
        path: path.to_path_buf(),
        model,
        encoder: Encoder::from_checkpoint(&ckpt)?,
        original_context: ckpt.config.model.recipe.original_context,
    })
}

/// A model directory (in `dtype`) or a GGUF file (in f32, as llama.cpp reads its keys) as our
/// forward on `device`, with its tokenizer: for measurements inside the model of either form
/// (the importance matrix).
pub fn open_forward(path: &Path, dtype: DType, device: &Device) -> Result<ModelDir, RuntimeError> {
    match model_source(path)? {
        ModelSource::Dir => open_dir(path, dtype, device),
        ModelSource::Gguf => {
            let encoder = Encoder::open(path)?;
            let m = load_gguf_model(path, device)?;
            Ok(ModelDir {
                path: path.to_path_buf(),
                original_context: m.runtime.recipe.original_context,
                model: m.model,
                encoder,
            })
        }
    }
}

/// The weights of `ckpt` as our forward under `cfg`: its own config, or one whose recipe the
/// caller replaced (the verifier's runtime form, `abf-eval logits`' recipe flags).
pub fn load_llama(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<Llama, RuntimeError> {
    Llama::load(ckpt.var_builder(dtype, device), cfg).map_err(|source| RuntimeError::Model {
        path: ckpt.dir.clone(),
        source,
    })
}

/// The pretraining window of the model at `path`: a directory's config recipe, or for a GGUF
/// our exact `abf.recipe.*` keys when present, else what the runtime keys say (for a plain
/// llama file, its context length).
pub fn original_context(path: &Path) -> Result<u64, RuntimeError> {
    match model_source(path)? {
        ModelSource::Dir => Ok(Checkpoint::open(path)?.config.model.recipe.original_context),
        ModelSource::Gguf => {
            let mapped = open_set(path).map_err(|e| gguf_err(path, e))?;
            gguf_original_context(path, &mapped.file.metadata)
        }
    }
}

fn gguf_original_context(path: &Path, meta: &Metadata) -> Result<u64, RuntimeError> {
    // our record when present, else what llama.cpp runs from its keys (gguf::read_recipe)
    read_recipe(meta)
        .map_err(|e| gguf_err(path, e))?
        .map(|r| r.original_context)
        .ok_or_else(|| RuntimeError::Recipe {
            path: path.to_path_buf(),
            reason: "no architecture or context length: no recipe can be read".into(),
        })
}

fn need_candle(path: &Path, engine: BackendKind) -> Result<(), RuntimeError> {
    match engine {
        BackendKind::Candle => Ok(()),
        other => Err(RuntimeError::EngineNeedsGguf {
            path: path.to_path_buf(),
            engine: other.name(),
        }),
    }
}

fn gguf_backend(
    path: &Path,
    engine: BackendKind,
    device: &Device,
) -> Result<Box<dyn LogitsBackend>, RuntimeError> {
    match engine {
        BackendKind::Candle => {
            let m = load_gguf_model(path, device)?;
            Ok(Box::new(CandleBackend::new(m.model, "candle-gguf")))
        }
        BackendKind::LlamaCpp => open_llama_cpp(path),
    }
}

#[cfg(feature = "llamacpp")]
fn open_llama_cpp(path: &Path) -> Result<Box<dyn LogitsBackend>, RuntimeError> {
    // llama.cpp finds a split set's parts itself, but says only "failed to load" of a missing
    // or mismatched one: check the set first for an error that names the part
    drop(open_set(path).map_err(|e| gguf_err(path, e))?);
    Ok(Box::new(super::LlamaCpp::load(path)?))
}

#[cfg(not(feature = "llamacpp"))]
fn open_llama_cpp(path: &Path) -> Result<Box<dyn LogitsBackend>, RuntimeError> {
    Err(RuntimeError::NoLlamaCpp {
        path: path.to_path_buf(),
    })
}

fn gguf_err(path: &Path, source: crate::gguf::GgufError) -> RuntimeError {
    RuntimeError::Gguf {
        path: path.to_path_buf(),
        source,
    }
}
