//! GGUF patch speed: in-place edits against file size, and a full rewrite against `cp`.
//! `cargo bench --bench gguf` prints a markdown section; with ABF_BENCH_OUT=path it also writes
//! it there. ABF_BENCH_SIZES_MB (default 10,100,1000) picks the synthetic file sizes.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use abf::gguf::{
    in_place_writes, open_mmap, rewrite, write_in_place, ArchKey, GgmlType, GgufWriter, Metadata,
    TensorSpec, Value,
};

const REPEATS: usize = 15;

/// A llama-like GGUF of about `mb` megabytes: F32 tensors of 4 MiB with a byte pattern.
fn make(path: &Path, mb: u64) {
    let mut m = Metadata::new();
    m.set_architecture("llama");
    m.set("general.name", Value::string("bench"));
    m.set_context_length("llama", 4096).unwrap();
    m.set_rope_freq_base("llama", 10000.0).unwrap();
    m.set_arch_u32("llama", ArchKey::RopeDimensionCount, 128)
        .unwrap();
    let per = 1u64 << 20; // elements (4 MiB of f32)
    let n = (mb << 20).div_ceil(per * 4).max(1);
    let chunk: Vec<u8> = (0..per * 4)
        .map(|i| ((i * 2_654_435_761) >> 13) as u8)
        .collect();
    let mut w = GgufWriter::create(path, true).unwrap();
    for (k, v) in m.iter() {
        w.add_kv(k, v.clone()).unwrap();
    }
    for i in 0..n {
        w.add_tensor(
            TensorSpec::new(format!("blk.{i}.w"), vec![per], GgmlType::from_code(0)).unwrap(),
        )
        .unwrap();
    }
    for i in 0..n {
        w.write_tensor_data(&format!("blk.{i}.w"), &chunk).unwrap();
    }
    w.commit().unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn in_place_once(path: &Path, base: f64) -> Duration {
    let t = Instant::now();
    let mapped = open_mmap(path).unwrap();
    let mut meta = mapped.file.metadata.clone();
    meta.set_rope_freq_base("llama", base).unwrap();
    let writes = in_place_writes(&mapped.file, &meta).unwrap();
    drop(mapped);
    write_in_place(path, &writes).unwrap();
    t.elapsed()
}

fn rewrite_once(src: &Path, dst: &Path) -> Duration {
    let t = Instant::now();
    let mapped = open_mmap(src).unwrap();
    let mut meta = mapped.file.metadata.clone();
    meta.set(
        "general.name",
        Value::string("a longer name that moves every byte"),
    );
    rewrite(src, &mapped.file, &meta, dst, true).unwrap();
    t.elapsed()
}

fn cp_once(src: &Path, dst: &Path) -> Duration {
    let t = Instant::now();
    let ok = Command::new("cp")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp failed");
    std::fs::File::open(dst).unwrap().sync_all().unwrap();
    t.elapsed()
}

fn main() {
    let sizes: Vec<u64> = std::env::var("ABF_BENCH_SIZES_MB")
        .unwrap_or_else(|_| "10,100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dir = tempfile::tempdir_in(
        std::env::var("ABF_BENCH_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )
    .unwrap();
    let mut rows = String::new();
    for mb in sizes {
        let src = dir.path().join(format!("{mb}.gguf"));
        let dst = dir.path().join(format!("{mb}.out.gguf"));
        let cpd = dir.path().join(format!("{mb}.cp.gguf"));
        make(&src, mb);
        let bytes = std::fs::metadata(&src).unwrap().len() as f64;
        let patch = median(
            (0..REPEATS)
                .map(|i| in_place_once(&src, 10000.0 + i as f64))
                .collect(),
        );
        let reps = if mb >= 1000 { 3 } else { 5 };
        let rw = median((0..reps).map(|_| rewrite_once(&src, &dst)).collect());
        let cp = median((0..reps).map(|_| cp_once(&src, &cpd)).collect());
        let mbs = |d: Duration| bytes / 1e6 / d.as_secs_f64();
        let _ = writeln!(
            rows,
            "| {:.0} MB | {:.3} ms | {:.3} s ({:.0} MB/s) | {:.3} s ({:.0} MB/s) | {:.2} |",
            bytes / 1e6,
            patch.as_secs_f64() * 1e3,
            rw.as_secs_f64(),
            mbs(rw),
            cp.as_secs_f64(),
            mbs(cp),
            rw.as_secs_f64() / cp.as_secs_f64()
        );
        for p in [&src, &dst, &cpd] {
            let _ = std::fs::remove_file(p);
        }
    }
    let md = format!(
        "## GGUF patching\n\n\
         Synthetic llama GGUFs (F32 tensors of 4 MiB) in a temporary directory. In-place: parse the \
         header through mmap, change `llama.rope.freq_base` (4 bytes), fsync; median of {REPEATS}. \
         Rewrite: new header (longer `general.name`) and every tensor copied, temp file + fsync + \
         rename; against `cp` + fsync of the same file (median of 3-5; the source is in the page \
         cache for both).\n\n\
         | file | in-place patch | rewrite | cp + fsync | rewrite / cp |\n\
         |---|---|---|---|---|\n{rows}\n\
         Command: `cargo bench --bench gguf` (sizes: `ABF_BENCH_SIZES_MB=10,100,1000`).\n"
    );
    print!("{md}");
    if let Ok(out) = std::env::var("ABF_BENCH_OUT") {
        std::fs::write(&out, &md).unwrap();
    }
}
