//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), written as PyTorch's
//! `torch.optim.AdamW` computes it, with f32 master weights and state whatever the compute dtype;
//! and global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_`.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::TrainError;
use crate::model::{any_shared_storage, on_cpu_slice, on_cpu_slice_mut, MutElem};

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
            let master = owned_f32(init)?;
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
        match self.master {
            // the master must not share storage with the caller's tensor: AdamW updates it in
            // place
            Some(_) => self.set_f32_fresh(owned_f32(value)?),
            None => self.set_f32_fresh(value.to_dtype(DType::F32)?),
        }
    }

    /// [`TrainParam::set_f32`] for a value no other tensor shares (one just computed).
    fn set_f32_fresh(&mut self, value: Tensor) -> Result<(), TrainError> {
        self.var.set(&value.to_dtype(self.var.dtype())?)?;
        if self.master.is_some() {
            self.master = Some(value);
        }
        Ok(())
    }
}

/// An f32 tensor with storage of its own (`to_dtype` to the same dtype shares the storage).
fn owned_f32(t: &Tensor) -> Result<Tensor, TrainError> {
    Ok(match t.dtype() {
        DType::F32 => t.copy()?,
        _ => t.to_dtype(DType::F32)?,
    })
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
        self.update_scaled(params, grads, lr, None)
    }

    /// [`AdamW::update`] with the gradients multiplied by `grad_scale` first (the clipping
    /// factor of [`clip_factor`]), in the same pass: the same bits as scaling them with
    /// [`clip_grad_norm`] and then updating, without the extra pass over every gradient.
    pub fn update_scaled(
        &mut self,
        params: &mut [TrainParam],
        grads: &[Tensor],
        lr: f64,
        grad_scale: Option<f64>,
    ) -> Result<(), TrainError> {
        self.step += 1;
        self.seen_finite.resize(params.len(), false);
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / bc1;
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let k = Coeffs::new(&c, lr, bc2, step_size, p.decay, grad_scale);
            let fused = match self.fused {
                true => fused_cpu(p, g, &self.m[i], &self.v[i], &k, c.moment_dtype())?,
                false => None,
            };
            if let Some(finite) = fused {
                self.seen_finite[i] = finite;
                continue;
            }
            self.seen_finite[i] = false;
            let mut g = g.to_dtype(DType::F32)?;
            if let Some(s) = grad_scale {
                g = g.affine(s, 0.0)?;
            }
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
            p.set_f32_fresh(w)?;
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
                // a copy of its own: the update writes the moments in place
                *slot = t
                    .to_dtype(self.cfg.moment_dtype())?
                    .to_device(p.var.device())?
                    .copy()?;
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
    /// The clipping factor, applied to each gradient element first.
    grad_scale: Option<f32>,
}

impl Coeffs {
    fn new(
        c: &AdamWConfig,
        lr: f64,
        bc2: f64,
        step_size: f64,
        decay: bool,
        grad_scale: Option<f64>,
    ) -> Coeffs {
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
            grad_scale: grad_scale.map(|s| s as f32),
        }
    }
}

/// An AdamW moment's element type on the CPU: f32, or bf16 widened to f32 for the arithmetic and
/// rounded once on the way back (`half`'s round-to-nearest-even, as candle's `to_dtype`).
trait MomentElem: MutElem + Copy + Send + Sync {
    fn get(self) -> f32;
    fn put(x: f32) -> Self;
}

impl MomentElem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(x: f32) -> f32 {
        x
    }
}

impl MomentElem for half::bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn put(x: f32) -> half::bf16 {
        half::bf16::from_f32(x)
    }
}

/// AdamW on the CPU as one pass over each parameter's elements on every core, updating weights
/// and moments in place: instead of a dozen whole-tensor candle ops, each allocating and
/// streaming the tensor, and instead of fresh output tensors (their page faults and the copy into
/// the variable cost as much as the arithmetic). Same f32 operations in the same order as the
/// tensor-op path, the clipping factor included (tests/train_optim.rs compares them bit for
/// bit). Returns whether the new weights and moments are all finite; None, with nothing
/// changed, when a tensor is not a contiguous CPU tensor of the expected dtype and size.
fn fused_cpu(
    p: &TrainParam,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &Coeffs,
    md: DType,
) -> Result<Option<bool>, TrainError> {
    // bf16 compute weights: the f32 master is updated, then rounded into the variable
    let w = match &p.master {
        Some(master) => master.clone(),
        None => p.var.as_tensor().clone(),
    };
    let n = w.elem_count();
    // every tensor checked before anything is written
    let usable = |t: &Tensor, dtype: DType| {
        t.device().is_cpu() && t.dtype() == dtype && t.is_contiguous() && t.elem_count() == n
    };
    if !(usable(&w, DType::F32) && usable(g, DType::F32) && usable(m, md) && usable(v, md)) {
        return Ok(None);
    }
    // two of them one storage (or all empty): the tensor ops, which do not write in place
    if n == 0 || any_shared_storage(&[&w, g, m, v]) {
        return Ok(None);
    }
    fn run<M: MomentElem>(
        w: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        k: &Coeffs,
    ) -> Option<bool> {
        on_cpu_slice_mut::<f32, _>(w, |ws| {
            on_cpu_slice_mut::<M, _>(m, |ms| {
                on_cpu_slice_mut::<M, _>(v, |vs| {
                    on_cpu_slice::<f32, _>(g, |gs| adamw_par(k, ws, gs, ms, vs))
                })
            })
        })
        .flatten()
        .flatten()
        .flatten()
    }
    let finite = match md {
        DType::BF16 => run::<half::bf16>(&w, g, m, v, k),
        _ => run::<f32>(&w, g, m, v, k),
    };
    if finite.is_some() && p.master.is_some() {
        p.var.set(&w.to_dtype(p.var.dtype())?)?;
    }
    Ok(finite)
}

