//! GGUF -> Hugging Face checkpoint: every tensor dequantized (F32/F16/BF16 directly, block
//! types through `crate::quant`), q/k rows un-permuted, safetensors plus config.json (with the
//! `abf_recipe` block from `gguf::read_recipe`), tokenizer.json and tokenizer_config.json
//! rebuilt from the GGUF vocabulary. The directory is staged and renamed into place.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Map, Value as Json};

use super::error::ConvertError;
use super::numeric;
use super::permute::unpermute_qk;
use super::tensor_map::{gguf_to_hf, Role, ROPE_FREQS};
use super::tokenizer_gguf::GgufVocab;
use crate::checkpoint::keys as ck;
use crate::checkpoint::writer::{write_json, StagedDir};
use crate::checkpoint::{
    patch_config, HfConfig, ModelType, TensorData, TensorDtype, CONFIG_FILE, DEFAULT_SHARD_BYTES,
};
use crate::gguf::keys::{self, ArchKey};
use crate::gguf::{open_set, read_recipe, GgufSet, Metadata};
use crate::rope::{Recipe, Target};

/// The element type of the written safetensors.
pub type OutDtype = TensorDtype;

#[derive(Debug, Clone)]
pub struct FromGgufOptions {
    pub dtype: TensorDtype,
    /// Replace an existing non-empty output directory.
    pub force: bool,
}

