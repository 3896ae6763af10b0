//! The importance matrix: our collector against the f64 oracle forward, llama.cpp's GGUF and
//! legacy `.dat` forms, and importance-weighted quantization in to-gguf (lower output error on
//! the model's own activations, warnings for missing tensors, exit 2 for mismatched shapes).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use abf::checkpoint::Checkpoint;
use abf::convert::hf_to_gguf;
use abf::gguf::{open_mmap, GgufFile, Value};
use abf::imatrix::{self, Entry, ImportanceMatrix};
use abf::runtime::Encoder;
use common::bin::{self, Bin};
use common::model::TinyModel;
use common::oracle::{exact, oracle_probed, Weights};
use serde_json::json;

/// Calibration text: varied enough that every byte token and column sees different values.
fn text() -> String {
    let words = [
        "the",
        "window",
        "of",
        "a",
        "model",
        "grows",
        "when",
        "its",
        "rotary",
        "base",
        "is",
        "raised",
        "and",
        "attention",
        "stays",
        "sharp",
        "over",
        "long",
        "texts",
        "42",
        "Zebra!",
    ];
    let mut out = String::new();
    let mut s = 7u64;
    for _ in 0..400 {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push_str(words[(s >> 33) as usize % words.len()]);
        out.push(if (s >> 20).is_multiple_of(9) {
            '\n'
        } else {
            ' '
        });
    }
    out
}

fn write_text(dir: &Path) -> PathBuf {
    let p = dir.join("calib.txt");
    std::fs::write(&p, text()).unwrap();
    p
}

/// BOS added by the tokenizer, so the collector's per-chunk BOS rule is exercised.
fn with_bos(m: TinyModel) -> TinyModel {
    m.tokenizer_config(json!({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": true
    }))
}

fn oracle_weights(m: &TinyModel) -> Weights {
    Weights(
        m.weights()
            .into_iter()
            .map(|(n, s, v)| (n, (s, v.into_iter().map(f64::from).collect())))
            .collect(),
    )
}

