//! The verifier: reference forward of a model directory (f32, its config's recipe in the form
//! a runtime evaluates), then each candidate backend streamed against it, band by band.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;

use super::lines::{consistency, fidelity, Check, LongContextRule, PassLines};
use super::metadata::{check, Issue};
use super::metrics::{bands, BandMetrics, Comparison, MetricsError, Reference};
use super::weights::{check_weights, plain_model, PlainWeights, WeightCheck};
use crate::checkpoint::{Checkpoint, CheckpointError, ModelConfig};
use crate::convert::read_hparams;
use crate::gguf::{open_set, GgmlType, GgufError};
use crate::model::Llama;
use crate::rope::{runtime_form, Recipe, Target};
use crate::runtime::{
    activation_rounding, load_gguf_model, load_llama, open_backend, runtime_recipe, BackendKind,
    CandleBackend, Encoder, LogitsBackend, RuntimeError,
};

/// Why the verifier could not run (exit code 2). A failed check is a report, not an error.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: {source}", path.display())]
    Gguf { path: PathBuf, source: GgufError },
    #[error("{}: no 2-D tensors", path.display())]
    NoMatrices { path: PathBuf },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Opening the reference or a candidate, or tokenizing the text.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{backend}: {source}")]
    Backend {
        backend: String,
        source: Box<RuntimeError>,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("no tokens to run")]
    NoTokens,
    #[error("token {token} at position {pos} is outside the vocabulary of {n_vocab}")]
    OutOfVocab {
        token: u32,
        pos: usize,
        n_vocab: usize,
    },
    #[error("no GGUF to verify")]
    NoGguf,
    /// The plain quantization of the checkpoint to the file's types could not be built.
    #[error("{}: plain quantization of the checkpoint to the file's types: {reason}", path.display())]
    Plain { path: PathBuf, reason: String },
}

/// Where the tokens come from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// A text, tokenized with the reference's tokenizer (repeated when shorter than the length).
    Text(String),
    Tokens(Vec<u32>),
    /// Uniform random ids below the vocabulary (and below `max_id` when given).
    Random {
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub reference: PathBuf,
    pub gguf: PathBuf,
    pub backends: Vec<BackendKind>,
    /// Lengths to cover; the longest is run (causal: a prefix's logits do not depend on what
    /// follows) and each ends a band. Empty: the recipe's target window, at least 4 c.
    pub lengths: Vec<usize>,
    pub source: TokenSource,
    pub max_nmse: Option<f64>,
    pub max_kld: Option<f64>,
    pub min_top1: Option<f64>,
    /// Replace the type's lines entirely (tests use it to judge a file by another type's lines).
    pub lines: Option<PassLines>,
    pub rule: LongContextRule,
    /// Bytes the reference logits may use; None: from the machine's available memory.
    pub memory_limit: Option<u64>,
}

impl VerifyOptions {
    pub fn new(reference: &Path, gguf: &Path) -> VerifyOptions {
        VerifyOptions {
            reference: reference.to_path_buf(),
            gguf: gguf.to_path_buf(),
            backends: vec![BackendKind::Candle],
            lengths: Vec::new(),
            source: TokenSource::Random { seed: 0 },
            max_nmse: None,
            max_kld: None,
            min_top1: None,
            lines: None,
            rule: LongContextRule::default(),
            memory_limit: None,
        }
    }
}

/// Progress of the long stages: (stage, positions done, total).
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

