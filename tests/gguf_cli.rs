//! `abf-convert inspect` / `patch-gguf` end to end, and the real SmolLM2 GGUF read the same way
//! llama.cpp's gguf-py reads it.

mod common;

use std::path::Path;
use std::process::Command;

use abf::gguf::writer::encode_value;
use abf::gguf::{open_mmap, GgmlType, GgufFile, GgufWriter, Metadata, TensorSpec, Value};
use serde_json::Value as Json;

fn abf_convert(args: &[&str]) -> (i32, String, String) {
    common::bin::run(common::bin::Bin::Convert, args).parts()
}

fn tiny(path: &Path) {
    let mut m = Metadata::new();
    m.set_architecture("llama");
    m.set("general.name", Value::string("tiny"));
    m.set_context_length("llama", 2048).unwrap();
    m.set_arch_u32("llama", abf::gguf::ArchKey::RopeDimensionCount, 64)
        .unwrap();
    m.set_rope_freq_base("llama", 10000.0).unwrap();
    let t = TensorSpec::new("token_embd.weight", vec![64, 2], GgmlType::from_code(0)).unwrap();
    let mut w = GgufWriter::create(path, true).unwrap();
    for (k, v) in m.iter() {
        w.add_kv(k, v.clone()).unwrap();
    }
    w.add_tensor(t).unwrap();
    w.write_tensor_data("token_embd.weight", &[5u8; 512])
        .unwrap();
    w.commit().unwrap();
}

fn json(s: &str) -> Json {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn inspect_json_and_bad_input_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.gguf");
    tiny(&p);
    let (code, out, _) = abf_convert(&["inspect", p.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0);
    let j = json(&out);
    assert_eq!(j["version"], 3);
    assert_eq!(j["summary"]["architecture"], "llama");
    assert_eq!(j["summary"]["context_length"], 2048);
    assert_eq!(j["tensors"][0]["shape"], serde_json::json!([64, 2]));
    assert_eq!(j["recipe"]["method"], "default");
    // truncated, garbage and missing files: exit 2 with a message naming the problem
    let bytes = std::fs::read(&p).unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, err) = abf_convert(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("token_embd.weight"), "{err}");
    std::fs::write(&bad, b"not a gguf").unwrap();
    let (code, _, err) = abf_convert(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("magic"), "{err}");
    let (code, _, _) = abf_convert(&["inspect", "/nonexistent.gguf"]);
    assert_eq!(code, 2);
}

