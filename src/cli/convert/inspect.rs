//! `abf-convert inspect FILE`: a GGUF file's header, keys, tensors, summary and recipe.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use crate::cli::{print_json, Exit, JsonFlag};
use crate::gguf::keys::{self, ArchKey};
use crate::gguf::{open_set, read_recipe, GgufFile, GgufSet, Value};

/// Arrays longer than this are summarized unless `--full`.
const SHOWN_ITEMS: usize = 8;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The GGUF file (of a split set: the first part; the others are read too).
    pub file: PathBuf,
    #[command(flatten)]
    pub print: JsonFlag,
    /// Print long arrays in full.
    #[arg(long)]
    pub full: bool,
}

/// The one-line summary: architecture, rope base, context and scaling.
pub fn summary(file: &GgufFile) -> serde_json::Value {
    let m = &file.metadata;
    let arch = file.architecture().unwrap_or("?").to_string();
    let get = |k: ArchKey| m.get(&k.key(&arch)).map(|v| v.to_json(None));
    json!({
        "architecture": arch,
        "rope_base": get(ArchKey::RopeFreqBase).unwrap_or(json!(keys::DEFAULT_FREQ_BASE)),
        "context_length": get(ArchKey::ContextLength),
        "scaling": get(ArchKey::RopeScalingType).unwrap_or(json!(keys::SCALING_NONE)),
        "scaling_factor": get(ArchKey::RopeScalingFactor),
        "original_context_length": get(ArchKey::RopeScalingOriginalContextLength),
        "temperature_scale": get(ArchKey::AttentionTemperatureScale),
    })
}

fn summary_line(s: &serde_json::Value) -> String {
    let mut line = format!(
        "{} rope base {} context {} scaling {}",
        s["architecture"].as_str().unwrap_or("?"),
        s["rope_base"],
        s["context_length"],
        s["scaling"].as_str().unwrap_or("none")
    );
    if !s["scaling_factor"].is_null() {
        line += &format!(" factor {}", s["scaling_factor"]);
    }
    if !s["original_context_length"].is_null() {
        line += &format!(" original context {}", s["original_context_length"]);
    }
    if !s["temperature_scale"].is_null() {
        line += &format!(" temperature scale {}", s["temperature_scale"]);
    }
    line
}

pub fn run(args: InspectArgs) -> anyhow::Result<Exit> {
    let set = open_set(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let file = &set.file;
    let max = (!args.full).then_some(SHOWN_ITEMS);
    let recipe = read_recipe(&file.metadata);
    // what llama.cpp cannot run of the recorded recipe (static NTK needs the rotary dimension)
    let gaps = |r: &crate::rope::Recipe| llama_cpp_gaps(&file.metadata, r);
    let summary = summary(file);
    if args.print.json {
        let keys: Vec<_> = file
            .metadata
            .iter()
            .zip(&file.spans)
            .map(|((k, v), span)| {
                json!({"key": k, "type": v.type_label(), "value": v.to_json(max), "offset": span.value_offset})
            })
            .collect();
        let tensors: Vec<_> = file
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({
                    "name": t.name, "type": t.ggml_type.to_string(), "type_code": t.ggml_type.code(),
                    "known": t.is_known(), "shape": t.dims, "offset": t.offset, "size": t.size,
                    "part": set.tensor_part(i),
                })
            })
            .collect();
        let (recipe_json, recipe_error) = match &recipe {
            Ok(Some(r)) => (r.to_json_block(), None),
            Ok(None) => (serde_json::Value::Null, None),
            Err(e) => (serde_json::Value::Null, Some(e.to_string())),
        };
        print_json(&json!({
            "file": args.file.display().to_string(),
            "version": file.version,
            "alignment": file.alignment,
            "data_start": file.data_start,
            "file_len": file.file_len,
            "summary": summary,
            "recipe": recipe_json,
            "recipe_error": recipe_error,
            "recipe_gaps": recipe.as_ref().ok().and_then(|r| r.as_ref()).map(gaps),
            "keys": keys,
            "tensors": tensors,
            "parts": parts_json(&set),
        }))?;
        return Ok(Exit::Ok);
    }
    println!("{}", args.file.display());
    println!(
        "gguf v{}, alignment {}, {} keys, {} tensors, data at byte {} ({} bytes in file)",
        file.version,
        file.alignment,
        file.metadata.len(),
        file.tensors.len(),
        file.data_start,
        file.file_len
    );
    if set.is_split() {
        for (k, p) in set.parts.iter().enumerate() {
            println!(
                "part {}/{}: {}, {} tensors, {} bytes",
                k + 1,
                set.parts.len(),
                p.path.display(),
                p.mapped.file.tensors.len(),
                p.mapped.file.file_len
            );
        }
    }
    println!("summary: {}", summary_line(&summary));
    match &recipe {
        Ok(Some(r)) => {
            println!("recipe: {r}");
            for g in gaps(r) {
                println!("  note: {g}");
            }
        }
        Ok(None) => println!("recipe: none"),
        Err(e) => println!("recipe: unreadable ({e})"),
    }
    println!("keys:");
    for (k, v) in file.metadata.iter() {
        let shown = match (v, args.full) {
            (Value::Array(_), true) => v.to_json(None).to_string(),
            _ => v.to_string(),
        };
        println!("  {k:<48} {:<14} {shown}", v.type_label());
    }
    println!("tensors:");
    for (i, t) in file.tensors.iter().enumerate() {
        let unknown = if t.is_known() {
            ""
        } else {
            " (unknown type, carried through)"
        };
        let part = match set.tensor_part(i) {
            Some(p) if set.is_split() => format!(" part {}", p + 1),
            _ => String::new(),
        };
        println!(
            "  {:<40} {:<8} {:<24} offset {}{part}{unknown}",
            t.name,
            t.ggml_type.to_string(),
            format!("{:?}", t.dims),
            t.offset
        );
    }
    Ok(Exit::Ok)
}

/// Each part of the set: path, tensors, sizes (one entry for a plain file). The top-level
/// `file_len`/`data_start` are the first part's.
fn parts_json(set: &GgufSet) -> Vec<serde_json::Value> {
    set.parts
        .iter()
        .map(|p| {
            let f = &p.mapped.file;
            json!({
                "path": p.path.display().to_string(), "tensors": f.tensors.len(),
                "keys": f.metadata.len(), "data_start": f.data_start, "file_len": f.file_len,
            })
        })
        .collect()
}

/// What llama.cpp cannot run of a recorded recipe (`rope::runtime_form`; static NTK needs the
/// rotary dimension).
fn llama_cpp_gaps(meta: &crate::gguf::Metadata, r: &crate::rope::Recipe) -> Vec<String> {
    let dim = meta
        .architecture()
        .ok()
        .flatten()
        .and_then(|a| crate::gguf::rope_dim(meta, a).ok().flatten())
        .unwrap_or(2);
    crate::rope::runtime_form(r, crate::rope::Target::LlamaCpp, dim).reasons()
}
