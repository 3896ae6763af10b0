//! What the binaries share: exit codes, error printing, progress bars, JSON output, and the
//! typed flags (`args`, `recipe_args`). Each binary's `main` calls one `main` here; its own
//! argument structs live beside it. A binary's module uses only these shared modules, never
//! another binary's.

pub mod args;
pub mod convert;
pub mod eval;
pub mod recipe_args;
pub mod tune;
pub mod verify;

pub use args::{ComputeArgs, Device, DeviceArgs, EngineArgs, JsonFlag};
pub use recipe_args::{RecipeArgs, ScaleLawArg};

use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Exit codes of every abf binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success (and, for checks, pass).
    Ok = 0,
    /// A check ran and failed.
    CheckFailed = 1,
    /// Bad input or an error: nothing was (half-)written.
    Error = 2,
}

/// Run a command body: set up logging, print an error chain to stderr, map to an exit code.
pub fn run_main(body: impl FnOnce() -> anyhow::Result<Exit>) -> ExitCode {
    restore_sigpipe();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ABF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match body() {
        Ok(code) => ExitCode::from(code as u8),
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(Exit::Error as u8)
        }
    }
}

/// Rust ignores SIGPIPE, so `abf-convert inspect F | head` would panic on the closed pipe;
/// restore the default so the process ends quietly, as Unix filters do.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread starts; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal or output is JSON.
pub fn progress(len: u64, message: &str, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(message.to_string());
    bar
}

/// Print a JSON value to stdout, pretty. A closed pipe (`| head`) is not an error.
pub fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(value)?;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
