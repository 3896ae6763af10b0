//! Attention entropy per layer at query positions, against uniform attention (the paper's
//! Figure 1): `H = -sum p ln p` of the query at position `p` over its `n = p + 1` visible keys,
//! averaged over heads and windows; uniform attention has `H = ln n` (method.md).

use candle_core::Tensor;
use serde::Serialize;

use super::error::EvalError;
use crate::model::Llama;

/// Mean entropy per layer and position.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EntropyReport {
    /// Query positions (0-based).
    pub positions: Vec<usize>,
    /// Tokens per window.
    pub length: usize,
    pub windows: usize,
    /// `layers[l][k]`: mean over heads and windows at `positions[k]`, nats.
    pub layers: Vec<Vec<f64>>,
    /// `ln(p + 1)` per position: the entropy of uniform attention.
    pub uniform: Vec<f64>,
}

/// Entropy of `model`'s attention at `positions` over `windows` (token sequences of one
/// length, each longer than the largest position). `tick` runs after each window.
pub fn attention_entropy(
    model: &Llama,
    windows: &[Vec<u32>],
    positions: &[usize],
    tick: &mut dyn FnMut(),
) -> Result<EntropyReport, EvalError> {
    let length = windows.first().map_or(0, |w| w.len());
    if positions.is_empty() {
        return Err(EvalError::BadValue {
            what: "positions",
            message: "give at least one query position".into(),
        });
    }
    if let Some(&p) = positions.iter().find(|&&p| p >= length) {
        return Err(EvalError::BadValue {
            what: "positions",
            message: format!("position {p} is past the window of {length} tokens"),
        });
    }
    let layers = model.config().num_hidden_layers;
    let mut sums = vec![vec![0f64; positions.len()]; layers];
    for w in windows {
        let input = Tensor::new(w.as_slice(), model.device())?.unsqueeze(0)?;
        let (_, ent) = model.forward_with_entropy(&input, positions)?;
        for (l, row) in ent.iter().enumerate() {
            for (k, &v) in row.iter().enumerate() {
                sums[l][k] += v as f64;
            }
        }
        tick();
    }
    let n = windows.len().max(1) as f64;
    Ok(EntropyReport {
        positions: positions.to_vec(),
        length,
        windows: windows.len(),
        layers: sums
            .into_iter()
            .map(|r| r.into_iter().map(|s| s / n).collect())
            .collect(),
        uniform: positions.iter().map(|&p| ((p + 1) as f64).ln()).collect(),
    })
}
