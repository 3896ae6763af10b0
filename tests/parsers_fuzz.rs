//! Mutation tests of every parser of user-supplied files: safetensors headers, config.json, the
//! tokenizer files, a GGUF's vocabulary keys, chat data and importance matrices (llama.cpp's
//! legacy `.dat` form and its GGUF form). Each mutated input (byte flips,
//! truncations, JSON values swapped for wrong types, huge or negative numbers, "NaN" strings,
//! deleted keys) parses or gives an error naming the file (or key), and never panics.
//! `PROPTEST_CASES` bounds them (`make test`).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use abf::checkpoint::{HfConfig, SafetensorStore, TokenizerFiles};
use abf::convert::tokenizer_gguf::{vocab_from_dir, GgufVocab};
use abf::gguf::{Array, Metadata, Value};
use abf::rope::{BaseRope, Recipe, RopeMethod};
use candle_core::{DType, Device};
use proptest::prelude::*;
use serde_json::{json, Value as Json};

// ---- mutations ----

/// What a JSON node is replaced with: wrong types, huge, negative, fractional, "NaN" strings.
fn junk() -> Vec<Json> {
    vec![
        json!(null),
        json!(true),
        json!(-1),
        json!(-1e308),
        json!(1e308),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(4294967296u64),
        json!(0),
        json!(1.5),
        json!(""),
        json!("NaN"),
        json!("-inf"),
        json!("x".repeat(300)),
        json!([]),
        json!([1, -2, "three"]),
        json!({}),
        json!({"a": {"b": [null]}}),
    ]
}

/// JSON Pointer of every node of `v` (pre-order, the root first).
fn pointers(v: &Json, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Json::Object(m) => {
            for (k, c) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                pointers(c, format!("{at}/{k}"), out);
            }
        }
        Json::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// One JSON edit: node `node` replaced by junk value `with`, or deleted when `with` is past the
/// junk list.
type JsonEdit = (prop::sample::Index, prop::sample::Index);

fn mutate_json(v: &mut Json, edits: &[JsonEdit]) {
    let junk = junk();
    for (node, with) in edits {
        let mut all = Vec::new();
        pointers(v, String::new(), &mut all);
        let ptr = node.get(&all).clone();
        let k = with.index(junk.len() + 1);
        if k < junk.len() {
            *v.pointer_mut(&ptr).unwrap() = junk[k].clone();
            continue;
        }
        let Some((parent, last)) = ptr.rsplit_once('/') else {
            continue; // the root is not deleted
        };
        let last = last.replace("~1", "/").replace("~0", "~");
        match v.pointer_mut(parent).unwrap() {
            Json::Object(m) => {
                m.remove(&last);
            }
            Json::Array(a) => {
                a.remove(last.parse::<usize>().unwrap());
            }
            _ => unreachable!("a parent is a container"),
        }
    }
}

/// Byte edits (position, value), then a cut to `cut` bytes when given.
type ByteEdits = (Vec<(prop::sample::Index, u8)>, Option<prop::sample::Index>);

fn mutate_bytes(b: &mut Vec<u8>, (edits, cut): &ByteEdits) {
    if b.is_empty() {
        return;
    }
    for (i, v) in edits {
        let at = i.index(b.len());
        b[at] = *v;
    }
    if let Some(c) = cut {
        b.truncate(c.index(b.len()));
    }
}

fn json_edits() -> impl Strategy<Value = Vec<JsonEdit>> {
    prop::collection::vec(
        (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
        1..4,
    )
}

fn byte_edits() -> impl Strategy<Value = ByteEdits> {
    (
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        prop::option::of(any::<prop::sample::Index>()),
    )
}

/// Runs a parser, turning a panic into a test failure that says which parser and input.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: the parser panicked: {msg}")
        }
    }
}

/// An error's message names `name` (a file path, a key).
fn assert_names<E: std::fmt::Display>(r: &Result<impl Sized, E>, name: &str) {
    if let Err(e) = r {
        let msg = e.to_string();
        assert!(msg.contains(name), "error does not name {name}: {msg}");
    }
}

fn write_json(path: &Path, v: &Json) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

