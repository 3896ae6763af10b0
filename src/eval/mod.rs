//! Long-context evaluation: logits hand-off, perplexity by position, passkey, attention entropy.

pub mod logits;
pub mod npy;

pub use logits::{model_logits, LogitsInput};
pub use npy::{npy_header, write_npy};
