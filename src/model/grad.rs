//! The backward of a decoder layer's position-wise operations written out, with no autograd
//! graph: RMSNorm, SwiGLU and RoPE (the logit scale is a plain product). Contiguous f32 tensors on
//! the CPU take the fused kernels of [`super::cpu`]; everything else (CUDA, bf16, f64) the same
//! formulas as tensor ops, which the tests below compare the kernels with in f64.

use candle_core::{Result, Tensor, D};

use super::cpu;
use super::ops::{self, compute_dtype, Path};

/// RMSNorm as [`ops::rms_norm`] computes it (in f32, f64 for f64 models, rounded once to the
/// dtype of `x`), also returning `r = 1 / sqrt(mean(x^2) + eps)` (shaped as `x` with a last
/// dimension of 1, compute dtype) for the backward.
pub fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    match cpu::rms_forward(x, w, eps) {
        Some(out) => out,
        None => rms_forward_ops(x, w, eps),
    }
}

pub(crate) fn rms_forward_ops(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let cdt = compute_dtype(x.dtype());
    let xf = x.to_dtype(cdt)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let y = xf
        .broadcast_mul(&r)?
        .broadcast_mul(&w.to_dtype(cdt)?)?
        .to_dtype(x.dtype())?;
    Ok((y, r))
}

/// RMSNorm's backward with a residual gradient added: for `y = x r w` (`r` from
/// [`rms_forward`]) and output gradient `dy`, `dx = add + r (dy w) - x r^3 mean(dy w x)` in the
/// dtype of `x` and `dw = sum over positions of dy x r` in the compute dtype.
/// (`dr/dx_i = -r^3 x_i / n`, so `dx_i = r g_i - x_i r^3 sum_j g_j x_j / n` with `g = dy w`.)
pub fn rms_backward(
    dy: &Tensor,
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    add: &Tensor,
) -> Result<(Tensor, Tensor)> {
    match cpu::rms_backward(dy, x, r, w, add) {
        Some(out) => out,
        None => rms_backward_ops(dy, x, r, w, add),
    }
}

pub(crate) fn rms_backward_ops(
    dy: &Tensor,
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    add: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cdt = compute_dtype(x.dtype());
    let h = x.dim(D::Minus1)?;
    let (xf, dyf) = (x.to_dtype(cdt)?, dy.to_dtype(cdt)?);
    let g = dyf.broadcast_mul(&w.to_dtype(cdt)?)?;
    let c = ((&g * &xf)?.sum_keepdim(D::Minus1)? * r.powf(3.0)?)?.affine(1.0 / h as f64, 0.0)?;
    let dx = (g.broadcast_mul(r)? - xf.broadcast_mul(&c)?)?;
    let dx = (add.to_dtype(cdt)? + dx)?.to_dtype(x.dtype())?;
    let dw = (dyf * xf.broadcast_mul(r)?)?.reshape(((), h))?.sum(0)?;
    Ok((dx, dw))
}

/// SwiGLU's product `silu(g) u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    match cpu::swiglu(g, u) {
        Some(out) => out,
        None => g.silu()? * u,
    }
}

/// SwiGLU's backward: for `m = silu(g) u` and `dm`, `(dg, du)` with `du = dm silu(g)` and
/// `dg = dm u s (1 + g (1 - s))`, `s` the logistic sigmoid of `g` (`silu' = s + g s (1 - s)`).
pub fn swiglu_backward(dm: &Tensor, g: &Tensor, u: &Tensor) -> Result<(Tensor, Tensor)> {
    match cpu::swiglu_backward(dm, g, u) {
        Some(out) => out,
        None => swiglu_backward_ops(dm, g, u),
    }
}

pub(crate) fn swiglu_backward_ops(dm: &Tensor, g: &Tensor, u: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = (g.neg()?.exp()? + 1.0)?.recip()?;
    let du = (dm * (g * &s)?)?;
    let ds = ((g * (1.0 - &s)?)? + 1.0)?;
    let dg = ((dm * u)? * (s * ds)?)?;
    Ok((dg, du))
}

/// The backward of [`ops::rope`]: each pair is rotated by the transposed matrix, which is the
/// rotation with `sin` negated (`[[c, -s], [s, c]]^T = [[c, s], [-s, c]]`; the tables' attention
/// factor scales both entries alike).
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor, path: Path) -> Result<Tensor> {
    ops::rope(dy, cos, &sin.neg()?, path)
}

/// `sum_i mask_i * -log softmax(logits_i)[target_i]` in f32 (f64 for f64 models), with
/// log-softmax written from differentiable ops (max-subtract, exp, sum, log): candle's fused
/// softmax has no backward.
pub fn masked_nll_sum(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dtype = compute_dtype(logits.dtype());
    let logits = logits.to_dtype(dtype)?;
    // The max is a constant shift: detaching it leaves the value and the gradient unchanged.
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    let nll = (lse - picked)?.squeeze(D::Minus1)?;
    (nll * mask.to_dtype(dtype)?)?.sum_all()?.to_dtype(dtype)
}

