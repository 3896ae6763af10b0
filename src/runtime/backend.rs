//! One interface over everything that turns tokens into logits: our candle forward of a model
//! directory, our candle forward of a GGUF (the verifier's second implementation), and real
//! llama.cpp. The verifier and `abf-eval` are written against [`LogitsBackend`] only.

use candle_core::{DType, Device, Tensor};

use super::error::RuntimeError;
use crate::model::{Llama, Path as ForwardPath};

/// The row consumer of [`LogitsBackend::for_each_logits`]; its own errors travel as
/// [`RuntimeError::Consumer`] (see [`RuntimeError::consumer`]).
pub type RowFn<'a> = dyn FnMut(usize, &[f32]) -> Result<(), RuntimeError> + 'a;

/// Something that computes next-token logits at every position of a token sequence that starts
/// at position 0 (no cache between calls).
pub trait LogitsBackend {
    /// Short name for reports: `candle`, `candle-gguf`, `llama.cpp`.
    fn name(&self) -> &str;
    /// Width of a logits row.
    fn vocab_size(&self) -> usize;
    /// Hands the logits of each position (`vocab_size` f32 values) to `f`, in order of position.
    /// Rows are streamed so that a caller can keep summaries instead of `len x vocab` floats.
    fn for_each_logits(&mut self, tokens: &[u32], f: &mut RowFn) -> Result<(), RuntimeError>;

    /// All logits, row-major `[tokens.len() * vocab_size]`.
    fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        let vocab = self.vocab_size();
        let too_large = || RuntimeError::LogitsTooLarge {
            backend: self.name().to_string(),
            rows: tokens.len(),
            n_vocab: vocab,
        };
        let total = tokens.len().checked_mul(vocab).ok_or_else(too_large)?;
        let mut out = Vec::new();
        out.try_reserve_exact(total).map_err(|_| too_large())?;
        self.for_each_logits(tokens, &mut |_, row| {
            out.extend_from_slice(row);
            Ok(())
        })?;
        Ok(out)
    }
}

/// Our candle forward (fast path) of a loaded [`Llama`]; the head runs on `head_rows` positions
/// at a time so that a 16k-token pass never holds a full `len x vocab` logits tensor.
pub struct CandleBackend {
    model: Llama,
    name: String,
    head_rows: usize,
}

impl CandleBackend {
    pub fn new(model: Llama, name: impl Into<String>) -> CandleBackend {
        CandleBackend {
            model,
            name: name.into(),
            head_rows: 1024,
        }
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut Llama {
        &mut self.model
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }
}

impl LogitsBackend for CandleBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn for_each_logits(&mut self, tokens: &[u32], f: &mut RowFn) -> Result<(), RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::Empty {
                backend: self.name.clone(),
            });
        }
        let vocab = self.vocab_size();
        if let Some((pos, &token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(RuntimeError::OutOfVocab {
                backend: self.name.clone(),
                token,
                pos,
                n_vocab: vocab,
            });
        }
        let forward = |source| RuntimeError::Forward {
            backend: self.name.clone(),
            source,
        };
        self.stream(tokens, f, vocab).map_err(|e| match e {
            Streamed::Candle(e) => forward(e),
            Streamed::Consumer(e) => e,
        })
    }
}

/// An error while streaming rows: candle's own, or the consumer's (passed through).
enum Streamed {
    Candle(candle_core::Error),
    Consumer(RuntimeError),
}

impl From<candle_core::Error> for Streamed {
    fn from(e: candle_core::Error) -> Self {
        Streamed::Candle(e)
    }
}

impl CandleBackend {
    fn stream(&self, tokens: &[u32], f: &mut RowFn, vocab: usize) -> Result<(), Streamed> {
        let m = &self.model;
        let input = Tensor::new(tokens, m.device())?.unsqueeze(0)?;
        let mut x = m.embed(&input)?;
        let pos = m.positions(0, tokens.len())?;
        for i in 0..m.config().num_hidden_layers {
            x = m.layer(i, &x, &pos, ForwardPath::Fast)?;
        }
        let mut start = 0;
        while start < tokens.len() {
            let rows = self.head_rows.min(tokens.len() - start);
            let chunk = x.narrow(1, start, rows)?;
            let logits = m
                .head(&chunk, ForwardPath::Fast)?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (r, row) in logits.chunks_exact(vocab).enumerate() {
                f(start + r, row).map_err(Streamed::Consumer)?;
            }
            start += rows;
        }
        Ok(())
    }
}

#[cfg(feature = "llamacpp")]
mod llama_cpp_backend {
    use super::{LogitsBackend, RowFn};
    use crate::runtime::{LlamaCpp, RuntimeError};

    /// Real llama.cpp with a fresh context of exactly the sequence's length.
    impl LogitsBackend for LlamaCpp {
        fn name(&self) -> &str {
            "llama.cpp"
        }

        fn vocab_size(&self) -> usize {
            self.n_vocab()
        }

        fn for_each_logits(&mut self, tokens: &[u32], f: &mut RowFn) -> Result<(), RuntimeError> {
            let mut err = None;
            LlamaCpp::for_each_logits(self, tokens, tokens.len().max(1), |i, row| {
                if err.is_none() {
                    if let Err(e) = f(i, row) {
                        err = Some(e);
                    }
                }
            })?;
            err.map_or(Ok(()), Err)
        }
    }
}
