//! The model's shape and recipe, validated once from config.json.
//!
//! (Skeleton: the parser of config.json is filled in by the checkpoint work; the struct is the
//! contract the model, converter and trainer build on.)

use crate::rope::Recipe;

/// Model families read from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Llama,
    Mistral,
    /// Ministral 3 text model: LLaMA-shaped, with the step scale law on every layer.
    Ministral3,
}

/// A validated LLaMA-family configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: u64,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The context-extension recipe this model runs with.
    pub recipe: Recipe,
}