/// Per GGUF weight name: every input row of every chunk, from the f64 oracle, with llama.cpp's
/// chunking (whole chunks of `ctx`, first token of each replaced by BOS).
fn oracle_inputs(
    m: &TinyModel,
    dir: &Path,
    ctx: usize,
    chunks: usize,
) -> BTreeMap<String, Vec<Vec<f64>>> {
    let cfg = Checkpoint::open(dir).unwrap().config.model;
    let enc = Encoder::open(dir).unwrap();
    let toks = enc.encode(&text()).unwrap();
    assert!(toks.len() >= ctx * chunks, "{} tokens", toks.len());
    let w = oracle_weights(m);
    let mut rows: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    for c in 0..chunks {
        let mut chunk = toks[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = enc.bos {
            chunk[0] = b;
        }
        oracle_probed(&cfg, &w, &chunk, 0, &[], &exact, &mut |name, x| {
            let g = hf_to_gguf(name).unwrap().0;
            rows.entry(g).or_default().push(x.to_vec());
        });
    }
    rows
}

fn run_imatrix(
    dir: &Path,
    text: &Path,
    out: &Path,
    ctx: usize,
    chunks: usize,
) -> serde_json::Value {
    let (ctx, chunks) = (ctx.to_string(), chunks.to_string());
    bin::run(
        Bin::Convert,
        &[
            "imatrix",
            dir.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--ctx",
            &ctx,
            "--chunks",
            &chunks,
            "-o",
            out.to_str().unwrap(),
            "--json",
        ],
    )
    .expect_code(0)
    .json()
}

/// Largest |ours - oracle| over an entry's columns, relative to its largest oracle sum.
fn rel_err(ours: &[f32], oracle: &[f64]) -> f64 {
    let scale = oracle.iter().cloned().fold(0.0, f64::max);
    let diff = ours
        .iter()
        .zip(oracle)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    diff / scale
}

#[test]
fn collected_sums_equal_the_f64_oracle() {
    for tied in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let m = with_bos(TinyModel::new().tied(tied).seed(3));
        let dir = m.write(&tmp.path().join("m"));
        let txt = write_text(tmp.path());
        let out = tmp.path().join("im.gguf");
        let (ctx, chunks) = (24, 3);
        let j = run_imatrix(&dir, &txt, &out, ctx, chunks);
        assert_eq!(j["chunks"], chunks);
        assert_eq!(j["tokens"], ctx * chunks);
        let got = imatrix::read(&out).unwrap();
        assert_eq!(got.chunk_count, chunks as u32);
        assert_eq!(got.chunk_size, ctx as u32);
        assert_eq!(got.datasets, vec![txt.display().to_string()]);
        let want = oracle_inputs(&m, &dir, ctx, chunks);
        // 7 per layer and the head (token_embd.weight when tied, as llama.cpp names it)
        assert_eq!(got.entries.len(), 7 * m.layers + 1);
        let head = if tied {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        assert!(got.entries.contains_key(head), "{:?}", got.entries.keys());
        let mut worst: f64 = 0.0;
        for (name, rows) in &want {
            let e = got
                .entries
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(e.counts, vec![(ctx * chunks) as u64], "{name}");
            let n = rows[0].len();
            let sums: Vec<f64> = (0..n)
                .map(|j| rows.iter().map(|r| r[j] * r[j]).sum())
                .collect();
            let err = rel_err(&e.sums, &sums);
            // the f32 forward carries ~1e-6 relative error per activation (two layers of f32
            // matmuls over 64-96 terms); squaring doubles it and sums of positive terms keep it;
            // storing as f32 adds 6e-8. 1e-5 leaves a margin of ~10 over what is measured.
            assert!(err < 1e-5, "{name}: relative error {err:e}");
            worst = worst.max(err);
        }
        eprintln!("tied={tied}: worst relative error against the f64 oracle {worst:e}");
    }
}

#[test]
fn too_short_text_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinyModel::new().write(&tmp.path().join("m"));
    let txt = tmp.path().join("short.txt");
    std::fs::write(&txt, "a few words").unwrap();
    let out = tmp.path().join("im.gguf");
    let r = bin::run(
        Bin::Convert,
        &[
            "imatrix",
            dir.to_str().unwrap(),
            "--text",
            txt.to_str().unwrap(),
            "--ctx",
            "64",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    r.expect_code(2);
    assert!(
        r.stderr.contains("fewer than one chunk of 64"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
}

fn sample_matrix() -> ImportanceMatrix {
    let mut entries = BTreeMap::new();
    entries.insert(
        "blk.0.attn_q.weight".to_string(),
        Entry {
            sums: vec![1.5, 0.0, 3.25, 1e30],
            counts: vec![96],
        },
    );
    // an expert stack: two matrices of three columns
    entries.insert(
        "blk.0.ffn_down_exps.weight".to_string(),
        Entry {
            sums: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            counts: vec![10, 0],
        },
    );
    ImportanceMatrix {
        entries,
        datasets: vec!["wiki.train.raw".into()],
        chunk_count: 3,
        chunk_size: 32,
    }
}

#[test]
fn gguf_form_round_trips_with_llama_cpp_layout() {
    let m = sample_matrix();
    let bytes = imatrix::to_gguf_bytes(&m).unwrap();
    assert_eq!(imatrix::parse_gguf(&bytes, Path::new("x.gguf")).unwrap(), m);
    // the layout llama.cpp's writer produces: general.type, the three keys, and per weight in
    // name order `.in_sum2` then `.counts`, F32, with ggml's trailing-1 dimensions dropped
    let f = GgufFile::parse(&bytes).unwrap();
    assert_eq!(
        f.metadata.get("general.type"),
        Some(&Value::string("imatrix"))
    );
    assert_eq!(f.metadata.get("imatrix.chunk_count"), Some(&Value::U32(3)));
    assert_eq!(f.metadata.get("imatrix.chunk_size"), Some(&Value::U32(32)));
    let t: Vec<(&str, &[u64])> = f
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), &t.dims[..]))
        .collect();
    assert_eq!(
        t,
        vec![
            ("blk.0.attn_q.weight.in_sum2", &[4u64][..]),
            ("blk.0.attn_q.weight.counts", &[1][..]),
            ("blk.0.ffn_down_exps.weight.in_sum2", &[3, 2][..]),
            ("blk.0.ffn_down_exps.weight.counts", &[1, 2][..]),
        ]
    );
    assert!(f.tensors.iter().all(|t| t.ggml_type.to_string() == "F32"));
    // counts are stored as F32 values
    let i = f
        .tensors
        .iter()
        .position(|t| t.name.ends_with("exps.weight.counts"))
        .unwrap();
    assert_eq!(
        f.tensor_bytes(&bytes, i).unwrap(),
        [10f32.to_le_bytes(), 0f32.to_le_bytes()].concat()
    );
    // weights: sums / counts, and 1 for a matrix that saw no rows (llama.cpp's quantize)
    assert_eq!(
        m.entries["blk.0.ffn_down_exps.weight"].weights(),
        vec![0.1, 0.2, 0.3, 1.0, 1.0, 1.0]
    );
}

#[test]
fn gguf_form_errors_name_the_tensor() {
    let mut m = sample_matrix();
    m.entries.get_mut("blk.0.attn_q.weight").unwrap().sums[1] = f32::NAN;
    let e = imatrix::parse_gguf(&imatrix::to_gguf_bytes(&m).unwrap(), Path::new("bad.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.gguf") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );
    // sums without counts
    let mut w = abf::gguf::GgufWriter::new(Vec::new());
    let spec = abf::gguf::TensorSpec::new("a.weight.in_sum2", vec![2], abf::gguf::types::F32.ty())
        .unwrap();
    w.add_tensor(spec).unwrap();
    w.write_tensor_data("a.weight.in_sum2", &[0u8; 8]).unwrap();
    let bytes = w.finish().unwrap().0;
    let e = imatrix::parse_gguf(&bytes, Path::new("half.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("half.gguf") && e.contains("a.weight"), "{e}");
}

/// The legacy form written by hand from the layout in llama.cpp's `save_imatrix_legacy`.
pub fn legacy_bytes(entries: &[(&str, i32, &[f32])], trailer: Option<(i32, &str)>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend((entries.len() as i32).to_le_bytes());
    for (name, ncall, vals) in entries {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(ncall.to_le_bytes());
        b.extend((vals.len() as i32).to_le_bytes());
        for v in *vals {
            b.extend(v.to_le_bytes());
        }
    }
    if let Some((chunks, ds)) = trailer {
        b.extend(chunks.to_le_bytes());
        b.extend((ds.len() as i32).to_le_bytes());
        b.extend(ds.as_bytes());
    }
    b
}

#[test]
fn legacy_form_reads_as_llama_cpp_loads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = legacy_bytes(
        &[
            ("blk.0.attn_k.weight", 4, &[2.0, 8.0, 0.5]),
            ("output.weight", 0, &[1.0]),
        ],
        Some((4, "calib.txt")),
    );
    let p = tmp.path().join("im.dat");
    std::fs::write(&p, &bytes).unwrap();
    let m = imatrix::read(&p).unwrap();
    assert_eq!(m.chunk_count, 4);
    assert_eq!(m.chunk_size, 0);
    assert_eq!(m.datasets, vec!["calib.txt".to_string()]);
    let k = &m.entries["blk.0.attn_k.weight"];
    assert_eq!(
        (k.sums.clone(), k.counts.clone()),
        (vec![2.0, 8.0, 0.5], vec![4])
    );
    // stored values are mean * ncall, so the weights are the means
    assert_eq!(k.weights(), vec![0.5, 2.0, 0.125]);
    assert_eq!(m.entries["output.weight"].weights(), vec![1.0]);
    // the trailer is optional
    let no_trailer = legacy_bytes(&[("a", 1, &[1.0])], None);
    assert_eq!(
        imatrix::parse_legacy(&no_trailer, &p).unwrap().chunk_count,
        0
    );
    // broken inputs: errors naming the file and the weight
    for (bytes, what) in [
        (legacy_bytes(&[], None), "entry count"),
        (legacy_bytes(&[("w.weight", -1, &[1.0])], None), "w.weight"),
        (legacy_bytes(&[("w.weight", 1, &[])], None), "w.weight"),
        (bytes[..bytes.len() - 5].to_vec(), "dataset"),
        (bytes[..30].to_vec(), "blk.0.attn_k.weight"),
    ] {
        let e = imatrix::parse_legacy(&bytes, &p).unwrap_err().to_string();
        assert!(e.contains("im.dat") && e.contains(what), "{what}: {e}");
    }
}

/// A model whose every 2-D weight has rows of whole 256-blocks, so the k-quants apply.
fn k_quant_model() -> TinyModel {
    with_bos(
        TinyModel::new()
            .hidden(256)
            .inter(512)
            .heads(4)
            .kv_heads(2)
            .seed(11),
    )
}

fn to_gguf(dir: &Path, out: &Path, outtype: &str, imatrix: Option<&Path>) -> bin::Run {
    let mut args = vec![
        "to-gguf".to_string(),
        dir.display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "--outtype".into(),
        outtype.into(),
        "--json".into(),
        "--force".into(),
    ];
    if let Some(p) = imatrix {
        args.extend(["--imatrix".into(), p.display().to_string()]);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    bin::run(Bin::Convert, &a)
}

fn tensor_f32(path: &Path, name: &str) -> Vec<f32> {
    let m = open_mmap(path).unwrap();
    let i = m.file.tensors.iter().position(|t| t.name == name).unwrap();
    let t = &m.file.tensors[i];
    let bytes = m.file.tensor_bytes(m.bytes(), i).unwrap();
    abf::quant::dequantize(t.ggml_type, bytes, t.elements() as usize).unwrap()
}

/// `sum_i |(W - Q) x_i|^2` over the model's own input rows of that weight, in f64.
fn output_error(w: &[f32], q: &[f32], rows: &[Vec<f64>]) -> f64 {
    let n = rows[0].len();
    let d: Vec<f64> = w
        .iter()
        .zip(q)
        .map(|(a, b)| *a as f64 - *b as f64)
        .collect();
    let mut total = 0.0;
    for x in rows {
        for r in d.chunks_exact(n) {
            let y: f64 = r.iter().zip(x).map(|(a, b)| a * b).sum();
            total += y * y;
        }
    }
    total
}

#[test]
fn importance_weighted_k_quant_has_lower_output_error() {
    let tmp = tempfile::tempdir().unwrap();
    let m = k_quant_model();
    let dir = m.write(&tmp.path().join("m"));
    let txt = write_text(tmp.path());
    let im = tmp.path().join("im.gguf");
    let (ctx, chunks) = (64, 3);
    run_imatrix(&dir, &txt, &im, ctx, chunks);
    let reference = tmp.path().join("f32.gguf");
    to_gguf(&dir, &reference, "f32", None).expect_code(0);
    let plain = tmp.path().join("plain.gguf");
    to_gguf(&dir, &plain, "q4_k", None).expect_code(0);
    let weighted = tmp.path().join("weighted.gguf");
    let j = to_gguf(&dir, &weighted, "q4_k", Some(&im))
        .expect_code(0)
        .json();
    assert_eq!(
        j["warnings"],
        json!([]),
        "every quantized matmul weight is in the matrix"
    );
    // every matmul weight takes its weights; the untied embedding is a lookup (a note)
    assert_eq!(j["imatrix_tensors"], 7 * m.layers + 1);
    let rows = oracle_inputs(&m, &dir, ctx, chunks);
    let (mut e_plain, mut e_weighted, mut wins) = (0.0, 0.0, 0);
    for (name, x) in &rows {
        let w = tensor_f32(&reference, name);
        let p = output_error(&w, &tensor_f32(&plain, name), x);
        let q = output_error(&w, &tensor_f32(&weighted, name), x);
        eprintln!("{name}: plain {p:.4e} weighted {q:.4e} ratio {:.3}", q / p);
        e_plain += p;
        e_weighted += q;
        wins += usize::from(q < p);
    }
    eprintln!(
        "total: plain {e_plain:.4e} weighted {e_weighted:.4e} ratio {:.3}",
        e_weighted / e_plain
    );
    // measured: every tensor 0.75-0.90 of the plain error, 0.785 in total
    assert!(e_weighted < 0.9 * e_plain, "{e_weighted} vs {e_plain}");
    assert_eq!(
        wins,
        rows.len(),
        "weighted wins on {wins} of {} tensors",
        rows.len()
    );

    // the same matrix in the legacy form (mean * ncall, ncall = chunks) gives the same weights
    // up to f32 rounding of the division, hence the same file
    let m = imatrix::read(&im).unwrap();
    let entries: Vec<(String, i32, Vec<f32>)> = m
        .entries
        .iter()
        .map(|(n, e)| {
            let c = chunks as f32;
            (
                n.clone(),
                chunks as i32,
                e.sums.iter().map(|s| s / e.counts[0] as f32 * c).collect(),
            )
        })
        .collect();
    let refs: Vec<(&str, i32, &[f32])> = entries
        .iter()
        .map(|(n, c, v)| (n.as_str(), *c, v.as_slice()))
        .collect();
    let dat = tmp.path().join("im.dat");
    std::fs::write(
        &dat,
        legacy_bytes(&refs, Some((chunks as i32, "calib.txt"))),
    )
    .unwrap();
    let from_dat = tmp.path().join("dat.gguf");
    to_gguf(&dir, &from_dat, "q4_k", Some(&dat)).expect_code(0);
    let (a, b) = (
        std::fs::read(&weighted).unwrap(),
        std::fs::read(&from_dat).unwrap(),
    );
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    eprintln!("legacy vs gguf matrix: {same} of {} bytes equal", a.len());
    assert!(same as f64 > 0.999 * a.len() as f64);
    assert_ne!(a, std::fs::read(&plain).unwrap());
}

#[test]
fn missing_tensor_warns_and_mismatched_shape_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let m = k_quant_model();
    let dir = m.write(&tmp.path().join("m"));
    let txt = write_text(tmp.path());
    let im = tmp.path().join("im.gguf");
    run_imatrix(&dir, &txt, &im, 32, 1);
    let full = imatrix::read(&im).unwrap();

    let mut missing = full.clone();
    missing.entries.remove("blk.1.attn_q.weight").unwrap();
    let p = tmp.path().join("missing.gguf");
    imatrix::write_gguf(&missing, &p, false).unwrap();
    let out = tmp.path().join("out.gguf");
    let r = to_gguf(&dir, &out, "q4_k", Some(&p));
    r.expect_code(0);
    assert!(
        r.stderr
            .contains("warning: blk.1.attn_q.weight is not in the importance matrix"),
        "{}",
        r.stderr
    );
    assert_eq!(r.json()["warnings"].as_array().unwrap().len(), 1);
    assert_eq!(r.json()["imatrix_tensors"], 7 * m.layers);

    let mut bad = full.clone();
    bad.entries
        .get_mut("blk.0.ffn_down.weight")
        .unwrap()
        .sums
        .truncate(256);
    let p = tmp.path().join("bad.gguf");
    imatrix::write_gguf(&bad, &p, false).unwrap();
    let out = tmp.path().join("never.gguf");
    let r = to_gguf(&dir, &out, "q4_k", Some(&p));
    r.expect_code(2);
    assert!(
        r.stderr.contains("blk.0.ffn_down.weight") && r.stderr.contains("256 columns"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
}

#[test]
fn weighted_quantizer_splits_on_whole_rows() {
    // rows of 768 do not divide the 32768-element work items, so a split on blocks would hand
    // a kernel a chunk starting mid-row and index the weights wrongly
    let (rows, n) = (300, 768);
    let mut rng = common::rng::Rng::new(5);
    let data: Vec<f32> = (0..rows * n).map(|_| rng.uniform_f32(1.0)).collect();
    let w: Vec<f32> = (0..n).map(|j| 0.01 + (j % 7) as f32).collect();
    for ty in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"] {
        let ty = abf::gguf::GgmlType::from_name(ty).unwrap();
        assert!(abf::quant::supports_weights(ty));
        let par = abf::quant::quantize_weighted(ty, &data, n, &w).unwrap();
        let seq = abf::quant::quantize_weighted_sequential(ty, &data, n, &w).unwrap();
        assert_eq!(par, seq, "{ty}");
        assert_ne!(par, abf::quant::quantize(ty, &data, n).unwrap(), "{ty}");
    }
    let q8 = abf::gguf::GgmlType::from_name("Q8_0").unwrap();
    assert!(!abf::quant::supports_weights(q8));
    assert_eq!(
        abf::quant::quantize_weighted(q8, &data, n, &w).unwrap(),
        abf::quant::quantize(q8, &data, n).unwrap()
    );
    let q4 = abf::gguf::GgmlType::from_name("Q4_K").unwrap();
    let e = abf::quant::quantize_weighted(q4, &data, n, &w[..10]).unwrap_err();
    assert!(e.to_string().contains("10 values"), "{e}");
}

#[test]
fn default_ctx_is_the_recipe_window() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinyModel::new().context(96).write(&tmp.path().join("m"));
    let window = Checkpoint::open(&dir).unwrap().config.model.recipe.context;
    assert_eq!(window, 96);
    let txt = write_text(tmp.path());
    let out = tmp.path().join("im.gguf");
    let j = bin::run(
        Bin::Convert,
        &[
            "imatrix",
            dir.to_str().unwrap(),
            "--text",
            txt.to_str().unwrap(),
            "--chunks",
            "1",
            "-o",
            out.to_str().unwrap(),
            "--json",
        ],
    )
    .expect_code(0)
    .json();
    assert_eq!(j["ctx"], 96);
    assert_eq!(imatrix::read(&out).unwrap().chunk_size, 96);
}
