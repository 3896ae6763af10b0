//! Quantize and dequantize ggml block types with candle's quantizers, spread over every core.
//!
//! Blocks are independent, so any split of a tensor on block boundaries gives the same bytes as
//! one sequential pass; we split into fixed chunks of whole blocks (never straddling a row,
//! since rows are whole blocks) and let rayon schedule them. The importance-weighted kernels
//! index their per-column weights by the block's place in its row, so their chunks are whole
//! rows. To pick the thread count, call these inside `rayon::ThreadPool::install`.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, GgmlType as CandleBlock,
};
use half::{bf16, f16};
use rayon::prelude::*;

use super::error::QuantError;
use crate::gguf::types::{self, GgmlType, TypeInfo};

// GGUF stores little-endian bytes and we copy candle's structs byte for byte.
#[cfg(target_endian = "big")]
compile_error!("abf::quant reinterprets ggml blocks as little-endian structs");

/// Elements per parallel work item: large enough to amortise scheduling, small enough that a
/// chunk's scratch buffers stay in cache and 2-16 cores all get work on a small tensor.
const CHUNK_ELEMENTS: usize = 1 << 15;

/// A block struct whose bytes are exactly ggml's on-disk block.
///
/// # Safety
/// Implementors are `#[repr(C)]` (or primitive) with no padding and consist only of integer,
/// `f32`, `f16` and `bf16` fields, so every byte pattern is a valid value and the value's bytes
/// are its ggml encoding. The size is checked against our type table below.
unsafe trait PlainBlock: CandleBlock + 'static {}

/// The one map between our type table and candle's block structs: each row declares the block
/// plain (with a compile-time check of its size against the table) and makes it a [`Codec`].
macro_rules! plain_blocks {
    ($($block:ty => $info:path $(, $weighted:ident)?;)*) => {
        $(
            // SAFETY: see `PlainBlock`; candle declares these `#[repr(C)]` from ggml's structs.
            unsafe impl PlainBlock for $block {}
            const _: () = assert!(
                std::mem::size_of::<$block>() as u64 == $info.type_size
                    && <$block as CandleBlock>::BLCK_SIZE as u64 == $info.block_size,
                "candle block layout differs from ggml's type table"
            );
        )*

        /// candle's kernels of `ty`, or None when candle has no block for it.
        fn candle_codec(ty: GgmlType) -> Option<Codec> {
            let info = ty.info()?;
            $(
                if info.code == $info.code {
                    return Some(Codec::of::<$block>(&$info)$(.$weighted::<$block>())?);
                }
            )*
            None
        }
    };
}

// `weighted`: candle 0.11 implements `from_float_imatrix` (ggml's `quantize_row_*_impl` with
// `quant_weights`) for these; calling it on the others panics.
plain_blocks! {
    f32 => types::F32;
    f16 => types::F16;
    bf16 => types::BF16;
    BlockQ4_0 => types::Q4_0;
    BlockQ4_1 => types::Q4_1;
    BlockQ5_0 => types::Q5_0;
    BlockQ5_1 => types::Q5_1;
    BlockQ8_0 => types::Q8_0;
    BlockQ2K => types::Q2_K, weighted;
    BlockQ3K => types::Q3_K, weighted;
    BlockQ4K => types::Q4_K, weighted;
    BlockQ5K => types::Q5_K, weighted;
    BlockQ6K => types::Q6_K, weighted;
    BlockQ8K => types::Q8_K;
}

/// The kernels of `ty`, or None when there are none: candle's, with Q8_0's quantizer ours
/// (same bytes, built for the running CPU: `q8_0.rs`).
fn codec(ty: GgmlType) -> Option<Codec> {
    let c = candle_codec(ty)?;
    if c.info.code == types::Q8_0.code {
        return Some(Codec {
            quantize: super::q8_0::quantize,
            ..c
        });
    }
    Some(c)
}

