//! The training loop: batches from a seeded order, gradient accumulation over micro-batches,
//! clipping, AdamW, the schedule; checkpoints with optimizer state and exact resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::data::epoch_order;
use super::examples::Example;
use super::lora::{LoraConfig, ParamSet};
use super::optim::{clip_factor, grad_norm, AdamW, AdamWConfig};
use super::recompute::{loss_and_grads, BackwardPlan, Batch, GradAcc, LayerModel};
use super::schedule::{Schedule, ScheduleKind};
use super::TrainError;

/// Builds the model of one step from its weights (the same model code as inference).
pub type ModelFactory<'a> =
    dyn Fn(VarBuilder<'static>) -> Result<Box<dyn LayerModel>, TrainError> + 'a;

/// Hyper-parameters of a run; saved in checkpoints so a resume continues the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    pub epochs: u64,
    /// Total optimizer steps (overrides `epochs` when set).
    pub steps: Option<u64>,
    pub lr: f64,
    pub warmup: u64,
    pub schedule: ScheduleKind,
    pub adam: AdamWConfig,
    /// Global-norm clip (0: off).
    pub grad_clip: f64,
    pub lora: Option<LoraConfig>,
    pub seed: u64,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
    /// Positions per head/loss chunk.
    pub head_chunk: usize,
    /// Layer-wise recomputation (gradient checkpointing).
    pub recompute: bool,
    /// With recomputation, attention rebuilt one query block at a time in the backward (memory
    /// linear in length); off: each layer recomputed as one graph (quadratic), for comparison.
    #[serde(default = "default_true")]
    pub blocked_attention: bool,
}

fn default_true() -> bool {
    true
}

impl Default for TrainConfig {
    /// The paper's small-data run (method.md): batch 32, 2 epochs, lr 2e-5, no warm-up, cosine.
    fn default() -> Self {
        TrainConfig {
            batch_size: 32,
            micro_batch: 1,
            epochs: 2,
            steps: None,
            lr: 2e-5,
            warmup: 0,
            schedule: ScheduleKind::Cosine,
            adam: AdamWConfig::default(),
            grad_clip: 1.0,
            lora: None,
            seed: 42,
            save_every: 0,
            head_chunk: 1024,
            recompute: true,
            blocked_attention: true,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Config(m.to_string()));
        if self.batch_size == 0 || self.micro_batch == 0 {
            return bad("--batch-size and --micro-batch must be at least 1");
        }
        if self.micro_batch > self.batch_size {
            return bad("--micro-batch must not exceed --batch-size");
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("--lr must be finite and >= 0");
        }
        let a = self.adam;
        if !((0.0..1.0).contains(&a.beta1) && (0.0..1.0).contains(&a.beta2)) {
            return bad("--adam-betas must lie in [0, 1)");
        }
        if !(a.weight_decay.is_finite() && a.weight_decay >= 0.0 && a.eps > 0.0) {
            return bad("--weight-decay must be >= 0 and eps > 0");
        }
        if self.steps == Some(0) || (self.steps.is_none() && self.epochs == 0) {
            return bad("nothing to train: --steps/--epochs is 0");
        }
        Ok(())
    }

    /// Optimizer steps per epoch: `floor(n / batch)` (the last partial batch is dropped, as the
    /// paper's 100 samples / batch 32 = 3 steps an epoch), at least 1.
    pub fn steps_per_epoch(&self, n: usize) -> u64 {
        ((n / self.batch_size) as u64).max(1)
    }

    pub fn total_steps(&self, n: usize) -> u64 {
        self.steps
            .unwrap_or_else(|| self.epochs * self.steps_per_epoch(n))
    }
}

/// What one optimizer step did (one line of `training_log.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// 1-based number of the step just done.
    pub step: u64,
    pub epoch: u64,
    /// Mean loss per assistant token of the batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    pub target_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Resident memory of the process (bytes) and its peak, from /proc (Linux).
    pub rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    /// Device memory in use on a CUDA device (total minus free, all processes).
    pub gpu_used_bytes: Option<u64>,
}

/// The run's state: parameters, optimizer, data and position.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub set: ParamSet,
    pub opt: AdamW,
    pub examples: Vec<Example>,
    pub dtype: DType,
    pub device: Device,
    pub total_steps: u64,
}

impl Trainer {
    /// A fresh run over `weights` (the checkpoint's tensors, on `device`).
    pub fn new(
        cfg: TrainConfig,
        weights: Vec<(String, Tensor)>,
        examples: Vec<Example>,
        dtype: DType,
        device: Device,
    ) -> Result<Trainer, TrainError> {
        cfg.validate()?;
        if examples.is_empty() {
            return Err(TrainError::Config("no training examples".into()));
        }
        let set = match cfg.lora {
            Some(l) => ParamSet::lora(weights, dtype, l, cfg.seed)?,
            None => ParamSet::full(weights, dtype)?,
        };
        let opt = AdamW::new(&set.params, cfg.adam)?;
        let total_steps = cfg.total_steps(examples.len());
        Ok(Trainer {
            cfg,
            set,
            opt,
            examples,
            dtype,
            device,
            total_steps,
        })
    }

