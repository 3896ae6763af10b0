//! to-gguf / from-gguf: tensor round trips, the q/k permutation against an independent
//! formula, recipes through the GGUF keys, the tokenizer round trip on the real SmolLM2 GGUF,
//! and the CLI.

mod common;

use std::path::Path;

use abf::checkpoint::{Checkpoint, SafetensorStore, TensorDtype};
use abf::cli::{RecipeArgs, ScaleLawArg};
use abf::convert::quant_plan::OutType;
use abf::convert::tokenizer_gguf::{vocab_from_dir, GgufVocab};
use abf::convert::{
    from_gguf, permute_qk, plan_to_gguf, unpermute_qk, write_gguf, FromGgufOptions, ToGgufOptions,
};
use abf::gguf::{open_mmap, GgufFile, Value, ValueType};
use abf::rope::{Recipe, RopeMethod};
use candle_core::{Device, Tensor};
use common::bin::{self, Bin};
use common::model::TinyModel;
use serde_json::json;

fn to_gguf(dir: &Path, out: &Path, opts: &ToGgufOptions) -> abf::convert::Plan {
    let ckpt = Checkpoint::open(dir).unwrap();
    let plan = plan_to_gguf(&ckpt, opts).unwrap();
    write_gguf(&ckpt, &plan, out, true, &|_, _| {}).unwrap();
    plan
}

fn f32_opts() -> ToGgufOptions {
    ToGgufOptions {
        outtype: OutType::F32,
        ..ToGgufOptions::default()
    }
}

#[test]
fn permutation_matches_reshape_swapaxes() {
    // llama.cpp's converter: w.reshape(n_head, 2, d/2, hidden).swapaxes(1, 2).reshape(w.shape),
    // evaluated here with candle as a second implementation
    for (heads, d, hidden) in [(4usize, 8usize, 5usize), (3, 64, 2), (1, 2, 3)] {
        let rows = heads * d;
        let vals: Vec<f32> = (0..rows * hidden).map(|i| i as f32).collect();
        let w = Tensor::from_vec(vals.clone(), (rows, hidden), &Device::Cpu).unwrap();
        let expected: Vec<f32> = w
            .reshape((heads, 2, d / 2, hidden))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, hidden))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let bytes: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        let p = permute_qk("w", &bytes, rows, heads).unwrap();
        let got: Vec<f32> = p
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, expected, "heads {heads} d {d}");
        // a permutation that is not the identity (except d = 2), and its inverse undoes it
        if d > 2 {
            assert_ne!(p, bytes);
        }
        assert_eq!(unpermute_qk("w", &p, rows, heads).unwrap(), bytes);
    }
    assert!(permute_qk("w", &[0u8; 12], 3, 2).is_err());
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let sa = SafetensorStore::open(a).unwrap();
    let sb = SafetensorStore::open(b).unwrap();
    let mut na: Vec<&str> = sa.names().collect();
    let mut nb: Vec<&str> = sb.names().collect();
    na.sort();
    nb.sort();
    assert_eq!(na, nb);
    for n in na {
        let (x, y) = (sa.tensor_view(n).unwrap(), sb.tensor_view(n).unwrap());
        assert_eq!(x.shape, y.shape, "{n}");
        assert_eq!(x.dtype, y.dtype, "{n}");
        assert!(x.data == y.data, "tensor {n} differs");
    }
}

