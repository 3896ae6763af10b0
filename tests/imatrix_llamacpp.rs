//! Our importance matrix against llama.cpp's. The vendored llama.cpp (llama-cpp-sys-2) ships
//! `common/imatrix-loader.cpp` but not `tools/imatrix/imatrix.cpp`, so this test drives
//! llama.cpp's own forward through the graph callback `llama-imatrix` uses (`cb_eval`) and sums
//! as `IMatrixCollector::collect_imatrix` does: every `GGML_OP_MUL_MAT` whose weight is a
//! `blk.*` tensor (or the head, `--process-output`) and whose f32 input has at least 16 rows;
//! every row of the input, squared per column, counted once. Chunks as `compute_imatrix` cuts
//! them: whole chunks of `ctx`, a fresh KV cache each, the first token replaced by BOS, every
//! position's output requested (so the last layer runs on every row).
//!
//! Both directions of the file format go through ggml's own GGUF code: llama.cpp's sums are
//! written as `save_imatrix` writes them (ggml tensors `[n, 1]` and `[1, 1]`, `gguf_add_tensor`,
//! `gguf_write_to_file`) and read by our reader; our file is read by `gguf_init_from_file`, the
//! first step of llama.cpp's `common_imatrix_load`.

#![cfg(feature = "llamacpp")]

mod common;

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;

use abf::imatrix;
use abf::runtime::Encoder;
use common::bin::{self, Bin};
use common::model::TinyModel;
use llama_cpp_sys_2 as sys;
use serde_json::json;

/// Per weight name: column sums (f64) and rows.
type Sums = BTreeMap<String, (Vec<f64>, u64)>;

