//! Grouped-query self-attention with a causal mask, rotary embedding, the recipe's logit scale on
//! q, and attention computed one block of query rows at a time.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::cpu;
use super::ops::{self, compute_dtype, Path};
use super::rope::Positions;
use crate::checkpoint::ModelConfig;

/// Query rows per attention block unless set otherwise: a 16k-token sequence then needs at most
/// `512 x 16384` scores per head at once instead of `16384 x 16384`.
pub const DEFAULT_QUERY_BLOCK: usize = 512;

/// Where a forward records attention entropy: sequence indices (0-based, into the tokens of the
/// forward) and, per layer, one value per index.
#[derive(Debug, Clone)]
pub struct EntropyProbe<'a> {
    pub positions: &'a [usize],
    /// Filled by the forward: per position, per batch row, per head, `[b][h]` flattened as
    /// `b * heads + h`.
    pub values: Vec<Vec<f32>>,
}

/// The attention block of one layer: `self_attn.{q,k,v,o}_proj` (no biases, as in LLaMA).
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
    /// Activation rounding before q, k, v, o (a runtime's arithmetic; None in training).
    pub(crate) act: [ops::ActRound; 4],
    /// Input sums of q, k, v, o (the importance matrix; None otherwise).
    pub(crate) probe: [ops::InputProbe; 4],
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Load from `vb` prefixed with `model.layers.N.self_attn`.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Attention> {
        let (h, kv, d, hidden) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.hidden_size,
        );
        if h == 0 || kv == 0 || !h.is_multiple_of(kv) {
            candle_core::bail!(
                "num_attention_heads {h} must be a positive multiple of num_key_value_heads {kv}"
            )
        }
        Ok(Attention {
            q_proj: vb.get((h * d, hidden), "q_proj.weight")?,
            k_proj: vb.get((kv * d, hidden), "k_proj.weight")?,
            v_proj: vb.get((kv * d, hidden), "v_proj.weight")?,
            o_proj: vb.get((hidden, h * d), "o_proj.weight")?,
            act: [None; 4],
            probe: Default::default(),
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        })
    }

    /// The same block with its weights detached from autograd.
    pub fn detached(&self) -> Attention {
        let mut a = self.clone();
        for w in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
            *w = w.detach();
        }
        a
    }

    /// The four projection weights, in `q, k, v, o` order.
    pub fn weights(&self) -> [&Tensor; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// Self-attention of `x` (`[b, t, hidden]`, already normed) at `pos` in layer `layer`.
    pub fn forward(
        &self,
        x: &Tensor,
        pos: &Positions,
        layer: usize,
        path: Path,
        query_block: usize,
        probe: Option<&mut EntropyProbe>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x, pos, layer, path)?;
        let o = attend(&q, &k, &v, path, query_block, probe)?;
        drop((q, k, v));
        self.project_out(&o)
    }

    /// What attention multiplies, from `x` (`[b, t, hidden]`, already normed): q rotated and
    /// scaled by the recipe's logit scale `[b, heads, t, d]`, k rotated and v `[b, kv_heads, t, d]`,
    /// all contiguous.
    pub fn qkv(
        &self,
        x: &Tensor,
        pos: &Positions,
        layer: usize,
        path: Path,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        if t == 0 {
            candle_core::bail!("attention over an empty sequence")
        }
        if pos.len() != t {
            candle_core::bail!("positions cover {} tokens, input has {t}", pos.len())
        }
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, t, heads * d] -> [b, heads, t, d]
        let q = ops::linear_probed(x, &self.q_proj, self.act[0], &self.probe[0])?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?;
        let k = ops::linear_probed(x, &self.k_proj, self.act[1], &self.probe[1])?
            .reshape((b, t, kv, d))?
            .transpose(1, 2)?;
        let v = ops::linear_probed(x, &self.v_proj, self.act[2], &self.probe[2])?
            .reshape((b, t, kv, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = ops::rope(&q, pos.cos(), pos.sin(), path)?;
        let k = ops::rope(&k, pos.cos(), pos.sin(), path)?.contiguous()?;
        // lambda(layer, p) multiplies q after RoPE, in the model dtype (method.md); k untouched.
        let q = match pos.scale(layer) {
            Some(s) => q.broadcast_mul(s)?,
            None => q,
        };
        Ok((q.contiguous()?, k, v))
    }

    /// The output projection of attention's result `o` (`[b, heads, t, d]`): `[b, t, hidden]`.
    pub fn project_out(&self, o: &Tensor) -> Result<Tensor> {
        let (b, h, t, d) = o.dims4()?;
        let o = o.transpose(1, 2)?.reshape((b, t, h * d))?;
        ops::linear_probed(&o, &self.o_proj, self.act[3], &self.probe[3])
    }
}

