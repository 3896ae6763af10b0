//! Element conversions between raw little-endian tensors (f32, f16, bf16) and the ggml output
//! types, spread over every core with rayon. Block quantization goes through `crate::quant`.

use half::{bf16, f16};
use rayon::prelude::*;

use super::error::ConvertError;
use crate::checkpoint::TensorDtype;
use crate::gguf::types::{self, GgmlType};

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
    if let Some(out) = convert_slices(from, to, data) {
        return out;
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

/// f32 <-> f16/bf16 through half's slice conversions, which use the F16C instructions when the
/// CPU has them (checked at run time) instead of per-element software rounding. `None` when the
/// input is not 4-byte aligned as f32 (a safetensors offset need not be) or the pair is another.
fn convert_slices(from: TensorDtype, to: TensorDtype, data: &[u8]) -> Option<Vec<u8>> {
    use half::slice::HalfFloatSliceExt;
    if from != TensorDtype::F32 || cfg!(target_endian = "big") {
        return None;
    }
    let src: &[f32] = bytemuck::try_cast_slice(data).ok()?;
    match to {
        TensorDtype::F16 => {
            let mut out = vec![0u8; src.len() * 2];
            let dst: &mut [f16] = bytemuck::try_cast_slice_mut(&mut out).ok()?;
            dst.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(o, x)| o.convert_from_f32_slice(x));
            Some(out)
        }
        TensorDtype::BF16 => {
            let mut out = vec![0u8; src.len() * 2];
            let dst: &mut [bf16] = bytemuck::try_cast_slice_mut(&mut out).ok()?;
            dst.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(o, x)| o.convert_from_f32_slice(x));
            Some(out)
        }
        _ => None,
    }
}

/// The float dtype a ggml type is, if it is one.
pub fn float_dtype(ty: GgmlType) -> Option<TensorDtype> {
    match ty.code() {
        c if c == types::F32.code => Some(TensorDtype::F32),
        c if c == types::F16.code => Some(TensorDtype::F16),
        c if c == types::BF16.code => Some(TensorDtype::BF16),
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

/// [`quantize`] weighted per column by `weights` (`crate::quant::quantize_weighted`).
pub fn quantize_weighted(
    name: &str,
    ty: GgmlType,
    data: &[f32],
    row_len: usize,
    weights: &[f32],
) -> Result<Vec<u8>, ConvertError> {
    crate::quant::quantize_weighted(ty, data, row_len, weights)
        .map_err(|e| ConvertError::tensor(name, e.to_string()))
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

#[cfg(test)]
mod slice_path {
    use super::*;

    /// The F16C slice path rounds exactly as half's per-element software conversion (ties to
    /// even, subnormals, overflow to inf, signed zeros), and an unaligned input takes the scalar path.
    #[test]
    fn slice_conversion_matches_per_element() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65520.0,
            1e9,
            -1e9,
            6.0e-8,
            3.0e-8,
            1.0e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            1.000_488_3,
            1.000_976_6,
        ];
        // a sweep over exponents and mantissas, including f16/bf16 rounding ties
        let mut bits = 0x0000_1234u32;
        for _ in 0..200_000 {
            bits = bits.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let x = f32::from_bits(bits);
            if !x.is_nan() {
                xs.push(x);
            }
        }
        let raw: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        for to in [TensorDtype::F16, TensorDtype::BF16] {
            let fast = convert(TensorDtype::F32, to, &raw);
            let slow: Vec<u8> = xs
                .iter()
                .flat_map(|&x| match to {
                    TensorDtype::F16 => f16::from_f32(x).to_le_bytes(),
                    _ => bf16::from_f32(x).to_le_bytes(),
                })
                .collect();
            assert!(fast == slow, "{to:?}");
            // unaligned input: the scalar path, same bytes
            let mut shifted = vec![0u8; raw.len() + 1];
            shifted[1..].copy_from_slice(&raw);
            assert!(
                convert(TensorDtype::F32, to, &shifted[1..]) == slow,
                "{to:?} unaligned"
            );
        }
    }
}