fn weight_name(t: &sys::ggml_tensor) -> String {
    // SAFETY: ggml keeps `name` NUL-terminated within its 64 bytes.
    unsafe { CStr::from_ptr(t.name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn wanted(name: &str) -> bool {
    name.starts_with("blk.") || name == "output.weight" || name == "token_embd.weight"
}

/// The graph callback: `ask` says whether we want node `t`'s data; then it is called again after
/// the node is computed (CPU: the data is in host memory).
unsafe extern "C" fn collect(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    // SAFETY: ggml hands a valid node; a MUL_MAT has src[0] (weight) and src[1] (input).
    let t = unsafe { &*t };
    if t.op != sys::GGML_OP_MUL_MAT {
        return !ask;
    }
    let (w, x) = unsafe { (&*t.src[0], &*t.src[1]) };
    let name = weight_name(w);
    if ask {
        return wanted(&name) && x.type_ == sys::GGML_TYPE_F32 && x.ne[1] >= 16;
    }
    // SAFETY: `user` is the `Sums` the test owns for the context's lifetime.
    let sums = unsafe { &mut *(user as *mut Sums) };
    let n = x.ne[0] as usize;
    let e = sums.entry(name).or_insert_with(|| (vec![0.0; n], 0));
    let base = x.data as *const u8;
    for i3 in 0..x.ne[3] as usize {
        for i2 in 0..x.ne[2] as usize {
            for r in 0..x.ne[1] as usize {
                let off = r * x.nb[1] + i2 * x.nb[2] + i3 * x.nb[3];
                // SAFETY: row r of a contiguous-in-dim-0 f32 tensor of ne[0] values.
                let row = unsafe { std::slice::from_raw_parts(base.add(off) as *const f32, n) };
                for (s, v) in e.0.iter_mut().zip(row) {
                    *s += (*v as f64) * (*v as f64);
                }
                e.1 += 1;
            }
        }
    }
    true
}

unsafe extern "C" fn quiet(_: sys::ggml_log_level, _: *const c_char, _: *mut c_void) {}

/// llama.cpp's sums over `tokens` in chunks of `ctx` (f32 KV cache, no flash attention, so the
/// attention output it sums is computed in f32 as ours is).
fn llama_cpp_sums(
    gguf: &Path,
    tokens: &[u32],
    bos: Option<u32>,
    ctx: usize,
    chunks: usize,
) -> Sums {
    let mut sums = Sums::new();
    let path = CString::new(gguf.to_str().unwrap()).unwrap();
    // SAFETY: plain llama.h calls in their documented order; every pointer is checked for null
    // and freed once; `sums` outlives the context that calls back into it.
    unsafe {
        sys::llama_log_set(Some(quiet), std::ptr::null_mut());
        sys::llama_backend_init();
        let mut mp = sys::llama_model_default_params();
        mp.n_gpu_layers = 0;
        let model = sys::llama_model_load_from_file(path.as_ptr(), mp);
        assert!(
            !model.is_null(),
            "llama.cpp could not load {}",
            gguf.display()
        );
        let mut cp = sys::llama_context_default_params();
        cp.n_ctx = ctx as u32;
        cp.n_batch = ctx as u32;
        cp.n_ubatch = ctx as u32;
        cp.n_seq_max = 1;
        cp.n_threads = 2;
        cp.n_threads_batch = 2;
        cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cp.type_k = sys::GGML_TYPE_F32;
        cp.type_v = sys::GGML_TYPE_F32;
        cp.cb_eval = Some(collect);
        cp.cb_eval_user_data = &mut sums as *mut Sums as *mut c_void;
        let lctx = sys::llama_init_from_model(model, cp);
        assert!(!lctx.is_null(), "llama.cpp could not create a context");
        let batch = sys::llama_batch_init(ctx as i32, 0, 1);
        for c in 0..chunks {
            sys::llama_memory_clear(sys::llama_get_memory(lctx), true);
            let mut b = batch;
            b.n_tokens = ctx as i32;
            for k in 0..ctx {
                let mut tok = tokens[c * ctx + k];
                if k == 0 {
                    tok = bos.unwrap_or(tok);
                }
                *b.token.add(k) = tok as i32;
                *b.pos.add(k) = k as i32;
                *b.n_seq_id.add(k) = 1;
                **b.seq_id.add(k) = 0;
                *b.logits.add(k) = 1;
            }
            assert_eq!(
                sys::llama_decode(lctx, b),
                0,
                "llama_decode failed on chunk {c}"
            );
        }
        sys::llama_batch_free(batch);
        sys::llama_free(lctx);
        sys::llama_model_free(model);
    }
    sums
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Write `sums` as llama.cpp's `IMatrixCollector::save_imatrix` does, with ggml's GGUF writer.
fn write_as_llama_cpp(sums: &Sums, dataset: &str, ctx: usize, chunks: usize, out: &Path) {
    // SAFETY: a ggml context sized for every tensor as save_imatrix sizes it; every call is
    // from ggml.h/gguf.h with valid NUL-terminated strings; both contexts are freed once.
    unsafe {
        let mut size = 0;
        for (s, _) in sums.values() {
            size += sys::ggml_tensor_overhead() + 4 * s.len() + 64;
            size += sys::ggml_tensor_overhead() + 4 + 64;
        }
        let g = sys::ggml_init(sys::ggml_init_params {
            mem_size: size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: false,
        });
        let gg = sys::gguf_init_empty();
        sys::gguf_set_val_str(gg, cstr("general.type").as_ptr(), cstr("imatrix").as_ptr());
        let ds = cstr(dataset);
        let mut arr = [ds.as_ptr()];
        sys::gguf_set_arr_str(gg, cstr("imatrix.datasets").as_ptr(), arr.as_mut_ptr(), 1);
        sys::gguf_set_val_u32(gg, cstr("imatrix.chunk_count").as_ptr(), chunks as u32);
        sys::gguf_set_val_u32(gg, cstr("imatrix.chunk_size").as_ptr(), ctx as u32);
        for (name, (s, rows)) in sums {
            let t = sys::ggml_new_tensor_2d(g, sys::GGML_TYPE_F32, s.len() as i64, 1);
            sys::ggml_set_name(t, cstr(&format!("{name}.in_sum2")).as_ptr());
            let d = std::slice::from_raw_parts_mut((*t).data as *mut f32, s.len());
            for (a, b) in d.iter_mut().zip(s) {
                *a = *b as f32;
            }
            let c = sys::ggml_new_tensor_2d(g, sys::GGML_TYPE_F32, 1, 1);
            sys::ggml_set_name(c, cstr(&format!("{name}.counts")).as_ptr());
            *((*c).data as *mut f32) = *rows as f32;
            sys::gguf_add_tensor(gg, t);
            sys::gguf_add_tensor(gg, c);
        }
        let p = cstr(out.to_str().unwrap());
        assert!(sys::gguf_write_to_file(gg, p.as_ptr(), false));
        sys::gguf_free(gg);
        sys::ggml_free(g);
    }
}

/// Read `path` with ggml's GGUF reader: `general.type`, the chunk keys, and per tensor its
/// values, as `common_imatrix_load` gets them.
fn read_with_ggml(path: &Path) -> (String, u32, u32, BTreeMap<String, Vec<f32>>) {
    let mut tensors = BTreeMap::new();
    // SAFETY: gguf_init_from_file allocates the ggml context it returns through `ctx`; names
    // come from the file's tensor infos; data of F32 tensors is `ggml_nelements` floats.
    unsafe {
        let mut g: *mut sys::ggml_context = std::ptr::null_mut();
        let p = cstr(path.to_str().unwrap());
        let gg = sys::gguf_init_from_file(
            p.as_ptr(),
            sys::gguf_init_params {
                no_alloc: false,
                ctx: &mut g,
            },
        );
        assert!(!gg.is_null(), "ggml could not read {}", path.display());
        let key = |k: &str| sys::gguf_find_key(gg, cstr(k).as_ptr());
        let ty = CStr::from_ptr(sys::gguf_get_val_str(gg, key("general.type")))
            .to_string_lossy()
            .into_owned();
        let count = sys::gguf_get_val_u32(gg, key("imatrix.chunk_count"));
        let size = sys::gguf_get_val_u32(gg, key("imatrix.chunk_size"));
        for i in 0..sys::gguf_get_n_tensors(gg) {
            let name = CStr::from_ptr(sys::gguf_get_tensor_name(gg, i))
                .to_string_lossy()
                .into_owned();
            let t = sys::ggml_get_tensor(g, cstr(&name).as_ptr());
            assert_eq!((*t).type_, sys::GGML_TYPE_F32, "{name}");
            let n = sys::ggml_nelements(t) as usize;
            tensors.insert(
                name,
                std::slice::from_raw_parts((*t).data as *const f32, n).to_vec(),
            );
        }
        sys::gguf_free(gg);
        sys::ggml_free(g);
        (ty, count, size, tensors)
    }
}

#[test]
fn our_matrix_matches_llama_cpp_on_its_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let m = TinyModel::new().seed(9).tokenizer_config(json!({
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": true
    }));
    let dir = m.write(&tmp.path().join("m"));
    let gguf = tmp.path().join("m.gguf");
    bin::run(
        Bin::Convert,
        &[
            "to-gguf",
            dir.to_str().unwrap(),
            "-o",
            gguf.to_str().unwrap(),
            "--outtype",
            "f32",
        ],
    )
    .expect_code(0);
    let text: String = (0..60)
        .map(|i| format!("line {i}: the model reads {} words. ", i * 7 % 13))
        .collect();
    let txt = tmp.path().join("calib.txt");
    std::fs::write(&txt, &text).unwrap();
    let (ctx, chunks) = (32usize, 4usize);
    let enc = Encoder::open(&gguf).unwrap();
    let tokens = enc.encode(&text).unwrap();
    assert!(
        enc.bos.is_some() && tokens.len() >= ctx * chunks,
        "{}",
        tokens.len()
    );
    let theirs = llama_cpp_sums(&gguf, &tokens, enc.bos, ctx, chunks);
    // 7 per layer and the head: the callback saw every matmul we sum
    assert_eq!(theirs.len(), 7 * m.layers + 1, "{:?}", theirs.keys());

    for (source, label) in [(&gguf, "gguf"), (&dir, "dir")] {
        let out = tmp.path().join(format!("{label}.imatrix.gguf"));
        bin::run(
            Bin::Convert,
            &[
                "imatrix",
                source.to_str().unwrap(),
                "--text",
                txt.to_str().unwrap(),
                "--ctx",
                &ctx.to_string(),
                "--chunks",
                &chunks.to_string(),
                "-o",
                out.to_str().unwrap(),
            ],
        )
        .expect_code(0);
        let ours = imatrix::read(&out).unwrap();
        assert_eq!(
            ours.entries.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>()
        );
        let mut worst: f64 = 0.0;
        for (name, (sums, rows)) in &theirs {
            let e = &ours.entries[name];
            assert_eq!(e.counts, vec![*rows], "{label} {name}");
            let scale = sums.iter().cloned().fold(0.0, f64::max);
            let diff = e
                .sums
                .iter()
                .zip(sums)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            worst = worst.max(diff / scale);
        }
        eprintln!("{label}: worst relative difference from llama.cpp {worst:e}");
        // two f32 forwards that order their sums differently (ggml's SIMD dot products, its
        // softmax and RMSNorm kernels): ~1e-6 relative per activation; measured 9.4e-7
        assert!(worst < 1e-5, "{label}: {worst:e}");

        // llama.cpp's GGUF reader reads our file: the keys and every tensor's values
        let (ty, count, size, tensors) = read_with_ggml(&out);
        assert_eq!(
            (ty.as_str(), count, size),
            ("imatrix", chunks as u32, ctx as u32)
        );
        assert_eq!(tensors.len(), 2 * ours.entries.len());
        for (name, e) in &ours.entries {
            assert_eq!(tensors[&format!("{name}.in_sum2")], e.sums, "{name}");
            assert_eq!(
                tensors[&format!("{name}.counts")],
                vec![e.counts[0] as f32],
                "{name}"
            );
        }
    }

    // a file written by ggml's writer the way llama-imatrix writes it: our reader reads it
    let theirs_file = tmp.path().join("llama-cpp.imatrix.gguf");
    write_as_llama_cpp(&theirs, "calib.txt", ctx, chunks, &theirs_file);
    let read = imatrix::read(&theirs_file).unwrap();
    assert_eq!(
        (read.chunk_count, read.chunk_size),
        (chunks as u32, ctx as u32)
    );
    assert_eq!(read.datasets, vec!["calib.txt".to_string()]);
    assert_eq!(read.entries.len(), theirs.len());
    for (name, (s, rows)) in &theirs {
        let e = &read.entries[name];
        assert_eq!(e.counts, vec![*rows]);
        assert_eq!(
            e.sums,
            s.iter().map(|v| *v as f32).collect::<Vec<_>>(),
            "{name}"
        );
    }
}
