//! Long-context evaluation: logits hand-off, perplexity by position, passkey, attention entropy,
//! and their plots.

pub mod entropy;
pub mod error;
pub mod logits;
pub mod npy;
pub mod open;
pub mod passkey;
pub mod plot;
pub mod ppl;

pub use error::EvalError;
pub use logits::{model_logits, LogitsInput};
pub use npy::{npy_header, write_npy};
pub use open::{open_dir, open_model, read_text, windows, Encoder, EvalModel, ModelDir};
