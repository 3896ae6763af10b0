//! `abf-tune`: fine-tune a model to a longer window with entropy-aware ABF (or any recipe).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::Parser;
use serde_json::json;

use super::args::{compute_dtype, schedule};
use super::{print_json, progress, run_main, DeviceArgs, Exit, JsonFlag, RecipeArgs};
use crate::checkpoint::HfConfig;
use crate::rope::RopeMethod;
use crate::train::data::BadRecordLimit;
use crate::train::lora::LoraConfig;
use crate::train::optim::AdamWConfig;
use crate::train::run::{spec_from_checkpoint, tune, Event, TuneSpec, TuneSummary};
use crate::train::schedule::ScheduleKind;
use crate::train::trainer::TrainConfig;
use crate::train::TrainError;

#[derive(Parser, Debug)]
#[command(
    name = "abf-tune",
    version,
    about = "Fine-tune a model to a longer window with entropy-aware ABF",
    long_about = "Fine-tune a Hugging Face LLaMA-family checkpoint on long conversations with a \
                  context-extension recipe (default: entropy-aware ABF, --method eabf). The output \
                  directory is a Hugging Face checkpoint with the recipe in config.json, plus \
                  training_log.jsonl and, with --save-every, a checkpoint/ folder to --resume from."
)]
pub struct Cli {
    /// Model directory (config.json, safetensors, tokenizer files).
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// Conversations: ShareGPT or OpenAI-style records, JSON or JSONL.
    #[arg(long, required_unless_present_any = ["resume", "plan"])]
    pub data: Option<PathBuf>,
    /// Output directory.
    #[arg(short, long, required_unless_present_any = ["resume", "plan"])]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Chat template: a built-in (llama-2, chatml) or a Jinja file (default: the model's
    /// tokenizer_config.json chat_template).
    #[arg(long)]
    pub template: Option<String>,
    /// Longest training sequence; longer conversations are split at turn boundaries (default:
    /// the recipe's target window).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Keep this many examples after a seeded shuffle.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Bad records (malformed, invalid or refused by the template) allowed before the data is
    /// refused: a count (10) or a percentage of the records read (5%). Up to it they are skipped
    /// and counted; beyond it the run stops with exit code 2 and the counts by kind.
    #[arg(long, value_name = "N|P%", default_value = "50%")]
    pub max_bad_records: BadRecordLimit,
    /// Drop conversations shorter than this many tokens (the paper: 10000).
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Sequences per forward/backward pass (gradients accumulate to --batch-size).
    #[arg(long, default_value_t = 1)]
    pub micro_batch: usize,
    /// Passes over the data.
    #[arg(long, default_value_t = 2, conflicts_with = "steps")]
    pub epochs: u64,
    /// Optimizer steps in all (instead of --epochs).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// Warm-up steps (linear from 0).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Decoupled weight decay (not applied to norms).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// AdamW betas.
    #[arg(long, default_value = "0.9,0.95", value_parser = parse_betas)]
    pub adam_betas: (f64, f64),
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Learning-rate schedule after warm-up.
    #[arg(long, default_value = "cosine", value_parser = schedule())]
    pub schedule: ScheduleKind,
    /// Dtype of AdamW's moments: f32 (PyTorch's), or bf16 to halve their memory (the update
    /// computes in f32 either way; docs/training.md measures the loss curve against f32).
    #[arg(long, default_value = "f32", value_parser = compute_dtype())]
    pub optimizer_states: DType,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Train rank-RANK LoRA adapters on q/k/v/o and gate/up/down plus norms and embeddings,
    /// merged at save.
    #[arg(long, value_name = "RANK")]
    pub lora: Option<usize>,
    /// LoRA scale numerator (update = alpha / rank * B A; default 2 x rank).
    #[arg(long, requires = "lora")]
    pub lora_alpha: Option<f64>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Compute dtype (master weights and optimizer state are f32 either way; default: f32 on
    /// CPU, bf16 on CUDA).
    #[arg(long, value_parser = compute_dtype())]
    pub dtype: Option<DType>,
    /// Seed of data order, sampling and LoRA initialization.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Save a checkpoint with optimizer state every N steps (0: never). A checkpoint is staged
    /// beside the previous one and swapped in only when complete, and never holds a non-finite
    /// step: a kill or a NaN leaves the last good one to --resume from.
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Continue the run whose output directory this is, exactly (other run flags are ignored).
    #[arg(long, value_name = "OUT_DIR")]
    pub resume: Option<PathBuf>,
    /// Stop after this many steps in all (saving a checkpoint to resume from).
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Positions per loss chunk (bounds the logits' memory).
    #[arg(long, default_value_t = 1024, hide = true)]
    pub head_chunk: usize,
    /// Keep every layer's activations instead of recomputing them (tests, small models).
    #[arg(long, hide = true)]
    pub no_recompute: bool,
    /// Recompute each layer as one graph (attention memory quadratic in length), for comparison.
    #[arg(long, hide = true)]
    pub no_blocked_attention: bool,
    /// Replace an existing, non-empty output directory.
    #[arg(long)]
    pub force: bool,
    /// Train nothing: print the predicted peak memory of one step of this run (weights,
    /// gradients, optimizer states, saved layer inputs, one layer's recomputation, the loss
    /// chunk) from the model's config.json alone, and whether it fits --memory-budget.
    #[arg(long)]
    pub plan: bool,
    /// With --plan: the memory to fit in (e.g. 141G, 80GB; powers of 1000); exit 1 if the
    /// prediction exceeds it.
    #[arg(long, value_name = "SIZE", value_parser = crate::train::plan::parse_bytes, requires = "plan")]
    pub memory_budget: Option<u64>,
    #[command(flatten)]
    pub print: JsonFlag,
}

fn parse_betas(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected two numbers like 0.9,0.95, got {s:?}"))?;
    let p = |x: &str| x.trim().parse::<f64>().map_err(|e| format!("{x:?}: {e}"));
    Ok((p(a)?, p(b)?))
}

fn spec_from_flags(cli: &Cli) -> anyhow::Result<(TuneSpec, PathBuf)> {
    let (Some(model), Some(data), Some(out)) = (&cli.model, &cli.data, &cli.out) else {
        bail!("--model, --data and -o are required (or --resume OUT_DIR)")
    };
    let hf = HfConfig::load(model)?;
    let current = &hf.model.recipe;
    let mut args = cli.recipe.clone();
    // The default method is eabf, unless the model already carries an extension recipe.
    if args.method.is_none() && current.method == RopeMethod::Default {
        args.method = Some(RopeMethod::Eabf);
    }
    let recipe = args
        .resolve_over(current)
        .with_context(|| format!("recipe for {}", model.display()))?;
    let on_cuda = cli.device.device.is_cuda();
    let dtype = cli
        .dtype
        .unwrap_or(if on_cuda { DType::BF16 } else { DType::F32 });
    let train = TrainConfig {
        batch_size: cli.batch_size,
        micro_batch: cli.micro_batch,
        epochs: cli.epochs,
        steps: cli.steps,
        lr: cli.lr,
        warmup: cli.warmup,
        schedule: cli.schedule,
        adam: AdamWConfig {
            beta1: cli.adam_betas.0,
            beta2: cli.adam_betas.1,
            eps: cli.adam_eps,
            weight_decay: cli.weight_decay,
            bf16_moments: cli.optimizer_states == DType::BF16,
        },
        grad_clip: cli.grad_clip,
        lora: cli.lora.map(|rank| LoraConfig {
            rank,
            alpha: cli.lora_alpha.unwrap_or(2.0 * rank as f64),
        }),
        seed: cli.seed,
        save_every: cli.save_every,
        head_chunk: cli.head_chunk,
        recompute: !cli.no_recompute,
        blocked_attention: !cli.no_blocked_attention,
    };
    train.validate()?;
    let seq_len = cli.seq_len.unwrap_or(recipe.context as usize);
    if seq_len < 2 {
        bail!("--seq-len must be at least 2")
    }
    let spec = TuneSpec {
        model_dir: model.clone(),
        data: data.clone(),
        recipe: recipe.to_json_block(),
        template: cli.template.clone(),
        seq_len,
        min_tokens: cli.min_tokens,
        samples: Some(cli.samples),
        max_bad_records: cli.max_bad_records,
        train,
        dtype: dtype.as_str().to_string(),
    };
    Ok((spec, out.clone()))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main(|| run(&cli))
}

fn run(cli: &Cli) -> anyhow::Result<Exit> {
    if cli.plan {
        return plan(cli);
    }
    let device = cli.device.device.open()?;
    let (spec, out, resume) = match &cli.resume {
        Some(dir) => {
            let spec =
                spec_from_checkpoint(dir).with_context(|| format!("--resume {}", dir.display()))?;
            (spec, dir.clone(), true)
        }
        None => {
            let (spec, out) = spec_from_flags(cli)?;
            if out.is_dir() && std::fs::read_dir(&out)?.next().is_some() && !cli.force {
                bail!(
                    "{} exists and is not empty (use --force to train into it, or --resume {} to continue)",
                    out.display(),
                    out.display()
                )
            }
            (spec, out, false)
        }
    };
    if spec.dtype == "bf16" && device.is_cpu() {
        eprintln!("note: bf16 on CPU is slow; f32 is the CPU default");
    }
    if device.is_cpu() {
        // freed step temporaries stay in the heap for the next layer (src/train/heap.rs)
        crate::train::heap::keep_freed_memory();
    }
    let bar = progress(0, "abf-tune", cli.print.json);
    let mut on = |e: Event| match e {
        Event::Prepared {
            examples,
            total_steps,
            start_step,
        } => {
            bar.set_length(total_steps);
            bar.set_position(start_step);
            bar.set_message(format!("{examples} examples"));
        }
        Event::Step(s) => {
            bar.set_position(s.step);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                s.loss, s.lr, s.tokens_per_s
            ));
            if !cli.print.json && bar.is_hidden() {
                eprintln!(
                    "step {}/{} loss {:.4} lr {:.3e} grad norm {:.3} {:.0} tok/s",
                    s.step,
                    bar.length().unwrap_or(0),
                    s.loss,
                    s.lr,
                    s.grad_norm,
                    s.tokens_per_s
                );
            }
        }
        Event::Saved { step, dir } => {
            bar.println(format!("checkpoint at step {step}: {}", dir.display()));
        }
    };
    let result = tune(&spec, &out, &device, resume, cli.stop_after, &mut on);
    bar.finish_and_clear();
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            // a run stopped by its guard still has a summary: which step failed, which was kept
            if let (true, TrainError::NonFinite { step, kept, .. }) = (cli.print.json, &e) {
                print_json(&json!({
                    "out": out,
                    "finished": false,
                    "error": e.to_string(),
                    "failed_step": step,
                    "kept_step": kept.as_ref().map(|k| k.step),
                    "kept_checkpoint": kept.as_ref().map(|k| &k.dir),
                }))?;
            }
            return Err(e.into());
        }
    };
    if cli.print.json {
        print_json(&json!(summary))?;
    } else {
        print_summary(&summary);
    }
    Ok(Exit::Ok)
}

