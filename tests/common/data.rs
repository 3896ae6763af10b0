//! Inputs that live outside the test: the repository's fixtures, the real model fetched by
//! `make fetch`, and the one rule for what is missing: skip with a note, or fail when
//! `ABF_REQUIRE_DATA=1` (set by `make test`).

use std::fmt::Display;
use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The KJV conversation fixture (ShareGPT JSONL).
pub fn conversations() -> PathBuf {
    root().join("fixtures/conversations/kjv_long.jsonl")
}

/// Public-domain text: the assistant turns of the fixture's first three conversations.
pub fn kjv_answers() -> String {
    let raw = std::fs::read_to_string(conversations()).unwrap();
    let mut out = Vec::new();
    for line in raw.lines().take(3) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for t in v["conversations"].as_array().unwrap() {
            if t["from"] == "gpt" {
                out.push(t["value"].as_str().unwrap().to_string());
            }
        }
    }
    out.join("\n")
}

/// The fine-tuned fixture model directory (`fixtures/kjv-tiny`).
pub fn kjv_tiny() -> PathBuf {
    root().join("fixtures/kjv-tiny")
}

/// True when `ABF_REQUIRE_DATA=1`: missing data fails the test instead of skipping it.
pub fn require_data() -> bool {
    std::env::var("ABF_REQUIRE_DATA").is_ok_and(|v| v == "1")
}

/// `what` is unavailable: panics under `ABF_REQUIRE_DATA=1`, otherwise prints a note and returns
/// None so the caller can `return` (skip).
pub fn skip_or_fail<T>(what: impl Display) -> Option<T> {
    if require_data() {
        panic!("{what} is unavailable (ABF_REQUIRE_DATA=1)");
    }
    eprintln!("note: {what} is unavailable; skipping");
    None
}

/// The SmolLM2 Q4_1 GGUF fetched by `make fetch`, or None (with a note) when absent.
/// With `ABF_REQUIRE_DATA=1` a missing file fails the test instead.
pub fn smollm_gguf() -> Option<PathBuf> {
    let p = root().join(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        return Some(p);
    }
    skip_or_fail(format_args!("{} (run `make fetch`)", p.display()))
}

/// True when `python3 -c "import <module>"` succeeds.
pub fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
