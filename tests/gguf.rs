//! The GGUF codec: byte-literal files for every error, truncation and mutation sweeps, round
//! trips, the patcher, and recipe <-> keys.

use abf::gguf::keys::ArchKey;
use abf::gguf::{
    apply_recipe, in_place_writes, read_recipe, rewrite, write_in_place, Array, GgmlType,
    GgufError, GgufFile, GgufWriter, Metadata, TensorSpec, Value,
};
use abf::rope::{BaseRope, Recipe, RopeMethod, ScaleLaw, Target};
use proptest::prelude::*;

// ---- a hand-made file, byte by byte (independent of our writer) ----

#[derive(Default)]
struct B(Vec<u8>);
impl B {
    fn u32(mut self, x: u32) -> B {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> B {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn raw(mut self, b: &[u8]) -> B {
        self.0.extend_from_slice(b);
        self
    }
    fn s(self, t: &str) -> B {
        self.u64(t.len() as u64).raw(t.as_bytes())
    }
    fn pad(mut self, a: usize) -> B {
        while !self.0.len().is_multiple_of(a) {
            self.0.push(0);
        }
        self
    }
    fn header(n_tensors: u64, n_kv: u64) -> B {
        B::default().raw(b"GGUF").u32(3).u64(n_tensors).u64(n_kv)
    }
}

/// Three keys (string, u32, array of 2 strings) and two tensors: "a" F32 [4] at 0,
/// "b" F16 [2, 2] at 32. The file ends exactly at b's last byte.
fn small() -> Vec<u8> {
    B::header(2, 3)
        .s("general.architecture")
        .u32(8)
        .s("llama")
        .s("llama.context_length")
        .u32(4)
        .u32(2048)
        .s("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(2)
        .s("<s>")
        .s("hi")
        .s("a")
        .u32(1)
        .u64(4)
        .u32(0)
        .u64(0)
        .s("b")
        .u32(2)
        .u64(2)
        .u64(2)
        .u32(1)
        .u64(32)
        .pad(32)
        .raw(&[1u8; 16])
        .raw(&[0u8; 16])
        .raw(&[2u8; 8])
        .0
}

fn err(bytes: &[u8]) -> GgufError {
    match GgufFile::parse(bytes) {
        Ok(_) => panic!("parsed a bad file"),
        Err(e) => e,
    }
}

#[test]
fn small_file_reads_as_built() {
    let b = small();
    let f = GgufFile::parse(&b).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.alignment, 32);
    let keys: Vec<_> = f.metadata.keys().collect();
    assert_eq!(
        keys,
        [
            "general.architecture",
            "llama.context_length",
            "tokenizer.ggml.tokens"
        ]
    );
    assert_eq!(
        f.metadata.get("llama.context_length"),
        Some(&Value::U32(2048))
    );
    assert_eq!(
        f.metadata.get("tokenizer.ggml.tokens"),
        Some(&Value::Array(Array::String(vec![
            b"<s>".to_vec(),
            b"hi".to_vec()
        ])))
    );
    // general.architecture's value starts after magic+version+counts (24) + key (8+20) + type (4)
    assert_eq!(f.spans[0].value_offset, 24 + 28 + 4);
    assert_eq!(f.tensors[1].dims, vec![2, 2]);
    assert_eq!(f.tensors[1].size, 8);
    assert_eq!(f.tensor_bytes(&b, 0).unwrap(), &[1u8; 16]);
    assert_eq!(f.tensor_bytes(&b, 1).unwrap(), &[2u8; 8]);
    assert_eq!(f.data_end, b.len() as u64);
}

#[test]
fn truncation_at_every_byte_is_a_typed_error() {
    let b = small();
    for n in 0..b.len() {
        match GgufFile::parse(&b[..n]) {
            Ok(_) => panic!("prefix of {n} bytes parsed"),
            Err(
                GgufError::Truncated { .. }
                | GgufError::StringTooLong { .. }
                | GgufError::CountTooLarge { .. }
                | GgufError::TensorPastEnd { .. },
            ) => {}
            Err(e) => panic!("prefix of {n} bytes: unexpected error {e}"),
        }
    }
}

#[test]
fn error_truncated_names_the_field() {
    let e = err(b"GGUF\x03\x00\x00");
    assert!(
        matches!(&e, GgufError::Truncated { offset: 4, what, .. } if what == "version"),
        "{e}"
    );
}

#[test]
fn error_bad_magic() {
    assert!(matches!(err(b"GGML\x03\0\0\0"), GgufError::BadMagic { found } if &found == b"GGML"));
}

#[test]
fn error_unsupported_version() {
    let e = err(&B::default().raw(b"GGUF").u32(1).u64(0).u64(0).0);
    assert!(matches!(
        e,
        GgufError::UnsupportedVersion { version: 1, .. }
    ));
    let e = err(&B::default()
        .raw(b"GGUF")
        .u32(3u32.swap_bytes())
        .u64(0)
        .u64(0)
        .0);
    assert!(e.to_string().contains("big-endian"), "{e}");
}

#[test]
fn version_2_is_read() {
    let mut b = small();
    b[4] = 2;
    assert_eq!(GgufFile::parse(&b).unwrap().version, 2);
}

#[test]
fn error_string_too_long() {
    let b = B::header(0, 1).u64(1000).raw(&[b'k'; 20]).0;
    assert!(matches!(
        err(&b),
        GgufError::StringTooLong {
            offset: 24,
            len: 1000,
            ..
        }
    ));
}

#[test]
fn error_key_not_utf8() {
    let b = B::header(0, 1).u64(1).raw(&[0xff]).u32(0).raw(&[7]).0;
    assert!(matches!(err(&b), GgufError::NotUtf8 { offset: 24, .. }));
}

#[test]
fn error_count_too_large_without_allocating() {
    let e = err(&B::header(u64::MAX, 0).0);
    assert!(
        matches!(
            e,
            GgufError::CountTooLarge {
                count: u64::MAX,
                ..
            }
        ),
        "{e}"
    );
    let e = err(&B::header(0, 1 << 60).raw(&[0; 64]).0);
    assert!(matches!(e, GgufError::CountTooLarge { .. }), "{e}");
    // an array claiming 2^61 u64 elements
    let b = B::header(0, 1).s("k").u32(9).u32(10).u64(1 << 61).u64(5).0;
    let e = err(&b);
    assert!(
        matches!(&e, GgufError::CountTooLarge { what, .. } if what.contains("\"k\"")),
        "{e}"
    );
    // an array of strings claiming more strings than 8-byte lengths fit
    let b = B::header(0, 1).s("k").u32(9).u32(8).u64(3).u64(0).u64(0).0;
    assert!(matches!(err(&b), GgufError::CountTooLarge { count: 3, .. }));
}

#[test]
fn error_bad_value_type() {
    let b = B::header(0, 1).s("k").u32(13).u32(0).0;
    assert!(matches!(err(&b), GgufError::BadValueType { code: 13, key, offset: 33 } if key == "k"));
}

#[test]
fn error_nested_array() {
    let b = B::header(0, 1).s("k").u32(9).u32(9).u64(0).0;
    assert!(matches!(err(&b), GgufError::NestedArray { key, .. } if key == "k"));
}

#[test]
fn error_bad_bool() {
    let b = B::header(0, 1).s("k").u32(7).raw(&[2]).0;
    assert!(matches!(err(&b), GgufError::BadBool { byte: 2, .. }));
}

#[test]
fn error_duplicate_key() {
    let b = B::header(0, 2)
        .s("k")
        .u32(0)
        .raw(&[1])
        .s("k")
        .u32(0)
        .raw(&[2])
        .0;
    assert!(matches!(err(&b), GgufError::DuplicateKey { key, offset: 38 } if key == "k"));
}

fn one_tensor_file(
    kv: B,
    n_kv: u64,
    name: &str,
    dims: &[u64],
    ty: u32,
    off: u64,
    data: usize,
) -> Vec<u8> {
    let mut b = B::header(1, n_kv).raw(&kv.0).s(name).u32(dims.len() as u32);
    for d in dims {
        b = b.u64(*d);
    }
    b.u32(ty).u64(off).pad(32).raw(&vec![0u8; data]).0
}

#[test]
fn error_duplicate_tensor() {
    let b = B::header(2, 0)
        .s("t")
        .u32(1)
        .u64(1)
        .u32(0)
        .u64(0)
        .s("t")
        .u32(1)
        .u64(1)
        .u32(0)
        .u64(32)
        .pad(32)
        .raw(&[0; 64])
        .0;
    assert!(matches!(err(&b), GgufError::DuplicateTensor { name, .. } if name == "t"));
}

#[test]
fn error_bad_alignment_and_wrong_type() {
    let kv = B::default().s("general.alignment").u32(4).u32(48);
    let b = one_tensor_file(kv, 1, "t", &[1], 0, 0, 4);
    assert!(matches!(err(&b), GgufError::BadAlignment { value: 48 }));
    let kv = B::default().s("general.alignment").u32(10).u64(64);
    let e = err(&one_tensor_file(kv, 1, "t", &[1], 0, 0, 4));
    assert!(
        matches!(&e, GgufError::KeyWrongType { key, .. } if key == "general.alignment"),
        "{e}"
    );
}

#[test]
fn error_too_many_dims() {
    let b = one_tensor_file(B::default(), 0, "t", &[1, 1, 1, 1, 1], 0, 0, 4);
    assert!(matches!(err(&b), GgufError::TooManyDims { n_dims: 5, name, .. } if name == "t"));
}

#[test]
fn error_dim_overflow() {
    let b = one_tensor_file(B::default(), 0, "t", &[1 << 40, 1 << 40], 0, 0, 4);
    assert!(matches!(err(&b), GgufError::DimOverflow { .. }));
}

#[test]
fn error_partial_block() {
    // Q4_0 (code 2) has 32-element blocks
    let b = one_tensor_file(B::default(), 0, "q", &[16], 2, 0, 18);
    assert!(matches!(
        err(&b),
        GgufError::PartialBlock {
            row: 16,
            block: 32,
            ..
        }
    ));
}

#[test]
fn error_misaligned_offset() {
    let b = one_tensor_file(B::default(), 0, "t", &[1], 0, 4, 64);
    assert!(matches!(
        err(&b),
        GgufError::MisalignedOffset {
            tensor_offset: 4,
            ..
        }
    ));
}

#[test]
fn error_overlapping_or_gapped_offsets() {
    let mut b = small();
    // tensor "b"'s offset (32) is the last 8 bytes of the infos before padding; make it 0: overlap
    let f = GgufFile::parse(&b).unwrap();
    let at = (f.header_end - 8) as usize;
    b[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    assert!(matches!(
        err(&b),
        GgufError::OffsetNotRunningSum {
            tensor_offset: 0,
            expected: 32,
            ..
        }
    ));
    b[at..at + 8].copy_from_slice(&64u64.to_le_bytes());
    assert!(matches!(
        err(&b),
        GgufError::OffsetNotRunningSum {
            tensor_offset: 64,
            ..
        }
    ));
}

#[test]
fn error_tensor_past_end() {
    let b = one_tensor_file(B::default(), 0, "t", &[8], 0, 0, 16);
    assert!(matches!(err(&b), GgufError::TensorPastEnd { name, .. } if name == "t"));
}

#[test]
fn flipped_type_codes_never_panic() {
    let b = small();
    let f = GgufFile::parse(&b).unwrap();
    for span in &f.spans {
        let at = (span.value_offset - 4) as usize;
        for code in 0..=40u32 {
            let mut m = b.clone();
            m[at..at + 4].copy_from_slice(&code.to_le_bytes());
            let r = GgufFile::parse(&m);
            if code > 12 {
                assert!(matches!(r, Err(GgufError::BadValueType { .. })));
            }
        }
    }
    // tensor type codes: every code either parses (a known or unknown type) or is a typed error
    for t in &f.tensors {
        let at = (t.info_offset + 8 + t.name.len() as u64 + 4 + 8 * t.dims.len() as u64) as usize;
        for code in 0..=64u32 {
            let mut m = b.clone();
            m[at..at + 4].copy_from_slice(&code.to_le_bytes());
            if let Ok(g) = GgufFile::parse(&m) {
                assert_eq!(
                    g.tensors
                        .iter()
                        .find(|x| x.name == t.name)
                        .unwrap()
                        .ggml_type
                        .code(),
                    code
                );
            }
        }
    }
}

// ---- writer ----

fn write_vec(meta: &Metadata, tensors: &[(TensorSpec, Vec<u8>)]) -> Vec<u8> {
    let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = GgufWriter::with_header(Vec::new(), meta, specs).unwrap();
    for (s, d) in tensors {
        w.write_tensor_data(&s.name, d).unwrap();
    }
    w.finish().unwrap().0
}

#[test]
fn writer_reproduces_the_hand_made_file() {
    let b = small();
    let f = GgufFile::parse(&b).unwrap();
    let tensors: Vec<_> = (0..2)
        .map(|i| {
            let t = &f.tensors[i];
            (
                TensorSpec::new(&t.name, t.dims.clone(), t.ggml_type).unwrap(),
                f.tensor_bytes(&b, i).unwrap().to_vec(),
            )
        })
        .collect();
    let out = write_vec(&f.metadata, &tensors);
    // ours pads the last tensor to the alignment, as ggml and gguf-py do
    assert_eq!(&out[..b.len()], &b[..]);
    assert_eq!(out.len(), b.len() + 24);
    assert!(out[b.len()..].iter().all(|&x| x == 0));
}

#[test]
fn writer_refuses_out_of_order_and_duplicates() {
    let mut w = GgufWriter::new(Vec::new());
    w.add_kv("a", Value::U8(1)).unwrap();
    assert!(matches!(
        w.add_kv("a", Value::U8(2)),
        Err(GgufError::DuplicateKey { .. })
    ));
    let t = TensorSpec::new("t", vec![4], GgmlType::from_code(0)).unwrap();
    w.add_tensor(t.clone()).unwrap();
    assert!(matches!(
        w.add_tensor(t),
        Err(GgufError::DuplicateTensor { .. })
    ));
    assert!(matches!(
        w.add_kv("b", Value::U8(2)),
        Err(GgufError::WriterState(_))
    ));
    w.add_tensor(TensorSpec::new("u", vec![4], GgmlType::from_code(0)).unwrap())
        .unwrap();
    assert!(matches!(
        w.write_tensor_data("u", &[0; 16]),
        Err(GgufError::WriterState(_))
    ));
    assert!(matches!(
        w.write_tensor_data("t", &[0; 15]),
        Err(GgufError::TensorData { .. })
    ));
    w.write_tensor_data("t", &[0; 16]).unwrap();
    assert!(matches!(
        w.add_tensor(TensorSpec::new("v", vec![4], GgmlType::from_code(0)).unwrap()),
        Err(GgufError::WriterState(_))
    ));
    let long = "x".repeat(64);
    let mut w2 = GgufWriter::new(Vec::new());
    assert!(matches!(
        w2.add_tensor(TensorSpec::new(long, vec![1], GgmlType::from_code(0)).unwrap()),
        Err(GgufError::TensorNameTooLong { len: 64, .. })
    ));
    // finishing before every tensor is written is refused
    let mut w3 = GgufWriter::new(Vec::new());
    w3.add_tensor(TensorSpec::new("t", vec![1], GgmlType::from_code(0)).unwrap())
        .unwrap();
    assert!(matches!(w3.finish(), Err(GgufError::WriterState(_))));
}

#[test]
fn writer_honours_alignment() {
    let mut meta = Metadata::new();
    meta.set_alignment(64).unwrap();
    let f32t = GgmlType::from_code(0);
    let tensors = vec![
        (TensorSpec::new("a", vec![3], f32t).unwrap(), vec![7u8; 12]),
        (TensorSpec::new("b", vec![5], f32t).unwrap(), vec![9u8; 20]),
    ];
    let out = write_vec(&meta, &tensors);
    let f = GgufFile::parse(&out).unwrap();
    assert_eq!(f.alignment, 64);
    assert!(f.data_start.is_multiple_of(64));
    assert_eq!(f.tensors[1].offset, 64);
    assert_eq!(f.tensor_bytes(&out, 1).unwrap(), &[9u8; 20]);
}

/// A file with an unknown tensor type (code 99) between two known ones.
fn with_unknown() -> Vec<u8> {
    B::header(3, 0)
        .s("a")
        .u32(1)
        .u64(2)
        .u32(0)
        .u64(0)
        .s("mystery")
        .u32(1)
        .u64(10)
        .u32(99)
        .u64(32)
        .s("c")
        .u32(1)
        .u64(1)
        .u32(0)
        .u64(96)
        .pad(32)
        .raw(&[1; 8])
        .raw(&[0; 24])
        .raw(&(0..64u8).collect::<Vec<_>>())
        .raw(&[3; 4])
        .0
}

#[test]
fn unknown_type_is_sized_from_offsets_and_carried_through() {
    let b = with_unknown();
    let f = GgufFile::parse(&b).unwrap();
    let m = &f.tensors[1];
    assert_eq!(m.ggml_type, GgmlType::Unknown(99));
    assert!(!m.is_known());
    assert_eq!(m.size, 64);
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("in.gguf"), dir.path().join("out.gguf"));
    std::fs::write(&src, &b).unwrap();
    let mut meta = f.metadata.clone();
    meta.set("general.name", Value::string("renamed"));
    rewrite(&src, &f, &meta, &dst, false).unwrap();
    let out = std::fs::read(&dst).unwrap();
    let g = GgufFile::parse(&out).unwrap();
    assert_eq!(g.tensors[1].ggml_type, GgmlType::Unknown(99));
    for i in 0..3 {
        assert_eq!(g.tensor_bytes(&out, i), f.tensor_bytes(&b, i), "tensor {i}");
    }
}

// ---- patching ----

fn model_meta() -> Metadata {
    let mut m = Metadata::new();
    m.set_architecture("llama");
    m.set("general.name", Value::string("tiny"));
    m.set_context_length("llama", 2048).unwrap();
    m.set_arch_u32("llama", ArchKey::EmbeddingLength, 256)
        .unwrap();
    m.set_arch_u32("llama", ArchKey::HeadCount, 4).unwrap();
    m.set_arch_u32("llama", ArchKey::RopeDimensionCount, 64)
        .unwrap();
    m.set_rope_freq_base("llama", 10000.0).unwrap();
    m.set(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(vec![b"a".to_vec(), b"bb".to_vec()])),
    );
    m
}

fn model_tensors() -> Vec<(TensorSpec, Vec<u8>)> {
    let f32t = GgmlType::from_code(0);
    let q4 = GgmlType::from_code(2);
    vec![
        (
            TensorSpec::new("token_embd.weight", vec![64, 3], f32t).unwrap(),
            (0..768).map(|i| (i * 7 % 251) as u8).collect(),
        ),
        (
            TensorSpec::new("blk.0.attn_q.weight", vec![64, 2], q4).unwrap(),
            (0..72).map(|i| (i * 13 % 256) as u8).collect(),
        ),
    ]
}

#[test]
fn in_place_patch_changes_only_the_value_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    let b = write_vec(&model_meta(), &model_tensors());
    std::fs::write(&p, &b).unwrap();
    let f = GgufFile::parse(&b).unwrap();
    let mut meta = f.metadata.clone();
    meta.set_rope_freq_base("llama", 500000.0).unwrap();
    meta.set("general.name", Value::string("TINY"));
    let writes = in_place_writes(&f, &meta).unwrap();
    assert_eq!(writes.len(), 2);
    write_in_place(&p, &writes).unwrap();
    let after = std::fs::read(&p).unwrap();
    assert_eq!(after.len(), b.len());
    let base_at = f.span("llama.rope.freq_base").unwrap().value_offset as usize;
    let name_at = f.span("general.name").unwrap().value_offset as usize + 8;
    let changed: Vec<usize> = (0..b.len()).filter(|&i| b[i] != after[i]).collect();
    assert!(!changed.is_empty());
    for i in &changed {
        assert!(
            (base_at..base_at + 4).contains(i) || (name_at..name_at + 4).contains(i),
            "byte {i}"
        );
    }
    let g = GgufFile::parse(&after).unwrap();
    assert_eq!(g.metadata, meta);
    // a stale plan (the file changed since it was read) is refused
    assert!(matches!(
        write_in_place(&p, &writes),
        Err(GgufError::Refused(_))
    ));
}

