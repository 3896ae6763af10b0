//! The recipe <-> GGUF keys: what llama.cpp applies natively, and our exact record under
//! `abf.recipe.*` (field names and kinds from `abf::rope::FIELDS`).

use super::error::GgufError;
use super::keys::{self, ArchKey, ARCH_LLAMA, ARCH_MISTRAL3, RECIPE_ARCH_KEYS};
use super::metadata::Metadata;
use super::value::Value;
use crate::rope::{
    defaults, field_kind, runtime_form, yarn_mscale, FieldKind, FieldValue, Recipe, RopeMethod,
    ScaleLaw, Target, GGUF_PREFIX,
};

/// The rotary dimension: `{arch}.rope.dimension_count`, else `embedding_length / head_count`
/// (llama.cpp's default for `n_rot`).
pub fn rope_dim(meta: &Metadata, arch: &str) -> Result<Option<usize>, GgufError> {
    if let Some(d) = meta.arch_u32(arch, ArchKey::RopeDimensionCount)? {
        return Ok(Some(d as usize));
    }
    let e = meta.arch_u32(arch, ArchKey::EmbeddingLength)?;
    let h = meta.arch_u32(arch, ArchKey::HeadCount)?;
    Ok(match (e, h) {
        (Some(e), Some(h)) if h > 0 => Some((e / h) as usize),
        _ => None,
    })
}

fn refuse(msg: String) -> GgufError {
    GgufError::Refused(msg)
}

/// Write `recipe` into `meta` for `target` (llama.cpp: only what it reads; exact: that plus our
/// record under `abf.recipe.*`). Returns notes for the user (approximations, relabels).
///
/// The keys are those of [`runtime_form`]`(recipe, LlamaCpp)`. For `Target::LlamaCpp` a recipe
/// that is not exact is refused unless `allow_approximate`; the exact target never refuses (its
/// record is the recipe, the native keys its nearest runtime form, the notes say what differs).
/// Llama 3 is refused here: its factors live in the `rope_freqs.weight` tensor, which only
/// `to-gguf` writes ([`apply_recipe_with_freq_factors`]).
pub fn apply_recipe(
    meta: &mut Metadata,
    recipe: &Recipe,
    target: Target,
    allow_approximate: bool,
) -> Result<Vec<String>, GgufError> {
    if recipe.method == RopeMethod::Llama3 {
        return Err(refuse(
            "llama3 scaling lives in the rope_freqs.weight tensor, which patch-gguf does not \
             add; convert from the checkpoint instead"
                .into(),
        ));
    }
    apply_recipe_with_freq_factors(meta, recipe, target, allow_approximate)
}

/// [`apply_recipe`] for a writer that also writes `rope_freqs.weight` (Llama 3's factors).
pub fn apply_recipe_with_freq_factors(
    meta: &mut Metadata,
    recipe: &Recipe,
    target: Target,
    allow_approximate: bool,
) -> Result<Vec<String>, GgufError> {
    recipe.validate()?;
    if target == Target::Transformers {
        return Err(refuse(
            "a GGUF is run by llama.cpp: write it for llama.cpp or exact, not transformers".into(),
        ));
    }
    let arch = required_arch(meta)?;
    let dim = rope_dim(meta, &arch)?;
    if recipe.method == RopeMethod::Ntk && dim.is_none() {
        return Err(refuse(format!(
            "ntk needs the rotary dimension ({} or embedding_length / head_count)",
            ArchKey::RopeDimensionCount.key(&arch)
        )));
    }
    let form = runtime_form(recipe, Target::LlamaCpp, dim.unwrap_or(2));
    if target == Target::LlamaCpp {
        form.require_exact(allow_approximate)?;
    }
    let mut notes = form.notes();
    if recipe.method == RopeMethod::Ntk {
        notes.push(format!(
            "ntk written as freq_base {} (d = {})",
            form.recipe.rope_base,
            dim.unwrap_or(0)
        ));
    }
    if recipe.method == RopeMethod::Llama3 {
        notes.push("llama3 frequency factors written as rope_freqs.weight".into());
    }
    notes.extend(write_runtime_keys(meta, &arch, &form.recipe)?);
    let ours: Vec<String> = meta
        .keys()
        .filter(|k| k.starts_with(GGUF_PREFIX))
        .map(str::to_string)
        .collect();
    for k in ours {
        meta.remove(&k);
    }
    if target == Target::Exact {
        for (name, v) in recipe.to_fields() {
            let value = match v {
                FieldValue::Str(s) => Value::string(s),
                FieldValue::F64(x) => Value::F64(x),
                FieldValue::U64(x) => Value::U64(x),
            };
            meta.set(format!("{GGUF_PREFIX}{name}"), value);
        }
    }
    Ok(notes)
}

