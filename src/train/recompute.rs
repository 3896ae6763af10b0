//! The loss and its gradients, with layer-wise recomputation (gradient checkpointing).
//!
//! candle has no hooks and no no-grad mode, so the recomputation is written out: the forward runs
//! layer by layer keeping only each layer's input (detached); the backward then walks the layers
//! in reverse, recomputing layer `i` from its saved input made a fresh variable and running
//! `backward` on `sum(out_i * grad_out_i)`, whose gradient with respect to the layer's
//! parameters and input is exactly the chain rule's (d/dθ <out, g> = g^T d out/dθ). A step so
//! holds one layer's activations plus the layer inputs. The head and loss run in chunks of
//! positions, so the `[tokens, vocab]` logits never exist whole.

use candle_core::{backprop::GradStore, DType, Tensor, Var, D};

use super::optim::TrainParam;
use super::TrainError;

/// A decoder seen as embedding, layers and head: what the trainer needs from a model.
pub trait LayerModel {
    fn num_layers(&self) -> usize;
    /// Token ids `[batch, seq]` to hidden states `[batch, seq, hidden]`.
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor>;
    /// Decoder layer `i` on hidden states of positions `0..seq`.
    fn layer(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor>;
    /// The same layer with no autograd graph (recomputation's first pass keeps nothing). The
    /// default builds the graph and drops it.
    fn layer_untracked(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.layer(i, x)?.detach())
    }
    /// Gradient of `<layer_i(x), grad_out>`: parameter gradients go to `sink`, the input's is
    /// returned. `blocked_attention` asks for attention rebuilt one query block at a time in the
    /// backward (memory linear in length) where the model has it; the default recomputes the
    /// layer whole.
    fn layer_backward(
        &self,
        i: usize,
        x: &Tensor,
        grad_out: &Tensor,
        blocked_attention: bool,
        sink: &mut dyn FnMut(&GradStore) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let _ = blocked_attention;
        whole_layer_backward(self, i, x, grad_out, sink)
    }
    /// Final norm and output projection: hidden states to logits `[batch, seq, vocab]`. Acts on
    /// each position alone, so it may be applied to a slice of positions.
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

/// The gradient of `<layer_i(x), grad_out>` through one graph of the whole layer, recomputed
/// from its input made a fresh variable: `d/dθ <out, g> = g^T d out/dθ`, the chain rule's.
pub fn whole_layer_backward<M: LayerModel + ?Sized>(
    model: &M,
    i: usize,
    x: &Tensor,
    grad_out: &Tensor,
    sink: &mut dyn FnMut(&GradStore) -> candle_core::Result<()>,
) -> candle_core::Result<Tensor> {
    let xv = Var::from_tensor(&x.detach())?;
    let out = model.layer(i, xv.as_tensor())?;
    let store = (out * grad_out.to_dtype(xv.dtype())?)?
        .sum_all()?
        .backward()?;
    sink(&store)?;
    match store.get(xv.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => xv.as_tensor().zeros_like(),
    }
}

/// A micro-batch: inputs, next-token targets and the loss mask (1 on assistant targets).
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]` u32.
    pub ids: Tensor,
    /// `[batch, seq]` u32: `ids` shifted by one.
    pub targets: Tensor,
    /// `[batch, seq]` f32.
    pub mask: Tensor,
    /// Number of mask ones.
    pub target_count: usize,
    /// Number of real (unpadded) input tokens.
    pub tokens: usize,
}

impl Batch {
    /// Pad examples (token lists with target masks) on the right to one length: padded positions
    /// have mask 0 and, the attention being causal, do not change the real ones.
    pub fn from_examples(
        examples: &[&super::examples::Example],
        device: &candle_core::Device,
    ) -> Result<Batch, TrainError> {
        let len = examples
            .iter()
            .map(|e| e.len().saturating_sub(1))
            .max()
            .unwrap_or(0)
            .max(1);
        let b = examples.len();
        let mut ids = vec![0u32; b * len];
        let mut targets = vec![0u32; b * len];
        let mut mask = vec![0f32; b * len];
        let (mut count, mut tokens) = (0, 0);
        for (r, e) in examples.iter().enumerate() {
            let n = e.len().saturating_sub(1);
            tokens += n;
            for t in 0..n {
                ids[r * len + t] = e.tokens[t];
                targets[r * len + t] = e.tokens[t + 1];
                if e.mask[t + 1] {
                    mask[r * len + t] = 1.0;
                    count += 1;
                }
            }
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, len), device)?,
            targets: Tensor::from_vec(targets, (b, len), device)?,
            mask: Tensor::from_vec(mask, (b, len), device)?,
            target_count: count,
            tokens,
        })
    }
}

/// `sum_i mask_i * -log softmax(logits_i)[target_i]` in f32 (f64 for f64 models), with log-softmax written from
/// differentiable ops (max-subtract, exp, sum, log): candle's fused softmax has no backward.
pub fn masked_nll_sum(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logits = logits.to_dtype(dtype)?;
    // The max is a constant shift: detaching it leaves the value and the gradient unchanged.
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    let nll = (lse - picked)?.squeeze(D::Minus1)?;
    (nll * mask.to_dtype(dtype)?)?.sum_all()?.to_dtype(dtype)
}

/// Per-parameter gradient sums (f32; f64 for f64 models) across micro-batches and recomputation
/// pieces.
#[derive(Debug, Default)]
pub struct GradAcc {
    pub grads: Vec<Option<Tensor>>,
}

impl GradAcc {
    pub fn new(n: usize) -> GradAcc {
        GradAcc {
            grads: vec![None; n],
        }
    }

    /// Add the gradients a backward pass found for `params`.
    pub fn add(&mut self, store: &GradStore, params: &[TrainParam]) -> Result<(), TrainError> {
        for (slot, p) in self.grads.iter_mut().zip(params) {
            if let Some(g) = store.get(p.var.as_tensor()) {
                let g = g.to_dtype(acc_dtype(p.var.dtype()))?;
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The sums, zeros for parameters no pass reached.
    pub fn finish(self, params: &[TrainParam]) -> Result<Vec<Tensor>, TrainError> {
        self.grads
            .into_iter()
            .zip(params)
            .map(|(g, p)| match g {
                Some(g) => Ok(g),
                None => Ok(Tensor::zeros(
                    p.var.shape(),
                    acc_dtype(p.var.dtype()),
                    p.var.device(),
                )?),
            })
            .collect()
    }
}

fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// How the loss gradient is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackwardPlan {
    /// Layer-wise recomputation; off: one graph for the whole forward (tests compare the two).
    pub recompute: bool,
    /// Positions per head/loss chunk.
    pub head_chunk: usize,
    /// With recomputation: rebuild attention one query block at a time in the backward, so no
    /// graph holds a layer's whole `seq x seq` scores (see `LayerModel::layer_backward`).
    pub blocked_attention: bool,
}

impl Default for BackwardPlan {
    fn default() -> Self {
        BackwardPlan {
            recompute: true,
            head_chunk: 1024,
            blocked_attention: true,
        }
    }
}

/// `scale * masked_nll_sum` of a micro-batch; its parameter gradients are added to `acc`.
/// Returns the scaled loss value.
pub fn loss_and_grads(
    model: &dyn LayerModel,
    batch: &Batch,
    scale: f64,
    params: &[TrainParam],
    acc: &mut GradAcc,
    plan: BackwardPlan,
) -> Result<f64, TrainError> {
    if !plan.recompute {
        let mut x = model.embed(&batch.ids)?;
        for i in 0..model.num_layers() {
            x = model.layer(i, &x)?;
        }
        let loss =
            masked_nll_sum(&model.head(&x)?, &batch.targets, &batch.mask)?.affine(scale, 0.0)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        acc.add(&loss.backward()?, params)?;
        return Ok(value);
    }
    // Forward: keep each layer's input, detached, and nothing else.
    let mut saved = Vec::with_capacity(model.num_layers() + 1);
    saved.push(model.embed(&batch.ids)?.detach());
    for i in 0..model.num_layers() {
        let y = model.layer_untracked(i, &saved[i])?;
        saved.push(y);
    }
    // Head and loss, a chunk of positions at a time.
    let last = saved
        .pop()
        .ok_or_else(|| TrainError::Internal("no hidden states".into()))?;
    let seq = last.dim(1)?;
    let chunk = plan.head_chunk.max(1);
    let mut value = 0f64;
    let mut grad_chunks = Vec::new();
    let mut start = 0;
    while start < seq {
        let len = chunk.min(seq - start);
        let xv = Var::from_tensor(&last.narrow(1, start, len)?)?;
        let logits = model.head(xv.as_tensor())?;
        let loss = masked_nll_sum(
            &logits,
            &batch.targets.narrow(1, start, len)?,
            &batch.mask.narrow(1, start, len)?,
        )?
        .affine(scale, 0.0)?;
        value += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = loss.backward()?;
        acc.add(&store, params)?;
        grad_chunks.push(match store.get(xv.as_tensor()) {
            Some(g) => g.clone(),
            None => xv.as_tensor().zeros_like()?,
        });
        start += len;
    }
    drop(last);
    let mut grad = Tensor::cat(&grad_chunks, 1)?;
    drop(grad_chunks);
    // Backward through the layers, recomputing each from its saved input.
    for i in (0..model.num_layers()).rev() {
        let input = saved
            .pop()
            .ok_or_else(|| TrainError::Internal("saved input missing".into()))?;
        let mut add = |store: &GradStore| -> candle_core::Result<()> {
            acc.add(store, params)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        grad = model.layer_backward(i, &input, &grad, plan.blocked_attention, &mut add)?;
        drop(input);
    }
    let emb = model.embed(&batch.ids)?;
    let grad = grad.to_dtype(emb.dtype())?;
    let store = (emb * grad)?.sum_all()?.backward()?;
    acc.add(&store, params)?;
    Ok(value)
}