#[derive(Debug, Clone, Serialize)]
pub struct BandResult {
    #[serde(flatten)]
    pub metrics: BandMetrics,
    pub within_original: bool,
    pub checks: Vec<Check>,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendResult {
    pub backend: String,
    /// Fidelity: against the checkpoint (what quantization costs); judged within c.
    pub bands: Vec<BandResult>,
    /// Consistency: against our forward of the file's own (dequantized) weights with the
    /// reference recipe: no weight noise, only the runtime's arithmetic and any recipe fault.
    pub consistency: Vec<BandResult>,
    /// Our forward rounded as this runtime rounds against our f32 forward of the same weights,
    /// band by band: what the rounding costs (zero for a runtime that rounds nothing).
    pub rounding: Vec<BandMetrics>,
    /// Within c, the runtime against our f32 forward of the file's own weights: what its
    /// arithmetic costs (the plain rule adds it to the fidelity lines).
    pub arithmetic: BandMetrics,
    /// The runtime against our forward of what the file's keys say (rounded as the runtime
    /// rounds): its noise band by band, the baseline of the consistency bands.
    pub reading: Vec<BandMetrics>,
    /// The fidelity lines this backend was judged by (the plain rule adds its arithmetic).
    pub lines: PassLines,
    pub fidelity_pass: bool,
    /// Every consistency band passes (within c: arithmetic; beyond: no worse than within).
    pub runtime_pass: bool,
    /// The consistency bands beyond c pass.
    pub long_context_pass: bool,
    /// KL divergence at position 0 (no rotation, attention to itself only).
    pub kld_position0: f64,
    /// The first position whose KL divergence exceeds the "gross" line.
    pub first_bad_position: Option<usize>,
    /// Index of the first failing band.
    pub first_failing_band: Option<usize>,
    pub diagnosis: Vec<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub reference: PathBuf,
    pub gguf: PathBuf,
    pub recipe: String,
    pub runtime_recipe: Option<String>,
    pub original_context: u64,
    pub length: usize,
    pub tokens: String,
    pub file_type: String,
    pub parameters: u64,
    pub lines: PassLines,
    pub long_context_rule: LongContextRule,
    pub metadata: Vec<Issue>,
    /// Every tensor against the checkpoint's, relative to a plain quantization to its type.
    pub weights: WeightCheck,
    /// The plain-quantization rule's measure: the checkpoint rounded through the file's types,
    /// our forward, against the reference (when the lines come from that rule).
    pub plain_quantization: Option<Vec<BandMetrics>>,
    /// A recipe the runtime cannot express exactly: its gaps and their measured effect (exact
    /// recipe against its runtime form, both in our forward).
    pub approximation: Vec<String>,
    pub approximation_effect: Option<Vec<BandMetrics>>,
    pub notes: Vec<String>,
    pub backends: Vec<BackendResult>,
    pub pass: bool,
}

fn gguf_err(path: &Path, source: GgufError) -> VerifyError {
    VerifyError::Gguf {
        path: path.to_path_buf(),
        source,
    }
}

/// Parameters of a LLaMA-family config (embedding, head unless tied, attention, MLP).
pub fn parameter_count(c: &ModelConfig) -> u64 {
    let (h, d) = (c.hidden_size as u64, c.head_dim as u64);
    let attn = h * d * (2 * c.num_attention_heads as u64 + 2 * c.num_key_value_heads as u64);
    let mlp = 3 * h * c.intermediate_size as u64;
    let emb = c.vocab_size as u64 * h * if c.tie_word_embeddings { 1 } else { 2 };
    emb + c.num_hidden_layers as u64 * (attn + mlp + 2 * h) + h
}

/// The type that carries most weight elements of the 2-D tensors.
fn dominant_type(path: &Path) -> Result<GgmlType, VerifyError> {
    let m = open_set(path).map_err(|e| gguf_err(path, e))?;
    let mut counts: Vec<(GgmlType, u64)> = Vec::new();
    for t in m.file.tensors.iter().filter(|t| t.dims.len() >= 2) {
        match counts.iter_mut().find(|(ty, _)| *ty == t.ggml_type) {
            Some((_, n)) => *n += t.elements(),
            None => counts.push((t.ggml_type, t.elements())),
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(t, _)| t)
        .ok_or_else(|| VerifyError::NoMatrices {
            path: path.to_path_buf(),
        })
}

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Splitmix64: reproducible random tokens without a dependency.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn tokens_for(
    opts: &VerifyOptions,
    ckpt: &Checkpoint,
    len: usize,
    notes: &mut Vec<String>,
) -> Result<(Vec<u32>, String, usize), VerifyError> {
    let vocab = ckpt.config.model.vocab_size;
    let (mut ids, label) = match &opts.source {
        TokenSource::Tokens(t) => (t.clone(), format!("{} given tokens", t.len())),
        TokenSource::Random { seed } => {
            let mut s = *seed;
            let t = (0..len)
                .map(|_| (splitmix(&mut s) % vocab as u64) as u32)
                .collect();
            (t, format!("random tokens, seed {seed}"))
        }
        TokenSource::Text(text) => {
            let ids = Encoder::from_checkpoint(ckpt)?.encode(text)?;
            let n = ids.len();
            (ids, format!("text, {n} tokens"))
        }
    };
    if ids.is_empty() {
        return Err(VerifyError::NoTokens);
    }
    if let Some((pos, &token)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        return Err(VerifyError::OutOfVocab {
            token,
            pos,
            n_vocab: vocab,
        });
    }
    // the tokens of the source itself, before any repetition
    let own = ids.len().min(len);
    if ids.len() < len {
        if matches!(opts.source, TokenSource::Tokens(_)) {
            notes.push(format!(
                "{} tokens given: length reduced from {len}",
                ids.len()
            ));
        } else {
            notes.push(format!(
                "the text has {} tokens: repeated to {len}",
                ids.len()
            ));
            let base = ids.clone();
            while ids.len() < len {
                ids.extend_from_slice(&base[..base.len().min(len - ids.len())]);
            }
        }
    }
    ids.truncate(len);
    Ok((ids, label, own))
}

/// The GGUF's own vocabulary must tokenize the text as the reference tokenizer does (over the
/// positions compared).
fn tokenizer_issue(
    gguf: &Path,
    text: &str,
    reference: &[u32],
    len: usize,
) -> Result<Option<Issue>, RuntimeError> {
    let g = Encoder::open(gguf)?.encode(text)?;
    let n = len.min(reference.len());
    Ok((0..n)
        .find(|&i| reference.get(i) != g.get(i))
        .map(|i| Issue {
            key: "tokenizer".into(),
            message: format!(
            "the GGUF's vocabulary tokenizes the text differently from the reference tokenizer, \
             first at token {i} ({:?} vs {:?})",
            g.get(i),
            reference.get(i)
        ),
        }))
}

fn run_backend(
    backend: &mut dyn LogitsBackend,
    tokens: &[u32],
    f: &mut crate::runtime::RowFn,
) -> Result<(), VerifyError> {
    let name = backend.name().to_string();
    backend
        .for_each_logits(tokens, f)
        .map_err(|source| VerifyError::Backend {
            backend: name,
            source: Box::new(source),
        })
}

/// Run the verifier. Metadata is checked first; every backend is then compared band by band.
pub fn verify(opts: &VerifyOptions, progress: Progress) -> Result<VerifyReport, VerifyError> {
    let mut all = verify_many(opts, std::slice::from_ref(&opts.gguf), progress)?;
    all.pop().ok_or(VerifyError::NoGguf)
}

/// [`verify`] for several GGUFs of the same reference: the reference is computed once.
pub fn verify_many(
    opts: &VerifyOptions,
    ggufs: &[PathBuf],
    progress: Progress,
) -> Result<Vec<VerifyReport>, VerifyError> {
    let device = Device::Cpu;
    let ckpt = Checkpoint::open(&opts.reference)?;
    let cfg = ckpt.config.model.clone();
    let exact = cfg.recipe.clone();
    let form = runtime_form(&exact, Target::LlamaCpp, cfg.head_dim);
    let gaps = form.reasons();
    let want = form.recipe;
    let c = exact.original_context as usize;
    let params = parameter_count(&cfg);
    let mut notes = Vec::new();

    // metadata, before any compute
    let checked = ggufs
        .iter()
        .map(|gguf| check_file(opts, gguf, &cfg, &want, params))
        .collect::<Result<Vec<_>, _>>()?;
    let len = choose_length(opts, &exact, cfg.vocab_size, &mut notes);
    let (tokens, token_label, source_len) = tokens_for(opts, &ckpt, len, &mut notes)?;
    let len = tokens.len();
    let band_list = bands(c, len, &opts.lengths);

    // reference: our forward of the directory, f32, with the runtime form of its recipe
    let reference = {
        let mut rcfg = cfg.clone();
        rcfg.recipe = want.clone();
        reference_logits(&ckpt, &rcfg, &device, &tokens, "reference", progress)?
    };
    let approximation_effect = if gaps.is_empty() {
        None
    } else {
        let exact_ref = reference_logits(&ckpt, &cfg, &device, &tokens, "exact recipe", progress)?;
        let mut cmp = Comparison::new(&reference, &tokens, band_list.clone());
        for p in 0..exact_ref.rows() {
            cmp.push(p, exact_ref.row(p))?;
        }
        notes.push(
            "the candidates are compared with the runtime form of the recipe; \
             approximation_effect measures the exact recipe against it"
                .into(),
        );
        Some(cmp.finish()?)
    };

    let mut reports = Vec::with_capacity(ggufs.len());
    for (gguf, mut file) in ggufs.iter().zip(checked) {
        let mut notes = notes.clone();
        if let TokenSource::Text(text) = &opts.source {
            // the text's own tokens, not the repetitions that fill the length
            match tokenizer_issue(gguf, text, &tokens, source_len) {
                Ok(Some(i)) => file.issues.push(i),
                Ok(None) => {}
                Err(e) => notes.push(format!("tokenizer not compared: {e}")),
            }
        }
        let (weights, plain) = file_weights(&ckpt, gguf, file.lines.needs_plain(), progress)?;
        let plain_quantization = if file.lines.needs_plain() {
            let m = plain_cost(
                plain, gguf, &cfg, &want, &reference, &tokens, &band_list, progress,
            )?;
            file.lines = file.lines.clone().with_plain(m[0].kld_mean);
            Some(m)
        } else {
            None
        };
        // the file's own weights in our forward, f32 throughout, with the reference recipe
        let own_f32 = own_logits(gguf, Some(&want), &HashMap::new(), &tokens, progress)?;
        let candidate = Candidate {
            gguf,
            reference: &reference,
            own_f32: &own_f32,
            want: &want,
            tokens: &tokens,
            bands: &band_list,
            original_context: c,
        };
        let results = opts
            .backends
            .iter()
            .map(|&kind| run_candidate(opts, &candidate, &file, kind, &device, progress))
            .collect::<Result<Vec<_>, _>>()?;
        let mut results = results;
        weight_diagnosis(&weights, &mut results);
        let pass = file.issues.is_empty()
            && weights.pass
            && results.iter().all(|r| r.fidelity_pass && r.runtime_pass);
        reports.push(VerifyReport {
            reference: opts.reference.clone(),
            gguf: gguf.clone(),
            recipe: exact.to_string(),
            runtime_recipe: file.runtime_text,
            original_context: exact.original_context,
            length: len,
            tokens: token_label.clone(),
            file_type: file.file_type.to_string(),
            parameters: params,
            lines: file.lines,
            long_context_rule: opts.rule,
            metadata: file.issues,
            weights,
            plain_quantization,
            approximation: gaps.clone(),
            approximation_effect: approximation_effect.clone(),
            notes,
            backends: results,
            pass,
        });
    }
    Ok(reports)
}

/// Whether the runtime keys of `gguf` say exactly `want` (and it has no `rope_freqs.weight`).
fn reads_as(gguf: &Path, want: &Recipe) -> Result<bool, VerifyError> {
    let mapped = open_set(gguf).map_err(|e| gguf_err(gguf, e))?;
    let meta = &mapped.file.metadata;
    let Ok(hp) = read_hparams(meta) else {
        return Ok(false);
    };
    let freqs = mapped
        .file
        .tensors
        .iter()
        .any(|t| t.name == crate::convert::tensor_map::ROPE_FREQS);
    Ok(!freqs && runtime_recipe(meta, hp.head_dim).is_ok_and(|r| r.recipe == *want))
}

/// Our forward of the file's own weights with the reference recipe (`want`; None: the recipe
/// its keys say), its activations rounded as `round` says (by Hugging Face weight name; empty:
/// f32 throughout): what a correct runtime computes of this file (of its keys).
fn own_logits(
    gguf: &Path,
    want: Option<&Recipe>,
    round: &HashMap<String, GgmlType>,
    tokens: &[u32],
    progress: Progress,
) -> Result<Reference, VerifyError> {
    let err = |source: RuntimeError| VerifyError::Backend {
        backend: "file weights".into(),
        source: Box::new(source),
    };
    let mut g = load_gguf_model(gguf, &Device::Cpu).map_err(|e| err(e.into()))?;
    // None: the recipe the keys say (and rope_freqs), as our candle reading runs the file
    if let Some(want) = want {
        g.model.set_recipe(want.clone());
        g.model.set_freq_factors(None).map_err(|source| {
            err(RuntimeError::Model {
                path: gguf.to_path_buf(),
                source,
            })
        })?;
    }
    g.model
        .set_activation_rounding(&|name| round.get(name).copied());
    let stage = if round.is_empty() {
        "file weights"
    } else {
        "file weights, runtime rounding"
    };
    model_logits(g.model, tokens, stage, progress)
}

/// A failed weight check names its tensors first in every backend's diagnosis (the logits only
/// show that something is wrong; the tensors say what), and replaces the generic "quantization
/// costs more" reading, which a wrong tensor would otherwise get.
fn weight_diagnosis(weights: &WeightCheck, results: &mut [BackendResult]) {
    let lines: Vec<String> = weights
        .failures()
        .map(|t| {
            format!(
                "weights: {} differs from the checkpoint by {:.3} (line {:.3}){}",
                t.tensor,
                t.rel_error,
                t.line,
                t.finding
                    .as_deref()
                    .map(|f| format!(": {f}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    if lines.is_empty() {
        return;
    }
    for r in results {
        r.diagnosis
            .retain(|d| !d.starts_with("small uniform error"));
        let mut d = lines.clone();
        d.append(&mut r.diagnosis);
        r.diagnosis = d;
    }
}

/// The weight check of one file (src/verify/weights.rs).
fn file_weights(
    ckpt: &Checkpoint,
    gguf: &Path,
    keep_plain: bool,
    progress: Progress,
) -> Result<(WeightCheck, PlainWeights), VerifyError> {
    let mapped = open_set(gguf).map_err(|e| gguf_err(gguf, e))?;
    let hp = read_hparams(&mapped.file.metadata).map_err(|e| VerifyError::Backend {
        backend: "weights".into(),
        source: Box::new(RuntimeError::consumer(e)),
    })?;
    Ok(check_weights(
        ckpt,
        &mapped,
        &hp,
        keep_plain,
        &mut |i, n| progress("weights", i, n),
    ))
}

/// What a plain quantization of the checkpoint to the file's types costs in our forward, band
/// by band against the reference (the plain-quantization rule's measure).
#[allow(clippy::too_many_arguments)]
fn plain_cost(
    plain: PlainWeights,
    gguf: &Path,
    cfg: &ModelConfig,
    want: &Recipe,
    reference: &Reference,
    tokens: &[u32],
    band_list: &[super::metrics::Band],
    progress: Progress,
) -> Result<Vec<BandMetrics>, VerifyError> {
    let mut pcfg = cfg.clone();
    pcfg.recipe = want.clone();
    let model = plain_model(plain, &pcfg, &Device::Cpu).map_err(|reason| VerifyError::Plain {
        path: gguf.to_path_buf(),
        reason,
    })?;
    let mut backend = CandleBackend::new(model, "plain quantization");
    let mut cmp = Comparison::new(reference, tokens, band_list.to_vec());
    let total = tokens.len();
    run_backend(&mut backend, tokens, &mut |pos, row| {
        cmp.push(pos, row).map_err(RuntimeError::consumer)?;
        if pos % 64 == 0 || pos + 1 == total {
            progress("plain quantization", pos + 1, total);
        }
        Ok(())
    })?;
    Ok(cmp.finish()?)
}

/// One file's metadata checked before any compute, with the lines it is judged by.
struct CheckedFile {
    issues: Vec<Issue>,
    runtime_text: Option<String>,
    file_type: GgmlType,
    lines: PassLines,
}

fn check_file(
    opts: &VerifyOptions,
    gguf: &Path,
    cfg: &ModelConfig,
    want: &Recipe,
    params: u64,
) -> Result<CheckedFile, VerifyError> {
    let mapped = open_set(gguf).map_err(|e| gguf_err(gguf, e))?;
    let got = runtime_recipe(&mapped.file.metadata, cfg.head_dim);
    let issues = check(&mapped.file.metadata, got.as_ref(), cfg, want);
    let runtime_text = got
        .as_ref()
        .ok()
        .map(|g| format!("{} ({})", g.recipe, g.arch));
    drop(mapped);
    let file_type = dominant_type(gguf)?;
    let lines = opts
        .lines
        .clone()
        .unwrap_or_else(|| PassLines::for_type(file_type, params))
        .with_overrides(opts.max_nmse, opts.max_kld, opts.min_top1);
    Ok(CheckedFile {
        issues,
        runtime_text,
        file_type,
        lines,
    })
}

/// The length compared: the longest asked, else the target window (>= 4c); reduced only when
/// the reference logits would not fit half the memory available (said in `notes`).
fn choose_length(
    opts: &VerifyOptions,
    exact: &Recipe,
    vocab: usize,
    notes: &mut Vec<String>,
) -> usize {
    let c = exact.original_context as usize;
    let mut len = opts
        .lengths
        .iter()
        .copied()
        .max()
        .unwrap_or_else(|| (exact.context as usize).max(4 * c));
    if let TokenSource::Tokens(t) = &opts.source {
        len = len.min(t.len());
    }
    let budget = opts
        .memory_limit
        .or_else(|| mem_available().map(|m| m / 2))
        .unwrap_or(u64::MAX);
    // the reference row, the file's own weights' rows (f32, and rounded as llama.cpp rounds),
    // and one more for the exact-recipe pass and the candidate
    let per_row = (vocab as u64) * 4 * 4;
    if per_row * len as u64 > budget {
        let fit = (budget / per_row.max(1)) as usize;
        let new = fit.max(c.min(len)).min(len);
        notes.push(format!(
            "length reduced from {len} to {new}: the reference logits of {len} positions need \
             {:.1} GB of the {:.1} GB allowed",
            per_row as f64 * len as f64 * 1e-9 / 4.0,
            budget as f64 * 1e-9
        ));
        len = new;
    }
    len
}

/// What every backend run of one candidate file shares.
struct Candidate<'a> {
    gguf: &'a Path,
    reference: &'a Reference,
    /// Our forward of the file's own weights with the reference recipe, in f32.
    own_f32: &'a Reference,
    /// The reference recipe in the runtime's form.
    want: &'a Recipe,
    tokens: &'a [u32],
    bands: &'a [super::metrics::Band],
    original_context: usize,
}

/// One backend on one file: stream its logits against the reference and judge them.
fn run_candidate(
    opts: &VerifyOptions,
    cand: &Candidate<'_>,
    file: &CheckedFile,
    kind: BackendKind,
    device: &Device,
    progress: Progress,
) -> Result<BackendResult, VerifyError> {
    let start = std::time::Instant::now();
    let mut backend =
        open_backend(cand.gguf, kind, device).map_err(|source| VerifyError::Backend {
            backend: kind.name().into(),
            source: Box::new(source),
        })?;
    let name = backend.name().to_string();
    let mut cmp = Comparison::new(cand.reference, cand.tokens, cand.bands.to_vec());
    // the consistency reference rounds activations as this backend does (llama.cpp), else it
    // is the f32 one
    let round = {
        let mapped = open_set(cand.gguf).map_err(|e| gguf_err(cand.gguf, e))?;
        activation_rounding(&mapped.file, kind)
    };
    let rounded = if round.is_empty() {
        None
    } else {
        Some(own_logits(
            cand.gguf,
            Some(cand.want),
            &round,
            cand.tokens,
            progress,
        )?)
    };
    let own_ref = rounded.as_ref().unwrap_or(cand.own_f32);
    // what the rounding costs, band by band (no forward: two kept references compared)
    // (nothing to compare when the runtime rounds nothing: the two references are one)
    let rounding = match &rounded {
        Some(r) => {
            let mut cmp = Comparison::new(cand.own_f32, cand.tokens, cand.bands.to_vec());
            for p in 0..r.rows() {
                cmp.push(p, r.row(p))?;
            }
            cmp.finish()?
        }
        None => cand
            .bands
            .iter()
            .map(|&b| BandMetrics::identical(b))
            .collect(),
    };
    let mut own = Comparison::new(own_ref, cand.tokens, cand.bands.to_vec());
    // the runtime against our forward of what its keys say, rounded alike: its arithmetic noise
    // band by band (the same comparison as `own` when the keys say the reference recipe)
    let reading_ref = if reads_as(cand.gguf, cand.want)? {
        None
    } else {
        Some(own_logits(cand.gguf, None, &round, cand.tokens, progress)?)
    };
    let mut reading = reading_ref
        .as_ref()
        .map(|r| Comparison::new(r, cand.tokens, cand.bands.to_vec()));
    // what the runtime's arithmetic costs against f32 (the plain rule's allowance)
    // against f32 when the consistency reference is rounded; else the consistency band within c
    let mut arith = rounded
        .as_ref()
        .map(|_| Comparison::new(cand.own_f32, cand.tokens, cand.bands[..1].to_vec()));
    let c0 = cand.bands[0].end;
    let total = cand.tokens.len();
    run_backend(backend.as_mut(), cand.tokens, &mut |pos, row| {
        cmp.push(pos, row).map_err(RuntimeError::consumer)?;
        own.push(pos, row).map_err(RuntimeError::consumer)?;
        if let Some(r) = reading.as_mut() {
            r.push(pos, row).map_err(RuntimeError::consumer)?;
        }
        if let Some(a) = arith.as_mut().filter(|_| pos < c0) {
            a.push(pos, row).map_err(RuntimeError::consumer)?;
        }
        if pos % 64 == 0 || pos + 1 == total {
            progress(&name, pos + 1, total);
        }
        Ok(())
    })?;
    drop(backend);
    let kl = std::mem::take(&mut cmp.kl_by_position);
    let metrics = cmp.finish()?;
    let consistency = own.finish()?;
    let reading = match reading {
        Some(r) => r.finish()?,
        None => consistency.clone(),
    };
    let arithmetic = match arith {
        Some(a) => a.finish()?.remove(0),
        None => consistency[0].clone(),
    };
    let kld_position0 = kl.first().copied().unwrap_or(0.0);
    let gross = gross_kld(&file.lines);
    let first_bad = kl.iter().position(|&k| exceeds(k, gross));
    Ok(judge(
        Measured {
            backend: name,
            metrics,
            consistency,
            reading,
            rounding,
            arithmetic,
            kld_position0,
            first_bad_position: first_bad,
            seconds: start.elapsed().as_secs_f64(),
        },
        &file.lines,
        &opts.rule,
        cand.original_context,
        &file.issues,
        file.file_type,
    ))
}

fn reference_logits(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    device: &Device,
    tokens: &[u32],
    stage: &str,
    progress: Progress,
) -> Result<Reference, VerifyError> {
    let model = load_llama(ckpt, cfg, DType::F32, device)?;
    model_logits(model, tokens, stage, progress)
}

/// Every row of `model`'s logits over `tokens`, kept.
fn model_logits(
    model: Llama,
    tokens: &[u32],
    stage: &str,
    progress: Progress,
) -> Result<Reference, VerifyError> {
    let cfg = model.config().clone();
    let mut backend = CandleBackend::new(model, stage);
    let mut reference = Reference::with_capacity(tokens.len(), cfg.vocab_size)?;
    let total = tokens.len();
    run_backend(&mut backend, tokens, &mut |pos, row| {
        reference.push(row);
        if pos % 64 == 0 || pos + 1 == total {
            progress(stage, pos + 1, total);
        }
        Ok(())
    })?;
    Ok(reference)
}

/// A position's KL divergence is "gross" above 10x the KLD line (1e-3 for types judged on NMSE),
/// and at least 0.01 nats.
fn gross_kld(lines: &PassLines) -> f64 {
    (10.0 * lines.max_kld.unwrap_or(1e-3)).max(0.01)
}

impl VerifyReport {
    /// The same measurements judged under other lines (e.g. a q8_0 file under the f16 lines):
    /// checks, verdicts and diagnosis recomputed, metrics kept. The first bad position keeps the
    /// original lines' threshold.
    pub fn judged_with(&self, lines: PassLines) -> VerifyReport {
        let mut r = self.clone();
        let c = r.original_context as usize;
        // file_type was written from a GgmlType's name; an unknown one (a report edited by hand)
        // is judged by the lines of the strictest class, f32
        let ty = crate::gguf::GgmlType::from_name(&r.file_type)
            .unwrap_or_else(|| crate::gguf::types::F32.ty());
        r.backends = self
            .backends
            .iter()
            .map(|b| {
                judge(
                    Measured {
                        backend: b.backend.clone(),
                        metrics: b.bands.iter().map(|x| x.metrics.clone()).collect(),
                        consistency: b.consistency.iter().map(|x| x.metrics.clone()).collect(),
                        reading: b.reading.clone(),
                        rounding: b.rounding.clone(),
                        arithmetic: b.arithmetic.clone(),
                        kld_position0: b.kld_position0,
                        first_bad_position: b.first_bad_position,
                        seconds: b.seconds,
                    },
                    &lines,
                    &r.long_context_rule,
                    c,
                    &r.metadata,
                    ty,
                )
            })
            .collect();
        r.lines = lines;
        r.pass = r.metadata.is_empty()
            && r.weights.pass
            && r.backends.iter().all(|b| b.fidelity_pass && b.runtime_pass);
        r
    }
}

/// Above the line, or NaN (a NaN row is never within a line).
fn exceeds(x: f64, line: f64) -> bool {
    x.is_nan() || x > line
}

/// What one backend's run measured, before judgement.
struct Measured {
    backend: String,
    /// Against the checkpoint.
    metrics: Vec<BandMetrics>,
    /// Against our forward of the file's own weights (activations rounded as the runtime does).
    consistency: Vec<BandMetrics>,
    /// Against our forward of what the file's keys say, rounded alike: the runtime's noise.
    reading: Vec<BandMetrics>,
    /// Our rounded forward against our f32 forward: what the rounding costs.
    rounding: Vec<BandMetrics>,
    /// Within c, against our f32 forward of the file's own weights: the runtime's arithmetic.
    arithmetic: BandMetrics,
    kld_position0: f64,
    first_bad_position: Option<usize>,
    seconds: f64,
}

fn band_result(m: BandMetrics, within_original: bool, checks: Vec<Check>) -> BandResult {
    let pass = checks.iter().all(|k| k.pass);
    BandResult {
        metrics: m,
        within_original,
        checks,
        pass,
    }
}

/// Verdicts and diagnosis of one backend's band metrics. Fidelity: the bands within c against
/// the type's lines (bands beyond c are reported, not judged: what quantization costs there is
/// not a fault). Consistency: within c against the runtime's arithmetic lines; beyond c against
/// the consistency band within c (the long-context rule).
fn judge(
    m: Measured,
    lines: &PassLines,
    rule: &LongContextRule,
    c: usize,
    issues: &[Issue],
    file_type: GgmlType,
) -> BackendResult {
    let inside = |b: &BandMetrics| b.band.end <= c || b.band.start == 0;
    let consistency: Vec<BandResult> = m
        .consistency
        .into_iter()
        .zip(m.reading.iter().zip(&m.rounding))
        .map(|(b, (r, x))| {
            let i = inside(&b);
            let checks = consistency(&b, r, x, rule);
            band_result(b, i, checks)
        })
        .collect();
    // the runtime's arithmetic (against our f32 forward of the same weights), as measured,
    // counts only when the runtime computes the file right within c
    let arith = if consistency[0].pass {
        m.arithmetic.kld_mean
    } else {
        0.0
    };
    let lines = lines.for_backend(arith);
    let bands: Vec<BandResult> = m
        .metrics
        .into_iter()
        .map(|b| {
            let i = inside(&b);
            let checks = if i { fidelity(&b, &lines) } else { Vec::new() };
            band_result(b, i, checks)
        })
        .collect();
    let fidelity_pass = bands.iter().all(|b| b.pass);
    let long_context_pass = consistency
        .iter()
        .filter(|b| !b.within_original)
        .all(|b| b.pass);
    let runtime_pass = consistency.iter().all(|b| b.pass);
    let first_failing_band = bands
        .iter()
        .zip(&consistency)
        .position(|(a, b)| !a.pass || !b.pass);
    let gross = gross_kld(&lines);
    let diagnosis = diagnose(
        &bands,
        &consistency,
        m.kld_position0 > gross,
        gross,
        &lines,
        c,
        issues,
        file_type,
    );
    BackendResult {
        backend: m.backend,
        bands,
        consistency,
        rounding: m.rounding,
        arithmetic: m.arithmetic,
        reading: m.reading,
        lines,
        fidelity_pass,
        runtime_pass,
        long_context_pass,
        kld_position0: m.kld_position0,
        first_bad_position: m.first_bad_position,
        first_failing_band,
        diagnosis,
        seconds: m.seconds,
    }
}

/// The pattern of the failure. The consistency comparison has no weight noise: when it fails,
/// the runtime computes another rotation or scaling of the file's own weights (within c from
/// position 1: the base or rotary dimension; only beyond c: the scaling keys). When it passes
/// and fidelity fails, the weights differ from the checkpoint's: from the first position
/// (a tensor, the embeddings, the tokenizer), from position 1 (q/k rows not permuted), or by a
/// small uniform error (the quantization costs more than the lines allow).
#[allow(clippy::too_many_arguments)]
fn diagnose(
    bands: &[BandResult],
    consistency: &[BandResult],
    position0_bad: bool,
    gross: f64,
    lines: &PassLines,
    c: usize,
    issues: &[Issue],
    file_type: GgmlType,
) -> Vec<String> {
    let related = |words: &[&str]| -> Vec<String> {
        issues
            .iter()
            .filter(|i| words.iter().any(|w| i.key.contains(w)))
            .map(|i| format!("  consistent with: {}", i.message))
            .collect()
    };
    let mut out = Vec::new();
    let within = &bands[0].metrics;
    let gross_within = exceeds(within.kld_mean, gross)
        || lines
            .max_nmse
            .is_some_and(|l| exceeds(within.nmse, 10.0 * l));
    let fidelity_pass = bands.iter().all(|b| b.pass);
    let failed = |b: &BandResult, suffix: &str| {
        b.checks
            .iter()
            .any(|k| !k.pass && (k.metric.ends_with(suffix) || k.metric == "non_finite_rows"))
    };
    let misread = consistency.iter().find(|b| {
        b.checks
            .iter()
            .any(|k| !k.pass && k.metric.starts_with("reading_"))
    });
    let own_within_pass = !failed(&consistency[0], "_vs_reading");
    let own_beyond_pass = !consistency.iter().skip(1).any(|b| failed(b, "_vs_reading"));
    if let Some(b) = misread {
        out.push(format!(
            "the runtime does not compute what the file's keys say (our reading of them, \
             rounded as it rounds) from {}: a key it reads otherwise, a tensor it reads \
             otherwise, or a fault of the runtime",
            b.metrics.band.label()
        ));
    }
    if !own_within_pass && !position0_bad {
        out.push(format!(
            "right at position 0, wrong from position 1 within the original window ({c}), \
             with the file's own weights: the rotary embedding (rope.freq_base or \
             rope.dimension_count)"
        ));
        out.extend(related(&["freq_base", "dimension_count", "scaling"]));
    } else if !own_within_pass {
        out.push(
            "the file's own weights computed otherwise than the reference recipe says, from \
             the first position"
                .to_string(),
        );
    } else if !own_beyond_pass {
        let band = consistency
            .iter()
            .find(|b| failed(b, "_vs_reading"))
            .map(|b| b.metrics.band.label())
            .unwrap_or_default();
        out.push(format!(
            "right within the original window ({c}), wrong beyond it (first at {band}), with \
             the file's own weights: rope base or scaling (rope.scaling.*, the step law's \
             architecture and attention.temperature_scale, context_length)"
        ));
        out.extend(related(&[
            "freq_base",
            "scaling",
            "temperature",
            "architecture",
            "context_length",
        ]));
    }
    if !fidelity_pass {
        if position0_bad {
            out.push(
                "wrong from the first position: weights (a tensor swapped, missing or \
                 mis-typed), embeddings, or the tokenizer"
                    .to_string(),
            );
            out.extend(related(&[
                "tokenizer",
                "embedding",
                "block_count",
                "head_count",
            ]));
        } else if gross_within && own_within_pass {
            out.push(format!(
                "right at position 0, wrong from position 1 within the original window ({c}), \
                 though the runtime computes the file's own weights right: q/k rows not \
                 permuted to llama.cpp's interleaved pairs (or not the checkpoint's q/k)"
            ));
        } else if own_within_pass {
            out.push(format!(
                "small uniform error above the {} lines ({} tier): the {file_type} \
                 quantization costs more than the lines allow",
                lines.class.name(),
                lines.tier
            ));
        }
    }
    if out.is_empty()
        && bands
            .iter()
            .any(|b| b.metrics.kld_mean > 0.0 || b.metrics.nmse > 0.0)
    {
        out.push(format!(
            "pass: small uniform error, consistent with {file_type} weights"
        ));
    }
    if !issues.is_empty() && out.iter().all(|l| !l.starts_with("  consistent")) {
        out.push(format!(
            "metadata: {} mismatch(es) (see above) even where the logits agree",
            issues.len()
        ));
    }
    out
}
