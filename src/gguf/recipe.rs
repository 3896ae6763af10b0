//! The recipe <-> GGUF keys: what llama.cpp applies natively, and our exact record under
//! `abf.recipe.*` (field names and kinds from `abf::rope::FIELDS`).

use super::error::GgufError;
use super::keys::{self, ArchKey, ARCH_LLAMA, ARCH_MISTRAL3, RECIPE_ARCH_KEYS};
use super::metadata::Metadata;
use super::value::Value;
use crate::rope::{
    defaults, field_kind, ntk_base, yarn_mscale, FieldKind, FieldValue, Recipe, RopeMethod,
    ScaleLaw, GGUF_PREFIX,
};

/// Which runtime the keys are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Only what llama.cpp reads and applies.
    LlamaCpp,
    /// llama.cpp's keys plus the exact recipe under `abf.recipe.*`.
    Exact,
}

impl std::str::FromStr for Runtime {
    type Err = String;
    fn from_str(s: &str) -> Result<Runtime, String> {
        match s {
            "llama.cpp" | "llamacpp" | "llama-cpp" => Ok(Runtime::LlamaCpp),
            "exact" => Ok(Runtime::Exact),
            other => Err(format!(
                "unknown runtime {other:?} (expected llama.cpp or exact)"
            )),
        }
    }
}

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

