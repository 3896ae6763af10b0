//! Logits of a model directory at every position, with the recipe of its config (or flags).

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::Checkpoint;
use crate::model::Llama;
use crate::rope::Recipe;

/// What to run: token ids, or a text tokenized with the model's tokenizer.
pub enum LogitsInput<'a> {
    Tokens(Vec<u32>),
    Text(&'a str),
}

/// Tokens of `input` for the checkpoint (adding BOS when its tokenizer config says so).
pub fn tokens_for(ckpt: &Checkpoint, input: LogitsInput) -> anyhow::Result<Vec<u32>> {
    match input {
        LogitsInput::Tokens(t) => Ok(t),
        LogitsInput::Text(text) => {
            let tk = ckpt
                .tokenizer()
                .with_context(|| format!("{}: tokenizer", ckpt.dir.display()))?;
            let enc = tk
                .tokenizer
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            let mut ids = enc.get_ids().to_vec();
            if tk.config.add_bos_token.unwrap_or(false) {
                if let Some(bos) = ckpt.config.model.bos_token_id {
                    ids.insert(0, bos);
                }
            }
            Ok(ids)
        }
    }
}

/// f32 logits `[n_tokens, vocab]` of `tokens` through `model_dir` with `recipe`.
pub fn model_logits(
    model_dir: &Path,
    recipe: &Recipe,
    tokens: &[u32],
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(Vec<f32>, usize)> {
    if tokens.is_empty() {
        bail!("no tokens to run");
    }
    let ckpt = Checkpoint::open(model_dir)?;
    let mut cfg = ckpt.config.model.clone();
    cfg.recipe = recipe.clone();
    let vocab = cfg.vocab_size;
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary ({vocab})");
    }
    let model = Llama::load(ckpt.var_builder(dtype, device), &cfg)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
    let logits = model.forward(&input, 0)?.squeeze(0)?.to_dtype(DType::F32)?;
    Ok((logits.flatten_all()?.to_vec1::<f32>()?, vocab))
}
