//! `abf-eval`: long-context measurements: logits hand-off, perplexity by length and position,
//! passkey retrieval, attention entropy.

mod entropy;
mod logits;
mod passkey;
mod ppl;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use super::{run_main, Exit};

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

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write f32 logits [n_tokens, vocab] at every position as a NumPy .npy file.
    Logits(logits::LogitsArgs),
    /// Perplexity at each context length, overall and by position band, with a plot.
    Ppl(ppl::PplArgs),
    /// Passkey retrieval accuracy by length and depth (LongLoRA / YaRN protocol).
    #[command(after_help = passkey::PROTOCOL)]
    Passkey(passkey::PasskeyArgs),
    /// Attention entropy per layer at query positions against uniform ln n (the paper's Figure 1).
    Entropy(entropy::EntropyArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main(|| run(cli))
}

pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Logits(args) => logits::run(args),
        Command::Ppl(args) => ppl::run(args),
        Command::Passkey(args) => passkey::run(args),
        Command::Entropy(args) => entropy::run(args),
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