impl Default for FromGgufOptions {
    fn default() -> Self {
        FromGgufOptions {
            dtype: TensorDtype::F32,
            force: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FromGgufReport {
    pub dir: PathBuf,
    pub tensors: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    pub recipe: Recipe,
    pub tied_embeddings: bool,
    pub notes: Vec<String>,
}

fn need_u32(meta: &Metadata, arch: &str, k: ArchKey) -> Result<u32, ConvertError> {
    meta.arch_u32(arch, k)?.ok_or_else(|| ConvertError::Key {
        key: k.key(arch),
        reason: "missing".into(),
    })
}

/// The LLaMA-family hyperparameters of a GGUF, read as llama.cpp reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHparams {
    /// `llama` or `mistral3`.
    pub arch: String,
    pub hidden: usize,
    pub layers: usize,
    pub ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
}

/// Read [`GgufHparams`]: `general.architecture` (llama or mistral3) and the `{arch}.*` shape keys
/// (`head_count_kv` defaults to `head_count`, the RMS epsilon to 1e-5, as in llama.cpp).
pub fn read_hparams(meta: &Metadata) -> Result<GgufHparams, ConvertError> {
    let arch = meta
        .architecture()?
        .ok_or_else(|| ConvertError::Key {
            key: keys::GENERAL_ARCHITECTURE.into(),
            reason: "missing".into(),
        })?
        .to_string();
    if arch != keys::ARCH_LLAMA && arch != keys::ARCH_MISTRAL3 {
        return Err(ConvertError::Model(format!(
            "architecture {arch:?}: abf reads llama and mistral3"
        )));
    }
    let hidden = need_u32(meta, &arch, ArchKey::EmbeddingLength)? as usize;
    let layers = need_u32(meta, &arch, ArchKey::BlockCount)? as usize;
    let ff = need_u32(meta, &arch, ArchKey::FeedForwardLength)? as usize;
    let heads = need_u32(meta, &arch, ArchKey::HeadCount)? as usize;
    let kv_heads = meta
        .arch_u32(&arch, ArchKey::HeadCountKv)?
        .map(|x| x as usize)
        .unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(ConvertError::Model(format!(
            "{hidden} embedding with {heads} heads / {kv_heads} kv heads"
        )));
    }
    let eps = meta
        .arch_f32(&arch, ArchKey::LayerNormRmsEpsilon)?
        .map(f64::from)
        .unwrap_or(1e-5);
    Ok(GgufHparams {
        head_dim: hidden / heads,
        arch,
        hidden,
        layers,
        ff,
        heads,
        kv_heads,
        eps,
    })
}

/// The tensors of a GGUF in Hugging Face layout (see [`read_hf_tensors`]).
pub struct HfTensors {
    /// Sorted by Hugging Face name; `rope_freqs.weight` is not among them.
    pub tensors: Vec<TensorData<'static>>,
    /// Rows of `token_embd.weight`.
    pub vocab_rows: Option<usize>,
    /// Whether `output.weight` is present (embeddings untied).
    pub has_output: bool,
    /// Bytes of tensor data read.
    pub input_bytes: u64,
}

/// Every LLaMA tensor of `set` (a file or every part of a split set) under its Hugging Face name, as
/// `dtype`: float types converted, block types dequantized through `crate::quant`, q/k rows
/// un-permuted (llama.cpp's interleaved pairs back to rotate-half).
pub fn read_hf_tensors(
    set: &GgufSet,
    hp: &GgufHparams,
    dtype: TensorDtype,
) -> Result<HfTensors, ConvertError> {
    let file = &set.file;
    let mut tensors: Vec<TensorData<'static>> = Vec::with_capacity(file.tensors.len());
    let mut vocab_rows = None;
    let mut has_output = false;
    let mut input_bytes = 0u64;
    for (i, t) in file.tensors.iter().enumerate() {
        if t.name == ROPE_FREQS {
            continue;
        }
        let (hf, role, _) = gguf_to_hf(&t.name).ok_or_else(|| ConvertError::UnknownGgufTensor {
            tensor: t.name.clone(),
        })?;
        let data = set
            .tensor_data(i)
            .ok_or_else(|| ConvertError::tensor(&t.name, "data outside the file"))?;
        input_bytes += data.len() as u64;
        let n = usize::try_from(t.elements())
            .map_err(|_| ConvertError::tensor(&t.name, "too many elements"))?;
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let converted: Vec<u8> = match numeric::float_dtype(t.ggml_type) {
            Some(from) => numeric::convert(from, dtype, data),
            None => {
                let f = numeric::dequantize(&t.name, t.ggml_type, data, n)?;
                numeric::from_f32(dtype, &f)
            }
        };
        let rows = shape.first().copied().unwrap_or(1);
        let converted = match role {
            Role::Q => unpermute_qk(&t.name, &converted, rows, hp.heads)?,
            Role::K => unpermute_qk(&t.name, &converted, rows, hp.kv_heads)?,
            _ => converted,
        };
        match role {
            Role::Embedding => vocab_rows = Some(rows),
            Role::Output => has_output = true,
            _ => {}
        }
        tensors.push(TensorData {
            name: hf,
            dtype,
            shape,
            data: Cow::Owned(converted),
        });
    }
    // the order transformers saves in: by name
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(HfTensors {
        tensors,
        vocab_rows,
        has_output,
        input_bytes,
    })
}

/// `rope_freqs.weight` as f32 (llama.cpp's per-frequency divisors), None when absent.
pub fn read_rope_freqs(set: &GgufSet) -> Result<Option<Vec<f32>>, ConvertError> {
    let file = &set.file;
    let Some(i) = file.tensors.iter().position(|t| t.name == ROPE_FREQS) else {
        return Ok(None);
    };
    let t = &file.tensors[i];
    let data = set
        .tensor_data(i)
        .ok_or_else(|| ConvertError::tensor(ROPE_FREQS, "data outside the file"))?;
    let n = usize::try_from(t.elements())
        .map_err(|_| ConvertError::tensor(ROPE_FREQS, "too many elements"))?;
    let f = match numeric::float_dtype(t.ggml_type) {
        Some(from) => numeric::to_f32(from, data),
        None => numeric::dequantize(ROPE_FREQS, t.ggml_type, data, n)?,
    };
    Ok(Some(f))
}

/// Convert `path` (a GGUF file, or the first part of a split set) into the directory `out`.
pub fn from_gguf(
    path: &Path,
    out: &Path,
    opts: &FromGgufOptions,
) -> Result<FromGgufReport, ConvertError> {
    let start = Instant::now();
    let set = open_set(path)?;
    let file = &set.file;
    let meta = &file.metadata;
    let mut notes = Vec::new();
    let hp = read_hparams(meta)?;
    let recipe = match read_recipe(meta)? {
        Some(r) => r,
        None => {
            return Err(ConvertError::Key {
                key: ArchKey::ContextLength.key(&hp.arch),
                reason: "missing: no recipe can be read".into(),
            })
        }
    };
    if file.tensor(ROPE_FREQS).is_some() && recipe.method != crate::rope::RopeMethod::Llama3 {
        notes.push(
            "rope_freqs.weight present but no abf.recipe keys: its llama3 factors are not \
             carried into config.json"
                .into(),
        );
    }

    // tensors
    let read = read_hf_tensors(&set, &hp, opts.dtype)?;
    let tensors = read.tensors;
    let (vocab_rows, has_output, input_bytes) =
        (read.vocab_rows, read.has_output, read.input_bytes);
    let vocab = GgufVocab::read(meta)?;
    let vocab_size = meta
        .arch_u32(&hp.arch, ArchKey::VocabSize)?
        .map(|v| v as usize)
        .or(vocab_rows)
        .or(vocab.as_ref().map(|v| v.tokens.len()))
        .ok_or_else(|| ConvertError::Model("no vocabulary size".into()))?;

    let fields = ConfigFields {
        hp: &hp,
        vocab_size,
        tied: !has_output,
        vocab: vocab.as_ref(),
        dtype: opts.dtype,
    };
    let config = hf_config(&fields, &recipe, &out.join(CONFIG_FILE), &mut notes)?;

    // write: stage beside the target; with --force an existing directory is moved aside and
    // removed only once the new one is in place
    let aside = aside_path(out, opts.force)?;
    let staged = StagedDir::create(&staged_target(out, aside.is_some()))?;
    let files =
        crate::checkpoint::write_safetensors(staged.path(), &tensors, DEFAULT_SHARD_BYTES, false)?;
    write_json(&staged.path().join(CONFIG_FILE), &config, false)?;
    if let Some(v) = &vocab {
        let (tj, tc, tnotes) = v.to_hf()?;
        notes.extend(tnotes);
        write_json(&staged.path().join("tokenizer.json"), &tj, false)?;
        write_json(&staged.path().join("tokenizer_config.json"), &tc, false)?;
    } else {
        notes.push("the GGUF has no tokenizer: none written".into());
    }
    let output_bytes = files
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let staged_dir = staged.commit()?;
    let dir = match &aside {
        Some(old) => replace_dir(out, old, &staged_dir)?,
        None => staged_dir,
    };
    Ok(FromGgufReport {
        dir,
        tensors: tensors.len(),
        input_bytes,
        output_bytes,
        seconds: start.elapsed().as_secs_f64(),
        recipe,
        tied_embeddings: !has_output,
        notes,
    })
}

/// What config.json says about the model besides the recipe.
struct ConfigFields<'a> {
    hp: &'a GgufHparams,
    vocab_size: usize,
    /// Whether the head is the embedding.
    tied: bool,
    vocab: Option<&'a GgufVocab>,
    dtype: TensorDtype,
}

