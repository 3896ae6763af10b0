//! `abf-eval ppl` against independent numbers: perplexity from an f64 log-softmax of
//! `Llama::forward` logits over windows cut by hand, a zero model whose perplexity is the
//! vocabulary size, and a GGUF's perplexity equal to its directory's.

mod common;

use std::path::Path;

use abf::checkpoint::Checkpoint;
use abf::eval::ppl::{band_edges, perplexity, token_nll, Bands};
use abf::eval::{windows, EvalError};
use abf::model::Llama;
use abf::runtime::open_model;
use candle_core::{DType, Device, Tensor};
use common::bin::{self, Bin, Run};
use common::data::kjv_answers;
use common::model::{Scales, TinyModel};
use common::svg::{check_svg, polylines, texts};
use common::tokenizer::shared_bpe;

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
    let dir = TinyModel::eval(shared_bpe())
        .seed(7)
        .write(&tmp.path().join("m"));
    let text = kjv_answers();
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
    let tok = shared_bpe();
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
    let zero = TinyModel::eval(shared_bpe())
        .scales(Scales::zero())
        .write(&tmp.path().join("zero"));
    let rand = TinyModel::eval(shared_bpe())
        .seed(3)
        .write(&tmp.path().join("rand"));
    let text_path = tmp.path().join("t.txt");
    std::fs::write(&text_path, kjv_answers()).unwrap();
    let plot = tmp.path().join("ppl.svg");
    let Run {
        code,
        stdout: out,
        stderr: err,
    } = bin::run(
        Bin::Eval,
        &[
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
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let vocab = shared_bpe().get_vocab_size(true) as f64;
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

/// `abf-eval ppl` on a GGUF (our candle reading, and llama.cpp with the `llamacpp` feature) gives
/// the perplexity of the model directory it was converted from: the fixture model, f32.
#[test]
fn ppl_of_a_gguf_equals_its_directory() {
    let model = common::data::kjv_tiny();
    let text = model.join("heldout-john.txt");
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("kjv.gguf");
    bin::run(
        Bin::Convert,
        &[
            "to-gguf",
            model.to_str().unwrap(),
            "-o",
            gguf.to_str().unwrap(),
            "--outtype",
            "f32",
        ],
    )
    .expect_code(0);
    let ppl = |path: &std::path::Path, backend: &str| -> Vec<f64> {
        let out = bin::output(
            Bin::Eval
                .command()
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
                ]),
        );
        let v = out.expect_code(0).json();
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
    let out = bin::output(
        Bin::Eval
            .command()
            .args(["ppl", "--model", model.to_str().unwrap(), "--text"])
            .arg(&text)
            .args(["--lengths", "128", "--backend", "llama.cpp"]),
    );
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("GGUF"));
}
