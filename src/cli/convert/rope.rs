//! `abf-convert rope`: a recipe's numbers, for checking against other implementations.

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::cli::{print_json, Exit, JsonFlag, RecipeArgs};
use crate::rope::{runtime_form, BaseRope, Target};

/// The model assumed when no checkpoint is given: LLaMA-2 (base 10000, window 4096).
const LLAMA2: BaseRope = BaseRope {
    base: 10_000.0,
    context: 4096,
};

#[derive(Args, Debug)]
pub struct RopeArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Rotary (head) dimension d.
    #[arg(long)]
    pub head_dim: usize,
    /// Query positions (0-based, comma-separated) whose logit scale to print.
    #[arg(long, value_delimiter = ',')]
    pub positions: Option<Vec<u64>>,
    /// Current sequence length (dynamic NTK only).
    #[arg(long)]
    pub seq_len: Option<u64>,
    /// Layer whose logit scale to print (default: the first non-exempt layer).
    #[arg(long)]
    pub layer: Option<usize>,
    #[command(flatten)]
    pub print: JsonFlag,
}

pub fn run(args: RopeArgs) -> anyhow::Result<Exit> {
    if args.head_dim < 2 || !args.head_dim.is_multiple_of(2) {
        anyhow::bail!(
            "--head-dim must be an even number >= 2, got {}",
            args.head_dim
        );
    }
    let model = BaseRope {
        base: if args.recipe.method.is_some_and(|m| m.is_abf()) {
            LLAMA2.base
        } else {
            args.recipe.rope_base.unwrap_or(LLAMA2.base)
        },
        context: args.recipe.original_context.unwrap_or(LLAMA2.context),
    };
    let recipe = args.recipe.resolve(None, model).context("recipe flags")?;
    let inv_freq = recipe.inv_freq(args.head_dim, args.seq_len);
    let layer = args.layer.unwrap_or(recipe.skip_layers);
    let c = recipe.original_context;
    let positions = args
        .positions
        .clone()
        .unwrap_or_else(|| vec![0, c - 1, c, 2 * c - 1, 2 * c, 4 * c - 1, 4 * c, 8 * c - 1]);
    let scales: Vec<(u64, f64)> = positions
        .iter()
        .map(|&p| (p, recipe.logit_scale(layer, p)))
        .collect();
    let forms: Vec<_> = [Target::LlamaCpp, Target::Transformers]
        .iter()
        .map(|&t| runtime_form(&recipe, t, args.head_dim))
        .collect();
    if args.print.json {
        let runtimes: serde_json::Map<String, serde_json::Value> = forms
            .iter()
            .map(|f| {
                let v = json!({
                    "exact": f.is_exact(),
                    "recipe": f.recipe.to_json_block(),
                    "approximations": f.reasons(),
                });
                (f.target.name().to_string(), v)
            })
            .collect();
        print_json(&json!({
            "recipe": recipe.to_json_block(),
            "runtimes": runtimes,
            "effective_base": recipe.effective_base(args.head_dim, args.seq_len),
            "inv_freq": inv_freq,
            "attention_factor": recipe.attention_factor(),
            "layer": layer,
            "logit_scale": scales.iter().map(|(p, s)| json!([p, s])).collect::<Vec<_>>(),
        }))?;
    } else {
        println!("recipe: {recipe}");
        println!(
            "effective base {}, attention factor {:.6}",
            recipe.effective_base(args.head_dim, args.seq_len),
            recipe.attention_factor()
        );
        println!("inv_freq ({} pairs):", inv_freq.len());
        for (j, f) in inv_freq.iter().enumerate() {
            println!("  {j:4} {f:.9e}");
        }
        println!("logit scale (layer {layer}):");
        for (p, s) in scales {
            println!("  position {p:8} {s:.6}");
        }
        for f in &forms {
            for gap in f.reasons() {
                println!("note ({}): {gap}", f.target);
            }
        }
    }
    Ok(Exit::Ok)
}
