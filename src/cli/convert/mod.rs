//! `abf-convert`: convert and patch checkpoints and GGUF files.

mod patch_config;
mod rope;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use super::{run_main, Exit};

#[derive(Parser, Debug)]
#[command(
    name = "abf-convert",
    version,
    about = "Convert and patch checkpoints and GGUF files for context-extended models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a recipe's inverse frequencies, attention factor and logit scales.
    Rope(rope::RopeArgs),
    /// Rewrite a model directory's config.json for a recipe (transformers or exact form).
    PatchConfig(patch_config::PatchConfigArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main(|| run(cli))
}

pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Rope(args) => rope::run(args),
        Command::PatchConfig(args) => patch_config::run(args),
    }
}