fn print_summary(summary: &TuneSummary) {
    if summary.skipped_records > 0 {
        let kinds: Vec<String> = summary
            .skip_counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        eprintln!(
            "skipped {} of {} records ({}): {}",
            summary.skipped_records,
            summary.records,
            kinds.join(", "),
            summary.skip_reasons.join("; ")
        );
    }
    println!(
        "{} {} of {} steps, loss {} -> {}, {} examples ({} tokens), {} trainable of {} parameters, {:.1} s",
        if summary.finished { "trained" } else { "stopped after" },
        summary.steps_done,
        summary.total_steps,
        summary.first_loss.map(|l| format!("{l:.4}")).unwrap_or("-".into()),
        summary.last_loss.map(|l| format!("{l:.4}")).unwrap_or("-".into()),
        summary.data.kept,
        summary.data.tokens,
        summary.trainable_parameters,
        summary.parameters,
        summary.seconds
    );
    println!("recipe: {}", summary.recipe);
    println!(
        "{}: {}",
        if summary.finished {
            "model"
        } else {
            "checkpoint"
        },
        summary.out.display()
    );
}

/// `--plan`: the memory prediction of one step, from config.json and the flags.
fn plan(cli: &Cli) -> anyhow::Result<Exit> {
    use crate::train::plan::{plan_memory, Dims, MemorySpec, CPU_BASELINE};
    let Some(model) = &cli.model else {
        bail!("--plan needs --model (a directory with config.json)")
    };
    if cli.no_recompute {
        bail!("--plan predicts runs with layer recomputation (the default), not --no-recompute")
    }
    let hf = HfConfig::load(model)?;
    let mut args = cli.recipe.clone();
    if args.method.is_none() && hf.model.recipe.method == RopeMethod::Default {
        args.method = Some(RopeMethod::Eabf);
    }
    let recipe = args
        .resolve_over(&hf.model.recipe)
        .with_context(|| format!("recipe for {}", model.display()))?;
    let on_cuda = cli.device.device.is_cuda();
    let dtype = cli
        .dtype
        .unwrap_or(if on_cuda { DType::BF16 } else { DType::F32 });
    let seq_len = cli.seq_len.unwrap_or(recipe.context as usize);
    if seq_len < 2 {
        bail!("--seq-len must be at least 2")
    }
    let spec = MemorySpec {
        dims: Dims::from(&hf.model),
        seq_len,
        micro_batch: cli.micro_batch.max(1),
        dtype,
        lora: cli.lora,
        query_block: crate::train::hf::TRAIN_QUERY_BLOCK,
        head_chunk: cli.head_chunk.max(1),
        baseline: if on_cuda { 0 } else { CPU_BASELINE },
        bf16_moments: cli.optimizer_states == DType::BF16,
        cpu: !on_cuda,
    };
    let p = plan_memory(&spec, cli.memory_budget);
    if cli.print.json {
        print_json(&json!(p))?;
    } else {
        let gb = |b: u64| b as f64 / 1e9;
        println!(
            "{}: {} parameters ({} trainable), {} tokens x {} per micro-batch, {}{}",
            model.display(),
            p.parameters,
            p.trainable_parameters,
            seq_len,
            spec.micro_batch,
            dtype.as_str(),
            cli.lora
                .map(|r| format!(", LoRA rank {r}"))
                .unwrap_or_default()
        );
        for it in &p.items {
            println!(
                "  {:>9.3} GB  {:<58} {} ({})",
                gb(it.bytes),
                it.name,
                it.stage,
                it.formula
            );
        }
        println!(
            "peak {:.3} GB (at the {} stage; 1 GB = 1e9 B){}",
            gb(p.peak_bytes),
            p.peak_stage,
            match (p.budget_bytes, p.fits) {
                (Some(b), Some(true)) => format!(": fits {:.1} GB", gb(b)),
                (Some(b), _) => format!(": does NOT fit {:.1} GB", gb(b)),
                _ => String::new(),
            }
        );
        if on_cuda {
            println!("(the CUDA context and cuBLAS workspaces come on top, typically 0.5-1 GB)");
        }
    }
    Ok(if p.fits == Some(false) {
        Exit::CheckFailed
    } else {
        Exit::Ok
    })
}
