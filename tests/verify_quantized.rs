//! The verifier on quantized files, where quantization noise could hide a recipe fault: a tiny
//! model (hidden 256, so that every matrix takes k-quants) with ABF + the step law, converted to
//! q8_0, q4_k_m and q2_k. The correct files pass on every backend; planted faults in the q8_0
//! and q4_k_m files (wrong freq_base, temperature scale off by 10%, scaling key dropped, q/k
//! rows not permuted) each fail with the right diagnosis on every backend. The consistency
//! comparison (the file's own weights in our forward with the reference recipe) carries no
//! weight noise, so the recipe faults show there at any type.

mod common;

use std::path::{Path, PathBuf};

use abf::checkpoint::Checkpoint;
use abf::convert::quant_plan::OutType;
use abf::convert::{plan_to_gguf, write_gguf, ToGgufOptions};
use abf::gguf::{open_mmap, rewrite, ArchKey, GgufWriter, Metadata, TensorSpec, Value};
use abf::runtime::BackendKind;
use abf::verify::{verify, TokenSource, VerifyOptions, VerifyReport};
use common::model::{Init, TinyModel};

fn backends() -> Vec<BackendKind> {
    if cfg!(feature = "llamacpp") {
        vec![BackendKind::Candle, BackendKind::LlamaCpp]
    } else {
        vec![BackendKind::Candle]
    }
}

const ARCH: &str = "mistral3";

fn model() -> TinyModel {
    TinyModel::new().kquant_shape().init(Init::Scaled(None))
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    root: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let dir = root.join("tiny");
    model().abf_step().seed(11).write(&dir);
    Fixture {
        _tmp: tmp,
        dir,
        root,
    }
}

fn convert(f: &Fixture, out: OutType) -> PathBuf {
    let ckpt = Checkpoint::open(&f.dir).unwrap();
    let path = f.root.join(format!("{}.gguf", out.name()));
    let opts = ToGgufOptions {
        outtype: out,
        ..ToGgufOptions::default()
    };
    let plan = plan_to_gguf(&ckpt, &opts).unwrap();
    write_gguf(&ckpt, &plan, &path, true, &|_, _| {}).unwrap();
    path
}

fn run(f: &Fixture, gguf: &Path) -> VerifyReport {
    let mut opts = VerifyOptions::new(&f.dir, gguf);
    opts.backends = backends();
    opts.source = TokenSource::Random { seed: 5 };
    // 8 x c: the step law's scale differs most from the faults' far from the window
    opts.lengths = vec![512];
    let r = verify(&opts, &mut |_, _, _| {}).unwrap();
    eprintln!("{}", abf::verify::render(&r));
    r
}

fn patched(src: &Path, name: &str, edit: impl FnOnce(&mut Metadata)) -> PathBuf {
    let m = open_mmap(src).unwrap();
    let mut meta = m.file.metadata.clone();
    edit(&mut meta);
    let out = src.with_file_name(name);
    rewrite(src, &m.file, &meta, &out, true).unwrap();
    out
}

/// q/k rows put back in Hugging Face order (whole quantized rows moved: a row's blocks are
/// contiguous).
fn unpermuted(src: &Path, name: &str) -> PathBuf {
    let t = model();
    retensored(src, name, |x, data, _| {
        let heads = if x.name.ends_with("attn_q.weight") {
            t.heads
        } else if x.name.ends_with("attn_k.weight") {
            t.kv_heads
        } else {
            return data.to_vec();
        };
        abf::convert::unpermute_qk(&x.name, data, x.dims[1] as usize, heads).unwrap()
    })
}

/// Every tensor's bytes through `edit(info, bytes, get_by_name)` into `name`.
fn retensored(
    src: &Path,
    name: &str,
    edit: impl Fn(&abf::gguf::TensorInfo, &[u8], &dyn Fn(&str) -> Vec<u8>) -> Vec<u8>,
) -> PathBuf {
    let m = open_mmap(src).unwrap();
    let bytes = m.bytes();
    let out = src.with_file_name(name);
    let mut w = GgufWriter::create(&out, true).unwrap();
    for (k, v) in m.file.metadata.iter() {
        w.add_kv(k, v.clone()).unwrap();
    }
    for t in &m.file.tensors {
        w.add_tensor(TensorSpec::new(t.name.clone(), t.dims.clone(), t.ggml_type).unwrap())
            .unwrap();
    }
    let get = |n: &str| -> Vec<u8> {
        let i = m.file.tensors.iter().position(|t| t.name == n).unwrap();
        m.file.tensor_bytes(bytes, i).unwrap().to_vec()
    };
    for (i, x) in m.file.tensors.iter().enumerate() {
        let data = m.file.tensor_bytes(bytes, i).unwrap();
        let new = edit(x, data, &get);
        w.write_tensor_data(&x.name, &new).unwrap();
    }
    w.commit().unwrap();
    out
}