#[test]
fn size_changing_edits_are_not_in_place_and_rewrite_keeps_tensor_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("m.gguf"), dir.path().join("o.gguf"));
    let b = write_vec(&model_meta(), &model_tensors());
    std::fs::write(&src, &b).unwrap();
    let f = GgufFile::parse(&b).unwrap();
    let mut meta = f.metadata.clone();
    meta.set("general.name", Value::string("a longer name"));
    assert!(in_place_writes(&f, &meta).is_err());
    let mut m2 = f.metadata.clone();
    m2.set_context_length("llama", 1 << 20).unwrap();
    m2.set("llama.context_length", Value::U64(8192));
    assert!(
        in_place_writes(&f, &m2).is_err(),
        "a type change is not in place"
    );
    meta.set_alignment(128).unwrap();
    rewrite(&src, &f, &meta, &dst, false).unwrap();
    let out = std::fs::read(&dst).unwrap();
    let g = GgufFile::parse(&out).unwrap();
    assert_eq!(g.metadata, meta);
    assert_eq!(g.alignment, 128);
    for i in 0..f.tensors.len() {
        assert_eq!(
            g.tensor_bytes(&out, i).unwrap(),
            f.tensor_bytes(&b, i).unwrap()
        );
    }
    // the existing output is not replaced without overwrite
    assert!(rewrite(&src, &f, &meta, &dst, false).is_err());
}

