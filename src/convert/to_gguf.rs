//! Checkpoint -> GGUF for llama.cpp: tensor names and q/k permutation as llama.cpp's converter
//! writes them, every hyperparameter key with the type llama.cpp requires, the recipe through
//! `gguf::apply_recipe` (Llama 3 factors as the `rope_freqs.weight` tensor), the tokenizer, and
//! per-tensor types from `quant_plan`. Streaming: one tensor at a time from the mapped
//! safetensors to the atomic output, one file or llama.cpp's split parts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::error::ConvertError;
use super::numeric;
use super::permute::permute_qk;
use super::quant_plan::{choose_type, OutType, PlanContext};
use super::tensor_map::{gguf_to_hf, hf_index, hf_to_gguf, Role, ROPE_FREQS};
use super::tokenizer_gguf::vocab_from_dir;
use crate::checkpoint::{Checkpoint, TensorDtype};
use crate::gguf::keys::{self, ArchKey};
use crate::gguf::{
    apply_recipe_with_freq_factors, plan_parts, write_parts, GgmlType, Metadata, SplitLimits,
    TensorSpec, Value,
};
use crate::rope::{base_inv_freq, Recipe, RopeMethod, Target};

/// Per-column importance by GGUF weight name (`abf::imatrix::ImportanceMatrix::weights`):
/// llama.cpp's importance matrix, each sum divided by its count.
pub type ImportanceWeights = BTreeMap<String, Vec<f32>>;

/// What to convert to.
#[derive(Debug, Clone)]
pub struct ToGgufOptions {
    pub outtype: OutType,
    /// llama.cpp (its keys only) or exact (its keys plus our `abf.recipe.*` record).
    pub runtime: Target,
    /// The recipe to write (None: the checkpoint's own).
    pub recipe: Option<Recipe>,
    pub allow_approximate: bool,
    /// `tokenizer.ggml.pre` to write instead of the recognised one.
    pub tokenizer_pre: Option<String>,
    /// `general.name` (default: config `_name_or_path`, else the directory name).
    pub name: Option<String>,
    /// Importance weights for the k-quants that take them (None: plain quantization).
    pub imatrix: Option<Arc<ImportanceWeights>>,
}

impl Default for ToGgufOptions {
    fn default() -> Self {
        ToGgufOptions {
            outtype: OutType::F16,
            runtime: Target::LlamaCpp,
            recipe: None,
            allow_approximate: false,
            tokenizer_pre: None,
            name: None,
            imatrix: None,
        }
    }
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    /// The checkpoint tensor it comes from (None for `rope_freqs.weight`).
    pub source: Option<String>,
    /// GGUF order (fastest first).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub bytes: u64,
    /// Heads to permute the rows for (q: n_head, k: n_head_kv).
    pub permute_heads: Option<usize>,
    /// Why the type differs from the output type's rule, when it fell back.
    pub note: Option<String>,
    /// Per-column importance weights the quantizer takes (the type has a weighted kernel and
    /// the importance matrix has the tensor).
    pub importance: Option<Vec<f32>>,
}

/// Everything to write, decided before any tensor is read.
#[derive(Debug, Clone)]
pub struct Plan {
    pub metadata: Metadata,
    pub tensors: Vec<PlannedTensor>,
    /// The recipe written (after the flags).
    pub recipe: Recipe,
    pub notes: Vec<String>,
    /// What the user should look at: tensors missing from the importance matrix.
    pub warnings: Vec<String>,
    /// Bytes of checkpoint tensors read.
    pub input_bytes: u64,
    /// Llama 3 frequency factors (`rope_freqs.weight`).
    pub rope_freqs: Option<Vec<f32>>,
}

impl Plan {
    pub fn output_tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}

/// What writing did.
#[derive(Debug, Clone, PartialEq)]
pub struct ToGgufReport {
    pub tensors: usize,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    /// The files written: `out`, or the parts of a split set, the first first.
    pub parts: Vec<PathBuf>,
}

