//! A GGUF opened whole by its (first) file: a single file, or every part of a split set found by
//! name as llama.cpp finds them (`llama_model_loader`), each part checked by the reader and the
//! set checked as llama.cpp checks it and more: the same `split.count` and `split.tensors.count`
//! in every part, consecutive `split.no`, the tensor total, no tensor in two parts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::GgufError;
use super::keys::split;
use super::metadata::Metadata;
use super::reader::{open_mmap, GgufFile, MappedGguf};
use super::split::{split_path, split_postfix, split_prefix};

/// One part of a set.
pub struct SetPart {
    pub path: PathBuf,
    pub mapped: MappedGguf,
}

/// A GGUF file or split set, mapped and checked.
pub struct GgufSet {
    /// The parts in order; one for a plain file.
    pub parts: Vec<SetPart>,
    /// The set as one file: the first part's header (version, metadata, spans, alignment, sizes)
    /// with every part's tensors in part order. A tensor's `offset` is relative to its own
    /// part's data section: read data through [`GgufSet::tensor_data`], never
    /// `file.tensor_bytes`.
    pub file: GgufFile,
    /// (part, index within the part) of each tensor of `file`.
    locations: Vec<(usize, usize)>,
}

impl GgufSet {
    /// The path the set was opened by (the first part).
    pub fn path(&self) -> &Path {
        &self.parts[0].path
    }

    /// The first part (all metadata lives there).
    pub fn first(&self) -> &MappedGguf {
        &self.parts[0].mapped
    }

    pub fn metadata(&self) -> &Metadata {
        &self.file.metadata
    }

    /// Whether the set has more than one part.
    pub fn is_split(&self) -> bool {
        self.parts.len() > 1
    }

    /// The part holding tensor `i` of `file`.
    pub fn tensor_part(&self, i: usize) -> Option<usize> {
        self.locations.get(i).map(|l| l.0)
    }

    /// The bytes of tensor `i` of `file`, from its part.
    pub fn tensor_data(&self, i: usize) -> Option<&[u8]> {
        let &(p, j) = self.locations.get(i)?;
        let part = &self.parts[p].mapped;
        part.file.tensor_bytes(part.bytes(), j)
    }
}

/// A split key of `meta` as a number, with the type llama.cpp requires; None when absent.
fn split_key(meta: &Metadata, key: &'static str) -> Result<Option<i64>, GgufError> {
    let ty = split::KEYS
        .iter()
        .find(|k| k.0 == key)
        .map(|k| k.1)
        .expect("a split key");
    Ok(match meta.get_typed(key, ty)? {
        Some(super::Value::U16(x)) => Some(i64::from(*x)),
        Some(super::Value::I32(x)) => Some(i64::from(*x)),
        _ => None,
    })
}

/// Open the GGUF at `path`: a plain file, or the first part of a split set and every other
/// part (`PREFIX-0000k-of-0000N.gguf` beside it). Errors name the part and the key.
pub fn open_set(path: &Path) -> Result<GgufSet, GgufError> {
    let first = open_mmap(path)?;
    let meta = &first.file.metadata;
    let count = split_key(meta, split::COUNT)?.unwrap_or(0);
    let no = split_key(meta, split::NO)?;
    if count <= 1 {
        // a plain file, or a set of one (llama.cpp loads only `split.count > 1` as a set)
        if let Some(no) = no.filter(|&n| n != 0) {
            return Err(GgufError::SplitKey {
                part: path.to_path_buf(),
                key: split::NO,
                found: no.to_string(),
                expected: 0,
            });
        }
        let file = first.file.clone();
        let locations = (0..file.tensors.len()).map(|j| (0, j)).collect();
        return Ok(GgufSet {
            parts: vec![SetPart {
                path: path.to_path_buf(),
                mapped: first,
            }],
            file,
            locations,
        });
    }
    let count = count as u32; // a u16 above 1
    let no = no.ok_or_else(|| GgufError::MissingKey {
        key: split::NO.to_string(),
    })?;
    if no != 0 {
        let no = no as u32;
        return Err(GgufError::SplitNotFirst {
            path: path.to_path_buf(),
            no: no + 1,
            count: count as u16,
            first: split_prefix(path, no, count).map(|p| split_path(&p, 0, count)),
        });
    }
    let prefix = split_prefix(path, 0, count).ok_or_else(|| GgufError::SplitName {
        path: path.to_path_buf(),
        key: split::COUNT,
        count: count as u16,
        postfix: split_postfix(0, count),
    })?;
    let total = split_key(meta, split::TENSORS_COUNT)?.ok_or_else(|| GgufError::MissingKey {
        key: split::TENSORS_COUNT.to_string(),
    })?;
    let mut parts = vec![SetPart {
        path: path.to_path_buf(),
        mapped: first,
    }];
    for k in 1..count {
        let part = split_path(&prefix, k, count);
        if !part.is_file() {
            return Err(GgufError::SplitPartMissing {
                first: path.to_path_buf(),
                part,
                no: k + 1,
                count: count as u16,
            });
        }
        let in_part = |source: GgufError| GgufError::InSplitPart {
            part: part.clone(),
            source: Box::new(source),
        };
        let mapped = open_mmap(&part).map_err(in_part)?;
        let want = [
            (split::NO, i64::from(k)),
            (split::COUNT, i64::from(count)),
            (split::TENSORS_COUNT, total),
        ];
        for (key, expected) in want {
            let found = split_key(&mapped.file.metadata, key).map_err(in_part)?;
            if found != Some(expected) {
                return Err(GgufError::SplitKey {
                    part,
                    key,
                    found: found.map_or("missing".to_string(), |v| v.to_string()),
                    expected,
                });
            }
        }
        parts.push(SetPart { path: part, mapped });
    }
    let mut file = parts[0].mapped.file.clone();
    file.tensors.clear();
    let mut locations = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (p, part) in parts.iter().enumerate() {
        for (j, t) in part.mapped.file.tensors.iter().enumerate() {
            if let Some(&q) = seen.get(t.name.as_str()) {
                return Err(GgufError::SplitDuplicateTensor {
                    name: t.name.clone(),
                    first: parts[q].path.clone(),
                    second: part.path.clone(),
                });
            }
            seen.insert(&t.name, p);
            file.tensors.push(t.clone());
            locations.push((p, j));
        }
    }
    if file.tensors.len() as i64 != total {
        return Err(GgufError::SplitTensorCount {
            first: path.to_path_buf(),
            key: split::TENSORS_COUNT,
            found: file.tensors.len() as u64,
            expected: total,
        });
    }
    Ok(GgufSet {
        parts,
        file,
        locations,
    })
}
