//! A whole fine-tuning run: model directory and data file in, Hugging Face checkpoint out, with
//! `training_log.jsonl`, periodic checkpoints and exact resume.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::data::{BadRecordLimit, ParseReport};
use super::examples::{load_examples, Example, PrepConfig, PrepReport};
use super::hf::{ckpt, export, llama_factory, load_weights};
use super::template::ChatTemplate;
use super::trainer::{checkpoint_dir, read_state, StepStats, TrainConfig, Trainer};
use super::{store, KeptCheckpoint, TrainError};
use crate::checkpoint::{HfConfig, TokenizerFiles};
use crate::rope::Recipe;

pub const LOG_FILE: &str = "training_log.jsonl";

/// Everything that defines a run; stored in its checkpoints so `--resume` rebuilds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneSpec {
    pub model_dir: PathBuf,
    pub data: PathBuf,
    /// The recipe as its config block (`Recipe::to_json_block`).
    pub recipe: Value,
    /// A built-in template name or a Jinja file; None: the model's `chat_template`.
    pub template: Option<String>,
    pub seq_len: usize,
    pub min_tokens: usize,
    pub samples: Option<usize>,
    /// More skipped records than this stops the run (absent in older checkpoints: the default).
    #[serde(default)]
    pub max_bad_records: BadRecordLimit,
    pub train: TrainConfig,
    /// Compute dtype: "f32", "bf16" or "f64".
    pub dtype: String,
}

impl TuneSpec {
    pub fn recipe(&self) -> Result<Recipe, TrainError> {
        Recipe::from_json_block("tune spec", &self.recipe)
            .map_err(|e| TrainError::Config(e.to_string()))
    }

    pub fn dtype(&self) -> Result<DType, TrainError> {
        parse_dtype(&self.dtype)
    }
}

pub fn parse_dtype(s: &str) -> Result<DType, TrainError> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f64" => Ok(DType::F64),
        _ => Err(TrainError::Config(format!(
            "unknown dtype {s:?} (expected f32 or bf16)"
        ))),
    }
}

/// What happened, for progress display.
#[derive(Debug)]
pub enum Event<'a> {
    Prepared {
        examples: usize,
        total_steps: u64,
        start_step: u64,
    },
    Step(&'a StepStats),
    Saved {
        step: u64,
        dir: &'a Path,
    },
}

/// The run's summary (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct TuneSummary {
    pub out: PathBuf,
    /// Whether all steps ran and the model was exported.
    pub finished: bool,
    pub steps_done: u64,
    pub total_steps: u64,
    pub resumed_from: Option<u64>,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub recipe: String,
    pub trainable_parameters: usize,
    pub parameters: usize,
    pub records: usize,
    pub skipped_records: usize,
    pub skip_reasons: Vec<String>,
    /// Skipped records by kind of fault.
    pub skip_counts: BTreeMap<String, usize>,
    pub data: PrepReport,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub files: Vec<PathBuf>,
}

/// Rebuild a run's spec from its output directory's newest complete checkpoint (which may be
/// under `checkpoint.tmp` or `checkpoint.old` after a kill; nothing is moved here).
pub fn spec_from_checkpoint(out: &Path) -> Result<TuneSpec, TrainError> {
    let (dir, _) = store::find(&checkpoint_dir(out))?;
    let state = read_state(&dir)?;
    serde_json::from_value(state.extra.clone()).map_err(|e| TrainError::Resume {
        path: dir.display().to_string(),
        reason: format!("malformed run description: {e}"),
    })
}

fn template_for(spec: &TuneSpec, files: &TokenizerFiles) -> Result<ChatTemplate, TrainError> {
    match &spec.template {
        None => ChatTemplate::from_tokenizer_config(&spec.model_dir.join("tokenizer_config.json")),
        Some(name) if !Path::new(name).exists() => ChatTemplate::builtin(name),
        Some(path) => {
            let src =
                std::fs::read_to_string(path).map_err(|e| TrainError::io(Path::new(path), e))?;
            ChatTemplate::new(
                &src,
                path,
                files.config.bos_token.as_deref().unwrap_or_default(),
                files.config.eos_token.as_deref().unwrap_or_default(),
            )
        }
    }
}

