//! Real llama.cpp (feature `llamacpp`) on the real SmolLM2 Q4_1 GGUF: shapes, determinism,
//! causality, a long context, a sensible greedy continuation, and typed errors.
#![cfg(feature = "llamacpp")]

mod common;

use std::time::Instant;

use abf::runtime::{LlamaCpp, RuntimeError};

const TEXT: &str = "The history of the city begins with a small fishing village on the banks of a \
wide river. Over the centuries, merchants arrived from distant lands, bringing spices, cloth and \
new ideas. The village grew into a busy market town, and later into a great city with stone \
bridges, tall churches and crowded streets. Today, visitors walk along the old harbour, visit the \
museums and enjoy the food of many cultures. In the evening, the lights of the bridges shine on \
the water, and music drifts from the open windows of the cafes. Scientists at the university \
study the river, the weather and the stars, while children play in the parks and gardens.";

fn model() -> Option<LlamaCpp> {
    let path = common::smollm_gguf()?;
    Some(LlamaCpp::load(&path).expect("load the SmolLM2 GGUF"))
}

fn tokens(m: &LlamaCpp, n: usize) -> Vec<u32> {
    let t = m.tokenize(TEXT, false);
    assert!(t.len() >= n, "sample text has only {} tokens", t.len());
    t[..n].to_vec()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn logits_at_every_position_are_finite_deterministic_and_causal() {
    let Some(m) = model() else { return };
    let n_vocab = m.n_vocab();
    assert_eq!(n_vocab, 49152);
    let ids = tokens(&m, 128);

    let t0 = Instant::now();
    let full = m.logits(&ids, 256).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "llama.cpp logits: 128 tokens in {secs:.3} s = {:.0} tokens/s",
        128.0 / secs
    );
    assert_eq!(full.len(), 128 * n_vocab);
    assert!(full.iter().all(|x| x.is_finite()));
    // Rows differ from one another (a broken batch would repeat one row).
    assert!(max_abs_diff(&full[..n_vocab], &full[n_vocab..2 * n_vocab]) > 0.1);

    let again = m.logits(&ids, 256).unwrap();
    assert!(full == again, "two identical runs differ");

    // Causality: the first 64 positions alone, and with a different continuation, give the
    // same logits there; the positions after the change must differ.
    let prefix = m.logits(&ids[..64], 256).unwrap();
    let d_prefix = max_abs_diff(&prefix, &full[..64 * n_vocab]);
    let mut other = ids.clone();
    for t in other.iter_mut().skip(64) {
        *t = (*t + 17) % n_vocab as u32;
    }
    let changed = m.logits(&other, 256).unwrap();
    let d_before = max_abs_diff(&changed[..64 * n_vocab], &full[..64 * n_vocab]);
    let d_after = max_abs_diff(&changed[64 * n_vocab..], &full[64 * n_vocab..]);
    eprintln!(
        "causality: prefix run {d_prefix:e}, changed suffix before {d_before:e}, after {d_after}"
    );
    assert!(
        d_prefix < 1e-3 && d_before < 1e-3,
        "logits depend on later tokens"
    );
    assert!(d_after > 1.0, "changing tokens did not change later logits");

    // Small batches (17 tokens per llama_decode) give the same logits as one batch.
    let opts = abf::runtime::LlamaCppOptions {
        n_batch: 17,
        ..Default::default()
    };
    let small = LlamaCpp::load_with(m.path(), opts).unwrap();
    let batched = small.logits(&ids, 256).unwrap();
    let d_batch = max_abs_diff(&batched, &full);
    eprintln!("n_batch 17 vs 512: max |diff| {d_batch:e}");
    assert!(d_batch < 1e-3);
}

/// A 16k context allocates and computes the same logits for a short prefix as a small one,
/// and positions far past the first batch stay finite.
#[test]
fn long_context_is_supported() {
    let Some(m) = model() else { return };
    let ids = tokens(&m, 32);
    let small = m.logits(&ids, 64).unwrap();
    let big = m.logits(&ids, 16384).unwrap();
    let d = max_abs_diff(&small, &big);
    eprintln!("n_ctx 64 vs 16384: max |diff| {d:e}");
    assert!(d < 1e-3);

    // 1100 tokens: three batches of 512 in one context of 2048, streamed.
    let mut long = Vec::new();
    while long.len() < 1100 {
        long.extend(m.tokenize(TEXT, false));
    }
    long.truncate(1100);
    let t0 = Instant::now();
    let mut rows = 0;
    let mut all_finite = true;
    m.for_each_logits(&long, 2048, |pos, row| {
        assert_eq!(pos, rows);
        rows += 1;
        all_finite &= row.len() == m.n_vocab() && row.iter().all(|x| x.is_finite());
    })
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "llama.cpp logits: 1100 tokens in {secs:.2} s = {:.0} tokens/s",
        1100.0 / secs
    );
    assert_eq!(rows, 1100);
    assert!(all_finite);
}

#[test]
fn greedy_continuation_is_sensible() {
    let Some(m) = model() else { return };
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let mut ids = m.tokenize(prompt, false);
    // Special tokens in the text are parsed as single tokens.
    assert_eq!(m.detokenize(&ids[..1]), "<|im_start|>");
    let n_prompt = ids.len();
    for _ in 0..12 {
        let logits = m.logits(&ids, 512).unwrap();
        let last = &logits[(ids.len() - 1) * m.n_vocab()..];
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap() as u32;
        if m.is_eog(next) {
            break;
        }
        ids.push(next);
    }
    let answer = m.detokenize(&ids[n_prompt..]);
    eprintln!("greedy answer: {answer:?}");
    assert!(ids.len() > n_prompt, "no tokens generated");
    assert!(
        answer.contains("Paris"),
        "answer {answer:?} does not name Paris"
    );
}

#[test]
fn tokenizer_round_trips_plain_text() {
    let Some(m) = model() else { return };
    let ids = m.tokenize(TEXT, false);
    assert_eq!(m.detokenize(&ids), TEXT);
    let with_bos = m.tokenize("Hello", true);
    assert_eq!(with_bos[0], m.bos());
    assert_eq!(&with_bos[1..], &m.tokenize("Hello", false)[..]);
    assert_eq!(m.meta("general.architecture").as_deref(), Some("llama"));
    assert_eq!(m.n_ctx_train(), 8192);
}

#[test]
fn bad_input_is_a_typed_error() {
    let e = LlamaCpp::load(std::path::Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(matches!(e, RuntimeError::NotFound { .. }), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0 not really").unwrap();
    let e = LlamaCpp::load(&junk).unwrap_err();
    assert!(matches!(e, RuntimeError::Load { .. }), "{e}");
    assert!(e.to_string().contains("junk.gguf"), "{e}");

    let Some(m) = model() else { return };
    let e = m.logits(&[1, 2, 3], 2).unwrap_err();
    assert!(
        matches!(
            e,
            RuntimeError::ContextTooSmall {
                n_tokens: 3,
                n_ctx: 2,
                ..
            }
        ),
        "{e}"
    );
    let e = m.logits(&[], 16).unwrap_err();
    assert!(matches!(e, RuntimeError::NoTokens { .. }), "{e}");
    let e = m.logits(&[1, 49152], 16).unwrap_err();
    assert!(
        matches!(
            e,
            RuntimeError::TokenOutOfRange {
                token: 49152,
                pos: 1,
                ..
            }
        ),
        "{e}"
    );
}
