//! The GGUF key table: every key abf reads or writes, with the value type llama.cpp requires.
//! Sources: llama.cpp `src/llama-arch.cpp` (`LLM_KV_NAMES`), `src/llama-model.cpp` (`get_key` calls)
//! and gguf-py `constants.py`. Callers use the typed accessors here, never key literals.

use super::error::GgufError;
use super::metadata::Metadata;
use super::value::{Value, ValueType};

// general.*
pub const GENERAL_ARCHITECTURE: &str = "general.architecture";
pub const GENERAL_NAME: &str = "general.name";
pub const GENERAL_FILE_TYPE: &str = "general.file_type";
pub const GENERAL_ALIGNMENT: &str = "general.alignment";
pub const GENERAL_QUANTIZATION_VERSION: &str = "general.quantization_version";
/// What a GGUF holds when it is not a model (llama.cpp's imatrix writer sets `"imatrix"`).
pub const GENERAL_TYPE: &str = "general.type";

/// Default `general.alignment` (ggml `GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Default `{arch}.rope.freq_base` when the key is absent (llama.cpp `llama_hparams`).
pub const DEFAULT_FREQ_BASE: f64 = 10_000.0;

/// The architecture llama-family files use, and the one whose graph applies the step law.
pub const ARCH_LLAMA: &str = "llama";
pub const ARCH_MISTRAL3: &str = "mistral3";

/// Declares [`ArchKey`] and its table from one list, so every key has exactly one row and a row
/// is found by indexing with the key.
macro_rules! arch_keys {
    ($($variant:ident = $suffix:literal, $ty:ident;)*) => {
        /// `{arch}.*` keys: (key, suffix, type).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ArchKey {
            $($variant),*
        }

        /// The `{arch}.` key table: suffix and the type llama.cpp requires, in declaration
        /// order: row `i` is key `i`.
        pub const ARCH_KEYS: &[(ArchKey, &str, ValueType)] =
            &[$((ArchKey::$variant, $suffix, ValueType::$ty)),*];
    };
}

arch_keys! {
    ContextLength = "context_length", U32;
    EmbeddingLength = "embedding_length", U32;
    BlockCount = "block_count", U32;
    FeedForwardLength = "feed_forward_length", U32;
    HeadCount = "attention.head_count", U32;
    HeadCountKv = "attention.head_count_kv", U32;
    LayerNormRmsEpsilon = "attention.layer_norm_rms_epsilon", F32;
    RopeDimensionCount = "rope.dimension_count", U32;
    VocabSize = "vocab_size", U32;
    RopeFreqBase = "rope.freq_base", F32;
    RopeScalingType = "rope.scaling.type", String;
    RopeScalingFactor = "rope.scaling.factor", F32;
    RopeScalingOriginalContextLength = "rope.scaling.original_context_length", U32;
    RopeScalingAttnFactor = "rope.scaling.attn_factor", F32;
    RopeScalingYarnBetaFast = "rope.scaling.yarn_beta_fast", F32;
    RopeScalingYarnBetaSlow = "rope.scaling.yarn_beta_slow", F32;
    AttentionTemperatureScale = "attention.temperature_scale", F32;
}

/// The rope/scaling keys a recipe owns: `apply_recipe` removes those it does not write.
pub const RECIPE_ARCH_KEYS: &[ArchKey] = &[
    ArchKey::RopeScalingType,
    ArchKey::RopeScalingFactor,
    ArchKey::RopeScalingOriginalContextLength,
    ArchKey::RopeScalingAttnFactor,
    ArchKey::RopeScalingYarnBetaFast,
    ArchKey::RopeScalingYarnBetaSlow,
    ArchKey::AttentionTemperatureScale,
];

/// `{arch}.rope.scaling.type` values llama.cpp knows (`LLAMA_ROPE_SCALING_TYPES`).
pub const SCALING_NONE: &str = "none";
pub const SCALING_LINEAR: &str = "linear";
pub const SCALING_YARN: &str = "yarn";

/// `tokenizer.ggml.*` and related keys (llama.cpp `llama-vocab.cpp`).
pub mod tokenizer {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_TOKEN_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_TOKEN_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const UNKNOWN_TOKEN_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const PADDING_TOKEN_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS_TOKEN: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS_TOKEN: &str = "tokenizer.ggml.add_eos_token";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// llama.cpp's importance-matrix files (`common/imatrix-loader.h`, `tools/imatrix/imatrix.cpp`):
/// keys, the `general.type` value, and the tensor-name suffixes after the weight's GGUF name.
pub mod imatrix {
    pub const GENERAL_TYPE_IMATRIX: &str = "imatrix";
    /// Array of strings: the calibration texts.
    pub const DATASETS: &str = "imatrix.datasets";
    /// u32: chunks evaluated.
    pub const CHUNK_COUNT: &str = "imatrix.chunk_count";
    /// u32: tokens per chunk.
    pub const CHUNK_SIZE: &str = "imatrix.chunk_size";
    /// F32 `[n_per_row, n_mat]`: per input column, the sum of squared activations.
    pub const SUFFIX_IN_SUM2: &str = ".in_sum2";
    /// F32 `[1, n_mat]`: activation rows summed.
    pub const SUFFIX_COUNTS: &str = ".counts";
}

/// `split.*`: the keys of a split set (llama.cpp `LLM_KV_SPLIT_*`, gguf-split). Every part carries
/// all three; llama.cpp reads them with these exact types.
pub mod split {
    use super::ValueType;

