//! `abf-eval ppl`, `passkey`, `entropy` and their plots, against independent numbers:
//! perplexity from an f64 log-softmax of `Llama::forward` logits over windows cut by hand, a
//! zero model whose perplexity is the vocabulary size, passkey prompts and scores checked by
//! hand with oracle and uniform backends, uniform attention whose entropy is ln n, SVGs read
//! by a tag-balance check (and Python's XML parser when present), and CLI errors (exit 2).

mod train_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use abf::checkpoint::Checkpoint;
use abf::eval::passkey::{self, build_trial, prompt_text, score, Trial};
use abf::eval::plot::{heatmap, line_plot, Heatmap, LinePlot, Series};
use abf::eval::ppl::{band_edges, perplexity, token_nll, Bands};
use abf::eval::{windows, EvalError};
use abf::model::Llama;
use abf::runtime::{open_model, LogitsBackend, RowFn, RuntimeError};
use candle_core::{DType, Device, Tensor};
use tokenizers::Tokenizer;

const HIDDEN: usize = 32;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;

/// The BPE tokenizer of tests/train_support, trained once per process.
fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| train_support::train_tokenizer(300))
}

/// Public-domain text (the KJV fixture's answers), long enough for a few windows.
fn text() -> String {
    let raw = std::fs::read_to_string(train_support::fixture()).unwrap();
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

/// How the tiny model's weights are made.
#[derive(Clone, Copy, PartialEq)]
enum Weights {
    Random(u64),
    /// Every weight zero (norm gains one): all logits are zero.
    Zero,
    /// Random, but q and k projections zero: every attention row is uniform.
    ZeroQk(u64),
}

/// Write a tiny LLaMA (2 layers, hidden 32, context 16) with the shared tokenizer; BOS is added
/// (`add_bos_token: true`) so that windows start with it.
fn write_model(dir: &Path, weights: Weights) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let tok = tokenizer();
    train_support::save_tokenizer(tok, dir);
    let vocab = tok.get_vocab_size(true);
    let hd = HIDDEN / HEADS;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": 64,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 16, "tie_word_embeddings": false, "torch_dtype": "float32",
        "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id("</s>"),
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let tc = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let seed = match weights {
        Weights::Random(s) | Weights::ZeroQk(s) => s,
        Weights::Zero => 0,
    };
    let mut rng = abf::train::data::SplitMix64(seed);
    let mut rand = |name: &str, shape: &[usize], s: f64| {
        let n: usize = shape.iter().product();
        let zero = weights == Weights::Zero
            || (weights == Weights::ZeroQk(seed)
                && (name.contains("q_proj") || name.contains("k_proj")));
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let r = ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * s;
                if zero {
                    0.0
                } else {
                    r as f32
                }
            })
            .collect();
        (
            name.to_string(),
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
        )
    };
    let ones = |name: &str| {
        (
            name.to_string(),
            Tensor::ones(HIDDEN, DType::F32, &Device::Cpu).unwrap(),
        )
    };
    let mut w = vec![
        rand("model.embed_tokens.weight", &[vocab, HIDDEN], 1.0),
        rand("lm_head.weight", &[vocab, HIDDEN], 0.5),
        ones("model.norm.weight"),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        w.push(ones(&format!("{p}.input_layernorm.weight")));
        w.push(ones(&format!("{p}.post_attention_layernorm.weight")));
        for (n, shape) in [
            ("self_attn.q_proj", [HEADS * hd, HIDDEN]),
            ("self_attn.k_proj", [KV_HEADS * hd, HIDDEN]),
            ("self_attn.v_proj", [KV_HEADS * hd, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HEADS * hd]),
            ("mlp.gate_proj", [64, HIDDEN]),
            ("mlp.up_proj", [64, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, 64]),
        ] {
            w.push(rand(&format!("{p}.{n}.weight"), &shape, 0.4));
        }
    }
    let map: std::collections::HashMap<String, Tensor> = w.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

fn eval_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_abf-eval"))
        .args(args)
        .output()
        .expect("run abf-eval");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1.0)
}

// ---------------------------------------------------------------- perplexity

