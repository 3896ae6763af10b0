//! `abf-tune`: not yet implemented; answers `--help`.

use std::process::ExitCode;

use clap::Parser;

use super::{run_main, Exit};

#[derive(Parser, Debug)]
#[command(
    name = "abf-tune",
    version,
    about = "Fine-tune a model to a longer window with entropy-aware ABF"
)]
pub struct Cli {}

pub fn main() -> ExitCode {
    let _cli = Cli::parse();
    run_main(|| {
        eprintln!("abf-tune is not implemented yet");
        Ok(Exit::Error)
    })
}
