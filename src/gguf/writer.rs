//! The GGUF writer (version 3): a state machine that takes key/values, then tensor infos, then
//! the tensor data in info order, streaming the data (never the whole model in memory). It
//! refuses duplicates and out-of-order calls, honours `general.alignment`, and pads every
//! tensor to the alignment as ggml and gguf-py do.

use std::io::{Read, Write};
use std::path::Path;

use super::error::GgufError;
use super::keys;
use super::metadata::Metadata;
use super::reader::{MAGIC, MAX_DIMS};
use super::types::GgmlType;
use super::value::{Array, Value};
use crate::fsutil::AtomicFile;

/// The version this writer produces.
pub const VERSION: u32 = 3;
/// ggml's `GGML_MAX_NAME` (names are stored NUL-terminated in 64 bytes).
pub const MAX_TENSOR_NAME: usize = 63;

/// A tensor to be written: name, GGUF-order dims, type and data size in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub size: u64,
}

impl TensorSpec {
    /// A tensor of a known type; its size comes from the type table.
    pub fn new(
        name: impl Into<String>,
        dims: Vec<u64>,
        ggml_type: GgmlType,
    ) -> Result<TensorSpec, GgufError> {
        let name = name.into();
        let elements = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let size = elements
            .and_then(|n| ggml_type.byte_size(n))
            .ok_or_else(|| GgufError::TensorData {
                name: name.clone(),
                reason: format!("{dims:?} of {ggml_type} has no whole-block byte size"),
            })?;
        Ok(TensorSpec {
            name,
            dims,
            ggml_type,
            size,
        })
    }

    /// A tensor carried through with an explicit size (unknown types).
    pub fn with_size(
        name: impl Into<String>,
        dims: Vec<u64>,
        ggml_type: GgmlType,
        size: u64,
    ) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dims,
            ggml_type,
            size,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Kv,
    TensorInfos,
    Data,
    Done,
}

/// A GGUF writer over any `Write`. Calls go: `add_kv`* -> `add_tensor`* -> `write_tensor_*`
/// (one per tensor, in order) -> `finish`.
pub struct GgufWriter<W: Write> {
    out: W,
    state: State,
    meta: Metadata,
    tensors: Vec<TensorSpec>,
    names: std::collections::HashSet<String>,
    offsets: Vec<u64>,
    alignment: u64,
    next: usize,
    pos: u64,
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s);
}

/// Encode one value (without its type code) onto `buf`.
pub fn encode_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => buf.push(*x),
        Value::I8(x) => buf.push(*x as u8),
        Value::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => buf.push(*x as u8),
        Value::String(s) => put_str(buf, s),
        Value::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => {
            buf.extend_from_slice(&a.elem_type().code().to_le_bytes());
            buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
            macro_rules! le {
                ($v:expr) => {
                    for x in $v {
                        buf.extend_from_slice(&x.to_le_bytes());
                    }
                };
            }
            match a {
                Array::U8(v) => buf.extend_from_slice(v),
                Array::I8(v) => buf.extend(v.iter().map(|&x| x as u8)),
                Array::U16(v) => le!(v),
                Array::I16(v) => le!(v),
                Array::U32(v) => le!(v),
                Array::I32(v) => le!(v),
                Array::F32(v) => le!(v),
                Array::Bool(v) => buf.extend(v.iter().map(|&x| x as u8)),
                Array::String(v) => {
                    for s in v {
                        put_str(buf, s);
                    }
                }
                Array::U64(v) => le!(v),
                Array::I64(v) => le!(v),
                Array::F64(v) => le!(v),
            }
        }
    }
}

fn padded(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

/// Tensor offsets (relative to the data section) under the running-sum rule.
pub fn layout(tensors: &[TensorSpec], alignment: u64) -> Vec<u64> {
    let mut off = 0u64;
    tensors
        .iter()
        .map(|t| {
            let o = off;
            off = padded(o + t.size, alignment);
            o
        })
        .collect()
}

/// Encode everything before the data section: header, key/values, tensor infos and the padding
/// up to the data section. Returns the bytes and each tensor's offset.
pub fn encode_header(
    meta: &Metadata,
    tensors: &[TensorSpec],
) -> Result<(Vec<u8>, Vec<u64>), GgufError> {
    let alignment = meta.alignment()?;
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta.iter() {
        put_str(&mut buf, k.as_bytes());
        buf.extend_from_slice(&v.value_type().code().to_le_bytes());
        encode_value(&mut buf, v);
    }
    let offsets = layout(tensors, alignment);
    for (t, off) in tensors.iter().zip(&offsets) {
        put_str(&mut buf, t.name.as_bytes());
        buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            buf.extend_from_slice(&d.to_le_bytes());
        }
        buf.extend_from_slice(&t.ggml_type.code().to_le_bytes());
        buf.extend_from_slice(&off.to_le_bytes());
    }
    let end = padded(buf.len() as u64, alignment) as usize;
    buf.resize(end, 0);
    Ok((buf, offsets))
}

impl<W: Write> GgufWriter<W> {
    pub fn new(out: W) -> GgufWriter<W> {
        GgufWriter {
            out,
            state: State::Kv,
            meta: Metadata::new(),
            tensors: Vec::new(),
            names: Default::default(),
            offsets: Vec::new(),
            alignment: keys::DEFAULT_ALIGNMENT,
            next: 0,
            pos: 0,
        }
    }

    /// A writer with all key/values and tensor infos given at once.
    pub fn with_header(
        out: W,
        meta: &Metadata,
        tensors: Vec<TensorSpec>,
    ) -> Result<GgufWriter<W>, GgufError> {
        let mut w = GgufWriter::new(out);
        for (k, v) in meta.iter() {
            w.add_kv(k, v.clone())?;
        }
        for t in tensors {
            w.add_tensor(t)?;
        }
        Ok(w)
    }

