//! What each runtime runs: the one place that maps a recipe to the form a target evaluates from
//! its native fields, with the approximations that takes and why.
//!
//! GGUF keys (`gguf::apply_recipe`), config.json (`checkpoint::patch_config`), the converter and
//! the verifier's expectation all call [`runtime_form`]; none re-derives it.
//! Sources: llama.cpp `src/llama-model.cpp` (`load_hparams`), `src/llama-graph.cpp` (mistral3's
//! temperature scale), transformers `modeling_rope_utils.py` and `configuration_ministral3.py`.

use std::fmt;
use std::str::FromStr;

use super::freqs::ntk_base;
use super::recipe::{defaults, Recipe, RopeMethod, ScaleLaw};
use super::RecipeError;

/// Who runs a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// llama.cpp, from the GGUF keys it reads (plus `rope_freqs.weight` for Llama 3).
    LlamaCpp,
    /// Hugging Face transformers, from config.json's rope fields.
    Transformers,
    /// abf's own forward, from our recipe record (`abf_recipe`, `abf.recipe.*`). A file written
    /// for this target also carries the native form, so other runtimes run its nearest form.
    Exact,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::LlamaCpp, Target::Transformers, Target::Exact];

    /// The command-line name (`--runtime`).
    pub fn name(self) -> &'static str {
        match self {
            Target::LlamaCpp => "llama.cpp",
            Target::Transformers => "transformers",
            Target::Exact => "exact",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = RecipeError;
    fn from_str(s: &str) -> Result<Target, RecipeError> {
        let key = match s.trim().to_ascii_lowercase().as_str() {
            "llamacpp" | "llama-cpp" => "llama.cpp".to_string(),
            other => other.to_string(),
        };
        Target::ALL
            .into_iter()
            .find(|t| t.name() == key)
            .ok_or_else(|| RecipeError::UnknownTarget(s.to_string()))
    }
}

/// What a runtime cannot express, by kind (the reason text says the particulars).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gap {
    /// The log law `max(1, ln(p+1)/ln c)`: runtimes evaluate its step form.
    LogLaw,
    /// Exempt layers: runtimes scale every layer.
    ExemptLayers,
    /// Dynamic NTK: llama.cpp has none; run as plain RoPE with its base.
    DynamicNtk,
    /// The step law's L differs from c, and the runtime reads both from one key.
    StepLength,
    /// transformers derives yarn's factor from the two windows.
    YarnFactor,
    /// llama.cpp's llama graph runs the default yarn betas.
    YarnBetas,
}

/// One approximation: its kind and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Approximation {
    pub gap: Gap,
    pub reason: String,
}

impl fmt::Display for Approximation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The form of a recipe a target runs.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeForm {
    pub target: Target,
    /// What the target computes (equal in meaning to the asked recipe when exact). Static NTK
    /// appears as plain rope with its NTK base; runtimes never exempt layers.
    pub recipe: Recipe,
    /// Why the target's computation differs from the asked recipe; empty when exact.
    pub approximations: Vec<Approximation>,
}

impl RuntimeForm {
    pub fn is_exact(&self) -> bool {
        self.approximations.is_empty()
    }

    pub fn gaps(&self) -> Vec<Gap> {
        self.approximations.iter().map(|a| a.gap).collect()
    }

    /// The reasons, one line each.
    pub fn reasons(&self) -> Vec<String> {
        self.approximations
            .iter()
            .map(|a| a.reason.clone())
            .collect()
    }

    /// Ok when exact or when approximations are allowed; else the error naming each reason.
    pub fn require_exact(&self, allow_approximate: bool) -> Result<(), RecipeError> {
        if self.is_exact() || allow_approximate {
            return Ok(());
        }
        Err(RecipeError::NotExact {
            target: self.target.name(),
            reasons: self.reasons().join("; "),
        })
    }

    /// Notes for the user: each approximation, then the law that is written instead.
    pub fn notes(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .approximations
            .iter()
            .map(|a| format!("approximate for {}: {}", self.target, a.reason))
            .collect();
        if !self.is_exact() {
            if let ScaleLaw::Step { beta, length } = self.recipe.scale_law {
                out.push(format!(
                    "approximate for {}: written as the step law beta {beta:.6} L {length} in \
                     every layer",
                    self.target
                ));
            }
        }
        out
    }
}

/// Methods whose runtime form reads c from the key that also carries the step law's L.
fn shares_length_key(target: Target, method: RopeMethod) -> bool {
    match target {
        // llama.cpp: rope.scaling.original_context_length is n_ctx_orig_yarn, which mistral3
        // also uses as the temperature length; we write it for every scaling type.
        Target::LlamaCpp => matches!(
            method,
            RopeMethod::Linear | RopeMethod::Yarn | RopeMethod::NtkByParts
        ),
        // transformers' ministral3: rope_parameters.original_max_position_embeddings.
        Target::Transformers => matches!(
            method,
            RopeMethod::Yarn | RopeMethod::NtkByParts | RopeMethod::Llama3 | RopeMethod::Dynamic
        ),
        Target::Exact => false,
    }
}