fn block_bytes<T: PlainBlock>(blocks: &[T]) -> &[u8] {
    // SAFETY: `PlainBlock` guarantees no padding, so every byte of the slice is initialised.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

fn block_bytes_mut<T: PlainBlock>(blocks: &mut [T]) -> &mut [u8] {
    // SAFETY: `PlainBlock` guarantees every byte pattern is a valid `T`.
    unsafe {
        std::slice::from_raw_parts_mut(
            blocks.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(blocks),
        )
    }
}

/// `src` holds whole blocks of `T`; `dst` has room for exactly their bytes.
fn quantize_chunk<T: PlainBlock>(src: &[f32], dst: &mut [u8]) {
    let mut blocks = vec![T::zeros(); src.len() / T::BLCK_SIZE];
    T::from_float(src, &mut blocks);
    dst.copy_from_slice(block_bytes(&blocks));
}

/// `src` holds whole blocks of `T` (as bytes); `dst` has room for exactly their elements.
fn dequantize_chunk<T: PlainBlock>(src: &[u8], dst: &mut [f32]) {
    // Copy into an aligned buffer: the bytes come from a file at any offset.
    let mut blocks = vec![T::zeros(); dst.len() / T::BLCK_SIZE];
    block_bytes_mut(&mut blocks).copy_from_slice(src);
    T::to_float(&blocks, dst);
}

/// `src` holds whole rows of `row_len`; `weights` has one entry per column of a row.
fn quantize_weighted_chunk<T: PlainBlock>(
    src: &[f32],
    dst: &mut [u8],
    weights: &[f32],
    row_len: usize,
) {
    let mut blocks = vec![T::zeros(); src.len() / T::BLCK_SIZE];
    T::from_float_imatrix(src, &mut blocks, weights, row_len);
    dst.copy_from_slice(block_bytes(&blocks));
}

/// An importance-weighted quantizer: (rows, out, per-column weights, row length).
type WeightedKernel = fn(&[f32], &mut [u8], &[f32], usize);

/// The kernels of one supported type.
#[derive(Clone, Copy)]
struct Codec {
    info: &'static TypeInfo,
    quantize: fn(&[f32], &mut [u8]),
    dequantize: fn(&[u8], &mut [f32]),
    quantize_weighted: Option<WeightedKernel>,
}

impl Codec {
    fn of<T: PlainBlock>(info: &'static TypeInfo) -> Codec {
        Codec {
            info,
            quantize: quantize_chunk::<T>,
            dequantize: dequantize_chunk::<T>,
            quantize_weighted: None,
        }
    }

    fn weighted<T: PlainBlock>(self) -> Codec {
        Codec {
            quantize_weighted: Some(quantize_weighted_chunk::<T>),
            ..self
        }
    }

    fn block_size(&self) -> usize {
        self.info.block_size as usize
    }

    fn type_size(&self) -> usize {
        self.info.type_size as usize
    }

    /// Blocks per parallel work item.
    fn chunk_blocks(&self) -> usize {
        (CHUNK_ELEMENTS / self.block_size()).max(1)
    }
}

/// Whether [`quantize`] and [`dequantize`] handle `ty`.
pub fn is_supported(ty: GgmlType) -> bool {
    codec(ty).is_some()
}

/// Every type [`quantize`] and [`dequantize`] handle, in table order.
pub fn supported_types() -> Vec<GgmlType> {
    types::TYPES
        .iter()
        .map(GgmlType::Known)
        .filter(|t| is_supported(*t))
        .collect()
}

/// Bytes that `n_elements` of `ty` occupy, checking that they are whole blocks.
pub fn quantized_size(ty: GgmlType, n_elements: usize) -> Result<usize, QuantError> {
    let c = codec(ty).ok_or(QuantError::Unsupported { ty })?;
    if !n_elements.is_multiple_of(c.block_size()) {
        return Err(QuantError::PartialBlock {
            ty,
            n_elements,
            block_size: c.block_size(),
        });
    }
    (n_elements / c.block_size())
        .checked_mul(c.type_size())
        .ok_or(QuantError::TooLarge { ty, n_elements })
}

fn check_rows(
    c: &Codec,
    ty: GgmlType,
    n_elements: usize,
    row_len: usize,
) -> Result<(), QuantError> {
    if row_len == 0 || !row_len.is_multiple_of(c.block_size()) {
        return Err(QuantError::RowLength {
            ty,
            row_len,
            block_size: c.block_size(),
        });
    }
    if !n_elements.is_multiple_of(row_len) {
        return Err(QuantError::PartialRow {
            ty,
            n_elements,
            row_len,
        });
    }
    Ok(())
}

/// Quantize `data` (rows of `row_len` elements) to `ty`, returning ggml's bytes.
pub fn quantize(ty: GgmlType, data: &[f32], row_len: usize) -> Result<Vec<u8>, QuantError> {
    let mut out = vec![0u8; quantized_size(ty, data.len())?];
    quantize_into(ty, data, row_len, &mut out)?;
    Ok(out)
}

/// [`quantize`] into a caller's buffer of exactly [`quantized_size`] bytes.
pub fn quantize_into(
    ty: GgmlType,
    data: &[f32],
    row_len: usize,
    out: &mut [u8],
) -> Result<(), QuantError> {
    let c = codec(ty).ok_or(QuantError::Unsupported { ty })?;
    check_rows(&c, ty, data.len(), row_len)?;
    check_byte_len(ty, data.len(), out.len())?;
    let chunk = c.chunk_blocks();
    data.par_chunks(chunk * c.block_size())
        .zip(out.par_chunks_mut(chunk * c.type_size()))
        .for_each(|(src, dst)| (c.quantize)(src, dst));
    Ok(())
}

/// Whether [`quantize_weighted`] takes importance weights for `ty` (else it is [`quantize`]).
pub fn supports_weights(ty: GgmlType) -> bool {
    codec(ty).is_some_and(|c| c.quantize_weighted.is_some())
}

/// Quantize `data` (rows of `row_len`) to `ty`, minimising the error weighted per column by
/// `weights` (`row_len` values: llama.cpp's importance matrix, mean squared activation of each
/// input column). Types without a weighted kernel ([`supports_weights`]) quantize plainly, as
/// ggml does for Q8_0. Parallel over chunks of whole rows.
pub fn quantize_weighted(
    ty: GgmlType,
    data: &[f32],
    row_len: usize,
    weights: &[f32],
) -> Result<Vec<u8>, QuantError> {
    let c = codec(ty).ok_or(QuantError::Unsupported { ty })?;
    let Some(kernel) = c.quantize_weighted else {
        return quantize(ty, data, row_len);
    };
    check_rows(&c, ty, data.len(), row_len)?;
    if weights.len() != row_len {
        return Err(QuantError::WeightsLength {
            ty,
            row_len,
            got: weights.len(),
        });
    }
    if let Some((column, w)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !w.is_finite() || **w < 0.0)
    {
        return Err(QuantError::BadWeight {
            ty,
            column,
            value: w.to_string(),
        });
    }
    let mut out = vec![0u8; quantized_size(ty, data.len())?];
    let row_bytes = row_len / c.block_size() * c.type_size();
    let rows = (CHUNK_ELEMENTS / row_len).max(1);
    data.par_chunks(rows * row_len)
        .zip(out.par_chunks_mut(rows * row_bytes))
        .for_each(|(src, dst)| kernel(src, dst, weights, row_len));
    Ok(out)
}

/// Single-threaded [`quantize_weighted`], for tests that check the parallel split.
pub fn quantize_weighted_sequential(
    ty: GgmlType,
    data: &[f32],
    row_len: usize,
    weights: &[f32],
) -> Result<Vec<u8>, QuantError> {
    let c = codec(ty).ok_or(QuantError::Unsupported { ty })?;
    let Some(kernel) = c.quantize_weighted else {
        return quantize_sequential(ty, data, row_len);
    };
    check_rows(&c, ty, data.len(), row_len)?;
    if weights.len() != row_len {
        return Err(QuantError::WeightsLength {
            ty,
            row_len,
            got: weights.len(),
        });
    }
    let mut out = vec![0u8; quantized_size(ty, data.len())?];
    kernel(data, &mut out, weights, row_len);
    Ok(out)
}

/// `got` bytes must be exactly the size of `n_elements` of `ty`.
fn check_byte_len(ty: GgmlType, n_elements: usize, got: usize) -> Result<(), QuantError> {
    let expected = quantized_size(ty, n_elements)?;
    if got != expected {
        return Err(QuantError::ByteLength {
            ty,
            n_elements,
            expected,
            got,
        });
    }
    Ok(())
}

/// Dequantize `n_elements` of `ty` from ggml's bytes, which must be exactly that tensor.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, QuantError> {
    // Validate before allocating: `n_elements` may come from an untrusted header.
    check_byte_len(ty, n_elements, bytes.len())?;
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// [`dequantize`] into a caller's buffer; its length is the element count.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let c = codec(ty).ok_or(QuantError::Unsupported { ty })?;
    check_byte_len(ty, out.len(), bytes.len())?;
    let chunk = c.chunk_blocks();
    bytes
        .par_chunks(chunk * c.type_size())
        .zip(out.par_chunks_mut(chunk * c.block_size()))
        .for_each(|(src, dst)| (c.dequantize)(src, dst));
    Ok(())
}

