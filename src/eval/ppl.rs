//! Perplexity by context length and by position band.
//!
//! A window of `L` tokens predicts its tokens `1 .. L-1` from everything before them; the
//! negative log-likelihood of token `t` is `logsumexp(z) - z[t]` over the logits row `z` of
//! position `t - 1`, in f64. Perplexity is `exp(mean NLL)` over every scored token of every
//! window of that length. A band `[a, b)` holds the tokens whose position `t` (0-based, in the
//! window) has `a <= t < b`.

use serde::Serialize;

use super::error::EvalError;
use crate::runtime::{LogitsBackend, RuntimeError};

/// How to split a window's positions into bands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bands {
    /// `[0, c)`, `[c, 2c)`, `[2c, 4c)`, ...: inside the original window, then each doubling.
    Doubling { window: usize },
    /// `n` bands of (nearly) equal width: edges `floor(k L / n)`.
    Equal(usize),
}

/// The bands of a window of `length` positions, as `[start, end)` pairs, empty ones left out.
pub fn band_edges(length: usize, bands: Bands) -> Vec<(usize, usize)> {
    let mut edges = vec![0usize];
    match bands {
        Bands::Doubling { window } => {
            let mut e = window.max(1);
            while e < length {
                edges.push(e);
                e = e.saturating_mul(2);
            }
        }
        Bands::Equal(n) => {
            let n = n.max(1);
            edges.extend((1..n).map(|k| k * length / n));
        }
    }
    edges.push(length);
    edges.dedup();
    edges.windows(2).map(|w| (w[0], w[1])).collect()
}

/// `-ln softmax(row)[target]` in f64 (max-subtracted log-sum-exp).
pub fn token_nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

/// Summed NLL of the scored tokens of one band.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BandPpl {
    pub start: usize,
    pub end: usize,
    /// Tokens scored in the band (over every window).
    pub tokens: usize,
    pub nll: f64,
    pub ppl: f64,
}

/// Perplexity of one length.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LengthPpl {
    pub length: usize,
    pub windows: usize,
    pub tokens: usize,
    /// Mean NLL (nats per token).
    pub nll: f64,
    pub ppl: f64,
    pub bands: Vec<BandPpl>,
}

/// Perplexity of `windows` (each exactly `length` tokens) through `backend`, split into
/// `edges`. `tick` is called after each window (progress).
pub fn perplexity(
    backend: &mut dyn LogitsBackend,
    windows: &[Vec<u32>],
    edges: &[(usize, usize)],
    tick: &mut dyn FnMut(),
) -> Result<LengthPpl, EvalError> {
    let length = windows.first().map_or(0, |w| w.len());
    if windows.iter().any(|w| w.len() != length) || length < 2 {
        return Err(EvalError::BadValue {
            what: "windows",
            message: "every window must have the same length of at least 2 tokens".into(),
        });
    }
    let vocab = backend.vocab_size();
    let backend_name = backend.name().to_string();
    let mut sums = vec![(0usize, 0f64); edges.len()];
    for w in windows {
        backend.for_each_logits(w, &mut |pos, row| {
            let t = pos + 1;
            if t >= w.len() {
                return Ok(());
            }
            let target = w[t];
            if (target as usize) >= vocab || row.len() != vocab {
                return Err(RuntimeError::OutOfVocab {
                    backend: backend_name.clone(),
                    token: target,
                    pos: t,
                    n_vocab: vocab,
                });
            }
            let nll = token_nll(row, target);
            if let Some(b) = edges.iter().position(|&(a, e)| a <= t && t < e) {
                sums[b].0 += 1;
                sums[b].1 += nll;
            }
            Ok(())
        })?;
        tick();
    }
    let tokens: usize = sums.iter().map(|s| s.0).sum();
    let total: f64 = sums.iter().map(|s| s.1).sum();
    let nll = total / tokens.max(1) as f64;
    let bands = edges
        .iter()
        .zip(&sums)
        .map(|(&(start, end), &(n, s))| {
            let mean = if n == 0 { f64::NAN } else { s / n as f64 };
            BandPpl {
                start,
                end,
                tokens: n,
                nll: mean,
                ppl: mean.exp(),
            }
        })
        .collect();
    Ok(LengthPpl {
        length,
        windows: windows.len(),
        tokens,
        nll,
        ppl: nll.exp(),
        bands,
    })
}
