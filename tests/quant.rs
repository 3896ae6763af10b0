//! abf::quant against independent numbers: hand-built blocks, derived error bounds,
//! llama.cpp's own quantization test thresholds, and gguf-py's numpy (de)quantizers.

mod common;

use std::path::Path;
use std::process::Command;

use abf::gguf::types::{self, GgmlType};
use abf::quant::{self, QuantError};
use half::f16;

fn ty(name: &str) -> GgmlType {
    GgmlType::from_name(name).unwrap()
}

use common::rng::Rng;

/// Gaussian weights with a few outliers and some all-zero blocks, like real tensors.
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<f32> = (0..n)
        .map(|_| 0.02 * rng.normal_box_muller() as f32)
        .collect();
    for i in (0..n).step_by(997) {
        v[i] *= 40.0;
    }
    let zero = n / 3 / 256 * 256;
    for x in v.iter_mut().skip(zero).take(256.min(n)) {
        *x = 0.0;
    }
    v
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn supported_types_are_the_briefed_ones() {
    let names: Vec<String> = quant::supported_types()
        .iter()
        .map(|t| t.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
            "Q6_K", "Q8_K", "BF16"
        ]
    );
}

#[test]
fn parallel_equals_sequential_for_every_type() {
    // 37 rows of 4352 (= 17 * 256) elements: many work chunks, the last one partial.
    let row_len = 4352;
    let data = weights(37 * row_len, 7);
    for t in quant::supported_types() {
        let par = quant::quantize(t, &data, row_len).unwrap();
        let seq = quant::quantize_sequential(t, &data, row_len).unwrap();
        assert_eq!(
            par.len(),
            quant::quantized_size(t, data.len()).unwrap(),
            "{t}"
        );
        assert!(par == seq, "{t}: parallel bytes differ from sequential");
        let dpar = quant::dequantize(t, &par, data.len()).unwrap();
        let dseq = quant::dequantize_sequential(t, &seq, data.len()).unwrap();
        assert!(
            f32_bits(&dpar) == f32_bits(&dseq),
            "{t}: parallel values differ"
        );
    }
}

#[test]
fn hand_built_blocks_decode_to_hand_derived_values() {
    // Q8_0 (ggml block_q8_0): f16 d, then 32 i8; x = d * q.
    let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let v = quant::dequantize(ty("q8_0"), &b, 32).unwrap();
    let want: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
    assert_eq!(v, want);

    // Q4_0 (block_q4_0): f16 d, 16 bytes; low nibbles are elements 0..16, high 16..32;
    // x = d * (q - 8).
    let mut b = f16::from_f32(0.25).to_le_bytes().to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let v = quant::dequantize(ty("q4_0"), &b, 32).unwrap();
    let want: Vec<f32> = (0..32)
        .map(|i| {
            let q = if i < 16 { i } else { 15 - (i - 16) };
            0.25 * (q as f32 - 8.0)
        })
        .collect();
    assert_eq!(v, want);

    // Q4_1 (block_q4_1): f16 d, f16 m, 16 bytes; x = d * q + m.
    let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
    b.extend(f16::from_f32(-1.0).to_le_bytes());
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let v = quant::dequantize(ty("q4_1"), &b, 32).unwrap();
    let want: Vec<f32> = (0..32).map(|i| 2.0 * (i % 16) as f32 - 1.0).collect();
    assert_eq!(v, want);

    // BF16 is the top half of an f32; F16 is IEEE half.
    let v = quant::dequantize(ty("bf16"), &[0x80, 0x3f, 0x00, 0xc0], 2).unwrap();
    assert_eq!(v, [1.0, -2.0]);
    let v = quant::dequantize(ty("f16"), &[0x00, 0x3c, 0x00, 0xb8], 2).unwrap();
    assert_eq!(v, [1.0, -0.5]);
}

