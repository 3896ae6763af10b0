//! `abf-eval logits`: the .npy it writes is read by NumPy itself (an independent parser) with the
//! shape and values of the forward, and its errors exit 2.

mod common;

use std::path::Path;
use std::process::Command;

use abf::checkpoint::Checkpoint;
use abf::model::Llama;
use candle_core::{DType, Device, Tensor};
use common::bin::{self, Bin};
use common::model::{Init, TinyModel, Vocab};

/// Vocabulary 40, hidden 16, intermediate 24, 2 layers, 4 heads (2 KV), context 16, tied
/// embeddings, every weight (norm gains too) uniform in +-0.125; no tokenizer files.
fn write_tiny(dir: &Path) {
    TinyModel::new()
        .vocab(Vocab::Ids(40))
        .hidden(16)
        .inter(24)
        .layers(2)
        .heads(4)
        .kv_heads(2)
        .context(16)
        .tied(true)
        .init(Init::Rough {
            embed: 0.125,
            proj: 0.125,
            head: 0.125,
        })
        .seed(12345)
        .write(dir);
}

/// numpy (installed by `make fetch`), the independent reader of our .npy files.
fn numpy_available() -> bool {
    common::data::python_has("numpy")
        || common::data::skip_or_fail::<()>("python3 with numpy (make fetch installs it)").is_some()
}

#[test]
fn logits_npy_is_read_by_numpy_with_the_forward_values() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    std::fs::create_dir_all(&model).unwrap();
    write_tiny(&model);
    let tokens: Vec<u32> = (0..48).map(|i| (i * 7 % 40) as u32).collect();
    let tok_file = tmp.path().join("t.json");
    std::fs::write(&tok_file, serde_json::to_string(&tokens).unwrap()).unwrap();
    let out = tmp.path().join("l.npy");
    let st = bin::output(
        Bin::Eval
            .command()
            .args(["logits", "--model"])
            .arg(&model)
            .arg("--tokens")
            .arg(&tok_file)
            .arg("--out")
            .arg(&out)
            .args(["--method", "eabf", "--skip-layers", "0", "--json"]),
    );
    let report = st.expect_code(0).json();
    assert_eq!(report["tokens"], 48);
    assert_eq!(report["recipe"]["method"], "eabf");

    // the forward with the same recipe, in process
    let ckpt = Checkpoint::open(&model).unwrap();
    let mut cfg = ckpt.config.model.clone();
    cfg.recipe = abf::rope::Recipe::from_json_block("report", &report["recipe"]).unwrap();
    let llama = Llama::load(ckpt.var_builder(DType::F32, &Device::Cpu), &cfg).unwrap();
    let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let want: Vec<f32> = llama
        .forward(&input, 0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();

    // the raw payload after the header is exactly the forward's values
    let bytes = std::fs::read(&out).unwrap();
    let header_len = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!(header_len % 64, 0, "numpy aligns the header to 64 bytes");
    let got: Vec<f32> = bytes[header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(got, want);

    if numpy_available() {
        let script = format!(
            "import numpy as np; a = np.load({:?}); print(a.shape, a.dtype, repr(float(a[47, 39])), repr(float(a.sum(dtype=np.float64))))",
            out.display().to_string()
        );
        let py = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            py.status.success(),
            "{}",
            String::from_utf8_lossy(&py.stderr)
        );
        let line = String::from_utf8_lossy(&py.stdout).to_string();
        let sum: f64 = want.iter().map(|&x| x as f64).sum();
        assert!(line.starts_with("(48, 40) float32"), "{line}");
        let fields: Vec<&str> = line.split_whitespace().collect();
        let last: f32 = fields[fields.len() - 2].parse().unwrap();
        let total: f64 = fields[fields.len() - 1].parse().unwrap();
        assert_eq!(last, want[47 * 40 + 39]);
        assert!(
            (total - sum).abs() <= 1e-9 * sum.abs().max(1.0),
            "{total} vs {sum}"
        );
    }
}

#[test]
fn logits_errors_exit_2_and_keep_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    std::fs::create_dir_all(&model).unwrap();
    write_tiny(&model);
    let tok_file = tmp.path().join("t.json");
    std::fs::write(&tok_file, "[1, 2, 999]").unwrap();
    let out = tmp.path().join("l.npy");
    let st = bin::output(
        Bin::Eval
            .command()
            .args(["logits", "--model"])
            .arg(&model)
            .arg("--tokens")
            .arg(&tok_file)
            .arg("--out")
            .arg(&out),
    );
    assert_eq!(st.code, 2);
    let err = &st.stderr;
    assert!(err.contains("999") && err.contains("vocabulary"), "{err}");
    assert!(!out.exists());
    let st = bin::output(
        Bin::Eval
            .command()
            .args(["logits", "--model"])
            .arg(tmp.path().join("missing"))
            .arg("--tokens")
            .arg(&tok_file)
            .arg("--out")
            .arg(&out),
    );
    assert_eq!(st.code, 2);
    assert!(st.stderr.contains("missing"));
}
