//! Split GGUF sets (llama.cpp's `gguf-split` layout): `to-gguf --split-max-tensors/--split-max-size`
//! writes parts whose names, split keys and tensor bytes are checked against the single-file
//! conversion (and gguf-py's reading of each part); every reader takes the set by its first
//! file (inspect, from-gguf, patch-gguf, abf-eval, abf-verify); a missing or mismatched part is
//! an error naming the part; real llama.cpp loads the set from its first file and computes the
//! single file's logits bit for bit (the tiny model and SmolLM2).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use abf::gguf::keys::split;
use abf::gguf::{
    open_mmap, open_set, write_parts, GgmlType, GgufError, MappedGguf, Metadata, TensorSpec, Value,
};
use common::bin::{self, Bin};
use common::model::TinyModel;

/// gguf-py's `GGUFValueType` codes of the split keys' types (constants.py).
const GGUF_PY_UINT16: u64 = 2;
const GGUF_PY_INT32: u64 = 5;

struct Converted {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    dir: PathBuf,
    single: PathBuf,
}

/// The tiny model and its single-file f16 conversion through the CLI.
fn converted() -> Converted {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let dir = TinyModel::new().seed(11).write(&root.join("tiny"));
    let single = root.join("single.gguf");
    convert(&dir, &single, &[]);
    Converted {
        _tmp: tmp,
        root,
        dir,
        single,
    }
}

fn convert(dir: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "to-gguf",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    bin::run(Bin::Convert, &args).expect_code(0).json()
}

/// `PREFIX-0000k-of-0000n.gguf` spelled out here, independently of the code under test.
fn part_name(prefix: &Path, k: usize, n: usize) -> PathBuf {
    PathBuf::from(format!("{}-{k:05}-of-{n:05}.gguf", prefix.display()))
}

fn padded(size: u64) -> u64 {
    size.div_ceil(32) * 32
}

/// The split keys of one part as (no, count, total), checking their types.
fn split_keys(m: &MappedGguf) -> (u16, u16, i32) {
    let meta = &m.file.metadata;
    match (
        meta.get(split::NO),
        meta.get(split::COUNT),
        meta.get(split::TENSORS_COUNT),
    ) {
        (Some(Value::U16(no)), Some(Value::U16(count)), Some(Value::I32(total))) => {
            (*no, *count, *total)
        }
        other => panic!("split keys missing or of the wrong type: {other:?}"),
    }
}

/// Check a set written at `prefix` against the single file: names, keys (our reader), every
/// tensor's bytes, and the metadata of the first part. Returns the parts, mapped.
fn check_set(
    single: &Path,
    prefix: &Path,
    n: usize,
    report: &serde_json::Value,
) -> Vec<MappedGguf> {
    let one = open_mmap(single).unwrap();
    let names: Vec<PathBuf> = (1..=n).map(|k| part_name(prefix, k, n)).collect();
    let listed: Vec<PathBuf> = report["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PathBuf::from(p.as_str().unwrap()))
        .collect();
    assert_eq!(listed, names);
    let parts: Vec<MappedGguf> = names.iter().map(|p| open_mmap(p).unwrap()).collect();
    let total = one.file.tensors.len();
    let mut k = 0;
    for (no, part) in parts.iter().enumerate() {
        assert_eq!(split_keys(part), (no as u16, n as u16, total as i32));
        let meta = &part.file.metadata;
        if no == 0 {
            // all of the single file's metadata, in its order, then the three split keys
            assert_eq!(meta.len(), one.file.metadata.len() + 3);
            for ((a, x), (b, y)) in one.file.metadata.iter().zip(meta.iter()) {
                assert_eq!((a, x), (b, y));
            }
        } else {
            assert_eq!(meta.len(), 3, "part {}: only the split keys", no + 1);
        }
        assert!(!part.file.tensors.is_empty(), "part {} is empty", no + 1);
        for (j, t) in part.file.tensors.iter().enumerate() {
            let s = &one.file.tensors[k];
            assert_eq!(
                (&t.name, &t.dims, t.ggml_type),
                (&s.name, &s.dims, s.ggml_type)
            );
            assert_eq!(
                part.file.tensor_bytes(part.bytes(), j).unwrap(),
                one.file.tensor_bytes(one.bytes(), k).unwrap(),
                "{}",
                t.name
            );
            k += 1;
        }
    }
    assert_eq!(k, total, "every tensor in exactly one part");
    // the opener gives the same tensors and bytes as the single file
    let set = open_set(&names[0]).unwrap();
    assert!(set.is_split());
    assert_eq!(set.file.metadata, parts[0].file.metadata);
    assert_eq!(set.file.tensors.len(), total);
    for i in 0..total {
        assert_eq!(set.file.tensors[i].name, one.file.tensors[i].name);
        assert_eq!(
            set.tensor_data(i).unwrap(),
            one.file.tensor_bytes(one.bytes(), i).unwrap()
        );
    }
    parts
}

/// gguf-py's keys of one part: (name, type code, value).
type PyKeys = Vec<(String, u64, serde_json::Value)>;

/// gguf-py's reading of one part: its keys and its tensors (name, bytes).
fn gguf_py(path: &Path) -> Option<(PyKeys, Vec<(String, u64)>)> {
    let out = Command::new("python3")
        .arg(common::root().join("tests/gguf_py_dump.py"))
        .arg(path)
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        other => {
            return common::data::skip_or_fail(format_args!(
                "python3 with the gguf package (gguf_py_dump.py: {other:?})"
            ))
        }
    };
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = j["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_string(),
                k["type"].as_u64().unwrap(),
                k["value"].clone(),
            )
        })
        .collect();
    let tensors = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["n_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    Some((keys, tensors))
}