fn read_json(path: &Path) -> Json {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

// ---- inputs ----

/// config.json in its three spellings: legacy rope fields (the fixture), transformers 5's
/// `rope_parameters` with YaRN, and our `abf_recipe` block.
fn configs() -> Vec<Json> {
    let legacy = read_json(&common::data::kjv_tiny().join("config.json"));
    let mut params = legacy.clone();
    let o = params.as_object_mut().unwrap();
    o.remove("rope_theta");
    o.remove("rope_scaling");
    o.insert(
        "rope_parameters".into(),
        json!({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
               "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0}),
    );
    let mut block = legacy.clone();
    let base = BaseRope {
        base: 10000.0,
        context: 128,
    };
    block.as_object_mut().unwrap().insert(
        "abf_recipe".into(),
        Recipe::for_method(RopeMethod::Eabf, base).to_json_block(),
    );
    vec![legacy, params, block]
}

/// A safetensors file: header length, JSON header (padded with spaces to 8 bytes), data.
fn safetensors_bytes(header: &Json) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend((0..40u8).collect::<Vec<_>>());
    out
}

fn safetensors_header() -> Json {
    json!({
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
        "c": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [32, 40]},
    })
}

/// Sharded weights: two shards of 40 data bytes each and their index.
fn write_shards(dir: &Path) -> Json {
    let one = json!({"a": {"dtype": "F32", "shape": [2, 5], "data_offsets": [0, 40]}});
    let two = json!({
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
        "c": {"dtype": "F32", "shape": [2, 4], "data_offsets": [8, 40]},
    });
    std::fs::write(
        dir.join("model-00001-of-00002.safetensors"),
        safetensors_bytes(&one),
    )
    .unwrap();
    std::fs::write(
        dir.join("model-00002-of-00002.safetensors"),
        safetensors_bytes(&two),
    )
    .unwrap();
    json!({"metadata": {"total_size": 80}, "weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }})
}

/// Open sharded weights through their index and read every tensor; an error names a file of
/// the directory (the index or a shard).
fn read_sharded(dir: &Path) {
    let r = no_panic("safetensors index", || SafetensorStore::open(dir));
    if let Err(e) = &r {
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.display().to_string()) && msg.contains(".safetensors"),
            "error names no file: {msg}"
        );
    }
    let Ok(store) = r else { return };
    for t in store.names().map(str::to_string).collect::<Vec<_>>() {
        no_panic("sharded read", || {
            let shape = store.shape(&t).unwrap_or_default();
            let _ = store.load_checked(&t, &shape, DType::F32, &Device::Cpu);
        });
    }
}

/// Open and read every tensor of a safetensors file; errors name the file.
fn read_safetensors(path: &Path) {
    let name = path.display().to_string();
    let store = no_panic("safetensors open", || SafetensorStore::open_single(path));
    assert_names(&store, &name);
    let Ok(store) = store else { return };
    let names: Vec<String> = store.names().map(str::to_string).collect();
    for t in &names {
        no_panic("safetensors read", || {
            let view = store.tensor_view(t);
            assert_names(&view, &name);
            let shape = store.shape(t).unwrap_or_default();
            let r = store.load_checked(t, &shape, DType::F32, &Device::Cpu);
            assert_names(&r, &name);
        });
    }
}

/// The test tokenizer files: tokenizer.json (byte-level BPE), the fixture's
/// tokenizer_config.json and generation_config.json.
fn tokenizer_files() -> [(&'static str, Json); 3] {
    let fixture = common::data::kjv_tiny();
    let mut cfg = read_json(&fixture.join("tokenizer_config.json"));
    // the special tokens of the test tokenizer
    for k in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        cfg[k] = json!("<|endoftext|>");
    }
    cfg.as_object_mut().unwrap().remove("added_tokens_decoder");
    cfg.as_object_mut()
        .unwrap()
        .remove("additional_special_tokens");
    [
        ("tokenizer.json", common::tokenizer::tokenizer_json()),
        ("tokenizer_config.json", cfg),
        (
            "generation_config.json",
            json!({"bos_token_id": 260, "eos_token_id": [260], "pad_token_id": 260}),
        ),
    ]
}

/// Load the tokenizer files of `dir` both ways (abf's reader and the GGUF vocabulary builder);
/// an error names `file`.
fn read_tokenizer_dir(dir: &Path, file: &Path) {
    let name = file.display().to_string();
    let r = no_panic("tokenizer files", || TokenizerFiles::load(dir));
    assert_names(&r, &name);
    let r = no_panic("tokenizer files -> GGUF vocabulary", || {
        vocab_from_dir(dir, 261, (None, None), None)
    });
    // the generation config is not read by the vocabulary builder
    if !name.ends_with("generation_config.json") {
        assert_names(&r, &name);
    }
}

/// The GGUF vocabulary keys of the test tokenizer (byte-level BPE), and a SentencePiece-style one.
fn vocabularies() -> Vec<Metadata> {
    let dir = tempfile::tempdir().unwrap();
    for (f, v) in tokenizer_files() {
        write_json(&dir.path().join(f), &v);
    }
    let (bpe, _) = vocab_from_dir(dir.path(), 261, (None, None), None).unwrap();
    let mut m = Metadata::new();
    bpe.write(&mut m);
    let mut spm = Metadata::new();
    spm.set("tokenizer.ggml.model", Value::string("llama"));
    let tokens: Vec<Vec<u8>> = ["<unk>", "<s>", "</s>", "\u{2581}a", "b", "<0x41>"]
        .iter()
        .map(|t| t.as_bytes().to_vec())
        .collect();
    spm.set("tokenizer.ggml.tokens", Value::Array(Array::String(tokens)));
    spm.set(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32(vec![0.0, 0.0, 0.0, -1.0, -2.0, -3.0])),
    );
    spm.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vec![2, 3, 3, 1, 1, 6])),
    );
    spm.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    spm.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    spm.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
    spm.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    vec![m, spm]
}

