//! to-gguf speed: f16, q8_0 and q4_k_m of SmolLM2 (its f32 checkpoint made by from-gguf) in GB/s
//! of input, beside a plain copy of the same bytes. `cargo bench --bench convert` prints a
//! markdown section; with ABF_BENCH_OUT=path it also writes it there.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use abf::checkpoint::Checkpoint;
use abf::convert::quant_plan::OutType;
use abf::convert::{from_gguf, plan_to_gguf, write_gguf, FromGgufOptions, ToGgufOptions};

const REPEATS: usize = 3;

fn main() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut md = String::new();
    writeln!(
        md,
        "## to-gguf (SmolLM2-135M, f32 checkpoint from from-gguf)\n"
    )
    .unwrap();
    if !src.is_file() {
        writeln!(
            md,
            "skipped: {} is missing (run `make fetch`)",
            src.display()
        )
        .unwrap();
        finish(&md);
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("smollm");
    from_gguf(&src, &dir, &FromGgufOptions::default()).expect("from-gguf");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let weights = dir.join("model.safetensors");
    let input = std::fs::metadata(&weights).expect("weights").len();
    let cores = rayon::current_num_threads();
    writeln!(
        md,
        "Input {:.0} MB of f32 safetensors, {cores} threads, best of {REPEATS}.\n",
        input as f64 / 1e6
    )
    .unwrap();
    // The same rows with the outputs on the disk (what a user gets: to-gguf syncs its output) and
    // in memory (/dev/shm: the sync is free, so the rows show the converter's own speed).
    let shm = tempfile::tempdir_in("/dev/shm").ok();
    let mut dests = vec![("disk (the temp dir)", tmp.path().to_path_buf())];
    if let Some(d) = &shm {
        dests.push(("tmpfs (/dev/shm)", d.path().to_path_buf()));
    }
    if std::env::var_os("ABF_BENCH_ONE_PASS").is_some() {
        // only the one-pass section (measuring a change to it)
        dests.clear();
    }
    for (where_, dest) in dests {
        writeln!(md, "\nOutputs on {where_}:\n").unwrap();
        writeln!(md, "| operation | seconds | GB/s of input | output MB |").unwrap();
        writeln!(md, "|---|---|---|---|").unwrap();
        // seconds by row, for the ratios under the table
        let mut t: std::collections::HashMap<String, f64> = Default::default();
        let copy_out = dest.join("copy.bin");
        let best = |f: &mut dyn FnMut() -> u64| -> (f64, u64) {
            let mut best = f64::INFINITY;
            let mut bytes = 0;
            for _ in 0..REPEATS {
                let t = Instant::now();
                bytes = f();
                best = best.min(t.elapsed().as_secs_f64());
            }
            (best, bytes)
        };
        let (s, b) = best(&mut || std::fs::copy(&weights, &copy_out).expect("copy"));
        t.insert("copy".into(), s);
        writeln!(
            md,
            "| plain copy (`std::fs::copy`, no fsync) | {s:.3} | {:.2} | {:.0} |",
            input as f64 / s / 1e9,
            b as f64 / 1e6
        )
        .unwrap();
        // to-gguf syncs its output before the rename (an atomic, durable write): the fair copy does too.
        let (s, b) = best(&mut || {
            let n = std::fs::copy(&weights, &copy_out).expect("copy");
            std::fs::File::open(&copy_out)
                .and_then(|f| f.sync_all())
                .expect("fsync");
            n
        });
        t.insert("copy+fsync".into(), s);
        writeln!(
            md,
            "| plain copy + fsync (what to-gguf's durable write compares with) | {s:.3} | {:.2} | {:.0} |",
            input as f64 / s / 1e9,
            b as f64 / 1e6
        )
        .unwrap();
        // Every type on all cores, then the quantized ones on one thread: the gain is the cores used.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        let runs = [
            (OutType::F16, cores),
            (OutType::Q8_0, cores),
            (OutType::Q4KM, cores),
            (OutType::Q8_0, 1),
            (OutType::Q4KM, 1),
        ];
        for (out, threads) in runs {
            let opts = ToGgufOptions {
                outtype: out,
                ..ToGgufOptions::default()
            };
            let path = dest.join(format!("{}.gguf", out.name()));
            let mut run = || {
                let plan = plan_to_gguf(&ckpt, &opts).expect("plan");
                write_gguf(&ckpt, &plan, &path, true, &|_, _| {})
                    .expect("write")
                    .output_bytes
            };
            let (s, b) = if threads == 1 {
                one.install(|| best(&mut run))
            } else {
                best(&mut run)
            };
            t.insert(format!("{}/{threads}", out.name()), s);
            writeln!(
                md,
                "| to-gguf {} ({threads} thread{}) | {s:.3} | {:.2} | {:.0} |",
                out.name(),
                if threads == 1 { "" } else { "s" },
                input as f64 / s / 1e9,
                b as f64 / 1e6
            )
            .unwrap();
        }
        // llama.cpp's Python converter's write path (gguf-py + numpy) on the same input: see
        // benches/gguf_py_convert.py for what it keeps and why convert_hf_to_gguf.py itself cannot run.
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/gguf_py_convert.py");
        let have_gguf_py = std::process::Command::new("python3")
            .args(["-c", "import gguf, numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if have_gguf_py {
            for out in ["f16", "q8_0"] {
                let path = dest.join(format!("py-{out}.gguf"));
                let mut best = f64::INFINITY;
                for _ in 0..REPEATS {
                    let o = std::process::Command::new("python3")
                        .arg(&script)
                        .arg(&weights)
                        .arg(&path)
                        .arg(out)
                        .output()
                        .expect("python3");
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                    let s: f64 = String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .parse()
                        .expect("seconds");
                    best = best.min(s);
                }
                let b = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                t.insert(format!("py-{out}"), best);
                writeln!(
                    md,
                    "| gguf-py {out} (the Python converter's write path, 1 thread) | {best:.3} | {:.2} | {:.0} |",
                    input as f64 / best / 1e9,
                    b as f64 / 1e6
                )
                .unwrap();
            }
            writeln!(
                md,
                "\nThe gguf-py rows run `benches/gguf_py_convert.py`: llama.cpp's `convert_hf_to_gguf.py` \
                 minus its torch/transformers imports (not installable here), i.e. the same numpy cast and \
                 Q8_0 quantizer and the same GGUFWriter on the same memory-mapped f32 tensors. gguf-py has \
                 no k-quant quantizer: q4_k_m needs llama.cpp's C++ `llama-quantize`."
            )
            .unwrap();
        } else {
            writeln!(
                md,
                "\nPython with gguf-py is not on this machine: the Python converter rows are skipped."
            )
            .unwrap();
        }
        let r = |a: &str, b: &str| match (t.get(a), t.get(b)) {
            (Some(x), Some(y)) => format!("{:.2}", x / y),
            _ => "-".into(),
        };
        let all = format!("/{cores}");
        writeln!(
            md,
            "\nRatios: copy time / to-gguf f16 time = {} (no fsync copy), {} (copy + fsync); \
             {cores} threads against 1: q8_0 {:}x, q4_k_m {}x; gguf-py time / to-gguf time: f16 {}x, \
             q8_0 {}x.",
            r("copy", &format!("f16{all}")),
            r("copy+fsync", &format!("f16{all}")),
            r("q8_0/1", &format!("q8_0{all}")),
            r("q4_k_m/1", &format!("q4_k_m{all}")),
            r("py-f16", &format!("f16{all}")),
            r("py-q8_0", &format!("q8_0{all}")),
        )
        .unwrap();
    }
    one_pass(&ckpt, tmp.path(), &mut md);
    finish(&md);
}

