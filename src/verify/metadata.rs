//! Metadata checks before any compute: what the GGUF tells llama.cpp against what the reference
//! recipe and config say, each mismatch named by key.

use serde::Serialize;

use crate::checkpoint::ModelConfig;
use crate::gguf::keys::{self, required_type, ArchKey, ARCH_MISTRAL3};
use crate::gguf::recipe::scaling_type;
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
    key_types(meta, &arch, &mut out);
    let got = match got {
        Ok(g) => g,
        Err(e) => {
            out.push(issue(format!("{arch}.rope.*"), e.to_string()));
            return out;
        }
    };
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
    shapes(meta, &arch, got, cfg, &mut out);
    rope(&arch, &got.recipe, want, &mut out);
    // the step law (only read under mistral3; a llama file was named above)
    if arch == ARCH_MISTRAL3 || !scaled {
        step_law(&arch, &got.recipe, want, &mut out);
    }
    out
}

/// Key types llama.cpp insists on.
fn key_types(meta: &Metadata, arch: &str, out: &mut Vec<Issue>) {
    for (k, v) in meta.iter() {
        if let Some(t) = required_type(Some(arch), k) {
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
}

/// The hyperparameters against the reference config.
fn shapes(
    meta: &Metadata,
    arch: &str,
    got: &RuntimeRecipe,
    cfg: &ModelConfig,
    out: &mut Vec<Issue>,
) {
    for (key, expect) in [
        (ArchKey::EmbeddingLength, cfg.hidden_size),
        (ArchKey::BlockCount, cfg.num_hidden_layers),
        (ArchKey::FeedForwardLength, cfg.intermediate_size),
        (ArchKey::HeadCount, cfg.num_attention_heads),
        (ArchKey::HeadCountKv, cfg.num_key_value_heads),
    ] {
        let found = meta.arch_u32(arch, key).ok().flatten().map(|x| x as usize);
        if let Some(f) = found.filter(|&f| f != expect) {
            out.push(issue(
                key.key(arch),
                format!(
                    "{} is {f}; the reference config says {expect}",
                    key.suffix()
                ),
            ));
        }
    }
    if got.rope_dim != cfg.head_dim {
        out.push(issue(
            ArchKey::RopeDimensionCount.key(arch),
            format!(
                "rope.dimension_count is {}; the reference rotates all {} dimensions of a head",
                got.rope_dim, cfg.head_dim
            ),
        ));
    }
}

/// Base, window and the rope scaling keys.
fn rope(arch: &str, r: &Recipe, want: &Recipe, out: &mut Vec<Issue>) {
    let mut differs = |key: ArchKey, what: &str, got: String, wanted: String| {
        out.push(issue(
            key.key(arch),
            format!("{what} is {got}; the recipe says {wanted}"),
        ));
    };
    if !close(r.rope_base, want.rope_base) {
        let (g, w) = (r.rope_base.to_string(), want.rope_base.to_string());
        differs(ArchKey::RopeFreqBase, "rope.freq_base", g, w);
    }
    if r.context != want.context {
        let (g, w) = (r.context.to_string(), want.context.to_string());
        differs(ArchKey::ContextLength, "context_length", g, w);
    }
    let (want_ty, got_ty) = (scaling_type(want.method), scaling_type(r.method));
    if want_ty != got_ty {
        out.push(issue(
            ArchKey::RopeScalingType.key(arch),
            format!(
                "rope scaling is {got_ty}; the recipe ({}) needs {want_ty}",
                want.method
            ),
        ));
        return;
    }
    if want_ty == keys::SCALING_NONE {
        return;
    }
    if !close(r.factor, want.factor) {
        let (g, w) = (r.factor.to_string(), want.factor.to_string());
        differs(ArchKey::RopeScalingFactor, "rope.scaling.factor", g, w);
    }
    if r.original_context != want.original_context {
        let (g, w) = (
            r.original_context.to_string(),
            want.original_context.to_string(),
        );
        let what = "rope.scaling.original_context_length";
        differs(ArchKey::RopeScalingOriginalContextLength, what, g, w);
    }
    if want_ty == keys::SCALING_YARN {
        let wa = match want.method {
            RopeMethod::NtkByParts => 1.0,
            _ => want.attention_factor(),
        };
        if !close(r.attention_factor(), wa) {
            let what = "yarn attention factor (attn_factor x mscale)";
            differs(
                ArchKey::RopeScalingAttnFactor,
                what,
                r.attention_factor().to_string(),
                wa.to_string(),
            );
        }
        if !close(r.beta_fast, want.beta_fast) || !close(r.beta_slow, want.beta_slow) {
            out.push(issue(
                ArchKey::RopeScalingYarnBetaFast.key(arch),
                format!(
                    "llama.cpp runs yarn betas {}/{}; the recipe says {}/{}",
                    r.beta_fast, r.beta_slow, want.beta_fast, want.beta_slow
                ),
            ));
        }
    }
}

/// The step law's beta and length.
fn step_law(arch: &str, r: &Recipe, want: &Recipe, out: &mut Vec<Issue>) {
    let temp = ArchKey::AttentionTemperatureScale.key(arch);
    match (want.scale_law, r.scale_law) {
        (ScaleLaw::Step { beta, length }, ScaleLaw::Step { beta: b, length: l }) => {
            if !close(b, beta) {
                out.push(issue(
                    temp,
                    format!("attention.temperature_scale is {b}; the recipe says {beta}"),
                ));
            }
            if l != length {
                out.push(issue(
                    ArchKey::RopeScalingOriginalContextLength.key(arch),
                    format!(
                        "the step law's L (rope.scaling.original_context_length) is {l}; \
                         the recipe says {length}"
                    ),
                ));
            }
        }
        (ScaleLaw::Step { beta, .. }, _) => out.push(issue(
            temp,
            format!("attention.temperature_scale is absent; the recipe says {beta}"),
        )),
        (_, ScaleLaw::Step { beta, .. }) => out.push(issue(
            temp,
            format!("attention.temperature_scale is {beta}; the recipe has no scale law"),
        )),
        _ => {}
    }
}
