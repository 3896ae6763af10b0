//! The weight check: every tensor of the GGUF, dequantized (q/k rows un-permuted), against the
//! checkpoint's, relative to what a plain quantization of the checkpoint's tensor to the same
//! type costs (ggml's reference quantizers, `abf::quant`). No forward pass, no runtime: it names
//! the tensor that is wrong (swapped, not permuted, rounded worse than its type) where the
//! logits only show that something is.

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::convert::tensor_map::{gguf_to_hf, Role, ROPE_FREQS};
use crate::convert::{numeric, unpermute_qk, GgufHparams};
use crate::gguf::{GgmlType, GgufSet};
use crate::quant;

/// A tensor may differ from the checkpoint's by at most this times the relative error of a
/// plain quantization of the checkpoint's tensor to the file's type, plus [`WEIGHT_FLOOR`].
/// Quantizers differ (llama.cpp's search, an importance matrix trades error between columns) by
/// well under 2x; a tensor that is not the checkpoint's (swapped, rows not permuted) differs by
/// ~sqrt(2) whatever the type, above 2x the rounding of every type down to q2_k (~0.3).
pub const WEIGHT_FACTOR: f64 = 2.0;

/// Relative error allowed on top: f32 arithmetic of the dequantization (the f32 ulp, 2^-23,
/// times the ~10 operations of a block's scale, minimum and sum).
pub const WEIGHT_FLOOR: f64 = 1e-6;

/// One tensor's check.
#[derive(Debug, Clone, Serialize)]
pub struct TensorCheck {
    /// The GGUF name.
    pub tensor: String,
    pub ggml_type: String,
    /// `|file - checkpoint| / |checkpoint|` (RMS over the tensor, f64).
    pub rel_error: f64,
    /// The same for a plain quantization of the checkpoint's tensor to `ggml_type`.
    pub plain_rel_error: f64,
    pub line: f64,
    pub pass: bool,
    /// Why it failed, when the pattern says.
    pub finding: Option<String>,
}

/// Every tensor's check; `pass` when all pass.
#[derive(Debug, Clone, Serialize, Default)]
pub struct WeightCheck {
    pub tensors: Vec<TensorCheck>,
    /// Tensors in the file that the check cannot judge (no checkpoint tensor, or a type abf
    /// cannot decode), with the reason.
    pub unchecked: Vec<String>,
    pub pass: bool,
}

impl WeightCheck {
    pub fn failures(&self) -> impl Iterator<Item = &TensorCheck> {
        self.tensors.iter().filter(|t| !t.pass)
    }
}

