//! `abf-eval logits`: f32 logits at every position as a NumPy file, for a model directory (our
//! candle forward, recipe flags laid over its own recipe) or a GGUF (run by our candle reading
//! of it or by llama.cpp, `--backend`, on the recipe of its keys).

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use clap::Args;
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::cli::args::{read_text_file, read_token_ids};
use crate::cli::{print_json, EngineArgs, Exit, JsonFlag, RecipeArgs};
use crate::eval::{model_logits, write_npy};
use crate::runtime::{open_backend, BackendKind, Encoder};

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model directory (config.json + safetensors), or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// JSON file with a list of token ids.
    #[arg(long, conflicts_with = "text", required_unless_present = "text")]
    pub tokens: Option<PathBuf>,
    /// Text file, tokenized with the model's tokenizer.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Output .npy file.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    #[command(flatten)]
    pub print: JsonFlag,
}

pub fn run(args: LogitsArgs) -> anyhow::Result<Exit> {
    if crate::runtime::is_gguf(&args.model) {
        return logits_gguf(&args);
    }
    if args.engine.backend != BackendKind::Candle {
        anyhow::bail!(
            "{}: llama.cpp runs GGUF files, not model directories",
            args.model.display()
        );
    }
    let ckpt = Checkpoint::open(&args.model)?;
    let recipe = args
        .recipe
        .resolve_over(&ckpt.config.model.recipe)
        .context("recipe flags")?;
    let tokens = match (&args.tokens, &args.text) {
        (Some(path), _) => read_token_ids(path)?,
        (None, Some(path)) => Encoder::from_checkpoint(&ckpt)?.encode(&read_text_file(path)?)?,
        (None, None) => anyhow::bail!("give --tokens FILE.json or --text FILE"),
    };
    let compute = &args.engine.compute;
    let device = compute.device.device.open()?;
    let (data, vocab) = model_logits(&ckpt, &recipe, &tokens, compute.dtype, &device)?;
    write_npy(&args.out, &[tokens.len(), vocab], &data, args.force)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if args.print.json {
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

/// A GGUF: the file's own keys, tokens from `--tokens` or its own vocabulary.
fn logits_gguf(args: &LogitsArgs) -> anyhow::Result<Exit> {
    if !args.recipe.is_empty() {
        anyhow::bail!(
            "{}: recipe flags apply to model directories; a GGUF runs the recipe of its keys \
             (abf-convert patch-gguf changes them)",
            args.model.display()
        );
    }
    if args.engine.compute.dtype != DType::F32 {
        anyhow::bail!(
            "a GGUF runs in f32 (its tensors dequantized); --dtype {} is for model directories",
            args.engine.compute.dtype.as_str()
        );
    }
    let tokens: Vec<u32> = match (&args.tokens, &args.text) {
        (Some(path), _) => read_token_ids(path)?,
        (None, Some(path)) => Encoder::open(&args.model)?.encode(&read_text_file(path)?)?,
        (None, None) => anyhow::bail!("give --tokens FILE.json or --text FILE"),
    };
    let device = args.engine.compute.device.device.open()?;
    let mut backend = open_backend(&args.model, args.engine.backend, &device)?;
    let vocab = backend.vocab_size();
    let data = backend.logits(&tokens)?;
    write_npy(&args.out, &[tokens.len(), vocab], &data, args.force)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if args.print.json {
        print_json(&json!({
            "model": args.model,
            "backend": backend.name(),
            "out": args.out,
            "tokens": tokens.len(),
            "vocab": vocab,
        }))?;
    } else {
        println!(
            "wrote {} ([{}, {}] f32 logits, {} on the GGUF's own keys)",
            args.out.display(),
            tokens.len(),
            vocab,
            backend.name()
        );
    }
    Ok(Exit::Ok)
}