#[test]
fn band_edges_and_windows_by_hand() {
    let d = Bands::Doubling { window: 128 };
    assert_eq!(
        band_edges(1024, d),
        vec![(0, 128), (128, 256), (256, 512), (512, 1024)]
    );
    assert_eq!(band_edges(100, d), vec![(0, 100)]);
    assert_eq!(band_edges(128, d), vec![(0, 128)]);
    assert_eq!(band_edges(300, d), vec![(0, 128), (128, 256), (256, 300)]);
    assert_eq!(
        band_edges(10, Bands::Equal(3)),
        vec![(0, 3), (3, 6), (6, 10)]
    );
    assert_eq!(band_edges(3, Bands::Equal(5)), vec![(0, 1), (1, 2), (2, 3)]);

    let ids: Vec<u32> = (0..10).collect();
    let p = Path::new("t.txt");
    assert_eq!(
        windows(&ids, 4, 5, Some(99), p).unwrap(),
        vec![vec![99, 0, 1, 2], vec![99, 3, 4, 5], vec![99, 6, 7, 8]]
    );
    assert_eq!(
        windows(&ids, 4, 2, None, p).unwrap(),
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
    );
    match windows(&ids, 12, 1, Some(99), p) {
        Err(EvalError::TextTooShort {
            have: 10, need: 11, ..
        }) => {}
        other => panic!("expected TextTooShort, got {other:?}"),
    }
    // log-sum-exp in f64: ln(e^1 + e^2 + e^3) - 2.
    let nll = token_nll(&[1.0, 2.0, 3.0], 1);
    let want = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 2.0;
    assert!((nll - want).abs() < 1e-12, "{nll} vs {want}");
}