#[test]
fn rename_arch_keeps_order() {
    let mut m = model_meta();
    let before: Vec<String> = m.keys().map(str::to_string).collect();
    m.rename_arch("mistral3").unwrap();
    let after: Vec<String> = m.keys().map(str::to_string).collect();
    let expect: Vec<String> = before
        .iter()
        .map(|k| k.replacen("llama.", "mistral3.", 1))
        .collect();
    assert_eq!(after, expect);
    assert_eq!(m.architecture().unwrap(), Some("mistral3"));
}

// ---- recipe <-> keys ----

fn llama2() -> BaseRope {
    BaseRope {
        base: 10_000.0,
        context: 2048,
    }
}

/// The recipe as the runtime sees it: frequencies, attention factor and logit scales.
fn assert_same_runtime(a: &Recipe, b: &Recipe, d: usize) {
    let (fa, fb) = (a.inv_freq(d, None), b.inv_freq(d, None));
    for (x, y) in fa.iter().zip(&fb) {
        assert!(((x - y) / x).abs() < 1e-6, "{a} vs {b}: {x} {y}");
    }
    assert!(
        (a.attention_factor() - b.attention_factor()).abs() < 1e-6,
        "{a} vs {b}"
    );
    for p in [0, 2047, 2048, 4095, 4096, 8191, 100_000] {
        let (x, y) = (a.logit_scale(5, p), b.logit_scale(5, p));
        assert!((x - y).abs() < 1e-6, "{a} vs {b} at {p}: {x} {y}");
    }
    assert_eq!(a.context, b.context);
}

