//! fixtures/kjv-passkey and its fine-tuning data (issue 16): the data speak the evaluation's
//! words and each record hides the key it ends with; the model does what its README claims, on keys the
//! README's measurement did not use: it finds a pass key within its 128-token window and not at
//! 4 x the window.

use std::path::Path;

use abf::eval::passkey;
use abf::runtime::{open_dir, CandleBackend};
use candle_core::{DType, Device};

const MODEL: &str = "fixtures/kjv-passkey";
const DATA: &str = "fixtures/conversations/kjv_passkey.jsonl";
const SCRIPT: &str = "fixtures/conversations/make_passkey.py";

#[test]
fn data_script_uses_the_evaluation_words() {
    let script = std::fs::read_to_string(SCRIPT).unwrap();
    for s in [passkey::TASK, passkey::GARBAGE, passkey::QUESTION] {
        assert!(script.contains(&format!("\"{s}\"")), "{SCRIPT} lacks {s:?}");
    }
    // the key line, as a Python f-string of `key`
    let line = passkey::key_line(12345).replace("12345", "{key}");
    assert!(
        script.contains(&format!("f\"{line}\"")),
        "{SCRIPT} lacks {line:?}"
    );
}

#[test]
fn conversations_hide_the_key_they_answer() {
    let text = std::fs::read_to_string(DATA).unwrap();
    let mut n = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let turns = v["conversations"].as_array().unwrap();
        assert_eq!(turns.len(), 2, "{line}");
        assert_eq!(turns[0]["from"], "human");
        assert_eq!(turns[1]["from"], "gpt");
        let record = turns[1]["value"].as_str().unwrap();
        // the record ends with the question and its answer, the key of its key line
        let (body, key) = record.rsplit_once(' ').unwrap();
        let key: u32 = key.parse().unwrap_or_else(|_| panic!("answer {key:?}"));
        assert!((10_000..=99_999).contains(&key));
        assert!(body.starts_with(&format!("{}\n", passkey::TASK)));
        assert!(body.ends_with(&format!("\n{}", passkey::QUESTION)));
        assert_eq!(body.matches(&passkey::key_line(key)).count(), 1);
        n += 1;
    }
    assert_eq!(n, 400);
}

#[test]
fn model_finds_the_key_within_its_window_and_not_beyond() {
    let dir = open_dir(Path::new(MODEL), DType::F32, &Device::Cpu).unwrap();
    // k-quants need rows that are whole 256-blocks (issue 14 quantizes this model)
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{MODEL}/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["hidden_size"].as_u64().unwrap() % 256, 0);
    assert_eq!(cfg["max_position_embeddings"], 128);
    let mut backend = CandleBackend::new(dir.model, "candle");
    // seed 7: keys the README's table (seed 0) did not use
    let cells = passkey::evaluate(
        &mut backend,
        &dir.encoder,
        &[128, 512],
        &[0.0, 0.25, 0.5, 0.75, 1.0],
        2,
        7,
        &mut || {},
    )
    .unwrap();
    let acc = |len: usize| {
        let c: Vec<_> = cells.iter().filter(|c| c.length == len).collect();
        c.iter().map(|c| c.correct).sum::<usize>() as f64
            / c.iter().map(|c| c.trials).sum::<usize>() as f64
    };
    assert!(acc(128) >= 0.9, "within the window: {cells:?}");
    // at depth 1 the key sits right before the question, within reach of what the model saw in
    // training; the README's 20% is that depth alone
    assert!(acc(512) <= 0.2, "at 4 x the window: {cells:?}");
}
