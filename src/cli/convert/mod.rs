//! `abf-convert`: convert and patch checkpoints and GGUF files.

mod from_gguf;
mod imatrix;
mod inspect;
mod patch_config;
mod patch_gguf;
mod release;
mod rope;
mod to_gguf;

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
    /// Print a GGUF file's header, keys, tensors, summary and the recipe it encodes.
    Inspect(inspect::InspectArgs),
    /// Edit a GGUF's metadata: set/delete keys, relabel the architecture, apply a recipe.
    PatchGguf(patch_gguf::PatchArgs),
    /// Rewrite a model directory's config.json for a recipe (transformers or exact form).
    PatchConfig(patch_config::PatchConfigArgs),
    /// Convert a Hugging Face checkpoint to a llama.cpp GGUF (recipe, tokenizer, quantization).
    ToGguf(to_gguf::ToGgufArgs),
    /// Convert a GGUF back to a Hugging Face checkpoint (safetensors, config, tokenizer).
    FromGguf(from_gguf::FromGgufArgs),
    /// A release: every type in one pass, each verified, release.json, SHA256SUMS, model card.
    Release(release::ReleaseArgs),
    /// Compute an importance matrix (llama.cpp's imatrix GGUF) over a text, for to-gguf --imatrix.
    Imatrix(imatrix::ImatrixArgs),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main(|| run(cli))
}

pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Rope(args) => rope::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::PatchGguf(args) => patch_gguf::run(args),
        Command::PatchConfig(args) => patch_config::run(args),
        Command::ToGguf(args) => to_gguf::run(args),
        Command::FromGguf(args) => from_gguf::run(args),
        Command::Release(args) => release::run(args),
        Command::Imatrix(args) => imatrix::run(args),
    }
}
