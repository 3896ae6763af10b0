//! The context-extension recipe: one typed value read and written by every part of abf.

use std::fmt;
use std::str::FromStr;

use super::RecipeError;

/// How the rotary frequencies are computed (Hugging Face transformers' rope types plus ABF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeMethod {
    /// Plain RoPE with the model's base.
    Default,
    /// Position interpolation (PI): every frequency divided by the factor.
    Linear,
    /// Static NTK-aware: base raised to `b * s^(d/(d-2))`.
    Ntk,
    /// Dynamic NTK: the NTK base recomputed from the current sequence length.
    Dynamic,
    /// YaRN: NTK-by-parts plus `mscale = 0.1 ln s + 1` on cos and sin.
    Yarn,
    /// NTK-by-parts: YaRN's frequency blend without the attention factor.
    NtkByParts,
    /// Llama 3 wavelength bands.
    Llama3,
    /// Adjusted base frequency: only the base changes.
    Abf,
    /// Entropy-aware ABF: ABF plus attention-logit scaling (Li et al. 2024).
    Eabf,
}

impl RopeMethod {
    pub const ALL: [RopeMethod; 9] = [
        RopeMethod::Default,
        RopeMethod::Linear,
        RopeMethod::Ntk,
        RopeMethod::Dynamic,
        RopeMethod::Yarn,
        RopeMethod::NtkByParts,
        RopeMethod::Llama3,
        RopeMethod::Abf,
        RopeMethod::Eabf,
    ];

    /// The command-line / config name: the one table of names, exhaustive by construction
    /// (parsing reads it back through [`RopeMethod::ALL`]).
    pub fn name(self) -> &'static str {
        match self {
            RopeMethod::Default => "default",
            RopeMethod::Linear => "linear",
            RopeMethod::Ntk => "ntk",
            RopeMethod::Dynamic => "dynamic",
            RopeMethod::Yarn => "yarn",
            RopeMethod::NtkByParts => "ntk-by-parts",
            RopeMethod::Llama3 => "llama3",
            RopeMethod::Abf => "abf",
            RopeMethod::Eabf => "eabf",
        }
    }

    /// Methods whose frequencies depend on a scale factor.
    pub fn uses_factor(self) -> bool {
        matches!(
            self,
            RopeMethod::Linear
                | RopeMethod::Ntk
                | RopeMethod::Dynamic
                | RopeMethod::Yarn
                | RopeMethod::NtkByParts
                | RopeMethod::Llama3
        )
    }

    /// Methods that change the base (ABF family) rather than interpolate.
    pub fn is_abf(self) -> bool {
        matches!(self, RopeMethod::Abf | RopeMethod::Eabf)
    }
}

impl fmt::Display for RopeMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RopeMethod {
    type Err = RecipeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.trim().to_ascii_lowercase().replace('_', "-");
        let key = match key.as_str() {
            "pi" | "linear-pi" => "linear",
            "ntk-aware" => "ntk",
            "entropy-abf" | "entropy-aware-abf" => "eabf",
            "none" => "default",
            other => other,
        };
        RopeMethod::ALL
            .into_iter()
            .find(|m| m.name() == key)
            .ok_or_else(|| RecipeError::UnknownMethod(s.to_string()))
    }
}

#[cfg(test)]
mod method_name_tests {
    use super::RopeMethod;

    #[test]
    fn every_method_round_trips_name_parse_variant() {
        for (i, m) in RopeMethod::ALL.into_iter().enumerate() {
            assert_eq!(
                m as usize, i,
                "{m}: RopeMethod::ALL out of declaration order"
            );
            assert_eq!(m.name().parse::<RopeMethod>().ok(), Some(m));
        }
        // exhaustive: a new variant stops this compiling until it is added here and to ALL
        let last = |m: RopeMethod| match m {
            RopeMethod::Default
            | RopeMethod::Linear
            | RopeMethod::Ntk
            | RopeMethod::Dynamic
            | RopeMethod::Yarn
            | RopeMethod::NtkByParts
            | RopeMethod::Llama3
            | RopeMethod::Abf => false,
            RopeMethod::Eabf => true,
        };
        assert!(last(RopeMethod::ALL[RopeMethod::ALL.len() - 1]));
    }
}

/// The attention-logit scale applied to q after RoPE, as a function of the query position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScaleLaw {
    /// No scaling.
    None,
    /// `max(1, ln(p+1) / ln c)`: the paper's exact law (method.md).
    Log,
    /// `1 + beta * ln(1 + floor(p / length))`: the Llama 4 / Mistral 3 law that runtimes evaluate.
    Step { beta: f64, length: u64 },
}

impl ScaleLaw {
    pub fn name(&self) -> &'static str {
        match self {
            ScaleLaw::None => "none",
            ScaleLaw::Log => "log",
            ScaleLaw::Step { .. } => "step",
        }
    }
}

/// A complete context-extension recipe.
///
/// `rope_base` is the base in use after the extension (500000 for ABF); `factor` is the scale
/// factor `s` of the interpolation methods (1 for ABF and default); `original_context` is the
/// pretraining window `c` and `context` the target window.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub method: RopeMethod,
    pub rope_base: f64,
    pub factor: f64,
    pub original_context: u64,
    pub context: u64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    /// YaRN: explicit attention factor (transformers' `attention_factor`), overriding mscale.
    pub yarn_attention_factor: Option<f64>,
    pub scale_law: ScaleLaw,
    /// The first `skip_layers` layers are exempt from logit scaling.
    pub skip_layers: usize,
}

