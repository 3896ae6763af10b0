//! `abf-eval logits` on a GGUF: the file run by our candle reading of it or by llama.cpp
//! (`--backend`), tokens from `--tokens` or the file's own vocabulary.

use anyhow::Context;

use serde_json::json;

use super::eval::LogitsArgs;
use super::{print_json, Exit};
use crate::eval::write_npy;
use crate::runtime::{open_backend, BackendKind, Encoder};

pub(super) fn logits_gguf(args: &LogitsArgs) -> anyhow::Result<Exit> {
    if !args.recipe.is_empty() {
        anyhow::bail!(
            "{}: recipe flags apply to model directories; a GGUF runs the recipe of its keys \
             (abf-convert patch-gguf changes them)",
            args.model.display()
        );
    }
    if args.dtype != "f32" {
        anyhow::bail!(
            "a GGUF runs in f32 (its tensors dequantized); --dtype {} is for model directories",
            args.dtype
        );
    }
    let kind: BackendKind = args.backend.parse().map_err(anyhow::Error::msg)?;
    let tokens: Vec<u32> = match (&args.tokens, &args.text) {
        (Some(path), _) => {
            let raw = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&raw)
                .with_context(|| format!("{}: expected a JSON list of token ids", path.display()))?
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Encoder::open(&args.model)?.encode(&text)?
        }
        (None, None) => anyhow::bail!("give --tokens FILE.json or --text FILE"),
    };
    let mut backend = open_backend(&args.model, kind, &super::tune::device(&args.device)?)?;
    let vocab = backend.vocab_size();
    let data = backend.logits(&tokens)?;
    write_npy(&args.out, &[tokens.len(), vocab], &data, args.force)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if args.json {
        print_json(&json!({
            "model": args.model,
            "backend": backend.name(),
            "out": args.out,
            "tokens": tokens.len(),
            "vocab": vocab,
        }))?;
    } else {
        println!(
            "wrote {} ([{}, {}] f32 logits, {} on the GGUF's own keys)",
            args.out.display(),
            tokens.len(),
            vocab,
            backend.name()
        );
    }
    Ok(Exit::Ok)
}
