//! Writing checkpoints: safetensors (sharded above a size, with an index), config.json, and the
//! tokenizer files.
//!
//! Atomicity: a new checkpoint directory is written whole into a hidden sibling directory and
//! renamed into place at the end ([`StagedDir`]), so a failure leaves no partial output. Single
//! files written into an existing directory (config.json in place) go through
//! [`AtomicFile`](crate::fsutil::AtomicFile).

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::{json, Map, Value};

use super::config::CONFIG_FILE;
use super::error::CheckpointError;
use super::safetensors::{TensorDtype, TensorView, INDEX_FILE, WEIGHTS_FILE};
use super::tokenizer::TOKENIZER_FILES;
use crate::fsutil::AtomicFile;

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// One tensor to write: name, dtype, shape and little-endian row-major bytes.
#[derive(Debug, Clone)]
pub struct TensorData<'a> {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl<'a> TensorData<'a> {
    /// Borrow a tensor read from a store.
    pub fn from_view(name: &str, view: TensorView<'a>) -> TensorData<'a> {
        TensorData {
            name: name.to_string(),
            dtype: view.dtype,
            shape: view.shape.to_vec(),
            data: Cow::Borrowed(view.data),
        }
    }

    /// Copy a candle tensor (f32, f16 or bf16) out of any device.
    pub fn from_candle(
        name: &str,
        tensor: &Tensor,
    ) -> Result<TensorData<'static>, CheckpointError> {
        let fail = |reason: String| CheckpointError::Output {
            path: PathBuf::from(name),
            reason,
        };
        let dtype = TensorDtype::from_candle(tensor.dtype()).ok_or_else(|| {
            fail(format!(
                "tensor {name:?}: dtype {:?} cannot be saved (F32, F16 or BF16)",
                tensor.dtype()
            ))
        })?;
        let flat = tensor
            .flatten_all()
            .map_err(|e| fail(format!("tensor {name:?}: {e}")))?;
        let err = |e: candle_core::Error| fail(format!("tensor {name:?}: {e}"));
        let data: Vec<u8> = match dtype {
            TensorDtype::F32 => flat
                .to_vec1::<f32>()
                .map_err(err)?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            TensorDtype::F16 => flat
                .to_vec1::<half::f16>()
                .map_err(err)?
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect(),
            TensorDtype::BF16 => flat
                .to_vec1::<half::bf16>()
                .map_err(err)?
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect(),
        };
        Ok(TensorData {
            name: name.to_string(),
            dtype,
            shape: tensor.dims().to_vec(),
            data: Cow::Owned(data),
        })
    }

    fn check(&self) -> Result<(), CheckpointError> {
        let n = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(self.dtype.size()));
        if n != Some(self.data.len()) {
            return Err(CheckpointError::Output {
                path: PathBuf::from(&self.name),
                reason: format!(
                    "tensor {:?}: {} bytes do not hold shape {:?} of {}",
                    self.name,
                    self.data.len(),
                    self.shape,
                    self.dtype.name()
                ),
            });
        }
        Ok(())
    }
}

