//! Metadata checks before any compute: what the GGUF tells llama.cpp against what the reference
//! recipe and config say, each mismatch named by key.

use serde::Serialize;

use crate::checkpoint::ModelConfig;
use crate::gguf::keys::{self, required_type, ArchKey, ARCH_MISTRAL3};
use crate::gguf::{GgufError, Metadata};
use crate::rope::{Recipe, RopeMethod, ScaleLaw};
use crate::runtime::RuntimeRecipe;

/// One mismatch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Issue {
    /// The key (or `tokenizer`, `tensor shapes`).
    pub key: String,
    pub message: String,
}

fn issue(key: impl Into<String>, message: impl Into<String>) -> Issue {
    Issue {
        key: key.into(),
        message: message.into(),
    }
}

fn close(a: f64, b: f64) -> bool {
    // keys are F32: allow its rounding
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-30)
}

/// Compare the file's runtime reading with the reference (`want` is
/// `rope::runtime_form(reference, LlamaCpp, head_dim).recipe`: static NTK already as its base,
/// dynamic NTK as plain rope, the log law as its step law). Every mismatch is returned, none
/// stops the run.
pub fn check(
    meta: &Metadata,
    got: Result<&RuntimeRecipe, &GgufError>,
    cfg: &ModelConfig,
    want: &Recipe,
) -> Vec<Issue> {
    let mut out = Vec::new();
    let arch = match meta.architecture() {
        Ok(Some(a)) => a.to_string(),
        Ok(None) => {
            out.push(issue(
                keys::GENERAL_ARCHITECTURE,
                "general.architecture is missing",
            ));
            return out;
        }
        Err(e) => {
            out.push(issue(keys::GENERAL_ARCHITECTURE, e.to_string()));
            return out;
        }
    };
    // key types llama.cpp insists on
    for (k, v) in meta.iter() {
        if let Some(t) = required_type(Some(&arch), k) {
            if v.value_type() != t {
                out.push(issue(
                    k,
                    format!(
                        "{k} is stored as {}; llama.cpp requires {} and refuses the file",
                        v.value_type().name(),
                        t.name()
                    ),
                ));
            }
        }
    }
    let got = match got {
        Ok(g) => g,
        Err(e) => {
            out.push(issue(format!("{arch}.rope.*"), e.to_string()));
            return out;
        }
    };
    let r = &got.recipe;
    let scaled = want.scale_law != ScaleLaw::None;
    if scaled && arch != ARCH_MISTRAL3 {
        out.push(issue(
            keys::GENERAL_ARCHITECTURE,
            format!(
                "architecture is {arch}; the recipe's step scale law runs only in llama.cpp's \
                 {ARCH_MISTRAL3} graph, so attention is not scaled beyond L"
            ),
        ));
    }
    for k in &got.ignored {
        out.push(issue(
            k,
            format!("{k} is present but the {arch} graph ignores it"),
        ));
    }
    // shapes
    let shape = |key: ArchKey, v: usize| {
        meta.arch_u32(&arch, key)
            .ok()
            .flatten()
            .map(|x| (x as usize, v))
    };
    for (key, expect) in [
        (ArchKey::EmbeddingLength, cfg.hidden_size),
        (ArchKey::BlockCount, cfg.num_hidden_layers),
        (ArchKey::FeedForwardLength, cfg.intermediate_size),
        (ArchKey::HeadCount, cfg.num_attention_heads),
        (ArchKey::HeadCountKv, cfg.num_key_value_heads),
    ] {
        if let Some((f, e)) = shape(key, expect) {
            if f != e {
                let k = key.key(&arch);
                out.push(issue(
                    &k,
                    format!("{} is {f}; the reference config says {e}", key.suffix()),
                ));
            }
        }
    }
    if got.rope_dim != cfg.head_dim {
        out.push(issue(
            ArchKey::RopeDimensionCount.key(&arch),
            format!(
                "rope.dimension_count is {}; the reference rotates all {} dimensions of a head",
                got.rope_dim, cfg.head_dim
            ),
        ));
    }
    let want_base = want.rope_base;
    if !close(r.rope_base, want_base) {
        out.push(issue(
            ArchKey::RopeFreqBase.key(&arch),
            format!(
                "rope.freq_base is {}; the recipe says {}",
                r.rope_base, want_base
            ),
        ));
    }
    if r.context != want.context {
        out.push(issue(
            ArchKey::ContextLength.key(&arch),
            format!(
                "context_length is {}; the recipe says {}",
                r.context, want.context
            ),
        ));
    }
    // scaling
    let want_ty = match want.method {
        RopeMethod::Linear => keys::SCALING_LINEAR,
        RopeMethod::Yarn | RopeMethod::NtkByParts => keys::SCALING_YARN,
        _ => keys::SCALING_NONE,
    };
    let got_ty = match r.method {
        RopeMethod::Linear => keys::SCALING_LINEAR,
        RopeMethod::Yarn | RopeMethod::NtkByParts => keys::SCALING_YARN,
        _ => keys::SCALING_NONE,
    };
    if want_ty != got_ty {
        out.push(issue(
            ArchKey::RopeScalingType.key(&arch),
            format!(
                "rope scaling is {got_ty}; the recipe ({}) needs {want_ty}",
                want.method
            ),
        ));
    } else if want_ty != keys::SCALING_NONE {
        if !close(r.factor, want.factor) {
            out.push(issue(
                ArchKey::RopeScalingFactor.key(&arch),
                format!(
                    "rope.scaling.factor is {}; the recipe says {}",
                    r.factor, want.factor
                ),
            ));
        }
        if r.original_context != want.original_context {
            out.push(issue(
                ArchKey::RopeScalingOriginalContextLength.key(&arch),
                format!(
                    "rope.scaling.original_context_length is {}; the recipe says {}",
                    r.original_context, want.original_context
                ),
            ));
        }
        if want_ty == keys::SCALING_YARN {
            let wa = match want.method {
                RopeMethod::NtkByParts => 1.0,
                _ => want.attention_factor(),
            };
            if !close(r.attention_factor(), wa) {
                out.push(issue(
                    ArchKey::RopeScalingAttnFactor.key(&arch),
                    format!(
                        "yarn attention factor (attn_factor x mscale) is {}; the recipe says {wa}",
                        r.attention_factor()
                    ),
                ));
            }
            if !close(r.beta_fast, want.beta_fast) || !close(r.beta_slow, want.beta_slow) {
                out.push(issue(
                    ArchKey::RopeScalingYarnBetaFast.key(&arch),
                    format!(
                        "llama.cpp runs yarn betas {}/{}; the recipe says {}/{}",
                        r.beta_fast, r.beta_slow, want.beta_fast, want.beta_slow
                    ),
                ));
            }
        }
    }
    // the step law (only read under mistral3; a llama file was named above)
    if arch == ARCH_MISTRAL3 || !scaled {
        match (want.scale_law, r.scale_law) {
            (ScaleLaw::Step { beta, length }, ScaleLaw::Step { beta: b, length: l }) => {
                if !close(b, beta) {
                    out.push(issue(
                        ArchKey::AttentionTemperatureScale.key(&arch),
                        format!("attention.temperature_scale is {b}; the recipe says {beta}"),
                    ));
                }
                if l != length {
                    out.push(issue(
                        ArchKey::RopeScalingOriginalContextLength.key(&arch),
                        format!(
                            "the step law's L (rope.scaling.original_context_length) is {l}; \
                             the recipe says {length}"
                        ),
                    ));
                }
            }
            (ScaleLaw::Step { beta, .. }, _) => out.push(issue(
                ArchKey::AttentionTemperatureScale.key(&arch),
                format!("attention.temperature_scale is absent; the recipe says {beta}"),
            )),
            (_, ScaleLaw::Step { beta, .. }) => out.push(issue(
                ArchKey::AttentionTemperatureScale.key(&arch),
                format!("attention.temperature_scale is {beta}; the recipe has no scale law"),
            )),
            _ => {}
        }
    }
    out
}
