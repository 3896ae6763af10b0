//! Q8_0 quantization (ggml's `quantize_row_q8_0_ref`: per block of 32, `d = amax / 127`,
//! `q = round(x / d)`), compiled for the CPU it runs on. candle's version is the same scalar code
//! built for the baseline x86-64 target, where `f32::round` is a libm call: a third of a q8_0
//! conversion's time (perf, docs/benchmarks.md). Built with SSE4.1 or AVX2 enabled, the rounding
//! is inline and the block loops vectorize; the operations and their order are candle's, so the
//! bytes are too (tested against candle's `BlockQ8_0::from_float`).

use half::f16;

/// Elements per block, bytes per block (an f16 scale and 32 signed bytes).
pub const BLOCK: usize = 32;
pub const BLOCK_BYTES: usize = 2 + BLOCK;

crate::simd::for_cpu!(
    /// Quantize whole blocks of `src` into `dst` (exactly `src.len() / 32 * 34` bytes).
    pub fn quantize(src: &[f32], dst: &mut [u8]) = blocks; ["avx2", "sse4.1"]
);

/// The kernel; inlined into each feature-enabled wrapper so it is compiled for that feature set.
#[inline(always)]
pub(super) fn blocks(src: &[f32], dst: &mut [u8]) {
    for (xs, out) in src
        .chunks_exact(BLOCK)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let mut amax = 0f32;
        for &x in xs {
            amax = amax.max(x.abs());
        }
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (scale, qs) = out.split_at_mut(2);
        scale.copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, &x) in qs.iter_mut().zip(xs) {
            *q = (f32::round(x * id) as i8) as u8;
        }
    }
}
