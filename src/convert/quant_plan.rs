//! Which ggml type each tensor gets for an `--outtype`.
//!
//! Sources: llama.cpp `convert_hf_to_gguf.py` (f32/f16/bf16/q8_0: 1-D tensors and norms stay
//! F32, everything else takes the output type, a Q8_0 row that is not a multiple of 32 falls
//! back to F16) and `src/llama-quant.cpp` (`llama_tensor_get_type` for the other types: the
//! output head gets Q6_K, `attn_v`/`ffn_down`/`attn_output` upgrades per file type, and the
//! fallback for rows that are not a multiple of the block size). docs/convert.md lists the rules.

use std::str::FromStr;

use super::tensor_map::Role;
use crate::gguf::types::{self, GgmlType, TypeInfo};

/// Declares [`OutType`] and its table from one list, so every variant has exactly one row and
/// a row is found by indexing with the variant.
macro_rules! out_types {
    ($($variant:ident = $name:literal, $base:path, $ftype:literal;)*) => {
        /// The `--outtype` values.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum OutType {
            $($variant),*
        }

        /// (outtype, name, base ggml type, llama.cpp `LLAMA_FTYPE_*` for `general.file_type`),
        /// in declaration order: row `i` is variant `i`.
        pub const OUT_TYPES: &[(OutType, &str, &TypeInfo, u32)] =
            &[$((OutType::$variant, $name, &$base, $ftype)),*];
    };
}

// Plain k-quant names follow llama.cpp's small ("_S") mixes: q3_k = Q3_K_S (11),
// q4_k = Q4_K_S (14), q5_k = Q5_K_S (16). Source: llama.cpp `include/llama.h` (`llama_ftype`).
out_types! {
    F32 = "f32", types::F32, 0;
    F16 = "f16", types::F16, 1;
    Bf16 = "bf16", types::BF16, 32;
    Q8_0 = "q8_0", types::Q8_0, 7;
    Q4_0 = "q4_0", types::Q4_0, 2;
    Q4_1 = "q4_1", types::Q4_1, 3;
    Q5_0 = "q5_0", types::Q5_0, 8;
    Q5_1 = "q5_1", types::Q5_1, 9;
    Q2K = "q2_k", types::Q2_K, 10;
    Q3K = "q3_k", types::Q3_K, 11;
    Q4K = "q4_k", types::Q4_K, 14;
    Q5K = "q5_k", types::Q5_K, 16;
    Q6K = "q6_k", types::Q6_K, 18;
    Q4KM = "q4_k_m", types::Q4_K, 15;
    Q5KM = "q5_k_m", types::Q5_K, 17;
}