#[test]
fn split_by_tensors_and_by_size_keeps_every_tensor() {
    let c = converted();
    let one = open_mmap(&c.single).unwrap();
    let total = one.file.tensors.len();

    // --split-max-tensors 4: ceil(total / 4) parts of 4 (the last holds the rest)
    let n = total.div_ceil(4);
    assert!(n >= 3, "{total} tensors");
    let report = convert(
        &c.dir,
        &c.root.join("bycount.gguf"),
        &["--split-max-tensors", "4"],
    );
    let parts = check_set(&c.single, &c.root.join("bycount"), n, &report);
    for (no, p) in parts.iter().enumerate() {
        let want = if no + 1 < n { 4 } else { total - 4 * (n - 1) };
        assert_eq!(p.file.tensors.len(), want, "part {}", no + 1);
    }
    assert!(!c.root.join("bycount.gguf").exists());

    // --split-max-size: the limit is twice the largest padded tensor, so parts hold several
    // tensors; greedy: each part is within the limit and the next part's first tensor would
    // not have fit
    let sizes: Vec<u64> = one.file.tensors.iter().map(|t| padded(t.size)).collect();
    let limit = 2 * sizes.iter().max().unwrap();
    let mut want_parts = vec![0usize];
    let mut held = 0u64;
    for &s in &sizes {
        if held > 0 && held + s > limit {
            want_parts.push(0);
            held = 0;
        }
        held += s;
        *want_parts.last_mut().unwrap() += 1;
    }
    let n = want_parts.len();
    assert!(n >= 3, "{n} parts");
    let report = convert(
        &c.dir,
        &c.root.join("bysize"),
        &["--split-max-size", &format!("{limit}")],
    );
    let parts = check_set(&c.single, &c.root.join("bysize"), n, &report);
    for (p, want) in parts.iter().zip(&want_parts) {
        assert_eq!(p.file.tensors.len(), *want);
        let data: u64 = p.file.tensors.iter().map(|t| padded(t.size)).sum();
        assert!(data <= limit, "{data} > {limit}");
    }

    // a limit the whole model fits: one plain file at the path given, no split keys
    let whole = c.root.join("whole.gguf");
    convert(&c.dir, &whole, &["--split-max-size", "1G"]);
    assert_eq!(
        std::fs::read(&whole).unwrap(),
        std::fs::read(&c.single).unwrap()
    );

    // gguf-py reads every part: the split keys with llama.cpp's types, the tensors in order
    let mut seen = Vec::new();
    for k in 1..=n {
        let Some((keys, tensors)) = gguf_py(&part_name(&c.root.join("bysize"), k, n)) else {
            return;
        };
        let get = |name: &str| keys.iter().find(|x| x.0 == name).cloned().unwrap();
        assert_eq!(get("split.no").1, GGUF_PY_UINT16);
        assert_eq!(get("split.no").2, (k - 1) as u64);
        assert_eq!(get("split.count").1, GGUF_PY_UINT16);
        assert_eq!(get("split.count").2, n as u64);
        assert_eq!(get("split.tensors.count").1, GGUF_PY_INT32);
        assert_eq!(get("split.tensors.count").2, total as u64);
        if k > 1 {
            assert_eq!(keys.len(), 3);
        }
        seen.extend(tensors);
    }
    let want: Vec<(String, u64)> = one
        .file
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.size))
        .collect();
    assert_eq!(seen, want);
}

