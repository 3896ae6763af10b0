//! Position tables of one forward: rotary cos/sin and the per-layer logit scale on q.
//!
//! Everything is derived from the recipe (`Recipe::inv_freq`, `Recipe::attention_factor`,
//! `Recipe::logit_scale`); nothing here re-derives a frequency or a scale law.

use candle_core::{DType, Device, Result, Tensor};

use crate::rope::Recipe;

/// Rotary tables and logit scales for the absolute positions `start .. start + len`.
///
/// `cos`, `sin` are `[len, head_dim / 2]` in the model dtype, already multiplied by the recipe's
/// attention factor (YaRN's mscale; 1 otherwise), Hugging Face rotate-half layout: entry `j`
/// rotates the pair (`j`, `j + head_dim / 2`).
#[derive(Debug, Clone)]
pub struct Positions {
    start: usize,
    len: usize,
    cos: Tensor,
    sin: Tensor,
    /// Per layer: `[1, 1, len, 1]` logit scale in the model dtype, `None` where every scale is 1.
    scales: Vec<Option<Tensor>>,
}

impl Positions {
    /// Tables for a model of `num_layers` layers and rotary dimension `head_dim`, positions
    /// `start .. start + len`, in `dtype` on `device`.
    ///
    /// The angle `p * theta_j`, its cos/sin and the attention factor are evaluated in f64 and
    /// rounded once to the model dtype (f32 for f32 and bf16 models, which then round to bf16).
    /// Hugging Face forms the angle in f32, which at position 16k is off by up to ~1e-3 rad for
    /// the fastest pair; the reference here is the exact value.
    pub fn new(
        recipe: &Recipe,
        head_dim: usize,
        num_layers: usize,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Positions> {
        let rope = Rope {
            recipe,
            freq_factors: None,
        };
        Positions::build(
            &rope,
            head_dim,
            num_layers,
            start..start + len,
            dtype,
            device,
        )
    }

    /// [`Positions::new`] for `rope` (a recipe with optional per-frequency divisors) over
    /// `positions`.
    pub fn build(
        rope: &Rope<'_>,
        head_dim: usize,
        num_layers: usize,
        positions: std::ops::Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Positions> {
        let recipe = rope.recipe;
        let (start, len) = (positions.start, positions.len());
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            candle_core::bail!("rotary head dimension must be even and positive, got {head_dim}")
        }
        let half = head_dim / 2;
        // Dynamic NTK recomputes its base from the length seen so far (transformers passes
        // max position + 1); every other method ignores the argument.
        let seen = (start + len) as u64;
        let mut inv_freq = recipe.inv_freq(head_dim, Some(seen));
        if inv_freq.len() != half {
            candle_core::bail!(
                "recipe gave {} inverse frequencies for head dimension {head_dim}",
                inv_freq.len()
            )
        }
        if let Some(ff) = rope.freq_factors {
            check_freq_factors(ff, half)?;
            // ggml-cpu ops.cpp ggml_rope_cache_init: rope_yarn(theta / ff[j], ..), so the divisor
            // applies before linear/yarn scaling, which only multiply or blend per pair
            for (f, d) in inv_freq.iter_mut().zip(ff) {
                *f /= d;
            }
        }
        let factor = recipe.attention_factor();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for i in 0..len {
            let p = (start + i) as f64;
            for &f in &inv_freq {
                let a = p * f;
                cos.push(a.cos() * factor);
                sin.push(a.sin() * factor);
            }
        }
        let cos = table(cos, (len, half), dtype, device)?;
        let sin = table(sin, (len, half), dtype, device)?;

        // Layers share one scale vector (the law does not depend on the layer beyond exemption),
        // so it is built once and cloned (tensors are reference counted).
        let scaled: Option<Tensor> = if recipe.has_scaling() {
            let values: Vec<f64> = (0..len)
                .map(|i| recipe.law_scale((start + i) as u64))
                .collect();
            if values.iter().all(|&s| s == 1.0) {
                None
            } else {
                Some(scale_table(values, dtype, device)?.reshape((1, 1, len, 1))?)
            }
        } else {
            None
        };
        let scales = (0..num_layers)
            .map(|layer| {
                // logit_scale is 1 for exempt layers; the law vector covers the rest.
                let exempt = (0..len).all(|i| recipe.logit_scale(layer, (start + i) as u64) == 1.0);
                if exempt {
                    None
                } else {
                    scaled.clone()
                }
            })
            .collect();
        Ok(Positions {
            start,
            len,
            cos,
            sin,
            scales,
        })
    }

    /// The tables of positions `offset .. offset + len` of these (views, no copy).
    pub fn narrow(&self, offset: usize, len: usize) -> Result<Positions> {
        if offset + len > self.len {
            candle_core::bail!(
                "positions {offset}..{} outside the {} tabled",
                offset + len,
                self.len
            )
        }
        Ok(Positions {
            start: self.start + offset,
            len,
            cos: self.cos.narrow(0, offset, len)?,
            sin: self.sin.narrow(0, offset, len)?,
            scales: self
                .scales
                .iter()
                .map(|s| s.as_ref().map(|s| s.narrow(2, offset, len)).transpose())
                .collect::<Result<_>>()?,
        })
    }

    /// First absolute position.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[len, head_dim / 2]` cos table (attention factor included).
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }

    /// `[len, head_dim / 2]` sin table (attention factor included).
    pub fn sin(&self) -> &Tensor {
        &self.sin
    }

    /// The `[1, 1, len, 1]` logit scale of `layer`, `None` when it is 1 at every position.
    pub fn scale(&self, layer: usize) -> Option<&Tensor> {
        self.scales.get(layer).and_then(|s| s.as_ref())
    }
}

/// What the rotary tables are computed from: the recipe, and optionally llama.cpp's per-frequency
/// divisors (`rope_freqs.weight`).
///
/// The divisors exist because a GGUF's Llama 3 scaling is a tensor, not keys: llama.cpp reads no
/// Llama 3 parameters (c, bands) from which to rebuild the recipe, so the candle GGUF backend runs
/// the file the way llama.cpp does, plain recipe frequencies divided by the tensor, rather than
/// guessing a recipe that would reproduce it.
#[derive(Debug, Clone, Copy)]
pub struct Rope<'a> {
    pub recipe: &'a Recipe,
    /// `head_dim / 2` divisors, finite and > 0; None: the recipe alone.
    pub freq_factors: Option<&'a [f64]>,
}

/// Divisors must match the pairs and be finite and positive (a zero would give infinite angles).
pub fn check_freq_factors(ff: &[f64], half: usize) -> Result<()> {
    if ff.len() != half {
        candle_core::bail!(
            "{} frequency factors for {half} rotary pairs (head dimension {})",
            ff.len(),
            2 * half
        )
    }
    if let Some(x) = ff.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        candle_core::bail!("frequency factor {x} must be finite and > 0")
    }
    Ok(())
}

/// An f64 table rounded to the model dtype (f64 models keep f64; others go through f32).
fn table(values: Vec<f64>, shape: (usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    if dtype == DType::F64 {
        Tensor::from_vec(values, shape, device)
    } else {
        let v: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
        Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
    }
}

/// Logit scales the way the paper's reference patch forms them: evaluated in float32, then cast
/// to the model dtype before multiplying q (bf16: lambda(8192) = 1.0859375 for c = 4096).
fn scale_table(values: Vec<f64>, dtype: DType, device: &Device) -> Result<Tensor> {
    let len = values.len();
    if dtype == DType::F64 {
        Tensor::from_vec(values, len, device)
    } else {
        let v: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
        Tensor::from_vec(v, len, device)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod freq_factor_tests {
    use super::*;
    use crate::rope::{BaseRope, RopeMethod};

    fn tables(rope: &Rope<'_>) -> (Vec<f32>, Vec<f32>) {
        let p = Positions::build(rope, 16, 1, 0..300, DType::F32, &Device::Cpu).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (flat(p.cos()), flat(p.sin()))
    }

    /// Dividing every frequency by s is position interpolation with factor s (PI's definition),
    /// and factors of one change nothing.
    #[test]
    fn uniform_divisors_are_linear_scaling() {
        let plain = Recipe::plain(BaseRope {
            base: 10000.0,
            context: 64,
        });
        let mut linear = plain.clone();
        linear.method = RopeMethod::Linear;
        linear.factor = 4.0;
        linear.context = 256;
        let four = [4.0; 8];
        let ones = [1.0; 8];
        let divided = tables(&Rope {
            recipe: &plain,
            freq_factors: Some(&four),
        });
        let pi = tables(&Rope {
            recipe: &linear,
            freq_factors: None,
        });
        assert_eq!(divided, pi);
        let same = tables(&Rope {
            recipe: &plain,
            freq_factors: Some(&ones),
        });
        let none = tables(&Rope {
            recipe: &plain,
            freq_factors: None,
        });
        assert_eq!(same, none);
    }

    #[test]
    fn bad_divisors_are_refused() {
        let r = Recipe::plain(BaseRope {
            base: 10000.0,
            context: 64,
        });
        for bad in [
            &[1.0; 7][..],
            &[1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0][..],
            &[f64::NAN; 8][..],
        ] {
            let rope = Rope {
                recipe: &r,
                freq_factors: Some(bad),
            };
            assert!(Positions::build(&rope, 16, 1, 0..4, DType::F32, &Device::Cpu).is_err());
        }
    }
}
