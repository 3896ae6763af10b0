//! `abf-eval`: long-context measurements: logits hand-off, perplexity by length and position,
//! passkey retrieval, attention entropy.

mod entropy;
mod passkey;
mod ppl;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use super::{print_json, run_main, Exit};
use crate::checkpoint::Checkpoint;
use crate::eval::{model_logits, write_npy};
use crate::rope::{BaseRope, RecipeArgs};
use crate::runtime::Encoder;

#[derive(Parser, Debug)]
#[command(
    name = "abf-eval",
    version,
    about = "Measure long-context quality: logits, perplexity by position, passkey, attention entropy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How `ppl` and `passkey` run a model.
#[derive(Args, Debug)]
pub struct EngineArgs {
    /// Compute dtype (model directories).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// Engine for GGUF models: our candle reading of the file (as llama.cpp reads it) or real
    /// llama.cpp (builds with the `llamacpp` feature). Model directories run on candle.
    #[arg(long, default_value = "candle")]
    pub backend: crate::runtime::BackendKind,
    /// cpu or cuda:N (CUDA needs a build with the `cuda` feature, scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write f32 logits [n_tokens, vocab] at every position as a NumPy .npy file.
    Logits(LogitsArgs),
    /// Perplexity at each context length, overall and by position band, with a plot.
    Ppl(ppl::PplArgs),
    /// Passkey retrieval accuracy by length and depth (LongLoRA / YaRN protocol).
    #[command(after_help = passkey::PROTOCOL)]
    Passkey(passkey::PasskeyArgs),
    /// Attention entropy per layer at query positions against uniform ln n (the paper's Figure 1).
    Entropy(entropy::EntropyArgs),
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model directory (config.json + safetensors), or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Engine for a GGUF: our candle reading of its keys, or llama.cpp (directories: candle).
    #[arg(long, default_value = "candle", value_parser = ["candle", "llama.cpp"])]
    pub backend: String,
    /// JSON file with a list of token ids.
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    pub tokens: Option<PathBuf>,
    /// Text file, tokenized with the model's tokenizer.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Output .npy file.
    #[arg(long)]
    pub out: PathBuf,
    /// Compute dtype.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// cpu or cuda:N (CUDA needs a build with the `cuda` feature, scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main(|| match cli.command {
        Command::Logits(args) => logits(args),
        Command::Ppl(args) => ppl::run(args),
        Command::Passkey(args) => passkey::run(args),
        Command::Entropy(args) => entropy::run(args),
    })
}

/// The compute dtype named by `--dtype`.
fn parse_dtype(name: &str) -> DType {
    if name == "bf16" {
        DType::BF16
    } else {
        DType::F32
    }
}

/// One label per model: the `--label` values in order, else each path's last component.
fn model_labels(models: &[PathBuf], labels: &[String]) -> anyhow::Result<Vec<String>> {
    if !labels.is_empty() {
        anyhow::ensure!(
            labels.len() == models.len(),
            "--label: {} labels for {} models (give one per --model, or none)",
            labels.len(),
            models.len()
        );
        return Ok(labels.to_vec());
    }
    Ok(models
        .iter()
        .map(|m| {
            m.file_name().map_or_else(
                || m.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        })
        .collect())
}

fn logits(args: LogitsArgs) -> anyhow::Result<Exit> {
    if crate::runtime::is_gguf(&args.model) {
        return super::eval_gguf::logits_gguf(&args);
    }
    if args.backend != "candle" {
        anyhow::bail!(
            "{}: llama.cpp runs GGUF files, not model directories",
            args.model.display()
        );
    }
    let ckpt = Checkpoint::open(&args.model)?;
    let current = ckpt.config.model.recipe.clone();
    let base = BaseRope {
        base: current.rope_base,
        context: current.original_context,
    };
    let recipe = args
        .recipe
        .resolve(Some(&current), base)
        .context("recipe flags")?;
    let tokens = match (&args.tokens, &args.text) {
        (Some(path), _) => {
            let raw = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let ids: Vec<u32> = serde_json::from_str(&raw).with_context(|| {
                format!("{}: expected a JSON list of token ids", path.display())
            })?;
            ids
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Encoder::from_checkpoint(&ckpt)?.encode(&text)?
        }
        (None, None) => anyhow::bail!("give --tokens FILE.json or --text FILE"),
    };
    let dtype = if args.dtype == "bf16" {
        DType::BF16
    } else {
        DType::F32
    };
    let (data, vocab) = model_logits(
        &ckpt,
        &recipe,
        &tokens,
        dtype,
        &super::tune::device(&args.device)?,
    )?;
    write_npy(&args.out, &[tokens.len(), vocab], &data, args.force)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if args.json {
        print_json(&json!({
            "model": args.model,
            "out": args.out,
            "tokens": tokens.len(),
            "vocab": vocab,
            "recipe": recipe.to_json_block(),
        }))?;
    } else {
        println!(
            "wrote {} ([{}, {}] f32 logits, recipe: {recipe})",
            args.out.display(),
            tokens.len(),
            vocab
        );
    }
    Ok(Exit::Ok)
}
