//! The GGUF reader: parses a whole file given as bytes (usually an mmap), checking every length,
//! count and offset against the bytes left before using it. Hostile input gives a typed error,
//! never a panic, and never an allocation larger than the file could justify.

use std::fs::File;
use std::path::Path;

use super::error::GgufError;
use super::keys::{self, GENERAL_ALIGNMENT};
use super::metadata::Metadata;
use super::types::GgmlType;
use super::value::{Array, Value, ValueType};

pub const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Smallest tensor info: name length (8), n_dims (4), type (4), offset (8).
const MIN_TENSOR_INFO: u64 = 24;
/// Most items reserved ahead of parsing them (each item's bytes are checked as it is read).
const PREALLOC: u64 = 4096;
/// Smallest key/value: key length (8), type (4), one byte of value.
const MIN_KV: u64 = 13;

/// Where one key/value lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpan {
    /// Start of the key's length prefix.
    pub key_offset: u64,
    /// Start of the value (after the u32 type code).
    pub value_offset: u64,
    /// End of the value (exclusive).
    pub value_end: u64,
}

/// One tensor info.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order (fastest first).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset relative to the data section.
    pub offset: u64,
    /// Size of the data in bytes. For an unknown type: the span up to the next tensor (or the
    /// end of the file), padding included.
    pub size: u64,
    /// Where the tensor info starts in the file.
    pub info_offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn is_known(&self) -> bool {
        self.ggml_type.info().is_some()
    }
}

/// A parsed GGUF file (header, metadata and tensor infos; the tensor data stays in the bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: Metadata,
    /// One span per metadata entry, in the same order.
    pub spans: Vec<FieldSpan>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// End of the tensor infos (start of the padding before the data section).
    pub header_end: u64,
    /// Start of the data section.
    pub data_start: u64,
    /// End of the last tensor's data (absolute; `data_start` when there are none).
    pub data_end: u64,
    pub file_len: u64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.left() {
            return Err(GgufError::Truncated {
                offset: self.offset(),
                what: what(),
                needed: n,
                left: self.left(),
            });
        }
        let start = self.pos;
        // n <= left <= usize::MAX
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let b = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed byte string.
    fn bytes_str(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let at = self.offset();
        let len = self.u64(&|| format!("{} length", what()))?;
        if len > self.left() {
            return Err(GgufError::StringTooLong {
                offset: at,
                what: what(),
                len,
                left: self.left(),
            });
        }
        self.take(len, what)
    }

    fn utf8(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let at = self.offset();
        let b = self.bytes_str(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| GgufError::NotUtf8 {
            offset: at,
            what: what(),
        })
    }

    /// A count of items each at least `min_size` bytes, checked against the bytes left.
    fn count(&mut self, min_size: u64, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        let at = self.offset();
        let n = self.u64(what)?;
        let fits = n
            .checked_mul(min_size)
            .is_some_and(|need| need <= self.left());
        if !fits {
            return Err(GgufError::CountTooLarge {
                offset: at,
                what: what(),
                count: n,
                left: self.left(),
            });
        }
        Ok(n)
    }
}

