//! The Hugging Face <-> GGUF tensor-name map for LLaMA-family models, as one table of patterns
//! (`{bid}` is the block number). Source: llama.cpp gguf-py `tensor_mapping.py` (the LLaMA rows)
//! and `src/llama-arch.cpp` (`LLM_TENSOR_NAMES` for `LLM_ARCH_LLAMA`).

/// What a tensor is, for the rules that depend on it (permutation, type choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embedding,
    Output,
    Norm,
    Q,
    K,
    V,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
}

/// (Hugging Face pattern, GGUF pattern, role).
pub const TENSOR_MAP: &[(&str, &str, Role)] = &[
    (
        "model.embed_tokens.weight",
        "token_embd.weight",
        Role::Embedding,
    ),
    ("model.norm.weight", "output_norm.weight", Role::Norm),
    ("lm_head.weight", "output.weight", Role::Output),
    (
        "model.layers.{bid}.input_layernorm.weight",
        "blk.{bid}.attn_norm.weight",
        Role::Norm,
    ),
    (
        "model.layers.{bid}.self_attn.q_proj.weight",
        "blk.{bid}.attn_q.weight",
        Role::Q,
    ),
    (
        "model.layers.{bid}.self_attn.k_proj.weight",
        "blk.{bid}.attn_k.weight",
        Role::K,
    ),
    (
        "model.layers.{bid}.self_attn.v_proj.weight",
        "blk.{bid}.attn_v.weight",
        Role::V,
    ),
    (
        "model.layers.{bid}.self_attn.o_proj.weight",
        "blk.{bid}.attn_output.weight",
        Role::AttnOutput,
    ),
    (
        "model.layers.{bid}.post_attention_layernorm.weight",
        "blk.{bid}.ffn_norm.weight",
        Role::Norm,
    ),
    (
        "model.layers.{bid}.mlp.gate_proj.weight",
        "blk.{bid}.ffn_gate.weight",
        Role::FfnGate,
    ),
    (
        "model.layers.{bid}.mlp.up_proj.weight",
        "blk.{bid}.ffn_up.weight",
        Role::FfnUp,
    ),
    (
        "model.layers.{bid}.mlp.down_proj.weight",
        "blk.{bid}.ffn_down.weight",
        Role::FfnDown,
    ),
];

/// llama.cpp's Llama 3 frequency-factor tensor (no Hugging Face counterpart: it comes from the
/// recipe).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// Match `name` against `pattern`; returns the block number for `{bid}` patterns.
fn matches(pattern: &str, name: &str) -> Option<Option<usize>> {
    match pattern.split_once("{bid}") {
        None => (pattern == name).then_some(None),
        Some((pre, post)) => {
            let mid = name.strip_prefix(pre)?.strip_suffix(post)?;
            if mid.is_empty() || !mid.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // reject "007": block numbers are written without leading zeros
            if mid.len() > 1 && mid.starts_with('0') {
                return None;
            }
            mid.parse().ok().map(Some)
        }
    }
}

fn fill(pattern: &str, bid: Option<usize>) -> String {
    match bid {
        Some(b) => pattern.replace("{bid}", &b.to_string()),
        None => pattern.to_string(),
    }
}

/// The GGUF name, role and block of a Hugging Face tensor.
pub fn hf_to_gguf(name: &str) -> Option<(String, Role, Option<usize>)> {
    TENSOR_MAP
        .iter()
        .find_map(|(hf, gg, role)| matches(hf, name).map(|bid| (fill(gg, bid), *role, bid)))
}

/// The row of [`TENSOR_MAP`] a Hugging Face tensor matches.
pub fn hf_index(name: &str) -> Option<usize> {
    TENSOR_MAP
        .iter()
        .position(|(hf, _, _)| matches(hf, name).is_some())
}

/// The Hugging Face name, role and block of a GGUF tensor.
pub fn gguf_to_hf(name: &str) -> Option<(String, Role, Option<usize>)> {
    TENSOR_MAP
        .iter()
        .find_map(|(hf, gg, role)| matches(gg, name).map(|bid| (fill(hf, bid), *role, bid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways() {
        let (g, r, b) = hf_to_gguf("model.layers.12.self_attn.k_proj.weight").unwrap();
        assert_eq!(
            (g.as_str(), r, b),
            ("blk.12.attn_k.weight", Role::K, Some(12))
        );
        let (h, _, _) = gguf_to_hf(&g).unwrap();
        assert_eq!(h, "model.layers.12.self_attn.k_proj.weight");
        assert!(hf_to_gguf("model.layers.x.self_attn.k_proj.weight").is_none());
        assert!(hf_to_gguf("model.layers.01.self_attn.k_proj.weight").is_none());
        assert!(gguf_to_hf(ROPE_FREQS).is_none());
    }
}
