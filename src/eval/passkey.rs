//! Passkey retrieval in the protocol of the Landmark Attention, LongLoRA and YaRN evaluations
//! (LongLoRA `passkey_retrieval.py`): a task line, filler sentences, the pass key line at a depth,
//! more filler, and the question; the model must continue with the key.
//!
//! Scoring rule (teacher-forced greedy): the answer is the tokens that `prompt + " " + key` adds
//! to the tokens of `prompt`. A trial is correct when, at every answer token `j`, the argmax of
//! the logits at position `j - 1` (first index on ties) is token `j`. That holds exactly when
//! greedy decoding from the prompt would emit the key's tokens, so it equals greedy generation
//! of the key, with one forward pass.

use serde::Serialize;

use super::error::EvalError;
use crate::runtime::{Encoder, LogitsBackend};
use crate::train::data::SplitMix64;

pub const TASK: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.";
/// One filler unit; units are joined with single spaces.
pub const GARBAGE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
pub const QUESTION: &str = "What is the pass key? The pass key is";

/// The line that hides the key.
pub fn key_line(key: u32) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key.")
}

/// The prompt with `prefix` filler units before the key line and `suffix` after, lines joined
/// by newlines as in LongLoRA (`"\n".join([task, prefix, key_line, suffix, question])`).
pub fn prompt_text(key: u32, prefix: usize, suffix: usize) -> String {
    let filler = |n: usize| vec![GARBAGE; n].join(" ");
    [
        TASK.to_string(),
        filler(prefix),
        key_line(key),
        filler(suffix),
        QUESTION.to_string(),
    ]
    .join("\n")
}

/// A built trial: the tokens of prompt and answer, and where the answer starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub key: u32,
    pub depth: f64,
    pub prefix: usize,
    pub suffix: usize,
    pub tokens: Vec<u32>,
    /// Index of the first answer token in `tokens` (>= 1).
    pub answer_start: usize,
}

/// Tokens of the prompt with `units` filler units split at `depth`, and its answer.
fn build_with(enc: &Encoder, key: u32, depth: f64, units: usize) -> Result<Trial, EvalError> {
    // Depth 0 puts the key right after the task line, depth 1 right before the question.
    let prefix = ((depth * units as f64).round() as usize).min(units);
    let suffix = units - prefix;
    let prompt = prompt_text(key, prefix, suffix);
    let prompt_ids = enc.encode(&prompt)?;
    let tokens = enc.encode(&format!("{prompt} {key}"))?;
    // Tokenizers may merge across the boundary; the answer starts where the two first differ.
    let answer_start = prompt_ids
        .iter()
        .zip(&tokens)
        .take_while(|(a, b)| a == b)
        .count();
    if answer_start == 0 || answer_start >= tokens.len() {
        return Err(EvalError::BadValue {
            what: "passkey",
            message: format!("the tokenizer gives no answer tokens for key {key}"),
        });
    }
    Ok(Trial {
        key,
        depth,
        prefix,
        suffix,
        tokens,
        answer_start,
    })
}

/// The trial of `key` at `depth` (0 = key first, 1 = key last) with as many whole filler units
/// as fit in `length` tokens, answer included.
pub fn build_trial(enc: &Encoder, length: usize, depth: f64, key: u32) -> Result<Trial, EvalError> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(EvalError::BadValue {
            what: "depth",
            message: format!("must be in [0, 1], got {depth}"),
        });
    }
    let empty = build_with(enc, key, depth, 0)?;
    if empty.tokens.len() > length {
        return Err(EvalError::PasskeyTooShort {
            length,
            need: empty.tokens.len(),
        });
    }
    // Units cost a nearly constant number of tokens: estimate, then step to the largest fit.
    let probe = 8;
    let grown = build_with(enc, key, depth, probe)?.tokens.len();
    let per_unit = (grown.saturating_sub(empty.tokens.len()) as f64 / probe as f64).max(1.0);
    let mut units = ((length - empty.tokens.len()) as f64 / per_unit).floor() as usize;
    let mut best: Option<Trial> = None;
    loop {
        let t = build_with(enc, key, depth, units)?;
        if t.tokens.len() <= length {
            best = Some(t);
            units += 1;
        } else if best.is_some() || units == 0 {
            break;
        } else {
            units -= 1;
        }
    }
    Ok(best.unwrap_or(empty))
}

/// How one trial went.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TrialScore {
    pub correct: bool,
    /// Answer tokens whose teacher-forced argmax was right.
    pub matched: usize,
    pub answer_tokens: usize,
}

/// First index of the largest value.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Score `trial` with the teacher-forced greedy rule of the module docs.
pub fn score(backend: &mut dyn LogitsBackend, trial: &Trial) -> Result<TrialScore, EvalError> {
    let t = &trial.tokens;
    let first = trial.answer_start;
    if first == 0 || first >= t.len() {
        return Err(EvalError::BadValue {
            what: "passkey",
            message: format!("the trial of key {} has no answer tokens", trial.key),
        });
    }
    let mut matched = 0;
    // The last token's row predicts nothing we score, so run everything but it.
    backend.for_each_logits(&t[..t.len() - 1], &mut |pos, row| {
        if pos + 1 >= first && argmax(row) == t[pos + 1] as usize {
            matched += 1;
        }
        Ok(())
    })?;
    let answer_tokens = t.len() - first;
    Ok(TrialScore {
        correct: matched == answer_tokens,
        matched,
        answer_tokens,
    })
}

/// Accuracy of one (length, depth) cell.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cell {
    pub length: usize,
    pub depth: f64,
    pub trials: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Mean fraction of answer tokens predicted right.
    pub token_accuracy: f64,
    /// Prompt + answer tokens of the trials (the longest).
    pub tokens: usize,
}

/// The keys of a run: 5-digit numbers, uniform in 10000..=99999, from SplitMix64(seed).
pub fn keys(seed: u64, n: usize) -> Vec<u32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| 10_000 + rng.below(90_000) as u32).collect()
}

/// Run `trials` trials at every (length, depth); trial `i` of every cell uses key `i`.
pub fn evaluate(
    backend: &mut dyn LogitsBackend,
    enc: &Encoder,
    lengths: &[usize],
    depths: &[f64],
    trials: usize,
    seed: u64,
    tick: &mut dyn FnMut(),
) -> Result<Vec<Cell>, EvalError> {
    let keys = keys(seed, trials);
    let mut cells = Vec::new();
    for &length in lengths {
        for &depth in depths {
            let (mut correct, mut frac, mut longest) = (0, 0.0, 0);
            for &key in &keys {
                let trial = build_trial(enc, length, depth, key)?;
                let s = score(backend, &trial)?;
                correct += usize::from(s.correct);
                frac += s.matched as f64 / s.answer_tokens as f64;
                longest = longest.max(trial.tokens.len());
                tick();
            }
            cells.push(Cell {
                length,
                depth,
                trials,
                correct,
                accuracy: correct as f64 / trials.max(1) as f64,
                token_accuracy: frac / trials.max(1) as f64,
                tokens: longest,
            });
        }
    }
    Ok(cells)
}