/// Write one safetensors file atomically; tensors are stored in the order given.
fn write_safetensors_file(
    path: &Path,
    tensors: &[&TensorData<'_>],
    overwrite: bool,
) -> Result<u64, CheckpointError> {
    let mut header = Map::new();
    // transformers refuses safetensors weights whose metadata format is not a known framework
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for t in tensors {
        t.check()?;
        if header.contains_key(&t.name) {
            return Err(CheckpointError::Output {
                path: path.to_path_buf(),
                reason: format!("tensor {:?} given twice", t.name),
            });
        }
        let end = offset + t.data.len();
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header_bytes =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| CheckpointError::Output {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    // the data section starts 8-aligned, the header padded with spaces (as safetensors does)
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let io = |e| CheckpointError::io(path, e);
    let mut f = AtomicFile::create(path, overwrite).map_err(io)?;
    f.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&header_bytes).map_err(io)?;
    for t in tensors {
        f.write_all(&t.data).map_err(io)?;
    }
    f.commit().map_err(io)?;
    Ok(offset as u64)
}

/// Write `tensors` into `dir` as `model.safetensors`, or, when they exceed `max_shard_bytes`,
/// as `model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json`.
/// Returns the files written.
pub fn write_safetensors(
    dir: &Path,
    tensors: &[TensorData<'_>],
    max_shard_bytes: u64,
    overwrite: bool,
) -> Result<Vec<PathBuf>, CheckpointError> {
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    if total <= max_shard_bytes {
        let path = dir.join(WEIGHTS_FILE);
        let all: Vec<&TensorData> = tensors.iter().collect();
        write_safetensors_file(&path, &all, overwrite)?;
        return Ok(vec![path]);
    }
    // greedy: a new shard when the next tensor would pass the limit
    let mut groups: Vec<Vec<&TensorData>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in tensors {
        let n = t.data.len() as u64;
        let current = groups.last_mut().expect("one group");
        if !current.is_empty() && size + n > max_shard_bytes {
            groups.push(vec![t]);
            size = n;
        } else {
            current.push(t);
            size += n;
        }
    }
    let count = groups.len();
    let mut weight_map = Map::new();
    let mut written = Vec::with_capacity(count + 1);
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        let path = dir.join(&file);
        write_safetensors_file(&path, group, overwrite)?;
        for t in group {
            weight_map.insert(t.name.clone(), Value::String(file.clone()));
        }
        written.push(path);
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join(INDEX_FILE);
    write_json(&path, &index, overwrite)?;
    written.push(path);
    Ok(written)
}

/// Write a JSON file atomically, pretty (2 spaces, keys in their order) with a final newline.
pub fn write_json(path: &Path, value: &Value, overwrite: bool) -> Result<(), CheckpointError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| CheckpointError::Output {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    crate::fsutil::write_atomic(path, text.as_bytes(), overwrite)
        .map_err(|e| CheckpointError::io(path, e))
}

/// A directory being written beside its final path, renamed into place by `commit`; dropped
/// without `commit`, it is removed.
#[derive(Debug)]
pub struct StagedDir {
    tmp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl StagedDir {
    /// Start a directory for `target`, which must not exist or be an empty directory.
    pub fn create(target: &Path) -> Result<StagedDir, CheckpointError> {
        if target.exists() {
            let empty = std::fs::read_dir(target)
                .map_err(|e| CheckpointError::io(target, e))?
                .next()
                .is_none();
            if !empty {
                return Err(CheckpointError::Output {
                    path: target.to_path_buf(),
                    reason: "output directory exists and is not empty".to_string(),
                });
            }
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".to_string());
        let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
        Ok(StagedDir {
            tmp,
            target: target.to_path_buf(),
            done: false,
        })
    }

    /// Where to write the files now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final directory.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Rename the finished directory into place (over an empty directory, if one is there) and
    /// fsync the parent so the rename survives a crash. The files inside were written through
    /// `AtomicFile`, which synced them and this directory.
    pub fn commit(mut self) -> Result<PathBuf, CheckpointError> {
        crate::fsutil::sync_dir(&self.tmp).map_err(|e| CheckpointError::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.target).map_err(|e| CheckpointError::Output {
            path: self.target.clone(),
            reason: format!("renaming {} into place: {e}", self.tmp.display()),
        })?;
        self.done = true;
        crate::fsutil::sync_parent(&self.target)
            .map_err(|e| CheckpointError::io(&self.target, e))?;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Copy the tokenizer files present in `from` into `to`; returns their names.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<Vec<String>, CheckpointError> {
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(|e| CheckpointError::io(&src, e))?;
            let dst = to.join(name);
            crate::fsutil::write_atomic(&dst, &bytes, true)
                .map_err(|e| CheckpointError::io(&dst, e))?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}

/// What to save.
#[derive(Debug, Clone)]
pub struct SaveSpec<'a> {
    /// config.json, written as given (pretty, keys in order).
    pub config: &'a Value,
    pub tensors: &'a [TensorData<'a>],
    /// A directory whose tokenizer files are copied (the source model).
    pub tokenizer_dir: Option<&'a Path>,
    /// Shard above this many bytes of tensor data.
    pub max_shard_bytes: u64,
}

/// What was saved.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    pub dir: PathBuf,
    pub weight_files: Vec<PathBuf>,
    pub tokenizer_files: Vec<String>,
}

/// Save a checkpoint into a new directory `out` (absent or empty), atomically as a whole.
pub fn save_checkpoint(out: &Path, spec: &SaveSpec<'_>) -> Result<SaveReport, CheckpointError> {
    let staged = StagedDir::create(out)?;
    let weights = write_safetensors(staged.path(), spec.tensors, spec.max_shard_bytes, false)?;
    write_json(&staged.path().join(CONFIG_FILE), spec.config, false)?;
    let tokenizer_files = match spec.tokenizer_dir {
        Some(dir) => copy_tokenizer_files(dir, staged.path())?,
        None => Vec::new(),
    };
    let tmp = staged.path().to_path_buf();
    let dir = staged.commit()?;
    let weight_files = weights
        .iter()
        .map(|p| dir.join(p.strip_prefix(&tmp).unwrap_or(p)))
        .collect();
    Ok(SaveReport {
        dir,
        weight_files,
        tokenizer_files,
    })
}