/// Run (or, with `resume`, continue) a fine-tune into `out`. `stop_after` ends the run after that
/// many steps in all, saving a checkpoint, without exporting (the schedule still spans the whole
/// run).
pub fn tune(
    spec: &TuneSpec,
    out: &Path,
    device: &Device,
    resume: bool,
    stop_after: Option<u64>,
    on: &mut dyn FnMut(Event),
) -> Result<TuneSummary, TrainError> {
    let t0 = Instant::now();
    let recipe = spec.recipe()?;
    let dtype = spec.dtype()?;
    let hf = HfConfig::load(&spec.model_dir).map_err(ckpt)?;
    let mut cfg = hf.model.clone();
    cfg.recipe = recipe.clone();
    cfg.max_position_embeddings = recipe.context;
    let files = TokenizerFiles::load(&spec.model_dir).map_err(ckpt)?;
    let template = template_for(spec, &files)?;
    let prep = PrepConfig {
        seq_len: spec.seq_len,
        min_tokens: spec.min_tokens,
        samples: spec.samples,
        seed: spec.train.seed,
        max_bad_records: spec.max_bad_records,
    };
    let (examples, parse, report) = load_examples(&spec.data, &files.tokenizer, &template, &prep)?;
    check_token_ids(&examples, cfg.vocab_size)?;
    let weights = load_weights(&spec.model_dir, &cfg, device)?;
    let mut trainer = Trainer::new(spec.train.clone(), weights, examples, dtype, device.clone())?;
    let (trainable, parameters) = trainer.set.counts();
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let ck = checkpoint_dir(out);
    let log_path = out.join(LOG_FILE);
    let resumed_from = start_log(&mut trainer, &ck, &log_path, resume)?;
    let extra = serde_json::to_value(spec).map_err(|e| TrainError::Internal(e.to_string()))?;
    on(Event::Prepared {
        examples: trainer.examples.len(),
        total_steps: trainer.total_steps,
        start_step: trainer.step(),
    });
    let factory = llama_factory(cfg);
    let mut log = open_log(&log_path)?;
    let (mut first, mut last) = (None, None);
    let (mut tokens, mut train_s) = (0usize, 0f64);
    let end = stop_after
        .unwrap_or(trainer.total_steps)
        .min(trainer.total_steps);
    // the checkpoint on disk, named by a non-finite step's error
    let mut kept = resumed_from.map(|step| KeptCheckpoint {
        step,
        dir: ck.clone(),
    });
    while trainer.step() < end {
        let stats = trainer.train_step(&factory).map_err(|e| match e {
            TrainError::NonFinite { step, what, .. } => TrainError::NonFinite {
                step,
                what,
                kept: kept.clone(),
            },
            e => e,
        })?;
        first.get_or_insert(stats.loss);
        last = Some(stats.loss);
        tokens += stats.tokens;
        train_s += stats.seconds;
        let line =
            serde_json::to_string(&stats).map_err(|e| TrainError::Internal(e.to_string()))?;
        writeln!(log, "{line}")
            .and_then(|_| log.flush())
            .map_err(|e| TrainError::io(&log_path, e))?;
        on(Event::Step(&stats));
        let every = spec.train.save_every;
        if every > 0 && stats.step % every == 0 && stats.step < trainer.total_steps {
            trainer.save_checkpoint(&ck, &extra)?;
            kept = Some(KeptCheckpoint {
                step: stats.step,
                dir: ck.clone(),
            });
            on(Event::Saved {
                step: stats.step,
                dir: &ck,
            });
        }
    }
    let finished = trainer.step() >= trainer.total_steps;
    let mut files = Vec::new();
    if finished {
        let tensors = trainer.set.export(None)?;
        files = export(out, &spec.model_dir, &hf, &recipe, &tensors)?;
    } else if spec.train.save_every == 0 || trainer.step() % spec.train.save_every != 0 {
        trainer.save_checkpoint(&ck, &extra)?;
        on(Event::Saved {
            step: trainer.step(),
            dir: &ck,
        });
    }
    Ok(TuneSummary {
        out: out.to_path_buf(),
        finished,
        steps_done: trainer.step(),
        total_steps: trainer.total_steps,
        resumed_from,
        first_loss: first,
        last_loss: last,
        recipe: recipe.to_string(),
        trainable_parameters: trainable,
        parameters,
        records: parse.records,
        skipped_records: parse.skipped,
        skip_reasons: parse.reasons.clone(),
        skip_counts: parse.by_kind.clone(),
        data: report,
        seconds: t0.elapsed().as_secs_f64(),
        tokens_per_s: tokens as f64 / train_s.max(1e-9),
        files,
    })
}

/// Every token id must index the model's embedding.
fn check_token_ids(examples: &[Example], vocab_size: usize) -> Result<(), TrainError> {
    match examples
        .iter()
        .flat_map(|e| e.tokens.iter())
        .find(|&&t| t as usize >= vocab_size)
    {
        Some(bad) => Err(TrainError::Config(format!(
            "token id {bad} of the tokenizer is outside the model's vocab_size {vocab_size}"
        ))),
        None => Ok(()),
    }
}

/// A resume loads the newest complete checkpoint and keeps the log up to its step; a fresh run
/// removes old checkpoints and starts a new log. Returns the step resumed from.
fn start_log(
    trainer: &mut Trainer,
    ck: &Path,
    log_path: &Path,
    resume: bool,
) -> Result<Option<u64>, TrainError> {
    if resume {
        // a kill may have interrupted a swap: the newest complete checkpoint becomes `ck`
        store::settle(ck)?;
        let state = trainer.load_checkpoint(ck)?;
        truncate_log(log_path, state.step)?;
        return Ok(Some(state.step));
    }
    // a fresh run: checkpoints of an earlier run here would be resumed with the wrong log
    store::clear(ck)?;
    if log_path.exists() {
        std::fs::remove_file(log_path).map_err(|e| TrainError::io(log_path, e))?;
    }
    Ok(None)
}

fn open_log(log_path: &Path) -> Result<std::fs::File, TrainError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| TrainError::io(log_path, e))
}

/// Keep the log lines of steps up to `step` (a resume rewrites what follows).
fn truncate_log(path: &Path, step: u64) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    let mut f =
        crate::fsutil::AtomicFile::create(path, true).map_err(|e| TrainError::io(path, e))?;
    f.write_all(body.as_bytes())
        .and_then(|_| f.commit())
        .map_err(|e| TrainError::io(path, e))
}

/// The parse report as JSON (for messages).
pub fn parse_json(p: &ParseReport) -> Value {
    json!({"records": p.records, "skipped": p.skipped, "by_kind": p.by_kind, "reasons": p.reasons})
}
