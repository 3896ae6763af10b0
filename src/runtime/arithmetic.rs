//! What a runtime rounds a matmul's activations to, per weight type: the consistency reference
//! of the verifier rounds the same way, so that comparing a runtime with our forward of the same
//! weights leaves only f32 reordering, not the runtime's 8-bit activations.
//!
//! Source: ggml-cpu `type_traits_cpu[type].vec_dot_type` (ggml/src/ggml-cpu/ggml-cpu.c): f32
//! against f32; f16 and bf16 weights against activations converted to f16/bf16; q4_0, q5_0 and
//! q8_0 against q8_0; q4_1 and q5_1 against q8_1 (the same values as q8_0 plus a block sum);
//! the k-quants against q8_K (256-element blocks).

use std::collections::HashMap;

use crate::convert::gguf_to_hf;
use crate::gguf::{types, GgmlType, GgufFile};
use crate::model::ActRound;

use super::BackendKind;

/// The activation type llama.cpp's CPU backend multiplies a weight of type `weight` with; None
/// when the activations stay f32 (f32 weights, or a type this table does not know).
pub fn llamacpp_activation_type(weight: GgmlType) -> ActRound {
    let c = weight.code();
    let t = |x: &types::TypeInfo| x.code == c;
    if t(&types::F16) {
        Some(types::F16.ty())
    } else if t(&types::BF16) {
        Some(types::BF16.ty())
    } else if t(&types::Q4_0)
        || t(&types::Q4_1)
        || t(&types::Q5_0)
        || t(&types::Q5_1)
        || t(&types::Q8_0)
    {
        Some(types::Q8_0.ty())
    } else if t(&types::Q2_K)
        || t(&types::Q3_K)
        || t(&types::Q4_K)
        || t(&types::Q5_K)
        || t(&types::Q6_K)
    {
        Some(types::Q8_K.ty())
    } else {
        None
    }
}

/// For each weight of `file` (by Hugging Face name), what `kind` rounds its matmul's
/// activations to: nothing for our candle reading (f32 throughout), ggml-cpu's rule for
/// llama.cpp.
pub fn activation_rounding(file: &GgufFile, kind: BackendKind) -> HashMap<String, GgmlType> {
    if kind == BackendKind::Candle {
        return HashMap::new();
    }
    file.tensors
        .iter()
        .filter_map(|t| {
            let (hf, _, _) = gguf_to_hf(&t.name)?;
            Some((hf, llamacpp_activation_type(t.ggml_type)?))
        })
        .collect()
}
