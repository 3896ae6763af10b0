//! `abf-verify`: not yet implemented; answers `--help`.

use std::process::ExitCode;

use clap::Parser;

use super::{run_main, Exit};

#[derive(Parser, Debug)]
#[command(
    name = "abf-verify",
    version,
    about = "Verify that a GGUF computes what its reference checkpoint computes, beyond the original window"
)]
pub struct Cli {}

pub fn main() -> ExitCode {
    let _cli = Cli::parse();
    run_main(|| {
        eprintln!("abf-verify is not implemented yet");
        Ok(Exit::Error)
    })
}