    fn refuse(&self, what: &str) -> GgufError {
        GgufError::WriterState(
            format!("{what} is not allowed after {:?}", self.state).to_lowercase(),
        )
    }

    /// Add one key/value (before any tensor info).
    pub fn add_kv(&mut self, key: &str, value: Value) -> Result<(), GgufError> {
        if self.state != State::Kv {
            return Err(self.refuse(&format!("adding key {key:?}")));
        }
        self.meta.insert_new(key, value)
    }

    /// Add one tensor info (before any data).
    pub fn add_tensor(&mut self, t: TensorSpec) -> Result<(), GgufError> {
        if !matches!(self.state, State::Kv | State::TensorInfos) {
            return Err(self.refuse(&format!("adding tensor {:?}", t.name)));
        }
        if t.name.len() > MAX_TENSOR_NAME {
            return Err(GgufError::TensorNameTooLong {
                len: t.name.len(),
                name: t.name,
            });
        }
        if t.dims.len() > MAX_DIMS as usize {
            return Err(GgufError::TooManyDims {
                offset: 0,
                n_dims: t.dims.len() as u32,
                name: t.name,
            });
        }
        if let Some(expected) = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| t.ggml_type.byte_size(n))
        {
            if expected != t.size {
                return Err(GgufError::TensorData {
                    name: t.name.clone(),
                    reason: format!(
                        "size {} does not match {:?} of {} ({expected} bytes)",
                        t.size, t.dims, t.ggml_type
                    ),
                });
            }
        } else if t.ggml_type.info().is_some() {
            return Err(GgufError::TensorData {
                name: t.name.clone(),
                reason: format!(
                    "{:?} of {} has no whole-block byte size",
                    t.dims, t.ggml_type
                ),
            });
        }
        if !self.names.insert(t.name.clone()) {
            return Err(GgufError::DuplicateTensor {
                offset: 0,
                name: t.name,
            });
        }
        self.state = State::TensorInfos;
        self.tensors.push(t);
        Ok(())
    }

    fn start_data(&mut self) -> Result<(), GgufError> {
        if matches!(self.state, State::Kv | State::TensorInfos) {
            self.alignment = self.meta.alignment()?;
            let (header, offsets) = encode_header(&self.meta, &self.tensors)?;
            self.out.write_all(&header)?;
            self.pos = header.len() as u64;
            self.offsets = offsets;
            self.state = State::Data;
        }
        if self.state != State::Data {
            return Err(self.refuse("writing tensor data"));
        }
        Ok(())
    }

    fn expect_next(&mut self, name: &str) -> Result<u64, GgufError> {
        self.start_data()?;
        match self.tensors.get(self.next) {
            Some(t) if t.name == name => Ok(t.size),
            Some(t) => Err(GgufError::WriterState(format!(
                "tensor data for {name:?} given out of order; expected {:?}",
                t.name
            ))),
            None => Err(GgufError::WriterState(format!(
                "tensor data for {name:?} given after every tensor was written"
            ))),
        }
    }

    fn end_tensor(&mut self, size: u64) -> Result<(), GgufError> {
        let pad = padded(size, self.alignment) - size;
        self.out.write_all(&vec![0u8; pad as usize])?;
        self.pos += size + pad;
        self.next += 1;
        Ok(())
    }

    /// Write the next tensor's data from a slice of exactly its size.
    pub fn write_tensor_data(&mut self, name: &str, data: &[u8]) -> Result<(), GgufError> {
        let size = self.expect_next(name)?;
        if data.len() as u64 != size {
            return Err(GgufError::TensorData {
                name: name.to_string(),
                reason: format!("got {} bytes, expected {size}", data.len()),
            });
        }
        self.out.write_all(data)?;
        self.end_tensor(size)
    }

    /// Stream the next tensor's data from a reader (exactly its size is read).
    pub fn copy_tensor_data(&mut self, name: &str, src: impl Read) -> Result<(), GgufError> {
        let size = self.expect_next(name)?;
        let copied = std::io::copy(&mut src.take(size), &mut self.out)?;
        if copied != size {
            return Err(GgufError::TensorData {
                name: name.to_string(),
                reason: format!("source ended after {copied} of {size} bytes"),
            });
        }
        self.end_tensor(size)
    }

    /// The tensor infos in order, with their offsets once the header has been written.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Finish: every tensor must have been written. Returns the output and the bytes written.
    pub fn finish(mut self) -> Result<(W, u64), GgufError> {
        self.start_data()?;
        if self.next != self.tensors.len() {
            return Err(GgufError::WriterState(format!(
                "finished after {} of {} tensors; next is {:?}",
                self.next,
                self.tensors.len(),
                self.tensors[self.next].name
            )));
        }
        self.out.flush()?;
        self.state = State::Done;
        Ok((self.out, self.pos))
    }
}

impl GgufWriter<AtomicFile> {
    /// A writer onto a temporary sibling of `path`; `commit` renames it into place.
    pub fn create(path: &Path, overwrite: bool) -> Result<GgufWriter<AtomicFile>, GgufError> {
        let f = AtomicFile::create(path, overwrite).map_err(|e| GgufError::io(path, e))?;
        Ok(GgufWriter::new(f))
    }

    /// Finish, sync and rename into place.
    pub fn commit(self) -> Result<u64, GgufError> {
        let (f, n) = self.finish()?;
        let target = f.target().to_path_buf();
        f.commit().map_err(|e| GgufError::io(target, e))?;
        Ok(n)
    }
}
