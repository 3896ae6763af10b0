//! What an importance matrix buys, on the real SmolLM2 (issue 14's quality table): q4_k_m, q3_k and
//! q2_k quantized without a matrix, with one collected over 512-token chunks and with one over
//! chunks of the full window, each compared with the f32 checkpoint (our candle reading of the
//! file; KL divergence and top-1 agreement) on held-out text.
//!
//! `cargo run --release --example imatrix_quality -- MODEL CALIBRATION.txt HELD_OUT.txt [LENGTH]
//! [FULL_CTX] [SHORT_CTX]` prints a markdown table (docs/benchmarks.md holds one with its command).
//! MODEL is a GGUF or a checkpoint directory. For a model whose recipe extends its window, the KLD is
//! also given beyond the original window (the positions the release is for); SHORT_CTX (default
//! 512) is the chunk length of the first matrix, FULL_CTX (default: the window) of the second.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use abf::checkpoint::Checkpoint;
use abf::convert::quant_plan::OutType;
use abf::convert::{from_gguf, plan_to_gguf, write_many, FromGgufOptions, Output, ToGgufOptions};
use abf::gguf::SplitLimits;
use abf::imatrix::{collect, CollectOptions};
use abf::runtime::{load_llama, open_backend, open_forward, BackendKind, CandleBackend, Encoder};
use abf::verify::{Band, Comparison, Reference};
use candle_core::{DType, Device};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn reference(ckpt: &Checkpoint, tokens: &[u32]) -> Res<Reference> {
    let model = load_llama(ckpt, &ckpt.config.model, DType::F32, &Device::Cpu)?;
    let mut b = CandleBackend::new(model, "reference");
    let mut r = Reference::with_capacity(tokens.len(), ckpt.config.model.vocab_size)?;
    abf::runtime::LogitsBackend::for_each_logits(&mut b, tokens, &mut |_, row| {
        r.push(row);
        Ok(())
    })?;
    Ok(r)
}

/// KLD and top-1 over every position, and the KLD beyond `original` when it is inside.
fn compare(
    gguf: &Path,
    r: &Reference,
    tokens: &[u32],
    original: usize,
) -> Res<(f64, f64, Option<f64>)> {
    let mut b = open_backend(gguf, BackendKind::Candle, &Device::Cpu)?;
    // bands are disjoint: within the original window and beyond it, the whole their weighted mean
    let split = original.min(tokens.len());
    let mut bands = vec![Band {
        start: 0,
        end: split.max(1),
    }];
    if split < tokens.len() {
        bands.push(Band {
            start: split.max(1),
            end: tokens.len(),
        });
    }
    let mut cmp = Comparison::new(r, tokens, bands.clone());
    b.for_each_logits(tokens, &mut |pos, row| {
        cmp.push(pos, row)
            .map_err(abf::runtime::RuntimeError::consumer)
    })?;
    let m = cmp.finish()?;
    let n = |i: usize| (bands[i].end - bands[i].start) as f64;
    let total: f64 = (0..m.len()).map(n).sum();
    let kld = (0..m.len()).map(|i| m[i].kld_mean * n(i)).sum::<f64>() / total;
    let top1 = (0..m.len()).map(|i| m[i].top1 * n(i)).sum::<f64>() / total;
    Ok((kld, top1, m.get(1).map(|b| b.kld_mean)))
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err(
            "usage: imatrix_quality SMOLLM.gguf CALIBRATION.txt HELD_OUT.txt [LENGTH] [FULL_CTX]"
                .into(),
        );
    }
    let tmp = tempfile::tempdir()?;
    let dir = if Path::new(&args[1]).is_dir() {
        PathBuf::from(&args[1])
    } else {
        let dir = tmp.path().join("model");
        from_gguf(Path::new(&args[1]), &dir, &FromGgufOptions::default())?;
        dir
    };
    let ckpt = Checkpoint::open(&dir)?;
    let window = ckpt.config.model.recipe.context as usize;
    let length: usize = args.get(4).map_or(Ok(window), |s| s.parse())?;
    let full: usize = args.get(5).map_or(Ok(window), |s| s.parse())?;
    let short: usize = args.get(6).map_or(Ok(512), |s| s.parse())?;
    let original = ckpt.config.model.recipe.original_context as usize;
    let enc = Encoder::from_checkpoint(&ckpt)?;
    let calib = enc.encode(&std::fs::read_to_string(&args[2])?)?;
    let mut held = enc.encode(&std::fs::read_to_string(&args[3])?)?;
    held.truncate(length);
    eprintln!(
        "calibration {} tokens, held-out {} tokens, window {window}",
        calib.len(),
        held.len()
    );

    let mut matrices: Vec<(String, Option<Arc<_>>)> = vec![("none".into(), None)];
    for ctx in [short, full] {
        let start = std::time::Instant::now();
        let mut m = open_forward(&dir, DType::F32, &Device::Cpu)?;
        let opts = CollectOptions {
            ctx,
            max_chunks: None,
            dataset: args[2].clone(),
            bos: m.encoder.bos,
        };
        let (matrix, report) = collect(&mut m.model, &calib, &opts, &mut |_| {})?;
        eprintln!(
            "imatrix ctx {ctx}: {} chunks in {:.0} s",
            report.chunks,
            start.elapsed().as_secs_f64()
        );
        matrices.push((
            format!("{} x {ctx}", report.chunks),
            Some(Arc::new(matrix.weights())),
        ));
    }

    let r = reference(&ckpt, &held)?;
    let types = [OutType::Q4KM, OutType::Q3K, OutType::Q2K];
    let beyond = original < held.len();
    if beyond {
        println!("| type | imatrix | KLD | top-1 | KLD / KLD without | KLD beyond {original} | / without |");
        println!("|---|---|---|---|---|---|---|");
    } else {
        println!("| type | imatrix | KLD | top-1 | KLD / KLD without |");
        println!("|---|---|---|---|---|");
    }
    let mut without_beyond = Vec::new();
    let mut without = Vec::new();
    for (name, weights) in &matrices {
        let outputs: Vec<Output> = types
            .iter()
            .map(|&t| {
                // the recipe exactly (abf's own keys, read exactly by the candle backend): the
                // comparison is of the quantization alone, not of a runtime's form of the recipe
                let opts = ToGgufOptions {
                    outtype: t,
                    imatrix: weights.clone(),
                    runtime: abf::rope::Target::Exact,
                    ..ToGgufOptions::default()
                };
                let plan = plan_to_gguf(&ckpt, &opts)?;
                let path: PathBuf = tmp
                    .path()
                    .join(format!("{}-{}.gguf", t.name(), without.len()));
                Ok(Output { plan, path })
            })
            .collect::<Res<Vec<_>>>()?;
        write_many(&ckpt, &outputs, &SplitLimits::default(), true, &|_, _| {})?;
        for (i, o) in outputs.iter().enumerate() {
            let (kld, top1, far) = compare(&o.path, &r, &held, original)?;
            if weights.is_none() {
                without.push(kld);
                without_beyond.push(far.unwrap_or(f64::NAN));
            }
            let tail = match far {
                Some(f) => format!(" {f:.4} | {:.3} |", f / without_beyond[i]),
                None => String::new(),
            };
            println!(
                "| {} | {name} | {kld:.4} | {:.1}% | {:.3} |{tail}",
                types[i].name(),
                top1 * 100.0,
                kld / without[i]
            );
        }
    }
    Ok(())
}
