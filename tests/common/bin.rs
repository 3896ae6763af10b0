//! One runner for the crate's binaries: run with arguments, capture exit code, stdout and stderr,
//! parse `--json` output.

use std::process::Command;

/// The crate's binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    Convert,
    Eval,
    Tune,
    Verify,
}

impl Bin {
    pub fn path(self) -> &'static str {
        match self {
            Bin::Convert => env!("CARGO_BIN_EXE_abf-convert"),
            Bin::Eval => env!("CARGO_BIN_EXE_abf-eval"),
            Bin::Tune => env!("CARGO_BIN_EXE_abf-tune"),
            Bin::Verify => env!("CARGO_BIN_EXE_abf-verify"),
        }
    }

    /// A `Command` for this binary, for the rare test that needs more than arguments.
    pub fn command(self) -> Command {
        Command::new(self.path())
    }
}

/// What a run left: exit code (-1 when killed by a signal), stdout, stderr.
#[derive(Debug, Clone)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// (code, stdout, stderr).
    pub fn parts(self) -> (i32, String, String) {
        (self.code, self.stdout, self.stderr)
    }

    /// stdout parsed as JSON (the `--json` report); panics with the text when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Panics (showing stderr) unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code, code,
            "exit code {} (expected {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

/// Run `bin` with `args` and wait.
pub fn run(bin: Bin, args: &[&str]) -> Run {
    output(bin.command().args(args))
}

/// Run a prepared command and capture it.
pub fn output(cmd: &mut Command) -> Run {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