/// `general.architecture`, which every recipe key is named after.
fn required_arch(meta: &Metadata) -> Result<String, GgufError> {
    let arch = meta.architecture()?.ok_or_else(|| GgufError::MissingKey {
        key: keys::GENERAL_ARCHITECTURE.to_string(),
    })?;
    Ok(arch.to_string())
}

/// The `{arch}.rope.scaling.type` llama.cpp needs for a runtime-form method (static NTK and
/// dynamic arrive as default, Llama 3 as its `rope_freqs.weight` tensor).
pub fn scaling_type(method: RopeMethod) -> &'static str {
    match method {
        RopeMethod::Linear => keys::SCALING_LINEAR,
        RopeMethod::Yarn | RopeMethod::NtkByParts => keys::SCALING_YARN,
        _ => keys::SCALING_NONE,
    }
}

fn u32_key(arch: &str, key: ArchKey, v: u64) -> Result<Value, GgufError> {
    u32::try_from(v)
        .map(Value::U32)
        .map_err(|_| GgufError::BadValue {
            key: key.key(arch),
            value: v.to_string(),
            reason: "does not fit u32".into(),
        })
}

/// The keys llama.cpp reads for `run` (a runtime form: no log law, no exempt layers, NTK as its
/// base), relabelling a llama file to mistral3 for the step law. Keys of the recipe family that
/// `run` does not need are removed.
fn write_runtime_keys(
    meta: &mut Metadata,
    arch: &str,
    run: &Recipe,
) -> Result<Vec<String>, GgufError> {
    let mut notes = Vec::new();
    let mut arch = arch.to_string();
    if matches!(run.scale_law, ScaleLaw::Step { .. }) && arch != ARCH_MISTRAL3 {
        if arch != ARCH_LLAMA {
            return Err(refuse(format!(
                "the step scale law runs only in llama.cpp's mistral3 graph; a {arch:?} file \
                 cannot be relabelled"
            )));
        }
        meta.rename_arch(ARCH_MISTRAL3)?;
        notes.push(format!(
            "relabelled {ARCH_LLAMA} -> {ARCH_MISTRAL3}: only llama.cpp's mistral3 graph applies \
             the step scale law (tensors and RoPE are the same)"
        ));
        arch = ARCH_MISTRAL3.to_string();
    }
    let mut want: Vec<(ArchKey, Value)> = Vec::new();
    let s = run.factor;
    let f32v = |x: f64| Value::F32(x as f32);
    let orig = u32_key(
        &arch,
        ArchKey::RopeScalingOriginalContextLength,
        run.original_context,
    )?;
    match run.method {
        RopeMethod::Linear => {
            want.push((
                ArchKey::RopeScalingType,
                Value::string(scaling_type(run.method)),
            ));
            want.push((ArchKey::RopeScalingFactor, f32v(s)));
            want.push((ArchKey::RopeScalingOriginalContextLength, orig));
        }
        RopeMethod::Yarn | RopeMethod::NtkByParts => {
            want.push((
                ArchKey::RopeScalingType,
                Value::string(scaling_type(run.method)),
            ));
            want.push((ArchKey::RopeScalingFactor, f32v(s)));
            want.push((ArchKey::RopeScalingOriginalContextLength, orig));
            // ggml multiplies its own mscale 0.1 ln s + 1 by attn_factor
            let total = match run.method {
                RopeMethod::NtkByParts => Some(1.0),
                _ => run.yarn_attention_factor,
            };
            if let Some(a) = total {
                want.push((ArchKey::RopeScalingAttnFactor, f32v(a / yarn_mscale(s))));
            }
            if run.beta_fast != defaults::BETA_FAST || run.beta_slow != defaults::BETA_SLOW {
                want.push((ArchKey::RopeScalingYarnBetaFast, f32v(run.beta_fast)));
                want.push((ArchKey::RopeScalingYarnBetaSlow, f32v(run.beta_slow)));
            }
        }
        // default/abf/eabf: the base only; llama3: rope_freqs.weight; ntk and dynamic arrive as
        // default in the runtime form
        _ => {}
    }
    if let ScaleLaw::Step { beta, length } = run.scale_law {
        want.push((ArchKey::AttentionTemperatureScale, f32v(beta)));
        if !want
            .iter()
            .any(|(k, _)| *k == ArchKey::RopeScalingOriginalContextLength)
        {
            want.push((
                ArchKey::RopeScalingOriginalContextLength,
                u32_key(&arch, ArchKey::RopeScalingOriginalContextLength, length)?,
            ));
        }
    }
    meta.set_rope_freq_base(&arch, run.rope_base)?;
    meta.set_context_length(&arch, run.context)?;
    for k in RECIPE_ARCH_KEYS {
        match want.iter().find(|(w, _)| w == k) {
            Some((_, v)) => {
                meta.set(k.key(&arch), v.clone());
            }
            None => {
                meta.remove(&k.key(&arch));
            }
        }
    }
    Ok(notes)
}

