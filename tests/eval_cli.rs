//! `abf-eval logits`: the .npy it writes is read by NumPy itself (an independent parser) with the
//! shape and values of the forward, and its errors exit 2.

use std::path::Path;
use std::process::Command;

use abf::checkpoint::Checkpoint;
use abf::model::Llama;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

fn write_tiny(dir: &Path) {
    let (v, h, f, layers) = (40usize, 16usize, 24usize, 2usize);
    let config = json!({
        "model_type": "llama", "vocab_size": v, "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 16, "rope_theta": 10000.0,
        "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut seed = 12345u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
    };
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![h / 2, h]),
            ("self_attn.v_proj.weight", vec![h / 2, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![f, h]),
            ("mlp.up_proj.weight", vec![f, h]),
            ("mlp.down_proj.weight", vec![h, f]),
        ] {
            shapes.push((format!("{p}.{n}"), s));
        }
    }
    shapes.push(("model.norm.weight".to_string(), vec![h]));
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(n, s)| {
            let count: usize = s.iter().product();
            let bytes = (0..count).flat_map(|_| next().to_le_bytes()).collect();
            (n, s, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn numpy_available() -> bool {
    Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success())
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
    let st = Command::new(env!("CARGO_BIN_EXE_abf-eval"))
        .args(["logits", "--model"])
        .arg(&model)
        .arg("--tokens")
        .arg(&tok_file)
        .arg("--out")
        .arg(&out)
        .args(["--method", "eabf", "--skip-layers", "0", "--json"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
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
    } else {
        eprintln!("note: numpy not available; checked the raw payload only");
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
    let st = Command::new(env!("CARGO_BIN_EXE_abf-eval"))
        .args(["logits", "--model"])
        .arg(&model)
        .arg("--tokens")
        .arg(&tok_file)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(2));
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("999") && err.contains("vocabulary"), "{err}");
    assert!(!out.exists());
    let st = Command::new(env!("CARGO_BIN_EXE_abf-eval"))
        .args(["logits", "--model"])
        .arg(tmp.path().join("missing"))
        .arg("--tokens")
        .arg(&tok_file)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&st.stderr).contains("missing"));
}
