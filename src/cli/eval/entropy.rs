//! `abf-eval entropy`: attention entropy per layer at query positions, against uniform ln n.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::cli::{print_json, progress, ComputeArgs, Exit, JsonFlag};
use crate::eval::entropy::{attention_entropy, EntropyReport};
use crate::eval::plot::{check_plot_path, line_plot, render_to, LinePlot, Series};
use crate::eval::{read_text, windows, EvalError};
use crate::runtime::open_dir;

#[derive(Args, Debug)]
pub struct EntropyArgs {
    /// Model directory (candle forward: the entropy is read inside the attention).
    #[arg(long)]
    pub model: PathBuf,
    /// Text file, tokenized with the model's tokenizer (BOS per its tokenizer config).
    #[arg(long)]
    pub text: PathBuf,
    /// Query positions (0-based; the query at p sees n = p + 1 keys), e.g. 15,31,63,127.
    #[arg(long, value_delimiter = ',', required = true)]
    pub positions: Vec<usize>,
    /// Tokens per window (default: the largest position + 1).
    #[arg(long)]
    pub length: Option<usize>,
    /// Non-overlapping windows of the text to average over (the paper used 128 documents).
    #[arg(long, default_value_t = 1)]
    pub windows: usize,
    /// Write the entropy plot here (.svg).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub print: JsonFlag,
}

pub fn run(args: EntropyArgs) -> anyhow::Result<Exit> {
    if let Some(plot) = &args.plot {
        check_plot_path(plot)?;
    }
    let mut positions = args.positions.clone();
    positions.sort_unstable();
    positions.dedup();
    let last = positions.last().copied().unwrap_or(0);
    let length = args.length.unwrap_or(last + 1).max(2);
    if last >= length {
        return Err(EvalError::BadValue {
            what: "--positions",
            message: format!("position {last} is past --length {length}"),
        }
        .into());
    }
    if args.windows == 0 {
        return Err(EvalError::BadValue {
            what: "--windows",
            message: "must be at least 1".into(),
        }
        .into());
    }
    let text = read_text(&args.text)?;
    let m = open_dir(
        &args.model,
        args.compute.dtype,
        &args.compute.device.device.open()?,
    )?;
    let ids = m.encoder.encode_plain(&text)?;
    let w = windows(&ids, length, args.windows, m.encoder.bos, &args.text)?;
    let bar = progress(w.len() as u64, "entropy", args.print.json);
    let report = attention_entropy(&m.model, &w, &positions, &mut || bar.inc(1))?;
    bar.finish_and_clear();
    if let Some(plot) = &args.plot {
        plot_entropy(plot, &positions, &report)?;
    }
    if args.print.json {
        print_json(&json!({
            "model": args.model,
            "text": args.text,
            "plot": args.plot,
            "entropy": report,
        }))?;
    } else {
        print_table(&args, &positions, &report);
    }
    Ok(Exit::Ok)
}

fn plot_entropy(
    plot: &std::path::Path,
    positions: &[usize],
    report: &EntropyReport,
) -> anyhow::Result<()> {
    let n = |k: usize| (positions[k] + 1) as f64;
    let mut series: Vec<Series> = report
        .layers
        .iter()
        .enumerate()
        .map(|(l, row)| Series {
            label: format!("layer {l}"),
            points: row.iter().enumerate().map(|(k, &h)| (n(k), h)).collect(),
            dashed: false,
        })
        .collect();
    series.push(Series {
        label: "uniform ln n".into(),
        points: report
            .uniform
            .iter()
            .enumerate()
            .map(|(k, &h)| (n(k), h))
            .collect(),
        dashed: true,
    });
    let p = LinePlot {
        title: "Attention entropy by layer against uniform attention".into(),
        x_label: "visible keys n = position + 1".into(),
        y_label: "attention entropy (nats)".into(),
        log2_x: true,
        series,
    };
    render_to(plot, || line_plot(&p))?;
    Ok(())
}

fn print_table(args: &EntropyArgs, positions: &[usize], report: &EntropyReport) {
    println!(
        "attention entropy (nats, mean over heads and {} windows of {} tokens) of {}",
        report.windows,
        report.length,
        args.model.display()
    );
    print!("{:>9}", "position");
    for p in positions {
        print!(" {p:>8}");
    }
    println!();
    for (l, row) in report.layers.iter().enumerate() {
        print!("{:>9}", format!("layer {l}"));
        for h in row {
            print!(" {h:>8.4}");
        }
        println!();
    }
    print!("{:>9}", "ln n");
    for h in &report.uniform {
        print!(" {h:>8.4}");
    }
    println!();
    if let Some(plot) = &args.plot {
        println!("plot: {}", plot.display());
    }
}