/// The single file split into three parts at `out` (prefix `out` less `.gguf`) through
/// `write_parts`, as `gguf-split` would split it.
fn resplit(single: &Path, out: &Path) -> Vec<PathBuf> {
    let one = open_mmap(single).unwrap();
    let specs: Vec<TensorSpec> = one
        .file
        .tensors
        .iter()
        .map(|t| TensorSpec::with_size(&t.name, t.dims.clone(), t.ggml_type, t.size))
        .collect();
    let n = specs.len();
    let groups = vec![0..n / 3, n / 3..2 * n / 3, 2 * n / 3..n];
    let w = write_parts(out, &one.file.metadata, &specs, &groups, true, |i| {
        Ok::<_, GgufError>(one.file.tensor_bytes(one.bytes(), i).unwrap())
    })
    .unwrap();
    w.paths
}

fn inspect_err(path: &Path) -> String {
    let r = bin::run(Bin::Convert, &["inspect", path.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    r.stderr
}

#[test]
fn missing_or_mismatched_parts_are_errors_naming_the_part() {
    let c = converted();
    let parts = resplit(&c.single, &c.root.join("s.gguf"));
    assert_eq!(
        parts,
        (1..=3)
            .map(|k| part_name(&c.root.join("s"), k, 3))
            .collect::<Vec<_>>()
    );
    bin::run(Bin::Convert, &["inspect", parts[0].to_str().unwrap()]).expect_code(0);
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();

    // a missing part
    let aside = c.root.join("aside");
    std::fs::rename(&parts[1], &aside).unwrap();
    let err = inspect_err(&parts[0]);
    assert!(
        err.contains(&name(&parts[1])) && err.contains("missing"),
        "{err}"
    );
    // abf-eval and abf-verify say the same
    let toks = c.root.join("t.json");
    std::fs::write(&toks, "[1, 2, 3]").unwrap();
    let r = bin::output(
        Bin::Eval
            .command()
            .args(["logits", "--model"])
            .arg(&parts[0])
            .arg("--tokens")
            .arg(&toks)
            .arg("--out")
            .arg(c.root.join("o.npy")),
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains(&name(&parts[1])), "{}", r.stderr);
    let r = bin::output(
        Bin::Verify
            .command()
            .arg("--reference")
            .arg(&c.dir)
            .arg("--gguf")
            .arg(&parts[0])
            .args(["--backend", "candle", "--random-tokens", "--quiet"]),
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains(&name(&parts[1])), "{}", r.stderr);

    // parts 2 and 3 swapped: split.no of the file named as part 2 is 2
    std::fs::rename(&parts[2], &parts[1]).unwrap();
    std::fs::rename(&aside, &parts[2]).unwrap();
    let err = inspect_err(&parts[0]);
    assert!(
        err.contains(&name(&parts[1])) && err.contains("split.no is 2, expected 1"),
        "{err}"
    );
    std::fs::rename(&parts[1], &aside).unwrap();
    std::fs::rename(&parts[2], &parts[1]).unwrap();
    std::fs::rename(&aside, &parts[2]).unwrap();
    bin::run(Bin::Convert, &["inspect", parts[0].to_str().unwrap()]).expect_code(0);

    // a part of another set: split.tensors.count differs
    let m = open_mmap(&parts[2]).unwrap();
    let mut meta = m.file.metadata.clone();
    meta.set(split::TENSORS_COUNT, Value::I32(7));
    let stale = c.root.join("stale.gguf");
    abf::gguf::rewrite(&parts[2], &m.file, &meta, &stale, true).unwrap();
    drop(m);
    std::fs::rename(&stale, &parts[2]).unwrap();
    let err = inspect_err(&parts[0]);
    assert!(
        err.contains(&name(&parts[2])) && err.contains("split.tensors.count is 7"),
        "{err}"
    );

    // a split key of the wrong type (llama.cpp reads split.count as a u16)
    let m = open_mmap(&parts[1]).unwrap();
    let mut meta = m.file.metadata.clone();
    meta.set(split::COUNT, Value::U32(3));
    abf::gguf::rewrite(&parts[1], &m.file, &meta, &stale, true).unwrap();
    drop(m);
    std::fs::rename(&stale, &parts[1]).unwrap();
    let err = inspect_err(&parts[0]);
    assert!(
        err.contains(&name(&parts[1])) && err.contains("split.count") && err.contains("u16"),
        "{err}"
    );

    // opening a later part names the first
    let err = inspect_err(&parts[2]);
    assert!(
        err.contains("part 3 of") && err.contains(&name(&parts[0])),
        "{err}"
    );
}

#[test]
fn a_tensor_in_two_parts_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = TensorSpec::new("token_embd.weight", vec![32, 2], GgmlType::from_code(0)).unwrap();
    let mut meta = Metadata::new();
    meta.set_architecture("llama");
    let out = tmp.path().join("dup.gguf");
    let paths = write_parts(&out, &meta, &[t.clone(), t], &[0..1, 1..2], false, |_| {
        Ok::<_, GgufError>(vec![0u8; 256])
    })
    .unwrap()
    .paths;
    let err = open_set(&paths[0]).err().unwrap().to_string();
    assert!(
        err.contains("token_embd.weight") && err.contains("dup-00002-of-00002.gguf"),
        "{err}"
    );
}

#[test]
fn readers_take_the_set_by_its_first_file() {
    let c = converted();
    let parts = resplit(&c.single, &c.root.join("s.gguf"));
    let first = parts[0].to_str().unwrap();

    // inspect: the single file's keys and tensors, each tensor with its part
    let j = bin::run(Bin::Convert, &["inspect", first, "--json"])
        .expect_code(0)
        .json();
    let s = bin::run(
        Bin::Convert,
        &["inspect", c.single.to_str().unwrap(), "--json"],
    )
    .expect_code(0)
    .json();
    assert_eq!(j["parts"].as_array().unwrap().len(), 3);
    assert_eq!(j["summary"], s["summary"]);
    assert_eq!(j["recipe"], s["recipe"]);
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&j), names(&s));
    let n = names(&s).len();
    assert_eq!(j["tensors"][0]["part"], 0);
    assert_eq!(j["tensors"][n - 1]["part"], 2);

    // from-gguf: the same checkpoint as from the single file
    for (src, dst) in [
        (first, "from-set"),
        (c.single.to_str().unwrap(), "from-one"),
    ] {
        let out = c.root.join(dst);
        bin::run(
            Bin::Convert,
            &["from-gguf", src, "-o", out.to_str().unwrap(), "--json"],
        )
        .expect_code(0);
    }
    assert_eq!(
        common::model::tensor_bytes(&c.root.join("from-set/model.safetensors")),
        common::model::tensor_bytes(&c.root.join("from-one/model.safetensors"))
    );

    // abf-eval logits (candle reading of the GGUF): the same bytes as the single file
    let toks = c.root.join("t.json");
    std::fs::write(&toks, "[1, 2, 3, 200, 100, 17, 64]").unwrap();
    let npy = |model: &Path, name: &str| {
        let out = c.root.join(name);
        bin::output(
            Bin::Eval
                .command()
                .args(["logits", "--model"])
                .arg(model)
                .arg("--tokens")
                .arg(&toks)
                .arg("--out")
                .arg(&out),
        )
        .expect_code(0);
        std::fs::read(out).unwrap()
    };
    assert_eq!(npy(&parts[0], "a.npy"), npy(&c.single, "b.npy"));

    // abf-verify: the set passes against its checkpoint, weight check included
    let r = bin::output(
        Bin::Verify
            .command()
            .arg("--reference")
            .arg(&c.dir)
            .arg("--gguf")
            .arg(&parts[0])
            .args([
                "--backend",
                "candle",
                "--random-tokens",
                "--seed",
                "2",
                "--quiet",
                "--json",
            ]),
    );
    let rep = r.expect_code(0).json();
    assert_eq!(rep["pass"], true);
    let checked = rep["weights"]["tensors"].as_array().map(Vec::len);
    assert_eq!(checked, Some(n), "{}", rep["weights"]);
}