/// Write `recipe` into `meta` for `runtime`. Returns notes for the user (approximations made,
/// relabels). Refuses what llama.cpp cannot run: dynamic NTK, llama3 (its factors live in the
/// `rope_freqs.weight` tensor), and, unless `allow_approximate`, a recipe with runtime gaps
/// (log law, exempt layers); with it, the nearest runtime form is written and the notes say so.
pub fn apply_recipe(
    meta: &mut Metadata,
    recipe: &Recipe,
    runtime: Runtime,
    allow_approximate: bool,
) -> Result<Vec<String>, GgufError> {
    recipe.validate()?;
    let mut notes = Vec::new();
    let mut arch = meta
        .architecture()?
        .ok_or_else(|| GgufError::MissingKey {
            key: keys::GENERAL_ARCHITECTURE.to_string(),
        })?
        .to_string();
    match recipe.method {
        RopeMethod::Dynamic => {
            return Err(refuse(
                "llama.cpp has no dynamic NTK scaling; use --method ntk (static) or yarn".into(),
            ))
        }
        RopeMethod::Llama3 => {
            return Err(refuse(
                "llama3 scaling lives in the rope_freqs.weight tensor, which patch-gguf does not \
                 add; convert from the checkpoint instead"
                    .into(),
            ))
        }
        _ => {}
    }
    let mut run = recipe.clone();
    let gaps = recipe.runtime_gaps();
    if !gaps.is_empty() {
        if !allow_approximate {
            return Err(refuse(format!(
                "llama.cpp cannot run this recipe exactly: {}; pass --allow-approximate to write \
                 its nearest runtime form",
                gaps.join("; ")
            )));
        }
        if run.scale_law == ScaleLaw::Log {
            run.scale_law = Recipe::default_step(run.original_context);
        }
        run.skip_layers = 0;
        for g in gaps {
            notes.push(format!("approximate: {g}"));
        }
        if let ScaleLaw::Step { beta, length } = run.scale_law {
            notes.push(format!(
                "approximate: written as the step law beta {beta:.6} L {length} in every layer"
            ));
        }
    }
    let writes_original = matches!(
        run.method,
        RopeMethod::Linear | RopeMethod::Yarn | RopeMethod::NtkByParts
    );
    if let ScaleLaw::Step { length, .. } = run.scale_law {
        if writes_original && length != run.original_context {
            return Err(refuse(format!(
                "the step law's L ({length}) must equal the original context ({}) with {} scaling: \
                 llama.cpp reads both from rope.scaling.original_context_length",
                run.original_context, run.method
            )));
        }
        if arch != ARCH_MISTRAL3 {
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
    }

    // the keys this recipe needs, beyond freq_base and context_length
    let mut want: Vec<(ArchKey, Value)> = Vec::new();
    let s = run.factor;
    let f32v = |x: f64| Value::F32(x as f32);
    let orig = || -> Result<Value, GgufError> {
        u32::try_from(run.original_context)
            .map(Value::U32)
            .map_err(|_| GgufError::BadValue {
                key: ArchKey::RopeScalingOriginalContextLength.key(&arch),
                value: run.original_context.to_string(),
                reason: "does not fit u32".into(),
            })
    };
    let mut base = run.rope_base;
    match run.method {
        RopeMethod::Ntk => {
            let d = rope_dim(meta, &arch)?.ok_or_else(|| {
                refuse(format!(
                    "ntk needs the rotary dimension ({} or embedding_length / head_count)",
                    ArchKey::RopeDimensionCount.key(&arch)
                ))
            })?;
            // static NTK is exactly a new base: b' = b s^(d/(d-2))
            base = ntk_base(run.rope_base, s, d);
            notes.push(format!("ntk written as freq_base {base} (d = {d})"));
        }
        RopeMethod::Linear => {
            want.push((
                ArchKey::RopeScalingType,
                Value::string(keys::SCALING_LINEAR),
            ));
            want.push((ArchKey::RopeScalingFactor, f32v(s)));
            want.push((ArchKey::RopeScalingOriginalContextLength, orig()?));
        }
        RopeMethod::Yarn | RopeMethod::NtkByParts => {
            want.push((ArchKey::RopeScalingType, Value::string(keys::SCALING_YARN)));
            want.push((ArchKey::RopeScalingFactor, f32v(s)));
            want.push((ArchKey::RopeScalingOriginalContextLength, orig()?));
            // llama.cpp multiplies its own mscale 0.1 ln s + 1 by attn_factor
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
                notes.push(
                    "non-default yarn betas: not every llama.cpp architecture reads \
                     rope.scaling.yarn_beta_*; pass --yarn-beta-fast/--yarn-beta-slow at run time"
                        .into(),
                );
            }
        }
        _ => {}
    }
    if let ScaleLaw::Step { beta, length } = run.scale_law {
        want.push((ArchKey::AttentionTemperatureScale, f32v(beta)));
        let l = u32::try_from(length).map_err(|_| GgufError::BadValue {
            key: ArchKey::RopeScalingOriginalContextLength.key(&arch),
            value: length.to_string(),
            reason: "does not fit u32".into(),
        })?;
        if !want
            .iter()
            .any(|(k, _)| *k == ArchKey::RopeScalingOriginalContextLength)
        {
            want.push((ArchKey::RopeScalingOriginalContextLength, Value::U32(l)));
        }
    }

    meta.set_rope_freq_base(&arch, base)?;
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
    let ours: Vec<String> = meta
        .keys()
        .filter(|k| k.starts_with(GGUF_PREFIX))
        .map(str::to_string)
        .collect();
    for k in ours {
        meta.remove(&k);
    }
    if runtime == Runtime::Exact {
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

fn field_value(name: &str, v: &Value) -> Option<FieldValue> {
    match (field_kind(name), v) {
        (_, Value::String(_)) => v.as_str().map(|s| FieldValue::Str(s.to_string())),
        (_, Value::F32(_) | Value::F64(_)) => v.as_f64().map(FieldValue::F64),
        (_, Value::Bool(_) | Value::Array(_)) => Some(FieldValue::Str(v.to_string())),
        (Some(FieldKind::F64), _) => v.as_f64().map(FieldValue::F64),
        _ => v.as_u64().map(FieldValue::U64),
    }
}

/// The recipe a file encodes: our `abf.recipe.*` keys when present, else derived from the keys
/// llama.cpp reads (the recipe llama.cpp would run). None without an architecture and context
/// length.
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
    let Some(ctx) = meta.arch_u32(arch, ArchKey::ContextLength)? else {
        return Ok(None);
    };
    let ctx = ctx as u64;
    let base = meta
        .arch_f32(arch, ArchKey::RopeFreqBase)?
        .map(f64::from)
        .unwrap_or(keys::DEFAULT_FREQ_BASE);
    let ty = meta
        .arch_str(arch, ArchKey::RopeScalingType)?
        .unwrap_or(keys::SCALING_NONE);
    // llama.cpp: a factor of 0 (or none) means no scaling
    let factor = meta
        .arch_f32(arch, ArchKey::RopeScalingFactor)?
        .map(f64::from)
        .filter(|&f| f > 0.0)
        .unwrap_or(1.0);
    let orig_key = meta
        .arch_u32(arch, ArchKey::RopeScalingOriginalContextLength)?
        .map(u64::from);
    // only llama.cpp's mistral3 graph reads the temperature scale
    let temp = if arch == ARCH_MISTRAL3 {
        meta.arch_f32(arch, ArchKey::AttentionTemperatureScale)?
            .map(f64::from)
            .filter(|&b| b > 0.0)
    } else {
        None
    };
    let mut f: Vec<(&str, FieldValue)> = vec![("rope_base", FieldValue::F64(base))];
    let method;
    let original;
    match ty {
        keys::SCALING_LINEAR => {
            method = RopeMethod::Linear;
            original = orig_key.unwrap_or_else(|| (ctx as f64 / factor).round() as u64);
            f.push(("factor", FieldValue::F64(factor)));
        }
        keys::SCALING_YARN => {
            original = orig_key.unwrap_or(ctx);
            f.push(("factor", FieldValue::F64(factor)));
            let attn = meta
                .arch_f32(arch, ArchKey::RopeScalingAttnFactor)?
                .map(f64::from);
            let total = attn.map(|a| a * yarn_mscale(factor));
            method = match total {
                Some(t) if (t - 1.0).abs() < 1e-6 && factor > 1.0 => RopeMethod::NtkByParts,
                _ => RopeMethod::Yarn,
            };
            if method == RopeMethod::Yarn {
                if let Some(t) = total.filter(|_| attn != Some(1.0)) {
                    f.push(("attention_factor", FieldValue::F64(t)));
                }
            }
            for (k, name) in [
                (ArchKey::RopeScalingYarnBetaFast, "beta_fast"),
                (ArchKey::RopeScalingYarnBetaSlow, "beta_slow"),
            ] {
                if let Some(b) = meta.arch_f32(arch, k)? {
                    f.push((name, FieldValue::F64(b as f64)));
                }
            }
        }
        keys::SCALING_NONE => {
            method = RopeMethod::Default;
            original = orig_key.unwrap_or(ctx);
        }
        other => {
            return Err(GgufError::BadValue {
                key: ArchKey::RopeScalingType.key(arch),
                value: other.to_string(),
                reason: "abf reads none, linear and yarn".into(),
            })
        }
    }
    f.push(("method", FieldValue::Str(method.name().to_string())));
    f.push(("original_context", FieldValue::U64(original)));
    f.push(("context", FieldValue::U64(ctx.max(original))));
    if let Some(beta) = temp {
        f.push(("scale_law", FieldValue::Str("step".into())));
        f.push(("scale_beta", FieldValue::F64(beta)));
        f.push(("scale_length", FieldValue::U64(orig_key.unwrap_or(ctx))));
    }
    let source = format!("gguf {arch}.* keys");
    let r = Recipe::from_fields(&source, |name| {
        f.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone())
    })?;
    Ok(Some(r))
}
