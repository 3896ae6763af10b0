//! The loss and its gradients, with layer-wise recomputation (gradient checkpointing).
//!
//! candle has no hooks and no no-grad mode, so the recomputation is written out: the forward runs
//! layer by layer keeping only each layer's input (detached); the backward then walks the layers
//! in reverse, recomputing layer `i` from its saved input made a fresh variable and running
//! `backward` on `sum(out_i * grad_out_i)`, whose gradient with respect to the layer's
//! parameters and input is exactly the chain rule's (d/dθ <out, g> = g^T d out/dθ). A step so
//! holds one layer's activations plus the layer inputs. The head and loss run in chunks of
//! positions, so the `[tokens, vocab]` logits never exist whole.

use candle_core::{backprop::GradStore, DType, Tensor, Var};

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
        sink: &mut dyn FnMut(Grads) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let _ = blocked_attention;
        whole_layer_backward(self, i, x, grad_out, sink)
    }
    /// Final norm and output projection: hidden states to logits `[batch, seq, vocab]`. Acts on
    /// each position alone, so it may be applied to a slice of positions.
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// `scale * masked_nll_sum(head(x), targets, mask)` of a chunk of positions: its value and
    /// its gradient with respect to `x`; the head's parameter gradients go to `sink`. The default
    /// differentiates the head's autograd graph.
    fn head_loss_backward(
        &self,
        x: &Tensor,
        targets: &Tensor,
        mask: &Tensor,
        scale: f64,
        sink: &mut dyn FnMut(Grads) -> candle_core::Result<()>,
    ) -> candle_core::Result<(f64, Tensor)> {
        let xv = Var::from_tensor(&x.detach())?;
        let loss =
            masked_nll_sum(&self.head(xv.as_tensor())?, targets, mask)?.affine(scale, 0.0)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = loss.backward()?;
        sink(Grads::Store(&store))?;
        let g = match store.get(xv.as_tensor()) {
            Some(g) => g.clone(),
            None => xv.as_tensor().zeros_like()?,
        };
        Ok((value, g))
    }
}

/// The gradient of `<layer_i(x), grad_out>` through one graph of the whole layer, recomputed
/// from its input made a fresh variable: `d/dθ <out, g> = g^T d out/dθ`, the chain rule's.
pub fn whole_layer_backward<M: LayerModel + ?Sized>(
    model: &M,
    i: usize,
    x: &Tensor,
    grad_out: &Tensor,
    sink: &mut dyn FnMut(Grads) -> candle_core::Result<()>,
) -> candle_core::Result<Tensor> {
    let xv = Var::from_tensor(&x.detach())?;
    let out = model.layer(i, xv.as_tensor())?;
    let store = (out * grad_out.to_dtype(xv.dtype())?)?
        .sum_all()?
        .backward()?;
    sink(Grads::Store(&store))?;
    match store.get(xv.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => xv.as_tensor().zeros_like(),
    }
}

/// The parameter gradients of one piece of a backward pass.
pub enum Grads<'a> {
    /// Found by candle's autograd.
    Store(&'a GradStore),
    /// Written out by hand: `(weight as the model holds it, its gradient)`. A weight that is not
    /// itself a parameter (a LoRA merge `W + B (s A)`) passes its gradient on to the parameters
    /// it is built from.
    Weights(&'a [(Tensor, Tensor)]),
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

pub use crate::model::grad::masked_nll_sum;

/// Per-parameter gradient sums (f32; f64 for f64 models) across micro-batches and recomputation
/// pieces.
#[derive(Debug, Default)]
pub struct GradAcc {
    pub grads: Vec<Option<Tensor>>,
    /// Parameter index by the id of its variable's tensor (built on first use).
    index: std::collections::HashMap<candle_core::TensorId, usize>,
}

impl GradAcc {
    pub fn new(n: usize) -> GradAcc {
        GradAcc {
            grads: vec![None; n],
            index: Default::default(),
        }
    }

    fn accumulate(&mut self, k: usize, g: &Tensor) -> Result<(), TrainError> {
        let g = g.to_dtype(acc_dtype(g.dtype()))?;
        let slot = &mut self.grads[k];
        *slot = Some(match slot.take() {
            Some(acc) => (acc + g)?,
            None => g,
        });
        Ok(())
    }

    /// Add the gradients a backward pass found for `params`.
    pub fn add(&mut self, store: &GradStore, params: &[TrainParam]) -> Result<(), TrainError> {
        for (k, p) in params.iter().enumerate().take(self.grads.len()) {
            if let Some(g) = store.get(p.var.as_tensor()) {
                self.accumulate(k, g)?;
            }
        }
        Ok(())
    }

    /// Add one piece's gradients, by autograd or by hand.
    pub fn add_grads(&mut self, grads: Grads, params: &[TrainParam]) -> Result<(), TrainError> {
        let pairs = match grads {
            Grads::Store(store) => return self.add(store, params),
            Grads::Weights(pairs) => pairs,
        };
        if self.index.is_empty() {
            self.index = params
                .iter()
                .enumerate()
                .map(|(k, p)| (p.var.as_tensor().id(), k))
                .collect();
        }
        for (w, g) in pairs {
            if let Some(&k) = self.index.get(&w.id()) {
                self.accumulate(k, g)?;
            } else if w.track_op() {
                // d/dθ <w(θ), g> is the chain rule's gradient of the parameters w is built from
                let store = (w * g.detach().to_dtype(w.dtype())?)?
                    .sum_all()?
                    .backward()?;
                self.add(&store, params)?;
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
        let mut add = |grads: Grads| -> candle_core::Result<()> {
            acc.add_grads(grads, params)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        let (v, g) = model.head_loss_backward(
            &last.narrow(1, start, len)?,
            &batch.targets.narrow(1, start, len)?,
            &batch.mask.narrow(1, start, len)?,
            scale,
            &mut add,
        )?;
        value += v;
        grad_chunks.push(g);
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
        let mut add = |grads: Grads| -> candle_core::Result<()> {
            acc.add_grads(grads, params)
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
