//! `abf-eval ppl`: perplexity against context length, overall and by position band.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::model_labels;
use crate::cli::{print_json, progress, EngineArgs, Exit, JsonFlag};
use crate::eval::plot::{check_plot_path, line_plot, render_to, LinePlot, Series};
use crate::eval::ppl::{band_edges, perplexity, Bands, LengthPpl};
use crate::eval::{read_text, windows, EvalError};
use crate::runtime::open_model;

#[derive(Args, Debug)]
pub struct PplArgs {
    /// Model directory; repeat to compare models (one line each in the plot).
    #[arg(long, required = true)]
    pub model: Vec<PathBuf>,
    /// Name of each model in tables and legends (one per --model; default: directory name).
    #[arg(long)]
    pub label: Vec<String>,
    /// Text file, tokenized with each model's tokenizer (BOS per its tokenizer config).
    #[arg(long)]
    pub text: PathBuf,
    /// Window lengths in tokens, e.g. 128,256,512,1024.
    #[arg(long, value_delimiter = ',', required = true)]
    pub lengths: Vec<usize>,
    /// Non-overlapping windows per length, cut from the start of the text (fewer when the text
    /// is shorter).
    #[arg(long, default_value_t = 4)]
    pub windows: usize,
    /// Use only the first N tokens of the text: with a large --windows every length then scores
    /// the same tokens (the fairest comparison across lengths).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// N equal position bands per window instead of [0, c), [c, 2c), [2c, 4c), ...
    #[arg(long)]
    pub bands: Option<usize>,
    /// The window c of the doubling bands (default: each model's original context).
    #[arg(long)]
    pub band_window: Option<usize>,
    /// Write the perplexity-against-length plot here (.svg).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub print: JsonFlag,
}

pub fn run(args: PplArgs) -> anyhow::Result<Exit> {
    let labels = model_labels(&args.model, &args.label)?;
    if let Some(plot) = &args.plot {
        check_plot_path(plot)?;
    }
    check_list("--lengths", &args.lengths, 2)?;
    if args.windows == 0 || args.bands == Some(0) || args.band_window == Some(0) {
        return Err(EvalError::BadValue {
            what: "--windows/--bands/--band-window",
            message: "must be at least 1".into(),
        }
        .into());
    }
    let text = read_text(&args.text)?;
    let dtype = args.engine.compute.dtype;
    let device = args.engine.compute.device.device.open()?;
    let mut results = Vec::new();
    for (path, label) in args.model.iter().zip(&labels) {
        let mut m = open_model(path, args.engine.backend, dtype, &device)?;
        let mut ids = m.encoder.encode_plain(&text)?;
        if let Some(n) = args.max_tokens {
            ids.truncate(n);
        }
        let bands = match (args.bands, args.band_window) {
            (Some(n), _) => Bands::Equal(n),
            (None, Some(c)) => Bands::Doubling { window: c },
            (None, None) => Bands::Doubling {
                window: m.original_context as usize,
            },
        };
        // Cut every window first so that a text too short for the longest length fails early.
        let cut = args
            .lengths
            .iter()
            .map(|&l| windows(&ids, l, args.windows, m.encoder.bos, &args.text))
            .collect::<Result<Vec<_>, _>>()?;
        let total: usize = cut.iter().map(Vec::len).sum();
        let bar = progress(total as u64, &format!("ppl {label}"), args.print.json);
        let mut per_length = Vec::new();
        for (w, &length) in cut.iter().zip(&args.lengths) {
            let edges = band_edges(length, bands);
            per_length.push(perplexity(m.backend.as_mut(), w, &edges, &mut || {
                bar.inc(1)
            })?);
        }
        bar.finish_and_clear();
        results.push((label.clone(), path.clone(), bands, per_length));
    }
    if let Some(plot) = &args.plot {
        plot_results(plot, &results)?;
    }
    if args.print.json {
        print_json(&json!({
            "text": args.text,
            "plot": args.plot,
            "models": results.iter().map(|(label, path, bands, r)| json!({
                "label": label, "model": path, "bands": bands_json(*bands), "lengths": r,
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        print_table(&args.text, &args.lengths, &results);
        if let Some(plot) = &args.plot {
            println!("plot: {}", plot.display());
        }
    }
    Ok(Exit::Ok)
}

fn plot_results(plot: &std::path::Path, results: &[ModelResult]) -> anyhow::Result<()> {
    let series = results
        .iter()
        .map(|(label, _, _, r)| Series {
            label: label.clone(),
            points: r.iter().map(|l| (l.length as f64, l.ppl)).collect(),
            dashed: false,
        })
        .collect();
    let p = LinePlot {
        title: "Perplexity against context length".into(),
        x_label: "context length (tokens)".into(),
        y_label: "perplexity".into(),
        log2_x: true,
        series,
    };
    render_to(plot, || line_plot(&p))?;
    Ok(())
}

/// Every value at least `min`, and at least one value.
pub(super) fn check_list(flag: &'static str, values: &[usize], min: usize) -> anyhow::Result<()> {
    if let Some(bad) = values.iter().find(|&&v| v < min) {
        return Err(EvalError::BadValue {
            what: flag,
            message: format!("{bad} is below the minimum {min}"),
        }
        .into());
    }
    Ok(())
}

type ModelResult = (String, PathBuf, Bands, Vec<LengthPpl>);

fn bands_json(bands: Bands) -> serde_json::Value {
    match bands {
        Bands::Doubling { window } => json!({"doubling_from": window}),
        Bands::Equal(n) => json!({"equal": n}),
    }
}

fn bands_text(bands: Bands) -> String {
    match bands {
        Bands::Doubling { window } => format!("bands [0, {window}) then each doubling"),
        Bands::Equal(n) => format!("{n} equal bands"),
    }
}

fn print_table(text: &std::path::Path, lengths: &[usize], results: &[ModelResult]) {
    let width = results.iter().map(|r| r.0.len()).max().unwrap_or(5).max(5);
    println!(
        "perplexity of {} (rows: model, columns: context length)",
        text.display()
    );
    print!("{:width$}", "model");
    for l in lengths {
        print!(" {l:>10}");
    }
    println!();
    for (label, _, _, r) in results {
        print!("{label:width$}");
        for l in r {
            print!(" {:>10.3}", l.ppl);
        }
        println!();
    }
    for (label, _, bands, r) in results {
        println!(
            "\n{label}: perplexity by position band ({})",
            bands_text(*bands)
        );
        for l in r {
            let bands: Vec<String> = l
                .bands
                .iter()
                .map(|b| format!("[{}, {}) {:.3}", b.start, b.end, b.ppl))
                .collect();
            println!(
                "  length {:>6} ({} windows, {} tokens): {}",
                l.length,
                l.windows,
                l.tokens,
                bands.join("  ")
            );
        }
    }
}