impl ToGgufReport {
    /// Input bytes per second, in GB/s.
    pub fn gb_per_s(&self) -> f64 {
        self.input_bytes as f64 / self.seconds.max(1e-9) / 1e9
    }
}

/// llama.cpp's converter skips these (recomputed at run time).
fn skipped(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Order: embedding, blocks in table order, final norm, head (as llama.cpp's converter emits a
/// LLaMA checkpoint).
fn order_key(name: &str) -> (usize, usize, usize) {
    match hf_to_gguf(name) {
        Some((_, _, Some(b))) => (1, b, table_index(name)),
        Some((_, Role::Embedding, None)) => (0, 0, 0),
        Some((_, Role::Norm, None)) => (2, 0, 0),
        Some(_) => (3, 0, 0),
        None => (4, 0, 0),
    }
}

fn table_index(name: &str) -> usize {
    hf_index(name).unwrap_or(usize::MAX)
}

/// Write the recipe keys (`gguf::apply_recipe_with_freq_factors`: the runtime form from
/// `rope::runtime_form`). Llama 3's band factors go into `rope_freqs.weight`: the factor
/// llama.cpp divides each frequency by, plain / llama3 inverse frequency, as
/// `convert_hf_to_gguf.py` computes it.
fn write_recipe(
    meta: &mut Metadata,
    recipe: &Recipe,
    head_dim: usize,
    opts: &ToGgufOptions,
) -> Result<(Vec<String>, Option<Vec<f32>>), ConvertError> {
    let freqs = (recipe.method == RopeMethod::Llama3).then(|| {
        let plain = base_inv_freq(recipe.rope_base, head_dim);
        let l3 = recipe.inv_freq(head_dim, None);
        plain
            .iter()
            .zip(&l3)
            .map(|(p, q)| (p / q) as f32)
            .collect::<Vec<f32>>()
    });
    let notes = apply_recipe_with_freq_factors(meta, recipe, opts.runtime, opts.allow_approximate)?;
    Ok((notes, freqs))
}

/// Decide the output: metadata, tensor list and types.
pub fn plan_to_gguf(ckpt: &Checkpoint, opts: &ToGgufOptions) -> Result<Plan, ConvertError> {
    let cfg = &ckpt.config.model;
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        return Err(ConvertError::Model(format!(
            "head_dim {} x {} heads != hidden_size {}: llama.cpp would need attention.key_length, \
             which this converter does not write",
            cfg.head_dim, cfg.num_attention_heads, cfg.hidden_size
        )));
    }
    let recipe = match &opts.recipe {
        Some(r) => {
            r.validate()?;
            r.clone()
        }
        None => cfg.recipe.clone(),
    };
    let (meta, mut notes, rope_freqs) = plan_metadata(ckpt, &recipe, opts)?;
    let (mut tensors, input_bytes) = plan_tensors(ckpt, opts, rope_freqs.as_deref(), &mut notes)?;
    let warnings = match &opts.imatrix {
        Some(w) => plan_importance(&mut tensors, w, &mut notes)?,
        None => Vec::new(),
    };
    Ok(Plan {
        metadata: meta,
        tensors,
        recipe,
        notes,
        warnings,
        input_bytes,
        rope_freqs,
    })
}

/// `general.name`: the flag, else config `_name_or_path`, else the directory name.
fn model_name(ckpt: &Checkpoint, opts: &ToGgufOptions) -> String {
    opts.name.clone().unwrap_or_else(|| {
        ckpt.config
            .raw
            .get(crate::checkpoint::keys::NAME_OR_PATH)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| {
                ckpt.dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            })
    })
}

/// The planned metadata, the notes, and Llama 3's frequency factors (`rope_freqs.weight`).
type PlannedMetadata = (Metadata, Vec<String>, Option<Vec<f32>>);

