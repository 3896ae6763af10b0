//! The LLaMA-family forward, driven by the recipe.
//!
//! This forward is the reference that training, conversion checks and the verifier use. Its
//! conventions, and where each comes from:
//!
//! - **Tensor names** are Hugging Face's (`model.embed_tokens.weight`,
//!   `model.layers.N.self_attn.{q,k,v,o}_proj.weight`, `model.layers.N.mlp.{gate,up,down}_proj.weight`,
//!   `model.layers.N.{input,post_attention}_layernorm.weight`, `model.norm.weight`,
//!   `lm_head.weight`); weights are `[out, in]` and applied as `x W^T`, no biases
//!   (transformers `LlamaForCausalLM`). With `tie_word_embeddings` the head is the embedding matrix.
//! - **RMSNorm** `x * rsqrt(mean(x^2) + eps) * w`, computed in f32 and rounded once to the model
//!   dtype (transformers `LlamaRMSNorm` normalises in f32 too).
//! - **MLP** SwiGLU `down(silu(gate(x)) * up(x))` (LLaMA's `hidden_act: silu`).
//! - **RoPE** rotate-half layout: pair `j` with `j + d/2` (transformers `rotate_half`; *not* the
//!   interleaved pairs `2j, 2j+1` of Meta's original code and of candle's `rope_i`), inverse
//!   frequencies from `Recipe::inv_freq`, cos and sin multiplied by `Recipe::attention_factor`
//!   (YaRN's mscale, so logits grow by its square). Angles and tables are evaluated in f64 and
//!   rounded once to the model dtype.
//! - **Logit scale** `Recipe::logit_scale(layer, p)` multiplies q after RoPE, per absolute
//!   position `p` and layer; k is untouched (method.md; the paper's reference patch). The scale is
//!   rounded to f32 and then to the model dtype before multiplying, as the reference does in bf16.
//! - **Attention** grouped-query (query head `i` uses kv head `i / (heads / kv_heads)`,
//!   transformers `repeat_kv`), causal, scores `q.k / sqrt(head_dim)` and softmax in f32, computed
//!   for blocks of query rows (default [`DEFAULT_QUERY_BLOCK`]) so one layer never holds more than
//!   `batch * heads * block * seq` scores.
//! - **Entropy** `H = ln Z - sum(e^s s) / Z` (natural log, max-subtracted logits; method.md).
//! - **Paths**: [`Path::Fast`] uses candle's fused `rms_norm`, `rope`, `softmax_last_dim`, which
//!   have no backward pass; [`Path::Differentiable`] uses plain ops only (DEVELOPERS.md, candle
//!   traps). They agree to f32 rounding.
//! - **Dtypes**: f32, bf16 (f16) weights and residual stream; matmuls in the model dtype; logits f32.
//!   f64 models (tests, gradient checks) compute everything in f64.

mod attention;
mod cpu;
pub mod grad;
mod llama;
mod ops;
mod rope;

pub use attention::{
    attend, attend_backward, query_blocks, Attention, EntropyProbe, DEFAULT_QUERY_BLOCK,
};
pub(crate) use cpu::{any_shared_storage, on_cpu_slice, on_cpu_slice_mut, MutElem};
pub use llama::{DecoderLayer, Llama, Mlp, WeightGrad};
pub use ops::{
    compute_dtype, entropy, linear, linear_probed, linear_rounded, record_input, rms_norm,
    rope as apply_rope, round_activations, softmax, ActRound, InputProbe, InputSums, Path,
};
pub use rope::{Positions, Rope};
