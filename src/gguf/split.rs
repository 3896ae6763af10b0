//! Split GGUF sets as llama.cpp writes and reads them (`gguf-split`, `convert_hf_to_gguf.py
//! --split-max-*`): parts named `PREFIX-00001-of-00003.gguf` (llama.cpp `llama_split_path`),
//! the `split.*` keys in every part and all other metadata in the first, each part a complete
//! GGUF, no tensor across two parts. This file names, plans and writes parts; `set.rs` opens
//! them.

use std::ffi::OsString;
use std::ops::Range;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::error::GgufError;
use super::keys::split;
use super::metadata::Metadata;
use super::value::Value;
use super::writer::{GgufWriter, TensorSpec};
use crate::fsutil::{commit_all, AtomicFile};

/// What ends the name of part `no` (0-based) of `count`: `-00002-of-00003.gguf`.
pub fn split_postfix(no: u32, count: u32) -> String {
    format!("-{:05}-of-{:05}.gguf", no + 1, count)
}

/// Part `no` (0-based) of `count` of the set named `prefix` (llama.cpp `llama_split_path`).
pub fn split_path(prefix: &Path, no: u32, count: u32) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(split_postfix(no, count));
    PathBuf::from(s)
}

/// The prefix of `path` when it is named as part `no` of `count` (llama.cpp
/// `llama_split_prefix`), else None.
pub fn split_prefix(path: &Path, no: u32, count: u32) -> Option<PathBuf> {
    let name = path.as_os_str().as_bytes();
    let postfix = split_postfix(no, count);
    let keep = name.len().checked_sub(postfix.len()).filter(|&n| n > 0)?;
    (name[keep..] == *postfix.as_bytes())
        .then(|| PathBuf::from(OsString::from_vec(name[..keep].to_vec())))
}

/// The prefix of an output path: the path less a trailing `.gguf` (`-o model.gguf` and
/// `-o model` both write `model-00001-of-0000N.gguf`).
pub fn output_prefix(out: &Path) -> PathBuf {
    let name = out.as_os_str().as_bytes();
    match name.strip_suffix(b".gguf") {
        Some(stem) if !stem.is_empty() => PathBuf::from(OsString::from_vec(stem.to_vec())),
        _ => out.to_path_buf(),
    }
}

/// When a part is full. A part always takes at least one tensor, so a tensor larger than
/// `max_bytes` is a part of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplitLimits {
    /// Most tensors in one part.
    pub max_tensors: Option<usize>,
    /// Most tensor bytes in one part: the data section, each tensor padded to the alignment
    /// (what gguf-split counts).
    pub max_bytes: Option<u64>,
}

impl SplitLimits {
    pub fn is_none(&self) -> bool {
        self.max_tensors.is_none() && self.max_bytes.is_none()
    }
}

/// Group tensors of `sizes` bytes, in order, into parts under `limits`: a new part starts when
/// the current one holds `max_tensors` or the next tensor would take it past `max_bytes`.
pub fn plan_parts(
    sizes: &[u64],
    alignment: u64,
    limits: &SplitLimits,
) -> Result<Vec<Range<usize>>, GgufError> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        let padded = size.div_ceil(alignment).saturating_mul(alignment);
        let held = i - start;
        let full = held > 0
            && (limits.max_tensors.is_some_and(|m| held >= m)
                || limits
                    .max_bytes
                    .is_some_and(|m| bytes.saturating_add(padded) > m));
        if full {
            parts.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(padded);
    }
    parts.push(start..sizes.len());
    if parts.len() > u16::MAX as usize {
        return Err(GgufError::Split(format!(
            "{} parts; {} is a u16 (at most {})",
            parts.len(),
            split::COUNT,
            u16::MAX
        )));
    }
    Ok(parts)
}

