//! One read, many outputs: every planned tensor is read from the mapped checkpoint and turned
//! into f32 once, then encoded to each output's type and written to each output. The plans come
//! from the same checkpoint (one per output type), so they list the same tensors in the same
//! order; only the types differ. Finished tensors' mapped pages are released, so the resident
//! set stays near one tensor's worth rather than growing to the whole input.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use super::error::ConvertError;
use super::numeric;
use super::to_gguf::{done_with_source, encode_f32, source_f32, Plan, ToGgufReport};
use crate::checkpoint::{Checkpoint, TensorDtype};
use crate::gguf::{plan_parts, SplitLimits, SplitWriter, TensorSpec};

/// One output of a multi-type conversion.
#[derive(Debug, Clone)]
pub struct Output {
    pub plan: Plan,
    pub path: PathBuf,
}

/// Plans that cannot share one read (they list different tensors): a planning bug, named.
fn same_tensors(outputs: &[Output]) -> Result<(), ConvertError> {
    let Some(first) = outputs.first() else {
        return Ok(());
    };
    for o in &outputs[1..] {
        let a = first.plan.tensors.iter().map(|t| (&t.name, &t.source));
        let b = o.plan.tensors.iter().map(|t| (&t.name, &t.source));
        if !a.eq(b) {
            return Err(ConvertError::tensor(
                &o.path.display().to_string(),
                "its plan lists other tensors than the first output's",
            ));
        }
    }
    Ok(())
}

/// Write every output (each atomic, split as `limits` says; an existing file is replaced only
/// with `force`). `progress` is called with each tensor's input bytes once, as it is written to
/// every output. On an error no output is left behind.
pub fn write_many(
    ckpt: &Checkpoint,
    outputs: &[Output],
    limits: &SplitLimits,
    force: bool,
    progress: &dyn Fn(&str, u64),
) -> Result<Vec<ToGgufReport>, ConvertError> {
    let start = Instant::now();
    same_tensors(outputs)?;
    let mut writers = Vec::with_capacity(outputs.len());
    for o in outputs {
        let specs = o
            .plan
            .tensors
            .iter()
            .map(|t| TensorSpec::new(t.name.clone(), t.dims.clone(), t.ggml_type))
            .collect::<Result<Vec<_>, _>>()?;
        let sizes: Vec<u64> = specs.iter().map(|s| s.size).collect();
        let groups = plan_parts(&sizes, o.plan.metadata.alignment()?, limits)?;
        writers.push(SplitWriter::create(
            &o.path,
            &o.plan.metadata,
            &specs,
            &groups,
            force,
        )?);
    }
    let Some(first) = outputs.first() else {
        return Ok(Vec::new());
    };
    for (i, t) in first.plan.tensors.iter().enumerate() {
        let f32_data = match (&t.source, &first.plan.rope_freqs) {
            (None, Some(f)) => f.clone(),
            _ => source_f32(ckpt, t)?,
        };
        // the types of one tensor encode side by side (each quantizer is parallel over rows too)
        let encoded = outputs
            .par_iter()
            .map(|o| {
                let pt = &o.plan.tensors[i];
                match pt.source {
                    None => Ok(numeric::from_f32(TensorDtype::F32, &f32_data)),
                    Some(_) => encode_f32(pt, &f32_data),
                }
            })
            .collect::<Result<Vec<_>, ConvertError>>()?;
        for (w, bytes) in writers.iter_mut().zip(&encoded) {
            w.write(i, bytes)?;
        }
        progress(&t.name, done_with_source(ckpt, t)?);
    }
    let mut reports = Vec::with_capacity(outputs.len());
    for (w, o) in writers.into_iter().zip(outputs) {
        let written = w.commit()?;
        reports.push(ToGgufReport {
            tensors: o.plan.tensors.len(),
            input_bytes: o.plan.input_bytes,
            output_bytes: written.bytes,
            seconds: start.elapsed().as_secs_f64(),
            parts: written.paths,
        });
    }
    Ok(reports)
}

/// The output path of `outtype` for `-o`: a directory gets `NAME-TYPE.gguf`; a path with `{type}`
/// gets it substituted; anything else is a template only when there is one type.
pub fn output_path(template: &Path, name: &str, outtype: &str, several: bool) -> PathBuf {
    let s = template.to_string_lossy();
    if s.contains("{type}") {
        return PathBuf::from(s.replace("{type}", outtype));
    }
    if template.is_dir() || s.ends_with('/') {
        return template.join(format!("{name}-{outtype}.gguf"));
    }
    if several {
        let stem = template.with_extension("");
        return PathBuf::from(format!("{}-{outtype}.gguf", stem.display()));
    }
    template.to_path_buf()
}
