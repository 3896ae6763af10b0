//! `abf-convert patch-config`: rewrite a model directory's config.json for a recipe.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::checkpoint::{patch_config, write_patched, HfConfig, PatchOutput};
use crate::cli::{print_json, Exit, JsonFlag, RecipeArgs};
use crate::rope::Target;

#[derive(Args, Debug)]
pub struct PatchConfigArgs {
    /// Model directory (config.json, safetensors weights, tokenizer files).
    pub model_dir: PathBuf,
    /// Write a new model directory here (weights hard-linked or copied, other files copied).
    #[arg(short = 'o', long = "output", conflicts_with = "in_place")]
    pub output: Option<PathBuf>,
    /// Replace MODEL_DIR/config.json itself (atomically).
    #[arg(long)]
    pub in_place: bool,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// transformers: the Hugging Face fields transformers runs natively; exact: those fields plus
    /// our abf_recipe block with what they cannot express (warned about, never refused).
    #[arg(long, default_value = "transformers", value_parser = crate::cli::args::config_runtime())]
    pub runtime: Target,
    /// Write the nearest runtime form of a recipe the runtime cannot run exactly.
    #[arg(long)]
    pub allow_approximate: bool,
    #[command(flatten)]
    pub print: JsonFlag,
}

pub fn run(args: PatchConfigArgs) -> anyhow::Result<Exit> {
    let output = match (&args.output, args.in_place) {
        (Some(dir), false) => PatchOutput::Dir(dir.clone()),
        (None, true) => PatchOutput::InPlace,
        _ => anyhow::bail!("give -o OUT_DIR or --in-place"),
    };
    let input = HfConfig::load(&args.model_dir)?;
    let recipe = args
        .recipe
        .resolve_over(&input.model.recipe)
        .context("recipe flags")?;
    let patched = patch_config(&input, &recipe, args.runtime, args.allow_approximate)?;
    let files = write_patched(&args.model_dir, &patched, &output)?;
    if args.print.json {
        print_json(&json!({
            "input": args.model_dir,
            "config": files.config_path,
            "runtime": args.runtime.name(),
            "model_type": patched.model_type.name(),
            "recipe": patched.recipe.to_json_block(),
            "runtime_recipe": patched.runtime_recipe.to_json_block(),
            "exact": patched.approximations.is_empty(),
            "approximations": patched.approximations,
            "linked": files.linked,
            "copied": files.copied,
            "skipped": files.skipped,
        }))?;
    } else {
        println!(
            "wrote {} (runtime {}, model_type {})",
            files.config_path.display(),
            args.runtime.name(),
            patched.model_type.name()
        );
        println!("recipe: {}", patched.recipe);
        if !patched.approximations.is_empty() {
            println!("transformers runs: {}", patched.runtime_recipe);
            for gap in &patched.approximations {
                eprintln!("warning: transformers will not apply: {gap}");
            }
        }
        if let PatchOutput::Dir(_) = output {
            println!(
                "files: {} hard-linked, {} copied{}",
                files.linked.len(),
                files.copied.len(),
                if files.skipped.is_empty() {
                    String::new()
                } else {
                    format!(", skipped {}", files.skipped.join(", "))
                }
            );
        }
    }
    Ok(Exit::Ok)
}