/// GGUF values of wrong types, out-of-range ids, wrong-length arrays, non-UTF-8 strings.
fn gguf_junk() -> Vec<Value> {
    vec![
        Value::U32(u32::MAX),
        Value::U32(261),
        Value::I32(-1),
        Value::U64(u64::MAX),
        Value::I64(i64::MIN),
        Value::F32(f32::NAN),
        Value::F64(f64::INFINITY),
        Value::Bool(true),
        Value::string("NaN"),
        Value::String(vec![0xff, 0xfe]),
        Value::Array(Array::String(vec![])),
        Value::Array(Array::String(vec![vec![0xff], b"a".to_vec()])),
        Value::Array(Array::String(vec![b"nospace".to_vec(), b"".to_vec()])),
        Value::Array(Array::I32(vec![-7, 99])),
        Value::Array(Array::U32(vec![u32::MAX])),
        Value::Array(Array::F32(vec![f32::NAN])),
        Value::Array(Array::Bool(vec![true])),
    ]
}

/// Chat data: ShareGPT JSONL (the fixture's first records) and an OpenAI-style JSON array.
fn chat_inputs() -> Vec<Vec<u8>> {
    let raw = std::fs::read_to_string(common::data::conversations()).unwrap();
    let jsonl: String = raw.lines().take(3).map(|l| format!("{l}\n")).collect();
    let openai = json!([
        {"id": 7, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Who?"}]},
            {"role": "assistant", "content": "Moses."}]},
        {"messages": [{"role": "user", "content": "And?"}, {"role": "assistant", "content": "Aaron."}]}
    ]);
    vec![
        jsonl.into_bytes(),
        serde_json::to_vec_pretty(&openai).unwrap(),
    ]
}

/// Parse chat data: an error names the file; otherwise every record is a conversation or a
/// skipped record with its reason.
fn read_chat(bytes: &[u8]) {
    let r = no_panic("chat data", || {
        abf::train::data::parse_conversations(bytes, "chat.jsonl")
    });
    assert_names(&r, "chat.jsonl");
    if let Ok((convs, report)) = r {
        assert_eq!(convs.len() + report.skipped, report.records);
        assert!(report.reasons.iter().all(|s| s.starts_with("record ")));
    }
}

// ---- the untouched inputs parse (else every mutation test passes vacuously) ----

#[test]
fn the_unmutated_inputs_parse() {
    let dir = tempfile::tempdir().unwrap();
    for c in configs() {
        HfConfig::from_value(Path::new("config.json"), c).unwrap();
    }
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, safetensors_bytes(&safetensors_header())).unwrap();
    let st = SafetensorStore::open_single(&p).unwrap();
    assert_eq!(st.len(), 3);
    let sharded = tempfile::tempdir().unwrap();
    let index = write_shards(sharded.path());
    write_json(&sharded.path().join("model.safetensors.index.json"), &index);
    assert_eq!(SafetensorStore::open(sharded.path()).unwrap().len(), 3);
    for (f, v) in tokenizer_files() {
        write_json(&dir.path().join(f), &v);
    }
    TokenizerFiles::load(dir.path()).unwrap();
    for m in vocabularies() {
        GgufVocab::read(&m).unwrap().unwrap().to_hf().unwrap();
    }
    for b in chat_inputs() {
        let (convs, report) = abf::train::data::parse_conversations(&b, "chat.jsonl").unwrap();
        assert_eq!((convs.len(), report.skipped), (report.records, 0));
    }
    let im = imatrix_inputs();
    let legacy = abf::imatrix::parse_legacy(&im[0], Path::new("a.dat")).unwrap();
    assert_eq!((legacy.entries.len(), legacy.chunk_count), (2, 3));
    assert_eq!(
        abf::imatrix::parse_gguf(&im[1], Path::new("a.gguf"))
            .unwrap()
            .entries
            .len(),
        1
    );
}