/// Per-element error bounds derived from each legacy format's definition (ggml-quants.c
/// `quantize_row_*_ref`), plus the rounding of its f16 scale and minimum (relative 2^-11).
#[test]
fn legacy_types_meet_their_derived_per_element_bounds() {
    let data = weights(64 * 1024, 11);
    let eps = 2f32.powi(-11) * 1.01;
    for name in ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"] {
        let t = ty(name);
        let q = quant::quantize(t, &data, 1024).unwrap();
        let d = quant::dequantize(t, &q, data.len()).unwrap();
        for (b, (x, y)) in data.chunks(32).zip(d.chunks(32)).enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (mn, mx) = x
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, c), &v| (a.min(v), c.max(v)));
            // (step, how many steps the worst element may be off, largest |q| multiplying d)
            let bound = match name {
                // d = max/-8, q in [-8, 7]: the element of opposite sign to max clamps by one step.
                "q4_0" => amax / 8.0 * (1.0 + 8.0 * eps),
                "q5_0" => amax / 16.0 * (1.0 + 16.0 * eps),
                // d = (max - min) / (2^b - 1), round to nearest: half a step, plus f16 min/d.
                "q4_1" => (mx - mn) / 15.0 * (0.5 + 15.0 * eps) + mn.abs() * eps,
                "q5_1" => (mx - mn) / 31.0 * (0.5 + 31.0 * eps) + mn.abs() * eps,
                // d = amax / 127, round to nearest.
                "q8_0" => amax / 127.0 * (0.5 + 127.0 * eps),
                _ => unreachable!(),
            };
            for (i, (a, c)) in x.iter().zip(y).enumerate() {
                let err = (a - c).abs();
                assert!(
                    err <= bound * 1.0001 + 1e-30,
                    "{name} block {b} elem {i}: |{a} - {c}| = {err} > {bound}"
                );
            }
        }
    }
}

/// llama.cpp's tests/test-quantize-fns.cpp: data `0.1 + 2 cos(i + offset)` over 32 * 128
/// elements, error `sqrt(sum (x - y)^2) / n`, limits MAX_QUANTIZATION_TOTAL_ERROR = 0.002,
/// _3BITS = 0.0040, _2BITS = 0.0075.
#[test]
fn every_type_meets_llama_cpp_total_error_limits() {
    let n = 32 * 128;
    let data: Vec<f32> = (0..n).map(|i| 0.1 + 2.0 * (i as f32 + 0.1).cos()).collect();
    for t in quant::supported_types() {
        let q = quant::quantize(t, &data, n).unwrap();
        let d = quant::dequantize(t, &q, n).unwrap();
        let sum: f64 = data
            .iter()
            .zip(&d)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let err = sum.sqrt() / n as f64;
        let limit = match t.to_string().as_str() {
            "Q2_K" => 0.0075,
            "Q3_K" => 0.0040,
            _ => 0.002,
        };
        assert!(err < limit, "{t}: total error {err} >= {limit}");
    }
}

/// More bits, less error: relative RMS error on Gaussian weights falls with the type's bits.
#[test]
fn error_falls_with_bits_per_weight() {
    let data = weights(256 * 256, 3);
    let rms = (data.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / data.len() as f64).sqrt();
    let rel = |name: &str| {
        let t = ty(name);
        let q = quant::quantize(t, &data, 256).unwrap();
        let d = quant::dequantize(t, &q, data.len()).unwrap();
        let mse = data
            .iter()
            .zip(&d)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / data.len() as f64;
        mse.sqrt() / rms
    };
    let order = [
        "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "bf16", "f16", "f32",
    ];
    let errs: Vec<f64> = order.iter().map(|n| rel(n)).collect();
    eprintln!(
        "relative RMS error: {:?}",
        order.iter().zip(&errs).collect::<Vec<_>>()
    );
    for w in errs.windows(2) {
        assert!(w[1] < w[0], "error does not fall with bits: {errs:?}");
    }
    assert_eq!(errs[errs.len() - 1], 0.0, "f32 must be exact");
    // Uniform quantization of a Gaussian: Q8_0 steps are amax/127 ~ 3.3 sigma/127.
    assert!(errs[5] < 0.01 && errs[2] < 0.12, "{errs:?}");
}

