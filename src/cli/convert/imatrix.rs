//! `abf-convert imatrix`: llama.cpp's importance matrix of a model over a text, computed by our
//! forward at the model's own (extended) window, written in llama.cpp's GGUF form.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::ProgressStyle;
use serde_json::json;

use crate::cli::args::read_text_file;
use crate::cli::{print_json, progress, ComputeArgs, Exit, JsonFlag};
use crate::imatrix::{collect, write_gguf, CollectOptions};
use crate::runtime::open_forward;

#[derive(Args, Debug)]
pub struct ImatrixArgs {
    /// Model directory or GGUF file (a GGUF runs in f32 as llama.cpp reads its keys).
    pub model: PathBuf,
    /// The calibration text.
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Tokens per chunk (default: the recipe's target window, so the sums see the positions the
    /// extended model will run at; llama-imatrix's default is 512).
    #[arg(long, value_name = "N")]
    pub ctx: Option<usize>,
    /// At most this many chunks (default: every whole chunk of the text).
    #[arg(long, value_name = "K")]
    pub chunks: Option<usize>,
    /// The imatrix GGUF to write.
    #[arg(short, long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub print: JsonFlag,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ImatrixArgs) -> anyhow::Result<Exit> {
    if args.output.exists() && !args.force {
        anyhow::bail!(
            "{} exists (use --force to replace it)",
            args.output.display()
        );
    }
    let device = args.compute.device.device.open()?;
    let mut m = open_forward(&args.model, args.compute.dtype, &device)?;
    let text = read_text_file(&args.text)?;
    let tokens = m.encoder.encode(&text)?;
    let ctx = args.ctx.unwrap_or(m.model.config().recipe.context as usize);
    let opts = CollectOptions {
        ctx,
        max_chunks: args.chunks,
        dataset: args.text.display().to_string(),
        bos: m.encoder.bos,
    };
    let planned = (tokens.len() / ctx.max(1)).min(args.chunks.unwrap_or(usize::MAX));
    let bar = progress((planned * ctx) as u64, "imatrix", args.print.json);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} tokens ({per_sec}, {eta})",
    ) {
        bar.set_style(style);
    }
    let start = Instant::now();
    let (matrix, report) = collect(&mut m.model, &tokens, &opts, &mut |n| bar.inc(n as u64))
        .with_context(|| {
            format!(
                "{}: collecting over {}",
                m.path.display(),
                args.text.display()
            )
        })?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let bytes = write_gguf(&matrix, &args.output, args.force)?;
    let rate = report.tokens as f64 / seconds.max(1e-9);
    if args.print.json {
        print_json(&json!({
            "output": args.output, "model": args.model, "text": args.text,
            "ctx": ctx, "chunks": report.chunks, "tokens": report.tokens,
            "text_tokens": tokens.len(), "dropped_tokens": report.dropped_tokens,
            "tensors": matrix.entries.len(), "bytes": bytes,
            "seconds": seconds, "tokens_per_s": rate,
        }))?;
    } else {
        println!(
            "wrote {}: {} tensors, {} chunks of {ctx} tokens ({} of the text's {} tokens), \
             {:.1} s, {:.0} tokens/s",
            args.output.display(),
            matrix.entries.len(),
            report.chunks,
            report.tokens,
            tokens.len(),
            seconds,
            rate
        );
    }
    Ok(Exit::Ok)
}