#[test]
fn f32_round_trip_is_identical_tied_and_untied() {
    for tied in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        TinyModel::new().tied(tied).seed(7).write(&src);
        let gguf = tmp.path().join("m.gguf");
        let plan = to_gguf(&src, &gguf, &f32_opts());
        // the GGUF as llama.cpp expects it
        let m = open_mmap(&gguf).unwrap();
        let f = &m.file;
        assert_eq!(f.tensor("output.weight").is_some(), !tied);
        assert_eq!(
            f.tensor("blk.1.attn_k.weight").unwrap().dims,
            vec![64, 32],
            "GGUF dims are [in, out]"
        );
        // q really permuted: its bytes differ from the checkpoint's
        let store = SafetensorStore::open(&src).unwrap();
        let i = f
            .tensors
            .iter()
            .position(|t| t.name == "blk.0.attn_q.weight")
            .unwrap();
        let hf = store
            .tensor_view("model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        assert!(f.tensor_bytes(m.bytes(), i).unwrap() != hf.data);
        let meta = &f.metadata;
        for (k, ty) in [
            ("llama.context_length", ValueType::U32),
            ("llama.embedding_length", ValueType::U32),
            ("llama.block_count", ValueType::U32),
            ("llama.feed_forward_length", ValueType::U32),
            ("llama.attention.head_count", ValueType::U32),
            ("llama.attention.head_count_kv", ValueType::U32),
            ("llama.rope.dimension_count", ValueType::U32),
            ("llama.vocab_size", ValueType::U32),
            ("llama.rope.freq_base", ValueType::F32),
            ("llama.attention.layer_norm_rms_epsilon", ValueType::F32),
            ("general.file_type", ValueType::U32),
            ("general.quantization_version", ValueType::U32),
            ("general.alignment", ValueType::U32),
            ("tokenizer.ggml.model", ValueType::String),
            ("tokenizer.ggml.pre", ValueType::String),
        ] {
            assert_eq!(meta.get(k).map(|v| v.value_type()), Some(ty), "{k}");
        }
        assert_eq!(meta.get("general.file_type"), Some(&Value::U32(0)));
        assert_eq!(meta.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
        assert_eq!(plan.tensors.len(), f.tensors.len());
        drop(m);
        let back = tmp.path().join("back");
        let r = from_gguf(&gguf, &back, &FromGgufOptions::default()).unwrap();
        assert_eq!(r.tied_embeddings, tied);
        assert_same_tensors(&src, &back);
        let cfg = Checkpoint::open(&back).unwrap().config.model;
        assert_eq!(cfg.tie_word_embeddings, tied);
        assert_eq!(cfg.vocab_size, 272);
        assert_eq!(cfg.num_key_value_heads, 2);
    }
}

#[test]
fn f16_output_rounds_like_half() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().seed(3).write(&src);
    let gguf = tmp.path().join("m.gguf");
    to_gguf(&src, &gguf, &ToGgufOptions::default());
    let back = tmp.path().join("back");
    from_gguf(
        &gguf,
        &back,
        &FromGgufOptions {
            dtype: TensorDtype::F32,
            force: false,
        },
    )
    .unwrap();
    let a = SafetensorStore::open(&src).unwrap();
    let b = SafetensorStore::open(&back).unwrap();
    for n in [
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ] {
        let x = a.tensor_view(n).unwrap();
        let y = b.tensor_view(n).unwrap();
        for (cx, cy) in x.data.chunks_exact(4).zip(y.data.chunks_exact(4)) {
            let vx = f32::from_le_bytes(cx.try_into().unwrap());
            let vy = f32::from_le_bytes(cy.try_into().unwrap());
            assert_eq!(half::f16::from_f32(vx).to_f32(), vy, "{n}");
        }
    }
    // norms stay f32: bit-identical
    let n = "model.layers.0.input_layernorm.weight";
    assert!(a.tensor_view(n).unwrap().data == b.tensor_view(n).unwrap().data);
}

fn args(method: &str) -> RecipeArgs {
    RecipeArgs {
        method: Some(method.parse().unwrap()),
        ..RecipeArgs::default()
    }
}

/// The recipe the command line resolves from `flags` over the checkpoint's own.
fn over(dir: &Path, flags: &RecipeArgs) -> Option<Recipe> {
    let current = Checkpoint::open(dir).unwrap().config.model.recipe;
    Some(flags.resolve_over(&current).unwrap())
}

fn convert_recipe(src: &Path, tmp: &Path, opts: &ToGgufOptions) -> (Recipe, Recipe) {
    let gguf = tmp.join("r.gguf");
    let plan = to_gguf(src, &gguf, opts);
    let back = tmp.join("rback");
    let r = from_gguf(
        &gguf,
        &back,
        &FromGgufOptions {
            force: true,
            ..FromGgufOptions::default()
        },
    )
    .unwrap();
    // config.json's block is what the model reads
    let cfg = Checkpoint::open(&back).unwrap().config.model.recipe;
    assert_eq!(cfg, r.recipe);
    (plan.recipe, r.recipe)
}

