//! `abf-convert to-gguf`: a Hugging Face LLaMA-family checkpoint to a llama.cpp GGUF.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::cli::args::{byte_size, out_type, GgufTarget};
use crate::cli::{print_json, progress, Exit, JsonFlag, RecipeArgs};
use crate::convert::multi::output_path;
use crate::convert::{
    plan_to_gguf, write_gguf_split, write_many, OutType, Output, Plan, ToGgufOptions,
};
use crate::gguf::{output_prefix, plan_parts, split_path, SplitLimits};

#[derive(Args, Debug)]
pub struct ToGgufArgs {
    /// Model directory (config.json, safetensors, tokenizer.json, tokenizer_config.json).
    pub model_dir: PathBuf,
    /// The GGUF file to write; with a split, the set's prefix (less `.gguf`): parts
    /// PREFIX-00001-of-0000N.gguf. With several --outtype: a directory (NAME-TYPE.gguf inside), a
    /// path containing `{type}`, or a path whose stem gets `-TYPE` appended.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Split into parts of at most this many tensor bytes: N, NK, NM or NG (decimal units).
    #[arg(long, value_name = "N[K|M|G]", value_parser = byte_size)]
    pub split_max_size: Option<u64>,
    /// Split into parts of at most this many tensors.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub split_max_tensors: Option<u64>,
    /// f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k q4_k_m q5_k_m; several,
    /// comma-separated, are written in one pass (each tensor read and converted to f32 once).
    #[arg(long, default_value = "f16", value_parser = out_type(), ignore_case = true,
          value_delimiter = ',', num_args = 1..)]
    pub outtype: Vec<OutType>,
    #[command(flatten)]
    pub target: GgufTarget,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// tokenizer.ggml.pre to write instead of the recognised one (byte-level BPE tokenizers).
    #[arg(long, value_name = "NAME")]
    pub tokenizer_pre: Option<String>,
    /// An importance matrix (llama.cpp's GGUF or legacy .dat form, or `abf-convert imatrix`'s)
    /// for the k-quants: each column's error weighted by its mean squared activation.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Threads for conversion and quantization (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the plan (tensors, types, bytes, metadata) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub print: JsonFlag,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ToGgufArgs) -> anyhow::Result<Exit> {
    if let Some(n) = args.threads {
        // the global pool can be set once per process; a second call (tests) keeps the first
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
    let several = args.outtype.len() > 1;
    let limits = SplitLimits {
        max_tensors: args.split_max_tensors.map(|n| n as usize),
        max_bytes: args.split_max_size,
    };
    let ckpt = Checkpoint::open(&args.model_dir)?;
    let recipe = if args.recipe.is_empty() {
        None
    } else {
        let current = &ckpt.config.model.recipe;
        Some(args.recipe.resolve_over(current).context("recipe flags")?)
    };
    let opts = ToGgufOptions {
        outtype: args.outtype[0],
        runtime: args.target.runtime,
        recipe,
        allow_approximate: args.target.allow_approximate,
        tokenizer_pre: args.tokenizer_pre.clone(),
        name: None,
        imatrix: match &args.imatrix {
            Some(p) => Some(std::sync::Arc::new(crate::imatrix::read(p)?.weights())),
            None => None,
        },
    };
    if several {
        return run_many(&args, &ckpt, &opts, &limits);
    }
    let plan = plan_to_gguf(&ckpt, &opts).context("planning the conversion")?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    let parts = part_paths(&plan, &args.output, &limits)?;
    if args.dry_run {
        print_plan(&plan, &parts, args.print.json)?;
        return Ok(Exit::Ok);
    }
    if !args.force {
        if let Some(p) = parts.iter().find(|p| p.exists()) {
            anyhow::bail!("{} exists (use --force to replace it)", p.display());
        }
    }
    let bar = progress(plan.input_bytes, "to-gguf", args.print.json);
    let report = write_gguf_split(&ckpt, &plan, &args.output, &limits, args.force, &|_, n| {
        bar.inc(n)
    })?;
    bar.finish_and_clear();
    if args.print.json {
        print_json(&json!({
            "output": report.parts[0], "parts": report.parts, "outtype": args.outtype[0].name(),
            "runtime": format!("{:?}", args.target.runtime),
            "recipe": plan.recipe.to_json_block(), "notes": plan.notes,
            "warnings": plan.warnings, "imatrix": args.imatrix,
            "imatrix_tensors": plan.tensors.iter().filter(|t| t.importance.is_some()).count(),
            "tensors": report.tensors, "input_bytes": report.input_bytes,
            "output_bytes": report.output_bytes, "seconds": report.seconds,
            "gb_per_s": report.gb_per_s(),
        }))?;
    } else {
        println!("recipe: {}", plan.recipe);
        for n in &plan.notes {
            println!("note: {n}");
        }
        if report.parts.len() > 1 {
            for p in &report.parts {
                println!("part {}", p.display());
            }
        }
        println!(
            "wrote {}{}: {} tensors, {:.1} MB in, {:.1} MB out, {:.2} s, {:.2} GB/s",
            report.parts[0].display(),
            match report.parts.len() {
                1 => String::new(),
                n => format!(" and {} more part(s)", n - 1),
            },
            report.tensors,
            report.input_bytes as f64 / 1e6,
            report.output_bytes as f64 / 1e6,
            report.seconds,
            report.gb_per_s()
        );
    }
    Ok(Exit::Ok)
}

