//! Editing an existing GGUF: a metadata diff, in-place writes for changes that keep every
//! length, and a rewrite (new header, tensor bytes copied verbatim) for everything else.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::GgufError;
use super::metadata::Metadata;
use super::reader::GgufFile;
use super::value::{Array, Value};
use super::writer::{encode_value, GgufWriter, TensorSpec};
use crate::fsutil::AtomicFile;

/// One difference between two metadata sets.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added {
        key: String,
        value: Value,
    },
    Removed {
        key: String,
        value: Value,
    },
    Changed {
        key: String,
        old: Value,
        new: Value,
    },
    Renamed {
        old_key: String,
        new_key: String,
        value: Value,
    },
}

impl Change {
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Change::Added { key, value } => {
                json!({"op": "add", "key": key, "type": value.type_label(), "value": value.to_json(Some(8))})
            }
            Change::Removed { key, value } => {
                json!({"op": "remove", "key": key, "type": value.type_label(), "value": value.to_json(Some(8))})
            }
            Change::Changed { key, old, new } => json!({
                "op": "change", "key": key,
                "old_type": old.type_label(), "old": old.to_json(Some(8)),
                "type": new.type_label(), "value": new.to_json(Some(8)),
            }),
            Change::Renamed {
                old_key,
                new_key,
                value,
            } => json!({
                "op": "rename", "key": old_key, "new_key": new_key,
                "type": value.type_label(), "value": value.to_json(Some(8)),
            }),
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added { key, value } => write!(f, "+ {key} ({}) = {value}", value.type_label()),
            Change::Removed { key, value } => {
                write!(f, "- {key} ({}) = {value}", value.type_label())
            }
            Change::Changed { key, old, new } => write!(
                f,
                "~ {key}: ({}) {old} -> ({}) {new}",
                old.type_label(),
                new.type_label()
            ),
            Change::Renamed {
                old_key, new_key, ..
            } => write!(f, "> {old_key} -> {new_key}"),
        }
    }
}

/// The changes from `old` to `new`. A key that disappeared while a key with the same value and
/// the same suffix after the first dot appeared is reported as a rename (architecture relabel).
pub fn diff(old: &Metadata, new: &Metadata) -> Vec<Change> {
    let mut out = Vec::new();
    let mut removed: Vec<(&str, &Value)> = Vec::new();
    for (k, v) in old.iter() {
        match new.get(k) {
            None => removed.push((k, v)),
            Some(nv) if !same_value(nv, v) => out.push(Change::Changed {
                key: k.to_string(),
                old: v.clone(),
                new: nv.clone(),
            }),
            Some(_) => {}
        }
    }
    let suffix = |k: &str| k.split_once('.').map(|(_, s)| s.to_string());
    for (k, v) in new.iter() {
        if old.contains(k) {
            continue;
        }
        let twin = removed.iter().position(|(ok, ov)| {
            suffix(ok).is_some() && suffix(ok) == suffix(k) && same_value(ov, v)
        });
        match twin {
            Some(i) => {
                let (ok, _) = removed.remove(i);
                out.push(Change::Renamed {
                    old_key: ok.to_string(),
                    new_key: k.to_string(),
                    value: v.clone(),
                });
            }
            None => out.push(Change::Added {
                key: k.to_string(),
                value: v.clone(),
            }),
        }
    }
    for (k, v) in removed {
        out.push(Change::Removed {
            key: k.to_string(),
            value: v.clone(),
        });
    }
    out
}

/// Bitwise equality for floats (so NaN == NaN and -0 != 0 as bytes would say).
fn same_value(a: &Value, b: &Value) -> bool {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    encode_value(&mut x, a);
    encode_value(&mut y, b);
    a.value_type() == b.value_type() && x == y
}

/// Why a metadata change cannot be written in place (the header would change size or layout).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InPlaceError {
    #[error("keys were added or removed")]
    KeyCount,
    #[error("key {0:?} was renamed or moved")]
    Moved(String),
    #[error("{key:?} changes from {from} ({from_len} bytes) to {to} ({to_len} bytes)")]
    Resized {
        key: String,
        from: String,
        from_len: u64,
        to: String,
        to_len: u64,
    },
    #[error("general.alignment changes the tensor offsets")]
    Alignment,
}

/// One in-place write: the value of `key` at `offset`, `old` bytes replaced by `new` (same length).
#[derive(Debug, Clone, PartialEq)]
pub struct InPlaceWrite {
    pub key: String,
    pub offset: u64,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
}