    /// Steps done so far.
    pub fn step(&self) -> u64 {
        self.opt.step
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            kind: self.cfg.schedule,
            peak: self.cfg.lr,
            warmup: self.cfg.warmup,
            total: self.total_steps,
        }
    }

    /// The example indices of (0-based) step `k`: its epoch's seeded order, the k-th slice.
    pub fn batch_indices(&self, k: u64) -> (u64, Vec<usize>) {
        let n = self.examples.len();
        let spe = self.cfg.steps_per_epoch(n);
        let epoch = k / spe;
        let within = (k % spe) as usize;
        let order = epoch_order(n, self.cfg.seed, epoch);
        let bs = self.cfg.batch_size.min(n);
        (epoch, order[within * bs..(within + 1) * bs].to_vec())
    }

    /// Build the model for the current weights.
    fn model(&self, factory: &ModelFactory) -> Result<Box<dyn LayerModel>, TrainError> {
        let vb = VarBuilder::from_tensors(self.set.weight_map()?, self.dtype, &self.device);
        factory(vb)
    }

    /// Mean loss per target token of step `k`'s batch and its f32 gradients, without updating.
    pub fn loss_and_grads(
        &self,
        factory: &ModelFactory,
        k: u64,
    ) -> Result<(f64, Vec<Tensor>, usize, usize), TrainError> {
        let (_, idx) = self.batch_indices(k);
        let model = self.model(factory)?;
        let examples: Vec<&Example> = idx.iter().map(|&i| &self.examples[i]).collect();
        let targets: usize = examples.iter().map(|e| e.targets()).sum();
        // Gradient of the batch mean = sum over micro-batches of (sum of token losses) / targets.
        let scale = 1.0 / targets.max(1) as f64;
        let plan = BackwardPlan {
            recompute: self.cfg.recompute,
            head_chunk: self.cfg.head_chunk,
            blocked_attention: self.cfg.blocked_attention,
        };
        let mut acc = GradAcc::new(self.set.params.len());
        let mut loss = 0.0;
        let mut tokens = 0;
        for mb in examples.chunks(self.cfg.micro_batch) {
            let batch = Batch::from_examples(mb, &self.device)?;
            tokens += batch.tokens;
            loss += loss_and_grads(
                model.as_ref(),
                &batch,
                scale,
                &self.set.params,
                &mut acc,
                plan,
            )?;
        }
        Ok((loss, acc.finish(&self.set.params)?, tokens, targets))
    }

    /// Run one optimizer step. A non-finite loss or gradient norm is an error that leaves the
    /// parameters untouched; so are non-finite weights or moments after the update (the
    /// parameters are then spoiled in memory: the caller must not save them, and stops).
    pub fn train_step(&mut self, factory: &ModelFactory) -> Result<StepStats, TrainError> {
        let k = self.step();
        let t0 = Instant::now();
        let (epoch, _) = self.batch_indices(k);
        let non_finite = |what: String| TrainError::NonFinite {
            step: k + 1,
            what,
            kept: None,
        };
        let (loss, grads, tokens, targets) = self.loss_and_grads(factory, k)?;
        if !loss.is_finite() {
            return Err(non_finite(format!("the loss is {loss}")));
        }
        let norm = grad_norm(&grads)?;
        if !norm.is_finite() {
            return Err(non_finite(format!("the gradient norm is {norm}")));
        }
        let lr = self.schedule().lr(k);
        // clipping (clip_grad_norm_'s factor) is applied inside the update's pass
        let clip = clip_factor(norm, self.cfg.grad_clip);
        self.opt
            .update_scaled(&mut self.set.params, &grads, lr, clip)?;
        // test-only: spoil one weight as a bad update would (tests of the guard below)
        if crate::fsutil::failpoint_set(&format!("poison-weights-step-{}", k + 1)) {
            if let Some(p) = self.set.params.first_mut() {
                let spoiled = p.value_f32()?.affine(f64::NAN, 0.0)?;
                p.set_f32(&spoiled)?;
            }
            self.opt.forget_finite_checks();
        }
        // A finite loss and gradient can still overflow the update (a huge lr, a tiny v); a
        // checkpoint of such weights would poison every resume.
        if let Some(what) = self.opt.non_finite(&self.set.params)? {
            return Err(non_finite(format!("the update made {what} non-finite")));
        }
        let seconds = t0.elapsed().as_secs_f64();
        let (rss, peak) = memory();
        Ok(StepStats {
            step: k + 1,
            epoch,
            loss,
            lr,
            grad_norm: norm,
            tokens,
            target_tokens: targets,
            seconds,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            rss_bytes: rss,
            peak_rss_bytes: peak,
            gpu_used_bytes: gpu_memory(&self.device),
        })
    }

    /// Save parameters (f32), optimizer moments and the run state as the checkpoint `dir`, through
    /// a staging directory swapped in only once complete ([`super::store::save`]).
    pub fn save_checkpoint(&self, dir: &Path, extra: &serde_json::Value) -> Result<(), TrainError> {
        super::store::save(dir, self.step(), |tmp| {
            let mut params = HashMap::new();
            for p in &self.set.params {
                params.insert(p.name.clone(), p.value_f32()?.to_device(&Device::Cpu)?);
            }
            save_tensors(&params, &tmp.join(PARAMS_FILE))?;
            crate::fsutil::failpoint("checkpoint-staging-partial");
            let moments: HashMap<String, Tensor> = self
                .opt
                .state_tensors(&self.set.params)
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
                .collect::<Result<_, candle_core::Error>>()?;
            save_tensors(&moments, &tmp.join(OPTIMIZER_FILE))?;
            let state = CheckpointState {
                format: 1,
                step: self.step(),
                total_steps: self.total_steps,
                config: self.cfg.clone(),
                examples: self.examples.len(),
                data_fingerprint: fingerprint(&self.examples),
                extra: extra.clone(),
            };
            let text = serde_json::to_string_pretty(&state)
                .map_err(|e| TrainError::Internal(e.to_string()))?;
            let sp = tmp.join(STATE_FILE);
            std::fs::write(&sp, text).map_err(|e| TrainError::io(&sp, e))
        })
    }

    /// Restore a checkpoint saved by [`Trainer::save_checkpoint`] into a trainer built with the
    /// same configuration and data.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<CheckpointState, TrainError> {
        let origin = dir.display().to_string();
        let bad = |reason: String| TrainError::Resume {
            path: origin.clone(),
            reason,
        };
        let manifest = super::store::complete(dir).ok_or_else(|| {
            bad(format!(
                "not a complete checkpoint (no {} matching its files)",
                super::store::MANIFEST_FILE
            ))
        })?;
        let state = read_state(dir)?;
        if state.step != manifest.step {
            return Err(bad(format!(
                "{STATE_FILE} is of step {}, the manifest of step {}",
                state.step, manifest.step
            )));
        }
        if state.examples != self.examples.len()
            || state.data_fingerprint != fingerprint(&self.examples)
        {
            return Err(bad(format!(
                "the data differ from the checkpoint's ({} examples then, {} now)",
                state.examples,
                self.examples.len()
            )));
        }
        let params = load_tensors(&dir.join(PARAMS_FILE), &self.device)?;
        for p in self.set.params.iter_mut() {
            let t = params
                .get(&p.name)
                .ok_or_else(|| bad(format!("no parameter {}", p.name)))?;
            if t.dims() != p.var.dims() {
                return Err(bad(format!(
                    "parameter {} has shape {:?}, the model {:?}",
                    p.name,
                    t.dims(),
                    p.var.dims()
                )));
            }
            p.set_f32(t)?;
        }
        let moments = load_tensors(&dir.join(OPTIMIZER_FILE), &self.device)?;
        self.opt
            .load_state(&self.set.params, state.step, &moments, &origin)?;
        self.total_steps = state.total_steps;
        Ok(state)
    }
}