#[test]
fn patch_gguf_edits_a_set_through_its_first_part() {
    let c = converted();
    let parts = resplit(&c.single, &c.root.join("s.gguf"));
    let first = parts[0].to_str().unwrap();
    let read =
        |ps: &[PathBuf]| -> Vec<Vec<u8>> { ps.iter().map(|p| std::fs::read(p).unwrap()).collect() };
    let before = read(&parts);
    let key = "llama.rope.freq_base";
    let base = |p: &Path| open_set(p).unwrap().metadata().get(key).cloned();

    // same-size edit: in place, in the first part only
    let j = bin::run(
        Bin::Convert,
        &[
            "patch-gguf",
            first,
            "--in-place",
            "--set",
            &format!("{key}=f32:500000"),
            "--json",
        ],
    )
    .expect_code(0)
    .json();
    assert_eq!(j["mode"], "in-place");
    let after = read(&parts);
    assert_eq!(after[0].len(), before[0].len());
    assert_ne!(after[0], before[0]);
    assert_eq!(after[1..], before[1..]);
    assert_eq!(base(&parts[0]), Some(Value::F32(500000.0)));

    // size-changing edit in place: the first part rewritten, the others untouched
    let j = bin::run(
        Bin::Convert,
        &[
            "patch-gguf",
            first,
            "--in-place",
            "--allow-rewrite",
            "--set",
            "general.name=string:a much longer name than before",
            "--json",
        ],
    )
    .expect_code(0)
    .json();
    assert_eq!(j["mode"], "rewrite");
    let after = read(&parts);
    assert_eq!(after[1..], before[1..]);
    let set = open_set(&parts[0]).unwrap();
    let one = open_mmap(&c.single).unwrap();
    for i in 0..set.file.tensors.len() {
        assert_eq!(set.tensor_data(i), one.file.tensor_bytes(one.bytes(), i));
    }

    // -o: a new set of as many parts, the input untouched
    let j = bin::run(
        Bin::Convert,
        &[
            "patch-gguf",
            first,
            "-o",
            c.root.join("new.gguf").to_str().unwrap(),
            "--set",
            &format!("{key}=f32:1000000"),
            "--json",
        ],
    )
    .expect_code(0)
    .json();
    let new: Vec<PathBuf> = (1..=3)
        .map(|k| part_name(&c.root.join("new"), k, 3))
        .collect();
    assert_eq!(j["output"], new[0].to_str().unwrap());
    assert_eq!(read(&parts), after);
    assert_eq!(base(&new[0]), Some(Value::F32(1000000.0)));
    assert_eq!(read(&new)[1..], before[1..], "parts 2.. copied verbatim");

    // all or nothing: a part of the output exists already, so nothing is written
    let blocked = (1..=3)
        .map(|k| part_name(&c.root.join("blocked"), k, 3))
        .collect::<Vec<_>>();
    std::fs::write(&blocked[2], b"in the way").unwrap();
    let r = bin::run(
        Bin::Convert,
        &[
            "patch-gguf",
            first,
            "-o",
            c.root.join("blocked.gguf").to_str().unwrap(),
            "--set",
            &format!("{key}=f32:2"),
        ],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(!blocked[0].exists() && !blocked[1].exists());
    let leftovers: Vec<_> = std::fs::read_dir(&c.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // the split keys are not the user's to edit
    let r = bin::run(
        Bin::Convert,
        &[
            "patch-gguf",
            first,
            "--in-place",
            "--set",
            "split.count=u16:2",
        ],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("split.count"), "{}", r.stderr);
    assert_eq!(read(&parts), after);
}

#[test]
fn an_interrupted_commit_leaves_no_first_part() {
    let c = converted();
    let prefix = c.root.join("crash");
    convert(&c.dir, &prefix, &["--split-max-tensors", "8"]);
    let n = open_mmap(&c.single).unwrap().file.tensors.len().div_ceil(8);
    let names: Vec<PathBuf> = (1..=n).map(|k| part_name(&prefix, k, n)).collect();
    // --force over the old set, killed after the first rename (the last part is new, the
    // others not yet): the first part is gone, so the mix cannot be opened as a set
    let r = bin::output(
        Bin::Convert
            .command()
            .env("ABF_FAILPOINT", "commit-all-after-first-rename")
            .args(["to-gguf", c.dir.to_str().unwrap(), "-o"])
            .arg(&prefix)
            .args(["--split-max-tensors", "8", "--force"]),
    );
    assert_eq!(r.code, -1, "killed: {}", r.stderr);
    assert!(!names[0].exists());
    assert!(names[n - 1].exists());
    let err = inspect_err(&names[0]);
    assert!(
        err.contains(names[0].file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}

#[cfg(feature = "llamacpp")]
mod llama_cpp {
    use super::*;
    use abf::runtime::{open_backend, BackendKind, LlamaCpp};
    use common::rng::Rng;

    fn logits(path: &Path, tokens: &[u32]) -> Vec<f32> {
        let m = LlamaCpp::load(path).unwrap();
        m.logits(tokens, tokens.len().next_multiple_of(256))
            .unwrap()
    }

    #[test]
    fn llama_cpp_loads_the_set_from_its_first_file() {
        let c = converted();
        let prefix = c.root.join("set");
        let report = convert(&c.dir, &prefix, &["--split-max-tensors", "5"]);
        let parts: Vec<PathBuf> = report["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| PathBuf::from(p.as_str().unwrap()))
            .collect();
        assert!(parts.len() >= 3);
        let mut rng = Rng::new(5);
        let tokens: Vec<u32> = (0..64).map(|_| rng.below(272) as u32).collect();
        let a = logits(&parts[0], &tokens);
        let b = logits(&c.single, &tokens);
        assert_eq!(a.len(), 64 * 272);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "split set and single file differ in llama.cpp"
        );
        // without a part llama.cpp refuses the set, and our opener names the part first
        std::fs::remove_file(&parts[1]).unwrap();
        assert!(LlamaCpp::load(&parts[0]).is_err());
        let err = open_backend(&parts[0], BackendKind::LlamaCpp, &candle_core::Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(parts[1].file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
    }

    /// SmolLM2 (the fetched Q4_1 GGUF) split into three parts by bytes: llama.cpp computes the
    /// same logits from the set as from the file, at 300 positions.
    #[test]
    fn smollm2_split_in_three_computes_the_same_logits() {
        let Some(orig) = common::smollm_gguf() else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let one = open_mmap(&orig).unwrap();
        let specs: Vec<TensorSpec> = one
            .file
            .tensors
            .iter()
            .map(|t| TensorSpec::with_size(&t.name, t.dims.clone(), t.ggml_type, t.size))
            .collect();
        let total: u64 = specs.iter().map(|s| padded(s.size)).sum();
        let limits = abf::gguf::SplitLimits {
            max_tensors: None,
            max_bytes: Some(total.div_ceil(3) + total / 20),
        };
        let sizes: Vec<u64> = specs.iter().map(|s| s.size).collect();
        let groups = abf::gguf::plan_parts(&sizes, 32, &limits).unwrap();
        assert_eq!(groups.len(), 3, "{groups:?}");
        let out = tmp.path().join("smol.gguf");
        let paths = write_parts(&out, &one.file.metadata, &specs, &groups, false, |i| {
            Ok::<_, GgufError>(one.file.tensor_bytes(one.bytes(), i).unwrap())
        })
        .unwrap()
        .paths;
        assert_eq!(paths[0], part_name(&tmp.path().join("smol"), 1, 3));
        let m = LlamaCpp::load(&orig).unwrap();
        let text =
            std::fs::read_to_string(common::root().join("fixtures/kjv-tiny/heldout-john.txt"))
                .unwrap();
        let mut tokens = m.tokenize(&text, true);
        tokens.truncate(300);
        assert_eq!(tokens.len(), 300);
        let a = m.logits(&tokens, 512).unwrap();
        drop(m);
        let b = logits(&paths[0], &tokens);
        assert_eq!(a.len(), b.len());
        let same = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() == y.to_bits())
            .count();
        assert_eq!(
            same,
            a.len(),
            "{} of {} logits differ",
            a.len() - same,
            a.len()
        );
    }
}

/// Every byte of a later part's header flipped, and the part cut short at every header byte:
/// opening the set gives an error (or, for a flip the checks cannot see, such as a tensor
/// name's letter, a set), never a panic.
#[test]
fn damaged_parts_are_errors_not_panics() {
    let c = converted();
    let parts = resplit(&c.single, &c.root.join("s.gguf"));
    let good = std::fs::read(&parts[1]).unwrap();
    let header = open_mmap(&parts[1]).unwrap().file.data_start as usize;
    let mut errors = 0;
    for i in 0..header {
        let mut bad = good.clone();
        bad[i] ^= 0x5a;
        std::fs::write(&parts[1], &bad).unwrap();
        errors += open_set(&parts[0]).is_err() as usize;
        std::fs::write(&parts[1], &good[..i]).unwrap();
        let err = open_set(&parts[0]).err().expect("a truncated part");
        assert!(err.to_string().contains("s-00002-of-00003.gguf"), "{err}");
    }
    assert!(errors > header / 2, "{errors} of {header} flips refused");
}
