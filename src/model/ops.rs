//! The forward's elementary operations, each in two forms.
//!
//! [`Path::Differentiable`] uses only plain tensor ops that candle can differentiate.
//! [`Path::Fast`] uses candle's fused kernels (`rms_norm`, `rotary_emb::rope`,
//! `softmax_last_dim`), which have NO backward pass: gradients through them are silently dropped,
//! so training must never take that path. Both compute the same function; they agree to f32
//! rounding (tests/model_oracle.rs).

use candle_core::{DType, Result, Tensor, D};

/// Which implementation of the elementary operations a forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Fused kernels, no backward pass: inference, evaluation, verification.
    Fast,
    /// Plain differentiable tensor ops: training.
    Differentiable,
}

/// The dtype norms and softmax are computed in: f32, or f64 for f64 models.
pub fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm `x * rsqrt(mean(x^2) + eps) * w` over the last dimension, computed in f32 (f64 for
/// f64 models) and rounded once to the dtype of `x` (transformers' LlamaRMSNorm, which also
/// normalises in f32; it rounds before multiplying by `w`, we after).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, path: Path) -> Result<Tensor> {
    let dtype = x.dtype();
    let cdt = compute_dtype(dtype);
    let xf = x.to_dtype(cdt)?;
    let wf = w.to_dtype(cdt)?;
    let y = match path {
        Path::Fast => candle_nn::ops::rms_norm(&xf.contiguous()?, &wf, eps as f32)?,
        Path::Differentiable => {
            let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
            let r = (ms + eps)?.sqrt()?.recip()?;
            xf.broadcast_mul(&r)?.broadcast_mul(&wf)?
        }
    };
    y.to_dtype(dtype)
}

/// Rotary embedding, rotate-half layout (transformers' `apply_rotary_pos_emb`): for `x` of shape
/// `[b, h, t, d]` and tables `[t, d/2]`, with `x1 = x[.., :d/2]`, `x2 = x[.., d/2:]`:
/// `out = cat(x1 cos - x2 sin, x2 cos + x1 sin)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin),
        Path::Differentiable => {
            let (_b, _h, t, d) = x.dims4()?;
            let half = d / 2;
            let c = cos.reshape((1, 1, t, half))?;
            let s = sin.reshape((1, 1, t, half))?;
            let x1 = x.narrow(D::Minus1, 0, half)?;
            let x2 = x.narrow(D::Minus1, half, half)?;
            let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
            let o2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
            Tensor::cat(&[&o1, &o2], D::Minus1)
        }
    }
}

/// Softmax over the last dimension. The differentiable form subtracts the (detached) row max,
/// which leaves the value and the gradient unchanged and keeps `exp` finite; masked entries
/// (`-inf`) give exactly 0.
pub fn softmax(x: &Tensor, path: Path) -> Result<Tensor> {
    match path {
        Path::Fast => candle_nn::ops::softmax_last_dim(&x.contiguous()?),
        Path::Differentiable => {
            let m = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&m)?.exp()?;
            let z = e.sum_keepdim(D::Minus1)?;
            e.broadcast_div(&z)
        }
    }
}

/// The type a runtime rounds a matmul's activations to before multiplying (ggml-cpu's
/// `vec_dot_type`); None: the activations stay as they are.
pub type ActRound = Option<crate::gguf::GgmlType>;

/// `x` rounded through `ty` and back, row by row along the last dimension, as ggml-cpu rounds
/// the activations of a matmul against a weight of a lower-precision type (f16/bf16 by
/// round-to-nearest-even, 8-bit blocks by ggml's reference quantizers). Inference only: no
/// gradient flows through the rounding.
pub fn round_activations(x: &Tensor, ty: crate::gguf::GgmlType) -> Result<Tensor> {
    use crate::gguf::types;
    let dtype = x.dtype();
    if ty == types::F16.ty() {
        return x.to_dtype(DType::F16)?.to_dtype(dtype);
    }
    if ty == types::BF16.ty() {
        return x.to_dtype(DType::BF16)?.to_dtype(dtype);
    }
    let k = x.dims().last().copied().unwrap_or(1);
    let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let q = crate::quant::quantize(ty, &v, k).map_err(candle_core::Error::wrap)?;
    let r = crate::quant::dequantize(ty, &q, v.len()).map_err(candle_core::Error::wrap)?;
    Tensor::from_vec(r, x.shape(), x.device())?.to_dtype(dtype)
}

