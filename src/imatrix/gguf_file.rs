//! llama.cpp's GGUF form of an importance matrix (`tools/imatrix/imatrix.cpp` `save_imatrix`,
//! `common/imatrix-loader.cpp`): `general.type = "imatrix"`, `imatrix.datasets` (strings),
//! `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per weight, in name order, the F32
//! tensors `<name>.in_sum2` (`[n_per_row, n_mat]`) and `<name>.counts` (`[1, n_mat]`). ggml
//! drops trailing dimensions of 1 when it writes, so a dense weight's are `[n_per_row]`, `[1]`.

use std::collections::BTreeMap;
use std::path::Path;

use super::error::ImatrixError;
use super::matrix::{Entry, ImportanceMatrix};
use crate::gguf::keys::{self, imatrix as k};
use crate::gguf::types;
use crate::gguf::{Array, GgmlType, GgufFile, GgufWriter, TensorSpec, Value};

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// ggml's dims for `[n, m]`: trailing ones dropped, at least one dimension.
fn dims(n: usize, m: usize) -> Vec<u64> {
    if m == 1 {
        vec![n as u64]
    } else {
        vec![n as u64, m as u64]
    }
}

fn write_into<W: std::io::Write>(
    mut w: GgufWriter<W>,
    m: &ImportanceMatrix,
) -> Result<GgufWriter<W>, crate::gguf::GgufError> {
    let f32t: GgmlType = types::F32.ty();
    w.add_kv(keys::GENERAL_TYPE, Value::string(k::GENERAL_TYPE_IMATRIX))?;
    let ds = m.datasets.iter().map(|s| s.as_bytes().to_vec()).collect();
    w.add_kv(k::DATASETS, Value::Array(Array::String(ds)))?;
    w.add_kv(k::CHUNK_COUNT, Value::U32(m.chunk_count))?;
    w.add_kv(k::CHUNK_SIZE, Value::U32(m.chunk_size))?;
    for (name, e) in &m.entries {
        let (n, nm) = (e.n_per_row(), e.n_mat());
        w.add_tensor(TensorSpec::new(
            format!("{name}{}", k::SUFFIX_IN_SUM2),
            dims(n, nm),
            f32t,
        )?)?;
        w.add_tensor(TensorSpec::new(
            format!("{name}{}", k::SUFFIX_COUNTS),
            dims(1, nm),
            f32t,
        )?)?;
    }
    for (name, e) in &m.entries {
        w.write_tensor_data(
            &format!("{name}{}", k::SUFFIX_IN_SUM2),
            &f32_bytes(e.sums.iter().copied()),
        )?;
        // counts are F32 in the file, as llama.cpp writes them (exact up to 2^24 rows)
        w.write_tensor_data(
            &format!("{name}{}", k::SUFFIX_COUNTS),
            &f32_bytes(e.counts.iter().map(|&c| c as f32)),
        )?;
    }
    Ok(w)
}

/// The GGUF bytes of `m`.
pub fn to_gguf_bytes(m: &ImportanceMatrix) -> Result<Vec<u8>, ImatrixError> {
    let err = |source| ImatrixError::Gguf {
        path: "<memory>".into(),
        source,
    };
    let w = write_into(GgufWriter::new(Vec::new()), m).map_err(err)?;
    Ok(w.finish().map_err(err)?.0)
}

/// Write `m` to `path` (atomic; an existing file is replaced only with `force`). Returns bytes.
pub fn write_gguf(m: &ImportanceMatrix, path: &Path, force: bool) -> Result<u64, ImatrixError> {
    let err = |source| ImatrixError::Gguf {
        path: path.to_path_buf(),
        source,
    };
    let w = GgufWriter::create(path, force).map_err(err)?;
    write_into(w, m).map_err(err)?.commit().map_err(err)
}

fn read_f32s(
    file: &GgufFile,
    bytes: &[u8],
    i: usize,
    path: &Path,
) -> Result<Vec<f32>, ImatrixError> {
    let t = &file.tensors[i];
    if t.ggml_type != types::F32.ty() {
        return Err(ImatrixError::format(
            path,
            format!("tensor {:?} is {}, not F32", t.name, t.ggml_type),
        ));
    }
    let data = file.tensor_bytes(bytes, i).ok_or_else(|| {
        ImatrixError::format(path, format!("tensor {:?}: data past the end", t.name))
    })?;
    Ok(data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Parse llama.cpp's GGUF form from `bytes` (read from `path`, named in errors). Other tensors
/// (llama.cpp's optional `.in_sum`) are ignored, as its loader does.
pub fn parse_gguf(bytes: &[u8], path: &Path) -> Result<ImportanceMatrix, ImatrixError> {
    let file = GgufFile::parse(bytes).map_err(|source| ImatrixError::Gguf {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = &file.metadata;
    let key_err = |source| ImatrixError::Gguf {
        path: path.to_path_buf(),
        source,
    };
    let chunk_count = meta.get_u32(k::CHUNK_COUNT).map_err(key_err)?.unwrap_or(0);
    let chunk_size = meta.get_u32(k::CHUNK_SIZE).map_err(key_err)?.unwrap_or(0);
    let datasets = match meta.get(k::DATASETS) {
        None => Vec::new(),
        Some(Value::Array(Array::String(v))) => v
            .iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        Some(other) => {
            return Err(ImatrixError::format(
                path,
                format!(
                    "key {}: {} is not an array of strings",
                    k::DATASETS,
                    other.type_label()
                ),
            ))
        }
    };
    // weight name -> (in_sum2 index, counts index)
    let mut pairs: BTreeMap<String, (Option<usize>, Option<usize>)> = BTreeMap::new();
    for (i, t) in file.tensors.iter().enumerate() {
        if let Some(n) = t.name.strip_suffix(k::SUFFIX_IN_SUM2) {
            pairs.entry(n.to_string()).or_default().0 = Some(i);
        } else if let Some(n) = t.name.strip_suffix(k::SUFFIX_COUNTS) {
            pairs.entry(n.to_string()).or_default().1 = Some(i);
        }
    }
    if pairs.is_empty() {
        return Err(ImatrixError::format(
            path,
            "no .in_sum2/.counts tensors: no data",
        ));
    }
    let mut entries = BTreeMap::new();
    for (name, ix) in pairs {
        let (Some(si), Some(ci)) = ix else {
            return Err(ImatrixError::format(
                path,
                format!("weight {name:?}: .in_sum2 and .counts must both be present"),
            ));
        };
        let sums = read_f32s(&file, bytes, si, path)?;
        let raw = read_f32s(&file, bytes, ci, path)?;
        if raw.is_empty() || sums.is_empty() || sums.len() % raw.len() != 0 {
            return Err(ImatrixError::format(
                path,
                format!(
                    "weight {name:?}: {} sums are not a whole number of rows for {} counts",
                    sums.len(),
                    raw.len()
                ),
            ));
        }
        if let Some(v) = sums.iter().find(|v| !v.is_finite()) {
            return Err(ImatrixError::format(
                path,
                format!("weight {name:?}: sum {v}"),
            ));
        }
        let mut counts = Vec::with_capacity(raw.len());
        for c in raw {
            // counts are whole numbers stored as f32; llama.cpp rounds them (lround)
            if !c.is_finite() || c < 0.0 || c > u64::MAX as f32 {
                return Err(ImatrixError::format(
                    path,
                    format!("weight {name:?}: count {c}"),
                ));
            }
            counts.push(c.round() as u64);
        }
        entries.insert(name, Entry { sums, counts });
    }
    Ok(ImportanceMatrix {
        entries,
        datasets,
        chunk_count,
        chunk_size,
    })
}