/// The metadata: hyperparameters, tokenizer, recipe keys; with the notes and Llama 3's factors.
fn plan_metadata(
    ckpt: &Checkpoint,
    recipe: &Recipe,
    opts: &ToGgufOptions,
) -> Result<PlannedMetadata, ConvertError> {
    let cfg = &ckpt.config.model;
    let arch = keys::ARCH_LLAMA;
    let mut meta = Metadata::new();
    meta.set_architecture(arch);
    meta.set(keys::GENERAL_NAME, Value::string(model_name(ckpt, opts)));
    let u32s = [
        (ArchKey::EmbeddingLength, cfg.hidden_size),
        (ArchKey::BlockCount, cfg.num_hidden_layers),
        (ArchKey::FeedForwardLength, cfg.intermediate_size),
        (ArchKey::HeadCount, cfg.num_attention_heads),
        (ArchKey::HeadCountKv, cfg.num_key_value_heads),
        (ArchKey::RopeDimensionCount, cfg.head_dim),
    ];
    meta.set_context_length(arch, recipe.context)?;
    for (k, v) in u32s {
        meta.set_arch_u32(arch, k, v as u64)?;
    }
    meta.set_arch_number(arch, ArchKey::LayerNormRmsEpsilon, cfg.rms_norm_eps)?;

    // tokenizer first: its token count is vocab_size
    let (vocab, mut notes) = vocab_from_dir(
        &ckpt.dir,
        cfg.vocab_size,
        (cfg.bos_token_id, cfg.eos_token_id),
        opts.tokenizer_pre.as_deref(),
    )?;
    meta.set_arch_u32(arch, ArchKey::VocabSize, vocab.tokens.len() as u64)?;
    meta.set_rope_freq_base(arch, recipe.rope_base)?;
    let (rnotes, rope_freqs) = write_recipe(&mut meta, recipe, cfg.head_dim, opts)?;
    notes.extend(rnotes);
    meta.set(
        keys::GENERAL_FILE_TYPE,
        Value::U32(opts.outtype.file_type()),
    );
    meta.set(keys::GENERAL_QUANTIZATION_VERSION, Value::U32(2));
    meta.set_alignment(keys::DEFAULT_ALIGNMENT as u32)?;
    vocab.write(&mut meta);
    Ok((meta, notes, rope_freqs))
}

/// The tensors in llama.cpp's order with their types and sizes; the input bytes they read.
fn plan_tensors(
    ckpt: &Checkpoint,
    opts: &ToGgufOptions,
    rope_freqs: Option<&[f32]>,
    notes: &mut Vec<String>,
) -> Result<(Vec<PlannedTensor>, u64), ConvertError> {
    let cfg = &ckpt.config.model;
    let store = &ckpt.weights;
    let mut names: Vec<&str> = store.names().filter(|n| !skipped(n)).collect();
    let has_lm_head = names.contains(&"lm_head.weight");
    if cfg.tie_word_embeddings && has_lm_head {
        notes.push("tie_word_embeddings: lm_head.weight is not written".into());
        names.retain(|n| *n != "lm_head.weight");
    }
    names.sort_by_key(|n| order_key(n));
    let ctx = PlanContext {
        n_layer: cfg.num_hidden_layers,
        n_gqa: cfg.num_attention_heads / cfg.num_key_value_heads.max(1),
        has_output: has_lm_head && !cfg.tie_word_embeddings,
    };
    let mut tensors = Vec::with_capacity(names.len() + 1);
    if let Some(f) = rope_freqs {
        tensors.push(PlannedTensor {
            name: ROPE_FREQS.to_string(),
            source: None,
            dims: vec![f.len() as u64],
            ggml_type: crate::gguf::types::F32.ty(),
            bytes: 4 * f.len() as u64,
            permute_heads: None,
            note: None,
            importance: None,
        });
    }
    let mut input_bytes = 0u64;
    for n in names {
        let (gname, role, layer) = hf_to_gguf(n).ok_or_else(|| ConvertError::UnknownHfTensor {
            tensor: n.to_string(),
        })?;
        let shape = store.shape(n)?;
        input_bytes += store.tensor_view(n)?.data.len() as u64;
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let row_len = dims.first().copied().unwrap_or(1);
        let (ty, note) = choose_type(opts.outtype, role, dims.len(), row_len, layer, &ctx);
        let elements: u64 = dims.iter().product();
        let bytes = ty
            .byte_size(elements)
            .ok_or_else(|| ConvertError::tensor(n, format!("{dims:?} has no whole {ty} blocks")))?;
        let permute_heads = match role {
            Role::Q => Some(cfg.num_attention_heads),
            Role::K => Some(cfg.num_key_value_heads),
            _ => None,
        };
        tensors.push(PlannedTensor {
            name: gname,
            source: Some(n.to_string()),
            dims,
            ggml_type: ty,
            bytes,
            permute_heads,
            note,
            importance: None,
        });
    }
    Ok((tensors, input_bytes))
}