fn read_scalar(c: &mut Cursor, ty: ValueType, key: &str) -> Result<Value, GgufError> {
    let what = || format!("value of {key:?}");
    Ok(match ty {
        ValueType::U8 => Value::U8(c.array::<1>(&what)?[0]),
        ValueType::I8 => Value::I8(c.array::<1>(&what)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(c.array(&what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(c.array(&what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        ValueType::Bool => {
            let at = c.offset();
            match c.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                byte => {
                    return Err(GgufError::BadBool {
                        offset: at,
                        key: key.to_string(),
                        byte,
                    })
                }
            }
        }
        ValueType::String => Value::String(c.bytes_str(&what)?.to_vec()),
        ValueType::Array => {
            return Err(GgufError::NestedArray {
                offset: c.offset(),
                key: key.to_string(),
            })
        }
    })
}

fn value_type(c: &mut Cursor, key: &str) -> Result<ValueType, GgufError> {
    let at = c.offset();
    let code = c.u32(&|| format!("type of {key:?}"))?;
    ValueType::from_code(code).ok_or(GgufError::BadValueType {
        offset: at,
        key: key.to_string(),
        code,
    })
}

fn read_array(c: &mut Cursor, key: &str) -> Result<Array, GgufError> {
    let elem_at = c.offset();
    let elem = value_type(c, key)?;
    if elem == ValueType::Array {
        return Err(GgufError::NestedArray {
            offset: elem_at,
            key: key.to_string(),
        });
    }
    let n = c.count(elem.min_size(), &|| {
        format!("element count of array {key:?}")
    })?;
    // n * min_size <= bytes left, so these allocations are bounded by the file's size
    let n = n as usize;
    macro_rules! fixed {
        ($variant:ident, $t:ty) => {{
            let what = || format!("elements of array {key:?}");
            let raw = c.take(n as u64 * std::mem::size_of::<$t>() as u64, &what)?;
            Array::$variant(
                raw.chunks_exact(std::mem::size_of::<$t>())
                    .map(|b| {
                        let mut a = [0u8; std::mem::size_of::<$t>()];
                        a.copy_from_slice(b);
                        <$t>::from_le_bytes(a)
                    })
                    .collect(),
            )
        }};
    }
    Ok(match elem {
        ValueType::U8 => fixed!(U8, u8),
        ValueType::I8 => fixed!(I8, i8),
        ValueType::U16 => fixed!(U16, u16),
        ValueType::I16 => fixed!(I16, i16),
        ValueType::U32 => fixed!(U32, u32),
        ValueType::I32 => fixed!(I32, i32),
        ValueType::F32 => fixed!(F32, f32),
        ValueType::U64 => fixed!(U64, u64),
        ValueType::I64 => fixed!(I64, i64),
        ValueType::F64 => fixed!(F64, f64),
        ValueType::Bool => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                match read_scalar(c, ValueType::Bool, key)? {
                    Value::Bool(b) => v.push(b),
                    _ => unreachable!("read_scalar(Bool) returns a Bool"),
                }
            }
            Array::Bool(v)
        }
        ValueType::String => {
            let mut v = Vec::with_capacity(n.min(PREALLOC as usize));
            for i in 0..n {
                v.push(
                    c.bytes_str(&|| format!("string {i} of array {key:?}"))?
                        .to_vec(),
                );
            }
            Array::String(v)
        }
        ValueType::Array => unreachable!("checked above"),
    })
}

fn pad(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|y| y / align * align)
}

/// Magic and version; returns the version (2 or 3).
fn read_preamble(c: &mut Cursor) -> Result<u32, GgufError> {
    let magic: [u8; 4] = c.array(&|| "magic".to_string())?;
    if &magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(&|| "version".to_string())?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() == 3 || version.swap_bytes() == 2 {
            "; this looks like a big-endian file"
        } else if version == 1 {
            "; version 1 used 32-bit lengths and is obsolete"
        } else {
            ""
        };
        return Err(GgufError::UnsupportedVersion { version, hint });
    }
    Ok(version)
}

/// The tensor and key/value counts, each checked against the smallest bytes it needs.
fn read_counts(c: &mut Cursor) -> Result<(u64, u64), GgufError> {
    // v2 and v3 share the layout (v3 only allowed big-endian files, which we refuse above)
    let n_tensors = c.u64(&|| "tensor count".to_string())?;
    let n_kv = c.u64(&|| "key/value count".to_string())?;
    let check = |n: u64, min: u64, what: &str, left: u64| {
        if n.checked_mul(min).is_some_and(|need| need <= left) {
            Ok(())
        } else {
            Err(GgufError::CountTooLarge {
                offset: if what.starts_with("tensor") { 8 } else { 16 },
                what: what.to_string(),
                count: n,
                left,
            })
        }
    };
    check(n_tensors, MIN_TENSOR_INFO, "tensor count", c.left())?;
    check(n_kv, MIN_KV, "key/value count", c.left())?;
    Ok((n_tensors, n_kv))
}

