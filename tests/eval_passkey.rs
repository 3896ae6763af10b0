//! `abf-eval passkey`: prompts and scores checked by hand with oracle and uniform backends, and
//! the CLI's JSON and heatmap.

mod common;

use std::path::PathBuf;

use abf::eval::passkey::{self, build_trial, prompt_text, score, Trial};
use abf::eval::EvalError;
use abf::runtime::LogitsBackend;
use common::bin::{self, Bin, Run};
use common::model::TinyModel;
use common::svg::{check_svg, texts};
use common::tokenizer::shared_bpe;

// ---------------------------------------------------------------- passkey

/// Logits rows that know the sequence: the next token has logit 1, all else 0 (except where
/// `wrong_at` says to put the peak on another token).
struct Oracle {
    vocab: usize,
    wrong_at: Option<usize>,
}

impl LogitsBackend for Oracle {
    fn name(&self) -> &str {
        "oracle"
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn for_each_logits(
        &mut self,
        tokens: &[u32],
        f: &mut abf::runtime::RowFn,
    ) -> Result<(), abf::runtime::RuntimeError> {
        // The oracle is handed the sequence without its last token, so it needs the answer
        // from elsewhere: it peeks at the shared trial below.
        let full = TRIAL_TOKENS.with(|t| t.borrow().clone());
        for i in 0..tokens.len() {
            let mut row = vec![0f32; self.vocab];
            let next = full[i + 1] as usize;
            let peak = if self.wrong_at == Some(i + 1) {
                (next + 1) % self.vocab
            } else {
                next
            };
            row[peak] = 1.0;
            f(i, &row)?;
        }
        Ok(())
    }
}

/// All-zero logits: argmax is always token 0.
struct Uniform(usize);

impl LogitsBackend for Uniform {
    fn name(&self) -> &str {
        "uniform"
    }
    fn vocab_size(&self) -> usize {
        self.0
    }
    fn for_each_logits(
        &mut self,
        tokens: &[u32],
        f: &mut abf::runtime::RowFn,
    ) -> Result<(), abf::runtime::RuntimeError> {
        let row = vec![0f32; self.0];
        for i in 0..tokens.len() {
            f(i, &row)?;
        }
        Ok(())
    }
}

thread_local! {
    static TRIAL_TOKENS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn encoder() -> abf::runtime::Encoder {
    abf::runtime::Encoder {
        tokenizer: shared_bpe().clone(),
        bos: shared_bpe().token_to_id("<s>"),
        source: PathBuf::from("test tokenizer"),
    }
}

#[test]
fn passkey_prompt_is_the_longlora_text() {
    let want = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.\n\
The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n\
The pass key is 12345. Remember it. 12345 is the pass key.\n\
The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n\
What is the pass key? The pass key is";
    assert_eq!(prompt_text(12345, 1, 2), want);
    // Keys are five digits and reproducible from the seed.
    let k = passkey::keys(9, 50);
    assert!(k.iter().all(|&k| (10_000..=99_999).contains(&k)));
    assert_eq!(k, passkey::keys(9, 50));
    assert_ne!(k, passkey::keys(10, 50));
}

#[test]
fn passkey_trial_fills_the_length_and_places_the_key() {
    let enc = encoder();
    let tok = shared_bpe();
    let length = 600;
    for (depth, check) in [(0.0, 0u8), (0.5, 1), (1.0, 2)] {
        let t: Trial = build_trial(&enc, length, depth, 48213).unwrap();
        assert!(t.tokens.len() <= length);
        let units = t.prefix + t.suffix;
        assert!(units > 3, "{units} filler units");
        match check {
            0 => assert_eq!(t.prefix, 0),
            1 => assert_eq!(t.prefix, (units as f64 * 0.5).round() as usize),
            _ => assert_eq!(t.suffix, 0),
        }
        // The tokens are BOS + the prompt + " 48213", tokenized by hand here.
        let prompt = prompt_text(48213, t.prefix, t.suffix);
        let mut full = vec![tok.token_to_id("<s>").unwrap()];
        full.extend(
            tok.encode(format!("{prompt} 48213"), false)
                .unwrap()
                .get_ids(),
        );
        assert_eq!(t.tokens, full);
        let answer = tok.decode(&t.tokens[t.answer_start..], true).unwrap();
        assert_eq!(answer.trim(), "48213");
        // One more filler unit would not fit: the filler is as long as the length allows.
        let more = prompt_text(48213, t.prefix, t.suffix + 1);
        let n = 1 + tok.encode(format!("{more} 48213"), false).unwrap().len();
        assert!(n > length, "{n} tokens still fit in {length}");
    }
    match build_trial(&enc, 20, 0.5, 12345) {
        Err(EvalError::PasskeyTooShort { length: 20, need }) => assert!(need > 20),
        other => panic!("expected PasskeyTooShort, got {other:?}"),
    }
}

#[test]
fn passkey_scores_oracle_one_uniform_zero_and_one_wrong_digit_fails() {
    let enc = encoder();
    let vocab = shared_bpe().get_vocab_size(true);
    let trial = build_trial(&enc, 300, 0.25, 31415).unwrap();
    TRIAL_TOKENS.with(|t| *t.borrow_mut() = trial.tokens.clone());
    let answer = trial.tokens.len() - trial.answer_start;
    assert!(answer >= 1);

    let s = score(
        &mut Oracle {
            vocab,
            wrong_at: None,
        },
        &trial,
    )
    .unwrap();
    assert_eq!(
        (s.correct, s.matched, s.answer_tokens),
        (true, answer, answer)
    );

    // Wrong only at the last answer token: not correct, every other answer token matched.
    let last = trial.tokens.len() - 1;
    let s = score(
        &mut Oracle {
            vocab,
            wrong_at: Some(last),
        },
        &trial,
    )
    .unwrap();
    assert_eq!((s.correct, s.matched), (false, answer - 1));
    // Wrong before the answer only: still correct (only answer positions count).
    let s = score(
        &mut Oracle {
            vocab,
            wrong_at: Some(trial.answer_start - 1),
        },
        &trial,
    )
    .unwrap();
    assert!(s.correct);

    // Token 0 is the special <s>, never part of an answer: a uniform model scores 0.
    assert_eq!(shared_bpe().id_to_token(0).as_deref(), Some("<s>"));
    let cells = passkey::evaluate(
        &mut Uniform(vocab),
        &enc,
        &[250, 300],
        &[0.0, 1.0],
        3,
        1,
        &mut || {},
    )
    .unwrap();
    assert_eq!(cells.len(), 4);
    assert!(cells.iter().all(|c| c.accuracy == 0.0 && c.trials == 3));
}

#[test]
fn passkey_cli_writes_json_and_a_heatmap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinyModel::eval(shared_bpe())
        .seed(5)
        .write(&tmp.path().join("m"));
    let plot = tmp.path().join("pk.svg");
    let Run {
        code,
        stdout: out,
        stderr: err,
    } = bin::run(
        Bin::Eval,
        &[
            "passkey",
            "--model",
            dir.to_str().unwrap(),
            "--lengths",
            "256,384",
            "--depths",
            "0,1",
            "--trials",
            "2",
            "--plot",
            plot.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cells = v["models"][0]["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 4);
    for c in cells {
        assert!(c["tokens"].as_u64().unwrap() <= c["length"].as_u64().unwrap());
        let acc = c["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    check_svg(&svg, &plot);
    let t = texts(&svg);
    for want in [
        "context length (tokens)",
        "depth of the key",
        "256",
        "384",
        "accuracy 1",
    ] {
        assert!(t.iter().any(|x| x == want), "no text {want:?} in {t:?}");
    }
    assert!(t
        .iter()
        .any(|x| x.starts_with("Passkey retrieval accuracy")));
    // 2 x 2 cells plus 3 legend swatches plus the background.
    assert!(
        svg.matches("<rect").count() >= 8,
        "4 cells, 3 swatches, background"
    );
}