/// Set the three split keys of part `no` of `count` (a set of `total` tensors), with the types
/// llama.cpp reads them as.
pub fn set_split_keys(
    meta: &mut Metadata,
    no: usize,
    count: usize,
    total: usize,
) -> Result<(), GgufError> {
    let too_big = |key: &str, v: usize| GgufError::BadValue {
        key: key.to_string(),
        value: v.to_string(),
        reason: "out of range for the type llama.cpp reads".to_string(),
    };
    let no16 = u16::try_from(no).map_err(|_| too_big(split::NO, no))?;
    let count16 = u16::try_from(count).map_err(|_| too_big(split::COUNT, count))?;
    let total32 = i32::try_from(total).map_err(|_| too_big(split::TENSORS_COUNT, total))?;
    meta.set(split::NO, Value::U16(no16));
    meta.set(split::COUNT, Value::U16(count16));
    meta.set(split::TENSORS_COUNT, Value::I32(total32));
    Ok(())
}

/// What [`write_parts`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PartsWritten {
    /// One path per part, the first first.
    pub paths: Vec<PathBuf>,
    /// Bytes over all parts.
    pub bytes: u64,
}

/// Write `tensors` as the parts `groups` says (see [`SplitWriter`]); `data(i)` gives tensor
/// `i`'s bytes, asked in order. One group is the plain file `out`, without split keys (as
/// `convert_hf_to_gguf.py` writes a set that fits one part). An error leaves no part behind.
pub fn write_parts<E, B, F>(
    out: &Path,
    meta: &Metadata,
    tensors: &[TensorSpec],
    groups: &[Range<usize>],
    overwrite: bool,
    mut data: F,
) -> Result<PartsWritten, E>
where
    E: From<GgufError>,
    B: AsRef<[u8]>,
    F: FnMut(usize) -> Result<B, E>,
{
    let mut w = SplitWriter::create(out, meta, tensors, groups, overwrite)?;
    for i in 0..tensors.len() {
        w.write(i, data(i)?.as_ref())?;
    }
    Ok(w.commit()?)
}

/// A file or a split set written tensor by tensor, in order: the part a tensor belongs to is
/// opened when its first tensor comes. More than one group gives [`split_path`]s of
/// [`output_prefix`]`(out)`, the first part with `meta` and the others with only the split keys
/// (gguf-split); each part goes to a temporary sibling and all are renamed into place together
/// by [`SplitWriter::commit`] ([`commit_all`]). Dropped uncommitted, it leaves nothing behind.
pub struct SplitWriter {
    out: PathBuf,
    meta: Metadata,
    tensors: Vec<TensorSpec>,
    groups: Vec<Range<usize>>,
    overwrite: bool,
    current: Option<(usize, GgufWriter<AtomicFile>)>,
    done: Vec<AtomicFile>,
    paths: Vec<PathBuf>,
    bytes: u64,
    next: usize,
}

impl SplitWriter {
    pub fn create(
        out: &Path,
        meta: &Metadata,
        tensors: &[TensorSpec],
        groups: &[Range<usize>],
        overwrite: bool,
    ) -> Result<SplitWriter, GgufError> {
        let covered = groups.first().map(|g| g.start) == Some(0)
            && groups.last().map(|g| g.end) == Some(tensors.len())
            && groups.windows(2).all(|w| w[0].end == w[1].start);
        if !covered {
            return Err(GgufError::Split(format!(
                "parts {groups:?} do not cover the {} tensors in order",
                tensors.len()
            )));
        }
        Ok(SplitWriter {
            out: out.to_path_buf(),
            meta: meta.clone(),
            tensors: tensors.to_vec(),
            groups: groups.to_vec(),
            overwrite,
            current: None,
            done: Vec::new(),
            paths: Vec::new(),
            bytes: 0,
            next: 0,
        })
    }

    fn path_of(&self, no: usize) -> PathBuf {
        match self.groups.len() {
            1 => self.out.clone(),
            n => split_path(&output_prefix(&self.out), no as u32, n as u32),
        }
    }

