//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), written as PyTorch's
//! `torch.optim.AdamW` computes it, with f32 master weights and state whatever the compute dtype;
//! and global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_`.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::TrainError;
use crate::model::on_cpu_slice;

/// One trainable tensor: the variable the model computes with (f32 or bf16) and, when that is
/// not f32, its f32 master copy, which the optimizer updates and rounds into the variable.
#[derive(Debug)]
pub struct TrainParam {
    pub name: String,
    pub var: Var,
    pub master: Option<Tensor>,
    /// Decoupled weight decay applies (not to norms, as transformers' Trainer excludes them).
    pub decay: bool,
}

impl TrainParam {
    /// A parameter from an initial f32-or-other tensor, held in `dtype` for compute.
    /// f32 and f64 variables are their own masters (f64 serves the gradient checks).
    pub fn new(
        name: &str,
        init: &Tensor,
        dtype: DType,
        decay: bool,
    ) -> Result<TrainParam, TrainError> {
        let (var, master) = if matches!(dtype, DType::F32 | DType::F64) {
            (Var::from_tensor(&init.to_dtype(dtype)?)?, None)
        } else {
            let master = init.to_dtype(DType::F32)?;
            (Var::from_tensor(&master.to_dtype(dtype)?)?, Some(master))
        };
        Ok(TrainParam {
            name: name.to_string(),
            master,
            var,
            decay,
        })
    }

    /// The f32 value of the parameter.
    pub fn value_f32(&self) -> Result<Tensor, TrainError> {
        Ok(match &self.master {
            Some(m) => m.clone(),
            None => self.var.as_tensor().detach().to_dtype(DType::F32)?,
        })
    }

    /// Overwrite the parameter with an f32 value (rounded into the compute variable).
    pub fn set_f32(&mut self, value: &Tensor) -> Result<(), TrainError> {
        let value = value.to_dtype(DType::F32)?;
        if self.master.is_some() {
            self.var.set(&value.to_dtype(self.var.dtype())?)?;
            self.master = Some(value);
        } else {
            self.var.set(&value.to_dtype(self.var.dtype())?)?;
        }
        Ok(())
    }
}

/// AdamW hyper-parameters (the learning rate comes from the schedule each step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Keep the moments in bf16 (half the memory of f32; the update itself computes in f32 and
    /// rounds m and v once per step). Off: f32, as PyTorch's AdamW.
    #[serde(default)]
    pub bf16_moments: bool,
}

impl AdamWConfig {
    /// The dtype the moments are kept in.
    pub fn moment_dtype(&self) -> DType {
        if self.bf16_moments {
            DType::BF16
        } else {
            DType::F32
        }
    }
}

impl Default for AdamWConfig {
    /// The paper's settings (method.md): betas (0.9, 0.95), weight decay 0.1; PyTorch's eps.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            bf16_moments: false,
        }
    }
}

/// AdamW state: the step count and the first and second moments per parameter (f32, or bf16
/// with `bf16_moments`).
#[derive(Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    /// Number of updates done.
    pub step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Update contiguous CPU tensors in one fused pass (on by default; off runs the same
    /// arithmetic as whole-tensor ops, the path every other device takes).
    pub fused: bool,
    /// Per parameter: the last update's fused pass saw its new weights and f32 moments all
    /// finite, so [`AdamW::non_finite`] need not scan them again.
    seen_finite: Vec<bool>,
}

impl AdamW {
    pub fn new(params: &[TrainParam], cfg: AdamWConfig) -> Result<AdamW, TrainError> {
        let dt = cfg.moment_dtype();
        let zeros = |p: &TrainParam| Tensor::zeros(p.var.shape(), dt, p.var.device());
        Ok(AdamW {
            cfg,
            step: 0,
            fused: true,
            seen_finite: vec![false; params.len()],
            m: params.iter().map(zeros).collect::<Result<_, _>>()?,
            v: params.iter().map(zeros).collect::<Result<_, _>>()?,
        })
    }