#[test]
fn every_method_round_trips_exactly_with_exact_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().seed(11).write(&src);
    let mut methods: Vec<RecipeArgs> = RopeMethod::ALL.iter().map(|m| args(m.name())).collect();
    methods.push(RecipeArgs {
        method: Some(RopeMethod::Abf),
        scale_law: Some(ScaleLawArg::Step),
        ..RecipeArgs::default()
    });
    for a in methods {
        let opts = ToGgufOptions {
            outtype: OutType::F32,
            runtime: abf::rope::Target::Exact,
            recipe: over(&src, &a),
            allow_approximate: true,
            ..ToGgufOptions::default()
        };
        let (written, read) = convert_recipe(&src, tmp.path(), &opts);
        assert_eq!(written, read, "{a:?}");
        assert_eq!(Some(written.method), a.method, "{a:?}");
    }
}

#[test]
fn llama_cpp_keys_carry_what_llama_cpp_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().seed(13).write(&src);
    let d = 16;
    let step = RecipeArgs {
        method: Some(RopeMethod::Abf),
        scale_law: Some(ScaleLawArg::Step),
        ..RecipeArgs::default()
    };
    for a in [
        args("default"),
        args("linear"),
        args("ntk"),
        args("yarn"),
        args("ntk-by-parts"),
        args("abf"),
        step,
    ] {
        let opts = ToGgufOptions {
            outtype: OutType::F32,
            recipe: over(&src, &a),
            ..ToGgufOptions::default()
        };
        let (w, r) = convert_recipe(&src, tmp.path(), &opts);
        // the same frequencies, attention factor and logit scales (ntk comes back as its base)
        let (fw, fr) = (w.inv_freq(d, None), r.inv_freq(d, None));
        for (x, y) in fw.iter().zip(&fr) {
            assert!((x - y).abs() <= 1e-6 * x.abs(), "{a:?}: {x} vs {y}");
        }
        assert!(
            (w.attention_factor() - r.attention_factor()).abs() < 1e-6,
            "{a:?}"
        );
        for p in [0u64, 63, 64, 200, 255] {
            assert!(
                (w.logit_scale(1, p) - r.logit_scale(1, p)).abs() < 1e-6,
                "{a:?} p {p}"
            );
        }
        assert_eq!(w.context, r.context);
    }
    // refusals: the log law without --allow-approximate, dynamic NTK
    for a in [args("eabf"), args("dynamic")] {
        let ckpt = Checkpoint::open(&src).unwrap();
        let opts = ToGgufOptions {
            recipe: over(&src, &a),
            ..ToGgufOptions::default()
        };
        assert!(plan_to_gguf(&ckpt, &opts).is_err());
    }
}

#[test]
fn step_law_relabels_to_mistral3_and_llama3_writes_rope_freqs() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().seed(5).write(&src);
    let ckpt = Checkpoint::open(&src).unwrap();
    let opts = ToGgufOptions {
        recipe: over(
            &src,
            &RecipeArgs {
                method: Some(RopeMethod::Abf),
                scale_law: Some(ScaleLawArg::Step),
                ..RecipeArgs::default()
            },
        ),
        ..ToGgufOptions::default()
    };
    let plan = plan_to_gguf(&ckpt, &opts).unwrap();
    let m = &plan.metadata;
    assert_eq!(m.architecture().unwrap(), Some("mistral3"));
    let beta = 1.0 / (64f64).ln();
    assert_eq!(
        m.get("mistral3.attention.temperature_scale"),
        Some(&Value::F32(beta as f32))
    );
    assert_eq!(
        m.get("mistral3.rope.scaling.original_context_length"),
        Some(&Value::U32(64))
    );
    assert!(m.keys().all(|k| !k.starts_with("llama.")));

    let opts = ToGgufOptions {
        recipe: over(&src, &args("llama3")),
        ..ToGgufOptions::default()
    };
    let plan = plan_to_gguf(&ckpt, &opts).unwrap();
    let f = plan.rope_freqs.clone().unwrap();
    assert_eq!(f.len(), 8);
    // llama.cpp's converter (LlamaModel.generate_extra_tensors), evaluated independently
    let (base, c, s, lo, hi) = (10000f64, 64f64, 4f64, 1f64, 4f64);
    for (i, got) in f.iter().enumerate() {
        let freq = 1.0 / base.powf(2.0 * i as f64 / 16.0);
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let want = if wavelen < c / hi {
            1.0
        } else if wavelen > c / lo {
            s
        } else {
            let smooth = (c / wavelen - lo) / (hi - lo);
            1.0 / ((1.0 - smooth) / s + smooth)
        };
        assert!(
            (*got as f64 - want).abs() < 1e-5 * want,
            "{i}: {got} vs {want}"
        );
    }
    assert_eq!(plan.tensors[0].name, "rope_freqs.weight");
    assert!(plan.metadata.get("llama.rope.scaling.type").is_none());
}