/// A release's conversion: five types written in one pass over the input (`to-gguf --outtype
/// f16,q8_0,q6_k,q5_k_m,q4_k_m`, `write_many`) against five separate to-gguf runs, outputs on the
/// disk, each with its CPU time; the line it is held to is `one_pass_budget` (the 1.3 x the
/// slowest single type where cores suffice, the quantizers' work over the cores where they do not).
fn one_pass(ckpt: &Checkpoint, dir: &std::path::Path, md: &mut String) {
    use abf::convert::{one_pass_budget, write_many, Output};
    let types = [
        OutType::F16,
        OutType::Q8_0,
        OutType::Q6K,
        OutType::Q5KM,
        OutType::Q4KM,
    ];
    let plan = |out: OutType| {
        plan_to_gguf(
            ckpt,
            &ToGgufOptions {
                outtype: out,
                ..ToGgufOptions::default()
            },
        )
        .expect("plan")
    };
    // best of REPEATS by wall time, with that run's CPU time (every thread, user + system)
    let best = |f: &mut dyn FnMut()| -> (f64, f64) {
        (0..REPEATS)
            .map(|_| {
                let (t, c) = (Instant::now(), cpu_seconds());
                f();
                (t.elapsed().as_secs_f64(), cpu_seconds() - c)
            })
            .fold((f64::INFINITY, 0.0), |a, b| if b.0 < a.0 { b } else { a })
    };
    writeln!(
        md,
        "\n## Five types in one pass (SmolLM2-135M, outputs on the disk, best of {REPEATS})\n\n\
         | run | seconds | CPU seconds |\n|---|---|---|"
    )
    .unwrap();
    let mut singles = Vec::new();
    for out in types {
        let p = plan(out);
        let path = dir.join(format!("single-{}.gguf", out.name()));
        let s = best(&mut || {
            write_gguf(ckpt, &p, &path, true, &|_, _| {}).expect("write");
        });
        writeln!(
            md,
            "| to-gguf {} alone | {:.3} | {:.3} |",
            out.name(),
            s.0,
            s.1
        )
        .unwrap();
        singles.push(s);
    }
    let outputs: Vec<Output> = types
        .iter()
        .map(|&out| Output {
            plan: plan(out),
            path: dir.join(format!("many-{}.gguf", out.name())),
        })
        .collect();
    let many = best(&mut || {
        write_many(
            ckpt,
            &outputs,
            &abf::gguf::SplitLimits::default(),
            true,
            &|_, _| {},
        )
        .expect("write_many");
    });
    let sum: f64 = singles.iter().map(|s| s.0).sum();
    let sum_cpu: f64 = singles.iter().map(|s| s.1).sum();
    let slowest = singles.iter().map(|s| s.0).fold(0.0, f64::max);
    let cores = rayon::current_num_threads();
    let budget = one_pass_budget(&singles, cores);
    writeln!(
        md,
        "| five separate runs (sum) | {sum:.3} | {sum_cpu:.3} |\n\
         | one pass, five outputs | {:.3} | {:.3} |\n\n\
         One pass / five runs = {:.2}; one pass / slowest single type = {:.2}. {cores} threads. \
         Budget (`one_pass_budget`: 1.3 x max(slowest single {slowest:.3} s, singles' CPU \
         {sum_cpu:.3} s / {cores} cores)) = {budget:.3} s: {}. With cores enough to encode every \
         type at once the budget is the release issue's 1.3 x the slowest type; with fewer cores \
         than types the quantizers' work, which one pass cannot share, is the floor.",
        many.0,
        many.1,
        many.0 / sum,
        many.0 / slowest,
        if many.0 <= budget { "met" } else { "NOT met" },
    )
    .unwrap();
}

/// CPU time of this process so far, every thread, user + system (getrusage).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the rusage struct we own (zeroed is a valid rusage).
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn finish(md: &str) {
    print!("{md}");
    if let Some(p) = std::env::var_os("ABF_BENCH_OUT") {
        std::fs::write(&p, md).expect("ABF_BENCH_OUT");
    }
}