/// Causal softmax attention of `q` (`[b, heads, t, d]`, scaled as the recipe says) over `k`, `v`
/// (`[b, kv_heads, t, d]`), one block of `block` query rows at a time: `[b, heads, t, d]`.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    path: Path,
    block: usize,
    mut probe: Option<&mut EntropyProbe>,
) -> Result<Tensor> {
    let t = q.dim(2)?;
    let mut outs = Vec::with_capacity(t.div_ceil(block.max(1)));
    for (qs, qb) in query_blocks(t, block) {
        let q_blk = q.narrow(2, qs, qb)?;
        outs.push(attend_block(&q_blk, k, v, qs, path, probe.as_deref_mut())?);
    }
    match outs.len() {
        1 => Ok(outs.swap_remove(0)),
        _ => Tensor::cat(&outs, 2),
    }
}

/// The blocks of at most `block` (at least 1) rows that cover `0 .. t`: `(start, rows)`. Attention
/// and the position-wise pieces of a layer's backward walk a sequence this way.
pub fn query_blocks(t: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    let block = block.max(1);
    (0..t).step_by(block).map(move |a| (a, block.min(t - a)))
}

/// Query rows `qs .. qs + qb` (`q_blk`, `[b, heads, qb, d]`) against keys `0 .. qs + qb`.
fn attend_block(
    q_blk: &Tensor,
    k: &Tensor,
    v: &Tensor,
    qs: usize,
    path: Path,
    probe: Option<&mut EntropyProbe>,
) -> Result<Tensor> {
    let (b, h, qb, d) = q_blk.dims4()?;
    let (kv, qe) = (k.dim(1)?, qs + qb);
    let s = match (probe, path) {
        (None, Path::Fast) => block_probs(q_blk, k, qs)?.1,
        (probe, path) => {
            let (_, s) = block_scores(q_blk, k, qs)?;
            if let Some(p) = probe {
                record_entropy(p, &s, qs, qe, b, h)?;
            }
            ops::softmax(&s, path)?
        }
    };
    s.to_dtype(q_blk.dtype())?
        .reshape((b, kv, (h / kv) * qb, qe))?
        .matmul(&v.narrow(2, 0, qe)?)?
        .reshape((b, h, qb, d))
}

/// The scaled, masked scores `[b, heads, qb, qs + qb]` (f32; f64 for f64 models) of query rows
/// `qs ..` (`q_blk`, `[b, heads, qb, d]`) against keys `0 .. qs + qb`, and the query rows stacked
/// by kv head (`[b, kv_heads, rep * qb, d]`) they were multiplied as. The forward and the
/// backward both take their probabilities from here, so they are the same numbers.
fn block_scores(q_blk: &Tensor, k: &Tensor, qs: usize) -> Result<(Tensor, Tensor)> {
    let (b, h, qb, d) = q_blk.dims4()?;
    let kv = k.dim(1)?;
    if kv == 0 || !h.is_multiple_of(kv) {
        candle_core::bail!("{h} query heads cannot share {kv} kv heads")
    }
    let rep = h / kv;
    let qe = qs + qb;
    let cdt = compute_dtype(q_blk.dtype());
    // Queries qs..qe see keys 0..qe only (causal), so later keys are never touched.
    // GQA without copying k/v: the `rep` query heads sharing kv head g are heads
    // g*rep .. (g+1)*rep (transformers' repeat_kv), contiguous in q's head axis, so they
    // stack into the row axis of one matmul against that kv head.
    let q_stacked = q_blk.contiguous()?.reshape((b, kv, rep * qb, d))?;
    // Reassign to drop each intermediate score tensor as soon as it is used.
    let mut s = q_stacked.matmul(&k.narrow(2, 0, qe)?.t()?)?;
    s = s.to_dtype(cdt)?.affine(1.0 / (d as f64).sqrt(), 0.0)?;
    s = s.reshape((b, h, qb, qe))?;
    if qe > qs + 1 {
        s = s.broadcast_add(&causal_mask(qs, qb, qe, cdt, q_blk.device())?)?;
    }
    Ok((q_stacked, s))
}

