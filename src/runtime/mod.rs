//! Real runtimes: llama.cpp through the llama-cpp-2 crate (feature `llamacpp`).