/// Single-threaded [`quantize`], for tests and benchmarks that check the parallel split.
pub fn quantize_sequential(
    ty: GgmlType,
    data: &[f32],
    row_len: usize,
) -> Result<Vec<u8>, QuantError> {
    let c = codec(ty).ok_or(QuantError::Unsupported { ty })?;
    check_rows(&c, ty, data.len(), row_len)?;
    let mut out = vec![0u8; quantized_size(ty, data.len())?];
    (c.quantize)(data, &mut out);
    Ok(out)
}

/// Single-threaded [`dequantize`].
pub fn dequantize_sequential(
    ty: GgmlType,
    bytes: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, QuantError> {
    let c = codec(ty).ok_or(QuantError::Unsupported { ty })?;
    check_byte_len(ty, n_elements, bytes.len())?;
    let mut out = vec![0f32; n_elements];
    (c.dequantize)(bytes, &mut out);
    Ok(out)
}

#[cfg(test)]
mod q8_0_tests {
    use super::super::q8_0::{blocks, quantize, BLOCK_BYTES};
    use super::quantize_chunk;
    use candle_core::quantized::k_quants::BlockQ8_0;

    /// Byte for byte candle's `from_float` (the scalar reference built for the baseline target)
    /// on values of every scale, rounding ties, zeros, subnormals and infinities.
    #[test]
    fn equals_candles_reference() {
        let mut xs: Vec<f32> = Vec::new();
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for scale in [1e-30f32, 1e-6, 1e-3, 0.02, 1.0, 37.0, 1e4, 1e30] {
            for _ in 0..32 * 64 {
                let u = (next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                xs.push(u * scale);
            }
        }
        // blocks whose amax is 127, so x / d hits exact .5 ties; all zeros; subnormals; inf
        xs.extend((0..32).map(|i| i as f32 - 15.5));
        xs.extend((0..32).map(|i| if i == 0 { 127.0 } else { (i as f32) + 0.5 }));
        xs.extend([0.0f32; 32]);
        xs.extend((0..32).map(|i| f32::from_bits(i + 1)));
        xs.extend((0..32).map(|i| if i == 3 { f32::INFINITY } else { i as f32 }));
        let n = xs.len() / 32;
        let mut reference = vec![0u8; n * BLOCK_BYTES];
        quantize_chunk::<BlockQ8_0>(&xs, &mut reference);
        let mut ours = vec![0u8; n * BLOCK_BYTES];
        quantize(&xs, &mut ours);
        for (i, (r, o)) in reference
            .chunks_exact(BLOCK_BYTES)
            .zip(ours.chunks_exact(BLOCK_BYTES))
            .enumerate()
        {
            assert_eq!(r, o, "block {i}");
        }
        // and the portable path, which other CPUs take
        let mut portable = vec![0u8; n * BLOCK_BYTES];
        blocks(&xs, &mut portable);
        assert!(portable == ours);
    }
}