/// The fused update over all elements, in 16k-element pieces on every core.
fn adamw_par<M: MomentElem>(
    k: &Coeffs,
    w: &mut [f32],
    g: &[f32],
    m: &mut [M],
    v: &mut [M],
) -> bool {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    w.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .map(|((w, g), (m, v))| adamw_chunk(k, w, g, m, v))
        .reduce(|| true, |a, b| a && b)
}

crate::simd::for_cpu!(
    /// [`adamw_body`] compiled for the widest vector unit the CPU has (on baseline x86-64's
    /// 4-lane SSE the loop was compute-bound on its square roots and divisions). Vector `sqrt`
    /// and `div` round exactly as scalar ones, so every variant computes the same bits.
    fn adamw_chunk<M: MomentElem>(
        k: &Coeffs,
        w: &mut [f32],
        g: &[f32],
        m: &mut [M],
        v: &mut [M],
    ) -> bool = adamw_body; ["avx512f", "avx2"]
);

/// One piece of the update: the tensor-op path's operations element by element (candle's
/// `affine(x, a, 0)` is `x * a + 0`). Returns whether all new values are finite.
#[inline(always)]
fn adamw_body<M: MomentElem>(
    k: &Coeffs,
    w: &mut [f32],
    g: &[f32],
    m: &mut [M],
    v: &mut [M],
) -> bool {
    let n = w.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    let mut bad = 0u32;
    for j in 0..n {
        let gj = match k.grad_scale {
            Some(s) => g[j] * s + 0.0,
            None => g[j],
        };
        let wd = if k.decay != 1.0 {
            w[j] * k.decay + 0.0
        } else {
            w[j]
        };
        let mj = (m[j].get() * k.b1 + 0.0) + (gj * k.one_minus_b1 + 0.0);
        let vj = (v[j].get() * k.b2 + 0.0) + ((gj * gj) * k.one_minus_b2 + 0.0);
        let denom = vj.sqrt() * k.inv_sqrt_bc2 + k.eps;
        let wn = wd - ((mj / denom) * k.step_size + 0.0);
        let (mq, vq) = (M::put(mj), M::put(vj));
        w[j] = wn;
        m[j] = mq;
        v[j] = vq;
        bad |= (!wn.is_finite() | !mq.get().is_finite() | !vq.get().is_finite()) as u32;
    }
    bad == 0
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

/// The global L2 norm of the gradients, summed in f64 (on the CPU per 16k-element piece on every
/// core, the pieces then added in order, so the result does not depend on the thread count).
pub fn grad_norm(grads: &[Tensor]) -> Result<f64, TrainError> {
    use rayon::prelude::*;
    let mut sq = 0f64;
    for g in grads {
        let fused = on_cpu_slice::<f32, _>(g, |s| {
            let parts: Vec<f64> = s.par_chunks(1 << 14).map(sum_sq_chunk).collect();
            parts.iter().sum::<f64>()
        });
        sq += match fused {
            Some(v) => v,
            None => g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?,
        };
    }
    Ok(sq.sqrt())
}

/// `clip_grad_norm_`'s factor for a gradient norm: `max_norm / (norm + 1e-6)` when that is below
/// 1 (and `max_norm > 0`, the norm finite); None when no clipping applies.
pub fn clip_factor(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (max_norm > 0.0 && norm.is_finite() && coef < 1.0).then_some(coef)
}

/// Scale the gradients so their global L2 norm is at most `max_norm` (when `max_norm > 0`), as
/// `clip_grad_norm_`. Returns the norm before clipping. (The trainer instead hands the factor to
/// [`AdamW::update_scaled`], which applies it in its own pass.)
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, TrainError> {
    let norm = grad_norm(grads)?;
    if let Some(coef) = clip_factor(norm, max_norm) {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

crate::simd::for_cpu!(
    /// Sum of squares of one piece in f64, in 8 independent lanes (a single running sum is a
    /// chain of dependent additions the compiler may not reorder, so it could not use vector
    /// registers).
    fn sum_sq_chunk(s: &[f32]) -> f64 = sum_sq_body; ["avx512f"]
);

#[inline(always)]
fn sum_sq_body(s: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = s.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += (c[l] as f64) * (c[l] as f64);
        }
    }
    let tail: f64 = it
        .remainder()
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum();
    acc.iter().sum::<f64>() + tail
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
        let k = Coeffs::new(&AdamWConfig::default(), 1e-3, 0.05, 1e-2, true, Some(0.5));
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
            let z = || Tensor::zeros((2, 2), c.moment_dtype(), &Device::Cpu).unwrap();
            let (m, v) = (z(), z());
            let out = fused_cpu(&p, &t, &m, &v, &k, c.moment_dtype()).unwrap();
            assert!(out.is_some(), "{dtype:?}, bf16 moments {bf16_moments}");
            // a transposed (non-contiguous) gradient goes to the tensor-op path
            let gt = t.t().unwrap();
            assert!(fused_cpu(&p, &gt, &m, &v, &k, c.moment_dtype())
                .unwrap()
                .is_none());
            // so do moments sharing one storage (writing both in place would wait on one lock)
            assert!(fused_cpu(&p, &t, &m, &m, &k, c.moment_dtype())
                .unwrap()
                .is_none());
        }
    }
}
