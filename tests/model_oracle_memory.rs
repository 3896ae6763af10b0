//! A forward of 16k tokens runs in bounded memory (measured in a child process running
//! `memory_child_16k` of this binary).

mod common;

use abf::rope::ScaleLaw;
use candle_core::{DType, Device, Tensor};
use common::oracle::*;

// ---------------------------------------------------------------------------------------------
// Memory of a 16k-token forward
// ---------------------------------------------------------------------------------------------

const LONG: usize = 16_384;

const MEM_SHAPE: Shape = Shape {
    vocab: 64,
    hidden: 32,
    inter: 64,
    layers: 2,
    heads: 4,
    kv: 2,
    head_dim: 8,
    tied: false,
};

/// `VmRSS` and `VmHWM` (peak resident set) of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} not in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Runs only as the child process of `forward_of_16k_tokens_runs_in_bounded_memory`, so that its
/// peak resident set is its own.
#[test]
fn memory_child_16k() {
    if std::env::var("ABF_MEMORY_CHILD").is_err() {
        return;
    }
    let cfg = config(MEM_SHAPE, eabf(2, ScaleLaw::Log));
    let w = random_weights(&cfg, 40);
    let written = write_model(&w, DType::F32, 1);
    let model = load(&written, &cfg, DType::F32);
    assert_eq!(model.query_block(), abf::model::DEFAULT_QUERY_BLOCK);
    let toks = tokens(LONG, MEM_SHAPE.vocab, 41);
    // warm up thread pools and allocator on a short prefix
    let short = Tensor::from_vec(toks[..600].to_vec(), (1, 600), &Device::Cpu).expect("tokens");
    let prefix = to_rows(&model.forward(&short, 0).expect("short forward"));
    let (before, _) = rss_kib();
    let t = Tensor::from_vec(toks, (1, LONG), &Device::Cpu).expect("tokens");
    let logits = model.forward(&t, 0).expect("16k forward");
    let (_, peak) = rss_kib();
    assert_eq!(logits.dims(), &[1, LONG, MEM_SHAPE.vocab]);
    // causality: the first 600 rows of the long forward are the short forward's
    let head = to_rows(&logits.narrow(1, 0, 600).expect("narrow"));
    assert!(
        max_abs_diff(&head, &prefix) < 1e-5,
        "prefix of the long forward"
    );
    let last = to_rows(&logits.narrow(1, LONG - 1, 1).expect("narrow"));
    assert!(last[0].iter().all(|x| x.is_finite()));
    println!("ABF_MEM before_kib={before} peak_kib={peak}");
}

/// A 16k-token forward never holds a full 16k x 16k score matrix: its peak resident set above the
/// loaded model stays under a bound derived from the blocked attention. One block's scores are
/// `S = heads * block * seq * 4 B = 4 * 512 * 16384 * 4 B = 128 MiB` (f32); the fast path holds at
/// most two of them plus the `block x seq` mask (`S / heads`), and everything else (activations,
/// logits: `16384 x 64` f32 each) is a few MiB. The bound allows a third score tensor and 64 MiB:
/// `3 S + S/4 + 64 MiB = 480 MiB`, against 4 GiB for the full matrix of all heads (1 GiB for a
/// single head).
#[test]
fn forward_of_16k_tokens_runs_in_bounded_memory() {
    let m = common::child::measure("memory_child_16k", "ABF_MEMORY_CHILD", "1", "ABF_MEM");
    let (before, peak) = (m["before_kib"], m["peak_kib"]);
    let s = (MEM_SHAPE.heads * abf::model::DEFAULT_QUERY_BLOCK * LONG * 4) as u64;
    let bound = 3 * s + s / MEM_SHAPE.heads as u64 + (64 << 20);
    let full = (MEM_SHAPE.heads * LONG * LONG * 4) as u64;
    let grew = (peak.saturating_sub(before)) << 10;
    eprintln!(
        "16k forward: resident {} MiB before, peak {} MiB, growth {} MiB (bound {} MiB, full matrix {} MiB)",
        before >> 10,
        peak >> 10,
        grew >> 20,
        bound >> 20,
        full >> 20
    );
    assert!(grew < bound, "peak growth {grew} B exceeds {bound} B");
}