/// Failed on every backend, each diagnosis containing `word`.
fn caught(r: &VerifyReport, word: &str) {
    assert!(!r.pass, "the fault passed");
    assert_eq!(r.backends.len(), backends().len());
    for b in &r.backends {
        let d = b.diagnosis.join("\n");
        assert!(
            d.contains(word),
            "{}: diagnosis {d:?} lacks {word:?}",
            b.backend
        );
    }
}

#[test]
fn quantized_files_pass_and_planted_faults_fail_with_their_diagnosis() {
    let f = fixture();
    for out in [OutType::Q8_0, OutType::Q4KM, OutType::Q2K] {
        let good = convert(&f, out);
        let r = run(&f, &good);
        assert!(r.pass, "{}: the correct file failed", out.name());
        if out == OutType::Q2K {
            continue;
        }
        let base = patched(&good, "base.gguf", |m| {
            m.set(ArchKey::RopeFreqBase.key(ARCH), Value::F32(10000.0));
        });
        caught(&run(&f, &base), "rotary");
        let temp = patched(&good, "temp.gguf", |m| {
            let k = ArchKey::AttentionTemperatureScale.key(ARCH);
            let Some(Value::F32(b)) = m.get(&k).cloned() else {
                panic!("no {k}")
            };
            m.set(k, Value::F32(b * 1.1));
        });
        caught(&run(&f, &temp), "beyond");
        let dropped = patched(&good, "dropped.gguf", |m| {
            m.remove(&ArchKey::AttentionTemperatureScale.key(ARCH));
        });
        caught(&run(&f, &dropped), "beyond");
        let noperm = unpermuted(&good, "noperm.gguf");
        caught(&run(&f, &noperm), "permuted");
        // two tensors of one shape swapped: the weight check names them
        let swap = retensored(&good, "swap.gguf", |x, data, get| match x.name.as_str() {
            "blk.0.ffn_gate.weight" => get("blk.0.ffn_up.weight"),
            "blk.0.ffn_up.weight" => get("blk.0.ffn_gate.weight"),
            _ => data.to_vec(),
        });
        let r = run(&f, &swap);
        caught(&r, "not the checkpoint's");
        assert!(r
            .weights
            .failures()
            .any(|t| t.tensor == "blk.0.ffn_gate.weight"));
    }
}

/// A q8_0 file whose every matrix carries noise of 3% of its RMS before rounding (about 7x
/// q8_0's own rounding here): the weight check and the plain-quantization fidelity line both
/// catch it, on every backend, as weights rounded worse than their type.
#[test]
fn weights_rounded_worse_than_their_type_fail_fidelity_and_the_weight_check() {
    let f = fixture();
    let good = convert(&f, OutType::Q8_0);
    let noisy = retensored(&good, "noisy.gguf", |x, data, _| {
        if x.dims.len() < 2 {
            return data.to_vec();
        }
        let n = x.elements() as usize;
        let mut v = abf::quant::dequantize(x.ggml_type, data, n).unwrap();
        let rms = (v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>() / n as f64).sqrt();
        let mut rng = common::rng::Rng::new(x.name.len() as u64);
        for a in v.iter_mut() {
            *a += (0.03 * rms * rng.uniform() * 3f64.sqrt()) as f32;
        }
        abf::quant::quantize(x.ggml_type, &v, x.dims[0] as usize).unwrap()
    });
    let r = run(&f, &noisy);
    assert!(!r.pass);
    assert!(r.metadata.is_empty(), "{:?}", r.metadata);
    assert!(!r.weights.pass);
    assert!(r.weights.failures().all(|t| t
        .finding
        .as_deref()
        .is_some_and(|x| x.contains("worse than a plain"))));
    for b in &r.backends {
        assert!(!b.fidelity_pass, "{}: fidelity passed", b.backend);
        assert!(
            b.runtime_pass,
            "{}: the runtime computes the file right",
            b.backend
        );
    }
}
