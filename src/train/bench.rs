//! Step and forward benchmarks on model-shaped random weights: what a 4k/16k-token fine-tuning
//! step of a 7B model costs on a GPU (tokens/s, model FLOPs utilisation, peak device memory),
//! through exactly the trainer `abf-tune` runs. Used by `examples/step_bench.rs` and
//! `scripts/gpu-check.sh`; nothing is downloaded, the weights are random.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::data::SplitMix64;
use super::hf::llama_factory;
use super::{Example, LoraConfig, TrainConfig, TrainError, Trainer};
use crate::checkpoint::{ModelConfig, ModelType};
use crate::model::Llama;
use crate::rope::{BaseRope, Recipe, RopeMethod};
use crate::runtime::{CandleBackend, LogitsBackend};

/// The dimensions of a LLaMA-family model.
#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    pub name: String,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: u64,
}

impl Shape {
    /// LLaMA-2-7B (its config.json): 6.74e9 parameters.
    pub fn llama2_7b() -> Shape {
        Shape {
            name: "llama2-7b".into(),
            vocab: 32000,
            hidden: 4096,
            intermediate: 11008,
            layers: 32,
            heads: 32,
            kv_heads: 32,
            context: 4096,
        }
    }

    /// A model small enough for a CPU smoke run of the benchmark itself.
    pub fn tiny() -> Shape {
        Shape {
            name: "tiny".into(),
            vocab: 512,
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context: 128,
        }
    }

    /// A 5M-parameter model whose weights, moments and MLP weigh in the memory of a CPU step
    /// (the plan's second check).
    pub fn small() -> Shape {
        Shape {
            name: "small".into(),
            vocab: 4096,
            hidden: 256,
            intermediate: 688,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            context: 256,
        }
    }