/// Attach importance weights to the tensors whose type takes them (llama.cpp's quantize looks
/// them up by GGUF name; q/k row permutation leaves the input columns alone). A matrix entry
/// whose column count differs from the tensor's rows is an error naming the tensor; a tensor
/// that would take weights but has none is quantized plainly with a warning. Returns the
/// warnings.
fn plan_importance(
    tensors: &mut [PlannedTensor],
    weights: &ImportanceWeights,
    notes: &mut Vec<String>,
) -> Result<Vec<String>, ConvertError> {
    let mut warnings = Vec::new();
    let mut unweighted = std::collections::BTreeSet::new();
    let has_output = tensors
        .iter()
        .any(|t| gguf_to_hf(&t.name).is_some_and(|(_, role, _)| role == Role::Output));
    for t in tensors.iter_mut() {
        let row_len = t.dims.first().copied().unwrap_or(1) as usize;
        let entry = weights.get(&t.name);
        if let Some(w) = entry {
            if t.dims.len() < 2 || w.len() != row_len {
                return Err(ConvertError::tensor(
                    &t.name,
                    format!(
                        "the importance matrix has {} columns, the tensor has dims {:?}",
                        w.len(),
                        t.dims
                    ),
                ));
            }
        }
        if t.dims.len() < 2 || numeric::float_dtype(t.ggml_type).is_some() {
            continue;
        }
        if !crate::quant::supports_weights(t.ggml_type) {
            if entry.is_some() {
                unweighted.insert(t.ggml_type.to_string());
            }
            continue;
        }
        match entry {
            Some(w) => t.importance = Some(w.clone()),
            // an untied embedding is only looked up, never multiplied: no matrix has it
            None if lookup_only(&t.name, has_output) => notes.push(format!(
                "{} is a lookup table, not in the importance matrix: plain {} quantization",
                t.name, t.ggml_type
            )),
            None => warnings.push(format!(
                "{} is not in the importance matrix: plain {} quantization",
                t.name, t.ggml_type
            )),
        }
    }
    if !unweighted.is_empty() {
        let types: Vec<String> = unweighted.into_iter().collect();
        notes.push(format!(
            "{} has no importance-weighted quantizer here: quantized without the matrix",
            types.join(", ")
        ));
    }
    Ok(warnings)
}

/// Whether `name` is the embedding of a model with a separate output head.
fn lookup_only(name: &str, has_output: bool) -> bool {
    has_output && gguf_to_hf(name).is_some_and(|(_, role, _)| role == Role::Embedding)
}

/// The bytes of one planned tensor, ready to write.
fn encode_tensor(ckpt: &Checkpoint, t: &PlannedTensor) -> Result<Vec<u8>, ConvertError> {
    let Some(src) = &t.source else {
        return Err(ConvertError::tensor(&t.name, "no source tensor"));
    };
    let view = ckpt.weights.tensor_view(src)?;
    let rows = view.shape.first().copied().unwrap_or(1);
    let permuted;
    let data: &[u8] = match t.permute_heads {
        Some(h) => {
            permuted = permute_qk(src, view.data, rows, h)?;
            &permuted
        }
        None => view.data,
    };
    match numeric::float_dtype(t.ggml_type) {
        Some(to) => Ok(numeric::convert(view.dtype, to, data)),
        None => encode_f32(t, &numeric::to_f32(view.dtype, data)),
    }
}

