//! `abf-eval passkey`: passkey retrieval accuracy by length and depth.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::model_labels;
use super::ppl::check_list;
use crate::cli::{print_json, progress, EngineArgs, Exit, JsonFlag};
use crate::eval::passkey::{evaluate, Cell};
use crate::eval::plot::{
    check_plot_path, heatmap, line_plot, render_to, Heatmap, LinePlot, Series,
};
use crate::eval::EvalError;
use crate::runtime::open_model;

/// How trials are built and scored (shown after `abf-eval passkey --help`).
pub const PROTOCOL: &str = r#"Protocol (LongLoRA passkey_retrieval.py): the task line, whole filler units
"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
the line "The pass key is NNNNN. Remember it. NNNNN is the pass key." after round(depth x units)
of them, the rest of the filler, then "What is the pass key? The pass key is"; as many units as
let prompt and answer fit in the length. Keys: 5 digits, uniform in 10000..99999 from --seed.

Scoring (teacher-forced greedy): the answer is the tokens that `prompt + " " + key` adds to the
tokens of the prompt. A trial is correct when at every answer token j the argmax of the logits
at position j-1 (first index on ties), given the correct earlier tokens, is token j: exactly
when greedy decoding from the prompt would write the key."#;

#[derive(Args, Debug)]
pub struct PasskeyArgs {
    /// Model directory; repeat to compare models.
    #[arg(long, required = true)]
    pub model: Vec<PathBuf>,
    /// Name of each model in tables and legends (one per --model; default: directory name).
    #[arg(long)]
    pub label: Vec<String>,
    /// Prompt lengths in tokens (prompt and answer fit in each), e.g. 256,512,1024.
    #[arg(long, value_delimiter = ',', required = true)]
    pub lengths: Vec<usize>,
    /// Depths of the key line in the filler, 0 (first) to 1 (last).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    pub depths: Vec<f64>,
    /// Trials (keys) per length and depth.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// Seed of the keys (SplitMix64).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the plot here (.svg): a length x depth heatmap for one model, accuracy against
    /// length (mean over depths) for several.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub print: JsonFlag,
}

pub fn run(args: PasskeyArgs) -> anyhow::Result<Exit> {
    let labels = model_labels(&args.model, &args.label)?;
    if let Some(plot) = &args.plot {
        check_plot_path(plot)?;
    }
    check_list("--lengths", &args.lengths, 2)?;
    if let Some(d) = args.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        return Err(EvalError::BadValue {
            what: "--depths",
            message: format!("{d} is outside [0, 1]"),
        }
        .into());
    }
    if args.trials == 0 {
        return Err(EvalError::BadValue {
            what: "--trials",
            message: "must be at least 1".into(),
        }
        .into());
    }
    let dtype = args.engine.compute.dtype;
    let device = args.engine.compute.device.device.open()?;
    let mut results = Vec::new();
    for (path, label) in args.model.iter().zip(&labels) {
        let mut m = open_model(path, args.engine.backend, dtype, &device)?;
        let total = args.lengths.len() * args.depths.len() * args.trials;
        let bar = progress(total as u64, &format!("passkey {label}"), args.print.json);
        let cells = evaluate(
            m.backend.as_mut(),
            &m.encoder,
            &args.lengths,
            &args.depths,
            args.trials,
            args.seed,
            &mut || bar.inc(1),
        )?;
        bar.finish_and_clear();
        results.push((label.clone(), path.clone(), cells));
    }
    if let Some(plot) = &args.plot {
        plot_results(plot, &args, &results)?;
    }
    if args.print.json {
        print_json(&json!({
            "trials": args.trials,
            "seed": args.seed,
            "plot": args.plot,
            "models": results.iter().map(|(label, path, cells)| json!({
                "label": label, "model": path, "cells": cells,
                "accuracy": mean(cells.iter().map(|c| c.accuracy)),
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        print_table(&args, &results);
        if let Some(plot) = &args.plot {
            println!("plot: {}", plot.display());
        }
    }
    Ok(Exit::Ok)
}

fn print_table(args: &PasskeyArgs, results: &[(String, PathBuf, Vec<Cell>)]) {
    for (label, _, cells) in results {
        println!(
            "{label}: passkey accuracy over {} trials (rows: depth, columns: length), mean {:.3}",
            args.trials,
            mean(cells.iter().map(|c| c.accuracy))
        );
        print!("{:>6}", "depth");
        for l in &args.lengths {
            print!(" {l:>8}");
        }
        println!();
        for &d in &args.depths {
            print!("{d:>6.2}");
            for &l in &args.lengths {
                let c = cell(cells, l, d).map_or(f64::NAN, |c| c.accuracy);
                print!(" {c:>8.2}");
            }
            println!();
        }
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (n, s) = values.fold((0usize, 0f64), |(n, s), v| (n + 1, s + v));
    s / n.max(1) as f64
}

fn cell(cells: &[Cell], length: usize, depth: f64) -> Option<&Cell> {
    cells
        .iter()
        .find(|c| c.length == length && c.depth == depth)
}

fn plot_results(
    plot: &std::path::Path,
    args: &PasskeyArgs,
    results: &[(String, PathBuf, Vec<Cell>)],
) -> anyhow::Result<()> {
    if let [(label, _, cells)] = results {
        let map = Heatmap {
            title: format!("Passkey retrieval accuracy: {label}"),
            x_label: "context length (tokens)".into(),
            y_label: "depth of the key".into(),
            cols: args.lengths.iter().map(|l| l.to_string()).collect(),
            rows: args.depths.iter().map(|d| format!("{d}")).collect(),
            values: args
                .depths
                .iter()
                .map(|&d| {
                    args.lengths
                        .iter()
                        .map(|&l| cell(cells, l, d).map_or(f64::NAN, |c| c.accuracy))
                        .collect()
                })
                .collect(),
        };
        render_to(plot, || heatmap(&map))?;
    } else {
        let series = results
            .iter()
            .map(|(label, _, cells)| Series {
                label: label.clone(),
                points: args
                    .lengths
                    .iter()
                    .map(|&l| {
                        let acc = mean(cells.iter().filter(|c| c.length == l).map(|c| c.accuracy));
                        (l as f64, acc)
                    })
                    .collect(),
                dashed: false,
            })
            .collect();
        let p = LinePlot {
            title: "Passkey retrieval accuracy against context length".into(),
            x_label: "context length (tokens)".into(),
            y_label: "accuracy (mean over depths)".into(),
            log2_x: true,
            series,
        };
        render_to(plot, || line_plot(&p))?;
    }
    Ok(())
}
