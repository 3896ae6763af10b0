//! The trainable parameter set: every weight (full fine-tuning), or LongLoRA's choice (Chen et
//! al. 2024): low-rank adapters on the attention and MLP projections plus trainable norms and
//! embeddings, merged into the weights at save.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::data::SplitMix64;
use super::optim::TrainParam;
use super::TrainError;

/// The projections that get adapters (transformers LLaMA names).
pub const LORA_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Adapter rank and scale numerator: the update is `(alpha / rank) B A`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
}

/// Whether a weight is a LoRA target (`...{target}.weight`).
pub fn is_lora_target(name: &str) -> bool {
    name.strip_suffix(".weight")
        .and_then(|p| p.rsplit('.').next())
        .is_some_and(|last| LORA_TARGETS.contains(&last))
}

/// Norms and embeddings stay trainable under LoRA (LongLoRA's "embed,norm").
pub fn is_norm_or_embedding(name: &str) -> bool {
    name.contains("norm") || name.contains("embed_tokens")
}

/// Weight decay applies to matrices, not to norm gains (as transformers' Trainer does).
fn decays(name: &str, t: &Tensor) -> bool {
    t.rank() >= 2 && !name.contains("norm")
}

#[derive(Debug)]
struct Adapter {
    base: String,
    a: usize,
    b: usize,
}

/// Trainable parameters, frozen weights and adapters of one model.
#[derive(Debug)]
pub struct ParamSet {
    pub params: Vec<TrainParam>,
    frozen: HashMap<String, Tensor>,
    adapters: Vec<Adapter>,
    lora: Option<LoraConfig>,
    /// Every weight name of the model in checkpoint order, and its on-disk dtype.
    names: Vec<(String, DType)>,
}

impl ParamSet {
    /// Every weight trainable. `weights` are the checkpoint's tensors (any float dtype).
    pub fn full(weights: Vec<(String, Tensor)>, dtype: DType) -> Result<ParamSet, TrainError> {
        let mut params = Vec::with_capacity(weights.len());
        let mut names = Vec::with_capacity(weights.len());
        for (name, t) in weights {
            names.push((name.clone(), t.dtype()));
            params.push(TrainParam::new(&name, &t, dtype, decays(&name, &t))?);
        }
        Ok(ParamSet {
            params,
            frozen: HashMap::new(),
            adapters: Vec::new(),
            lora: None,
            names,
        })
    }