#[test]
fn recipes_llama_cpp_runs_exactly_round_trip() {
    for method in [
        RopeMethod::Default,
        RopeMethod::Abf,
        RopeMethod::Linear,
        RopeMethod::Ntk,
        RopeMethod::Yarn,
        RopeMethod::NtkByParts,
    ] {
        let r = Recipe::for_method(method, llama2());
        let mut m = model_meta();
        let notes = apply_recipe(&mut m, &r, Target::LlamaCpp, false).unwrap();
        assert!(!m.keys().any(|k| k.starts_with("abf.recipe.")));
        let back = read_recipe(&m).unwrap().unwrap();
        assert_same_runtime(&r, &back, 64);
        let _ = notes;
    }
    // step law: relabelled to mistral3
    let mut r = Recipe::for_method(RopeMethod::Abf, llama2());
    r.scale_law = Recipe::default_step(2048);
    let mut m = model_meta();
    apply_recipe(&mut m, &r, Target::LlamaCpp, false).unwrap();
    assert_eq!(m.architecture().unwrap(), Some("mistral3"));
    assert!(!m.keys().any(|k| k.starts_with("llama.")));
    let beta = m
        .arch_f32("mistral3", ArchKey::AttentionTemperatureScale)
        .unwrap()
        .unwrap();
    assert!((beta as f64 - 1.0 / 2048f64.ln()).abs() < 1e-7);
    assert_eq!(
        m.arch_u32("mistral3", ArchKey::RopeScalingOriginalContextLength)
            .unwrap(),
        Some(2048)
    );
    assert_same_runtime(&r, &read_recipe(&m).unwrap().unwrap(), 64);
}