/// Per input column of one linear layer, over every activation row it multiplied: the sum of
/// squared activations (llama.cpp's importance matrix `in_sum2`) and the number of rows.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct InputSums {
    pub sum2: Vec<f64>,
    pub rows: u64,
}

/// Where a linear layer's inputs are summed; None: nowhere (the default).
pub type InputProbe = Option<std::sync::Arc<std::sync::Mutex<InputSums>>>;

/// Add the rows of `x` (`[.., in]`) to `probe`: squares summed over rows in f64, so the sums of
/// many chunks lose nothing to accumulation (llama.cpp sums in f32). Inference only.
pub fn record_input(x: &Tensor, probe: &InputProbe) -> Result<()> {
    let Some(p) = probe else { return Ok(()) };
    let k = x.dims().last().copied().unwrap_or(1);
    let rows = x.elem_count() / k.max(1);
    let sq = x
        .detach()
        .to_dtype(DType::F64)?
        .reshape((rows, k))?
        .sqr()?
        .sum(0)?
        .to_vec1::<f64>()?;
    let mut s = p
        .lock()
        .map_err(|_| candle_core::Error::Msg("input sums: poisoned lock".into()))?;
    if s.sum2.is_empty() {
        s.sum2 = vec![0.0; k];
    }
    if s.sum2.len() != k {
        candle_core::bail!("input sums: {k} columns after {}", s.sum2.len())
    }
    for (a, b) in s.sum2.iter_mut().zip(sq) {
        *a += b;
    }
    s.rows += rows as u64;
    Ok(())
}

/// [`linear_rounded`] with the (unrounded) input first added to `probe`, as llama.cpp's
/// collector sees a matmul's f32 input before the kernel rounds it.
pub fn linear_probed(
    x: &Tensor,
    w: &Tensor,
    round: ActRound,
    probe: &InputProbe,
) -> Result<Tensor> {
    record_input(x, probe)?;
    linear_rounded(x, w, round)
}

/// [`linear`] with the activations first rounded as `round` says.
pub fn linear_rounded(x: &Tensor, w: &Tensor, round: ActRound) -> Result<Tensor> {
    match round {
        Some(ty) => linear(&round_activations(x, ty)?, w),
        None => linear(x, w),
    }
}

/// `x W^T` for `x` of shape `[.., in]` and a Hugging Face weight `W` of shape `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("linear: input is a scalar")
    };
    let rows: usize = lead.iter().product();
    let (out, _) = w.dims2()?;
    let y = x.reshape((rows, k))?.matmul(&w.t()?)?;
    let mut shape = lead.to_vec();
    shape.push(out);
    y.reshape(shape)
}

/// Attention entropy `H = ln Z - sum(e^s s) / Z` (natural log, `s` = logits minus their max,
/// `Z = sum e^s`; method.md) of every row of `scores` over the last dimension.
/// `scores` must hold only visible (finite) entries.
pub fn entropy(scores: &Tensor) -> Result<Tensor> {
    let m = scores.max_keepdim(D::Minus1)?;
    let s = scores.broadcast_sub(&m)?;
    let e = s.exp()?;
    let z = e.sum_keepdim(D::Minus1)?;
    let es = (&e * &s)?.sum_keepdim(D::Minus1)?;
    (z.log()? - es.broadcast_div(&z)?)?.squeeze(D::Minus1)
}
