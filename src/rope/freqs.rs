//! Inverse frequencies, attention factor and logit scale of a recipe, in f64.
//!
//! Each method follows Hugging Face transformers' `modeling_rope_utils` (the `_compute_*_parameters`
//! functions); the logit scales follow method.md (Li et al. 2024, and Llama 4 / Mistral 3).

use std::f64::consts::PI;

use super::recipe::{Recipe, RopeMethod, ScaleLaw};

/// `theta_j = b^(-2j/d)` for `j = 0 .. d/2`.
pub fn base_inv_freq(base: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|j| base.powf(-((2 * j) as f64) / dim as f64))
        .collect()
}

/// The NTK-aware base `b * s^(d/(d-2))`.
pub fn ntk_base(base: f64, factor: f64, dim: usize) -> f64 {
    base * factor.powf(dim as f64 / (dim as f64 - 2.0))
}

/// The dynamic-NTK base for a sequence of `seq_len` tokens:
/// `b * ((s * L_cur / L) - (s - 1))^(d/(d-2))`, `L_cur = max(seq_len, L)`.
pub fn dynamic_base(base: f64, factor: f64, dim: usize, original: u64, seq_len: u64) -> f64 {
    let cur = seq_len.max(original) as f64;
    let l = original as f64;
    base * ((factor * cur / l) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0))
}

/// YaRN's correction dimension: the pair index whose wavelength fits `rotations` times in `len`.
fn correction_dim(rotations: f64, dim: usize, base: f64, len: u64) -> f64 {
    dim as f64 * (len as f64 / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln())
}

/// YaRN's ramp bounds `(low, high)` in pair indices, truncated and clamped to `[0, d-1]`.
pub fn yarn_range(beta_fast: f64, beta_slow: f64, dim: usize, base: f64, len: u64) -> (f64, f64) {
    let low = correction_dim(beta_fast, dim, base, len).floor();
    let high = correction_dim(beta_slow, dim, base, len).ceil();
    (low.max(0.0), high.min(dim as f64 - 1.0))
}

/// YaRN's `mscale = 0.1 ln s + 1` (1 when `s <= 1`).
pub fn yarn_mscale(factor: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * factor.ln() + 1.0
    }
}

impl Recipe {
    /// The base the frequencies are computed from, for a sequence of `seq_len` tokens.
    pub fn effective_base(&self, dim: usize, seq_len: Option<u64>) -> f64 {
        match self.method {
            RopeMethod::Ntk => ntk_base(self.rope_base, self.factor, dim),
            RopeMethod::Dynamic => dynamic_base(
                self.rope_base,
                self.factor,
                dim,
                self.original_context,
                seq_len.unwrap_or(self.original_context),
            ),
            _ => self.rope_base,
        }
    }

    /// Inverse frequency of every rotary pair (`dim / 2` values) for rotary dimension `dim`.
    /// `seq_len` matters only for `dynamic` (transformers recomputes it as the sequence grows).
    pub fn inv_freq(&self, dim: usize, seq_len: Option<u64>) -> Vec<f64> {
        let base = self.effective_base(dim, seq_len);
        let theta = base_inv_freq(base, dim);
        let s = self.factor;
        match self.method {
            RopeMethod::Default
            | RopeMethod::Abf
            | RopeMethod::Eabf
            | RopeMethod::Ntk
            | RopeMethod::Dynamic => theta,
            RopeMethod::Linear => theta.into_iter().map(|t| t / s).collect(),
            RopeMethod::Yarn | RopeMethod::NtkByParts => {
                let (low, mut high) = yarn_range(
                    self.beta_fast,
                    self.beta_slow,
                    dim,
                    base,
                    self.original_context,
                );
                if low == high {
                    // transformers avoids a zero division the same way
                    high += 0.001;
                }
                theta
                    .into_iter()
                    .enumerate()
                    .map(|(j, t)| {
                        let ramp = ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (t / s) * (1.0 - extrapolation) + t * extrapolation
                    })
                    .collect()
            }
            RopeMethod::Llama3 => {
                let old = self.original_context as f64;
                let low_wavelen = old / self.low_freq_factor;
                let high_wavelen = old / self.high_freq_factor;
                theta
                    .into_iter()
                    .map(|t| {
                        let wavelen = 2.0 * PI / t;
                        if wavelen < high_wavelen {
                            t
                        } else if wavelen > low_wavelen {
                            t / s
                        } else {
                            let smooth = (old / wavelen - self.low_freq_factor)
                                / (self.high_freq_factor - self.low_freq_factor);
                            (1.0 - smooth) * t / s + smooth * t
                        }
                    })
                    .collect()
            }
        }
    }

    /// The factor on cos and sin (YaRN's mscale; 1 for every other method).
    pub fn attention_factor(&self) -> f64 {
        match self.method {
            RopeMethod::Yarn => self
                .yarn_attention_factor
                .unwrap_or_else(|| yarn_mscale(self.factor)),
            _ => 1.0,
        }
    }

    /// The logit scale law evaluated at a 0-based position, ignoring exempt layers.
    pub fn law_scale(&self, position: u64) -> f64 {
        match self.scale_law {
            ScaleLaw::None => 1.0,
            // lambda(n) = max(1, ln n / ln c), n = p + 1 (method.md; paper eq. for entropy-aware ABF)
            ScaleLaw::Log => {
                let n = (position + 1) as f64;
                (n.ln() / (self.original_context as f64).ln()).max(1.0)
            }
            // s(p) = 1 + beta ln(1 + floor(p / L)) (llama.cpp mistral3, transformers ministral3)
            ScaleLaw::Step { beta, length } => 1.0 + beta * ((1 + position / length) as f64).ln(),
        }
    }

    /// The factor on q (after RoPE) of the query at `position` in `layer`.
    pub fn logit_scale(&self, layer: usize, position: u64) -> f64 {
        if self.scale_law == ScaleLaw::None || layer < self.skip_layers {
            1.0
        } else {
            self.law_scale(position)
        }
    }

    /// Whether any layer at any position can have a scale other than 1.
    pub fn has_scaling(&self) -> bool {
        self.scale_law != ScaleLaw::None
    }
}
