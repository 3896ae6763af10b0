//! `abf-convert patch-gguf`: edit a GGUF's metadata (set, delete, relabel, apply a recipe),
//! in place when every length is kept, else by rewriting the header and copying the tensors.
//! A split set is edited through its first part, which holds all the metadata: in place or
//! rewritten alone (the other parts are untouched), or with `-o` written as a new set.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use crate::cli::args::GgufTarget;
use crate::cli::{print_json, Exit, JsonFlag, RecipeArgs};
use crate::gguf::keys::{self, ArchKey};
use crate::gguf::{
    apply_recipe, diff, in_place_writes, open_set, output_prefix, read_recipe, rewrite, split_path,
    write_in_place, write_parts, Change, GgufSet, InPlaceWrite, Metadata, TensorSpec, Value,
    ValueType,
};
use crate::rope::BaseRope;

#[derive(Args, Debug)]
pub struct PatchArgs {
    /// The GGUF file to patch (of a split set: the first part, which holds the metadata).
    pub input: PathBuf,
    /// Write the result here (the input is left untouched); a split set is written as a set
    /// with this prefix (less `.gguf`): PREFIX-00001-of-0000N.gguf.
    #[arg(short, long, conflicts_with = "in_place")]
    pub output: Option<PathBuf>,
    /// Patch the input itself (only same-size edits, unless --allow-rewrite).
    #[arg(long)]
    pub in_place: bool,
    /// Set a key: KEY=TYPE:VALUE with TYPE one of u8 i8 u16 i16 u32 i32 f32 bool string u64 i64 f64.
    #[arg(long = "set", value_name = "KEY=TYPE:VALUE", value_parser = parse_set)]
    pub set: Vec<(String, Value)>,
    /// Delete a key.
    #[arg(long = "delete", value_name = "KEY")]
    pub delete: Vec<String>,
    /// Rename the architecture (general.architecture and every `{arch}.` key).
    #[arg(long, value_name = "NEW")]
    pub rename_arch: Option<String>,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    #[command(flatten)]
    pub target: GgufTarget,
    /// With --in-place, allow an edit that changes the header's size (temp file + rename over the input).
    #[arg(long)]
    pub allow_rewrite: bool,
    /// Replace an existing -o file.
    #[arg(long)]
    pub force: bool,
    /// Print the metadata diff and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub print: JsonFlag,
}

/// Parse `KEY=TYPE:VALUE`.
pub fn parse_set(spec: &str) -> anyhow::Result<(String, Value)> {
    let (key, rest) = spec
        .split_once('=')
        .with_context(|| format!("--set {spec:?}: expected KEY=TYPE:VALUE"))?;
    let (ty, value) = rest
        .split_once(':')
        .with_context(|| format!("--set {spec:?}: expected KEY=TYPE:VALUE"))?;
    let ty = ValueType::from_name(ty)
        .filter(|t| *t != ValueType::Array)
        .with_context(|| format!("--set {spec:?}: unknown type {ty:?} (u8 i8 u16 i16 u32 i32 f32 bool string u64 i64 f64)"))?;
    if key.is_empty() {
        bail!("--set {spec:?}: empty key");
    }
    let v = Value::parse(ty, value).map_err(|e| anyhow::anyhow!("--set {spec:?}: {e}"))?;
    Ok((key.to_string(), v))
}

