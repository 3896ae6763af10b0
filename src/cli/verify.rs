//! `abf-verify`: does the shipped GGUF compute what its reference checkpoint computes, within
//! the original window and beyond it? Exit 0 pass, 1 fail, 2 error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use super::{progress, run_main, Exit};
use crate::fsutil::write_atomic;
use crate::runtime::BackendKind;
use crate::verify::{render, verify, TokenSource, VerifyOptions};

#[derive(Parser, Debug)]
#[command(
    name = "abf-verify",
    version,
    about = "Verify that a GGUF computes what its reference checkpoint computes, beyond the original window"
)]
pub struct Cli {
    /// Reference model directory (config.json with its recipe, safetensors, tokenizer).
    #[arg(long)]
    pub reference: PathBuf,
    /// The GGUF to verify.
    #[arg(long)]
    pub gguf: PathBuf,
    /// Candidate backend: our candle reading of the GGUF, real llama.cpp, or both.
    #[arg(long, value_parser = ["candle", "llama.cpp", "both"], default_value = default_backend())]
    pub backend: String,
    /// Lengths to cover, comma-separated (the longest is run; each ends a band). Default: the
    /// recipe's target window, at least 4 x the original window.
    #[arg(long, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Text file, tokenized with the reference tokenizer.
    #[arg(long, group = "input")]
    pub text: Option<PathBuf>,
    /// JSON file with a list of token ids.
    #[arg(long, group = "input")]
    pub tokens: Option<PathBuf>,
    /// Random token ids (the default input).
    #[arg(long, group = "input")]
    pub random_tokens: bool,
    /// Seed of --random-tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the JSON report to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Override the NMSE pass line.
    #[arg(long)]
    pub max_nmse: Option<f64>,
    /// Override the mean-KLD pass line.
    #[arg(long)]
    pub max_kld: Option<f64>,
    /// Override the top-1 agreement pass line (a fraction, e.g. 0.995).
    #[arg(long)]
    pub min_top1: Option<f64>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

const fn default_backend() -> &'static str {
    if cfg!(feature = "llamacpp") {
        "both"
    } else {
        "candle"
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main(|| run(cli))
}

fn run(cli: Cli) -> anyhow::Result<Exit> {
    let backends = match cli.backend.as_str() {
        "both" => vec![BackendKind::Candle, BackendKind::LlamaCpp],
        other => vec![other.parse::<BackendKind>().map_err(anyhow::Error::msg)?],
    };
    let source = if let Some(p) = &cli.text {
        TokenSource::Text(
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
    } else if let Some(p) = &cli.tokens {
        let raw = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        TokenSource::Tokens(
            serde_json::from_str(&raw)
                .with_context(|| format!("{}: expected a JSON list of token ids", p.display()))?,
        )
    } else {
        TokenSource::Random { seed: cli.seed }
    };
    let mut opts = VerifyOptions::new(&cli.reference, &cli.gguf);
    opts.backends = backends;
    opts.lengths = cli.lengths.clone();
    opts.source = source;
    opts.max_nmse = cli.max_nmse;
    opts.max_kld = cli.max_kld;
    opts.min_top1 = cli.min_top1;
    let mut bar: Option<(String, indicatif::ProgressBar)> = None;
    let quiet = cli.quiet;
    let report = verify(&opts, &mut |stage, done, total| {
        if bar.as_ref().is_none_or(|(s, _)| s != stage) {
            if let Some((_, b)) = bar.take() {
                b.finish_and_clear();
            }
            bar = Some((stage.to_string(), progress(total as u64, stage, quiet)));
        }
        if let Some((_, b)) = &bar {
            b.set_position(done as u64);
        }
    })?;
    if let Some((_, b)) = bar.take() {
        b.finish_and_clear();
    }
    print!("{}", render(&report));
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report)?;
        write_atomic(path, text.as_bytes(), true)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.pass {
        Exit::Ok
    } else {
        Exit::CheckFailed
    })
}