#[test]
fn llama_cpp_keys_have_the_independent_values() {
    // static NTK, s = 4, d = 128: b' = 10000 * 4^(128/126) = 40890.4 (method.md: 40,890)
    let mut m = model_meta();
    m.set_arch_u32("llama", ArchKey::RopeDimensionCount, 128)
        .unwrap();
    let mut r = Recipe::for_method(RopeMethod::Ntk, llama2());
    r.factor = 4.0;
    apply_recipe(&mut m, &r, Target::LlamaCpp, false).unwrap();
    let b = m.arch_f32("llama", ArchKey::RopeFreqBase).unwrap().unwrap() as f64;
    assert!(
        (b - 10000.0 * 4f64.powf(128.0 / 126.0)).abs() < 0.01 && (b - 40890.0).abs() < 1.0,
        "{b}"
    );
    // NTK-by-parts = yarn with attn_factor 1 / (0.1 ln 4 + 1) = 1 / 1.1386
    let mut m = model_meta();
    let r = Recipe::for_method(RopeMethod::NtkByParts, llama2());
    apply_recipe(&mut m, &r, Target::LlamaCpp, false).unwrap();
    assert_eq!(
        m.arch_str("llama", ArchKey::RopeScalingType).unwrap(),
        Some("yarn")
    );
    let a = m
        .arch_f32("llama", ArchKey::RopeScalingAttnFactor)
        .unwrap()
        .unwrap() as f64;
    assert!((a - 1.0 / 1.138_629_436).abs() < 1e-6, "{a}");
    assert_eq!(m.get("llama.context_length"), Some(&Value::U32(8192)));
    assert_eq!(m.get("llama.rope.freq_base"), Some(&Value::F32(10000.0)));
}