/// Apply the edits in order: relabel, recipe, deletes, sets. Returns notes.
fn edit(args: &PatchArgs, meta: &mut Metadata) -> anyhow::Result<Vec<String>> {
    let mut notes = Vec::new();
    if let Some(new) = &args.rename_arch {
        meta.rename_arch(new)?;
    }
    if !args.recipe.is_empty() {
        let arch = meta
            .architecture()?
            .context("the file has no general.architecture")?
            .to_string();
        let current = read_recipe(meta).context("reading the file's current recipe")?;
        let ctx = meta
            .arch_u32(&arch, ArchKey::ContextLength)?
            .with_context(|| format!("the file has no {}", ArchKey::ContextLength.key(&arch)))?;
        let base = meta
            .arch_f32(&arch, ArchKey::RopeFreqBase)?
            .map(f64::from)
            .unwrap_or(keys::DEFAULT_FREQ_BASE);
        let model = BaseRope {
            base,
            context: ctx as u64,
        };
        let recipe = args
            .recipe
            .resolve(current.as_ref(), model)
            .context("recipe flags")?;
        notes.push(format!("recipe: {recipe}"));
        notes.extend(apply_recipe(
            meta,
            &recipe,
            args.target.runtime,
            args.target.allow_approximate,
        )?);
    }
    for k in &args.delete {
        if meta.remove(k).is_none() {
            bail!("--delete {k:?}: no such key");
        }
    }
    let arch = meta.architecture().ok().flatten().map(str::to_string);
    for (key, value) in &args.set {
        if let Some(want) = keys::required_type(arch.as_deref(), key) {
            if want != value.value_type() {
                bail!(
                    "--set {key}: llama.cpp requires {key} to be {want}, not {}",
                    value.value_type()
                );
            }
        }
        if key == keys::GENERAL_ALIGNMENT {
            if let Value::U32(a) = value {
                meta.set_alignment(*a)?;
                continue;
            }
        }
        meta.set(key.clone(), value.clone());
    }
    Ok(notes)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

pub fn run(args: PatchArgs) -> anyhow::Result<Exit> {
    if args.output.is_none() && !args.in_place && !args.dry_run {
        bail!("give -o OUT, --in-place or --dry-run");
    }
    let set = open_set(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let out_paths = match &args.output {
        Some(out) => output_paths(&set, out),
        None => Vec::new(),
    };
    for out in &out_paths {
        if set.parts.iter().any(|p| same_file(&p.path, out)) {
            bail!(
                "-o names the input ({} is one of its files); use --in-place",
                out.display()
            );
        }
    }
    // all metadata lives in the first part: it is the one edited (in place or rewritten)
    let old = &set.first().file;
    let mut meta = old.metadata.clone();
    let mut notes = edit(&args, &mut meta)?;
    for (key, _) in keys::split::KEYS {
        if old.metadata.get(key) != meta.get(key) {
            bail!("{key}: the split keys describe how the file is split; patch-gguf does not edit them");
        }
    }
    let changes = diff(&old.metadata, &meta);
    let in_place = in_place_writes(old, &meta);
    let mode = choose_mode(&args, &in_place, &mut notes)?;
    let target = out_paths
        .first()
        .cloned()
        .unwrap_or_else(|| args.input.clone());
    let mut bytes_written = 0u64;
    if !args.dry_run {
        match mode {
            "in-place" => {
                let writes = in_place
                    .as_ref()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .clone();
                drop(set);
                bytes_written = write_in_place(&args.input, &writes)?;
            }
            "rewrite" if args.in_place || !set.is_split() => {
                // a set's other parts carry only the split keys, which no edit changes
                let overwrite = args.in_place || args.force;
                bytes_written = rewrite(&args.input, old, &meta, &target, overwrite)
                    .with_context(|| format!("writing {}", target.display()))?;
            }
            "rewrite" => {
                let out = args.output.as_ref().expect("-o given");
                bytes_written = rewrite_set(&set, &meta, out, args.force)
                    .with_context(|| format!("writing {}", target.display()))?;
            }
            _ => {}
        }
    }
    let written: Vec<String> = match (mode, out_paths.is_empty()) {
        ("in-place" | "rewrite", true) => vec![args.input.display().to_string()],
        ("rewrite", false) => out_paths.iter().map(|p| p.display().to_string()).collect(),
        _ => Vec::new(),
    };
    if args.print.json {
        print_json(&json!({
            "input": args.input.display().to_string(),
            "output": target.display().to_string(),
            "files_written": written,
            "mode": mode,
            "dry_run": args.dry_run,
            "changes": changes.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
            "notes": notes,
            "bytes_written": bytes_written,
        }))?;
    } else {
        print_text(&args, &target, mode, &changes, &notes);
    }
    Ok(Exit::Ok)
}

/// The files `-o out` names for `set`: `out` for a plain file, the parts of a set with the
/// prefix `out` (less `.gguf`) for a split one.
fn output_paths(set: &GgufSet, out: &Path) -> Vec<PathBuf> {
    let n = set.parts.len() as u32;
    match n {
        1 => vec![out.to_path_buf()],
        _ => (0..n)
            .map(|k| split_path(&output_prefix(out), k, n))
            .collect(),
    }
}

/// Write `set` with metadata `meta` as a new set at `out`: the same parts, the first with the
/// new header, every tensor's bytes copied verbatim; all parts or none.
fn rewrite_set(set: &GgufSet, meta: &Metadata, out: &Path, force: bool) -> anyhow::Result<u64> {
    let specs: Vec<TensorSpec> = set
        .file
        .tensors
        .iter()
        .map(|t| TensorSpec::with_size(t.name.clone(), t.dims.clone(), t.ggml_type, t.size))
        .collect();
    let mut groups = Vec::with_capacity(set.parts.len());
    let mut start = 0;
    for p in &set.parts {
        let n = p.mapped.file.tensors.len();
        groups.push(start..start + n);
        start += n;
    }
    let written = write_parts(out, meta, &specs, &groups, force, |i| {
        set.tensor_data(i)
            .ok_or_else(|| crate::gguf::GgufError::TensorData {
                name: specs[i].name.clone(),
                reason: "data outside its part".into(),
            })
    })?;
    Ok(written.bytes)
}

/// How the edit is written: "none", "in-place", "rewrite", or (dry run only) "refused".
fn choose_mode(
    args: &PatchArgs,
    in_place: &Result<Vec<InPlaceWrite>, crate::gguf::patch::InPlaceError>,
    notes: &mut Vec<String>,
) -> anyhow::Result<&'static str> {
    Ok(if args.in_place {
        match in_place {
            Ok(w) if w.is_empty() => "none",
            Ok(_) => "in-place",
            Err(_) if args.allow_rewrite => "rewrite",
            Err(reason) => {
                let msg = format!(
                    "--in-place: {reason}, which changes the header's size; add --allow-rewrite \
                     to rewrite the file (temporary file renamed over the input)"
                );
                if !args.dry_run {
                    bail!("{msg}");
                }
                notes.push(format!("refused without --allow-rewrite: {msg}"));
                "refused"
            }
        }
    } else if args.output.is_some() {
        "rewrite"
    } else {
        match in_place {
            Ok(w) if w.is_empty() => "none",
            Ok(_) => "in-place",
            Err(_) => "rewrite",
        }
    })
}

fn print_text(args: &PatchArgs, target: &Path, mode: &str, changes: &[Change], notes: &[String]) {
    for c in changes {
        println!("{c}");
    }
    if changes.is_empty() {
        println!("no metadata changes");
    }
    for n in notes {
        println!("note: {n}");
    }
    let verb = if args.dry_run { "would write" } else { "wrote" };
    match mode {
        "in-place" => println!(
            "{verb} {} in place ({} changed value(s), no byte moved)",
            args.input.display(),
            changes.len()
        ),
        "rewrite" => println!(
            "{verb} {} (header rewritten, tensor data copied verbatim)",
            target.display()
        ),
        _ => println!("nothing to write"),
    }
}