    pub fn by_name(name: &str) -> Result<Shape, TrainError> {
        match name {
            "llama2-7b" => Ok(Shape::llama2_7b()),
            "tiny" => Ok(Shape::tiny()),
            "small" => Ok(Shape::small()),
            _ => Err(TrainError::Config(format!(
                "unknown shape {name:?} (llama2-7b, small, tiny)"
            ))),
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every weight: name and shape, in checkpoint order (untied head).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, m, kv) = (
            self.hidden,
            self.intermediate,
            self.kv_heads * self.head_dim(),
        );
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            for (n, s) in [
                ("input_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![h, h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.o_proj.weight", vec![h, h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("mlp.gate_proj.weight", vec![m, h]),
                ("mlp.up_proj.weight", vec![m, h]),
                ("mlp.down_proj.weight", vec![h, m]),
            ] {
                out.push((format!("{p}.{n}"), s));
            }
        }
        out.push(("model.norm.weight".into(), vec![h]));
        out.push(("lm_head.weight".into(), vec![self.vocab, h]));
        out
    }

    pub fn parameters(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }

    /// The model config with entropy-aware ABF to `target` tokens.
    pub fn model_config(&self, target: u64) -> ModelConfig {
        let mut recipe = Recipe::for_method(
            RopeMethod::Eabf,
            BaseRope {
                base: 10_000.0,
                context: self.context,
            },
        );
        recipe.context = target.max(self.context);
        ModelConfig {
            model_type: ModelType::Llama,
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            head_dim: self.head_dim(),
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            max_position_embeddings: recipe.context,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            recipe,
        }
    }

    /// Model FLOPs of a training step on `t` tokens (one sequence): `6 N t` for the matmuls
    /// (forward + backward, PaLM appendix B) plus causal attention `6 L d t^2` (QK^T and PV,
    /// half the square, times 3 for backward); recomputation is not counted, as in MFU.
    pub fn train_flops(&self, t: u64) -> f64 {
        let n = self.parameters() as f64 - (self.vocab * self.hidden) as f64; // embeddings are a gather
        6.0 * n * t as f64 + 6.0 * (self.layers * self.hidden) as f64 * (t as f64).powi(2)
    }

    /// Forward-only FLOPs of a logits pass over `t` tokens (a third of [`Shape::train_flops`]).
    pub fn forward_flops(&self, t: u64) -> f64 {
        self.train_flops(t) / 3.0
    }
}

/// Random weights (normal, std 0.02; norms 1) on `device` in `dtype`, seeded.
pub fn random_weights(
    shape: &Shape,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<Vec<(String, Tensor)>, TrainError> {
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    let mut out = Vec::new();
    for (name, dims) in shape.tensors() {
        let t = if dims.len() == 1 {
            Tensor::ones(dims, dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, dims, device)?.to_dtype(dtype)?
        };
        out.push((name, t));
    }
    Ok(out)
}

/// Samples a memory reading every few milliseconds on a thread and keeps the largest.
struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl PeakSampler {
    fn start(read: impl Fn() -> Option<u64> + Send + 'static) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(v) = read() {
                    p.fetch_max(v, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        PeakSampler {
            stop,
            peak,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        Some(self.peak.load(Ordering::Relaxed)).filter(|&v| v > 0)
    }
}

/// Memory in use: device memory on CUDA (all processes), resident memory on CPU.
fn memory_reader(device: &Device) -> impl Fn() -> Option<u64> + Send + 'static {
    let device = device.clone();
    move || {
        if device.is_cpu() {
            // the kernel's high-water mark: exact, where sampling the resident set misses peaks
            let (rss, hwm) = super::trainer::memory();
            hwm.or(rss)
        } else {
            super::trainer::gpu_memory(&device)
        }
    }
}

/// The dense matmul rate of `device` in `dtype`, FLOP/s: `reps` products of `n x n` matrices.
pub fn matmul_rate(
    device: &Device,
    dtype: DType,
    n: usize,
    reps: usize,
) -> Result<f64, TrainError> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    a.matmul(&b)?; // warm-up (kernel selection, cuBLAS handles)
    device.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?;
    }
    device.synchronize()?;
    Ok(2.0 * (n as f64).powi(3) * reps as f64 / t0.elapsed().as_secs_f64())
}

/// What to measure.
#[derive(Debug, Clone, Serialize)]
pub struct StepBenchSpec {
    pub shape: Shape,
    pub seq_len: usize,
    pub lora: Option<usize>,
    pub steps: usize,
    #[serde(serialize_with = "ser_dtype")]
    pub dtype: DType,
    pub recompute: bool,
    /// Attention rebuilt per query block in the backward (the trainer's default).
    pub blocked_attention: bool,
    pub seed: u64,
}

fn ser_dtype<S: serde::Serializer>(d: &DType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepBenchReport {
    pub spec: StepBenchSpec,
    pub device: String,
    pub parameters: u64,
    pub trainable_parameters: u64,
    pub setup_seconds: f64,
    /// Wall time of each optimizer step (the first includes warm-up).
    pub step_seconds: Vec<f64>,
    pub losses: Vec<f64>,
    pub grad_norms: Vec<f64>,
    /// From the fastest step after the first.
    pub tokens_per_s: f64,
    pub model_flops_per_step: f64,
    pub achieved_flops: f64,
    /// `achieved_flops / matmul_rate` when a rate is given.
    pub mfu: Option<f64>,
    pub peak_memory_bytes: Option<u64>,
    pub memory_kind: &'static str,
    /// `abf-tune --plan`'s prediction of the peak for this step (CPU baseline; on a GPU without
    /// the CUDA context).
    pub predicted_peak_bytes: u64,
}

/// Train `spec.steps` steps of one `seq_len`-token sequence (every position a target) through
/// the real trainer: layer-wise recomputation, AdamW, f32 master weights, bf16 compute.
pub fn step_bench(
    spec: &StepBenchSpec,
    device: &Device,
    matmul_flops: Option<f64>,
) -> Result<StepBenchReport, TrainError> {
    let t0 = Instant::now();
    let sampler = PeakSampler::start(memory_reader(device));
    let cfg = spec.shape.model_config(spec.seq_len as u64);
    let weights = random_weights(&spec.shape, spec.dtype, device, spec.seed)?;
    let mut rng = SplitMix64(spec.seed);
    let tokens: Vec<u32> = (0..spec.seq_len)
        .map(|_| rng.below(spec.shape.vocab as u64) as u32)
        .collect();
    let examples = vec![Example {
        mask: vec![true; tokens.len()],
        tokens,
    }];
    let train = TrainConfig {
        batch_size: 1,
        micro_batch: 1,
        steps: Some(spec.steps as u64),
        lr: 1e-5,
        lora: spec.lora.map(|rank| LoraConfig {
            rank,
            alpha: 2.0 * rank as f64,
        }),
        recompute: spec.recompute,
        blocked_attention: spec.blocked_attention,
        seed: spec.seed,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(train, weights, examples, spec.dtype, device.clone())?;
    let (trainable, parameters) = trainer.set.counts();
    let factory = llama_factory(cfg);
    let setup_seconds = t0.elapsed().as_secs_f64();
    let (mut secs, mut losses, mut norms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..spec.steps {
        let s = trainer.train_step(&factory)?;
        device.synchronize()?;
        secs.push(s.seconds);
        losses.push(s.loss);
        norms.push(s.grad_norm);
    }
    let peak = sampler.finish();
    let best = secs
        .iter()
        .skip(usize::from(secs.len() > 1))
        .copied()
        .fold(f64::INFINITY, f64::min);
    let flops = spec.shape.train_flops(spec.seq_len as u64);
    let achieved = flops / best;
    Ok(StepBenchReport {
        spec: spec.clone(),
        device: format!("{device:?}"),
        parameters: parameters as u64,
        trainable_parameters: trainable as u64,
        setup_seconds,
        step_seconds: secs,
        losses,
        grad_norms: norms,
        tokens_per_s: spec.seq_len as f64 / best,
        model_flops_per_step: flops,
        achieved_flops: achieved,
        mfu: matmul_flops.map(|r| achieved / r),
        peak_memory_bytes: peak,
        predicted_peak_bytes: super::plan::plan_memory(
            &super::plan::MemorySpec {
                dims: super::plan::Dims::from(&spec.shape.model_config(spec.seq_len as u64)),
                seq_len: spec.seq_len,
                micro_batch: 1,
                dtype: spec.dtype,
                lora: spec.lora,
                query_block: crate::train::hf::TRAIN_QUERY_BLOCK,
                head_chunk: TrainConfig::default().head_chunk,
                baseline: if device.is_cpu() {
                    super::plan::CPU_BASELINE
                } else {
                    0
                },
                bf16_moments: false,
                cpu: device.is_cpu(),
            },
            None,
        )
        .peak_bytes,
        memory_kind: if device.is_cpu() {
            "resident (process)"
        } else {
            "device (in use, all processes)"
        },
    })
}

/// A forward-only logits pass over `seq_len` tokens (inference path, blocked attention,
/// head in chunks).
#[derive(Debug, Clone, Serialize)]
pub struct ForwardBenchReport {
    pub shape: Shape,
    pub seq_len: usize,
    pub dtype: String,
    pub device: String,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub achieved_flops: f64,
    pub mfu: Option<f64>,
    pub peak_memory_bytes: Option<u64>,
}

pub fn forward_bench(
    shape: &Shape,
    seq_len: usize,
    dtype: DType,
    device: &Device,
    matmul_flops: Option<f64>,
) -> Result<ForwardBenchReport, TrainError> {
    let sampler = PeakSampler::start(memory_reader(device));
    let cfg = shape.model_config(seq_len as u64);
    let weights = random_weights(shape, dtype, device, 7)?;
    let vb = candle_nn::VarBuilder::from_tensors(weights.into_iter().collect(), dtype, device);
    let mut backend = CandleBackend::new(Llama::load(vb, &cfg)?, "candle");
    let tokens: Vec<u32> = (0..seq_len)
        .map(|i| (i * 7919 % shape.vocab) as u32)
        .collect();
    device.synchronize()?;
    let t0 = Instant::now();
    let mut checksum = 0f64;
    backend
        .for_each_logits(&tokens, &mut |_, row| {
            checksum += row[0] as f64;
            Ok(())
        })
        .map_err(|e| TrainError::Internal(format!("{e:#}")))?;
    device.synchronize()?;
    let seconds = t0.elapsed().as_secs_f64();
    if !checksum.is_finite() {
        return Err(TrainError::Internal("non-finite logits".into()));
    }
    let achieved = shape.forward_flops(seq_len as u64) / seconds;
    Ok(ForwardBenchReport {
        shape: shape.clone(),
        seq_len,
        dtype: dtype.as_str().to_string(),
        device: format!("{device:?}"),
        seconds,
        tokens_per_s: seq_len as f64 / seconds,
        achieved_flops: achieved,
        mfu: matmul_flops.map(|r| achieved / r),
        peak_memory_bytes: sampler.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 6.74e9 parameters for LLaMA-2-7B (its model card), and the FLOPs formula by hand.
    #[test]
    fn llama2_7b_arithmetic() {
        let s = Shape::llama2_7b();
        assert_eq!(s.parameters(), 6_738_415_616);
        let n = 6_738_415_616f64 - 32000.0 * 4096.0;
        let t = 16384f64;
        let want = 6.0 * n * t + 6.0 * 32.0 * 4096.0 * t * t;
        assert!((s.train_flops(16384) - want).abs() / want < 1e-12);
    }

    /// The benchmark runs the real trainer on CPU and the loss of random weights is about ln V.
    #[test]
    fn tiny_step_bench_runs() {
        let spec = StepBenchSpec {
            shape: Shape::tiny(),
            seq_len: 64,
            lora: None,
            steps: 2,
            dtype: DType::F32,
            recompute: true,
            blocked_attention: true,
            seed: 1,
        };
        let r = step_bench(&spec, &Device::Cpu, None).unwrap();
        assert_eq!(r.step_seconds.len(), 2);
        let ln_v = (512f64).ln();
        assert!(
            (r.losses[0] - ln_v).abs() < 0.1,
            "{} vs {ln_v}",
            r.losses[0]
        );
        assert!(r.tokens_per_s > 0.0);
        let f = forward_bench(&Shape::tiny(), 96, DType::F32, &Device::Cpu, Some(1e9)).unwrap();
        assert!(f.mfu.unwrap() > 0.0);
    }
}
