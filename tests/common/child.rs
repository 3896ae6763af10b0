//! A measurement in a child process: the test binary re-runs one of its own tests with an
//! environment variable set, so that the kernel's peak resident set (or any process-wide counter)
//! is that test's alone; the child prints one line `MARKER key=value key=value ...`.

use std::collections::HashMap;

/// Run test `name` of this binary with `env = value`, require success, and return the numbers of
/// its line starting with `marker`.
pub fn measure(name: &str, env: &str, value: &str, marker: &str) -> HashMap<String, u64> {
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(env, value)
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(&format!("{marker} ")).map(|(_, m)| m))
        .unwrap_or_else(|| panic!("no {marker} line in the child's output: {stdout}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().expect("a number")))
        .collect()
}