impl OutType {
    fn row(self) -> &'static (OutType, &'static str, &'static TypeInfo, u32) {
        &OUT_TYPES[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// The type most tensors get.
    pub fn base_type(self) -> GgmlType {
        self.row().2.ty()
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*` numbering).
    pub fn file_type(self) -> u32 {
        self.row().3
    }

    /// Types the Python converter writes itself (no llama-quantize rules).
    pub fn is_float_or_q8(self) -> bool {
        matches!(
            self,
            OutType::F32 | OutType::F16 | OutType::Bf16 | OutType::Q8_0
        )
    }
}

impl FromStr for OutType {
    type Err = String;
    fn from_str(s: &str) -> Result<OutType, String> {
        let k = s.to_ascii_lowercase();
        OUT_TYPES
            .iter()
            .find(|r| r.1 == k)
            .map(|r| r.0)
            .ok_or_else(|| {
                let names: Vec<&str> = OUT_TYPES.iter().map(|r| r.1).collect();
                format!(
                    "unknown outtype {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

impl std::fmt::Display for OutType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the rules need to know about the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanContext {
    pub n_layer: usize,
    /// `n_head / n_head_kv` (llama.cpp `n_gqa()`).
    pub n_gqa: usize,
    /// Whether the model has a separate `output.weight` (else the embedding is the head).
    pub has_output: bool,
}

/// llama.cpp `use_more_bits`: the first and last eighth of the layers and every third between.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
}

/// The type a 1-D or norm tensor gets: always F32.
fn keeps_f32(role: Role, n_dims: usize) -> bool {
    n_dims < 2 || role == Role::Norm
}

/// The type for one tensor. `row_len` is the GGUF `ne[0]` (elements per row), `layer` the block
/// number (`attn_v` and `ffn_down` upgrades count layers as llama.cpp does for dense models).
/// Returns the type and, when a fallback happened, why.
pub fn choose_type(
    out: OutType,
    role: Role,
    n_dims: usize,
    row_len: u64,
    layer: Option<usize>,
    ctx: &PlanContext,
) -> (GgmlType, Option<String>) {
    if keeps_f32(role, n_dims) {
        return (types::F32.ty(), None);
    }
    let base = out.row().2;
    if out.is_float_or_q8() {
        // convert_hf_to_gguf: a Q8_0 tensor whose rows are not whole blocks is written as F16
        if *base == types::Q8_0 && !row_len.is_multiple_of(32) {
            return (
                types::F16.ty(),
                Some(format!("rows of {row_len} are not a multiple of 32: F16")),
            );
        }
        return (base.ty(), None);
    }
    let ty = quantize_rule(out, role, row_len, layer.unwrap_or(0), ctx);
    fit_rows(ty, row_len)
}

/// llama.cpp `llama_tensor_get_type` before the row-size check: the head, `attn_v`,
/// `ffn_down` and `attn_output` upgrades of a k-quant or legacy-quant output type.
fn quantize_rule(
    out: OutType,
    role: Role,
    row_len: u64,
    i: usize,
    ctx: &PlanContext,
) -> &'static TypeInfo {
    let is_head = role == Role::Output || (!ctx.has_output && role == Role::Embedding);
    if is_head {
        // the head gets Q6_K, or Q8_0 when its rows are not whole 256-blocks
        return if !row_len.is_multiple_of(256) {
            &types::Q8_0
        } else {
            &types::Q6_K
        };
    }
    let n = ctx.n_layer;
    let base = out.row().2;
    match role {
        Role::V => match out {
            OutType::Q2K if ctx.n_gqa >= 4 => &types::Q4_K,
            OutType::Q2K => &types::Q3_K,
            OutType::Q4KM | OutType::Q5KM if use_more_bits(i, n) => &types::Q6_K,
            OutType::Q4K if i < 4 => &types::Q5_K,
            _ => base,
        },
        Role::FfnDown => match out {
            OutType::Q2K => &types::Q3_K,
            OutType::Q4KM | OutType::Q5KM if use_more_bits(i, n) => &types::Q6_K,
            OutType::Q4K if i < n / 8 => &types::Q5_K,
            _ => base,
        },
        Role::AttnOutput if out == OutType::Q2K => &types::Q3_K,
        _ => base,
    }
}

/// `ty`, or its fallback when `row_len` is not a whole number of its blocks, with the reason.
/// llama.cpp's fallback table: Q2_K/Q3_K -> IQ4_NL, which candle cannot write: we use Q4_0, the
/// same size; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; then F16 when even that block does not
/// divide the row.
fn fit_rows(ty: &'static TypeInfo, row_len: u64) -> (GgmlType, Option<String>) {
    let block = ty.block_size;
    if row_len.is_multiple_of(block) {
        return (ty.ty(), None);
    }
    let fallback = match *ty {
        types::Q2_K | types::Q3_K => &types::Q4_0,
        types::Q4_K => &types::Q5_0,
        types::Q5_K => &types::Q5_1,
        types::Q6_K => &types::Q8_0,
        _ => &types::F16,
    };
    let fb = if row_len.is_multiple_of(32) {
        fallback
    } else {
        &types::F16
    };
    (
        fb.ty(),
        Some(format!(
            "rows of {row_len} are not a multiple of {block} for {}: {}",
            ty.name, fb.name
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outtype_round_trips_through_its_row() {
        for (i, &(out, name, base, _)) in OUT_TYPES.iter().enumerate() {
            assert_eq!(out as usize, i, "{name}: row out of declaration order");
            assert_eq!(name.parse::<OutType>(), Ok(out));
            assert_eq!((out.name(), out.base_type()), (name, base.ty()));
            assert_eq!(GgmlType::from_code(base.code), base.ty());
        }
    }

    #[test]
    fn more_bits_matches_llama_cpp_for_32_layers() {
        // llama.cpp: i < 4 || i >= 28 || (i - 4) % 3 == 2
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn fallbacks() {
        let ctx = PlanContext {
            n_layer: 30,
            n_gqa: 3,
            has_output: false,
        };
        let t = |out, role, row| choose_type(out, role, 2, row, Some(0), &ctx).0.to_string();
        assert_eq!(t(OutType::Q4KM, Role::Q, 576), "Q5_0");
        assert_eq!(t(OutType::Q4KM, Role::FfnDown, 1536), "Q6_K");
        assert_eq!(t(OutType::Q4KM, Role::Embedding, 576), "Q8_0");
        assert_eq!(t(OutType::Q4KM, Role::Embedding, 512), "Q6_K");
        assert_eq!(t(OutType::Q8_0, Role::Q, 48), "F16");
        assert_eq!(t(OutType::F16, Role::Norm, 576), "F32");
        assert_eq!(t(OutType::Q6K, Role::Q, 100), "F16");
    }
}