/// The probabilities `softmax(scores)` of a block (`[b, heads, qb, qs + qb]`, as
/// [`block_scores`] gives the scores) and the stacked query rows, with no graph. f32 on the CPU
/// takes one fused pass over the raw scores (scale, causal mask and softmax,
/// [`super::cpu::causal_softmax`]); other dtypes and devices the tensor ops.
fn block_probs(q_blk: &Tensor, k: &Tensor, qs: usize) -> Result<(Tensor, Tensor)> {
    let (b, h, qb, d) = q_blk.dims4()?;
    let kv = k.dim(1)?;
    if q_blk.device().is_cpu() && q_blk.dtype() == DType::F32 && kv > 0 && h.is_multiple_of(kv) {
        let qe = qs + qb;
        let q_stacked = q_blk.contiguous()?.reshape((b, kv, (h / kv) * qb, d))?;
        let raw = q_stacked
            .matmul(&k.narrow(2, 0, qe)?.t()?)?
            .reshape((b, h, qb, qe))?;
        if let Some(p) = cpu::causal_softmax(&raw, 1.0 / (d as f64).sqrt(), qs) {
            return Ok((q_stacked, p?));
        }
    }
    let (q_stacked, s) = block_scores(q_blk, k, qs)?;
    Ok((q_stacked, ops::softmax(&s, Path::Fast)?))
}

/// Gradients of `<attend(q, k, v), grad_o>` with respect to `q`, `k` and `v`, rebuilding one
/// query block's scores at a time (FlashAttention's backward, Dao et al. 2022, alg. 4, without
/// the tiling of keys): for a block with probabilities `P = softmax(S)`, `S = q k^T / sqrt(d) +
/// mask`, and output gradient `dO`:
/// `dV += P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dP * P))`, `dq = dS K / sqrt(d)`,
/// `dK += dS^T q / sqrt(d)`. Only the block's `batch x heads x block x t` scores and their
/// gradients exist at once, so memory is linear in `t` (the graph of a whole layer holds all
/// `t^2 / 2` scores several times). The rows of causal attention are independent given k and v,
/// so each block's `dq` is exact and `dK`, `dV` are the sums over blocks. Scores and softmax in
/// f32 (f64 for f64 models), matmuls in the model dtype, as in the forward.
pub fn attend_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad_o: &Tensor,
    block: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let dtype = q.dtype();
    let cdt = compute_dtype(dtype);
    let inv_sqrt_d = 1.0 / (d as f64).sqrt();
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let grad_o = grad_o.detach().to_dtype(dtype)?;
    // dK and dV are sums over blocks: accumulated in the compute dtype, rounded once at the end
    let (mut gk, mut gv) = (
        k.to_dtype(cdt)?.zeros_like()?,
        v.to_dtype(cdt)?.zeros_like()?,
    );
    let mut gq = Vec::with_capacity(t.div_ceil(block.max(1)));
    for (qs, qb) in query_blocks(t, block) {
        let qe = qs + qb;
        // the block's probabilities, the forward's own (block_scores)
        let (q_blk, p) = block_probs(&q.narrow(2, qs, qb)?, &k, qs)?;
        // the block's query rows stacked by kv head: rep x qb
        let rows = q_blk.dim(2)?;
        let (k_blk, v_blk) = (k.narrow(2, 0, qe)?, v.narrow(2, 0, qe)?);
        let g_blk = grad_o
            .narrow(2, qs, qb)?
            .contiguous()?
            .reshape((b, kv, rows, d))?;
        // dV = P^T dO (keys 0..qe)
        let pc = p.to_dtype(dtype)?.reshape((b, kv, rows, qe))?;
        let dv = pc.t()?.matmul(&g_blk)?;
        drop(pc);
        gv = (gv + dv.to_dtype(cdt)?.pad_with_zeros(2, 0, t - qe)?)?;
        // dS = P * (dP - rowsum(dP * P)), in the compute dtype; the mask has no gradient
        let dp = g_blk
            .matmul(&v_blk.t()?)?
            .to_dtype(cdt)?
            .reshape((b, h, qb, qe))?;
        let ds = match cpu::softmax_backward(&p, &dp, inv_sqrt_d) {
            Some(ds) => ds?,
            None => {
                let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
                (dp.broadcast_sub(&row)? * p)?.affine(inv_sqrt_d, 0.0)?
            }
        }
        .to_dtype(dtype)?
        .reshape((b, kv, rows, qe))?;
        // dq = dS K, dK = dS^T q (the 1/sqrt(d) already in dS)
        gq.push(ds.matmul(&k_blk)?.reshape((b, h, qb, d))?);
        let dk = ds.t()?.matmul(&q_blk)?;
        drop(ds);
        gk = (gk + dk.to_dtype(cdt)?.pad_with_zeros(2, 0, t - qe)?)?;
    }
    let gq = match gq.len() {
        1 => gq.swap_remove(0),
        _ => Tensor::cat(&gq, 2)?,
    };
    Ok((gq, gk.to_dtype(dtype)?, gv.to_dtype(dtype)?))
}