/// `n_kv` metadata entries (duplicate keys refused) and where each lies.
fn read_metadata(c: &mut Cursor, n_kv: u64) -> Result<(Metadata, Vec<FieldSpan>), GgufError> {
    let mut metadata = Metadata::new();
    // capacities are capped: a count is only trusted as far as items actually parse
    let mut spans = Vec::with_capacity(n_kv.min(PREALLOC) as usize);
    let mut seen_keys = std::collections::HashSet::new();
    for i in 0..n_kv {
        let key_offset = c.offset();
        let key = c.utf8(&|| format!("key {i}"))?;
        if !seen_keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey {
                offset: key_offset,
                key,
            });
        }
        let ty = value_type(c, &key)?;
        let value_offset = c.offset();
        let value = if ty == ValueType::Array {
            Value::Array(read_array(c, &key)?)
        } else {
            read_scalar(c, ty, &key)?
        };
        spans.push(FieldSpan {
            key_offset,
            value_offset,
            value_end: c.offset(),
        });
        metadata.push_unchecked(key, value);
    }
    Ok((metadata, spans))
}

/// `n_tensors` tensor infos (duplicate names refused).
fn read_tensor_infos(c: &mut Cursor, n_tensors: u64) -> Result<Vec<TensorInfo>, GgufError> {
    let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOC) as usize);
    let mut seen_tensors = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let info_offset = c.offset();
        let name = c.utf8(&|| format!("name of tensor {i}"))?;
        if !seen_tensors.insert(name.clone()) {
            return Err(GgufError::DuplicateTensor {
                offset: info_offset,
                name,
            });
        }
        tensors.push(read_tensor_info(c, name, info_offset)?);
    }
    Ok(tensors)
}

/// The rest of one tensor info after its name: dimensions, type, offset; the size from the
/// type table (0 for an unknown type, sized later from the offsets).
fn read_tensor_info(
    c: &mut Cursor,
    name: String,
    info_offset: u64,
) -> Result<TensorInfo, GgufError> {
    let nd_at = c.offset();
    let n_dims = c.u32(&|| format!("dimension count of tensor {name:?}"))?;
    if n_dims > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            offset: nd_at,
            name,
            n_dims,
        });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(c.u64(&|| format!("dimension {d} of tensor {name:?}"))?);
    }
    // ggml keeps element counts in int64_t
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64);
    let Some(elements) = elements else {
        return Err(GgufError::DimOverflow {
            offset: nd_at,
            name,
            dims,
        });
    };
    let ggml_type = GgmlType::from_code(c.u32(&|| format!("type of tensor {name:?}"))?);
    let offset = c.u64(&|| format!("offset of tensor {name:?}"))?;
    let size = match ggml_type.info() {
        Some(t) => {
            let row = dims.first().copied().unwrap_or(1);
            if !row.is_multiple_of(t.block_size) {
                return Err(GgufError::PartialBlock {
                    name,
                    row,
                    ty: t.name.to_string(),
                    block: t.block_size,
                });
            }
            (elements / t.block_size)
                .checked_mul(t.type_size)
                .ok_or_else(|| GgufError::DimOverflow {
                    offset: nd_at,
                    name: name.clone(),
                    dims: dims.clone(),
                })?
        }
        None => 0, // sized below from the offsets
    };
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        size,
        info_offset,
    })
}

/// Start of the data section: the header end padded to `alignment`, which must lie within the
/// file when there are tensors.
fn data_start(
    header_end: u64,
    alignment: u64,
    file_len: u64,
    has_tensors: bool,
) -> Result<u64, GgufError> {
    let data_start = pad(header_end, alignment).ok_or(GgufError::Truncated {
        offset: header_end,
        what: "padding before the data section".to_string(),
        needed: alignment,
        left: 0,
    })?;
    if data_start > file_len && has_tensors {
        return Err(GgufError::Truncated {
            offset: header_end,
            what: "padding before the data section".to_string(),
            needed: data_start - header_end,
            left: file_len - header_end,
        });
    }
    Ok(data_start)
}