#[test]
fn patch_gguf_modes_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.gguf");
    tiny(&p);
    let ps = p.to_str().unwrap();
    let before = std::fs::read(&p).unwrap();
    // same-size edit: in place
    let (code, out, err) = abf_convert(&[
        "patch-gguf",
        ps,
        "--in-place",
        "--set",
        "llama.rope.freq_base=f32:500000",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let j = json(&out);
    assert_eq!(j["mode"], "in-place");
    assert_eq!(j["changes"][0]["key"], "llama.rope.freq_base");
    let after = std::fs::read(&p).unwrap();
    assert_eq!(after.len(), before.len());
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert!((1..=4).contains(&changed), "{changed} bytes changed");
    // size-changing edit in place: refused without --allow-rewrite, file untouched
    let (code, _, err) = abf_convert(&[
        "patch-gguf",
        ps,
        "--in-place",
        "--set",
        "general.name=string:a much longer name",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--allow-rewrite"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), after);
    // dry run: prints the diff, writes nothing
    let (code, out, _) = abf_convert(&[
        "patch-gguf",
        ps,
        "--method",
        "yarn",
        "--factor",
        "4",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(code, 0);
    let j = json(&out);
    assert!(j["changes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["key"] == "llama.rope.scaling.type"));
    assert_eq!(std::fs::read(&p).unwrap(), after);
    // wrong type for a key llama.cpp types: refused
    let (code, _, err) = abf_convert(&[
        "patch-gguf",
        ps,
        "--in-place",
        "--set",
        "llama.context_length=u64:4096",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("u32"), "{err}");
    // bad --set syntax, unknown key to delete
    assert_eq!(
        abf_convert(&["patch-gguf", ps, "--in-place", "--set", "novalue"]).0,
        2
    );
    assert_eq!(
        abf_convert(&["patch-gguf", ps, "--in-place", "--delete", "no.such.key"]).0,
        2
    );
    // eabf: refused for llama.cpp unless approximate, then relabelled to mistral3
    let o = dir.path().join("e.gguf");
    let os = o.to_str().unwrap();
    let (code, _, err) = abf_convert(&["patch-gguf", ps, "-o", os, "--method", "eabf"]);
    assert_eq!(code, 2);
    assert!(err.contains("--allow-approximate"), "{err}");
    assert!(!o.exists());
    let (code, out, err) = abf_convert(&[
        "patch-gguf",
        ps,
        "-o",
        os,
        "--method",
        "eabf",
        "--allow-approximate",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(json(&out)["notes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n.as_str().unwrap().starts_with("approximate")));
    let (_, out, _) = abf_convert(&["inspect", os, "--json"]);
    let j = json(&out);
    assert_eq!(j["summary"]["architecture"], "mistral3");
    assert_eq!(j["recipe"]["scale_law"], "step");
    // exact runtime: our keys carry the exact recipe
    let x = dir.path().join("x.gguf");
    let (code, _, err) = abf_convert(&[
        "patch-gguf",
        ps,
        "-o",
        x.to_str().unwrap(),
        "--method",
        "eabf",
        "--runtime",
        "exact",
        "--allow-approximate",
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = abf_convert(&["inspect", x.to_str().unwrap(), "--json"]);
    let j = json(&out);
    assert_eq!(j["recipe"]["method"], "eabf");
    assert_eq!(j["recipe"]["scale_law"], "log");
    // in place with --allow-rewrite: rewritten, tensor bytes the same
    let (code, out, err) = abf_convert(&[
        "patch-gguf",
        ps,
        "--in-place",
        "--allow-rewrite",
        "--set",
        "general.name=string:a much longer name",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["mode"], "rewrite");
    let m = open_mmap(&p).unwrap();
    assert_eq!(m.file.tensor_bytes(m.bytes(), 0).unwrap(), &[5u8; 512]);
}

/// FNV-1a 64 of an array's elements as gguf_py_dump.py hashes them.
fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

#[test]
fn smollm2_reads_as_gguf_py_reads_it() {
    let Some(path) = common::smollm_gguf() else {
        return;
    };
    let py = Command::new("python3")
        .arg(common::root().join("tests/gguf_py_dump.py"))
        .arg(&path)
        .output();
    let py = match py {
        Ok(o) if o.status.success() => o,
        other => {
            common::data::skip_or_fail::<()>(format_args!(
                "python3 with the gguf package (gguf_py_dump.py: {other:?})"
            ));
            return;
        }
    };
    let theirs = json(&String::from_utf8_lossy(&py.stdout));
    let m = open_mmap(&path).unwrap();
    let f: &GgufFile = &m.file;
    let keys = theirs["keys"].as_array().unwrap();
    assert_eq!(keys.len(), f.metadata.len());
    for (k, (ours_k, ours_v)) in keys.iter().zip(f.metadata.iter()) {
        assert_eq!(k["name"], ours_k, "key order");
        assert_eq!(k["type"], ours_v.value_type().code(), "{ours_k}");
        match ours_v {
            Value::Array(a) => {
                assert_eq!(k["elem_type"], a.elem_type().code(), "{ours_k}");
                assert_eq!(k["len"], a.len(), "{ours_k}");
                let mut enc = Vec::new();
                encode_value(&mut enc, ours_v);
                assert_eq!(k["fnv1a64"], fnv1a64(&enc[12..]), "{ours_k}");
                for (i, item) in k["first"].as_array().unwrap().iter().enumerate() {
                    let v = a.get(i).unwrap();
                    match v.as_str() {
                        Some(s) => assert_eq!(item, s, "{ours_k}[{i}]"),
                        None => assert_eq!(item.as_f64(), v.as_f64(), "{ours_k}[{i}]"),
                    }
                }
            }
            Value::String(_) => assert_eq!(k["value"], ours_v.as_str().unwrap(), "{ours_k}"),
            Value::Bool(b) => assert_eq!(k["value"], *b, "{ours_k}"),
            v => assert_eq!(k["value"].as_f64(), v.as_f64(), "{ours_k}"),
        }
    }
    let tensors = theirs["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), f.tensors.len());
    for (t, ours) in tensors.iter().zip(&f.tensors) {
        assert_eq!(t["name"], ours.name.as_str());
        assert_eq!(t["type"], ours.ggml_type.code(), "{}", ours.name);
        assert_eq!(t["shape"], serde_json::json!(ours.dims), "{}", ours.name);
        assert_eq!(t["offset"], f.data_start + ours.offset, "{}", ours.name);
        assert_eq!(t["n_bytes"], ours.size, "{}", ours.name);
    }
}

#[test]
fn smollm2_round_trips_and_patches() {
    let Some(path) = common::smollm_gguf() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let m = open_mmap(&path).unwrap();
    // read -> write -> read: identical metadata, order and tensor bytes
    abf::gguf::rewrite(&path, &m.file, &m.file.metadata, &out, false).unwrap();
    let r = open_mmap(&out).unwrap();
    assert_eq!(r.file.metadata, m.file.metadata);
    assert_eq!(r.file.tensors.len(), m.file.tensors.len());
    for i in 0..m.file.tensors.len() {
        assert_eq!(r.file.tensors[i].offset, m.file.tensors[i].offset);
        assert_eq!(
            r.file.tensor_bytes(r.bytes(), i),
            m.file.tensor_bytes(m.bytes(), i)
        );
    }
    // llama.cpp's own writer produced this file: ours reproduces it byte for byte
    assert_eq!(r.bytes(), &m.bytes()[..r.bytes().len()]);
    // in place on a copy: only the value's bytes change
    let copy = dir.path().join("copy.gguf");
    std::fs::copy(&path, &copy).unwrap();
    let (code, _, err) = abf_convert(&[
        "patch-gguf",
        copy.to_str().unwrap(),
        "--in-place",
        "--method",
        "abf",
        "--rope-base",
        "500000",
        "--context",
        "8192",
    ]);
    assert_eq!(code, 0, "{err}");
    let c = std::fs::read(&copy).unwrap();
    let span = m.file.span("llama.rope.freq_base").unwrap();
    let diffs: Vec<usize> = (0..c.len()).filter(|&i| c[i] != m.bytes()[i]).collect();
    assert!(!diffs.is_empty());
    assert!(
        diffs
            .iter()
            .all(|&i| (span.value_offset as usize..span.value_end as usize).contains(&i)),
        "{diffs:?}"
    );
}

/// The recipe `abf-convert inspect --json` reads from `path`.
fn recipe_of(path: &Path) -> Json {
    let (code, out, err) = abf_convert(&["inspect", path.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    json(&out)["recipe"].clone()
}

/// A patch killed right after its first write (`ABF_FAILPOINT=patch-after-first-write`, a
/// SIGKILL before the fsync) leaves the whole new recipe, never a mix: every changed value goes
/// out in one write. Writing value by value would leave the first value new and the rest old.
#[test]
fn patch_killed_after_its_first_write_leaves_one_whole_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("t.gguf");
    tiny(&src);
    let p = dir.path().join("eabf.gguf");
    let recipe = |base: &str| {
        [
            "--method",
            "eabf",
            "--runtime",
            "exact",
            "--allow-approximate",
            "--rope-base",
            base,
            "--original-context",
            "2048",
        ]
        .map(String::from)
    };
    let mut args = vec!["patch-gguf".to_string(), s(&src), "-o".into(), s(&p)];
    args.extend(recipe("500000"));
    let (code, _, err) = abf_convert(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let before = std::fs::read(&p).unwrap();
    let old = recipe_of(&p);

    let mut args = vec![
        "patch-gguf".to_string(),
        s(&p),
        "--in-place".into(),
        "--json".into(),
    ];
    args.extend(recipe("800000"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = abf_convert(&[args.as_slice(), &["--dry-run"]].concat());
    assert_eq!(code, 0, "{err}");
    let plan = json(&out);
    assert_eq!(plan["mode"], "in-place");
    let changed: Vec<&str> = plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert!(changed.len() >= 2, "one edit only: {changed:?}");

    let killed = common::bin::output(
        common::bin::Bin::Convert
            .command()
            .args(&args)
            .env(abf::fsutil::FAILPOINT_ENV, "patch-after-first-write"),
    );
    assert_eq!(killed.code, -1, "not killed: {}", killed.stderr);
    let after = std::fs::read(&p).unwrap();
    assert_eq!(after.len(), before.len());
    assert_ne!(after, before, "the write happened before the kill");
    let new = recipe_of(&p);
    assert_ne!(new, old);
    assert_eq!(new["rope_base"], 800000.0, "{new}");
    // every changed key, llama.cpp's and ours alike, holds its new value
    let m = open_mmap(&p).unwrap();
    for c in plan["changes"].as_array().unwrap() {
        let key = c["key"].as_str().unwrap();
        let v = m.file.metadata.get(key).unwrap_or_else(|| panic!("{key}"));
        assert_eq!(v.to_json(None), c["value"], "{key}");
    }

    // the same patch run to completion writes the same bytes: nothing was half-written
    std::fs::write(&p, &before).unwrap();
    let (code, _, err) = abf_convert(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), after);
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}