/// A tensor's source has been read for the last time: its mapped pages need not stay resident.
/// Returns its input bytes (for progress).
pub(crate) fn done_with_source(ckpt: &Checkpoint, t: &PlannedTensor) -> Result<u64, ConvertError> {
    match &t.source {
        Some(s) => {
            let n = ckpt.weights.tensor_view(s)?.data.len() as u64;
            ckpt.weights.release(s);
            Ok(n)
        }
        None => Ok(0),
    }
}

/// A planned tensor's source as f32 in GGUF row order (q/k rows permuted): what every output
/// type is encoded from when one read serves several (`convert::multi`).
pub(crate) fn source_f32(ckpt: &Checkpoint, t: &PlannedTensor) -> Result<Vec<f32>, ConvertError> {
    let Some(src) = &t.source else {
        return Err(ConvertError::tensor(&t.name, "no source tensor"));
    };
    let view = ckpt.weights.tensor_view(src)?;
    let rows = view.shape.first().copied().unwrap_or(1);
    let f = numeric::to_f32(view.dtype, view.data);
    match t.permute_heads {
        Some(h) => {
            let bytes = numeric::from_f32(TensorDtype::F32, &f);
            Ok(numeric::to_f32(
                TensorDtype::F32,
                &permute_qk(src, &bytes, rows, h)?,
            ))
        }
        None => Ok(f),
    }
}

/// `data` (f32, GGUF row order) encoded as the planned tensor's type.
pub(crate) fn encode_f32(t: &PlannedTensor, data: &[f32]) -> Result<Vec<u8>, ConvertError> {
    match numeric::float_dtype(t.ggml_type) {
        Some(to) => Ok(numeric::from_f32(to, data)),
        None => {
            let row_len = t.dims.first().copied().unwrap_or(1) as usize;
            match &t.importance {
                Some(w) => numeric::quantize_weighted(&t.name, t.ggml_type, data, row_len, w),
                None => numeric::quantize(&t.name, t.ggml_type, data, row_len),
            }
        }
    }
}

/// Write the plan to `out` (atomic; an existing file is replaced only with `force`).
/// `progress` is called with each tensor's input bytes as it is written.
pub fn write_gguf(
    ckpt: &Checkpoint,
    plan: &Plan,
    out: &Path,
    force: bool,
    progress: &dyn Fn(&str, u64),
) -> Result<ToGgufReport, ConvertError> {
    write_gguf_split(ckpt, plan, out, &SplitLimits::default(), force, progress)
}

/// Write the plan as llama.cpp's split layout under `limits` (`gguf::write_parts`: parts
/// `PREFIX-0000k-of-0000N.gguf` with PREFIX `out` less `.gguf`, or the plain file `out` when
/// everything fits one part), all parts or none.
pub fn write_gguf_split(
    ckpt: &Checkpoint,
    plan: &Plan,
    out: &Path,
    limits: &SplitLimits,
    force: bool,
    progress: &dyn Fn(&str, u64),
) -> Result<ToGgufReport, ConvertError> {
    let start = Instant::now();
    let specs = plan
        .tensors
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), t.dims.clone(), t.ggml_type))
        .collect::<Result<Vec<_>, _>>()?;
    let sizes: Vec<u64> = specs.iter().map(|s| s.size).collect();
    let groups = plan_parts(&sizes, plan.metadata.alignment()?, limits)?;
    let written = write_parts(out, &plan.metadata, &specs, &groups, force, |i| {
        let t = &plan.tensors[i];
        let bytes = match (&t.source, &plan.rope_freqs) {
            (None, Some(f)) => numeric::from_f32(TensorDtype::F32, f),
            _ => encode_tensor(ckpt, t)?,
        };
        progress(&t.name, done_with_source(ckpt, t)?);
        Ok::<_, ConvertError>(bytes)
    })?;
    Ok(ToGgufReport {
        tensors: plan.tensors.len(),
        input_bytes: plan.input_bytes,
        output_bytes: written.bytes,
        seconds: start.elapsed().as_secs_f64(),
        parts: written.paths,
    })
}