/// Paper and library defaults, one place.
pub mod defaults {
    /// ABF base of the paper's Table 1 (method.md).
    pub const ABF_BASE: f64 = 500_000.0;
    /// The paper exempts layers 0 and 1 from logit scaling.
    pub const EABF_SKIP_LAYERS: usize = 2;
    /// Target window multiple used when none is given.
    pub const TARGET_MULTIPLE: u64 = 4;
    /// YaRN defaults (transformers `_compute_yarn_parameters`).
    pub const BETA_FAST: f64 = 32.0;
    pub const BETA_SLOW: f64 = 1.0;
    /// Llama 3 defaults (Llama 3.1 config).
    pub const LOW_FREQ_FACTOR: f64 = 1.0;
    pub const HIGH_FREQ_FACTOR: f64 = 4.0;
}

/// The rope facts of a model before any extension: its base and trained window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaseRope {
    pub base: f64,
    pub context: u64,
}

impl Recipe {
    /// The identity recipe of an unextended model.
    pub fn plain(model: BaseRope) -> Recipe {
        Recipe {
            method: RopeMethod::Default,
            rope_base: model.base,
            factor: 1.0,
            original_context: model.context,
            context: model.context,
            beta_fast: defaults::BETA_FAST,
            beta_slow: defaults::BETA_SLOW,
            low_freq_factor: defaults::LOW_FREQ_FACTOR,
            high_freq_factor: defaults::HIGH_FREQ_FACTOR,
            yarn_attention_factor: None,
            scale_law: ScaleLaw::None,
            skip_layers: 0,
        }
    }

    /// A method's recipe with the paper's / transformers' defaults, for a model with `model` rope.
    /// The target window is 4 x c; interpolation methods use `s = target / c`.
    pub fn for_method(method: RopeMethod, model: BaseRope) -> Recipe {
        let mut r = Recipe::plain(model);
        r.method = method;
        if method == RopeMethod::Default {
            return r;
        }
        r.context = model.context * defaults::TARGET_MULTIPLE;
        if method.uses_factor() {
            r.factor = defaults::TARGET_MULTIPLE as f64;
        }
        if method.is_abf() {
            r.rope_base = defaults::ABF_BASE;
        }
        if method == RopeMethod::Eabf {
            r.scale_law = ScaleLaw::Log;
            r.skip_layers = defaults::EABF_SKIP_LAYERS;
        }
        r
    }

    /// The step law's defaults: `L = c`, `beta = 1 / ln c` (equal to the log law at `p + 1 = k c`).
    pub fn default_step(original_context: u64) -> ScaleLaw {
        ScaleLaw::Step {
            beta: 1.0 / (original_context as f64).ln(),
            length: original_context,
        }
    }

    /// Check every field; the recipe is immutable in meaning after this.
    pub fn validate(&self) -> Result<(), RecipeError> {
        let bad = |field: &'static str, reason: String| Err(RecipeError::Invalid { field, reason });
        if !(self.rope_base.is_finite() && self.rope_base > 1.0) {
            return bad(
                "rope_base",
                format!("must be finite and > 1, got {}", self.rope_base),
            );
        }
        if !(self.factor.is_finite() && self.factor > 0.0) {
            return bad(
                "factor",
                format!("must be finite and > 0, got {}", self.factor),
            );
        }
        if self.original_context < 2 {
            return bad(
                "original_context",
                format!("must be at least 2, got {}", self.original_context),
            );
        }
        if self.context < self.original_context {
            return bad(
                "context",
                format!(
                    "target window {} is smaller than the original window {}",
                    self.context, self.original_context
                ),
            );
        }
        if matches!(self.method, RopeMethod::Yarn | RopeMethod::NtkByParts)
            && !(self.beta_fast.is_finite()
                && self.beta_slow.is_finite()
                && self.beta_fast > self.beta_slow
                && self.beta_slow > 0.0)
        {
            return bad(
                "beta_fast",
                format!(
                    "yarn needs beta_fast > beta_slow > 0, got {} and {}",
                    self.beta_fast, self.beta_slow
                ),
            );
        }
        if self.method == RopeMethod::Llama3
            && !(self.low_freq_factor > 0.0 && self.high_freq_factor > self.low_freq_factor)
        {
            return bad(
                "high_freq_factor",
                format!(
                    "llama3 needs high_freq_factor > low_freq_factor > 0, got {} and {}",
                    self.high_freq_factor, self.low_freq_factor
                ),
            );
        }
        if let Some(a) = self.yarn_attention_factor {
            if !(a.is_finite() && a > 0.0) {
                return bad(
                    "attention_factor",
                    format!("must be finite and > 0, got {a}"),
                );
            }
        }
        if let ScaleLaw::Step { beta, length } = self.scale_law {
            if !(beta.is_finite() && beta >= 0.0) {
                return bad("scale_beta", format!("must be finite and >= 0, got {beta}"));
            }
            if length == 0 {
                return bad("scale_length", "must be at least 1".to_string());
            }
        }
        Ok(())
    }
}

impl fmt::Display for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} base {} c {} -> {}",
            self.method, self.rope_base, self.original_context, self.context
        )?;
        if self.method.uses_factor() {
            write!(f, " factor {}", self.factor)?;
        }
        match self.scale_law {
            ScaleLaw::None => {}
            ScaleLaw::Log => write!(f, ", log scale law")?,
            ScaleLaw::Step { beta, length } => {
                write!(f, ", step scale law beta {beta:.6} L {length}")?
            }
        }
        if self.scale_law != ScaleLaw::None && self.skip_layers > 0 {
            write!(f, ", {} exempt layer(s)", self.skip_layers)?;
        }
        Ok(())
    }
}
