//! Which ggml type each tensor gets for an `--outtype`.
//!
//! Sources: llama.cpp `convert_hf_to_gguf.py` (f32/f16/bf16/q8_0: 1-D tensors and norms stay
//! F32, everything else takes the output type, a Q8_0 row that is not a multiple of 32 falls
//! back to F16) and `src/llama-quant.cpp` (`llama_tensor_get_type` for the other types: the
//! output head gets Q6_K, `attn_v`/`ffn_down`/`attn_output` upgrades per file type, and the
//! fallback for rows that are not a multiple of the block size). docs/convert.md lists the rules.

use std::str::FromStr;

use super::tensor_map::Role;
use crate::gguf::GgmlType;

/// The `--outtype` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q4KM,
    Q5KM,
}

/// (outtype, name, base ggml type code, llama.cpp `LLAMA_FTYPE_*` for `general.file_type`).
/// Plain k-quant names follow llama.cpp's small ("_S") mixes: q3_k = Q3_K_S (11),
/// q4_k = Q4_K_S (14), q5_k = Q5_K_S (16). Source: llama.cpp `include/llama.h` (`llama_ftype`).
pub const OUT_TYPES: &[(OutType, &str, u32, u32)] = &[
    (OutType::F32, "f32", 0, 0),
    (OutType::F16, "f16", 1, 1),
    (OutType::Bf16, "bf16", 30, 32),
    (OutType::Q8_0, "q8_0", 8, 7),
    (OutType::Q4_0, "q4_0", 2, 2),
    (OutType::Q4_1, "q4_1", 3, 3),
    (OutType::Q5_0, "q5_0", 6, 8),
    (OutType::Q5_1, "q5_1", 7, 9),
    (OutType::Q2K, "q2_k", 10, 10),
    (OutType::Q3K, "q3_k", 11, 11),
    (OutType::Q4K, "q4_k", 12, 14),
    (OutType::Q5K, "q5_k", 13, 16),
    (OutType::Q6K, "q6_k", 14, 18),
    (OutType::Q4KM, "q4_k_m", 12, 15),
    (OutType::Q5KM, "q5_k_m", 13, 17),
];

// ggml type codes used by the rules (gguf/types.rs)
const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q5_0: u32 = 6;
const Q5_1: u32 = 7;
const Q8_0: u32 = 8;
const Q2_K: u32 = 10;
const Q3_K: u32 = 11;
const Q4_K: u32 = 12;
const Q5_K: u32 = 13;
const Q6_K: u32 = 14;

impl OutType {
    fn row(self) -> &'static (OutType, &'static str, u32, u32) {
        OUT_TYPES
            .iter()
            .find(|r| r.0 == self)
            .unwrap_or(&OUT_TYPES[0])
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// The type most tensors get.
    pub fn base_type(self) -> GgmlType {
        GgmlType::from_code(self.row().2)
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
        return (GgmlType::from_code(F32), None);
    }
    let base = out.base_type().code();
    if out.is_float_or_q8() {
        // convert_hf_to_gguf: a Q8_0 tensor whose rows are not whole blocks is written as F16
        if base == Q8_0 && !row_len.is_multiple_of(32) {
            return (
                GgmlType::from_code(F16),
                Some(format!("rows of {row_len} are not a multiple of 32: F16")),
            );
        }
        return (GgmlType::from_code(base), None);
    }
    let is_head = role == Role::Output || (!ctx.has_output && role == Role::Embedding);
    let i = layer.unwrap_or(0);
    let n = ctx.n_layer;
    let mut ty = base;
    if is_head {
        // llama_tensor_get_type: the head gets Q6_K, or Q8_0 when its rows are not whole 256-blocks
        ty = if !row_len.is_multiple_of(256) {
            Q8_0
        } else {
            Q6_K
        };
    } else {
        match role {
            Role::V => match out {
                OutType::Q2K => ty = if ctx.n_gqa >= 4 { Q4_K } else { Q3_K },
                OutType::Q4KM | OutType::Q5KM if use_more_bits(i, n) => ty = Q6_K,
                OutType::Q4K if i < 4 => ty = Q5_K,
                _ => {}
            },
            Role::FfnDown => match out {
                OutType::Q2K => ty = Q3_K,
                OutType::Q4KM | OutType::Q5KM if use_more_bits(i, n) => ty = Q6_K,
                OutType::Q4K if i < n / 8 => ty = Q5_K,
                _ => {}
            },
            Role::AttnOutput if out == OutType::Q2K => ty = Q3_K,
            _ => {}
        }
    }
    // rows not a multiple of the block: llama.cpp's fallback table (Q2_K/Q3_K -> IQ4_NL, which
    // candle cannot write: we use Q4_0, the same size; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0),
    // then F16 when even that block does not divide the row
    let block = GgmlType::from_code(ty)
        .info()
        .map(|t| t.block_size)
        .unwrap_or(1);
    if row_len.is_multiple_of(block) {
        return (GgmlType::from_code(ty), None);
    }
    let fallback = match ty {
        Q2_K | Q3_K => Q4_0,
        Q4_K => Q5_0,
        Q5_K => Q5_1,
        Q6_K => Q8_0,
        _ => F16,
    };
    let fb = if row_len.is_multiple_of(32) {
        fallback
    } else {
        F16
    };
    let name = |c: u32| GgmlType::from_code(c).to_string();
    (
        GgmlType::from_code(fb),
        Some(format!(
            "rows of {row_len} are not a multiple of {block} for {}: {}",
            name(ty),
            name(fb)
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
