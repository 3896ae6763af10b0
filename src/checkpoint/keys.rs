//! config.json keys abf reads and writes, one table (as `gguf::keys` is for GGUF). Names are
//! transformers' (`configuration_llama.py`, `modeling_rope_utils.py`, `configuration_ministral3.py`).

pub const MODEL_TYPE: &str = "model_type";
pub const ARCHITECTURES: &str = "architectures";
pub const VOCAB_SIZE: &str = "vocab_size";
pub const HIDDEN_SIZE: &str = "hidden_size";
pub const INTERMEDIATE_SIZE: &str = "intermediate_size";
pub const NUM_HIDDEN_LAYERS: &str = "num_hidden_layers";
pub const NUM_ATTENTION_HEADS: &str = "num_attention_heads";
pub const NUM_KEY_VALUE_HEADS: &str = "num_key_value_heads";
pub const HEAD_DIM: &str = "head_dim";
pub const RMS_NORM_EPS: &str = "rms_norm_eps";
pub const TIE_WORD_EMBEDDINGS: &str = "tie_word_embeddings";
pub const MAX_POSITION_EMBEDDINGS: &str = "max_position_embeddings";
pub const BOS_TOKEN_ID: &str = "bos_token_id";
pub const EOS_TOKEN_ID: &str = "eos_token_id";
pub const SLIDING_WINDOW: &str = "sliding_window";
pub const HIDDEN_ACT: &str = "hidden_act";
pub const ATTENTION_BIAS: &str = "attention_bias";
pub const MLP_BIAS: &str = "mlp_bias";
pub const TORCH_DTYPE: &str = "torch_dtype";
pub const NAME_OR_PATH: &str = "_name_or_path";

/// transformers 4: top-level base and scaling object.
pub const ROPE_THETA: &str = "rope_theta";
pub const ROPE_SCALING: &str = "rope_scaling";
/// transformers 5: one object with the base and the scaling fields.
pub const ROPE_PARAMETERS: &str = "rope_parameters";

/// Fields inside `rope_scaling` / `rope_parameters`.
pub mod rope {
    pub const ROPE_TYPE: &str = "rope_type";
    /// The older spelling of `rope_type`.
    pub const TYPE: &str = "type";
    pub const FACTOR: &str = "factor";
    pub const ORIGINAL_MAX_POSITION_EMBEDDINGS: &str = "original_max_position_embeddings";
    pub const BETA_FAST: &str = "beta_fast";
    pub const BETA_SLOW: &str = "beta_slow";
    pub const ATTENTION_FACTOR: &str = "attention_factor";
    pub const MSCALE: &str = "mscale";
    pub const MSCALE_ALL_DIM: &str = "mscale_all_dim";
    pub const TRUNCATE: &str = "truncate";
    pub const LOW_FREQ_FACTOR: &str = "low_freq_factor";
    pub const HIGH_FREQ_FACTOR: &str = "high_freq_factor";
    /// ministral3's step law beta (its L is `original_max_position_embeddings`).
    pub const LLAMA_4_SCALING_BETA: &str = "llama_4_scaling_beta";
}

/// transformers' rope types (`rope_type`) abf reads and writes.
/// Plain RoPE (transformers' default when none is given).
pub const DEFAULT_ROPE_TYPE: &str = "default";
pub const LINEAR_ROPE_TYPE: &str = "linear";
pub const DYNAMIC_ROPE_TYPE: &str = "dynamic";
pub const YARN_ROPE_TYPE: &str = "yarn";
pub const LLAMA3_ROPE_TYPE: &str = "llama3";

/// Each rope type with the method it is read as.
pub const ROPE_TYPES: &[(&str, crate::rope::RopeMethod)] = &[
    (DEFAULT_ROPE_TYPE, crate::rope::RopeMethod::Default),
    (LINEAR_ROPE_TYPE, crate::rope::RopeMethod::Linear),
    (DYNAMIC_ROPE_TYPE, crate::rope::RopeMethod::Dynamic),
    (YARN_ROPE_TYPE, crate::rope::RopeMethod::Yarn),
    (LLAMA3_ROPE_TYPE, crate::rope::RopeMethod::Llama3),
];

/// The rope type spelled `name`, if abf reads it.
pub fn rope_type(name: &str) -> Option<crate::rope::RopeMethod> {
    ROPE_TYPES.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
}
