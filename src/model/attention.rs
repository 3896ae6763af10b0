//! Grouped-query self-attention with a causal mask, rotary embedding, the recipe's logit scale on
//! q, and attention computed one block of query rows at a time.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

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
        mut probe: Option<&mut EntropyProbe>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if t == 0 {
            candle_core::bail!("attention over an empty sequence")
        }
        if pos.len() != t {
            candle_core::bail!("positions cover {} tokens, input has {t}", pos.len())
        }
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rep = h / kv;
        let dtype = x.dtype();
        let cdt = compute_dtype(dtype);

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
        let q = q.contiguous()?;
        let inv_sqrt_d = 1.0 / (d as f64).sqrt();

        let block = query_block.max(1);
        let mut outs = Vec::with_capacity(t.div_ceil(block));
        let mut qs = 0;
        while qs < t {
            let qe = (qs + block).min(t);
            let qb = qe - qs;
            // Queries qs..qe see keys 0..qe only (causal), so later keys are never touched.
            // GQA without copying k/v: the `rep` query heads sharing kv head g are heads
            // g*rep .. (g+1)*rep (transformers' repeat_kv), contiguous in q's head axis, so they
            // stack into the row axis of one matmul against that kv head.
            let q_blk = q
                .narrow(2, qs, qb)?
                .contiguous()?
                .reshape((b, kv, rep * qb, d))?;
            let k_blk = k.narrow(2, 0, qe)?;
            let v_blk = v.narrow(2, 0, qe)?;
            // Fast path: reassign to drop each intermediate score tensor as soon as it is used.
            let mut s = q_blk.matmul(&k_blk.t()?)?;
            s = s.to_dtype(cdt)?.affine(inv_sqrt_d, 0.0)?;
            s = s.reshape((b, h, qb, qe))?;
            if qe > qs + 1 {
                s = s.broadcast_add(&causal_mask(qs, qb, qe, cdt, x.device())?)?;
            }
            if let Some(p) = probe.as_deref_mut() {
                record_entropy(p, &s, qs, qe, b, h)?;
            }
            s = ops::softmax(&s, path)?;
            let o = s
                .to_dtype(dtype)?
                .reshape((b, kv, rep * qb, qe))?
                .matmul(&v_blk)?
                .reshape((b, h, qb, d))?;
            drop(s);
            outs.push(o);
            qs = qe;
        }
        let o = match outs.len() {
            1 => outs.swap_remove(0),
            _ => Tensor::cat(&outs, 2)?,
        };
        drop(outs);
        let o = o.transpose(1, 2)?.reshape((b, t, h * d))?;
        ops::linear_probed(&o, &self.o_proj, self.act[3], &self.probe[3])
    }
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