#[test]
fn quant_plan_for_q4_k_m_follows_llama_cpp() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // rows of 256 so k-quants apply; 8 layers so use_more_bits picks 0, 7 and (i-1)%3==2: 3, 6
    TinyModel::new()
        .hidden(256)
        .inter(512)
        .layers(8)
        .heads(4)
        .kv_heads(1)
        .seed(1)
        .write(&src);
    let ckpt = Checkpoint::open(&src).unwrap();
    let opts = ToGgufOptions {
        outtype: OutType::Q4KM,
        ..ToGgufOptions::default()
    };
    let plan = plan_to_gguf(&ckpt, &opts).unwrap();
    let ty = |n: &str| {
        plan.tensors
            .iter()
            .find(|t| t.name == n)
            .unwrap()
            .ggml_type
            .to_string()
    };
    assert_eq!(ty("output.weight"), "Q6_K");
    assert_eq!(ty("token_embd.weight"), "Q4_K");
    assert_eq!(ty("blk.0.attn_norm.weight"), "F32");
    for l in 0..8 {
        let more = [0, 3, 6, 7].contains(&l);
        let want = if more { "Q6_K" } else { "Q4_K" };
        assert_eq!(ty(&format!("blk.{l}.attn_v.weight")), want, "attn_v {l}");
        assert_eq!(
            ty(&format!("blk.{l}.ffn_down.weight")),
            want,
            "ffn_down {l}"
        );
        assert_eq!(ty(&format!("blk.{l}.attn_q.weight")), "Q4_K");
    }
    assert_eq!(
        plan.metadata.get("general.file_type"),
        Some(&Value::U32(15))
    );
}

/// The real SmolLM2 vocabulary: GGUF -> tokenizer.json -> GGUF gives the same keys (and
/// `smollm` recognised), and the rebuilt tokenizer.json tokenizes losslessly with SmolLM2's
/// pre-tokenizer rules.
#[test]
fn smollm_tokenizer_round_trip() {
    let Some(path) = common::smollm_gguf() else {
        return;
    };
    let m = open_mmap(&path).unwrap();
    let v = GgufVocab::read(&m.file.metadata).unwrap().unwrap();
    assert_eq!(v.model, "gpt2");
    assert_eq!(v.pre.as_deref(), Some("smollm"));
    let (tj, tc, _) = v.to_hf().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("tokenizer.json"),
        serde_json::to_vec(&tj).unwrap(),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        serde_json::to_vec(&tc).unwrap(),
    )
    .unwrap();
    // back to GGUF keys without a hint: identical vocabulary, types, merges, ids, pre
    let (again, _) = vocab_from_dir(tmp.path(), v.tokens.len(), (None, None), None).unwrap();
    assert_eq!(again.pre.as_deref(), Some("smollm"));
    assert_eq!(again.tokens, v.tokens);
    assert_eq!(again.token_types, v.token_types);
    assert_eq!(again.merges, v.merges);
    assert_eq!(
        (again.bos, again.eos, again.unk, again.pad),
        (v.bos, v.eos, v.unk, v.pad)
    );
    assert_eq!(again.add_bos, v.add_bos);
    assert_eq!(again.chat_template, v.chat_template);

    let tok = tokenizers::Tokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
    let texts = [
        "Hello world! The quick brown fox jumps over the lazy dog.",
        "Prices rose 12345 percent in 2024; call 555-0199.",
        "tabs\tand   spaces    and\n\n\nnewlines  ",
        "Unicode: café, naïve, 東京, Привет, 🙂🚀",
        "<|im_start|>user\nhi<|im_end|>",
    ];
    let id_of = |s: &str| v.tokens.iter().position(|t| t == s.as_bytes()).unwrap() as u32;
    for text in texts {
        let enc = tok.encode(text, false).unwrap();
        let ids = enc.get_ids();
        // lossless: byte-level BPE decodes to the input
        assert_eq!(tok.decode(ids, false).unwrap(), text);
        // smollm splits digits one by one: no token holds two digits
        for &id in ids {
            let t = String::from_utf8_lossy(&v.tokens[id as usize]).into_owned();
            assert!(
                t.chars().filter(|c| c.is_ascii_digit()).count() <= 1,
                "{t:?} in {text:?}"
            );
        }
        // the special tokens of the vocabulary are matched whole
        if text.contains("<|im_start|>") {
            assert_eq!(ids[0], id_of("<|im_start|>"));
            assert_eq!(*ids.last().unwrap(), id_of("<|im_end|>"));
        }
        // BPE is greedy by merge rank: no two neighbouring tokens inside one pre-token form a
        // merge of the vocabulary (else BPE would have applied it)
        let merges: std::collections::HashSet<&str> = v.merges.iter().map(String::as_str).collect();
        for w in enc.get_tokens().windows(2) {
            let pair = format!("{} {}", w[0], w[1]);
            let same_word = !w[1].starts_with('\u{120}')
                && !w[1].starts_with('\u{10a}')
                && !w[0].ends_with('\u{10a}');
            if same_word
                && !w[0].chars().all(|c| c.is_ascii_digit())
                && !w[1].chars().all(|c| c.is_ascii_digit())
            {
                assert!(
                    !merges.contains(pair.as_str()),
                    "unapplied merge {pair:?} in {text:?}"
                );
            }
        }
    }
    // a known SmolLM2 split: " world" is one token
    let enc = tok.encode("Hello world", false).unwrap();
    assert_eq!(enc.get_tokens(), &["Hello", "\u{120}world"]);
}