/// `scale * masked_nll_sum` of logits `[rows, vocab]` (targets `[rows]` u32, mask `[rows]`): its
/// value and its gradient with respect to the logits (compute dtype). f32 on the CPU takes one
/// fused pass per row ([`cpu::masked_nll_backward`]); elsewhere autograd differentiates
/// [`masked_nll_sum`].
pub fn masked_nll_backward(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<(Tensor, f64)> {
    let logits = logits.to_dtype(compute_dtype(logits.dtype()))?;
    let mask = mask.to_dtype(logits.dtype())?;
    if let Some(out) = cpu::masked_nll_backward(&logits, targets, &mask, scale) {
        return out;
    }
    masked_nll_backward_ops(&logits, targets, &mask, scale)
}

pub(crate) fn masked_nll_backward_ops(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<(Tensor, f64)> {
    let lv = candle_core::Var::from_tensor(&logits.detach())?;
    let loss = masked_nll_sum(lv.as_tensor(), targets, mask)?.affine(scale, 0.0)?;
    let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    let grad = match loss.backward()?.get(lv.as_tensor()) {
        Some(g) => g.clone(),
        None => lv.as_tensor().zeros_like()?,
    };
    Ok((grad, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Deterministic values in about +-2, some large enough to saturate the sigmoid.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let v = (s >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0;
                if i % 97 == 0 {
                    v * 20.0
                } else {
                    v
                }
            })
            .collect()
    }

    fn t(dims: &[usize], seed: u64) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(values(n, seed), dims, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Same values to `tol` relative to the largest magnitude of `want`.
    fn close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let (g, w) = (flat(got), flat(want));
        let scale = w.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!((a - b).abs() <= tol * scale, "{what}[{i}]: {a} vs {b}");
        }
    }

    fn f64s(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F64).unwrap()
    }

    /// The fused f32 kernels against the tensor-op formulas evaluated in f64 on the same inputs,
    /// at a width with a tail after the 8-lane chunks and rows that split across tasks.
    #[test]
    fn fused_kernels_equal_the_formulas_in_f64() {
        for (rows, h) in [(3usize, 5usize), (300, 77), (1, 576)] {
            let (x, w, dy, add) = (
                t(&[rows, h], 1),
                t(&[h], 2),
                t(&[rows, h], 3),
                t(&[rows, h], 4),
            );
            let (y, r) = cpu::rms_forward(&x, &w, 1e-5).unwrap().unwrap();
            let (y64, r64) = rms_forward_ops(&f64s(&x), &f64s(&w), 1e-5).unwrap();
            close(&y, &y64, 1e-6, "rms y");
            close(&r, &r64, 1e-6, "rms r");
            let (dx, dw) = cpu::rms_backward(&dy, &x, &r, &w, &add).unwrap().unwrap();
            let (dx64, dw64) =
                rms_backward_ops(&f64s(&dy), &f64s(&x), &r64, &f64s(&w), &f64s(&add)).unwrap();
            close(&dx, &dx64, 1e-5, "rms dx");
            close(&dw, &dw64, 1e-5, "rms dw");
            let (g, u, dm) = (t(&[rows, h], 5), t(&[rows, h], 6), t(&[rows, h], 7));
            let m = cpu::swiglu(&g, &u).unwrap().unwrap();
            let m64 = (f64s(&g).silu().unwrap() * f64s(&u)).unwrap();
            close(&m, &m64, 1e-6, "swiglu");
            let (dg, du) = cpu::swiglu_backward(&dm, &g, &u).unwrap().unwrap();
            let (dg64, du64) = swiglu_backward_ops(&f64s(&dm), &f64s(&g), &f64s(&u)).unwrap();
            close(&dg, &dg64, 1e-6, "swiglu dg");
            close(&du, &du64, 1e-6, "swiglu du");
        }
        // not contiguous, or not f32: the kernels decline
        let x = t(&[4, 6], 1);
        assert!(cpu::rms_forward(&x.t().unwrap(), &t(&[4], 2), 1e-5).is_none());
        assert!(cpu::swiglu(&f64s(&x), &f64s(&x)).is_none());
    }

    /// The fused loss kernel against autograd through `masked_nll_sum` in f64: value and gradient,
    /// with masked rows, logits far apart (one row's softmax saturates) and targets at both ends
    /// of the vocabulary; an out-of-vocabulary target is declined.
    #[test]
    fn fused_loss_equals_autograd_in_f64() {
        let (rows, vocab) = (7usize, 300usize);
        let logits = t(&[rows, vocab], 21);
        let targets = Tensor::new(&[0u32, 299, 5, 150, 7, 299, 42], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[1f32, 1., 0., 1., 0.5, 1., 0.], &Device::Cpu).unwrap();
        let (g, v) = cpu::masked_nll_backward(&logits, &targets, &mask, 0.25)
            .unwrap()
            .unwrap();
        let (g64, v64) =
            masked_nll_backward_ops(&f64s(&logits), &targets, &f64s(&mask), 0.25).unwrap();
        assert!((v - v64).abs() < 1e-6 * v64.abs(), "{v} {v64}");
        close(&g, &g64, 1e-6, "loss gradient");
        let bad = Tensor::new(&[0u32, 300, 5, 150, 7, 299, 42], &Device::Cpu).unwrap();
        assert!(cpu::masked_nll_backward(&logits, &bad, &mask, 0.25).is_none());
    }

    /// The formulas are the derivatives: central differences in f64 of `<f(x), dy>` for
    /// RMSNorm (x and w), SwiGLU (g and u) and RoPE (values in +-2, so the differences' rounding
    /// stays far below the tolerance).
    #[test]
    fn formulas_match_central_differences() {
        let (rows, h) = (3usize, 6usize);
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap().clamp(-2.0, 2.0).unwrap();
        let (x, w, dy) = (
            f64s(&t(&[rows, h], 11)),
            f64s(&t(&[h], 12)),
            f64s(&t(&[rows, h], 13)),
        );
        let zero = x.zeros_like().unwrap();
        let (_, r) = rms_forward_ops(&x, &w, 1e-5).unwrap();
        let (dx, dw) = rms_backward_ops(&dy, &x, &r, &w, &zero).unwrap();
        let dot = |a: &Tensor, b: &Tensor| {
            (a * b)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let bump = |v: &Tensor, i: usize, e: f64| {
            let mut f = flat(v);
            f[i] += e;
            Tensor::from_vec(f, v.dims(), &Device::Cpu).unwrap()
        };
        let fd = |f: &dyn Fn(&Tensor) -> f64, v: &Tensor, i: usize| {
            (f(&bump(v, i, 1e-6)) - f(&bump(v, i, -1e-6))) / 2e-6
        };
        let lx = |v: &Tensor| dot(&rms_forward_ops(v, &w, 1e-5).unwrap().0, &dy);
        let lw = |v: &Tensor| dot(&rms_forward_ops(&x, v, 1e-5).unwrap().0, &dy);
        for i in [0, 7, rows * h - 1] {
            let (a, b) = (fd(&lx, &x, i), flat(&dx)[i]);
            assert!(
                (a - b).abs() < 1e-7 * (1.0 + b.abs()),
                "rms dx[{i}] {a} {b}"
            );
        }
        for i in [0, h - 1] {
            let (a, b) = (fd(&lw, &w, i), flat(&dw)[i]);
            assert!(
                (a - b).abs() < 1e-7 * (1.0 + b.abs()),
                "rms dw[{i}] {a} {b}"
            );
        }
        let (g, u) = (f64s(&t(&[rows, h], 14)), f64s(&t(&[rows, h], 15)));
        let (dg, du) = swiglu_backward_ops(&dy, &g, &u).unwrap();
        let lg = |v: &Tensor| dot(&(v.silu().unwrap() * &u).unwrap(), &dy);
        let lu = |v: &Tensor| dot(&(g.silu().unwrap() * v).unwrap(), &dy);
        for i in [0, 5, rows * h - 1] {
            let (a, b) = (fd(&lg, &g, i), flat(&dg)[i]);
            assert!(
                (a - b).abs() < 1e-7 * (1.0 + b.abs()),
                "swiglu dg[{i}] {a} {b}"
            );
            let (a, b) = (fd(&lu, &u, i), flat(&du)[i]);
            assert!(
                (a - b).abs() < 1e-7 * (1.0 + b.abs()),
                "swiglu du[{i}] {a} {b}"
            );
        }
        // RoPE over [1, 2 heads, 3 positions, 4]: tables with an attention factor of 1.3
        let q = f64s(&t(&[1, 2, 3, 4], 16));
        let dq = f64s(&t(&[1, 2, 3, 4], 17));
        let ang = Tensor::new(&[[0.0f64, 0.0], [0.9, 0.1], [1.8, 0.2]], &Device::Cpu).unwrap();
        let (cos, sin) = (
            (ang.cos().unwrap() * 1.3).unwrap(),
            (ang.sin().unwrap() * 1.3).unwrap(),
        );
        let back = rope_backward(&dq, &cos, &sin, Path::Differentiable).unwrap();
        let lr = |v: &Tensor| {
            dot(
                &ops::rope(v, &cos, &sin, Path::Differentiable).unwrap(),
                &dq,
            )
        };
        for i in 0..24 {
            let (a, b) = (fd(&lr, &q, i), flat(&back)[i]);
            assert!((a - b).abs() < 1e-7 * (1.0 + b.abs()), "rope[{i}] {a} {b}");
        }
    }
}
