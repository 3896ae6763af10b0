//! The LLaMA-family decoder (LLaMA, Mistral, Ministral 3 text), driven by the recipe.
//!
//! Read top to bottom: MLP, decoder layer, model. Tensor names are Hugging Face's.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{attend, attend_backward, Attention, EntropyProbe, DEFAULT_QUERY_BLOCK};
use super::grad;
use super::ops::{self, compute_dtype, Path};
use super::rope::{Positions, Rope};
use crate::checkpoint::ModelConfig;

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))` (`mlp.{gate,up,down}_proj`).
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    /// Activation rounding before gate, up, down (a runtime's arithmetic; None in training).
    act: [ops::ActRound; 3],
    /// Input sums of gate, up, down (the importance matrix; None otherwise).
    probe: [ops::InputProbe; 3],
}

impl Mlp {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Mlp> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: vb.get((inter, hidden), "gate_proj.weight")?,
            up_proj: vb.get((inter, hidden), "up_proj.weight")?,
            down_proj: vb.get((hidden, inter), "down_proj.weight")?,
            act: [None; 3],
            probe: Default::default(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // silu is a plain unary op with a backward pass, so both paths share this.
        let g = ops::linear_probed(x, &self.gate_proj, self.act[0], &self.probe[0])?.silu()?;
        let u = ops::linear_probed(x, &self.up_proj, self.act[1], &self.probe[1])?;
        ops::linear_probed(&(g * u)?, &self.down_proj, self.act[2], &self.probe[2])
    }
}

/// One decoder layer: pre-norm attention and pre-norm MLP, each added to the residual stream.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

impl DecoderLayer {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<DecoderLayer> {
        let hidden = cfg.hidden_size;
        Ok(DecoderLayer {
            input_layernorm: vb.get(hidden, "input_layernorm.weight")?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: vb.get(hidden, "post_attention_layernorm.weight")?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }
}

/// A weight as the model holds it and its gradient.
pub type WeightGrad = (Tensor, Tensor);

/// A LLaMA-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `lm_head.weight`, or a clone of `embed_tokens` (same storage, same variable) when tied.
    lm_head: Tensor,
    cfg: ModelConfig,
    query_block: usize,
    /// llama.cpp's per-frequency divisors (`rope_freqs.weight`) when the model was read from a
    /// GGUF that has them; checkpoints express the same through the recipe.
    freq_factors: Option<Vec<f64>>,
    /// Activation rounding before the output head.
    head_act: ops::ActRound,
}

impl Llama {
    /// Load every weight of `cfg` from `vb` (Hugging Face names, rooted at the checkpoint's top
    /// level). The model's dtype and device are the VarBuilder's. With `tie_word_embeddings` the
    /// output head is `model.embed_tokens.weight` (as transformers ties it, even when the file
    /// also holds an `lm_head.weight`).
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Llama> {
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        if cfg.head_dim == 0 || !cfg.head_dim.is_multiple_of(2) {
            candle_core::bail!("head_dim must be even and positive, got {}", cfg.head_dim)
        }
        if !matches!(
            vb.dtype(),
            DType::F32 | DType::BF16 | DType::F16 | DType::F64
        ) {
            candle_core::bail!(
                "unsupported model dtype {:?} (f32, bf16, f16 or f64)",
                vb.dtype()
            )
        }
        let m = vb.pp("model");
        let embed_tokens = m.get((vocab, hidden), "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(m.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = m.get(hidden, "norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.get((vocab, hidden), "lm_head.weight")?
        };
        Ok(Llama {
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
            query_block: DEFAULT_QUERY_BLOCK,
            freq_factors: None,
            head_act: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The dtype of the weights (and of the residual stream).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Query rows per attention block.
    pub fn query_block(&self) -> usize {
        self.query_block
    }

    /// Set the query rows per attention block (at least 1). Results do not depend on it beyond
    /// rounding; memory of one layer's attention is `batch * heads * block * seq` scores.
    pub fn set_query_block(&mut self, rows: usize) {
        self.query_block = rows.max(1);
    }

    /// Every weight with its Hugging Face name (the output head only when it is not tied).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                l.input_layernorm.clone(),
            ));
            for (name, w) in ["q_proj", "k_proj", "v_proj", "o_proj"]
                .iter()
                .zip(l.self_attn.weights())
            {
                out.push((format!("{p}.self_attn.{name}.weight"), w.clone()));
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.clone(),
            ));
            out.push((format!("{p}.mlp.gate_proj.weight"), l.mlp.gate_proj.clone()));
            out.push((format!("{p}.mlp.up_proj.weight"), l.mlp.up_proj.clone()));
            out.push((format!("{p}.mlp.down_proj.weight"), l.mlp.down_proj.clone()));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        out
    }

    /// Round every matmul's activations as a runtime does: `round(name)` gives the type for the
    /// weight of that Hugging Face name (ggml-cpu rounds to its weight type's `vec_dot_type`).
    /// The verifier's consistency reference for llama.cpp; None everywhere restores f32.
    pub fn set_activation_rounding(&mut self, round: &dyn Fn(&str) -> ops::ActRound) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            for (j, n) in ["q_proj", "k_proj", "v_proj", "o_proj"].iter().enumerate() {
                l.self_attn.act[j] = round(&format!("{p}.self_attn.{n}.weight"));
            }
            for (j, n) in ["gate_proj", "up_proj", "down_proj"].iter().enumerate() {
                l.mlp.act[j] = round(&format!("{p}.mlp.{n}.weight"));
            }
        }
        self.head_act = round(self.head_name());
    }

    /// Sum the inputs of every decoder layer's linear layers into `probe(name)` (Hugging Face
    /// weight names): the importance matrix's collector, which sums the head's input itself from
    /// [`Llama::head_input`]. None everywhere removes them.
    pub fn set_input_probes(&mut self, probe: &dyn Fn(&str) -> ops::InputProbe) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            for (j, n) in ["q_proj", "k_proj", "v_proj", "o_proj"].iter().enumerate() {
                l.self_attn.probe[j] = probe(&format!("{p}.self_attn.{n}.weight"));
            }
            for (j, n) in ["gate_proj", "up_proj", "down_proj"].iter().enumerate() {
                l.mlp.probe[j] = probe(&format!("{p}.mlp.{n}.weight"));
            }
        }
    }

    /// The Hugging Face name of the output head's weight.
    pub fn head_name(&self) -> &'static str {
        if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        }
    }

    /// Run the same weights under another recipe (the verifier's consistency reference: a GGUF's
    /// weights with the reference recipe instead of the one its keys say).
    pub fn set_recipe(&mut self, recipe: crate::rope::Recipe) {
        self.cfg.max_position_embeddings = recipe.context;
        self.cfg.recipe = recipe;
    }

    /// Divide rotary frequency `j` by `factors[j]` on top of the recipe (llama.cpp's
    /// `rope_freqs.weight`, see [`super::rope::Rope`]); None removes them.
    pub fn set_freq_factors(&mut self, factors: Option<Vec<f64>>) -> Result<()> {
        if let Some(f) = &factors {
            super::rope::check_freq_factors(f, self.cfg.head_dim / 2)?;
        }
        self.freq_factors = factors;
        Ok(())
    }

    /// The per-frequency divisors set by [`Llama::set_freq_factors`].
    pub fn freq_factors(&self) -> Option<&[f64]> {
        self.freq_factors.as_deref()
    }

    /// Rotary tables and logit scales for positions `start_pos .. start_pos + len`.
    pub fn positions(&self, start_pos: usize, len: usize) -> Result<Positions> {
        let rope = Rope {
            recipe: &self.cfg.recipe,
            freq_factors: self.freq_factors.as_deref(),
        };
        Positions::build(
            &rope,
            self.cfg.head_dim,
            self.layers.len(),
            start_pos..start_pos + len,
            self.dtype(),
            self.device(),
        )
    }

    /// Token embeddings: `[batch, seq]` ids (u32) to `[batch, seq, hidden]` in the model dtype.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if b == 0 || t == 0 {
            candle_core::bail!("empty token batch {:?}", tokens.shape())
        }
        if tokens.dtype() != DType::U32 {
            candle_core::bail!("token ids must be u32, got {:?}", tokens.dtype())
        }
        let ids = tokens.flatten_all()?;
        let max = ids.max(0)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            candle_core::bail!(
                "token id {max} is out of range for vocab_size {}",
                self.cfg.vocab_size
            )
        }
        self.embed_tokens.index_select(&ids, 0)?.reshape((b, t, ()))
    }

    /// Decoder layer `i` on the residual stream `x` (`[batch, seq, hidden]`) at `pos`.
    /// A trainer that recomputes layers keeps only each layer's input.
    pub fn layer(&self, i: usize, x: &Tensor, pos: &Positions, path: Path) -> Result<Tensor> {
        self.layer_probed(i, x, pos, path, None)
    }

    fn layer_probed(
        &self,
        i: usize,
        x: &Tensor,
        pos: &Positions,
        path: Path,
        probe: Option<&mut EntropyProbe>,
    ) -> Result<Tensor> {
        let Some(l) = self.layers.get(i) else {
            candle_core::bail!("layer {i} does not exist ({} layers)", self.layers.len())
        };
        let eps = self.cfg.rms_norm_eps;
        let h = ops::rms_norm(x, &l.input_layernorm, eps, path)?;
        let h = l
            .self_attn
            .forward(&h, pos, i, path, self.query_block, probe)?;
        let x = (x + h)?;
        let h = ops::rms_norm(&x, &l.post_attention_layernorm, eps, path)?;
        let h = l.mlp.forward(&h)?;
        x + h
    }

    /// Gradient of `<layer_i(x), grad_out>` (`x` the layer's saved input), written out with no
    /// autograd graph: the gradient of each weight that takes part in autograd (a variable, or a
    /// LoRA merge of variables; `Tensor::track_op`) goes to `sink` as `(weight, gradient)`, the
    /// input's is returned.
    ///
    /// The layer is recomputed once from `x` (norms, q, k, v, attention, the output projection,
    /// gate and up; not down, whose output the backward does not need) and differentiated by hand
    /// in reverse: each linear layer `y = x W^T` gives `dW = dy^T x` and `dx = dy W`; SwiGLU, the
    /// norms and RoPE have their formulas in [`super::grad`] (fused CPU kernels for f32); the
    /// logit scale multiplies q's gradient; attention's backward is [`attend_backward`], one
    /// query block at a time, so memory is the sequence's activations plus one block's scores,
    /// linear in length. tests/train_llama_grads.rs checks the result against one autograd graph
    /// of the whole forward in f64 and against central differences.
    pub fn layer_backward(
        &self,
        i: usize,
        x: &Tensor,
        grad_out: &Tensor,
        pos: &Positions,
        sink: &mut dyn FnMut(&[WeightGrad]) -> Result<()>,
    ) -> Result<Tensor> {
        let Some(l) = self.layers.get(i) else {
            candle_core::bail!("layer {i} does not exist ({} layers)", self.layers.len())
        };
        let eps = self.cfg.rms_norm_eps;
        let dtype = x.dtype();
        // candle's fused rope has no f64 form (f64 models are the gradient checks')
        let path = match dtype {
            DType::F64 => Path::Differentiable,
            _ => Path::Fast,
        };
        let x = x.detach().contiguous()?;
        let (b, t, hidden) = x.dims3()?;
        let n = b * t;
        let [wq, wk, wv, wo] = l.self_attn.weights();
        let (wg, wu, wd) = (&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj);
        let (w1, w2) = (&l.input_layernorm, &l.post_attention_layernorm);
        // recompute, no graph (weights detached)
        let x = x.reshape((n, hidden))?;
        let (h1, r1) = grad::rms_forward(&x, &w1.detach(), eps)?;
        let (q, k, v) = l
            .self_attn
            .detached()
            .qkv(&h1.reshape((b, t, hidden))?, pos, i, path)?;
        let o = attend(&q, &k, &v, Path::Fast, self.query_block, None)?;
        let (heads, d) = (o.dim(1)?, o.dim(3)?);
        let o = o.transpose(1, 2)?.reshape((n, heads * d))?;
        let mid = (&x + ops::linear(&o, &wo.detach())?)?;
        let (h2, r2) = grad::rms_forward(&mid, &w2.detach(), eps)?;
        let g = ops::linear(&h2, &wg.detach())?;
        let u = ops::linear(&h2, &wu.detach())?;
        let m = grad::swiglu(&g, &u)?;
        // backward, last op first
        let mut grads = Vec::new();
        // y = x W^T: dW = dy^T x, for the weights autograd tracks (frozen ones get none)
        let mut weight_grad = |w: &Tensor, dy: &Tensor, input: &Tensor| -> Result<()> {
            if w.track_op() {
                grads.push((w.clone(), dy.t()?.matmul(input)?));
            }
            Ok(())
        };
        let dy = grad_out
            .to_dtype(dtype)?
            .reshape((n, hidden))?
            .contiguous()?;
        weight_grad(wd, &dy, &m)?;
        drop(m);
        let dm = dy.matmul(&wd.detach())?;
        let (dg, du) = grad::swiglu_backward(&dm, &g, &u)?;
        drop((dm, g, u));
        weight_grad(wg, &dg, &h2)?;
        weight_grad(wu, &du, &h2)?;
        drop(h2);
        let dh2 = (dg.matmul(&wg.detach())? + du.matmul(&wu.detach())?)?;
        drop((dg, du));
        let (dmid, dw2) = grad::rms_backward(&dh2, &mid, &r2, &w2.detach(), &dy)?;
        drop((dh2, mid, dy));
        weight_grad(wo, &dmid, &o)?;
        drop(o);
        let d_o = dmid
            .matmul(&wo.detach())?
            .reshape((b, t, heads, d))?
            .transpose(1, 2)?;
        let (gq, gk, gv) = attend_backward(&q, &k, &v, &d_o, self.query_block)?;
        drop((d_o, q, k, v));
        // q = rope(x Wq^T) * scale, k = rope(x Wk^T)
        let gq = match pos.scale(i) {
            Some(s) => gq.broadcast_mul(s)?,
            None => gq,
        };
        let gq = grad::rope_backward(&gq, pos.cos(), pos.sin(), path)?;
        let gk = grad::rope_backward(&gk, pos.cos(), pos.sin(), path)?;
        let rows = |g: Tensor| -> Result<Tensor> {
            let (_, hh, _, dd) = g.dims4()?;
            g.transpose(1, 2)?.reshape((n, hh * dd))
        };
        let (gq, gk, gv) = (rows(gq)?, rows(gk)?, rows(gv)?);
        weight_grad(wq, &gq, &h1)?;
        weight_grad(wk, &gk, &h1)?;
        weight_grad(wv, &gv, &h1)?;
        drop(h1);
        let dh1 =
            ((gq.matmul(&wq.detach())? + gk.matmul(&wk.detach())?)? + gv.matmul(&wv.detach())?)?;
        drop((gq, gk, gv));
        let (dx, dw1) = grad::rms_backward(&dh1, &x, &r1, &w1.detach(), &dmid)?;
        for (w, g) in [(w2, dw2), (w1, dw1)] {
            if w.track_op() {
                grads.push((w.clone(), g));
            }
        }
        sink(&grads)?;
        dx.reshape((b, t, hidden))
    }

    /// The same model with every weight detached from autograd: a forward through it builds no
    /// graph (candle has no no-grad mode), so recomputation's first pass keeps nothing.
    pub fn detached(&self) -> Llama {
        let mut m = self.clone();
        m.embed_tokens = m.embed_tokens.detach();
        m.norm = m.norm.detach();
        m.lm_head = m.lm_head.detach();
        for l in &mut m.layers {
            l.input_layernorm = l.input_layernorm.detach();
            l.post_attention_layernorm = l.post_attention_layernorm.detach();
            l.self_attn = l.self_attn.detached();
            for w in [
                &mut l.mlp.gate_proj,
                &mut l.mlp.up_proj,
                &mut l.mlp.down_proj,
            ] {
                *w = w.detach();
            }
        }
        m
    }

    /// Final norm and output head: `[batch, seq, hidden]` to `[batch, seq, vocab]` logits in f32
    /// (f64 for f64 models).
    pub fn head(&self, x: &Tensor, path: Path) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.norm, self.cfg.rms_norm_eps, path)?;
        ops::linear_rounded(&h, &self.lm_head, self.head_act)?.to_dtype(compute_dtype(self.dtype()))
    }

    /// `scale * masked_nll_sum(head(x))` of a chunk of positions (`x` `[batch, n, hidden]`,
    /// targets and mask `[batch, n]`) and its gradient, written out with no autograd graph: the
    /// head weight's and the final norm's gradients go to `sink` (when autograd tracks them);
    /// returns the value and the gradient with respect to `x`. The logits' gradient is
    /// `scale mask (softmax - onehot(target))` ([`grad::masked_nll_backward`]), then
    /// `dW = dl^T h`, `dh = dl W` and the norm's backward.
    pub fn head_loss_backward(
        &self,
        x: &Tensor,
        targets: &Tensor,
        mask: &Tensor,
        scale: f64,
        sink: &mut dyn FnMut(&[WeightGrad]) -> Result<()>,
    ) -> Result<(f64, Tensor)> {
        let (b, n, hidden) = x.dims3()?;
        let x = x.detach().reshape((b * n, hidden))?.contiguous()?;
        let norm = self.norm.detach();
        let (h, r) = grad::rms_forward(&x, &norm, self.cfg.rms_norm_eps)?;
        let logits = ops::linear_rounded(&h, &self.lm_head.detach(), self.head_act)?;
        let (dl, value) = grad::masked_nll_backward(
            &logits,
            &targets.flatten_all()?,
            &mask.flatten_all()?,
            scale,
        )?;
        drop(logits);
        let dl = dl.to_dtype(x.dtype())?;
        let mut grads = Vec::new();
        if self.lm_head.track_op() {
            grads.push((self.lm_head.clone(), dl.t()?.matmul(&h)?));
        }
        let dh = dl.matmul(&self.lm_head.detach())?;
        drop(dl);
        let (dx, dnorm) = grad::rms_backward(&dh, &x, &r, &norm, &dh.zeros_like()?)?;
        if self.norm.track_op() {
            grads.push((self.norm.clone(), dnorm));
        }
        sink(&grads)?;
        Ok((value, dx.reshape((b, n, hidden))?))
    }

    /// What the output head multiplies: the final norm of the last layer's output
    /// (`[batch, seq, hidden]`, fast path), without computing the logits.
    pub fn head_input(&self, tokens: &Tensor, start_pos: usize) -> Result<Tensor> {
        let mut x = self.embed(tokens)?;
        let pos = self.positions(start_pos, x.dim(1)?)?;
        for i in 0..self.layers.len() {
            x = self.layer(i, &x, &pos, Path::Fast)?;
        }
        ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps, Path::Fast)
    }

    /// Logits `[batch, seq, vocab]` (f32) of `tokens` (`[batch, seq]` u32) placed at absolute
    /// positions `start_pos ..` (the tokens attend only to each other; there is no cache), with the
    /// fused inference kernels. No gradients flow through this.
    pub fn forward(&self, tokens: &Tensor, start_pos: usize) -> Result<Tensor> {
        self.forward_path(tokens, start_pos, Path::Fast)
    }

    /// The same logits through differentiable ops only (for training).
    pub fn forward_train(&self, tokens: &Tensor, start_pos: usize) -> Result<Tensor> {
        self.forward_path(tokens, start_pos, Path::Differentiable)
    }

    pub fn forward_path(&self, tokens: &Tensor, start_pos: usize, path: Path) -> Result<Tensor> {
        let mut x = self.embed(tokens)?;
        let pos = self.positions(start_pos, x.dim(1)?)?;
        for i in 0..self.layers.len() {
            x = self.layer(i, &x, &pos, path)?;
        }
        self.head(&x, path)
    }

    /// Logits (fast path, positions from 0) and the attention entropy of every layer at
    /// `query_positions` (indices into the sequence): `entropy[layer][k]` is the mean over heads
    /// and batch rows of `H = -sum p ln p` of the query at `query_positions[k]` over its visible
    /// keys, with the recipe's logit scale applied (the attention the model actually uses).
    pub fn forward_with_entropy(
        &self,
        tokens: &Tensor,
        query_positions: &[usize],
    ) -> Result<(Tensor, Vec<Vec<f32>>)> {
        let (logits, per_head) = self.forward_with_entropy_heads(tokens, query_positions)?;
        let mean = per_head
            .into_iter()
            .map(|layer| {
                layer
                    .into_iter()
                    .map(|v| v.iter().map(|&x| x as f64).sum::<f64>() as f32 / v.len() as f32)
                    .collect()
            })
            .collect();
        Ok((logits, mean))
    }

    /// As [`Llama::forward_with_entropy`], unaveraged: `entropy[layer][k][b * heads + h]`.
    pub fn forward_with_entropy_heads(
        &self,
        tokens: &Tensor,
        query_positions: &[usize],
    ) -> Result<(Tensor, Vec<Vec<Vec<f32>>>)> {
        let (_, t) = tokens.dims2()?;
        if let Some(&p) = query_positions.iter().find(|&&p| p >= t) {
            candle_core::bail!("entropy query position {p} is past the sequence ({t} tokens)")
        }
        let mut x = self.embed(tokens)?;
        let pos = self.positions(0, t)?;
        let mut entropy = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let mut probe = EntropyProbe {
                positions: query_positions,
                values: vec![Vec::new(); query_positions.len()],
            };
            x = self.layer_probed(i, &x, &pos, Path::Fast, Some(&mut probe))?;
            entropy.push(probe.values);
        }
        Ok((self.head(&x, Path::Fast)?, entropy))
    }
}
