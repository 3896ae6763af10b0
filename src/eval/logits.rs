//! Logits of a model directory at every position, with the recipe of its config (or flags).

use candle_core::{DType, Device};

use super::error::EvalError;
use crate::checkpoint::Checkpoint;
use crate::rope::Recipe;
use crate::runtime::{load_llama, CandleBackend, LogitsBackend};

/// f32 logits `[n_tokens, vocab]` of `tokens` through the weights of `ckpt` with `recipe`, and
/// the vocabulary size.
pub fn model_logits(
    ckpt: &Checkpoint,
    recipe: &Recipe,
    tokens: &[u32],
    dtype: DType,
    device: &Device,
) -> Result<(Vec<f32>, usize), EvalError> {
    let mut cfg = ckpt.config.model.clone();
    cfg.recipe = recipe.clone();
    let model = load_llama(ckpt, &cfg, dtype, device)?;
    let mut backend = CandleBackend::new(model, format!("candle {}", ckpt.dir.display()));
    Ok((backend.logits(tokens)?, cfg.vocab_size))
}