    /// The part's index, 0-based.
    pub const NO: &str = "split.no";
    /// How many parts the set has.
    pub const COUNT: &str = "split.count";
    /// Tensors over all parts.
    pub const TENSORS_COUNT: &str = "split.tensors.count";
    /// The keys and the types llama.cpp requires (`uint16_t`, `uint16_t`, `int`).
    pub const KEYS: [(&str, ValueType); 3] = [
        (NO, ValueType::U16),
        (COUNT, ValueType::U16),
        (TENSORS_COUNT, ValueType::I32),
    ];
    /// The prefix every split key starts with.
    pub const PREFIX: &str = "split.";
}

impl ArchKey {
    fn row(self) -> &'static (ArchKey, &'static str, ValueType) {
        &ARCH_KEYS[self as usize]
    }

    pub fn suffix(self) -> &'static str {
        self.row().1
    }

    pub fn value_type(self) -> ValueType {
        self.row().2
    }

    /// The full key for an architecture: `llama.rope.freq_base`.
    pub fn key(self, arch: &str) -> String {
        format!("{arch}.{}", self.suffix())
    }

    /// The key whose full name is `key` for `arch`, if it is in the table.
    pub fn parse(arch: &str, key: &str) -> Option<ArchKey> {
        let suffix = key.strip_prefix(arch)?.strip_prefix('.')?;
        ARCH_KEYS.iter().find(|r| r.1 == suffix).map(|r| r.0)
    }
}

/// The type llama.cpp requires for a key, when the table knows it.
pub fn required_type(meta_arch: Option<&str>, key: &str) -> Option<ValueType> {
    match key {
        GENERAL_ALIGNMENT | GENERAL_FILE_TYPE | GENERAL_QUANTIZATION_VERSION => {
            return Some(ValueType::U32)
        }
        GENERAL_ARCHITECTURE | GENERAL_NAME | GENERAL_TYPE => return Some(ValueType::String),
        imatrix::CHUNK_COUNT | imatrix::CHUNK_SIZE => return Some(ValueType::U32),
        split::NO | split::COUNT => return Some(ValueType::U16),
        split::TENSORS_COUNT => return Some(ValueType::I32),
        _ => {}
    }
    let arch = meta_arch?;
    ArchKey::parse(arch, key).map(ArchKey::value_type)
}

fn to_u32(key: &str, v: u64) -> Result<u32, GgufError> {
    u32::try_from(v).map_err(|_| GgufError::BadValue {
        key: key.to_string(),
        value: v.to_string(),
        reason: "does not fit the u32 llama.cpp requires".to_string(),
    })
}

/// Typed access to the table's keys.
impl Metadata {
    /// `general.architecture`.
    pub fn architecture(&self) -> Result<Option<&str>, GgufError> {
        self.get_str(GENERAL_ARCHITECTURE)
    }

    pub fn set_architecture(&mut self, arch: &str) {
        self.set(GENERAL_ARCHITECTURE, Value::string(arch));
    }

    /// `general.alignment`: a u32 power of two, 32 when absent.
    pub fn alignment(&self) -> Result<u64, GgufError> {
        match self.get_u32(GENERAL_ALIGNMENT)? {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(a) if a.is_power_of_two() => Ok(a as u64),
            Some(a) => Err(GgufError::BadAlignment { value: a as u64 }),
        }
    }

