//! Helpers shared by the integration tests: one tiny-model builder ([`model::TinyModel`]), one
//! binary runner ([`bin::run`]), one child-process measurement ([`child::measure`]), the fetched real model and the skip-or-fail rule ([`data`]),
//! the f64 oracle of the forward ([`oracle`]), one seeded generator ([`rng::Rng`]), the test tokenizers ([`tokenizer`]) and the toy layered
//! model of the recomputation tests ([`toy::Toy`]). Every test file declares `mod common;`.
#![allow(dead_code, unused_imports)]

pub mod bin;
pub mod child;
pub mod data;
pub mod model;
pub mod oracle;
pub mod rng;
pub mod svg;
pub mod tokenizer;
pub mod toy;

pub use data::{root, smollm_gguf};
