//! Collect an importance matrix with our forward, as llama.cpp's `llama-imatrix` does
//! (`tools/imatrix/imatrix.cpp`): the text's tokens cut into chunks of `ctx`, each evaluated
//! from position 0 with no cache, its first token replaced by BOS when the model adds one; for
//! every weight a linear layer multiplies, every row of its f32 input is summed (squares per
//! column) and counted. No token is skipped: llama.cpp skips the first half of a chunk only for
//! its perplexity, not for the sums.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use super::error::ImatrixError;
use super::matrix::{Entry, ImportanceMatrix};
use crate::convert::tensor_map::hf_to_gguf;
use crate::model::{record_input, InputSums, Llama};

/// How to cut the text.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Tokens per chunk (llama.cpp's `--ctx-size`).
    pub ctx: usize,
    /// At most this many chunks (None: every whole chunk of the text).
    pub max_chunks: Option<usize>,
    /// What `imatrix.datasets` records (the text file's name).
    pub dataset: String,
    /// The first token of every chunk becomes this (the model's BOS when it adds one).
    pub bos: Option<u32>,
}

/// What a collection did.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectReport {
    pub chunks: usize,
    pub tokens: usize,
    /// Tokens of the text left after the last whole chunk (llama.cpp drops them too).
    pub dropped_tokens: usize,
}

type Probes = BTreeMap<String, Arc<Mutex<InputSums>>>;

/// The Hugging Face names of every weight a linear layer multiplies, with the output head last.
fn linear_weights(model: &Llama) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..model.config().num_hidden_layers {
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(format!("model.layers.{i}.self_attn.{n}.weight"));
        }
        for n in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("model.layers.{i}.mlp.{n}.weight"));
        }
    }
    names.push(model.head_name().to_string());
    names
}

/// Evaluate `tokens` chunk by chunk and sum every linear layer's inputs. `progress` is called
/// with the tokens of each chunk as it finishes. Memory: one chunk's activations.
pub fn collect(
    model: &mut Llama,
    tokens: &[u32],
    opts: &CollectOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<(ImportanceMatrix, CollectReport), ImatrixError> {
    let ctx = opts.ctx;
    if ctx == 0 {
        return Err(ImatrixError::Collect(
            "the chunk size must be positive".into(),
        ));
    }
    let whole = tokens.len() / ctx;
    if whole == 0 {
        return Err(ImatrixError::Collect(format!(
            "the text has {} tokens, fewer than one chunk of {ctx}",
            tokens.len()
        )));
    }
    let chunks = opts.max_chunks.map_or(whole, |m| m.min(whole));
    if chunks == 0 {
        return Err(ImatrixError::Collect(
            "--chunks 0: nothing to evaluate".into(),
        ));
    }
    let names = linear_weights(model);
    let probes: Probes = names.iter().map(|n| (n.clone(), Arc::default())).collect();
    model.set_input_probes(&|n| probes.get(n).cloned());
    let head = probes.get(model.head_name()).cloned();
    let result = (|| -> candle_core::Result<()> {
        for c in 0..chunks {
            let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
            if let Some(b) = opts.bos {
                chunk[0] = b;
            }
            let t = Tensor::new(chunk.as_slice(), model.device())?.unsqueeze(0)?;
            let h = model.head_input(&t, 0)?;
            record_input(&h, &head)?;
            progress(ctx);
        }
        Ok(())
    })();
    model.set_input_probes(&|_| None);
    result.map_err(|e| ImatrixError::Collect(e.to_string()))?;

    let mut entries = BTreeMap::new();
    for n in names {
        let (gguf, _, _) = hf_to_gguf(&n)
            .ok_or_else(|| ImatrixError::Collect(format!("no GGUF name for weight {n:?}")))?;
        let s = probes[&n]
            .lock()
            .map_err(|_| ImatrixError::Collect(format!("weight {n:?}: poisoned lock")))?;
        entries.insert(
            gguf,
            Entry {
                sums: s.sum2.iter().map(|&v| v as f32).collect(),
                counts: vec![s.rows],
            },
        );
    }
    let m = ImportanceMatrix {
        entries,
        datasets: vec![opts.dataset.clone()],
        chunk_count: chunks as u32,
        chunk_size: ctx as u32,
    };
    let report = CollectReport {
        chunks,
        tokens: chunks * ctx,
        dropped_tokens: tokens.len() - whole * ctx,
    };
    Ok((m, report))
}