#[test]
fn errors_name_the_type() {
    let data = vec![0.5f32; 512];
    let e = quant::quantize(ty("iq2_xxs"), &data, 256).unwrap_err();
    assert!(matches!(e, QuantError::Unsupported { .. }));
    assert!(e.to_string().contains("IQ2_XXS"), "{e}");
    let e = quant::dequantize(GgmlType::from_code(99), &[0; 4], 1).unwrap_err();
    assert!(e.to_string().contains("unknown type 99"), "{e}");

    let e = quant::quantize(ty("q4_k"), &data, 128).unwrap_err();
    assert!(matches!(
        e,
        QuantError::RowLength {
            row_len: 128,
            block_size: 256,
            ..
        }
    ));
    assert!(e.to_string().contains("Q4_K"), "{e}");
    let e = quant::quantize(ty("q8_0"), &data[..96], 64).unwrap_err();
    assert!(
        matches!(
            e,
            QuantError::PartialRow {
                n_elements: 96,
                row_len: 64,
                ..
            }
        ),
        "{e}"
    );
    let e = quant::quantize(ty("q8_0"), &data, 0).unwrap_err();
    assert!(matches!(e, QuantError::RowLength { row_len: 0, .. }), "{e}");

    let e = quant::dequantize(ty("q8_0"), &[0; 33], 32).unwrap_err();
    assert!(
        matches!(
            e,
            QuantError::ByteLength {
                expected: 34,
                got: 33,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("Q8_0"), "{e}");
    let e = quant::dequantize(ty("q6_k"), &[0; 210], 255).unwrap_err();
    assert!(matches!(e, QuantError::PartialBlock { .. }), "{e}");
    // A huge element count from a bad header is refused before allocating.
    let e = quant::dequantize(ty("f32"), &[0; 4], usize::MAX).unwrap_err();
    assert!(matches!(e, QuantError::TooLarge { .. }), "{e}");
    let mut out = vec![0u8; 10];
    let e = quant::quantize_into(ty("q8_0"), &data[..32], 32, &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            QuantError::ByteLength {
                expected: 34,
                got: 10,
                ..
            }
        ),
        "{e}"
    );

    assert!(quant::quantize(ty("q4_0"), &[], 32).unwrap().is_empty());
}

// ---- gguf-py, an independent implementation (numpy) ----

fn python_with_gguf() -> bool {
    let ok = common::data::python_has("gguf, numpy");
    if !ok {
        common::data::skip_or_fail::<()>("python3 with the gguf package (pip install gguf)");
    }
    ok
}

fn run_gguf_py(dir: &Path, jobs: serde_json::Value) {
    let jobs_path = dir.join("jobs.json");
    std::fs::write(&jobs_path, serde_json::to_vec(&jobs).unwrap()).unwrap();
    let out = Command::new("python3")
        .arg(common::root().join("tests/gguf_py_quant.py"))
        .arg(&jobs_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf_py_quant.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_f32(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Largest distance in units in the last place between two f32 arrays (0 = identical bits).
fn max_ulp(a: &[f32], b: &[f32]) -> u32 {
    assert_eq!(a.len(), b.len());
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        if i < 0 {
            i32::MIN.wrapping_sub(i)
        } else {
            i
        }
    };
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            (key(*x) as i64 - key(*y) as i64)
                .unsigned_abs()
                .min(u32::MAX as u64) as u32
        })
        .max()
        .unwrap_or(0)
}

/// The same fingerprint as tests/gguf_py_quant.py: sum(bits[i] * (i * 2654435761 + 1)) mod 2^64.
fn fingerprint(v: &[f32]) -> u64 {
    v.iter().enumerate().fold(0u64, |acc, (i, x)| {
        let w = (i as u64).wrapping_mul(2654435761).wrapping_add(1);
        acc.wrapping_add((x.to_bits() as u64).wrapping_mul(w))
    })
}

#[test]
fn dequantize_matches_gguf_py_for_every_type() {
    if !python_with_gguf() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let row_len = 1024;
    let data = weights(16 * row_len, 5);
    let mut jobs = Vec::new();
    let mut cases = Vec::new();
    for t in quant::supported_types() {
        if t.to_string() == "Q8_K" {
            continue; // gguf-py has no Q8_K (it is only llama.cpp's dot-product helper type)
        }
        let q = quant::quantize(t, &data, row_len).unwrap();
        let bin = dir.path().join(format!("{t}.bin"));
        let out = dir.path().join(format!("{t}.f32"));
        std::fs::write(&bin, &q).unwrap();
        jobs.push(
            serde_json::json!({"op": "dequantize", "type": t.to_string(),
            "input": bin, "n": data.len(), "output": out}),
        );
        cases.push((t, q, out));
    }
    run_gguf_py(dir.path(), serde_json::Value::Array(jobs));
    for (t, q, out) in cases {
        let ours = quant::dequantize(t, &q, data.len()).unwrap();
        let theirs = read_f32(&out);
        let ulp = max_ulp(&ours, &theirs);
        eprintln!("{t}: max ulp vs gguf-py dequantize = {ulp}");
        assert!(
            ulp <= 1,
            "{t}: dequantized values differ from gguf-py by {ulp} ulp"
        );
    }
}

/// gguf-py quantizes only the legacy types (and F16/BF16) itself; compare bytes exactly.
#[test]
fn quantize_matches_gguf_py_bytes() {
    if !python_with_gguf() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let row_len = 2048;
    let mut data = weights(32 * row_len, 9);
    // Values exactly halfway between two levels, where rounding conventions would show.
    for (i, x) in data.iter_mut().take(4096).enumerate() {
        *x = (i % 32) as f32 * 0.5 - 8.25;
    }
    let input = dir.path().join("x.f32");
    write_f32(&input, &data);
    let names = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"];
    let jobs: Vec<_> = names
        .iter()
        .map(|n| {
            serde_json::json!({"op": "quantize", "type": n, "input": input, "row_len": row_len,
                "output": dir.path().join(format!("{n}.bin"))})
        })
        .collect();
    run_gguf_py(dir.path(), serde_json::Value::Array(jobs));
    for n in names {
        let t = ty(n);
        let ours = quant::quantize(t, &data, row_len).unwrap();
        let theirs = std::fs::read(dir.path().join(format!("{n}.bin"))).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{n}");
        let bs = t.info().unwrap().type_size as usize;
        let differing = ours
            .chunks(bs)
            .zip(theirs.chunks(bs))
            .filter(|(a, b)| a != b)
            .count();
        eprintln!(
            "{n}: {differing} of {} blocks differ from gguf-py",
            ours.len() / bs
        );
        assert_eq!(differing, 0, "{n}: quantized bytes differ from gguf-py");
    }
}

/// Every tensor of the real SmolLM2 Q4_1 file (Q4_1, Q8_0, F32) dequantized by us and by
/// gguf-py (its own GGUF reader finds the tensors): identical f32 bits.
#[test]
fn real_gguf_dequantizes_like_gguf_py() {
    let Some(gguf) = common::smollm_gguf() else {
        return;
    };
    if !python_with_gguf() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listing = dir.path().join("tensors.json");
    let dump = [
        "blk.0.attn_k.weight",
        "blk.29.ffn_down.weight",
        "output_norm.weight",
    ];
    run_gguf_py(
        dir.path(),
        serde_json::json!([{"op": "gguf", "input": gguf, "output": listing,
            "dump": dump, "dump_dir": dir.path()}]),
    );
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&listing).unwrap()).unwrap();
    let file = std::fs::read(&gguf).unwrap();
    let mut by_type = std::collections::BTreeMap::<String, usize>::new();
    for r in &rows {
        let name = r["name"].as_str().unwrap();
        let t = GgmlType::from_code(r["type"].as_u64().unwrap() as u32);
        let n = r["n_elements"].as_u64().unwrap() as usize;
        let off = r["offset"].as_u64().unwrap() as usize;
        let len = r["n_bytes"].as_u64().unwrap() as usize;
        assert_eq!(quant::quantized_size(t, n).unwrap(), len, "{name}");
        let ours = quant::dequantize(t, &file[off..off + len], n).unwrap();
        if dump.contains(&name) {
            let theirs = read_f32(&dir.path().join(format!("{name}.f32")));
            assert_eq!(
                max_ulp(&ours, &theirs),
                0,
                "{name}: values differ from gguf-py"
            );
        }
        assert_eq!(
            fingerprint(&ours),
            r["fingerprint"].as_u64().unwrap(),
            "{name} ({t}): dequantized bits differ from gguf-py"
        );
        *by_type.entry(t.to_string()).or_default() += 1;
    }
    eprintln!("identical to gguf-py: {by_type:?}");
    assert_eq!(rows.len(), 272);
    assert!(by_type.contains_key("Q4_1") && by_type.contains_key("Q8_0"));
}

#[test]
fn type_table_sizes_match_candle_blocks() {
    // The compile-time asserts in src/quant/codec.rs tie candle's structs to our table; this
    // checks the table against ggml's published sizes (gguf-py GGML_QUANT_SIZES).
    for (t, bs, ts) in [
        (&types::Q4_0, 32, 18),
        (&types::Q4_1, 32, 20),
        (&types::Q5_0, 32, 22),
        (&types::Q5_1, 32, 24),
        (&types::Q8_0, 32, 34),
        (&types::Q2_K, 256, 84),
        (&types::Q3_K, 256, 110),
        (&types::Q4_K, 256, 144),
        (&types::Q5_K, 256, 176),
        (&types::Q6_K, 256, 210),
        (&types::Q8_K, 256, 292),
    ] {
        assert_eq!((t.block_size, t.type_size), (bs, ts), "{}", t.name);
        assert_eq!(
            quant::quantized_size(GgmlType::Known(t), bs as usize * 3).unwrap(),
            3 * ts as usize
        );
    }
}
