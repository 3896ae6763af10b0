//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The SmolLM2 Q4_1 GGUF fetched by `make fetch`, or None (with a note) when absent.
/// With `ABF_REQUIRE_DATA=1` a missing file fails the test instead.
pub fn smollm_gguf() -> Option<PathBuf> {
    let p = root().join(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("ABF_REQUIRE_DATA").is_ok_and(|v| v == "1") {
        panic!("{} is missing: run `make fetch`", p.display());
    }
    eprintln!(
        "note: {} is missing (run `make fetch`); skipping",
        p.display()
    );
    None
}

/// A test's data or tool is missing: None with a printed note, or a failure under
/// `ABF_REQUIRE_DATA=1` (set by `make test`).
pub fn missing<T>(what: &str) -> Option<T> {
    if std::env::var("ABF_REQUIRE_DATA").is_ok_and(|v| v == "1") {
        panic!("{what} is missing: run `make fetch`");
    }
    eprintln!("note: {what} is missing (run `make fetch`); skipping");
    None
}
