//! ggml tensor types: code, name, block size (elements) and bytes per block, in one table.
//! Source: ggml's `ggml.h` / `ggml.c` type traits and gguf-py `constants.py` (`GGML_QUANT_SIZES`).

use std::fmt;

/// A ggml tensor type code as stored in a GGUF tensor info. Codes this table does not know
/// are kept as they are (`GgmlType::Unknown`) so files can be carried through byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    Known(&'static TypeInfo),
    Unknown(u32),
}

/// One row of the type table.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TypeInfo {
    pub code: u32,
    pub name: &'static str,
    /// Elements per block.
    pub block_size: u64,
    /// Bytes per block.
    pub type_size: u64,
}

impl TypeInfo {
    /// This row as a [`GgmlType`]: `types::Q4_K.ty()`.
    pub const fn ty(&'static self) -> GgmlType {
        GgmlType::Known(self)
    }
}

macro_rules! types {
    ($($konst:ident = $code:literal, $name:literal, $bs:literal, $ts:literal;)*) => {
        $(pub const $konst: TypeInfo = TypeInfo { code: $code, name: $name, block_size: $bs, type_size: $ts };)*
        /// Every known type, by code.
        pub static TYPES: &[TypeInfo] = &[$($konst),*];
    };
}

types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 18;
    Q4_1 = 3, "Q4_1", 32, 20;
    Q5_0 = 6, "Q5_0", 32, 22;
    Q5_1 = 7, "Q5_1", 32, 24;
    Q8_0 = 8, "Q8_0", 32, 34;
    Q8_1 = 9, "Q8_1", 32, 36;
    Q2_K = 10, "Q2_K", 256, 84;
    Q3_K = 11, "Q3_K", 256, 110;
    Q4_K = 12, "Q4_K", 256, 144;
    Q5_K = 13, "Q5_K", 256, 176;
    Q6_K = 14, "Q6_K", 256, 210;
    Q8_K = 15, "Q8_K", 256, 292;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66;
    IQ2_XS = 17, "IQ2_XS", 256, 74;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98;
    IQ1_S = 19, "IQ1_S", 256, 50;
    IQ4_NL = 20, "IQ4_NL", 32, 18;
    IQ3_S = 21, "IQ3_S", 256, 110;
    IQ2_S = 22, "IQ2_S", 256, 82;
    IQ4_XS = 23, "IQ4_XS", 256, 136;
    I8 = 24, "I8", 1, 1;
    I16 = 25, "I16", 1, 2;
    I32 = 26, "I32", 1, 4;
    I64 = 27, "I64", 1, 8;
    F64 = 28, "F64", 1, 8;
    IQ1_M = 29, "IQ1_M", 256, 56;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", 256, 54;
    TQ2_0 = 35, "TQ2_0", 256, 66;
    MXFP4 = 39, "MXFP4", 32, 17;
}

impl GgmlType {
    pub fn from_code(code: u32) -> GgmlType {
        TYPES
            .iter()
            .find(|t| t.code == code)
            .map(GgmlType::Known)
            .unwrap_or(GgmlType::Unknown(code))
    }

    /// Look a type up by name, case-insensitively (`q4_k`, `Q8_0`, `bf16`).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TYPES
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
            .map(GgmlType::Known)
    }

    pub fn code(&self) -> u32 {
        match self {
            GgmlType::Known(t) => t.code,
            GgmlType::Unknown(c) => *c,
        }
    }

    pub fn info(&self) -> Option<&'static TypeInfo> {
        match self {
            GgmlType::Known(t) => Some(t),
            GgmlType::Unknown(_) => None,
        }
    }

    /// Bytes of a tensor with `elements` elements, or None for an unknown type, a count that is
    /// not a whole number of blocks, or an overflow.
    pub fn byte_size(&self, elements: u64) -> Option<u64> {
        let t = self.info()?;
        if !elements.is_multiple_of(t.block_size) {
            return None;
        }
        (elements / t.block_size).checked_mul(t.type_size)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Known(t) => f.write_str(t.name),
            GgmlType::Unknown(c) => write!(f, "unknown type {c}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_code_and_name() {
        for t in TYPES {
            assert_eq!(GgmlType::from_code(t.code), t.ty());
            assert_eq!(GgmlType::from_name(t.name), Some(t.ty()));
            assert_eq!(GgmlType::from_name(&t.name.to_lowercase()), Some(t.ty()));
            assert_eq!(t.ty().byte_size(t.block_size), Some(t.type_size));
        }
        assert_eq!(GgmlType::from_code(5), GgmlType::Unknown(5));
        assert_eq!(GgmlType::from_name("Q4_K_M"), None);
    }
}