#[test]
fn exact_runtime_round_trips_the_recipe() {
    for method in RopeMethod::ALL {
        if matches!(method, RopeMethod::Dynamic | RopeMethod::Llama3) {
            continue;
        }
        let r = Recipe::for_method(method, llama2());
        let mut m = model_meta();
        apply_recipe(&mut m, &r, Target::Exact, true).unwrap();
        assert_eq!(
            m.get("abf.recipe.method").and_then(Value::as_str),
            Some(method.name())
        );
        assert_eq!(read_recipe(&m).unwrap().unwrap(), r, "{method}");
    }
}

#[test]
fn refusals() {
    let mut m = model_meta();
    // llama3's factors need the rope_freqs.weight tensor: no metadata-only form
    let l3 = Recipe::for_method(RopeMethod::Llama3, llama2());
    let e = apply_recipe(&mut m, &l3, Target::LlamaCpp, true).unwrap_err();
    assert!(matches!(e, GgufError::Refused(_)), "{e}");
    // dynamic NTK: llama.cpp has none; refused unless approximations are allowed
    let dynamic = Recipe::for_method(RopeMethod::Dynamic, llama2());
    let e = apply_recipe(&mut m, &dynamic, Target::LlamaCpp, false).unwrap_err();
    assert!(e.to_string().contains("dynamic NTK"), "{e}");
    // config.json's runtime is not a GGUF's
    let abf = Recipe::for_method(RopeMethod::Abf, llama2());
    assert!(apply_recipe(&mut m, &abf, Target::Transformers, false).is_err());
    assert_eq!(m, model_meta(), "a refusal leaves the metadata alone");
    let mut d = model_meta();
    let notes = apply_recipe(&mut d, &dynamic, Target::LlamaCpp, true).unwrap();
    assert!(notes.iter().any(|n| n.contains("dynamic NTK")), "{notes:?}");
    let back = read_recipe(&d).unwrap().unwrap();
    assert_eq!(back.method, RopeMethod::Default);
    assert_eq!(back.rope_base, 10_000.0);
    // the exact target never refuses: native nearest form plus the record
    let mut x = model_meta();
    apply_recipe(&mut x, &dynamic, Target::Exact, false).unwrap();
    assert_eq!(read_recipe(&x).unwrap().unwrap(), dynamic);
    let eabf = Recipe::for_method(RopeMethod::Eabf, llama2());
    let e = apply_recipe(&mut m, &eabf, Target::LlamaCpp, false).unwrap_err();
    assert!(e.to_string().contains("--allow-approximate"), "{e}");
    let notes = apply_recipe(&mut m, &eabf, Target::LlamaCpp, true).unwrap();
    assert!(notes.iter().any(|n| n.starts_with("approximate")));
    assert_eq!(m.architecture().unwrap(), Some("mistral3"));
    let back = read_recipe(&m).unwrap().unwrap();
    assert_eq!(back.rope_base, 500000.0);
    assert!(matches!(
        back.scale_law,
        ScaleLaw::Step { length: 2048, .. }
    ));
    // a qwen2 file cannot take the step law
    let mut q = Metadata::new();
    q.set_architecture("qwen2");
    q.set_context_length("qwen2", 2048).unwrap();
    let mut r = Recipe::for_method(RopeMethod::Abf, llama2());
    r.scale_law = Recipe::default_step(2048);
    assert!(matches!(
        apply_recipe(&mut q, &r, Target::LlamaCpp, false),
        Err(GgufError::Refused(_))
    ));
    // a key of the wrong type is reported, as llama.cpp would
    let mut w = model_meta();
    w.set("llama.rope.freq_base", Value::F64(10000.0));
    assert!(matches!(
        read_recipe(&w),
        Err(GgufError::KeyWrongType { .. })
    ));
}