    pub fn set_alignment(&mut self, alignment: u32) -> Result<(), GgufError> {
        if !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment {
                value: alignment as u64,
            });
        }
        self.set(GENERAL_ALIGNMENT, Value::U32(alignment));
        Ok(())
    }

    /// An `{arch}.` key, checked against the type the table requires.
    pub fn get_arch(&self, arch: &str, key: ArchKey) -> Result<Option<&Value>, GgufError> {
        self.get_typed(&key.key(arch), key.value_type())
    }

    pub fn arch_u32(&self, arch: &str, key: ArchKey) -> Result<Option<u32>, GgufError> {
        Ok(self
            .get_arch(arch, key)?
            .and_then(Value::as_u64)
            .map(|x| x as u32))
    }

    pub fn arch_f32(&self, arch: &str, key: ArchKey) -> Result<Option<f32>, GgufError> {
        Ok(match self.get_arch(arch, key)? {
            Some(Value::F32(x)) => Some(*x),
            _ => None,
        })
    }

    pub fn arch_str(&self, arch: &str, key: ArchKey) -> Result<Option<&str>, GgufError> {
        self.get_arch(arch, key)?;
        self.get_str(&key.key(arch))
    }

    /// Set an `{arch}.` key from a number, converted to the type the table requires.
    pub fn set_arch_number(&mut self, arch: &str, key: ArchKey, v: f64) -> Result<(), GgufError> {
        let name = key.key(arch);
        let value = match key.value_type() {
            ValueType::U32 => {
                if !(v >= 0.0 && v.fract() == 0.0) {
                    return Err(GgufError::BadValue {
                        key: name,
                        value: v.to_string(),
                        reason: "expected a non-negative integer".to_string(),
                    });
                }
                Value::U32(to_u32(&name, v as u64)?)
            }
            ValueType::F32 => {
                let x = v as f32;
                if !x.is_finite() {
                    return Err(GgufError::BadValue {
                        key: name,
                        value: v.to_string(),
                        reason: "not a finite f32".to_string(),
                    });
                }
                Value::F32(x)
            }
            other => {
                return Err(GgufError::KeyWrongType {
                    key: name,
                    expected: other.name().to_string(),
                    found: "number".to_string(),
                })
            }
        };
        self.set(name, value);
        Ok(())
    }

    pub fn set_context_length(&mut self, arch: &str, n: u64) -> Result<(), GgufError> {
        self.set_arch_number(arch, ArchKey::ContextLength, n as f64)
    }

    pub fn set_rope_freq_base(&mut self, arch: &str, base: f64) -> Result<(), GgufError> {
        self.set_arch_number(arch, ArchKey::RopeFreqBase, base)
    }

    pub fn set_rope_scaling_type(&mut self, arch: &str, ty: &str) {
        self.set(ArchKey::RopeScalingType.key(arch), Value::string(ty));
    }

    pub fn set_rope_scaling_factor(&mut self, arch: &str, s: f64) -> Result<(), GgufError> {
        self.set_arch_number(arch, ArchKey::RopeScalingFactor, s)
    }

    pub fn set_rope_scaling_original_context(
        &mut self,
        arch: &str,
        n: u64,
    ) -> Result<(), GgufError> {
        self.set_arch_number(arch, ArchKey::RopeScalingOriginalContextLength, n as f64)
    }

    pub fn set_rope_scaling_attn_factor(&mut self, arch: &str, a: f64) -> Result<(), GgufError> {
        self.set_arch_number(arch, ArchKey::RopeScalingAttnFactor, a)
    }

    pub fn set_attention_temperature_scale(
        &mut self,
        arch: &str,
        beta: f64,
    ) -> Result<(), GgufError> {
        self.set_arch_number(arch, ArchKey::AttentionTemperatureScale, beta)
    }

    /// Set any `{arch}.` U32 key (block_count, head counts, ...).
    pub fn set_arch_u32(&mut self, arch: &str, key: ArchKey, v: u64) -> Result<(), GgufError> {
        self.set_arch_number(arch, key, v as f64)
    }

    /// Rename the architecture: `general.architecture` and every `{old}.` key, order kept.
    pub fn rename_arch(&mut self, new: &str) -> Result<Option<String>, GgufError> {
        let Some(old) = self.architecture()?.map(str::to_string) else {
            return Err(GgufError::MissingKey {
                key: GENERAL_ARCHITECTURE.to_string(),
            });
        };
        if old == new {
            return Ok(Some(old));
        }
        let prefix = format!("{old}.");
        let renames: Vec<(String, String)> = self
            .keys()
            .filter_map(|k| {
                k.strip_prefix(&prefix)
                    .map(|rest| (k.to_string(), format!("{new}.{rest}")))
            })
            .collect();
        for (from, to) in renames {
            self.rename(&from, to)?;
        }
        self.set_architecture(new);
        Ok(Some(old))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_arch_key_round_trips_through_its_row() {
        for (i, &(key, suffix, ty)) in ARCH_KEYS.iter().enumerate() {
            assert_eq!(key as usize, i, "{suffix}: row out of declaration order");
            assert_eq!((key.suffix(), key.value_type()), (suffix, ty));
            let full = key.key(ARCH_LLAMA);
            assert_eq!(ArchKey::parse(ARCH_LLAMA, &full), Some(key));
            assert_eq!(required_type(Some(ARCH_LLAMA), &full), Some(ty));
        }
    }
}
