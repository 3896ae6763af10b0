//! llama.cpp (CPU) through `llama-cpp-2`: load a GGUF, tokenize, and compute logits at every
//! position with an f32 KV cache, which is what a logits verifier compares.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{send_logs_to_tracing, LogOptions};

use super::error::RuntimeError;

/// `llama_flash_attn_type::LLAMA_FLASH_ATTN_TYPE_DISABLED` (llama.h). The plain attention path
/// multiplies f32 K/V in f32; with flash attention the CPU kernel may round Q to the K type.
const FLASH_ATTN_DISABLED: i32 = 0;
const FLASH_ATTN_ENABLED: i32 = 1;

/// llama.cpp's backend is process-wide and `LlamaBackend::init` fails on a second call, so every
/// `LlamaCpp` in the process shares this one, initialised on first use.
static BACKEND: OnceLock<Result<LlamaBackend, llama_cpp_2::LlamaCppError>> = OnceLock::new();

/// `llama_new_context_with_model` may write to the model (llama-cpp-2 notes it as unsound when
/// concurrent), so contexts are created one at a time.
static CONTEXT_LOCK: Mutex<()> = Mutex::new(());

fn backend() -> Result<&'static LlamaBackend, RuntimeError> {
    BACKEND
        .get_or_init(|| {
            // Route llama.cpp's and ggml's logging (very chatty at load) to `tracing`, under the
            // target `llama-cpp-2`; with no subscriber it is dropped.
            send_logs_to_tracing(LogOptions::default());
            LlamaBackend::init()
        })
        .as_ref()
        .map_err(|e| RuntimeError::Backend(e.to_string()))
}

/// How to run llama.cpp.
#[derive(Debug, Clone)]
pub struct LlamaCppOptions {
    /// Threads for decoding; `None` uses every core.
    pub n_threads: Option<usize>,
    /// Tokens per `llama_decode` call (also the micro-batch size).
    pub n_batch: usize,
    /// Memory-map the file. Off by default: the weights are read into memory, so rewriting the
    /// file later (tests regenerate GGUFs) cannot affect a loaded model.
    pub use_mmap: bool,
    /// Use llama.cpp's flash attention kernel (off: the plain f32 path).
    pub flash_attn: bool,
}

impl Default for LlamaCppOptions {
    fn default() -> Self {
        LlamaCppOptions {
            n_threads: None,
            n_batch: 512,
            use_mmap: false,
            flash_attn: false,
        }
    }
}

/// A GGUF model loaded in llama.cpp (CPU, no layers offloaded).
pub struct LlamaCpp {
    model: LlamaModel,
    path: PathBuf,
    options: LlamaCppOptions,
    n_vocab: usize,
}

impl std::fmt::Debug for LlamaCpp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaCpp")
            .field("path", &self.path)
            .field("n_vocab", &self.n_vocab)
            .field("options", &self.options)
            .finish()
    }
}

impl LlamaCpp {
    /// Load `path` with default options.
    pub fn load(path: &Path) -> Result<LlamaCpp, RuntimeError> {
        LlamaCpp::load_with(path, LlamaCppOptions::default())
    }