#[test]
fn ppl_matches_f64_log_softmax_of_the_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(&tmp.path().join("m"), Weights::Random(7));
    let text = text();
    let (length, max_windows) = (24usize, 3usize);

    // Library path: the opener, the encoder (BOS), windows, the streaming backend.
    let mut m = open_model(
        &dir,
        abf::runtime::BackendKind::Candle,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ids = m.encoder.encode_plain(&text).unwrap();
    let w = windows(&ids, length, max_windows, m.encoder.bos, Path::new("x")).unwrap();
    let edges = band_edges(length, Bands::Equal(3));
    let got = perplexity(m.backend.as_mut(), &w, &edges, &mut || {}).unwrap();

    // Independent path: tokenize with the tokenizer itself, cut windows by hand with BOS,
    // `Llama::forward` logits, log-softmax in f64 written out here.
    let tok = tokenizer();
    let bos = tok.token_to_id("<s>").unwrap();
    let plain = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = Llama::load(
        ckpt.var_builder(DType::F32, &Device::Cpu),
        &ckpt.config.model,
    )
    .unwrap();
    let mut band = [(0usize, 0f64); 3];
    for k in 0..max_windows {
        let mut win = vec![bos];
        win.extend_from_slice(&plain[k * (length - 1)..(k + 1) * (length - 1)]);
        assert_eq!(win, w[k], "window {k}");
        let input = Tensor::new(win.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = model
            .forward(&input, 0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for t in 1..length {
            let row = &logits[t - 1];
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            let nll = lse - row[win[t] as usize] as f64;
            // Bands by hand: [0, 8), [8, 16), [16, 24).
            band[t / 8].0 += 1;
            band[t / 8].1 += nll;
        }
    }
    let total: f64 = band.iter().map(|b| b.1).sum();
    let n: usize = band.iter().map(|b| b.0).sum();
    assert_eq!(got.tokens, n);
    assert_eq!(got.tokens, max_windows * (length - 1));
    let want = (total / n as f64).exp();
    assert!(close(got.ppl, want, 1e-5), "ppl {} vs {want}", got.ppl);
    assert_eq!(got.bands.len(), 3);
    for (b, (cnt, sum)) in got.bands.iter().zip(band) {
        assert_eq!(b.tokens, cnt);
        let want = (sum / cnt as f64).exp();
        assert!(close(b.ppl, want, 1e-5), "band {b:?} vs {want}");
    }
    // A random model is far from perfect and from uniform: the comparison is not vacuous.
    assert!(got.ppl > 1.5 && (got.ppl - m.backend.vocab_size() as f64).abs() > 1.0);
}

#[test]
fn zero_model_ppl_is_the_vocabulary_size_and_the_plot_is_drawn() {
    let tmp = tempfile::tempdir().unwrap();
    let zero = write_model(&tmp.path().join("zero"), Weights::Zero);
    let rand = write_model(&tmp.path().join("rand"), Weights::Random(3));
    let text_path = tmp.path().join("t.txt");
    std::fs::write(&text_path, text()).unwrap();
    let plot = tmp.path().join("ppl.svg");
    let (code, out, err) = eval_cli(&[
        "ppl",
        "--model",
        zero.to_str().unwrap(),
        "--model",
        rand.to_str().unwrap(),
        "--label",
        "zero",
        "--label",
        "random",
        "--text",
        text_path.to_str().unwrap(),
        "--lengths",
        "8,16,32",
        "--windows",
        "2",
        "--plot",
        plot.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let vocab = tokenizer().get_vocab_size(true) as f64;
    let zero_lengths = v["models"][0]["lengths"].as_array().unwrap();
    assert_eq!(zero_lengths.len(), 3);
    for l in zero_lengths {
        // All-zero logits: p = 1/V for every token, so ppl = V exactly (up to f64 rounding).
        let ppl = l["ppl"].as_f64().unwrap();
        assert!((ppl - vocab).abs() < 1e-9 * vocab, "{ppl} vs {vocab}");
        for b in l["bands"].as_array().unwrap() {
            assert!((b["ppl"].as_f64().unwrap() - vocab).abs() < 1e-9 * vocab);
        }
    }
    // Doubling bands from the config's c = 16: length 32 has [0,16) and [16,32).
    let bands32 = &zero_lengths[2]["bands"];
    assert_eq!(bands32[0]["end"], 16);
    assert_eq!(bands32[1]["start"], 16);
    assert_eq!(
        bands32[0]["tokens"].as_u64().unwrap() + bands32[1]["tokens"].as_u64().unwrap(),
        2 * 31
    );
    assert_eq!(v["models"][1]["label"], "random");
    let svg = std::fs::read_to_string(&plot).unwrap();
    check_svg(&svg, &plot);
    for want in [
        "Perplexity against context length",
        "context length (tokens)",
        "perplexity",
        "zero",
        "random",
    ] {
        assert!(texts(&svg).iter().any(|t| t == want), "no text {want:?}");
    }
    // One polyline per model in the plot with a point per length (plus the legend's).
    let lines = polylines(&svg);
    assert_eq!(lines.iter().filter(|p| *p == &3).count(), 2, "{lines:?}");
}

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
    fn for_each_logits(&mut self, tokens: &[u32], f: &mut RowFn) -> Result<(), RuntimeError> {
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
    fn for_each_logits(&mut self, tokens: &[u32], f: &mut RowFn) -> Result<(), RuntimeError> {
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
        tokenizer: tokenizer().clone(),
        bos: tokenizer().token_to_id("<s>"),
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
    let tok = tokenizer();
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
    let vocab = tokenizer().get_vocab_size(true);
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
    assert_eq!(tokenizer().id_to_token(0).as_deref(), Some("<s>"));
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
    let dir = write_model(&tmp.path().join("m"), Weights::Random(5));
    let plot = tmp.path().join("pk.svg");
    let (code, out, err) = eval_cli(&[
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
    ]);
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

// ---------------------------------------------------------------- entropy

#[test]
fn uniform_attention_has_entropy_ln_n_at_every_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(&tmp.path().join("qk0"), Weights::ZeroQk(11));
    let text_path = tmp.path().join("t.txt");
    std::fs::write(&text_path, text()).unwrap();
    let plot = tmp.path().join("ent.svg");
    let (code, out, err) = eval_cli(&[
        "entropy",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        text_path.to_str().unwrap(),
        "--positions",
        "0,1,5,17,40",
        "--windows",
        "2",
        "--plot",
        plot.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["entropy"];
    assert_eq!(e["length"], 41);
    assert_eq!(e["windows"], 2);
    let layers = e["layers"].as_array().unwrap();
    assert_eq!(layers.len(), LAYERS);
    for row in layers {
        for (k, p) in [0usize, 1, 5, 17, 40].iter().enumerate() {
            let h = row[k].as_f64().unwrap();
            let want = ((p + 1) as f64).ln();
            assert!((h - want).abs() < 1e-5, "H {h} vs ln {} = {want}", p + 1);
            assert!((e["uniform"][k].as_f64().unwrap() - want).abs() < 1e-12);
        }
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    check_svg(&svg, &plot);
    let t = texts(&svg);
    for want in [
        "layer 0",
        "layer 1",
        "uniform ln n",
        "attention entropy (nats)",
    ] {
        assert!(t.iter().any(|x| x == want), "no text {want:?}");
    }

    // A random model attends non-uniformly: below ln n past the first position, 0 at it.
    let dir = write_model(&tmp.path().join("r"), Weights::Random(11));
    let (code, out, err) = eval_cli(&[
        "entropy",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        text_path.to_str().unwrap(),
        "--positions",
        "0,30",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for row in v["entropy"]["layers"].as_array().unwrap() {
        assert!(row[0].as_f64().unwrap().abs() < 1e-6);
        let h = row[1].as_f64().unwrap();
        assert!(h > 0.0 && h < 31f64.ln() - 1e-3, "{h}");
    }
}

// ---------------------------------------------------------------- plots

/// Every `<tag ...>` closed in order (self-closing `/>` counted), one `<svg>` root; and, when
/// Python is present, its XML parser accepts the file.
fn check_svg(svg: &str, path: &Path) {
    assert!(
        svg.starts_with("<svg"),
        "not an SVG: {}",
        &svg[..40.min(svg.len())]
    );
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(i) = rest.find('<') {
        let end = rest[i..].find('>').expect("unclosed tag") + i;
        let tag = &rest[i + 1..end];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "bad nesting");
        } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
            let name = tag.split_whitespace().next().unwrap().to_string();
            stack.push(name);
        }
        rest = &rest[end + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    let py = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as E; E.parse(sys.argv[1])",
        ])
        .arg(path)
        .status();
    if let Ok(status) = py {
        assert!(
            status.success(),
            "python's XML parser rejects {}",
            path.display()
        );
    }
}

/// The text content of every `<text>` element, trimmed.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|s| {
            let start = s.find('>')? + 1;
            let end = s.find("</text>")?;
            Some(s[start..end].trim().to_string())
        })
        .collect()
}

/// The number of points of every `<polyline>`.
fn polylines(svg: &str) -> Vec<usize> {
    svg.split("<polyline")
        .skip(1)
        .filter_map(|s| {
            let p = s.find("points=\"")? + 8;
            let e = s[p..].find('"')? + p;
            Some(s[p..e].split_whitespace().count())
        })
        .collect()
}

#[test]
fn plots_are_well_formed_with_title_axes_and_legend() {
    let tmp = tempfile::tempdir().unwrap();
    let plot = LinePlot {
        title: "T & <title>".into(),
        x_label: "x axis".into(),
        y_label: "y axis".into(),
        log2_x: true,
        series: vec![
            Series {
                label: "alpha".into(),
                points: vec![(128.0, 3.0), (256.0, 2.5), (512.0, f64::NAN), (1024.0, 4.0)],
                dashed: false,
            },
            Series {
                label: "beta".into(),
                points: vec![(128.0, 1.0), (1024.0, 2.0)],
                dashed: true,
            },
        ],
    };
    let svg = line_plot(&plot).unwrap();
    let path = tmp.path().join("l.svg");
    std::fs::write(&path, &svg).unwrap();
    check_svg(&svg, &path);
    let t = texts(&svg);
    for want in [
        "x axis", "y axis", "alpha", "beta", "legend", "128", "256", "1024",
    ] {
        assert!(t.iter().any(|x| x == want), "no text {want:?} in {t:?}");
    }
    // The title is escaped, not raw markup.
    assert!(t.iter().any(|x| x == "T &amp; &lt;title&gt;"), "{t:?}");
    // alpha: one polyline of its 3 finite points.
    assert!(polylines(&svg).contains(&3));

    let map = Heatmap {
        title: "H".into(),
        x_label: "len".into(),
        y_label: "depth".into(),
        cols: vec!["a".into(), "b".into(), "c".into()],
        rows: vec!["r0".into(), "r1".into()],
        values: vec![vec![0.0, 0.5, 1.0], vec![1.0, 0.25, 0.0]],
    };
    let svg = heatmap(&map).unwrap();
    let path = tmp.path().join("h.svg");
    std::fs::write(&path, &svg).unwrap();
    check_svg(&svg, &path);
    let t = texts(&svg);
    for want in ["H", "len", "depth", "a", "c", "r1", "0.25", "accuracy 0.5"] {
        assert!(t.iter().any(|x| x == want), "no text {want:?} in {t:?}");
    }
    assert!(svg.matches("<rect").count() >= 6 + 3);
}

// ---------------------------------------------------------------- errors

#[test]
fn cli_errors_name_the_input_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model(&tmp.path().join("m"), Weights::Random(1));
    let d = dir.to_str().unwrap();
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "In the beginning.").unwrap();
    let s = short.to_str().unwrap();
    let gguf = tmp.path().join("x.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    let missing = tmp.path().join("nope.txt");
    let m = missing.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["ppl", "--model", d, "--text", m, "--lengths", "8"],
            "nope.txt",
        ),
        (
            vec!["ppl", "--model", d, "--text", s, "--lengths", "64"],
            "short.txt",
        ),
        (
            vec![
                "ppl",
                "--model",
                gguf.to_str().unwrap(),
                "--text",
                s,
                "--lengths",
                "8",
            ],
            "x.gguf",
        ),
        (
            vec![
                "ppl",
                "--model",
                "/no/such/dir",
                "--text",
                s,
                "--lengths",
                "2",
            ],
            "/no/such/dir",
        ),
        (
            vec![
                "ppl",
                "--model",
                d,
                "--text",
                s,
                "--lengths",
                "2",
                "--plot",
                "p.png",
            ],
            "p.png",
        ),
        (
            vec![
                "ppl",
                "--model",
                d,
                "--label",
                "a",
                "--label",
                "b",
                "--text",
                s,
                "--lengths",
                "2",
            ],
            "--label",
        ),
        (
            vec!["ppl", "--model", d, "--text", s, "--lengths", "1"],
            "--lengths",
        ),
        (
            vec![
                "passkey",
                "--model",
                d,
                "--lengths",
                "64",
                "--depths",
                "1.5",
            ],
            "--depths",
        ),
        (
            vec!["passkey", "--model", d, "--lengths", "10"],
            "too short",
        ),
        (
            vec![
                "entropy",
                "--model",
                d,
                "--text",
                s,
                "--positions",
                "9",
                "--length",
                "5",
            ],
            "--positions",
        ),
        (
            vec!["entropy", "--model", d, "--text", s, "--positions", "200"],
            "short.txt",
        ),
        (vec!["ppl", "--model", d, "--text", s], "--lengths"),
    ];
    for (args, want) in cases {
        let (code, out, err) = eval_cli(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed {out}");
        assert!(err.contains(want), "{args:?}: {want:?} not in {err}");
    }
}

/// `abf-eval ppl` on a GGUF (our candle reading, and llama.cpp with the `llamacpp` feature) gives
/// the perplexity of the model directory it was converted from: the fixture model, f32.
#[test]
fn ppl_of_a_gguf_equals_its_directory() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("fixtures/kjv-tiny");
    let text = model.join("heldout-john.txt");
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("kjv.gguf");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_abf-convert"))
        .args([
            "to-gguf",
            model.to_str().unwrap(),
            "-o",
            gguf.to_str().unwrap(),
        ])
        .args(["--outtype", "f32"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ppl = |path: &std::path::Path, backend: &str| -> Vec<f64> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_abf-eval"))
            .args(["ppl", "--model", path.to_str().unwrap(), "--text"])
            .arg(&text)
            .args([
                "--lengths",
                "128,256",
                "--windows",
                "2",
                "--json",
                "--backend",
                backend,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["models"][0]["lengths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ppl"].as_f64().unwrap())
            .collect()
    };
    let want = ppl(&model, "candle");
    assert!(want.iter().all(|p| p.is_finite() && *p > 1.0), "{want:?}");
    let mut backends = vec!["candle"];
    if cfg!(feature = "llamacpp") {
        backends.push("llama.cpp");
    }
    for b in backends {
        let got = ppl(&gguf, b);
        for (g, w) in got.iter().zip(&want) {
            assert!((g / w - 1.0).abs() < 1e-4, "{b}: {got:?} vs {want:?}");
        }
    }
    // a model directory cannot run on llama.cpp: a clear error, exit 2
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_abf-eval"))
        .args(["ppl", "--model", model.to_str().unwrap(), "--text"])
        .arg(&text)
        .args(["--lengths", "128", "--backend", "llama.cpp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GGUF"));
}
