//! Quantization and dequantization of ggml block types, spread over every core.

mod codec;
mod error;

pub use codec::{
    dequantize, dequantize_into, dequantize_sequential, is_supported, quantize, quantize_into,
    quantize_sequential, quantized_size, supported_types,
};
pub use error::QuantError;