/// Several `--outtype`s: one plan per type, one read of the checkpoint for all of them.
fn run_many(
    args: &ToGgufArgs,
    ckpt: &Checkpoint,
    base: &ToGgufOptions,
    limits: &SplitLimits,
) -> anyhow::Result<Exit> {
    let name = args
        .model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    if args.output.to_string_lossy().ends_with('/') && !args.dry_run {
        std::fs::create_dir_all(&args.output)
            .with_context(|| format!("creating {}", args.output.display()))?;
    }
    let mut outputs = Vec::with_capacity(args.outtype.len());
    for &t in &args.outtype {
        let opts = ToGgufOptions {
            outtype: t,
            ..base.clone()
        };
        let plan = plan_to_gguf(ckpt, &opts)
            .with_context(|| format!("planning the {} output", t.name()))?;
        let path = output_path(&args.output, &name, t.name(), true);
        if !args.force && !args.dry_run {
            if let Some(p) = part_paths(&plan, &path, limits)?
                .iter()
                .find(|p| p.exists())
            {
                anyhow::bail!("{} exists (use --force to replace it)", p.display());
            }
        }
        outputs.push(Output { plan, path });
    }
    if args.dry_run {
        for o in &outputs {
            println!("{}:", o.path.display());
            print_plan(&o.plan, std::slice::from_ref(&o.path), args.print.json)?;
        }
        return Ok(Exit::Ok);
    }
    let bar = progress(outputs[0].plan.input_bytes, "to-gguf", args.print.json);
    let start = std::time::Instant::now();
    let reports = write_many(ckpt, &outputs, limits, args.force, &|_, n| bar.inc(n))?;
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    if args.print.json {
        let files: Vec<_> = outputs
            .iter()
            .zip(&reports)
            .map(|(o, r)| {
                json!({"output": r.parts[0], "parts": r.parts,
                       "outtype": o.plan.tensors.first().map(|t| t.ggml_type.to_string()),
                       "notes": o.plan.notes, "tensors": r.tensors, "output_bytes": r.output_bytes})
            })
            .collect();
        print_json(&json!({
            "outtypes": args.outtype.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "recipe": outputs[0].plan.recipe.to_json_block(),
            "input_bytes": outputs[0].plan.input_bytes, "seconds": seconds, "files": files,
        }))?;
    } else {
        println!("recipe: {}", outputs[0].plan.recipe);
        for r in &reports {
            println!(
                "wrote {}{}: {} tensors, {:.1} MB",
                r.parts[0].display(),
                match r.parts.len() {
                    1 => String::new(),
                    n => format!(" and {} more part(s)", n - 1),
                },
                r.tensors,
                r.output_bytes as f64 / 1e6
            );
        }
        println!(
            "{} outputs from one read of {:.1} MB in {:.2} s",
            outputs.len(),
            outputs[0].plan.input_bytes as f64 / 1e6,
            seconds
        );
    }
    Ok(Exit::Ok)
}

/// The files the plan is written to under `limits`: `out`, or the parts of a split set.
fn part_paths(plan: &Plan, out: &Path, limits: &SplitLimits) -> anyhow::Result<Vec<PathBuf>> {
    let sizes: Vec<u64> = plan.tensors.iter().map(|t| t.bytes).collect();
    let groups = plan_parts(&sizes, plan.metadata.alignment()?, limits)?;
    let n = groups.len() as u32;
    Ok(match n {
        1 => vec![out.to_path_buf()],
        _ => (0..n)
            .map(|k| split_path(&output_prefix(out), k, n))
            .collect(),
    })
}

/// `--dry-run`: the recipe, notes, metadata, tensors and files that would be written.
fn print_plan(plan: &Plan, parts: &[PathBuf], json: bool) -> anyhow::Result<()> {
    if json {
        let tensors: Vec<_> = plan
            .tensors
            .iter()
            .map(|t| {
                json!({"name": t.name, "source": t.source, "dims": t.dims,
                       "type": t.ggml_type.to_string(), "bytes": t.bytes, "note": t.note,
                       "imatrix": t.importance.is_some()})
            })
            .collect();
        let meta: serde_json::Map<_, _> = plan
            .metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_json(Some(8))))
            .collect();
        return print_json(&json!({
            "recipe": plan.recipe.to_json_block(), "notes": plan.notes,
            "warnings": plan.warnings, "input_bytes": plan.input_bytes, "output_tensor_bytes": plan.output_tensor_bytes(),
            "tensors": tensors, "metadata": meta, "parts": parts,
        }));
    }
    println!("recipe: {}", plan.recipe);
    for n in &plan.notes {
        println!("note: {n}");
    }
    println!("metadata:");
    for (k, v) in plan.metadata.iter() {
        let text = v.to_json(Some(4)).to_string();
        let text: String = text.chars().take(100).collect();
        println!("  {k} = {text}");
    }
    println!("tensors:");
    for t in &plan.tensors {
        println!(
            "  {:<28} {:>18} {:>6} {:>12}{}",
            t.name,
            format!("{:?}", t.dims),
            t.ggml_type.to_string(),
            t.bytes,
            t.note
                .as_deref()
                .map(|n| format!("  ({n})"))
                .unwrap_or_default()
        );
    }
    for p in parts {
        println!("file: {}", p.display());
    }
    println!(
        "{} tensors, {} input bytes -> {} tensor bytes",
        plan.tensors.len(),
        plan.input_bytes,
        plan.output_tensor_bytes()
    );
    Ok(())
}