/// Importance matrices: the legacy `.dat` form (two entries and the trailer, laid out as
/// llama.cpp's `save_imatrix_legacy` writes them) and the GGUF form.
fn imatrix_inputs() -> Vec<Vec<u8>> {
    let mut dat = Vec::new();
    dat.extend(2i32.to_le_bytes());
    for (name, ncall, vals) in [
        ("blk.0.attn_q.weight", 3i32, &[1.0f32, 2.0][..]),
        ("o", 0, &[4.0][..]),
    ] {
        dat.extend((name.len() as i32).to_le_bytes());
        dat.extend(name.as_bytes());
        dat.extend(ncall.to_le_bytes());
        dat.extend((vals.len() as i32).to_le_bytes());
        vals.iter().for_each(|v| dat.extend(v.to_le_bytes()));
    }
    dat.extend(3i32.to_le_bytes());
    dat.extend(4i32.to_le_bytes());
    dat.extend(b"wiki");
    let mut entries = std::collections::BTreeMap::new();
    entries.insert(
        "blk.0.attn_q.weight".to_string(),
        abf::imatrix::Entry {
            sums: vec![1.0, 2.0, 3.0],
            counts: vec![7],
        },
    );
    let m = abf::imatrix::ImportanceMatrix {
        entries,
        datasets: vec!["wiki".into()],
        chunk_count: 1,
        chunk_size: 7,
    };
    vec![dat, abf::imatrix::to_gguf_bytes(&m).unwrap()]
}

fn read_imatrix(which: usize, bytes: &[u8]) {
    let path = Path::new("calib-imatrix.bin");
    let r = no_panic("imatrix", || match which {
        0 => abf::imatrix::parse_legacy(bytes, path),
        _ => abf::imatrix::parse_gguf(bytes, path),
    });
    assert_names(&r, "calib-imatrix.bin");
    if let Ok(m) = r {
        for e in m.entries.values() {
            assert!(!e.counts.is_empty() && e.sums.len() % e.counts.len() == 0);
            let _ = e.weights();
        }
    }
}

// ---- the mutation tests ----