/// The form of `recipe` that `target` runs, for a model whose rotary dimension is `rotary_dim`
/// (static NTK's base depends on it). Never fails: what a target cannot express is listed.
pub fn runtime_form(recipe: &Recipe, target: Target, rotary_dim: usize) -> RuntimeForm {
    let mut r = recipe.clone();
    let mut gaps = Vec::new();
    let mut gap = |gap: Gap, reason: String| gaps.push(Approximation { gap, reason });
    if target == Target::Exact {
        return RuntimeForm {
            target,
            recipe: r,
            approximations: Vec::new(),
        };
    }
    let c = r.original_context;
    if r.scale_law == ScaleLaw::Log {
        gap(
            Gap::LogLaw,
            format!(
                "the log scale law max(1, ln(p+1)/ln {c}) is not evaluated by any runtime; the \
                 step law 1 + ln(1 + floor(p/{c}))/ln {c} is its nearest runtime form"
            ),
        );
        r.scale_law = Recipe::default_step(c);
    }
    if r.scale_law != ScaleLaw::None && r.skip_layers > 0 {
        gap(
            Gap::ExemptLayers,
            format!(
                "runtimes scale every layer; this recipe exempts the first {} layer(s)",
                r.skip_layers
            ),
        );
    }
    // a runtime has no exempt layers (without a law the count means nothing)
    r.skip_layers = 0;
    if r.method == RopeMethod::Ntk {
        // static NTK-aware is exactly plain rope with the NTK base b s^(d/(d-2)) (method.md)
        r.rope_base = ntk_base(r.rope_base, r.factor, rotary_dim);
        r.method = RopeMethod::Default;
        r.factor = 1.0;
    }
    if r.method == RopeMethod::Dynamic && target == Target::LlamaCpp {
        gap(
            Gap::DynamicNtk,
            "llama.cpp has no dynamic NTK: it runs plain RoPE with the base (equal up to c)"
                .to_string(),
        );
        r.method = RopeMethod::Default;
        r.factor = 1.0;
    }
    if let ScaleLaw::Step { beta, length } = r.scale_law {
        if length != c && shares_length_key(target, r.method) {
            let key = match target {
                Target::LlamaCpp => "rope.scaling.original_context_length",
                _ => "rope_parameters.original_max_position_embeddings",
            };
            gap(
                Gap::StepLength,
                format!(
                    "{target} reads the step law's L ({length}) and the {} rope's original \
                     context c ({c}) from one key, {key}; L is written as c",
                    r.method
                ),
            );
            r.scale_law = ScaleLaw::Step { beta, length: c };
        }
    }
    if matches!(r.method, RopeMethod::Yarn | RopeMethod::NtkByParts) {
        if let Some(a) = yarn_form(target, &mut r) {
            gaps.push(a);
        }
    }
    RuntimeForm {
        target,
        recipe: r,
        approximations: gaps,
    }
}

/// YaRN's details each runtime reads its own way: transformers derives the factor from the
/// windows, llama.cpp's llama graph ignores non-default betas.
fn yarn_form(target: Target, r: &mut Recipe) -> Option<Approximation> {
    let c = r.original_context;
    let mut out = None;
    let mut gap = |gap: Gap, reason: String| out = Some(Approximation { gap, reason });
    match target {
        Target::Transformers => {
            let implied = r.context as f64 / c as f64;
            if (r.factor - implied).abs() > 1e-12 * r.factor.abs().max(implied.abs()) {
                gap(
                    Gap::YarnFactor,
                    format!(
                        "transformers derives yarn's factor from max_position_embeddings / \
                         original_max_position_embeddings = {} / {c}, not {}",
                        r.context, r.factor
                    ),
                );
                r.context = (r.factor * c as f64).round() as u64;
            }
        }
        Target::LlamaCpp => {
            // only llama.cpp's mistral3 graph (the step law's) reads rope.scaling.yarn_beta_*
            let default_betas =
                r.beta_fast == defaults::BETA_FAST && r.beta_slow == defaults::BETA_SLOW;
            let step = matches!(r.scale_law, ScaleLaw::Step { .. });
            if !default_betas && !step {
                gap(
                    Gap::YarnBetas,
                    format!(
                        "llama.cpp's llama graph ignores rope.scaling.yarn_beta_*: it runs \
                         betas {}/{}, not {}/{}",
                        defaults::BETA_FAST,
                        defaults::BETA_SLOW,
                        r.beta_fast,
                        r.beta_slow
                    ),
                );
                r.beta_fast = defaults::BETA_FAST;
                r.beta_slow = defaults::BETA_SLOW;
            }
        }
        Target::Exact => {}
    }
    out
}