    /// Finish the open part, if any.
    fn close(&mut self) -> Result<(), GgufError> {
        if let Some((no, w)) = self.current.take() {
            let (f, n) = w.finish()?;
            self.done.push(f);
            self.paths.push(self.path_of(no));
            self.bytes += n;
        }
        Ok(())
    }

    fn open(&mut self, no: usize) -> Result<(), GgufError> {
        let path = self.path_of(no);
        let count = self.groups.len();
        let mut part_meta = if no == 0 {
            self.meta.clone()
        } else {
            Metadata::new()
        };
        if count > 1 {
            set_split_keys(&mut part_meta, no, count, self.tensors.len())?;
        }
        let file =
            AtomicFile::create(&path, self.overwrite).map_err(|e| GgufError::io(&path, e))?;
        let w = GgufWriter::with_header(
            file,
            &part_meta,
            self.tensors[self.groups[no].clone()].to_vec(),
        )?;
        self.current = Some((no, w));
        Ok(())
    }

    /// Tensor `i`'s bytes; tensors come in order.
    pub fn write(&mut self, i: usize, data: &[u8]) -> Result<(), GgufError> {
        if i != self.next {
            return Err(GgufError::WriterState(format!(
                "tensor {i} written when {} is next",
                self.next
            )));
        }
        let no = self
            .groups
            .iter()
            .position(|g| g.contains(&i))
            .ok_or_else(|| GgufError::Split(format!("tensor {i} is in no part")))?;
        if self.current.as_ref().map(|(n, _)| *n) != Some(no) {
            self.close()?;
            self.open(no)?;
        }
        if let Some((_, w)) = self.current.as_mut() {
            w.write_tensor_data(&self.tensors[i].name, data)?;
        }
        self.next += 1;
        Ok(())
    }

    /// Rename every part into place together.
    pub fn commit(mut self) -> Result<PartsWritten, GgufError> {
        self.close()?;
        let first = self
            .paths
            .first()
            .cloned()
            .unwrap_or_else(|| self.out.clone());
        let files = std::mem::take(&mut self.done);
        if files.len() == 1 {
            let f = files.into_iter().next().expect("one part");
            f.commit().map_err(|e| GgufError::io(&first, e))?;
        } else {
            commit_all(files).map_err(|e| GgufError::io(&first, e))?;
        }
        Ok(PartsWritten {
            paths: std::mem::take(&mut self.paths),
            bytes: self.bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_split_path() {
        let p = split_path(Path::new("dir/m"), 1, 3);
        assert_eq!(p, Path::new("dir/m-00002-of-00003.gguf"));
        assert_eq!(split_prefix(&p, 1, 3), Some(PathBuf::from("dir/m")));
        assert_eq!(split_prefix(&p, 0, 3), None);
        assert_eq!(split_prefix(Path::new("-00001-of-00002.gguf"), 0, 2), None);
        assert_eq!(output_prefix(Path::new("a/b.gguf")), Path::new("a/b"));
        assert_eq!(output_prefix(Path::new("a/b")), Path::new("a/b"));
    }

    #[test]
    fn parts_follow_the_limits() {
        let by_count = SplitLimits {
            max_tensors: Some(2),
            max_bytes: None,
        };
        assert_eq!(
            plan_parts(&[1, 1, 1, 1, 1], 32, &by_count).unwrap(),
            vec![0..2, 2..4, 4..5]
        );
        // padded sizes: 32, 64, 32, 96 against 96 bytes; the 96-byte tensor fills its own part
        let by_size = SplitLimits {
            max_tensors: None,
            max_bytes: Some(96),
        };
        assert_eq!(
            plan_parts(&[10, 40, 32, 96], 32, &by_size).unwrap(),
            vec![0..2, 2..3, 3..4]
        );
        // a tensor over the limit still gets a part (never an empty one)
        assert_eq!(
            plan_parts(&[200, 1], 32, &by_size).unwrap(),
            vec![0..1, 1..2]
        );
        assert_eq!(
            plan_parts(&[1, 1], 32, &SplitLimits::default()).unwrap(),
            vec![0..2]
        );
    }
}