/// Additive causal mask `[qb, qe]` for query rows `qs .. qs + qb`: 0 where key `j <= i`, `-inf`
/// after. Only the last `qb` columns can be masked, so the rest stays the zeroed allocation.
fn causal_mask(qs: usize, qb: usize, qe: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; qb * qe];
    for r in 0..qb {
        let i = qs + r;
        for v in &mut m[r * qe + i + 1..(r + 1) * qe] {
            *v = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (qb, qe), dev)?.to_dtype(dtype)
}

/// Entropy of the probed query rows inside block `qs .. qe`, over their visible keys.
fn record_entropy(
    probe: &mut EntropyProbe,
    s: &Tensor,
    qs: usize,
    qe: usize,
    b: usize,
    h: usize,
) -> Result<()> {
    for (k, &p) in probe.positions.iter().enumerate() {
        if p < qs || p >= qe {
            continue;
        }
        let row = s.narrow(2, p - qs, 1)?.narrow(D::Minus1, 0, p + 1)?;
        let ent = ops::entropy(&row.detach())?
            .reshape(b * h)?
            .to_dtype(DType::F32)?;
        probe.values[k] = ent.to_vec1::<f32>()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(dims: &[usize], seed: u64) -> Tensor {
        let n: usize = dims.iter().product();
        let mut s = seed | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The fused CPU kernels (causal softmax of a block's raw scores; softmax's backward with the
    /// score scale) against the tensor-op forms evaluated in f64 on the same inputs: GQA with 2
    /// query heads a kv head, blocks that start at 0 and past it, 1 row and 37 rows.
    #[test]
    fn fused_attention_kernels_equal_the_tensor_ops_in_f64() {
        let (b, h, kv, d, t) = (2, 4, 2, 8, 45);
        let (q, k) = (rand(&[b, h, t, d], 1), rand(&[b, kv, t, d], 2));
        let f64s = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
        for (qs, qb) in [(0usize, 37usize), (37, 8), (44, 1), (0, 45)] {
            let q_blk = q.narrow(2, qs, qb).unwrap();
            let (_, p) = block_probs(&q_blk, &k, qs).unwrap();
            let (_, s64) = block_scores(&f64s(&q_blk), &f64s(&k), qs).unwrap();
            let p64 = ops::softmax(&s64, Path::Differentiable).unwrap();
            assert!(max_diff(&p, &p64) < 1e-6, "probs at {qs}+{qb}");
            // masked entries exactly 0
            let last: Vec<f32> = p
                .narrow(2, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (j, v) in last.iter().enumerate() {
                if j % (qs + qb) > qs {
                    assert_eq!(*v, 0.0, "masked key {j} of row {qs}");
                }
            }
            let dp = rand(p.dims(), 3 + qs as u64);
            let ds = cpu::softmax_backward(&p, &dp, 0.3).unwrap().unwrap();
            let (p64, dp64) = (f64s(&p), f64s(&dp));
            let row = (&dp64 * &p64).unwrap().sum_keepdim(D::Minus1).unwrap();
            let ds64 = (dp64.broadcast_sub(&row).unwrap() * p64)
                .unwrap()
                .affine(0.3, 0.0)
                .unwrap();
            assert!(max_diff(&ds, &ds64) < 1e-5, "dS at {qs}+{qb}");
        }
    }
}
