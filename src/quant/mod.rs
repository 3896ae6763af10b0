//! Quantization and dequantization of ggml block types, spread over every core.

mod codec;
mod error;
mod q8_0;

pub use codec::{
    dequantize, dequantize_into, dequantize_sequential, is_supported, quantize, quantize_into,
    quantize_sequential, quantize_weighted, quantize_weighted_sequential, quantized_size,
    supported_types, supports_weights,
};
pub use error::QuantError;