#[test]
fn cli_dry_run_force_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().seed(2).write(&src);
    let out = tmp.path().join("m.gguf");
    let run = |args: &[&str]| bin::run(Bin::Convert, args);
    let o = run(&[
        "to-gguf",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--dry-run",
        "--json",
        "--outtype",
        "q8_0",
    ]);
    o.expect_code(0);
    let j = o.json();
    assert_eq!(j["tensors"].as_array().unwrap().len(), 2 * 9 + 3);
    assert!(!out.exists(), "dry run wrote nothing");
    let o = run(&[
        "to-gguf",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--outtype",
        "f32",
        "--json",
    ]);
    o.expect_code(0);
    let j = o.json();
    assert_eq!(j["tensors"], json!(21));
    let before = std::fs::read(&out).unwrap();
    let o = run(&[
        "to-gguf",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--outtype",
        "f16",
    ]);
    assert_eq!(o.code, 2, "existing output refused");
    assert_eq!(std::fs::read(&out).unwrap(), before, "existing output kept");
    let o = run(&[
        "to-gguf",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--outtype",
        "f16",
        "--force",
    ]);
    o.expect_code(0);
    assert!(GgufFile::parse(&std::fs::read(&out).unwrap()).is_ok());
    let back = tmp.path().join("back");
    let o = run(&[
        "from-gguf",
        out.to_str().unwrap(),
        "-o",
        back.to_str().unwrap(),
        "--json",
    ]);
    o.expect_code(0);
    let o = run(&[
        "from-gguf",
        out.to_str().unwrap(),
        "-o",
        back.to_str().unwrap(),
    ]);
    assert_eq!(o.code, 2, "non-empty output refused");
    let o = run(&[
        "from-gguf",
        out.to_str().unwrap(),
        "-o",
        back.to_str().unwrap(),
        "--force",
        "--dtype",
        "bf16",
    ]);
    o.expect_code(0);
    assert_eq!(
        SafetensorStore::open(&back)
            .unwrap()
            .tensor_view("model.norm.weight")
            .unwrap()
            .dtype,
        TensorDtype::BF16
    );
}

