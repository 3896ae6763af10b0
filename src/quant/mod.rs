//! Quantization and dequantization of ggml block types, spread over every core.
