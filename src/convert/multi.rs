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
    // Writing overlaps the next tensor's encoding: one writer thread takes each tensor's
    // encodings through a one-slot channel, so the cores quantize while the disk writes (before,
    // the pass idled every core during each tensor's writes). At most two tensors' encodings are
    // alive: the one being written and the one being encoded.
    let writers = std::thread::scope(|scope| -> Result<Vec<SplitWriter>, ConvertError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<Vec<u8>>)>(0);
        let writer = scope.spawn(move || -> Result<Vec<SplitWriter>, ConvertError> {
            for (i, encoded) in rx {
                if i == 1 && crate::fsutil::failpoint_set("multi-write-error") {
                    // tests: a write that fails mid-pass (a full disk) must leave no output
                    return Err(ConvertError::tensor(
                        &first.plan.tensors[i].name,
                        "write failed (ABF_FAILPOINT=multi-write-error)",
                    ));
                }
                for (w, bytes) in writers.iter_mut().zip(&encoded) {
                    w.write(i, bytes)?;
                }
            }
            Ok(writers)
        });
        let encoded_all = (|| -> Result<(), ConvertError> {
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
                let input = done_with_source(ckpt, t)?;
                if tx.send((i, encoded)).is_err() {
                    // the writer stopped on an error: its result below names it
                    break;
                }
                progress(&t.name, input);
            }
            Ok(())
        })();
        drop(tx);
        let written = writer
            .join()
            .map_err(|_| ConvertError::tensor("(writer thread)", "panicked"))?;
        // the writer's error first: an encoder that stopped because the writer did is not the cause
        let writers = written?;
        encoded_all?;
        Ok(writers)
    })?;
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

/// The time a one-pass conversion may take, given each type's single run (wall and CPU
/// seconds) and the cores: 1.3 x the larger of the slowest single run and the singles' CPU time
/// spread over the cores. With cores enough to encode every type at once the second term is the
/// smaller and this is the release issue's target (1.3 x the slowest single type); with fewer cores
/// than types the encoders' work itself, which one pass cannot share, sets the floor (2 cores
/// cannot do 5.5 s of quantization in less than 2.75 s). A pass that encodes its types one after
/// another, idles a core while it writes, or reads the input once per type still goes over.
pub fn one_pass_budget(singles: &[(f64, f64)], cores: usize) -> f64 {
    let slowest = singles.iter().map(|s| s.0).fold(0.0, f64::max);
    let cpu: f64 = singles.iter().map(|s| s.1).sum();
    1.3 * slowest.max(cpu / cores.max(1) as f64)
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

#[cfg(test)]
mod tests {
    use super::one_pass_budget;

    // (wall, cpu) of five single runs measured on 2 cores (docs/benchmarks.md): slowest 0.95 s,
    // 5.58 s of CPU in all.
    const TWO_CORES: [(f64, f64); 5] = [
        (0.67, 0.66),
        (0.74, 0.92),
        (0.94, 1.37),
        (0.95, 1.40),
        (0.83, 1.23),
    ];

    #[test]
    fn budget_is_the_issue_target_with_enough_cores() {
        // 16 cores: 5.58 / 16 = 0.35 s < 0.95 s, so 1.3 x the slowest type
        assert!((one_pass_budget(&TWO_CORES, 16) - 1.3 * 0.95).abs() < 1e-12);
        // a pass encoding the types one after another costs their sum of wall times: caught
        let serial: f64 = TWO_CORES.iter().map(|s| s.0).sum();
        assert!(serial > one_pass_budget(&TWO_CORES, 16));
    }

    #[test]
    fn budget_on_two_cores_is_the_encoders_work() {
        // 5.58 s over 2 cores = 2.79 s; x 1.3 = 3.627 s
        assert!((one_pass_budget(&TWO_CORES, 2) - 3.627).abs() < 1e-9);
        // a pass that keeps one core idle does all the work on one: caught
        let one_core: f64 = TWO_CORES.iter().map(|s| s.1).sum();
        assert!(one_core > one_pass_budget(&TWO_CORES, 2));
        // a pass that reads and converts the input once per type on top of the encodings (the
        // five reads are ~0.5 s of CPU each here: f16's whole single run) and writes without
        // overlap (1 s of one core's sys time, measured before the writer thread) also goes over
        let reread_no_overlap = (one_core + 5.0 * 0.5) / 2.0 + 1.0;
        assert!(reread_no_overlap > one_pass_budget(&TWO_CORES, 2));
    }
}
