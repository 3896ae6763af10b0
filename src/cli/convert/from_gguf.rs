//! `abf-convert from-gguf`: a llama.cpp GGUF back to a Hugging Face checkpoint.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::checkpoint::TensorDtype;
use crate::cli::args::weight_dtype;
use crate::cli::{print_json, Exit, JsonFlag};
use crate::convert::{from_gguf, FromGgufOptions};

#[derive(Args, Debug)]
pub struct FromGgufArgs {
    /// The GGUF file to read.
    pub input: PathBuf,
    /// The model directory to write (absent or empty, unless --force).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Element type of the safetensors: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = weight_dtype())]
    pub dtype: TensorDtype,
    #[command(flatten)]
    pub print: JsonFlag,
    /// Replace an existing non-empty output directory.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: FromGgufArgs) -> anyhow::Result<Exit> {
    let opts = FromGgufOptions {
        dtype: args.dtype,
        force: args.force,
    };
    let r = from_gguf(&args.input, &args.output, &opts)?;
    if args.print.json {
        print_json(&json!({
            "output": r.dir, "tensors": r.tensors, "dtype": args.dtype.name(),
            "input_bytes": r.input_bytes, "output_bytes": r.output_bytes, "seconds": r.seconds,
            "recipe": r.recipe.to_json_block(), "tied_embeddings": r.tied_embeddings,
            "notes": r.notes,
        }))?;
    } else {
        println!("recipe: {}", r.recipe);
        for n in &r.notes {
            println!("note: {n}");
        }
        println!(
            "wrote {}: {} tensors ({}), {:.1} MB, {:.2} s",
            r.dir.display(),
            r.tensors,
            args.dtype.name(),
            r.output_bytes as f64 / 1e6,
            r.seconds
        );
    }
    Ok(Exit::Ok)
}