// ---- properties ----

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i16>().prop_map(Value::I16),
        any::<u32>().prop_map(Value::U32),
        any::<i64>().prop_map(Value::I64),
        any::<f32>().prop_map(Value::F32),
        any::<f64>().prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(Value::String),
        proptest::collection::vec(any::<u32>(), 0..20).prop_map(|v| Value::Array(Array::U32(v))),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..6), 0..10)
            .prop_map(|v| Value::Array(Array::String(v))),
        proptest::collection::vec(any::<bool>(), 0..10).prop_map(|v| Value::Array(Array::Bool(v))),
    ]
}

fn arb_file() -> impl Strategy<Value = (Metadata, Vec<(TensorSpec, Vec<u8>)>)> {
    let kvs = proptest::collection::vec(("[a-z.]{1,12}", arb_value()), 0..8);
    let tensors = proptest::collection::vec(
        (
            prop_oneof![Just(0u32), Just(1), Just(2), Just(8), Just(30)],
            1u64..4,
            1u64..3,
        ),
        0..5,
    );
    (kvs, tensors, prop_oneof![Just(8u32), Just(32), Just(64)]).prop_map(|(kvs, ts, align)| {
        let mut meta: Metadata = kvs.into_iter().collect();
        meta.remove("general.alignment");
        meta.set_alignment(align).unwrap();
        let tensors = ts
            .into_iter()
            .enumerate()
            .map(|(i, (code, blocks, rows))| {
                let ty = GgmlType::from_code(code);
                let row = blocks * ty.info().unwrap().block_size;
                let spec = TensorSpec::new(format!("t{i}"), vec![row, rows], ty).unwrap();
                let data = (0..spec.size)
                    .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8))
                    .collect();
                (spec, data)
            })
            .collect();
        (meta, tensors)
    })
}

