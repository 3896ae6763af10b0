//! Safetensors weights of a model directory: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Each shard is memory-mapped once when the store opens (the one
//! `unsafe` of the crate); tensors are read lazily from the maps.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;
use safetensors::tensor::{Metadata, SafeTensors};
use serde_json::Value;

use super::error::{read_json, CheckpointError};

/// Single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The element types abf reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorDtype {
    F32,
    F16,
    BF16,
}

impl TensorDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TensorDtype::F32 => 4,
            TensorDtype::F16 | TensorDtype::BF16 => 2,
        }
    }

    /// The safetensors header name.
    pub fn name(self) -> &'static str {
        match self {
            TensorDtype::F32 => "F32",
            TensorDtype::F16 => "F16",
            TensorDtype::BF16 => "BF16",
        }
    }

    /// The candle dtype.
    pub fn candle(self) -> DType {
        match self {
            TensorDtype::F32 => DType::F32,
            TensorDtype::F16 => DType::F16,
            TensorDtype::BF16 => DType::BF16,
        }
    }

    /// From a candle dtype (None for the integer and f64 types).
    pub fn from_candle(dtype: DType) -> Option<TensorDtype> {
        match dtype {
            DType::F32 => Some(TensorDtype::F32),
            DType::F16 => Some(TensorDtype::F16),
            DType::BF16 => Some(TensorDtype::BF16),
            _ => None,
        }
    }

    fn from_st(dtype: safetensors::Dtype) -> Option<TensorDtype> {
        match dtype {
            safetensors::Dtype::F32 => Some(TensorDtype::F32),
            safetensors::Dtype::F16 => Some(TensorDtype::F16),
            safetensors::Dtype::BF16 => Some(TensorDtype::BF16),
            _ => None,
        }
    }
}

/// A tensor's raw bytes in a mapped shard (little-endian, row-major).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: TensorDtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Map a whole file read-only.
///
/// # Safety
/// The file must not be truncated or written while the map lives: abf opens checkpoint weights
/// as inputs only and never writes a weights file in place (outputs are new files renamed into
/// place, which leaves a mapped old inode intact).
unsafe fn map_file(file: &File) -> std::io::Result<Mmap> {
    memmap2::MmapOptions::new().map(file)
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Offset of the data section: 8 + header length.
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard, CheckpointError> {
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CheckpointError::MissingFile {
                    path: path.to_path_buf(),
                    what: "safetensors weights",
                }
            } else {
                CheckpointError::io(path, e)
            }
        })?;
        // SAFETY: see map_file; the store only reads the map.
        let map = unsafe { map_file(&file) }.map_err(|e| CheckpointError::io(path, e))?;
        // read_metadata checks every offset against the buffer and that the file ends where
        // the header says
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| CheckpointError::Safetensors {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header_len,
            metadata,
        })
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>, CheckpointError> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })?;
        let dtype =
            TensorDtype::from_st(info.dtype).ok_or_else(|| CheckpointError::UnsupportedDtype {
                path: self.path.clone(),
                tensor: name.to_string(),
                dtype: format!("{:?}", info.dtype),
            })?;
        let (start, end) = info.data_offsets;
        let bad = || CheckpointError::Safetensors {
            path: self.path.clone(),
            reason: format!("tensor {name:?} lies outside the file"),
        };
        let lo = self.data_start.checked_add(start).ok_or_else(bad)?;
        let hi = self.data_start.checked_add(end).ok_or_else(bad)?;
        let data = self.map.get(lo..hi).ok_or_else(bad)?;
        Ok(TensorView {
            dtype,
            shape: &info.shape,
            data,
        })
    }
}

/// The weights of a model directory, memory-mapped.
pub struct SafetensorStore {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> shard index.
    index: HashMap<String, usize>,
    /// Names in file order: shards in index order (by file name), offsets within each.
    order: Vec<String>,
    sharded: bool,
}

impl std::fmt::Debug for SafetensorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorStore")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.order.len())
            .finish()
    }
}

