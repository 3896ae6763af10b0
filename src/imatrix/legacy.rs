//! llama.cpp's legacy `.dat` form (`common/imatrix-loader.cpp` `common_imatrix_load_legacy`,
//! `tools/imatrix/imatrix.cpp` `save_imatrix_legacy`), little-endian:
//! `i32 n_entries (>= 1)`, then per entry `i32 name_len`, the name, `i32 ncall`, `i32 nval (>= 1)`,
//! `nval x f32` (each column's mean square times `ncall`); then optionally `i32 chunk_count`,
//! `i32 dataset_len` and the dataset name. Every length is checked against the bytes left.

use std::collections::BTreeMap;
use std::path::Path;

use super::error::ImatrixError;
use super::matrix::{Entry, ImportanceMatrix};

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ImatrixError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                ImatrixError::format(
                    self.path,
                    format!(
                        "{what}: {n} bytes needed at offset {}, {} left",
                        self.pos,
                        self.left()
                    ),
                )
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn i32(&mut self, what: &str) -> Result<i32, ImatrixError> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length or count that must be at least `min`.
    fn len(&mut self, what: &str, min: i32) -> Result<usize, ImatrixError> {
        let v = self.i32(what)?;
        if v < min {
            return Err(ImatrixError::format(
                self.path,
                format!("{what} is {v}, expected at least {min}"),
            ));
        }
        Ok(v as usize)
    }
}

/// Parse the legacy form from `bytes` (read from `path`, named in errors).
pub fn parse_legacy(bytes: &[u8], path: &Path) -> Result<ImportanceMatrix, ImatrixError> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        path,
    };
    let n = c.len("entry count", 1)?;
    let mut entries = BTreeMap::new();
    for i in 0..n {
        let len = c.len(&format!("entry {i}: name length"), 0)?;
        let name = std::str::from_utf8(c.take(len, &format!("entry {i}: name"))?)
            .map_err(|_| ImatrixError::format(path, format!("entry {i}: name is not UTF-8")))?
            .to_string();
        let ncall = c.len(&format!("weight {name:?}: ncall"), 0)?;
        let nval = c.len(&format!("weight {name:?}: value count"), 1)?;
        let raw = c.take(
            // saturating: an impossible size fails the bounds check in `take`
            nval.saturating_mul(4),
            &format!("weight {name:?}: values"),
        )?;
        let sums: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(v) = sums.iter().find(|v| !v.is_finite()) {
            return Err(ImatrixError::format(
                path,
                format!("weight {name:?}: value {v}"),
            ));
        }
        let e = Entry {
            sums,
            counts: vec![ncall as u64],
        };
        if entries.insert(name.clone(), e).is_some() {
            return Err(ImatrixError::format(
                path,
                format!("weight {name:?} appears twice"),
            ));
        }
    }
    // the trailer (chunk count, dataset) is optional; when present it must be whole
    let (mut chunk_count, mut datasets) = (0, Vec::new());
    if c.left() > 0 {
        chunk_count = c.len("chunk count", 0)? as u32;
        let len = c.len("dataset name length", 0)?;
        let name = c.take(len, "dataset name")?;
        if len > 0 {
            datasets.push(String::from_utf8_lossy(name).into_owned());
        }
        if c.left() > 0 {
            return Err(ImatrixError::format(
                path,
                format!("{} bytes after the dataset name", c.left()),
            ));
        }
    }
    Ok(ImportanceMatrix {
        entries,
        datasets,
        chunk_count,
        chunk_size: 0,
    })
}
