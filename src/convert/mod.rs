//! Conversion pipelines: checkpoint to GGUF (`to_gguf`) and back (`from_gguf`).
//!
//! The pieces are data and small pure functions: the HF <-> GGUF tensor-name table
//! (`tensor_map`), the q/k row permutation for llama.cpp's interleaved RoPE (`permute`), the
//! per-tensor type choice (`quant_plan`) and the tokenizer.json <-> `tokenizer.ggml.*` mapping
//! (`tokenizer_gguf`). docs/convert.md describes the rules and where each comes from.

pub mod error;
pub mod from_gguf;
pub mod multi;
pub mod numeric;
pub mod permute;
pub mod quant_plan;
pub mod tensor_map;
pub mod to_gguf;
pub mod tokenizer_gguf;

pub use error::ConvertError;
pub use from_gguf::{
    from_gguf, read_hf_tensors, read_hparams, read_rope_freqs, FromGgufOptions, FromGgufReport,
    GgufHparams, HfTensors, OutDtype,
};
pub use multi::{one_pass_budget, write_many, Output};
pub use permute::{permute_qk, unpermute_qk};
pub use quant_plan::{OutType, PlanContext};
pub use tensor_map::{gguf_to_hf, hf_to_gguf, Role, TENSOR_MAP};
pub use to_gguf::{
    plan_to_gguf, write_gguf, write_gguf_split, ImportanceWeights, Plan, PlannedTensor,
    ToGgufOptions, ToGgufReport,
};
