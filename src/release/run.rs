//! The release pipeline: convert every type in one pass, verify every file in one run, write the
//! manifest, the checksums and the card, then rename the staging directory into place.

use std::path::{Path, PathBuf};

use super::card;
use super::manifest::{backend_summaries, findings, sha256_file, sha256sums, FileEntry, Manifest};
use crate::checkpoint::{Checkpoint, CheckpointError, StagedDir};
use crate::convert::multi::output_path;
use crate::convert::{plan_to_gguf, write_many, ConvertError, OutType, Output, ToGgufOptions};
use crate::fsutil::write_atomic;
use crate::runtime::BackendKind;
use crate::verify::run::verify_many;
use crate::verify::{parameter_count, TokenSource, VerifyError, VerifyOptions};

/// Why a release could not be made (exit 2). A file that fails its gate is not an error: it is
/// marked in the card and the manifest, and the command exits 1.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{}: exists (use --force to replace it)", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no output types")]
    NoTypes,
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Imatrix(#[from] crate::imatrix::ImatrixError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReleaseError + '_ {
    move |source| ReleaseError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to release.
#[derive(Debug, Clone)]
pub struct ReleaseOptions {
    pub model_dir: PathBuf,
    pub out_dir: PathBuf,
    pub types: Vec<OutType>,
    /// The release's name (file prefix and card title); default the directory's name.
    pub name: Option<String>,
    pub backends: Vec<BackendKind>,
    /// Verification lengths (default: the recipe's target window, at least 4 x c).
    pub lengths: Vec<usize>,
    pub source: TokenSource,
    /// How the importance matrix comes (none: plain quantization).
    pub imatrix: ImatrixSource,
    /// Split every file into llama.cpp's parts (`--split-max-size` / `--split-max-tensors`).
    pub split: crate::gguf::SplitLimits,
    pub force: bool,
}

/// Where a release's importance matrix comes from.
#[derive(Debug, Clone)]
pub enum ImatrixSource {
    None,
    /// Collected over this text (its name, its contents) in chunks of `ctx` tokens (None: the
    /// recipe's target window, or the whole text when it is shorter).
    Calibration {
        name: String,
        text: String,
        ctx: Option<usize>,
    },
    /// A matrix llama.cpp or abf wrote (GGUF or legacy .dat).
    File(PathBuf),
}

/// Stages of a release, for progress: (stage, done, total).
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

fn name_of(opts: &ReleaseOptions) -> String {
    opts.name.clone().unwrap_or_else(|| {
        opts.model_dir
            .canonicalize()
            .unwrap_or_else(|_| opts.model_dir.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    })
}

/// The importance matrix's file name in a release.
pub const IMATRIX_FILE: &str = "imatrix.gguf";

type Weights = Option<std::sync::Arc<crate::convert::to_gguf::ImportanceWeights>>;

/// Collect or read the importance matrix, write it to `dir/imatrix.gguf`, and return the
/// quantizers' weights and a line for the card.
fn importance(
    opts: &ReleaseOptions,
    dir: &Path,
    progress: Progress,
) -> Result<(Weights, Option<String>), ReleaseError> {
    use crate::imatrix::{collect, read, write_gguf, CollectOptions};
    let out = dir.join(IMATRIX_FILE);
    let (matrix, note) = match &opts.imatrix {
        ImatrixSource::None => return Ok((None, None)),
        ImatrixSource::File(p) => {
            let m = read(p)?;
            let note = format!(
                "{IMATRIX_FILE} (from {}: {} chunks of {} tokens)",
                p.display(),
                m.chunk_count,
                m.chunk_size
            );
            (m, note)
        }
        ImatrixSource::Calibration { name, text, ctx } => {
            let mut m = crate::runtime::open_forward(
                &opts.model_dir,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            let tokens = m.encoder.encode(text)?;
            let window = m.model.config().recipe.context as usize;
            let ctx = ctx.unwrap_or_else(|| window.min(tokens.len()));
            let copts = CollectOptions {
                ctx,
                max_chunks: None,
                dataset: name.clone(),
                bos: m.encoder.bos,
            };
            let total = (tokens.len() / ctx.max(1) * ctx) as u64;
            let mut done = 0u64;
            let (matrix, report) = collect(&mut m.model, &tokens, &copts, &mut |n| {
                done += n as u64;
                progress("imatrix", done, total)
            })?;
            let note = format!(
                "{IMATRIX_FILE} (collected by abf over {name}: {} chunks of {ctx} tokens)",
                report.chunks
            );
            (matrix, note)
        }
    };
    write_gguf(&matrix, &out, false)?;
    Ok((Some(std::sync::Arc::new(matrix.weights())), Some(note)))
}

/// Make the release; the manifest says which files passed.
pub fn release(opts: &ReleaseOptions, progress: Progress) -> Result<Manifest, ReleaseError> {
    if opts.types.is_empty() {
        return Err(ReleaseError::NoTypes);
    }
    let nonempty = opts
        .out_dir
        .read_dir()
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if nonempty && !opts.force {
        return Err(ReleaseError::Exists(opts.out_dir.clone()));
    }
    let ckpt = Checkpoint::open(&opts.model_dir)?;
    let name = name_of(opts);
    // a staging directory next to the target: the target appears complete or not at all
    let base = opts
        .out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pid = std::process::id();
    let aside = opts.out_dir.with_file_name(format!(".{base}.old-{pid}"));
    let staged = if nonempty {
        // --force: build beside the old release, swap at the end
        StagedDir::create(&opts.out_dir.with_file_name(format!(".{base}.new-{pid}")))?
    } else {
        StagedDir::create(&opts.out_dir)?
    };
    let dir = staged.path().to_path_buf();

    // the importance matrix, kept in the release as imatrix.gguf
    let (weights, imatrix_note) = importance(opts, &dir, progress)?;

    // every type in one pass
    let mut outputs = Vec::with_capacity(opts.types.len());
    for &t in &opts.types {
        let topts = ToGgufOptions {
            outtype: t,
            name: Some(name.clone()),
            imatrix: weights.clone(),
            ..ToGgufOptions::default()
        };
        let plan = plan_to_gguf(&ckpt, &topts)?;
        let path = output_path(&dir, &name, t.name(), true);
        outputs.push(Output { plan, path });
    }
    let total = outputs[0].plan.input_bytes;
    let cell = std::cell::RefCell::new(progress);
    let done = std::cell::Cell::new(0u64);
    let written = write_many(&ckpt, &outputs, &opts.split, false, &|_, n| {
        done.set(done.get() + n);
        let mut p = cell.borrow_mut();
        (*p)("convert", done.get(), total)
    })?;
    let progress = cell.into_inner();

    // every file verified against the checkpoint, the reference computed once
    // a split set is verified by its first part, as llama.cpp loads it
    let files: Vec<PathBuf> = written.iter().map(|w| w.parts[0].clone()).collect();
    let mut vopts = VerifyOptions::new(&opts.model_dir, &files[0]);
    vopts.backends = opts.backends.clone();
    vopts.lengths = opts.lengths.clone();
    vopts.source = opts.source.clone();
    let reports = verify_many(&vopts, &files, &mut |stage, d, t| {
        progress(stage, d as u64, t as u64)
    })?;

    let params = parameter_count(&ckpt.config.model);
    let mut entries = Vec::with_capacity(outputs.len());
    let mut sums = Vec::new();
    for (((o, t), r), w) in outputs.iter().zip(&opts.types).zip(&reports).zip(&written) {
        let (mut files, mut shas, mut bytes) = (Vec::new(), Vec::new(), 0u64);
        for p in &w.parts {
            let file = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            bytes += std::fs::metadata(p).map_err(io(p))?.len();
            let sha = sha256_file(p).map_err(io(p))?;
            sums.push((file.clone(), sha.clone()));
            files.push(file);
            shas.push(sha);
        }
        entries.push(FileEntry {
            files,
            outtype: t.name().to_string(),
            bytes,
            bits_per_weight: o.plan.output_tensor_bytes() as f64 * 8.0 / params.max(1) as f64,
            sha256: shas,
            backends: backend_summaries(r),
            pass: r.pass,
            findings: findings(r),
        });
    }
    let recipe = &ckpt.config.model.recipe;
    let first = &reports[0];
    let manifest = Manifest {
        name: name.clone(),
        source: opts.model_dir.display().to_string(),
        recipe: card::recipe_in_words(recipe),
        recipe_block: recipe.to_json_block(),
        original_context: recipe.original_context,
        context: recipe.context,
        parameters: params,
        verified_tokens: first.tokens.clone(),
        verified_length: first.length,
        imatrix: imatrix_note,
        pass: entries.iter().all(|e| e.pass),
        files: entries,
        abf_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    if manifest.imatrix.is_some() {
        let p = dir.join(IMATRIX_FILE);
        sums.push((IMATRIX_FILE.into(), sha256_file(&p).map_err(io(&p))?));
    }
    let json = serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n";
    let manifest_path = dir.join("release.json");
    write_atomic(&manifest_path, json.as_bytes(), false).map_err(io(&manifest_path))?;
    sums.push((
        "release.json".into(),
        sha256_file(&manifest_path).map_err(io(&manifest_path))?,
    ));
    let card_path = dir.join("README.md");
    write_atomic(&card_path, card::render(&manifest).as_bytes(), false).map_err(io(&card_path))?;
    sums.push((
        "README.md".into(),
        sha256_file(&card_path).map_err(io(&card_path))?,
    ));
    let sums_path = dir.join("SHA256SUMS");
    write_atomic(&sums_path, sha256sums(&sums).as_bytes(), false).map_err(io(&sums_path))?;

    if nonempty {
        // swap: the old release aside, the new one in, the old one removed
        let new = staged.commit()?;
        std::fs::rename(&opts.out_dir, &aside).map_err(io(&opts.out_dir))?;
        if let Err(e) = std::fs::rename(&new, &opts.out_dir) {
            let _ = std::fs::rename(&aside, &opts.out_dir);
            return Err(io(&opts.out_dir)(e));
        }
        std::fs::remove_dir_all(&aside).map_err(io(&aside))?;
    } else {
        staged.commit()?;
    }
    Ok(manifest)
}