/// Check the tensor offsets against the running-sum rule (ggml gguf.cpp: each offset is the
/// padded end of the one before) and the data section, and size the tensors of unknown type
/// (up to the next tensor or the end of the file).
fn place_tensors(
    tensors: &mut [TensorInfo],
    alignment: u64,
    data_start: u64,
    file_len: u64,
) -> Result<(), GgufError> {
    let data_len = file_len.saturating_sub(data_start);
    let mut expected = 0u64;
    let n = tensors.len();
    for i in 0..n {
        let next_offset = tensors.get(i + 1).map(|t| t.offset);
        let t = &mut tensors[i];
        if !t.offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedOffset {
                name: t.name.clone(),
                tensor_offset: t.offset,
                alignment,
            });
        }
        if t.offset != expected {
            return Err(GgufError::OffsetNotRunningSum {
                name: t.name.clone(),
                tensor_offset: t.offset,
                expected,
            });
        }
        if !t.is_known() {
            // an unknown type spans up to the next tensor or the end of the file
            let end = next_offset.unwrap_or(data_len);
            if end < t.offset {
                return Err(GgufError::OffsetNotRunningSum {
                    name: t.name.clone(),
                    tensor_offset: t.offset,
                    expected,
                });
            }
            t.size = end - t.offset;
        }
        let end = t.offset.checked_add(t.size);
        let past = |end: u64| GgufError::TensorPastEnd {
            name: t.name.clone(),
            start: data_start.saturating_add(t.offset),
            end: data_start.saturating_add(end),
            file_len,
        };
        let Some(end) = end else {
            return Err(past(u64::MAX - data_start));
        };
        if end > data_len {
            return Err(past(end));
        }
        expected = pad(end, alignment).ok_or_else(|| past(end))?;
    }
    Ok(())
}

impl GgufFile {
    /// Parse a GGUF file held in memory.
    pub fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let mut c = Cursor { bytes, pos: 0 };
        let version = read_preamble(&mut c)?;
        let (n_tensors, n_kv) = read_counts(&mut c)?;
        let (metadata, spans) = read_metadata(&mut c, n_kv)?;
        let alignment = metadata.alignment()?;
        let mut tensors = read_tensor_infos(&mut c, n_tensors)?;
        let header_end = c.offset();
        let file_len = bytes.len() as u64;
        let data_start = data_start(header_end, alignment, file_len, !tensors.is_empty())?;
        place_tensors(&mut tensors, alignment, data_start, file_len)?;
        let data_end = match tensors.last() {
            Some(t) => data_start + t.offset + t.size,
            None => data_start.min(file_len),
        };
        Ok(GgufFile {
            version,
            metadata,
            spans,
            tensors,
            alignment,
            header_end,
            data_start,
            data_end,
            file_len,
        })
    }

    /// The bytes of tensor `i` within the file's bytes.
    pub fn tensor_bytes<'a>(&self, bytes: &'a [u8], i: usize) -> Option<&'a [u8]> {
        let t = self.tensors.get(i)?;
        let start = usize::try_from(self.data_start.checked_add(t.offset)?).ok()?;
        let end = start.checked_add(usize::try_from(t.size).ok()?)?;
        bytes.get(start..end)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The span of a key, by name.
    pub fn span(&self, key: &str) -> Option<FieldSpan> {
        self.metadata
            .position(key)
            .and_then(|i| self.spans.get(i).copied())
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get(keys::GENERAL_ARCHITECTURE)
            .and_then(Value::as_str)
    }

    /// Whether `general.alignment` is present.
    pub fn has_alignment_key(&self) -> bool {
        self.metadata.contains(GENERAL_ALIGNMENT)
    }
}

/// A memory-mapped GGUF file and its parsed header.
pub struct MappedGguf {
    pub mmap: memmap2::Mmap,
    pub file: GgufFile,
}

impl MappedGguf {
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }
}

/// Map a file and parse it. This is the one place the GGUF code maps a file.
///
/// # Safety
/// A mapping is only sound while no one truncates or rewrites the file: a concurrent truncation
/// makes later reads fault (SIGBUS) and a concurrent write changes bytes under a `&[u8]`. abf
/// treats its inputs as read-only while they are mapped (the in-place patcher drops its mapping
/// before it writes), which is the same contract as every mmap-based model loader
/// (safetensors, candle, llama.cpp); another program modifying the file meanwhile is outside it.
pub fn open_mmap(path: &Path) -> Result<MappedGguf, GgufError> {
    let f = File::open(path).map_err(|e| GgufError::io(path, e))?;
    // SAFETY: see `# Safety` above; the file is opened read-only and not modified by abf while mapped.
    let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| GgufError::io(path, e))?;
    let file = GgufFile::parse(&mmap)?;
    Ok(MappedGguf { mmap, file })
}