#[test]
fn quantized_outputs_round_trip_within_their_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().kquant_shape().seed(9).write(&src);
    let a = SafetensorStore::open(&src).unwrap();
    // relative RMS error bounds per type: 8-bit ~0.4%, 4-bit k-quants ~10%
    for (out, bound) in [
        (OutType::Q8_0, 0.01),
        (OutType::Q4KM, 0.15),
        (OutType::Q4_1, 0.15),
        (OutType::Q6K, 0.03),
    ] {
        let gguf = tmp.path().join("q.gguf");
        let opts = ToGgufOptions {
            outtype: out,
            ..ToGgufOptions::default()
        };
        let plan = to_gguf(&src, &gguf, &opts);
        let back = tmp.path().join("qback");
        from_gguf(
            &gguf,
            &back,
            &FromGgufOptions {
                force: true,
                ..FromGgufOptions::default()
            },
        )
        .unwrap();
        let b = SafetensorStore::open(&back).unwrap();
        let q = "model.layers.1.self_attn.q_proj.weight";
        let ty = plan
            .tensors
            .iter()
            .find(|p| p.name == "blk.1.attn_q.weight")
            .unwrap()
            .ggml_type;
        assert_eq!(ty, out.base_type(), "{out}");
        for n in [
            q,
            "model.layers.0.mlp.down_proj.weight",
            "model.embed_tokens.weight",
        ] {
            let f = |s: &SafetensorStore| -> Vec<f32> {
                s.tensor_view(n)
                    .unwrap()
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            };
            let (x, y) = (f(&a), f(&b));
            let num: f64 = x
                .iter()
                .zip(&y)
                .map(|(p, q)| ((p - q) as f64).powi(2))
                .sum();
            let den: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
            let rel = (num / den).sqrt();
            assert!(rel < bound && rel > 0.0, "{out} {n}: relative error {rel}");
        }
    }
}

#[test]
fn unsupported_type_names_the_tensor() {
    use abf::gguf::{GgmlType, GgufWriter, TensorSpec};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().seed(4).write(&src);
    let good = tmp.path().join("g.gguf");
    to_gguf(&src, &good, &f32_opts());
    // the same file with one tensor stored as IQ2_XXS (code 16), which nothing here decodes
    let m = open_mmap(&good).unwrap();
    let bad = tmp.path().join("bad.gguf");
    let mut w = GgufWriter::create(&bad, true).unwrap();
    for (k, v) in m.file.metadata.iter() {
        w.add_kv(k, v.clone()).unwrap();
    }
    let target = "blk.1.ffn_up.weight";
    let iq = GgmlType::from_code(16);
    for t in &m.file.tensors {
        let spec = if t.name == target {
            TensorSpec::with_size(
                t.name.clone(),
                vec![256, 96 * 64 / 256],
                iq,
                (96 * 64 / 256) * 66,
            )
        } else {
            TensorSpec::with_size(t.name.clone(), t.dims.clone(), t.ggml_type, t.size)
        };
        w.add_tensor(spec).unwrap();
    }
    for (i, t) in m.file.tensors.iter().enumerate() {
        if t.name == target {
            w.write_tensor_data(&t.name, &vec![0u8; (96 * 64 / 256) * 66])
                .unwrap();
        } else {
            w.write_tensor_data(&t.name, m.file.tensor_bytes(m.bytes(), i).unwrap())
                .unwrap();
        }
    }
    w.commit().unwrap();
    let err = from_gguf(&bad, &tmp.path().join("out"), &FromGgufOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(target) && msg.contains("IQ2_XXS"), "{msg}");
    assert!(!tmp.path().join("out").exists(), "nothing written");
}

/// A write that fails in the middle of a one-pass conversion (the writer thread's error; the
/// encoder stops) exits non-zero naming the tensor and leaves no output and no temporary file.
#[test]
fn a_failed_write_in_one_pass_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().kquant_shape().seed(5).write(&src);
    let dir = tmp.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let r = common::bin::output(
        Bin::Convert
            .command()
            .args([
                "to-gguf",
                src.to_str().unwrap(),
                "-o",
                &format!("{}/", dir.display()),
                "--outtype",
                "f16,q8_0,q4_k_m",
            ])
            .env("ABF_FAILPOINT", "multi-write-error"),
    );
    assert_ne!(r.code, 0, "a failed write must fail the run");
    assert!(
        r.stderr.contains("write failed") && r.stderr.contains("tensor"),
        "{}",
        r.stderr
    );
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Outputs go around the page cache where the filesystem allows it (src/fsutil/direct.rs); the
/// buffered fallback must write the same bytes (split sets of two types, every part).
#[test]
fn direct_and_buffered_output_are_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().kquant_shape().seed(6).write(&src);
    let run = |dir: &str, buffered: bool| {
        let out = tmp.path().join(dir);
        let mut cmd = Bin::Convert.command();
        cmd.args([
            "to-gguf",
            src.to_str().unwrap(),
            "-o",
            &format!("{}/", out.display()),
            "--outtype",
            "f16,q4_k_m",
            "--split-max-tensors",
            "5",
        ]);
        if buffered {
            cmd.env("ABF_FAILPOINT", "buffered-output");
        }
        common::bin::output(&mut cmd).expect_code(0);
        let mut files: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    };
    let (direct, buffered) = (run("direct", false), run("buffered", true));
    assert!(direct.len() > 2, "expected split sets: {direct:?}");
    assert_eq!(direct.len(), buffered.len());
    for (a, b) in direct.iter().zip(&buffered) {
        assert_eq!(a.file_name(), b.file_name());
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{}: direct and buffered output differ",
            a.display()
        );
    }
}

