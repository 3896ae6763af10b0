//! One interface over everything that turns tokens into logits: our candle forward of a model
//! directory, our candle forward of a GGUF (the verifier's second implementation), and real
//! llama.cpp. The verifier and `abf-eval` are written against [`LogitsBackend`] only.

use candle_core::{DType, Device, Tensor};

use crate::model::{Llama, Path as ForwardPath};

/// Something that computes next-token logits at every position of a token sequence that starts
/// at position 0 (no cache between calls).
pub trait LogitsBackend {
    /// Short name for reports: `candle`, `candle-gguf`, `llama.cpp`.
    fn name(&self) -> &str;
    /// Width of a logits row.
    fn vocab_size(&self) -> usize;
    /// Hands the logits of each position (`vocab_size` f32 values) to `f`, in order of position.
    /// Rows are streamed so that a caller can keep summaries instead of `len x vocab` floats.
    fn for_each_logits(
        &mut self,
        tokens: &[u32],
        f: &mut dyn FnMut(usize, &[f32]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;

    /// All logits, row-major `[tokens.len() * vocab_size]`.
    fn logits(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        let vocab = self.vocab_size();
        let total = tokens
            .len()
            .checked_mul(vocab)
            .ok_or_else(|| anyhow::anyhow!("{} x {vocab} logits overflow", tokens.len()))?;
        let mut out = Vec::new();
        out.try_reserve_exact(total).map_err(|_| {
            anyhow::anyhow!(
                "{} x {vocab} f32 logits ({:.1} GB) do not fit in memory",
                tokens.len(),
                total as f64 * 4e-9
            )
        })?;
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

    fn for_each_logits(
        &mut self,
        tokens: &[u32],
        f: &mut dyn FnMut(usize, &[f32]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(!tokens.is_empty(), "no tokens to run");
        let vocab = self.vocab_size();
        if let Some((pos, bad)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            anyhow::bail!("token {bad} at position {pos} is outside the vocabulary of {vocab}");
        }
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
                f(start + r, row)?;
            }
            start += rows;
        }
        Ok(())
    }
}

#[cfg(feature = "llamacpp")]
mod llama_cpp_backend {
    use super::LogitsBackend;
    use crate::runtime::LlamaCpp;

    /// Real llama.cpp with a fresh context of exactly the sequence's length.
    impl LogitsBackend for LlamaCpp {
        fn name(&self) -> &str {
            "llama.cpp"
        }

        fn vocab_size(&self) -> usize {
            self.n_vocab()
        }

        fn for_each_logits(
            &mut self,
            tokens: &[u32],
            f: &mut dyn FnMut(usize, &[f32]) -> anyhow::Result<()>,
        ) -> anyhow::Result<()> {
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
