//! Fine-tuning step / forward benchmark on random weights of a model shape (for
//! `scripts/gpu-check.sh`; see `abf::train::bench`). Prints one JSON object.
//!
//! step_bench --shape llama2-7b --seq-len 16384 [--lora 8] [--steps 3] [--dtype bf16]
//!            [--device cuda:0] [--forward] [--matmul-n 8192] [--no-recompute]
//!            [--no-blocked-attention]

use anyhow::{bail, Context};
use clap::Parser;

use abf::train::bench::{forward_bench, matmul_rate, step_bench, Shape, StepBenchSpec};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "llama2-7b")]
    shape: String,
    #[arg(long, default_value_t = 4096)]
    seq_len: usize,
    #[arg(long)]
    lora: Option<usize>,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value = "bf16", value_parser = abf::cli::args::compute_dtype())]
    dtype: candle_core::DType,
    #[command(flatten)]
    device: abf::cli::DeviceArgs,
    /// A forward-only logits pass instead of training steps.
    #[arg(long)]
    forward: bool,
    /// Side of the square matmul that measures the card's dense rate (0: skip, no MFU).
    #[arg(long, default_value_t = 8192)]
    matmul_n: usize,
    #[arg(long)]
    no_recompute: bool,
    /// Recompute each layer as one graph (attention memory quadratic in length), for comparison.
    #[arg(long)]
    no_blocked_attention: bool,
}

#[global_allocator]
static COUNTING: abf::train::plan::AllocCounter = abf::train::plan::AllocCounter;

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let device = a.device.device.open()?;
    let dtype = a.dtype;
    let shape = Shape::by_name(&a.shape)?;
    if a.seq_len == 0 || a.steps == 0 {
        bail!("--seq-len and --steps must be positive");
    }
    let rate = if a.matmul_n > 0 {
        Some(matmul_rate(&device, dtype, a.matmul_n, 20).context("matmul rate")?)
    } else {
        None
    };
    let report = if a.forward {
        serde_json::to_value(forward_bench(&shape, a.seq_len, dtype, &device, rate)?)?
    } else {
        let spec = StepBenchSpec {
            shape,
            seq_len: a.seq_len,
            lora: a.lora,
            steps: a.steps,
            dtype,
            recompute: !a.no_recompute,
            blocked_attention: !a.no_blocked_attention,
            seed: 1,
        };
        serde_json::to_value(step_bench(&spec, &device, rate)?)?
    };
    let mut v = report;
    v["matmul_flops"] = serde_json::json!(rate);
    // the tensors' bytes at their peak (the resident set adds what glibc keeps for reuse)
    v["allocated_peak_bytes"] = serde_json::json!(abf::train::plan::AllocCounter::peak());
    println!("{v}");
    Ok(())
}