/// Sum of squares of `a - b` and of `b`, in f64.
fn err_and_norm(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(e, n), (&x, &y)| {
        let d = f64::from(x) - f64::from(y);
        (e + d * d, n + f64::from(y) * f64::from(y))
    })
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (e, n) = err_and_norm(a, b);
    if n == 0.0 {
        if e == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (e / n).sqrt()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `data` (f32, `row_len` per row) rounded through `ty` and back, as ggml's reference quantizer
/// does it; None for a type abf cannot encode.
fn plain_round_trip(ty: GgmlType, data: &[f32], row_len: usize) -> Option<Vec<f32>> {
    if let Some(dt) = numeric::float_dtype(ty) {
        return Some(numeric::to_f32(dt, &numeric::from_f32(dt, data)));
    }
    if !quant::is_supported(ty) {
        return None;
    }
    let q = quant::quantize(ty, data, row_len).ok()?;
    quant::dequantize(ty, &q, data.len()).ok()
}

/// The file's tensor as f32 in Hugging Face layout, and its raw (still permuted) rows.
fn file_tensor(
    set: &GgufSet,
    i: usize,
    role: Role,
    hp: &GgufHparams,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let t = &set.file.tensors[i];
    let data = set
        .tensor_data(i)
        .ok_or_else(|| "data outside the file".to_string())?;
    let n = usize::try_from(t.elements()).map_err(|_| "too many elements".to_string())?;
    let raw = match numeric::float_dtype(t.ggml_type) {
        Some(dt) => numeric::to_f32(dt, data),
        None => numeric::dequantize(&t.name, t.ggml_type, data, n).map_err(|e| e.to_string())?,
    };
    let rows = t.dims.get(1).copied().unwrap_or(1) as usize;
    let heads = match role {
        Role::Q => hp.heads,
        Role::K => hp.kv_heads,
        _ => return Ok((raw.clone(), raw)),
    };
    let hf = unpermute_qk(&t.name, &f32_bytes(&raw), rows, heads).map_err(|e| e.to_string())?;
    Ok((f32_from_bytes(&hf), raw))
}

/// The checkpoint's tensors rounded through the file's types (Hugging Face name -> shape, f32
/// values): what the weight check compares with, kept for the plain-quantization rule.
pub type PlainWeights = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Check every tensor of `set` (a file or every part of a split set) against `ckpt`;
/// `progress(done, total)` per tensor. With `keep_plain`, the plain quantizations the check
/// makes are returned too (for [`plain_model`], which would otherwise quantize them again).
pub fn check_weights(
    ckpt: &Checkpoint,
    set: &GgufSet,
    hp: &GgufHparams,
    keep_plain: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> (WeightCheck, PlainWeights) {
    let file = &set.file;
    let mut out = WeightCheck::default();
    let mut kept = PlainWeights::new();
    let total = file.tensors.len();
    for (i, t) in file.tensors.iter().enumerate() {
        progress(i, total);
        if t.name == ROPE_FREQS {
            continue;
        }
        let Some((hf, role, _)) = gguf_to_hf(&t.name) else {
            out.unchecked
                .push(format!("{}: not a LLaMA tensor name", t.name));
            continue;
        };
        // a tied model's head is its embedding (a file may still carry output.weight)
        let view = ckpt.weights.tensor_view(&hf).or_else(|e| {
            if role == Role::Output && ckpt.config.model.tie_word_embeddings {
                ckpt.weights.tensor_view("model.embed_tokens.weight")
            } else {
                Err(e)
            }
        });
        let view = match view {
            Ok(v) => v,
            Err(_) => {
                out.unchecked
                    .push(format!("{}: {hf} is not in the checkpoint", t.name));
                continue;
            }
        };
        let want = numeric::to_f32(view.dtype, view.data);
        let (got, raw) = match file_tensor(set, i, role, hp) {
            Ok(x) => x,
            Err(e) => {
                out.unchecked.push(format!("{}: {e}", t.name));
                continue;
            }
        };
        if got.len() != want.len() {
            out.tensors.push(TensorCheck {
                tensor: t.name.clone(),
                ggml_type: t.ggml_type.to_string(),
                rel_error: f64::INFINITY,
                plain_rel_error: 0.0,
                line: 0.0,
                pass: false,
                finding: Some(format!(
                    "{} elements, the checkpoint's {hf} has {}",
                    got.len(),
                    want.len()
                )),
            });
            continue;
        }
        let row_len = t.dims.first().copied().unwrap_or(1) as usize;
        let Some(plain) = plain_round_trip(t.ggml_type, &want, row_len) else {
            out.unchecked.push(format!(
                "{}: abf cannot quantize {} to compare",
                t.name, t.ggml_type
            ));
            continue;
        };
        let rel_error = rel(&got, &want);
        let plain_rel_error = rel(&plain, &want);
        let line = WEIGHT_FACTOR * plain_rel_error + WEIGHT_FLOOR;
        let pass = rel_error.is_finite() && rel_error <= line;
        let finding = (!pass).then(|| {
            if matches!(role, Role::Q | Role::K) && rel(&raw, &want) <= line {
                "its rows are the checkpoint's in Hugging Face order: q/k rows not permuted \
                 to llama.cpp's interleaved pairs"
                    .to_string()
            } else if rel_error > 0.5 {
                format!("not the checkpoint's {hf}: a tensor swapped, stale or mis-typed")
            } else {
                format!(
                    "rounded {:.1}x worse than a plain {} quantization",
                    rel_error / plain_rel_error.max(f64::MIN_POSITIVE),
                    t.ggml_type
                )
            }
        });
        out.tensors.push(TensorCheck {
            tensor: t.name.clone(),
            ggml_type: t.ggml_type.to_string(),
            rel_error,
            plain_rel_error,
            line,
            pass,
            finding,
        });
        if keep_plain {
            kept.insert(hf, (view.shape.to_vec(), plain));
        }
    }
    progress(total, total);
    out.pass = out.tensors.iter().all(|t| t.pass);
    (out, kept)
}

/// The checkpoint's weights rounded through each tensor's type of the file by ggml's reference
/// quantizers ([`check_weights`] with `keep_plain`), as our forward under `cfg`: what a plain
/// quantization to the file's types costs, the measure of the plain-quantization rule
/// (`lines::LineRule::Plain`).
pub fn plain_model(
    plain: PlainWeights,
    cfg: &crate::checkpoint::ModelConfig,
    device: &candle_core::Device,
) -> Result<crate::model::Llama, String> {
    use candle_core::{DType, Tensor};
    let mut map = std::collections::HashMap::with_capacity(plain.len());
    for (name, (shape, values)) in plain {
        let tensor = Tensor::from_vec(values, shape, device).map_err(|e| format!("{name}: {e}"))?;
        map.insert(name, tensor);
    }
    let vb = candle_nn::VarBuilder::from_tensors(map, DType::F32, device);
    crate::model::Llama::load(vb, cfg).map_err(|e| e.to_string())
}
