//! `abf-verify`: does the shipped GGUF compute what its reference checkpoint computes, within
//! the original window and beyond it? Exit 0 pass, 1 fail, 2 error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use super::args::{read_text_file, read_token_ids, Backends};
use super::{print_json, progress, run_main, Exit, JsonFlag};
use crate::fsutil::write_atomic;
use crate::verify::{render, verify, TokenSource, VerifyOptions, VerifyReport};

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
    #[arg(long, value_enum, default_value_t = Backends::default_for_build())]
    pub backend: Backends,
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
    /// Also write the JSON report to this file (--json prints it on stdout instead of the text).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
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
    #[command(flatten)]
    pub print: JsonFlag,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main(|| run(cli))
}

fn run(cli: Cli) -> anyhow::Result<Exit> {
    let source = if let Some(p) = &cli.text {
        TokenSource::Text(read_text_file(p)?)
    } else if let Some(p) = &cli.tokens {
        TokenSource::Tokens(read_token_ids(p)?)
    } else {
        TokenSource::Random { seed: cli.seed }
    };
    let mut opts = VerifyOptions::new(&cli.reference, &cli.gguf);
    opts.backends = cli.backend.kinds();
    opts.lengths = cli.lengths.clone();
    opts.source = source;
    opts.max_nmse = cli.max_nmse;
    opts.max_kld = cli.max_kld;
    opts.min_top1 = cli.min_top1;
    let report = run_with_progress(&opts, cli.quiet || cli.print.json)?;
    if cli.print.json {
        print_json(&serde_json::to_value(&report)?)?;
    } else {
        print!("{}", render(&report));
    }
    if let Some(path) = &cli.report {
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

/// Verify with one progress bar per stage on stderr.
fn run_with_progress(opts: &VerifyOptions, quiet: bool) -> anyhow::Result<VerifyReport> {
    let mut bar: Option<(String, indicatif::ProgressBar)> = None;
    let report = verify(opts, &mut |stage, done, total| {
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
    Ok(report)
}
