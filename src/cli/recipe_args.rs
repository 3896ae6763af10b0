//! The recipe flags shared by every binary, and how they combine with a model's own recipe.
//! The library takes the resolved `Recipe`; resolving flags is the command line's business.

use clap::{Args, ValueEnum};

use crate::rope::{defaults, BaseRope, Recipe, RecipeError, RopeMethod, ScaleLaw};

/// `--scale-law`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScaleLawArg {
    /// No attention-logit scaling.
    None,
    /// max(1, ln(p+1)/ln c), the paper's law.
    Log,
    /// 1 + beta ln(1 + floor(p/L)), the law runtimes apply.
    Step,
}

/// Recipe flags: every binary flattens this one set.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub struct RecipeArgs {
    /// Rope method: default, linear, ntk, dynamic, yarn, ntk-by-parts, llama3, abf, eabf.
    #[arg(long, value_parser = parse_method, help_heading = "Recipe")]
    pub method: Option<RopeMethod>,
    /// RoPE base in use after the extension (ABF/eabf default 500000).
    #[arg(long, help_heading = "Recipe")]
    pub rope_base: Option<f64>,
    /// Scale factor s of linear/ntk/dynamic/yarn/ntk-by-parts/llama3 (default: context / original context).
    #[arg(long, help_heading = "Recipe")]
    pub factor: Option<f64>,
    /// Pretraining window c.
    #[arg(long, help_heading = "Recipe")]
    pub original_context: Option<u64>,
    /// Target window (default 4 x c).
    #[arg(long, help_heading = "Recipe")]
    pub context: Option<u64>,
    /// YaRN / NTK-by-parts beta_fast (default 32).
    #[arg(long, help_heading = "Recipe")]
    pub beta_fast: Option<f64>,
    /// YaRN / NTK-by-parts beta_slow (default 1).
    #[arg(long, help_heading = "Recipe")]
    pub beta_slow: Option<f64>,
    /// Llama 3 low frequency factor (default 1).
    #[arg(long, help_heading = "Recipe")]
    pub low_freq_factor: Option<f64>,
    /// Llama 3 high frequency factor (default 4).
    #[arg(long, help_heading = "Recipe")]
    pub high_freq_factor: Option<f64>,
    /// YaRN attention factor on cos/sin (default 0.1 ln s + 1).
    #[arg(long, help_heading = "Recipe")]
    pub attention_factor: Option<f64>,
    /// Attention-logit scale law: none, log (max(1, ln(p+1)/ln c)), step (1 + beta ln(1 + floor(p/L))).
    #[arg(long, value_enum, help_heading = "Recipe")]
    pub scale_law: Option<ScaleLawArg>,
    /// Step law beta (default 1 / ln c).
    #[arg(long, help_heading = "Recipe")]
    pub beta: Option<f64>,
    /// Step law length L (default c).
    #[arg(long, help_heading = "Recipe")]
    pub scale_length: Option<u64>,
    /// Number of first layers exempt from scaling (default 2 for log, 0 for step).
    #[arg(long, help_heading = "Recipe")]
    pub skip_layers: Option<usize>,
}

fn parse_method(s: &str) -> Result<RopeMethod, String> {
    s.parse().map_err(|e: RecipeError| e.to_string())
}

impl RecipeArgs {
    /// True when no recipe flag was given.
    pub fn is_empty(&self) -> bool {
        *self == RecipeArgs::default()
    }

    /// Lay the flags over `current`, the recipe a checkpoint already has (its base and window
    /// are the model's).
    pub fn resolve_over(&self, current: &Recipe) -> Result<Recipe, RecipeError> {
        let model = BaseRope {
            base: current.rope_base,
            context: current.original_context,
        };
        self.resolve(Some(current), model)
    }

    /// Apply the flags. `current` is the recipe a model or file already has (None: plain rope of
    /// `model`). With `--method`, the method's defaults are laid over the current base and window
    /// first; every other flag then overrides one field.
    pub fn resolve(
        &self,
        current: Option<&Recipe>,
        model: BaseRope,
    ) -> Result<Recipe, RecipeError> {
        let current = current.cloned().unwrap_or_else(|| Recipe::plain(model));
        let c = self.original_context.unwrap_or(current.original_context);
        let mut r = match self.method {
            Some(method) => {
                let base = BaseRope {
                    base: current.rope_base,
                    context: c,
                };
                Recipe::for_method(method, base)
            }
            None => {
                let mut r = current.clone();
                r.original_context = c;
                r
            }
        };
        if let Some(b) = self.rope_base {
            r.rope_base = b;
        }
        match (self.factor, self.context) {
            (Some(f), Some(t)) => {
                r.factor = f;
                r.context = t;
            }
            (Some(f), None) => {
                r.factor = f;
                if r.method.uses_factor() {
                    r.context = (f * c as f64).round() as u64;
                }
            }
            (None, Some(t)) => {
                r.context = t;
                if r.method.uses_factor() {
                    r.factor = t as f64 / c as f64;
                }
            }
            (None, None) => {
                if self.method.is_some() {
                    // the method's default target is relative to c
                    r.context = r.context.max(c);
                }
            }
        }
        if let Some(v) = self.beta_fast {
            r.beta_fast = v;
        }
        if let Some(v) = self.beta_slow {
            r.beta_slow = v;
        }
        if let Some(v) = self.low_freq_factor {
            r.low_freq_factor = v;
        }
        if let Some(v) = self.high_freq_factor {
            r.high_freq_factor = v;
        }
        if let Some(v) = self.attention_factor {
            r.yarn_attention_factor = Some(v);
        }
        self.apply_scale_law(&mut r, current.original_context, c)?;
        if let Some(k) = self.skip_layers {
            r.skip_layers = k;
        }
        r.validate()?;
        Ok(r)
    }

    /// `--scale-law`, `--beta`, `--scale-length` over `r`; `c` is the window after the flags,
    /// `old_c` the current recipe's.
    fn apply_scale_law(&self, r: &mut Recipe, old_c: u64, c: u64) -> Result<(), RecipeError> {
        let law_changed = self.scale_law.is_some();
        match self.scale_law {
            Some(ScaleLawArg::None) => {
                r.scale_law = ScaleLaw::None;
                r.skip_layers = 0;
            }
            Some(ScaleLawArg::Log) => {
                r.scale_law = ScaleLaw::Log;
                r.skip_layers = defaults::EABF_SKIP_LAYERS;
            }
            Some(ScaleLawArg::Step) => {
                r.scale_law = Recipe::default_step(c);
                r.skip_layers = 0;
            }
            None => {}
        }
        if self.beta.is_some() || self.scale_length.is_some() {
            match &mut r.scale_law {
                ScaleLaw::Step { beta, length } => {
                    if let Some(b) = self.beta {
                        *beta = b;
                    }
                    if let Some(l) = self.scale_length {
                        *length = l;
                    }
                }
                _ => {
                    return Err(RecipeError::Invalid {
                        field: "beta",
                        reason: "--beta and --scale-length apply to the step scale law only \
                             (add --scale-law step)"
                            .to_string(),
                    })
                }
            }
        } else if !law_changed && self.original_context.is_some() {
            // a new c moves the step law's defaults with it
            if let ScaleLaw::Step { .. } = r.scale_law {
                if self.method.is_some() || old_c != c {
                    r.scale_law = Recipe::default_step(c);
                }
            }
        }
        Ok(())
    }
}