fn field_value(name: &str, v: &Value) -> Option<FieldValue> {
    match (field_kind(name), v) {
        (_, Value::String(_)) => v.as_str().map(|s| FieldValue::Str(s.to_string())),
        (_, Value::F32(_) | Value::F64(_)) => v.as_f64().map(FieldValue::F64),
        (_, Value::Bool(_) | Value::Array(_)) => Some(FieldValue::Str(v.to_string())),
        (Some(FieldKind::F64), _) => v.as_f64().map(FieldValue::F64),
        _ => v.as_u64().map(FieldValue::U64),
    }
}

/// The recipe a file encodes: our `abf.recipe.*` record when present, else what llama.cpp
/// runs from its keys ([`runtime_recipe`]). None without an architecture and context length.
pub fn read_recipe(meta: &Metadata) -> Result<Option<Recipe>, GgufError> {
    if meta.keys().any(|k| k.starts_with(GGUF_PREFIX)) {
        let r = Recipe::from_fields("gguf abf.recipe.* keys", |name| {
            meta.get(&format!("{GGUF_PREFIX}{name}"))
                .and_then(|v| field_value(name, v))
        })?;
        return Ok(Some(r));
    }
    let Some(arch) = meta.architecture()? else {
        return Ok(None);
    };
    if meta.arch_u32(arch, ArchKey::ContextLength)?.is_none() {
        return Ok(None);
    }
    let dim = rope_dim(meta, arch)?.unwrap_or(0);
    Ok(Some(runtime_recipe(meta, dim)?.recipe))
}

/// The recipe llama.cpp runs for a file, with what else its keys told.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeRecipe {
    pub arch: String,
    pub recipe: Recipe,
    /// `{arch}.rope.dimension_count` (default `head_dim`).
    pub rope_dim: usize,
    /// Keys present that this architecture's graph ignores (e.g. temperature_scale under llama).
    pub ignored: Vec<String>,
}