/// `--outtype f16,q8_0,q4_k_m,q2_k -o DIR/` writes, from one read, files byte-identical to the
/// single-type conversions (bf16 weights: the f32 intermediate must not change the f16 output).
#[test]
fn several_outtypes_in_one_pass_equal_single_conversions() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new()
        .kquant_shape()
        .dtype(common::model::WeightDtype::Bf16)
        .seed(4)
        .write(&src);
    let dir = tmp.path().join("out/");
    let mut cli = vec![
        "to-gguf",
        src.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
    ];
    cli.extend(["--outtype", "f16,q8_0,q4_k_m,q2_k", "--json"]);
    let r = bin::run(Bin::Convert, &cli);
    r.expect_code(0);
    let j = r.json();
    assert_eq!(j["files"].as_array().unwrap().len(), 4);
    for (t, out) in [
        ("f16", OutType::F16),
        ("q8_0", OutType::Q8_0),
        ("q4_k_m", OutType::Q4KM),
        ("q2_k", OutType::Q2K),
    ] {
        let single = tmp.path().join(format!("single-{t}.gguf"));
        to_gguf(
            &src,
            &single,
            &ToGgufOptions {
                outtype: out,
                ..ToGgufOptions::default()
            },
        );
        let many = dir.join(format!("src-{t}.gguf"));
        let (a, b) = (
            std::fs::read(&single).unwrap(),
            std::fs::read(&many).unwrap(),
        );
        assert!(
            a == b,
            "{t}: the one-pass output differs from the single conversion"
        );
    }
    // a second run without --force keeps the files and fails naming one
    let r = bin::run(Bin::Convert, &cli);
    r.expect_code(2);

    // split sets from one pass equal the single-type split sets, part by part
    let split_dir = tmp.path().join("split/");
    let mut cli = vec![
        "to-gguf",
        src.to_str().unwrap(),
        "-o",
        split_dir.to_str().unwrap(),
    ];
    cli.extend(["--outtype", "q8_0,q4_k_m", "--split-max-tensors", "7"]);
    bin::run(Bin::Convert, &cli).expect_code(0);
    for t in ["q8_0", "q4_k_m"] {
        let single = tmp.path().join(format!("single-split-{t}.gguf"));
        bin::run(
            Bin::Convert,
            &[
                "to-gguf",
                src.to_str().unwrap(),
                "-o",
                single.to_str().unwrap(),
                "--outtype",
                t,
                "--split-max-tensors",
                "7",
            ],
        )
        .expect_code(0);
        let n = 3; // 21 tensors in parts of 7
        for k in 1..=n {
            let part = |prefix: &str| tmp.path().join(format!("{prefix}-{k:05}-of-{n:05}.gguf"));
            let a = std::fs::read(part(&format!("single-split-{t}"))).unwrap();
            let b =
                std::fs::read(split_dir.join(format!("src-{t}-{k:05}-of-{n:05}.gguf"))).unwrap();
            assert!(a == b, "{t} part {k} differs");
        }
    }
}

/// An output that cannot be renamed into place (a directory is in the way) fails with exit 2
/// and leaves no temporary file behind.
#[test]
fn a_failed_rename_leaves_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    TinyModel::new().write(&src);
    let blocked = tmp.path().join("out.gguf");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    let r = bin::run(
        Bin::Convert,
        &[
            "to-gguf",
            src.to_str().unwrap(),
            "-o",
            blocked.to_str().unwrap(),
            "--force",
        ],
    );
    r.expect_code(2);
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(blocked.join("keep").is_file());
}