/// config.json: LLaMA fields, the transformers form of the recipe, and our exact block. Notes
/// the transformers fields that only approximate the recipe.
fn hf_config(
    f: &ConfigFields,
    recipe: &Recipe,
    config_path: &Path,
    notes: &mut Vec<String>,
) -> Result<Json, ConvertError> {
    let hp = f.hp;
    let dtype_name = match f.dtype {
        TensorDtype::F32 => "float32",
        TensorDtype::F16 => "float16",
        TensorDtype::BF16 => "bfloat16",
    };
    let mut cfg = Map::new();
    let mut put = |k: &str, v: Json| cfg.insert(k.into(), v);
    put(ck::ARCHITECTURES, json!([ModelType::Llama.architecture()]));
    put(ck::MODEL_TYPE, json!(ModelType::Llama.name()));
    put(ck::HIDDEN_ACT, json!("silu"));
    put(ck::HIDDEN_SIZE, json!(hp.hidden));
    put(ck::INTERMEDIATE_SIZE, json!(hp.ff));
    put(ck::NUM_HIDDEN_LAYERS, json!(hp.layers));
    put(ck::NUM_ATTENTION_HEADS, json!(hp.heads));
    put(ck::NUM_KEY_VALUE_HEADS, json!(hp.kv_heads));
    put(ck::HEAD_DIM, json!(hp.head_dim));
    put(ck::RMS_NORM_EPS, json!(hp.eps));
    put(ck::VOCAB_SIZE, json!(f.vocab_size));
    put(ck::MAX_POSITION_EMBEDDINGS, json!(recipe.context));
    put(ck::ROPE_THETA, json!(recipe.rope_base));
    put(ck::TIE_WORD_EMBEDDINGS, json!(f.tied));
    put(ck::ATTENTION_BIAS, json!(false));
    put(ck::MLP_BIAS, json!(false));
    if let Some(v) = f.vocab {
        if let Some(b) = v.bos {
            put(ck::BOS_TOKEN_ID, json!(b));
        }
        if let Some(e) = v.eos {
            put(ck::EOS_TOKEN_ID, json!(e));
        }
    }
    put(ck::TORCH_DTYPE, json!(dtype_name));
    let plain = HfConfig::from_value(config_path, Json::Object(cfg))?;
    // the exact form: transformers' fields for what it can run, our block for the rest
    let patched = patch_config(&plain, recipe, Target::Exact, true)?;
    notes.extend(
        patched
            .approximations
            .iter()
            .map(|g| format!("config.json: transformers will not apply: {g}")),
    );
    let config = patched.config;
    Ok(Json::Object(config))
}

/// Where an existing non-empty `out` is moved aside while the new one takes its place (None when
/// there is nothing to replace); an error when there is and `force` is off.
fn aside_path(out: &Path, force: bool) -> Result<Option<PathBuf>, ConvertError> {
    let non_empty = out.is_dir()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
    if non_empty && !force {
        return Err(ConvertError::Io {
            path: out.to_path_buf(),
            reason: "output directory exists and is not empty (use --force to replace it)".into(),
        });
    }
    Ok(non_empty.then(|| {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        out.with_file_name(format!(".{name}.old.{}", std::process::id()))
    }))
}

/// Move `out` to `old`, `staged` to `out` (moving `old` back if that fails), then remove `old`.
fn replace_dir(out: &Path, old: &Path, staged: &Path) -> Result<PathBuf, ConvertError> {
    let io = |e: std::io::Error| ConvertError::Io {
        path: out.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::rename(out, old).map_err(io)?;
    if let Err(e) = std::fs::rename(staged, out) {
        let _ = std::fs::rename(old, out);
        return Err(io(e));
    }
    std::fs::remove_dir_all(old).map_err(io)?;
    Ok(out.to_path_buf())
}

/// Where to stage: the target itself, or (when it will replace an existing directory) a
/// sibling renamed over it at the end.
fn staged_target(out: &Path, replacing: bool) -> PathBuf {
    if !replacing {
        return out.to_path_buf();
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!(".{name}.new.{}", std::process::id()))
}
