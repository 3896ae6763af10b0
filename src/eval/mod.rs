//! Long-context evaluation: logits hand-off, perplexity by position, passkey, attention entropy,
//! and their plots. Models and tokenizers open through `abf::runtime` (`open_model`, `open_dir`,
//! `Encoder`).

pub mod entropy;
pub mod error;
pub mod logits;
pub mod npy;
pub mod passkey;
pub mod plot;
pub mod ppl;
pub mod text;

pub use error::EvalError;
pub use logits::model_logits;
pub use npy::{npy_header, write_npy};
pub use text::{read_text, windows};