/// The writes that turn `file`'s metadata into `new` without moving any byte, or the reason
/// that is impossible. Allowed: same keys in the same order, each changed value of the same
/// type and encoded length, and no change inside the structure of a value (a string's length, the
/// count of an array, or the lengths of the strings of a string array).
pub fn in_place_writes(file: &GgufFile, new: &Metadata) -> Result<Vec<InPlaceWrite>, InPlaceError> {
    if file.metadata.len() != new.len() {
        return Err(InPlaceError::KeyCount);
    }
    let mut writes = Vec::new();
    for (i, ((ok, ov), (nk, nv))) in file.metadata.iter().zip(new.iter()).enumerate() {
        if ok != nk {
            return Err(InPlaceError::Moved(ok.to_string()));
        }
        if same_value(ov, nv) {
            continue;
        }
        let same_shape = match (ov, nv) {
            (Value::String(a), Value::String(b)) => a.len() == b.len(),
            (Value::Array(Array::String(_)), _) => false,
            (Value::Array(a), Value::Array(b)) => {
                a.elem_type() == b.elem_type() && a.len() == b.len()
            }
            (a, b) => a.value_type() == b.value_type(),
        };
        if !same_shape {
            return Err(InPlaceError::Resized {
                key: ok.to_string(),
                from: ov.type_label(),
                from_len: ov.encoded_len(),
                to: nv.type_label(),
                to_len: nv.encoded_len(),
            });
        }
        if ok == super::keys::GENERAL_ALIGNMENT {
            return Err(InPlaceError::Alignment);
        }
        let span = file.spans[i];
        let (mut old, mut newb) = (Vec::new(), Vec::new());
        encode_value(&mut old, ov);
        encode_value(&mut newb, nv);
        debug_assert_eq!(old.len() as u64, span.value_end - span.value_offset);
        writes.push(InPlaceWrite {
            key: ok.to_string(),
            offset: span.value_offset,
            old,
            new: newb,
        });
    }
    Ok(writes)
}

/// Apply in-place writes to `path`: one `pwrite` of the contiguous span from the first changed
/// byte to the last (unchanged bytes between rewritten as read), then `fdatasync` before
/// returning. Returns the bytes written (the span). The caller must have dropped any mapping of it.
///
/// Why this cannot corrupt the file: every byte written lies inside a value whose type and
/// length are unchanged, so no length, count, type code, offset or tensor byte moves; at every
/// moment the file parses to the same layout. The old bytes are checked first (a file changed
/// since it was read is refused). One write for all values means a process killed before it
/// leaves every value old and after it every value new (the page cache holds the whole span;
/// tests/gguf_cli.rs kills the process there with `ABF_FAILPOINT=patch-after-first-write`).
/// A power loss before the fsync completes is another matter: POSIX promises nothing about which
/// of the span's pages reach the disk, so values in different pages may end up mixed (each still
/// well-formed; running the patch again repairs it). docs/formats.md has the details.
pub fn write_in_place(path: &Path, writes: &[InPlaceWrite]) -> Result<u64, GgufError> {
    if writes.is_empty() {
        return Ok(0);
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| GgufError::io(path, e))?;
    let (start, span) = patched_span(&f, path, writes)?;
    // One pwrite of the whole span: write_all_at loops only after a short write (a signal),
    // finishing the same span.
    f.write_all_at(&span, start)
        .map_err(|e| GgufError::io(path, e))?;
    crate::fsutil::failpoint("patch-after-first-write");
    f.sync_data().map_err(|e| GgufError::io(path, e))?;
    Ok(span.len() as u64)
}

/// The bytes from the first write's offset to the last write's end as they are in `f`, each
/// write's old bytes checked and replaced by its new ones.
fn patched_span(
    f: &File,
    path: &Path,
    writes: &[InPlaceWrite],
) -> Result<(u64, Vec<u8>), GgufError> {
    let start = writes.iter().map(|w| w.offset).min().unwrap_or(0);
    let end = writes
        .iter()
        .map(|w| w.offset + w.old.len() as u64)
        .max()
        .unwrap_or(start);
    let mut span = vec![0u8; (end - start) as usize];
    f.read_exact_at(&mut span, start)
        .map_err(|e| GgufError::io(path, e))?;
    for w in writes {
        let at = (w.offset - start) as usize;
        let cur = &mut span[at..at + w.old.len()];
        if *cur != w.old[..] || w.new.len() != w.old.len() {
            return Err(GgufError::Refused(format!(
                "{}: the value of {:?} at byte {} changed since the file was read; nothing written",
                path.display(),
                w.key,
                w.offset
            )));
        }
        cur.copy_from_slice(&w.new);
    }
    Ok((start, span))
}

/// Rewrite `src` (parsed as `file`) with metadata `new` to `out`: a new header, then every
/// tensor's bytes copied verbatim (kernel copy where the OS has one), through a temporary file
/// renamed into place. `out` may be `src` itself (the old inode stays readable until the
/// rename). Returns the bytes written.
pub fn rewrite(
    src: &Path,
    file: &GgufFile,
    new: &Metadata,
    out: &Path,
    overwrite: bool,
) -> Result<u64, GgufError> {
    let specs: Vec<TensorSpec> = file
        .tensors
        .iter()
        .map(|t| TensorSpec::with_size(t.name.clone(), t.dims.clone(), t.ggml_type, t.size))
        .collect();
    let input = File::open(src).map_err(|e| GgufError::io(src, e))?;
    let mut atomic = AtomicFile::create(out, overwrite).map_err(|e| GgufError::io(out, e))?;
    let written = {
        let mut w = GgufWriter::with_header(atomic.writer(), new, specs)?;
        for t in &file.tensors {
            let mut r = &input;
            r.seek(SeekFrom::Start(file.data_start + t.offset))
                .map_err(|e| GgufError::io(src, e))?;
            w.copy_tensor_data(&t.name, r)?;
        }
        w.finish()?.1
    };
    atomic.commit().map_err(|e| GgufError::io(out, e))?;
    Ok(written)
}