proptest! {
    #[test]
    fn write_read_write_round_trips((meta, tensors) in arb_file()) {
        let bytes = write_vec(&meta, &tensors);
        let f = GgufFile::parse(&bytes).unwrap();
        prop_assert_eq!(&f.metadata, &meta);
        prop_assert_eq!(f.tensors.len(), tensors.len());
        for (i, (spec, data)) in tensors.iter().enumerate() {
            prop_assert_eq!(&f.tensors[i].name, &spec.name);
            prop_assert_eq!(&f.tensors[i].dims, &spec.dims);
            prop_assert_eq!(f.tensor_bytes(&bytes, i).unwrap(), &data[..]);
        }
        let again: Vec<_> = (0..f.tensors.len()).map(|i| {
            let t = &f.tensors[i];
            (TensorSpec::with_size(&t.name, t.dims.clone(), t.ggml_type, t.size), f.tensor_bytes(&bytes, i).unwrap().to_vec())
        }).collect();
        prop_assert_eq!(write_vec(&f.metadata, &again), bytes);
    }

    #[test]
    fn mutations_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>()) {
        let mut b = small();
        for (i, v) in edits {
            let at = i.index(b.len());
            b[at] = v;
        }
        let _ = GgufFile::parse(&b);
        let n = cut.index(b.len());
        let _ = GgufFile::parse(&b[..n]);
    }
}