impl SafetensorStore {
    /// Open `DIR/model.safetensors.index.json` and its shards when the index exists, else
    /// `DIR/model.safetensors`.
    pub fn open(dir: &Path) -> Result<SafetensorStore, CheckpointError> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            SafetensorStore::open_index(&index_path)
        } else {
            SafetensorStore::open_single(&dir.join(WEIGHTS_FILE))
        }
    }

    /// Open one safetensors file.
    pub fn open_single(path: &Path) -> Result<SafetensorStore, CheckpointError> {
        let shard = Shard::open(path)?;
        let order = shard.metadata.offset_keys();
        let index = order.iter().map(|n| (n.clone(), 0)).collect();
        Ok(SafetensorStore {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            shards: vec![shard],
            index,
            order,
            sharded: false,
        })
    }

    /// Open sharded weights through their index.
    pub fn open_index(index_path: &Path) -> Result<SafetensorStore, CheckpointError> {
        let dir = index_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let value = read_json(index_path, "safetensors index")?;
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                CheckpointError::invalid(index_path, "weight_map", "missing or not an object")
            })?;
        // shard file -> the tensors the index puts there
        let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                CheckpointError::invalid(
                    index_path,
                    &format!("weight_map.{tensor}"),
                    "expected a file name",
                )
            })?;
            // a shard is a plain file name beside the index
            if shard.is_empty() || shard.contains(['/', '\\']) || shard == ".." {
                return Err(CheckpointError::invalid(
                    index_path,
                    &format!("weight_map.{tensor}"),
                    format!("shard {shard:?} is not a file name in the model directory"),
                ));
            }
            by_shard
                .entry(shard.to_string())
                .or_default()
                .push(tensor.clone());
        }
        let mut shards = Vec::with_capacity(by_shard.len());
        let mut index = HashMap::new();
        let mut order = Vec::new();
        for (file, tensors) in by_shard {
            let path = dir.join(&file);
            if !path.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index_path.to_path_buf(),
                    shard: file,
                    tensor: tensors.first().cloned().unwrap_or_default(),
                });
            }
            let shard = Shard::open(&path)?;
            for t in &tensors {
                if shard.metadata.info(t).is_none() {
                    return Err(CheckpointError::MissingTensor {
                        path: path.clone(),
                        tensor: t.clone(),
                    });
                }
            }
            let wanted: std::collections::HashSet<&String> = tensors.iter().collect();
            let i = shards.len();
            for name in shard.metadata.offset_keys() {
                if wanted.contains(&name) {
                    index.insert(name.clone(), i);
                    order.push(name);
                }
            }
            shards.push(shard);
        }
        Ok(SafetensorStore {
            dir,
            shards,
            index,
            order,
            sharded: true,
        })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the weights came from an index of shards.
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// The shard files, in index order.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Tensor names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file a tensor is in (the single file when it is missing, for error messages).
    fn file_of(&self, name: &str) -> &Path {
        match self.index.get(name) {
            Some(&i) => &self.shards[i].path,
            None if self.sharded => &self.dir,
            None => &self.shards[0].path,
        }
    }

    /// Drop the resident pages of a tensor read for the last time (a hint: the map stays valid
    /// and a later read faults the pages back in from the file). Streaming conversions call it
    /// so that the resident set follows the tensor being converted, not the whole input.
    pub fn release(&self, name: &str) {
        let Some(&i) = self.index.get(name) else {
            return;
        };
        let shard = &self.shards[i];
        let Some(info) = shard.metadata.info(name) else {
            return;
        };
        let (start, end) = info.data_offsets;
        let page = 4096;
        // whole pages inside the tensor only: a neighbour's pages stay
        let lo = (shard.data_start + start).div_ceil(page) * page;
        let hi = (shard.data_start + end) / page * page;
        if hi > lo && hi <= shard.map.len() {
            // SAFETY: the map is a shared read-only mapping of a file abf never writes in place
            // (see map_file): DontNeed only drops clean pages, which later reads fault back in
            // from the file unchanged. Errors are ignored: the hint is an optimisation.
            let _ = unsafe {
                shard
                    .map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
        }
    }

    /// A tensor's dtype, shape and raw bytes.
    pub fn tensor_view(&self, name: &str) -> Result<TensorView<'_>, CheckpointError> {
        match self.index.get(name) {
            Some(&i) => self.shards[i].view(name),
            None => Err(CheckpointError::MissingTensor {
                path: if self.sharded {
                    self.dir.join(INDEX_FILE)
                } else {
                    self.file_of(name).to_path_buf()
                },
                tensor: name.to_string(),
            }),
        }
    }

    /// A tensor's shape, from the header (no data read).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, CheckpointError> {
        self.tensor_view(name).map(|v| v.shape.to_vec())
    }

    /// Load a tensor as stored, on `device`.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor, CheckpointError> {
        let view = self.tensor_view(name)?;
        Tensor::from_raw_buffer(view.data, view.dtype.candle(), view.shape, device).map_err(|e| {
            CheckpointError::Safetensors {
                path: self.file_of(name).to_path_buf(),
                reason: format!("tensor {name:?}: {e}"),
            }
        })
    }

    /// Load a tensor whose shape must be `expected`, converted to `dtype`.
    pub fn load_checked(
        &self,
        name: &str,
        expected: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, CheckpointError> {
        let view = self.tensor_view(name)?;
        if view.shape != expected {
            return Err(CheckpointError::ShapeMismatch {
                path: self.file_of(name).to_path_buf(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: view.shape.to_vec(),
            });
        }
        self.load(name, device)?
            .to_dtype(dtype)
            .map_err(|e| CheckpointError::Safetensors {
                path: self.file_of(name).to_path_buf(),
                reason: format!("tensor {name:?}: {e}"),
            })
    }

    /// A candle `VarBuilder` over a shared store; loads convert to `dtype` on `device`.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(SharedStore(self.clone())), dtype, device.clone())
    }
}

/// A store shared between a `VarBuilder` and other readers.
#[derive(Debug, Clone)]
pub struct SharedStore(pub Arc<SafetensorStore>);

fn backend_get(
    store: &SafetensorStore,
    s: Shape,
    name: &str,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    store
        .load_checked(name, s.dims(), dtype, dev)
        .map_err(candle_core::Error::wrap)
}

impl SimpleBackend for SafetensorStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        backend_get(self, s, name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)
            .map_err(candle_core::Error::wrap)?
            .to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

impl SimpleBackend for SharedStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        SimpleBackend::get(self.0.as_ref(), s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.as_ref().get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