    pub fn load_with(path: &Path, options: LlamaCppOptions) -> Result<LlamaCpp, RuntimeError> {
        // llama-cpp-2 only debug-asserts existence; a missing file must be an error, not a panic.
        if !path.is_file() {
            return Err(RuntimeError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let backend = backend()?;
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(0)
            .with_use_mmap(options.use_mmap);
        let model =
            LlamaModel::load_from_file(backend, path, &params).map_err(|e| RuntimeError::Load {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let n_vocab = usize::try_from(model.n_vocab()).map_err(|_| RuntimeError::Load {
            path: path.to_path_buf(),
            reason: format!("negative vocabulary size {}", model.n_vocab()),
        })?;
        Ok(LlamaCpp {
            model,
            path: path.to_path_buf(),
            options,
            n_vocab,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// The context length the file declares (`{arch}.context_length`).
    pub fn n_ctx_train(&self) -> u32 {
        self.model.n_ctx_train()
    }

    /// A metadata value as llama.cpp renders it (numbers and strings), or None if absent.
    pub fn meta(&self, key: &str) -> Option<String> {
        self.model.meta_val_str(key).ok()
    }

    pub fn bos(&self) -> u32 {
        token_u32(self.model.vocab().bos())
    }

    pub fn eos(&self) -> u32 {
        token_u32(self.model.vocab().eos())
    }

    /// Whether `token` ends generation (end of sequence or of turn).
    pub fn is_eog(&self, token: u32) -> bool {
        i32::try_from(token).is_ok_and(|t| self.model.vocab().is_eog(LlamaToken::new(t)))
    }

    /// Tokenize with llama.cpp's tokenizer. Special tokens written in the text (`<|im_start|>`)
    /// are parsed as such, as the `tokenizers` crate does; `add_bos` prepends the BOS token
    /// whatever the file's `add_bos_token` says.
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let vocab = self.model.vocab();
        let mut out = Vec::new();
        if add_bos {
            out.push(token_u32(vocab.bos()));
        }
        out.extend(
            vocab
                .tokenize(text.as_bytes(), false, true)
                .into_iter()
                .map(token_u32),
        );
        out
    }

    /// The text of `tokens` (special tokens rendered), lossily decoded as UTF-8.
    pub fn detokenize(&self, tokens: &[u32]) -> String {
        let vocab = self.model.vocab();
        let mut bytes = Vec::new();
        for &t in tokens {
            if let Ok(t) = i32::try_from(t) {
                if (0..self.n_vocab as i64).contains(&i64::from(t)) {
                    bytes.extend(vocab.token_to_piece(LlamaToken::new(t), true, None));
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Logits at every position of `tokens`: `[tokens.len() * n_vocab]`, row-major (position
    /// `i` at `i * n_vocab`). A fresh context of `n_ctx >= tokens.len()` positions with an f32
    /// KV cache; the first token is at position 0. Memory: `tokens.len() * n_vocab * 4` bytes
    /// (3.2 GB for 16k tokens of a 49k vocabulary): use [`LlamaCpp::for_each_logits`] to stream.
    pub fn logits(&self, tokens: &[u32], n_ctx: usize) -> Result<Vec<f32>, RuntimeError> {
        let total = tokens
            .len()
            .checked_mul(self.n_vocab)
            .ok_or_else(|| self.too_large("the logits buffer"))?;
        let mut out = Vec::new();
        out.try_reserve_exact(total)
            .map_err(|_| self.too_large("the logits buffer"))?;
        self.for_each_logits(tokens, n_ctx, |_, row| out.extend_from_slice(row))?;
        Ok(out)
    }

    /// Like [`LlamaCpp::logits`], handing each position's logits (`n_vocab` values) to `f` in
    /// order instead of keeping them.
    pub fn for_each_logits(
        &self,
        tokens: &[u32],
        n_ctx: usize,
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<(), RuntimeError> {
        let ids = self.check_tokens(tokens, n_ctx)?;
        let n_batch = self.options.n_batch.clamp(1, n_ctx);
        let n_threads = self.options.n_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let n_threads = i32::try_from(n_threads.max(1)).unwrap_or(i32::MAX);
        let n_ctx_u32 = u32::try_from(n_ctx)
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or_else(|| self.too_large("the context length"))?;
        let n_batch_u32 = u32::try_from(n_batch).map_err(|_| self.too_large("the batch size"))?;
        let params = LlamaContextParams::default()
            .with_n_ctx(Some(n_ctx_u32))
            .with_n_batch(n_batch_u32)
            .with_n_ubatch(n_batch_u32)
            .with_n_seq_max(1)
            .with_n_threads(n_threads)
            .with_n_threads_batch(n_threads)
            .with_type_k(KvCacheType::F32)
            .with_type_v(KvCacheType::F32)
            .with_flash_attention_policy(if self.options.flash_attn {
                FLASH_ATTN_ENABLED
            } else {
                FLASH_ATTN_DISABLED
            })
            .with_no_perf(true);

        let mut ctx = {
            let _guard = CONTEXT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            self.model
                .new_context(backend()?, params)
                .map_err(|_| RuntimeError::Context {
                    path: self.path.clone(),
                    n_ctx,
                })?
        };

        let mut batch = LlamaBatch::new(n_batch, 1);
        for (chunk_index, chunk) in ids.chunks(n_batch).enumerate() {
            let start = chunk_index * n_batch;
            let end = start + chunk.len();
            batch.clear();
            for (i, &id) in chunk.iter().enumerate() {
                // Positions fit in i32: n_ctx fits in u32 and was checked against i32 below.
                let pos = i32::try_from(start + i).map_err(|_| self.too_large("a position"))?;
                batch
                    .add(id, pos, &[0], true)
                    .map_err(|e| self.decode_error(start, end, e.to_string()))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| self.decode_error(start, end, e.to_string()))?;
            for i in 0..chunk.len() {
                // Every token in the batch asked for logits, so index i is always present.
                let row = ctx.get_logits_ith(i as i32);
                f(start + i, row);
            }
        }
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32], n_ctx: usize) -> Result<Vec<LlamaToken>, RuntimeError> {
        if tokens.is_empty() {
            return Err(RuntimeError::NoTokens {
                path: self.path.clone(),
            });
        }
        if n_ctx < tokens.len() {
            return Err(RuntimeError::ContextTooSmall {
                path: self.path.clone(),
                n_tokens: tokens.len(),
                n_ctx,
            });
        }
        if i32::try_from(n_ctx).is_err() {
            return Err(self.too_large("the context length"));
        }
        // llama.cpp aborts the process on an out-of-range token id; refuse it here instead.
        tokens
            .iter()
            .enumerate()
            .map(|(pos, &t)| {
                if (t as usize) < self.n_vocab {
                    Ok(LlamaToken::new(t as i32))
                } else {
                    Err(RuntimeError::TokenOutOfRange {
                        path: self.path.clone(),
                        token: t,
                        pos,
                        n_vocab: self.n_vocab,
                    })
                }
            })
            .collect()
    }

    fn too_large(&self, what: &'static str) -> RuntimeError {
        RuntimeError::TooLarge {
            path: self.path.clone(),
            what,
        }
    }

    fn decode_error(&self, start: usize, end: usize, reason: String) -> RuntimeError {
        RuntimeError::Decode {
            path: self.path.clone(),
            start,
            end,
            reason,
        }
    }
}

/// llama.cpp token ids are non-negative i32s.
fn token_u32(t: LlamaToken) -> u32 {
    t.0.max(0) as u32
}
