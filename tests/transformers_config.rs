//! transformers itself (the PyPI package, configuration classes only: no torch needed) reads
//! the config.json that abf writes for the exact target and that abf-tune exports, and gets the
//! recipe's base and window: the native fields are the recipe's, not the checkpoint's old ones.

mod common;

use std::path::Path;
use std::process::Command;

use common::bin::{output, Bin};
use common::data::skip_or_fail;
use serde_json::Value;

const KJV: &str = "fixtures/kjv-tiny";

/// What transformers' `AutoConfig` reads from a model directory: class, rope parameters and
/// window. None (with a note) when Python's transformers is not installed; `ABF_REQUIRE_DATA=1`
/// fails instead.
fn transformers_reads(dir: &Path) -> Option<Value> {
    const SCRIPT: &str = "import json, sys\n\
        from transformers import AutoConfig\n\
        c = AutoConfig.from_pretrained(sys.argv[1])\n\
        print(json.dumps({'class': type(c).__name__, 'rope': c.rope_parameters,\n\
                          'max_position_embeddings': c.max_position_embeddings}))\n";
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(dir)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output();
    match out {
        Ok(o) if o.status.success() => Some(serde_json::from_slice(&o.stdout).unwrap()),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("No module named 'transformers'") {
                skip_or_fail("Python's transformers (make fetch installs it)")
            } else {
                panic!("transformers could not read {}: {err}", dir.display())
            }
        }
        Err(e) => skip_or_fail(format!("python3 ({e})")),
    }
}

fn run(bin: Bin, args: &[&str]) -> (i32, String, String) {
    output(bin.command().args(args).current_dir(common::root())).parts()
}

#[test]
fn transformers_reads_the_recipe_base_from_an_exact_config() {
    let dir = tempfile::tempdir().unwrap();
    // the command on the base-10000 fixture
    let abf = dir.path().join("abf");
    let (code, _, err) = run(
        Bin::Convert,
        &[
            "patch-config",
            KJV,
            "-o",
            abf.to_str().unwrap(),
            "--method",
            "abf",
            "--rope-base",
            "500000",
            "--runtime",
            "exact",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let Some(read) = transformers_reads(&abf) else {
        return;
    };
    assert_eq!(read["class"], "LlamaConfig", "{read}");
    assert_eq!(
        read["rope"]["rope_theta"].as_f64(),
        Some(500000.0),
        "{read}"
    );
    assert_eq!(read["max_position_embeddings"], 512, "{read}");

    // eabf: what transformers can run (base, window, step law on ministral3) natively, with a
    // warning for what it cannot (the log law, the exempt layers)
    let eabf = dir.path().join("eabf");
    let (code, _, err) = run(
        Bin::Convert,
        &[
            "patch-config",
            KJV,
            "-o",
            eabf.to_str().unwrap(),
            "--method",
            "eabf",
            "--runtime",
            "exact",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: transformers will not apply"),
        "{err}"
    );
    let read = transformers_reads(&eabf).unwrap();
    assert_eq!(read["class"], "Ministral3Config", "{read}");
    assert_eq!(
        read["rope"]["rope_theta"].as_f64(),
        Some(500000.0),
        "{read}"
    );
    assert_eq!(
        read["rope"]["original_max_position_embeddings"], 128,
        "{read}"
    );
    let beta = read["rope"]["llama_4_scaling_beta"].as_f64().unwrap();
    assert!((beta - 1.0 / 128f64.ln()).abs() < 1e-12, "{read}");
    assert_eq!(read["max_position_embeddings"], 512, "{read}");
}

#[test]
fn transformers_reads_the_recipe_base_from_an_abf_tune_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tuned");
    let (code, _, err) = run(
        Bin::Tune,
        &[
            "--model",
            KJV,
            "--data",
            "fixtures/conversations/kjv_demo.jsonl",
            "-o",
            out.to_str().unwrap(),
            "--method",
            "abf",
            "--rope-base",
            "500000",
            "--context",
            "512",
            "--seq-len",
            "512",
            "--samples",
            "2",
            "--batch-size",
            "2",
            "--micro-batch",
            "1",
            "--steps",
            "1",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let Some(read) = transformers_reads(&out) else {
        return;
    };
    assert_eq!(
        read["rope"]["rope_theta"].as_f64(),
        Some(500000.0),
        "{read}"
    );
    assert_eq!(read["max_position_embeddings"], 512, "{read}");
}