    /// One update with f32 gradients `grads[i]` of `params[i]`:
    /// `p <- p (1 - lr wd)`; `m <- b1 m + (1 - b1) g`; `v <- b2 v + (1 - b2) g^2`;
    /// `p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
    pub fn update(
        &mut self,
        params: &mut [TrainParam],
        grads: &[Tensor],
        lr: f64,
    ) -> Result<(), TrainError> {
        self.step += 1;
        self.seen_finite.resize(params.len(), false);
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / bc1;
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let k = Coeffs::new(&c, lr, bc2, step_size, p.decay);
            let fused = match self.fused {
                true => fused_cpu(p, g, &self.m[i], &self.v[i], &k, &c)?,
                false => None,
            };
            if let Some((w, m, v, finite)) = fused {
                p.set_f32(&w)?;
                self.m[i] = m;
                self.v[i] = v;
                self.seen_finite[i] = finite;
                continue;
            }
            self.seen_finite[i] = false;
            let g = g.to_dtype(DType::F32)?;
            let mut w = p.value_f32()?;
            if k.decay != 1.0 {
                w = w.affine(k.decay as f64, 0.0)?;
            }
            let (m0, v0) = (
                self.m[i].to_dtype(DType::F32)?,
                self.v[i].to_dtype(DType::F32)?,
            );
            // the same f32 constants as the fused loop (candle's affine rounds its f64 factors
            // to f32 exactly as Coeffs did)
            let f = |x: f32| x as f64;
            let m = (m0.affine(f(k.b1), 0.0)? + g.affine(f(k.one_minus_b1), 0.0)?)?;
            let v = (v0.affine(f(k.b2), 0.0)? + g.sqr()?.affine(f(k.one_minus_b2), 0.0)?)?;
            let denom = v.sqrt()?.affine(f(k.inv_sqrt_bc2), f(k.eps))?;
            let w = (w - (m.div(&denom)?).affine(f(k.step_size), 0.0)?)?;
            p.set_f32(&w)?;
            self.m[i] = m.to_dtype(c.moment_dtype())?;
            self.v[i] = v.to_dtype(c.moment_dtype())?;
        }
        Ok(())
    }

    /// The first of the parameters (`tensor NAME`) and then of the moments (`the first/second
    /// moment of NAME`) that holds a NaN or an infinity; None when all are finite.
    pub fn non_finite(&self, params: &[TrainParam]) -> Result<Option<String>, TrainError> {
        let seen = |i: usize| self.seen_finite.get(i).copied().unwrap_or(false);
        for (i, p) in params.iter().enumerate() {
            if !seen(i) && !all_finite(&p.value_f32()?)? {
                return Ok(Some(format!("tensor {}", p.name)));
            }
        }
        for (i, p) in params.iter().enumerate().filter(|(i, _)| !seen(*i)) {
            for (t, which) in [(&self.m[i], "first"), (&self.v[i], "second")] {
                if !all_finite(t)? {
                    return Ok(Some(format!("the {which} moment of {}", p.name)));
                }
            }
        }
        Ok(None)
    }

    /// Forget what the fused pass saw: the parameters were changed after the update (the
    /// trainer's test failpoint that spoils a weight), so [`AdamW::non_finite`] scans them all.
    pub fn forget_finite_checks(&mut self) {
        self.seen_finite.iter_mut().for_each(|s| *s = false);
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self, params: &[TrainParam]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, p) in params.iter().enumerate() {
            out.insert(format!("m.{}", p.name), self.m[i].clone());
            out.insert(format!("v.{}", p.name), self.v[i].clone());
        }
        out
    }

    /// Restore the moments saved by [`AdamW::state_tensors`].
    pub fn load_state(
        &mut self,
        params: &[TrainParam],
        step: u64,
        tensors: &HashMap<String, Tensor>,
        origin: &str,
    ) -> Result<(), TrainError> {
        for (i, p) in params.iter().enumerate() {
            for (slot, prefix) in [(&mut self.m[i], "m"), (&mut self.v[i], "v")] {
                let name = format!("{prefix}.{}", p.name);
                let t = tensors.get(&name).ok_or_else(|| TrainError::Resume {
                    path: origin.to_string(),
                    reason: format!("optimizer state has no tensor {name}"),
                })?;
                if t.dims() != p.var.dims() {
                    return Err(TrainError::Resume {
                        path: origin.to_string(),
                        reason: format!(
                            "optimizer tensor {name} has shape {:?}, the parameter {:?}",
                            t.dims(),
                            p.var.dims()
                        ),
                    });
                }
                *slot = t
                    .to_dtype(self.cfg.moment_dtype())?
                    .to_device(p.var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// One update's constants, each rounded to f32 once, as candle's `affine` rounds its factors:
/// so the fused CPU loop below and the tensor-op path compute the same f32 operations in the
/// same order, bit for bit.
struct Coeffs {
    decay: f32,
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    step_size: f32,
}

impl Coeffs {
    fn new(c: &AdamWConfig, lr: f64, bc2: f64, step_size: f64, decay: bool) -> Coeffs {
        Coeffs {
            decay: if decay && c.weight_decay != 0.0 {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            },
            b1: c.beta1 as f32,
            one_minus_b1: (1.0 - c.beta1) as f32,
            b2: c.beta2 as f32,
            one_minus_b2: (1.0 - c.beta2) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: c.eps as f32,
            step_size: step_size as f32,
        }
    }
}

/// A contiguous CPU tensor's elements as f32 (bf16 widened), copied; None as for `on_cpu_slice`.
fn cpu_f32(t: &Tensor) -> Option<Vec<f32>> {
    match t.dtype() {
        DType::BF16 => on_cpu_slice::<half::bf16, _>(t, |s| s.iter().map(|x| x.to_f32()).collect()),
        _ => on_cpu_slice::<f32, _>(t, |s| s.to_vec()),
    }
}

/// AdamW on the CPU as one pass over each parameter's elements on every core, instead of a
/// dozen whole-tensor candle ops, each allocating and streaming the tensor (what made the
/// optimizer a third of a SmolLM2 step's main-thread time). Same f32 operations in the same
/// order as the tensor-op path (tests/train_optim.rs compares them bit for bit). Returns the new
/// weights and moments and whether all of them are finite (with f32 moments: bf16 ones are
/// rounded after the pass, so the guard scans those). None when a tensor is not a contiguous CPU
/// f32 (or bf16 moment) tensor.
#[allow(clippy::type_complexity)]
fn fused_cpu(
    p: &TrainParam,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Coeffs,
    c: &AdamWConfig,
) -> Result<Option<(Tensor, Tensor, Tensor, bool)>, TrainError> {
    use rayon::prelude::*;
    let w0 = p.value_f32()?;
    let g = g.to_dtype(DType::F32)?;
    let n = w0.elem_count();
    // every tensor a contiguous CPU one of the expected dtype and size, checked before any copy
    let usable = |t: &Tensor, dtype: DType| {
        t.device().is_cpu() && t.dtype() == dtype && t.is_contiguous() && t.elem_count() == n
    };
    let md = c.moment_dtype();
    if !(usable(&w0, DType::F32) && usable(&g, DType::F32) && usable(m, md) && usable(v, md)) {
        return Ok(None);
    }
    // f32 moments are read in place; bf16 ones widened into copies first
    let (wide_m, wide_v) = match md {
        DType::F32 => (None, None),
        _ => match (cpu_f32(m), cpu_f32(v)) {
            (Some(a), Some(b)) => (Some(a), Some(b)),
            _ => return Ok(None),
        },
    };
    let (mut wn, mut mn, mut vn) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    const CHUNK: usize = 1 << 14;
    let mut pass = |w0s: &[f32], gs: &[f32], m0s: &[f32], v0s: &[f32]| -> bool {
        wn.par_chunks_mut(CHUNK)
            .zip(mn.par_chunks_mut(CHUNK))
            .zip(vn.par_chunks_mut(CHUNK))
            .zip(w0s.par_chunks(CHUNK))
            .zip(gs.par_chunks(CHUNK))
            .zip(m0s.par_chunks(CHUNK).zip(v0s.par_chunks(CHUNK)))
            .map(|(((((w, m), v), w0), g), (m0, v0))| {
                let mut finite = true;
                for j in 0..w.len() {
                    // the tensor-op path's operations: affine(x, a, 0) = x * a + 0
                    let wd = if k.decay != 1.0 {
                        w0[j] * k.decay + 0.0
                    } else {
                        w0[j]
                    };
                    let mj = (m0[j] * k.b1 + 0.0) + (g[j] * k.one_minus_b1 + 0.0);
                    let vj = (v0[j] * k.b2 + 0.0) + ((g[j] * g[j]) * k.one_minus_b2 + 0.0);
                    let denom = vj.sqrt() * k.inv_sqrt_bc2 + k.eps;
                    w[j] = wd - ((mj / denom) * k.step_size + 0.0);
                    m[j] = mj;
                    v[j] = vj;
                    finite &= w[j].is_finite() & mj.is_finite() & vj.is_finite();
                }
                finite
            })
            .reduce(|| true, |a, b| a && b)
    };
    let finite = on_cpu_slice::<f32, _>(&w0, |w0s| {
        on_cpu_slice::<f32, _>(&g, |gs| match (&wide_m, &wide_v) {
            (Some(ms), Some(vs)) => Some(pass(w0s, gs, ms, vs)),
            _ => on_cpu_slice::<f32, _>(m, |ms| {
                on_cpu_slice::<f32, _>(v, |vs| pass(w0s, gs, ms, vs))
            })
            .flatten(),
        })
        .flatten()
    })
    .flatten();
    let Some(finite) = finite else {
        return Ok(None);
    };
    let dev = g.device();
    let shape = p.var.shape();
    let w = Tensor::from_vec(wn, shape, dev)?;
    let (m, v) = (
        Tensor::from_vec(mn, shape, dev)?,
        Tensor::from_vec(vn, shape, dev)?,
    );
    // f32 moments stay as they are (to_dtype to the same dtype is a clone); bf16 ones round once
    Ok(Some((
        w,
        m.to_dtype(md)?,
        v.to_dtype(md)?,
        finite && md == DType::F32,
    )))
}

/// Whether every element of `t` is finite: `x - x` is 0 for finite x and NaN for NaN and
/// infinities, so the sum is exactly 0 only when all are finite (and cannot overflow).
pub fn all_finite(t: &Tensor) -> Result<bool, TrainError> {
    use rayon::prelude::*;
    // on the CPU, a parallel scan instead of a whole-tensor subtraction and sum
    if let Some(ok) = on_cpu_slice::<f32, _>(t, |s| s.par_iter().all(|x| x.is_finite())) {
        return Ok(ok);
    }
    let s = t
        .sub(t)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(s == 0.0)
}

/// Scale the gradients so their global L2 norm is at most `max_norm` (when `max_norm > 0`), as
/// `clip_grad_norm_`: `coef = max_norm / (norm + 1e-6)`, applied when below 1. Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, TrainError> {
    use rayon::prelude::*;
    let mut sq = 0f64;
    for g in grads.iter() {
        // on the CPU one parallel pass summing in f64; elsewhere squares summed by candle
        let fused = on_cpu_slice::<f32, _>(g, |s| {
            s.par_chunks(1 << 14)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .sum::<f64>()
        });
        sq += match fused {
            Some(v) => v,
            None => g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()? as f64,
        };
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = g.affine(coef, 0.0)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused pass must actually run where it is meant to (else tests/train_optim.rs's
    /// bit-for-bit comparison would compare the tensor-op path with itself), and decline a
    /// tensor it cannot read in place.
    #[test]
    fn fused_pass_runs_for_contiguous_cpu_tensors_only() {
        let t = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu).unwrap();
        let k = Coeffs::new(&AdamWConfig::default(), 1e-3, 0.05, 1e-2, true);
        for (dtype, bf16_moments) in [
            (DType::F32, false),
            (DType::F32, true),
            (DType::BF16, false),
        ] {
            let c = AdamWConfig {
                bf16_moments,
                ..AdamWConfig::default()
            };
            let p = TrainParam::new("w", &t, dtype, true).unwrap();
            let z = Tensor::zeros((2, 2), c.moment_dtype(), &Device::Cpu).unwrap();
            let out = fused_cpu(&p, &t, &z, &z, &k, &c).unwrap();
            assert!(out.is_some(), "{dtype:?}, bf16 moments {bf16_moments}");
            // a transposed (non-contiguous) gradient goes to the tensor-op path
            let gt = t.t().unwrap();
            assert!(fused_cpu(&p, &gt, &z, &z, &k, &c).unwrap().is_none());
        }
    }
}