/// What llama.cpp runs from the keys of `meta` for a model of `head_dim`, never from our
/// `abf.recipe.*` record, so a key llama.cpp would misread is misread here too. Sources:
/// llama.cpp `src/llama-model.cpp` (`load_hparams`: scaling type defaults to linear, a factor of
/// 0 means none, `n_ctx_orig_yarn` defaults to `n_ctx_train`, only some graphs read the yarn
/// betas), `src/llama-graph.cpp` (mistral3's step law), ggml `rope_yarn` (mscale
/// `attn_factor * (1 + 0.1 ln s)`).
pub fn runtime_recipe(meta: &Metadata, head_dim: usize) -> Result<RuntimeRecipe, GgufError> {
    let arch = required_arch(meta)?;
    let ctx = u64::from(
        meta.arch_u32(&arch, ArchKey::ContextLength)?
            .ok_or_else(|| GgufError::MissingKey {
                key: ArchKey::ContextLength.key(&arch),
            })?,
    );
    let base = meta
        .arch_f32(&arch, ArchKey::RopeFreqBase)?
        .map(f64::from)
        .unwrap_or(keys::DEFAULT_FREQ_BASE);
    let rope_dim = meta
        .arch_u32(&arch, ArchKey::RopeDimensionCount)?
        .map(|d| d as usize)
        .unwrap_or(head_dim);
    let ty = meta
        .arch_str(&arch, ArchKey::RopeScalingType)?
        .unwrap_or(keys::SCALING_LINEAR)
        .to_string();
    let factor = meta
        .arch_f32(&arch, ArchKey::RopeScalingFactor)?
        .map(f64::from)
        .filter(|&f| f != 0.0)
        .unwrap_or(1.0);
    let orig_key = meta
        .arch_u32(&arch, ArchKey::RopeScalingOriginalContextLength)?
        .map(u64::from);
    // n_ctx_orig_yarn: the key, else n_ctx_train
    let orig = orig_key.unwrap_or(ctx);
    let mistral3 = arch == ARCH_MISTRAL3;
    let mut ignored = Vec::new();
    let mut r = Recipe::plain(crate::rope::BaseRope {
        base,
        context: orig.min(ctx).max(2),
    });
    let scaling = Scaling {
        ty: &ty,
        factor,
        orig_key,
        ctx,
        mistral3,
    };
    read_scaling(meta, &arch, &scaling, &mut r, &mut ignored)?;
    r.context = ctx.max(r.original_context);
    let temp = meta
        .arch_f32(&arch, ArchKey::AttentionTemperatureScale)?
        .map(f64::from);
    match temp {
        Some(beta) if mistral3 && beta != 0.0 => {
            // mistral3: scale = ln(floor(pos / L) + 1) * beta + 1, L = n_ctx_orig_yarn
            r.scale_law = ScaleLaw::Step {
                beta,
                length: orig.max(1),
            };
        }
        Some(_) if !mistral3 => ignored.push(ArchKey::AttentionTemperatureScale.key(&arch)),
        _ => {}
    }
    r.validate()?;
    Ok(RuntimeRecipe {
        arch,
        recipe: r,
        rope_dim,
        ignored,
    })
}

/// The scaling keys as read, for [`read_scaling`].
struct Scaling<'a> {
    ty: &'a str,
    factor: f64,
    orig_key: Option<u64>,
    ctx: u64,
    mistral3: bool,
}

/// `rope.scaling.type` and its keys as llama.cpp reads them, into `r`.
fn read_scaling(
    meta: &Metadata,
    arch: &str,
    sc: &Scaling<'_>,
    r: &mut Recipe,
    ignored: &mut Vec<String>,
) -> Result<(), GgufError> {
    let (factor, orig_key, ctx, mistral3) = (sc.factor, sc.orig_key, sc.ctx, sc.mistral3);
    let orig = orig_key.unwrap_or(ctx);
    match sc.ty {
        keys::SCALING_NONE => {}
        keys::SCALING_LINEAR if factor == 1.0 => {}
        keys::SCALING_LINEAR => {
            r.method = RopeMethod::Linear;
            r.factor = factor;
            // linear does not read c: without the key, the window before the factor
            r.original_context = orig_key
                .unwrap_or_else(|| (ctx as f64 / factor).round() as u64)
                .max(2);
        }
        keys::SCALING_YARN => {
            r.method = RopeMethod::Yarn;
            r.factor = factor;
            r.original_context = orig.max(2);
            if let Some(a) = meta.arch_f32(arch, ArchKey::RopeScalingAttnFactor)? {
                let total = f64::from(a) * yarn_mscale(factor);
                if (total - 1.0).abs() < 1e-6 && factor > 1.0 {
                    r.method = RopeMethod::NtkByParts;
                } else if a != 1.0 {
                    r.yarn_attention_factor = Some(total);
                }
            }
            for (k, slot, default) in [
                (
                    ArchKey::RopeScalingYarnBetaFast,
                    &mut r.beta_fast,
                    defaults::BETA_FAST,
                ),
                (
                    ArchKey::RopeScalingYarnBetaSlow,
                    &mut r.beta_slow,
                    defaults::BETA_SLOW,
                ),
            ] {
                let v = meta.arch_f32(arch, k)?.map(f64::from);
                if v.is_some() && !mistral3 {
                    ignored.push(k.key(arch));
                }
                *slot = if mistral3 {
                    v.unwrap_or(default)
                } else {
                    default
                };
            }
        }
        other => {
            return Err(GgufError::BadValue {
                key: ArchKey::RopeScalingType.key(arch),
                value: other.to_string(),
                reason: "llama.cpp reads none, linear and yarn".into(),
            })
        }
    }
    Ok(())
}
