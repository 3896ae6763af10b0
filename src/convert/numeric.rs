//! Element conversions between raw little-endian tensors (f32, f16, bf16) and the ggml output
//! types, spread over every core with rayon. Block quantization goes through `crate::quant`.

use half::{bf16, f16};
use rayon::prelude::*;

use super::error::ConvertError;
use crate::checkpoint::TensorDtype;
use crate::gguf::GgmlType;

/// Elements per rayon task: large enough that scheduling is noise, small enough to spread.
const CHUNK: usize = 1 << 16;

/// Raw bytes of `dtype` -> f32.
pub fn to_f32(dtype: TensorDtype, data: &[u8]) -> Vec<f32> {
    let n = data.len() / dtype.size();
    let mut out = vec![0f32; n];
    let sz = dtype.size();
    out.par_chunks_mut(CHUNK)
        .zip(data.par_chunks(CHUNK * sz))
        .for_each(|(o, b)| match dtype {
            TensorDtype::F32 => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            TensorDtype::F16 => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *x = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            TensorDtype::BF16 => {
                for (x, c) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *x = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        });
    out
}

/// f32 -> raw bytes of `dtype`.
pub fn from_f32(dtype: TensorDtype, data: &[f32]) -> Vec<u8> {
    let sz = dtype.size();
    let mut out = vec![0u8; data.len() * sz];
    out.par_chunks_mut(CHUNK * sz)
        .zip(data.par_chunks(CHUNK))
        .for_each(|(o, x)| match dtype {
            TensorDtype::F32 => {
                for (c, v) in o.chunks_exact_mut(4).zip(x) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            TensorDtype::F16 => {
                for (c, v) in o.chunks_exact_mut(2).zip(x) {
                    c.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            TensorDtype::BF16 => {
                for (c, v) in o.chunks_exact_mut(2).zip(x) {
                    c.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
                }
            }
        });
    out
}

/// Convert raw `from` bytes to `to` directly (one pass, no f32 buffer; a copy when equal).
pub fn convert(from: TensorDtype, to: TensorDtype, data: &[u8]) -> Vec<u8> {
    if from == to {
        return data.to_vec();
    }
    let (si, so) = (from.size(), to.size());
    let n = data.len() / si;
    let mut out = vec![0u8; n * so];
    out.par_chunks_mut(CHUNK * so)
        .zip(data.par_chunks(CHUNK * si))
        .for_each(|(o, b)| {
            for (oc, ic) in o.chunks_exact_mut(so).zip(b.chunks_exact(si)) {
                let v = match from {
                    TensorDtype::F32 => f32::from_le_bytes([ic[0], ic[1], ic[2], ic[3]]),
                    TensorDtype::F16 => f16::from_le_bytes([ic[0], ic[1]]).to_f32(),
                    TensorDtype::BF16 => bf16::from_le_bytes([ic[0], ic[1]]).to_f32(),
                };
                match to {
                    TensorDtype::F32 => oc.copy_from_slice(&v.to_le_bytes()),
                    TensorDtype::F16 => oc.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                    TensorDtype::BF16 => oc.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
                }
            }
        });
    out
}

/// The float dtype a ggml type is, if it is one.
pub fn float_dtype(ty: GgmlType) -> Option<TensorDtype> {
    match ty.code() {
        0 => Some(TensorDtype::F32),
        1 => Some(TensorDtype::F16),
        30 => Some(TensorDtype::BF16),
        _ => None,
    }
}

/// Quantize rows of `row_len` f32 elements to a block type (`crate::quant`, every core).
pub fn quantize(
    name: &str,
    ty: GgmlType,
    data: &[f32],
    row_len: usize,
) -> Result<Vec<u8>, ConvertError> {
    crate::quant::quantize(ty, data, row_len).map_err(|e| ConvertError::tensor(name, e.to_string()))
}

/// Dequantize `n` elements of a block type to f32; a type `crate::quant` does not handle is
/// an error naming the tensor.
pub fn dequantize(
    name: &str,
    ty: GgmlType,
    data: &[u8],
    n: usize,
) -> Result<Vec<f32>, ConvertError> {
    if !crate::quant::is_supported(ty) {
        return Err(ConvertError::UnsupportedType {
            tensor: name.to_string(),
            ty: ty.to_string(),
        });
    }
    crate::quant::dequantize(ty, data, n).map_err(|e| ConvertError::tensor(name, e.to_string()))
}
