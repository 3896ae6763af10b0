//! `abf-eval`: not yet implemented; answers `--help`.

use std::process::ExitCode;

use clap::Parser;

use super::{run_main, Exit};

#[derive(Parser, Debug)]
#[command(
    name = "abf-eval",
    version,
    about = "Measure long-context quality: perplexity by position, passkey, attention entropy"
)]
pub struct Cli {}

pub fn main() -> ExitCode {
    let _cli = Cli::parse();
    run_main(|| {
        eprintln!("abf-eval is not implemented yet");
        Ok(Exit::Error)
    })
}