    /// LoRA: adapters `A` (`[rank, in]`, uniform in `+-1/sqrt(in)` as PEFT's Kaiming-uniform
    /// init gives) and `B` (`[out, rank]`, zeros, so training starts from the base model) on each
    /// target; norms and embeddings trainable; the rest frozen. `seed` makes `A` reproducible.
    pub fn lora(
        weights: Vec<(String, Tensor)>,
        dtype: DType,
        cfg: LoraConfig,
        seed: u64,
    ) -> Result<ParamSet, TrainError> {
        if cfg.rank == 0 {
            return Err(TrainError::Config("--lora rank must be at least 1".into()));
        }
        let mut rng = SplitMix64(seed ^ 0x4C6F_5241);
        let mut set = ParamSet {
            params: Vec::new(),
            frozen: HashMap::new(),
            adapters: Vec::new(),
            lora: Some(cfg),
            names: Vec::new(),
        };
        for (name, t) in weights {
            set.names.push((name.clone(), t.dtype()));
            if is_lora_target(&name) && t.rank() == 2 {
                let (out, inp) = t.dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..cfg.rank * inp)
                    .map(|_| {
                        ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound
                    })
                    .map(|x| x as f32)
                    .collect();
                let a = Tensor::from_vec(a, (cfg.rank, inp), t.device())?;
                let b = Tensor::zeros((out, cfg.rank), DType::F32, t.device())?;
                let prefix = name.trim_end_matches(".weight");
                set.params.push(TrainParam::new(
                    &format!("{prefix}.lora_A.weight"),
                    &a,
                    dtype,
                    true,
                )?);
                set.params.push(TrainParam::new(
                    &format!("{prefix}.lora_B.weight"),
                    &b,
                    dtype,
                    true,
                )?);
                set.adapters.push(Adapter {
                    base: name.clone(),
                    a: set.params.len() - 2,
                    b: set.params.len() - 1,
                });
                set.frozen.insert(name, t.to_dtype(dtype)?);
            } else if is_norm_or_embedding(&name) {
                let decay = decays(&name, &t);
                set.params.push(TrainParam::new(&name, &t, dtype, decay)?);
            } else {
                set.frozen.insert(name, t.to_dtype(dtype)?);
            }
        }
        Ok(set)
    }

    pub fn lora_config(&self) -> Option<LoraConfig> {
        self.lora
    }

    fn scale(&self) -> f64 {
        self.lora.map(|c| c.alpha / c.rank as f64).unwrap_or(1.0)
    }

    /// The tensors a model is built from for one step: trainable variables, frozen weights, and
    /// for adapted weights `W + (alpha/r) B A` (a graph node, so gradients reach `A` and `B`).
    pub fn weight_map(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let mut map = HashMap::with_capacity(self.names.len());
        for p in &self.params {
            map.insert(p.name.clone(), p.var.as_tensor().clone());
        }
        for (name, t) in &self.frozen {
            map.insert(name.clone(), t.clone());
        }
        let s = self.scale();
        for ad in &self.adapters {
            let a = self.params[ad.a].var.as_tensor();
            let b = self.params[ad.b].var.as_tensor();
            // s A is rank x in: scaling it rather than B A keeps one full-size node fewer in
            // the graph (B (s A) and the sum, not B A, s B A and the sum)
            let delta = b.matmul(&a.affine(s, 0.0)?)?;
            let w = (&self.frozen[&ad.base] + delta)?;
            map.insert(ad.base.clone(), w);
        }
        Ok(map)
    }

    /// The model's weights with adapters merged, in f32 master precision then `dtype` (None: each
    /// weight's dtype in the input checkpoint), in checkpoint order.
    pub fn export(&self, dtype: Option<DType>) -> Result<Vec<(String, Tensor)>, TrainError> {
        let mut by_name: HashMap<&str, Tensor> = HashMap::new();
        for p in &self.params {
            by_name.insert(&p.name, p.value_f32()?);
        }
        let s = self.scale();
        let mut merged: HashMap<&str, Tensor> = HashMap::new();
        for ad in &self.adapters {
            let a = self.params[ad.a].value_f32()?;
            let b = self.params[ad.b].value_f32()?;
            let w =
                (self.frozen[&ad.base].to_dtype(DType::F32)? + b.matmul(&a)?.affine(s, 0.0)?)?;
            merged.insert(&ad.base, w);
        }
        let mut out = Vec::with_capacity(self.names.len());
        for (name, orig) in &self.names {
            let t = match (merged.remove(name.as_str()), by_name.remove(name.as_str())) {
                (Some(t), _) | (None, Some(t)) => t,
                (None, None) => self.frozen[name].clone(),
            };
            out.push((
                name.clone(),
                t.to_dtype(dtype.unwrap_or(*orig))?
                    .to_device(&Device::Cpu)?,
            ));
        }
        Ok(out)
    }

    /// Number of trainable and total scalars.
    pub fn counts(&self) -> (usize, usize) {
        let trainable: usize = self.params.iter().map(|p| p.var.elem_count()).sum();
        let frozen: usize = self.frozen.values().map(|t| t.elem_count()).sum();
        let adapters: usize = self
            .adapters
            .iter()
            .map(|a| self.params[a.a].var.elem_count() + self.params[a.b].var.elem_count())
            .sum();
        (trainable, frozen + trainable - adapters)
    }
}
