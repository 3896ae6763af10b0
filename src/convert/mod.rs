//! Conversion pipelines: checkpoint to GGUF and back.