proptest! {

    #[test]
    fn imatrix_mutations_error_or_read(which in 0..2usize, bytes in byte_edits()) {
        let mut b = imatrix_inputs().swap_remove(which);
        mutate_bytes(&mut b, &bytes);
        read_imatrix(which, &b);
    }
    #[test]
    fn config_json_mutations_error_or_parse(which in 0..3usize, edits in json_edits(), bytes in byte_edits()) {
        let path = PathBuf::from("/models/m/config.json");
        let mut v = configs().swap_remove(which);
        mutate_json(&mut v, &edits);
        let r = no_panic("config.json", || HfConfig::from_value(&path, v.clone()));
        assert_names(&r, "/models/m/config.json");
        // the same file through bytes
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        let mut b = serde_json::to_vec_pretty(&v).unwrap();
        mutate_bytes(&mut b, &bytes);
        std::fs::write(&file, &b).unwrap();
        let r = no_panic("config.json bytes", || HfConfig::read(&file));
        assert_names(&r, &file.display().to_string());
    }

    #[test]
    fn safetensors_header_mutations_error_or_read(edits in json_edits(), bytes in byte_edits()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let mut h = safetensors_header();
        mutate_json(&mut h, &edits);
        std::fs::write(&path, safetensors_bytes(&h)).unwrap();
        read_safetensors(&path);
        let mut b = safetensors_bytes(&safetensors_header());
        mutate_bytes(&mut b, &bytes);
        std::fs::write(&path, &b).unwrap();
        read_safetensors(&path);
    }

    #[test]
    fn safetensors_index_mutations_error_or_read(edits in json_edits(), bytes in byte_edits()) {
        let dir = tempfile::tempdir().unwrap();
        let index = write_shards(dir.path());
        let path = dir.path().join("model.safetensors.index.json");
        let mut v = index.clone();
        mutate_json(&mut v, &edits);
        write_json(&path, &v);
        read_sharded(dir.path());
        let mut b = serde_json::to_vec_pretty(&index).unwrap();
        mutate_bytes(&mut b, &bytes);
        std::fs::write(&path, &b).unwrap();
        read_sharded(dir.path());
    }

    #[test]
    fn tokenizer_file_mutations_error_or_load(which in 0..3usize, edits in json_edits(), bytes in byte_edits()) {
        let dir = tempfile::tempdir().unwrap();
        let files = tokenizer_files();
        for (f, v) in &files {
            write_json(&dir.path().join(f), v);
        }
        let (f, v) = &files[which];
        let file = dir.path().join(f);
        let mut v = v.clone();
        mutate_json(&mut v, &edits);
        write_json(&file, &v);
        read_tokenizer_dir(dir.path(), &file);
        let mut b = serde_json::to_vec_pretty(&files[which].1).unwrap();
        mutate_bytes(&mut b, &bytes);
        std::fs::write(&file, &b).unwrap();
        read_tokenizer_dir(dir.path(), &file);
    }

    #[test]
    fn gguf_vocabulary_mutations_error_or_read(
        which in 0..2usize,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 1..4),
    ) {
        let mut m = vocabularies().swap_remove(which);
        let junk = gguf_junk();
        for (key, with) in &edits {
            let keys: Vec<String> = m.iter().map(|(k, _)| k.to_string()).collect();
            let k = key.get(&keys);
            match with.index(junk.len() + 1) {
                i if i < junk.len() => {
                    m.set(k, junk[i].clone());
                }
                _ => {
                    m.remove(k);
                }
            }
        }
        let r = no_panic("GgufVocab::read", || GgufVocab::read(&m));
        assert_names(&r, "tokenizer.");
        if let Ok(Some(v)) = r {
            let r = no_panic("GgufVocab::to_hf", || v.to_hf());
            assert_names(&r, "tokenizer.");
        }
        // the rebuilt tokenizer as the runtime loads it, and used once
        let path = Path::new("/models/vocab.gguf");
        let r = no_panic("Encoder::from_gguf", || abf::runtime::Encoder::from_gguf(path, &m));
        assert_names(&r, "/models/vocab.gguf");
        if let Ok(e) = r {
            let r = no_panic("Encoder::encode_plain", || e.encode_plain("ab Ab 12"));
            assert_names(&r, "/models/vocab.gguf");
        }
    }

    #[test]
    fn chat_data_mutations_error_or_parse(which in 0..2usize, edits in json_edits(), bytes in byte_edits()) {
        let input = chat_inputs().swap_remove(which);
        read_chat(&{
            let mut b = input.clone();
            mutate_bytes(&mut b, &bytes);
            b
        });
        // JSON edits of the whole file (the array) or of one JSONL record
        let text = String::from_utf8(input).unwrap();
        let mut lines: Vec<Json> = if which == 0 {
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        } else {
            vec![serde_json::from_str(&text).unwrap()]
        };
        let n = lines.len();
        mutate_json(&mut lines[edits.len() % n], &edits);
        let joined: String = lines.iter().map(|l| format!("{l}\n")).collect();
        read_chat(joined.as_bytes());
    }
}

/// A lone surrogate escape in the decoder: serde_json skips it when only checking syntax, and the
/// tokenizers crate panics on it. abf's loader refuses it as JSON naming the file, and the
/// crate's panic itself comes back as an error.
#[test]
fn tokenizer_crate_panic_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = common::tokenizer::tokenizer_json();
    v["decoder"]["x"] = json!("SURROGATE");
    let text = serde_json::to_string(&v)
        .unwrap()
        .replace("SURROGATE", "\\udc00");
    let file = dir.path().join("tokenizer.json");
    std::fs::write(&file, &text).unwrap();
    let err = abf::checkpoint::tokenizer::load_tokenizer(&file).unwrap_err();
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    let err = no_panic("tokenizer_from_bytes", || {
        abf::checkpoint::tokenizer::tokenizer_from_bytes(text.as_bytes())
    })
    .unwrap_err();
    assert!(err.contains("tokenizers crate"), "{err}");
}