pub const PARAMS_FILE: &str = "params.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

/// `trainer_state.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    pub step: u64,
    pub total_steps: u64,
    pub config: TrainConfig,
    pub examples: usize,
    /// FNV-1a of the examples' tokens and masks: a resume must see the same data.
    pub data_fingerprint: String,
    /// What the caller needs to rebuild the run (model path, recipe, data flags).
    pub extra: serde_json::Value,
}

/// Read a checkpoint's state file.
pub fn read_state(dir: &Path) -> Result<CheckpointState, TrainError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Resume {
        path: path.display().to_string(),
        reason: format!("malformed state: {e}"),
    })
}

/// FNV-1a 64 over every example's tokens and mask bits.
pub fn fingerprint(examples: &[Example]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for e in examples {
        for (t, m) in e.tokens.iter().zip(&e.mask) {
            t.to_le_bytes().iter().for_each(|b| eat(*b));
            eat(*m as u8);
        }
        eat(0xff);
    }
    format!("{h:016x}")
}

/// Write tensors as one safetensors file (into a checkpoint's staging directory, which makes the
/// checkpoint atomic as a whole).
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), TrainError> {
    candle_core::safetensors::save(tensors, path).map_err(|e| TrainError::Safetensors {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Read one safetensors file onto `device`.
pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, TrainError> {
    candle_core::safetensors::load(path, device).map_err(|e| TrainError::Safetensors {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Resident and peak resident memory from `/proc/self/status` (None elsewhere).
pub fn memory() -> (Option<u64>, Option<u64>) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Memory in use on a CUDA device (None on CPU and in builds without CUDA).
#[cfg(feature = "cuda")]
pub fn gpu_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cuda(d) => {
            let stream = d.cuda_stream();
            let (free, total) = stream.context().mem_get_info().ok()?;
            Some(total.saturating_sub(free) as u64)
        }
        _ => None,
    }
}

/// Memory in use on a CUDA device (None on CPU and in builds without CUDA).
#[cfg(not(feature = "cuda"))]
pub fn gpu_memory(_device: &Device) -> Option<u64> {
    None
}

/// The checkpoint folder inside an output directory.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}
