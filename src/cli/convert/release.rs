//! `abf-convert release`: every type in one pass, every file verified, `release.json`,
//! `SHA256SUMS` and a model card, built in a staging directory and renamed into place.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::cli::args::{out_type, read_text_file, Backends};
use crate::cli::{print_json, progress, Exit, JsonFlag};
use crate::convert::OutType;
use crate::release::{release, ImatrixSource, ReleaseOptions};
use crate::verify::TokenSource;

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// Model directory (config.json with its recipe, safetensors, tokenizer files).
    pub model_dir: PathBuf,
    /// The release directory to create.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Output types, comma-separated, written in one pass.
    #[arg(long, default_value = "f16,q8_0,q6_k,q5_k_m,q4_k_m", value_parser = out_type(),
          ignore_case = true, value_delimiter = ',', num_args = 1..)]
    pub types: Vec<OutType>,
    /// Calibration text: an importance matrix is collected over it (chunks of the recipe's
    /// target window) and the k-quants are importance-weighted; kept as imatrix.gguf.
    #[arg(long, value_name = "FILE", conflicts_with = "imatrix")]
    pub calibration: Option<PathBuf>,
    /// Tokens per calibration chunk (default: the recipe's target window).
    #[arg(long, requires = "calibration")]
    pub ctx: Option<usize>,
    /// An importance matrix to quantize with (llama.cpp's or abf's; GGUF or legacy .dat).
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Text to verify with (tokenized with the model's tokenizer); default random tokens.
    #[arg(long, value_name = "FILE")]
    pub verify_text: Option<PathBuf>,
    /// Verification lengths, comma-separated (default: the recipe's target window, >= 4 x c).
    #[arg(long, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Verify on our candle reading, real llama.cpp, or both.
    #[arg(long, value_enum, default_value_t = Backends::default_for_build())]
    pub backend: Backends,
    /// Split every file into parts of at most this many tensor bytes: N, NK, NM or NG.
    #[arg(long, value_name = "N[K|M|G]", value_parser = crate::cli::args::byte_size)]
    pub split_max_size: Option<u64>,
    /// Split every file into parts of at most this many tensors.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub split_max_tensors: Option<u64>,
    /// Name of the release (file prefix and card title; default: the directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace an existing release directory (swapped in only when the new one is complete).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub print: JsonFlag,
}

pub fn run(args: ReleaseArgs) -> anyhow::Result<Exit> {
    let source = match &args.verify_text {
        Some(p) => TokenSource::Text(read_text_file(p)?),
        None => TokenSource::Random { seed: 0 },
    };
    let imatrix = match (&args.calibration, &args.imatrix) {
        (Some(p), _) => ImatrixSource::Calibration {
            name: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            text: read_text_file(p)?,
            ctx: args.ctx,
        },
        (None, Some(p)) => ImatrixSource::File(p.clone()),
        (None, None) => ImatrixSource::None,
    };
    let opts = ReleaseOptions {
        model_dir: args.model_dir.clone(),
        out_dir: args.output.clone(),
        types: args.types.clone(),
        name: args.name.clone(),
        backends: args.backend.kinds(),
        lengths: args.lengths.clone(),
        source,
        imatrix,
        split: crate::gguf::SplitLimits {
            max_tensors: args.split_max_tensors.map(|n| n as usize),
            max_bytes: args.split_max_size,
        },
        force: args.force,
    };
    let bar = progress(0, "release", args.print.json);
    let manifest = release(&opts, &mut |stage, done, total| {
        bar.set_message(stage.to_string());
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("release of {}", args.model_dir.display()))?;
    bar.finish_and_clear();
    if args.print.json {
        print_json(&serde_json::to_value(&manifest)?)?;
    } else {
        println!("{}: {}", manifest.name, manifest.recipe);
        for f in &manifest.files {
            println!(
                "  {:<40} {:>8} {:>9.1} MB {:>6.2} bpw  {}",
                f.files.join(", "),
                f.outtype,
                f.bytes as f64 / 1e6,
                f.bits_per_weight,
                if f.pass { "PASS" } else { "FAIL" }
            );
            for x in &f.findings {
                println!("      {x}");
            }
        }
        println!("wrote {}", args.output.display());
    }
    Ok(if manifest.pass {
        Exit::Ok
    } else {
        Exit::CheckFailed
    })
}
