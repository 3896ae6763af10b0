//! The candle forward's independent oracle (tests/model_oracle_*.rs): a plain f64 LLaMA forward
//! written with scalar loops (no candle), which computes its own inverse frequencies, attention
//! factor and logit scales from the formulas of method.md / transformers' `modeling_rope_utils`
//! (not from `Recipe::inv_freq`), on tiny random models (Irwin-Hall normal weights from
//! [`super::rng::Rng`]) written as safetensors with the `safetensors` crate.

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::path::{Path as FsPath, PathBuf};

use abf::checkpoint::{ModelConfig, ModelType};
use abf::model::{Llama, Path};
use abf::rope::{BaseRope, Recipe, RopeMethod, ScaleLaw};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use half::bf16;
use safetensors::tensor::{Dtype as StDtype, TensorView};

use super::rng::Rng;

/// Named f64 tensors, row-major, with their shapes (Hugging Face names).
#[derive(Clone)]
pub struct Weights(pub BTreeMap<String, (Vec<usize>, Vec<f64>)>);

impl Weights {
    pub fn get(&self, name: &str) -> &[f64] {
        &self.0.get(name).unwrap_or_else(|| panic!("no {name}")).1
    }
    /// Every value rounded to bf16 (what a bf16 checkpoint holds).
    pub fn rounded_bf16(&self) -> Weights {
        Weights(
            self.0
                .iter()
                .map(|(k, (s, v))| {
                    (
                        k.clone(),
                        (s.clone(), v.iter().map(|&x| to_bf16(x)).collect()),
                    )
                })
                .collect(),
        )
    }
}

pub fn to_bf16(x: f64) -> f64 {
    bf16::from_f32(x as f32).to_f64()
}

#[derive(Clone, Copy)]
pub struct Shape {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv: usize,
    pub head_dim: usize,
    pub tied: bool,
}

pub const TINY: Shape = Shape {
    vocab: 64,
    hidden: 48,
    inter: 96,
    layers: 3,
    heads: 4,
    kv: 2,
    head_dim: 16,
    tied: false,
};

/// The tiny models' pretraining window: sequences of 4c make every recipe act.
pub const C: u64 = 32;

pub const SEQ: usize = 128;

pub fn config(shape: Shape, recipe: Recipe) -> ModelConfig {
    recipe.validate().expect("valid recipe");
    ModelConfig {
        model_type: ModelType::Llama,
        vocab_size: shape.vocab,
        hidden_size: shape.hidden,
        intermediate_size: shape.inter,
        num_hidden_layers: shape.layers,
        num_attention_heads: shape.heads,
        num_key_value_heads: shape.kv,
        head_dim: shape.head_dim,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: shape.tied,
        max_position_embeddings: recipe.context,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        recipe,
    }
}

/// Random weights. q/k get a gain so that attention is peaked (scores of a few units), which makes
/// rotary frequencies and logit scales change the output visibly.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Weights {
    let mut rng = Rng::new(seed);
    let mut w = BTreeMap::new();
    let (v, h, i, d) = (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
    );
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut mat = |name: String, rows: usize, cols: usize, std: f64, rng: &mut Rng| {
        let vals = (0..rows * cols).map(|_| rng.normal_ih4() * std).collect();
        w.insert(name, (vec![rows, cols], vals));
    };
    mat("model.embed_tokens.weight".into(), v, h, 1.0, &mut rng);
    let s = |fan_in: usize| 1.0 / (fan_in as f64).sqrt();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        mat(
            format!("{p}.self_attn.q_proj.weight"),
            nh * d,
            h,
            1.6 * s(h),
            &mut rng,
        );
        mat(
            format!("{p}.self_attn.k_proj.weight"),
            nkv * d,
            h,
            1.6 * s(h),
            &mut rng,
        );
        mat(
            format!("{p}.self_attn.v_proj.weight"),
            nkv * d,
            h,
            s(h),
            &mut rng,
        );
        mat(
            format!("{p}.self_attn.o_proj.weight"),
            h,
            nh * d,
            s(nh * d),
            &mut rng,
        );
        mat(format!("{p}.mlp.gate_proj.weight"), i, h, s(h), &mut rng);
        mat(format!("{p}.mlp.up_proj.weight"), i, h, s(h), &mut rng);
        mat(format!("{p}.mlp.down_proj.weight"), h, i, s(i), &mut rng);
    }
    let mut vec1 = |name: String, rng: &mut Rng| {
        let vals = (0..h).map(|_| 1.0 + 0.2 * rng.uniform()).collect();
        w.insert(name, (vec![h], vals));
    };
    for l in 0..cfg.num_hidden_layers {
        vec1(format!("model.layers.{l}.input_layernorm.weight"), &mut rng);
        vec1(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &mut rng,
        );
    }
    vec1("model.norm.weight".into(), &mut rng);
    if !cfg.tie_word_embeddings {
        let vals = (0..v * h).map(|_| rng.normal_ih4() * s(h)).collect();
        w.insert("lm_head.weight".into(), (vec![v, h], vals));
    }
    Weights(w)
}

pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Write `names` of `w` as one safetensors file in `dtype` (f32 or bf16).
pub fn write_safetensors(w: &Weights, names: &[&String], dtype: DType, path: &FsPath) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let (shape, vals) = &w.0[*n];
            let b: Vec<u8> = match dtype {
                DType::F32 => vals
                    .iter()
                    .flat_map(|&x| (x as f32).to_le_bytes())
                    .collect(),
                DType::BF16 => vals
                    .iter()
                    .flat_map(|&x| bf16::from_f32(x as f32).to_le_bytes())
                    .collect(),
                other => panic!("test writer: {other:?}"),
            };
            ((*n).clone(), shape.clone(), b)
        })
        .collect();
    let st = match dtype {
        DType::F32 => StDtype::F32,
        _ => StDtype::BF16,
    };
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(st, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// A model directory in a temp dir: `model.safetensors`, or `shards` files.
pub struct Written {
    pub _dir: tempfile::TempDir,
    pub files: Vec<PathBuf>,
}

pub fn write_model(w: &Weights, dtype: DType, shards: usize) -> Written {
    let dir = tempfile::tempdir().expect("tempdir");
    let names: Vec<&String> = w.0.keys().collect();
    let per = names.len().div_ceil(shards);
    let files = names
        .chunks(per)
        .enumerate()
        .map(|(k, chunk)| {
            let p = if shards == 1 {
                dir.path().join("model.safetensors")
            } else {
                dir.path()
                    .join(format!("model-{:05}-of-{shards:05}.safetensors", k + 1))
            };
            write_safetensors(w, chunk, dtype, &p);
            p
        })
        .collect();
    Written { _dir: dir, files }
}

pub fn load(written: &Written, cfg: &ModelConfig, dtype: DType) -> Llama {
    // SAFETY: the files were written by this test and are not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&written.files, dtype, &Device::Cpu) }
        .expect("mmap safetensors");
    Llama::load(vb, cfg).expect("load model")
}

/// Logits `[t][vocab]` of the candle model for one sequence.
pub fn candle_logits(model: &Llama, toks: &[u32], start: usize, path: Path) -> Vec<Vec<f64>> {
    let t = Tensor::from_vec(toks.to_vec(), (1, toks.len()), &Device::Cpu).expect("tokens");
    let logits = model.forward_path(&t, start, path).expect("forward");
    to_rows(&logits)
}

pub fn to_rows(logits: &Tensor) -> Vec<Vec<f64>> {
    logits
        .squeeze(0)
        .and_then(|l| l.to_dtype(DType::F64))
        .and_then(|l| l.to_vec2::<f64>())
        .expect("logits")
}

pub fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row length");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max)
}

pub fn max_abs(a: &[Vec<f64>]) -> f64 {
    a.iter().flatten().fold(0.0f64, |m, x| m.max(x.abs()))
}

// ---------------------------------------------------------------------------------------------
// The oracle: plain f64 loops
// ---------------------------------------------------------------------------------------------

/// Inverse frequencies, computed here from the published formulas (method.md; transformers
/// `_compute_default/linear/dynamic_ntk/yarn/llama3_parameters`).
pub fn oracle_inv_freq(r: &Recipe, d: usize, seq_len: usize) -> Vec<f64> {
    let half = d / 2;
    let theta = |base: f64| -> Vec<f64> {
        (0..half)
            .map(|j| 1.0 / base.powf((2 * j) as f64 / d as f64))
            .collect()
    };
    let (b, s, l) = (r.rope_base, r.factor, r.original_context as f64);
    let exp = d as f64 / (d as f64 - 2.0);
    match r.method {
        RopeMethod::Default | RopeMethod::Abf | RopeMethod::Eabf => theta(b),
        RopeMethod::Linear => theta(b).into_iter().map(|t| t / s).collect(),
        RopeMethod::Ntk => theta(b * s.powf(exp)),
        RopeMethod::Dynamic => {
            let cur = (seq_len as f64).max(l);
            theta(b * ((s * cur / l) - (s - 1.0)).powf(exp))
        }
        RopeMethod::Yarn | RopeMethod::NtkByParts => {
            let corr = |rot: f64| d as f64 * (l / (rot * 2.0 * PI)).ln() / (2.0 * b.ln());
            let low = corr(r.beta_fast).floor().max(0.0);
            let mut high = corr(r.beta_slow).ceil().min(d as f64 - 1.0);
            if low == high {
                high += 0.001;
            }
            theta(b)
                .into_iter()
                .enumerate()
                .map(|(j, t)| {
                    let ramp = ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    (t / s) * (1.0 - extrapolation) + t * extrapolation
                })
                .collect()
        }
        RopeMethod::Llama3 => {
            let low_wavelen = l / r.low_freq_factor;
            let high_wavelen = l / r.high_freq_factor;
            theta(b)
                .into_iter()
                .map(|t| {
                    let wavelen = 2.0 * PI / t;
                    if wavelen < high_wavelen {
                        t
                    } else if wavelen > low_wavelen {
                        t / s
                    } else {
                        let smooth = (l / wavelen - r.low_freq_factor)
                            / (r.high_freq_factor - r.low_freq_factor);
                        (1.0 - smooth) * t / s + smooth * t
                    }
                })
                .collect()
        }
    }
}

/// YaRN's `0.1 ln s + 1` on cos and sin (or the explicit attention factor); 1 otherwise.
pub fn oracle_attention_factor(r: &Recipe) -> f64 {
    match r.method {
        RopeMethod::Yarn => r.yarn_attention_factor.unwrap_or(if r.factor <= 1.0 {
            1.0
        } else {
            0.1 * r.factor.ln() + 1.0
        }),
        _ => 1.0,
    }
}

/// The logit scale on q at 0-based position `p` in `layer` (method.md).
pub fn oracle_scale(r: &Recipe, layer: usize, p: usize) -> f64 {
    if layer < r.skip_layers {
        return 1.0;
    }
    match r.scale_law {
        ScaleLaw::None => 1.0,
        ScaleLaw::Log => ((p as f64 + 1.0).ln() / (r.original_context as f64).ln()).max(1.0),
        ScaleLaw::Step { beta, length } => 1.0 + beta * (1.0 + (p as u64 / length) as f64).ln(),
    }
}

pub struct OracleOut {
    pub logits: Vec<Vec<f64>>,
    /// `[layer][k]`: entropy of query `entropy_at[k]`, mean over heads.
    pub entropy: Vec<Vec<f64>>,
}

/// `y = W x` for a row-major `[rows, cols]` matrix.
pub fn matvec(w: &[f64], x: &[f64], rows: usize) -> Vec<f64> {
    let cols = x.len();
    assert_eq!(w.len(), rows * cols);
    (0..rows)
        .map(|r| {
            w[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

pub fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// The whole forward for one sequence at absolute positions `start ..`. `round_scale` maps each
/// logit scale to the value the model multiplies by (identity, or bf16 rounding).
pub fn oracle(
    cfg: &ModelConfig,
    w: &Weights,
    toks: &[u32],
    start: usize,
    entropy_at: &[usize],
    round_scale: &dyn Fn(f64) -> f64,
) -> OracleOut {
    oracle_probed(cfg, w, toks, start, entropy_at, round_scale, &mut |_, _| {})
}

/// [`oracle`] that also hands `probe` every input vector of every matrix product, with the
/// Hugging Face name of the weight (the head is `model.embed_tokens.weight` when tied).
pub fn oracle_probed(
    cfg: &ModelConfig,
    w: &Weights,
    toks: &[u32],
    start: usize,
    entropy_at: &[usize],
    round_scale: &dyn Fn(f64) -> f64,
    probe: &mut dyn FnMut(&str, &[f64]),
) -> OracleOut {
    let r = &cfg.recipe;
    let (h, d, nh, nkv) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
    );
    let half = d / 2;
    let rep = nh / nkv;
    let t = toks.len();
    let eps = cfg.rms_norm_eps;
    let inv = oracle_inv_freq(r, d, start + t);
    let af = oracle_attention_factor(r);
    let emb = w.get("model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = toks
        .iter()
        .map(|&k| emb[k as usize * h..(k as usize + 1) * h].to_vec())
        .collect();
    let rotate = |v: &mut [f64], p: usize| {
        for j in 0..half {
            let a = p as f64 * inv[j];
            let (c, s) = (a.cos() * af, a.sin() * af);
            let (x1, x2) = (v[j], v[j + half]);
            v[j] = x1 * c - x2 * s;
            v[j + half] = x2 * c + x1 * s;
        }
    };
    let mut entropy = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let g = |n: &str| w.get(&format!("{p}.{n}"));
        let mut q = vec![vec![0.0; nh * d]; t];
        let mut k = vec![vec![0.0; nkv * d]; t];
        let mut v = vec![vec![0.0; nkv * d]; t];
        for i in 0..t {
            let hn = rmsnorm(&x[i], g("input_layernorm.weight"), eps);
            for n in ["q_proj", "k_proj", "v_proj"] {
                probe(&format!("{p}.self_attn.{n}.weight"), &hn);
            }
            q[i] = matvec(g("self_attn.q_proj.weight"), &hn, nh * d);
            k[i] = matvec(g("self_attn.k_proj.weight"), &hn, nkv * d);
            v[i] = matvec(g("self_attn.v_proj.weight"), &hn, nkv * d);
            let pos = start + i;
            let lam = round_scale(oracle_scale(r, l, pos));
            for hh in 0..nh {
                rotate(&mut q[i][hh * d..(hh + 1) * d], pos);
                for e in &mut q[i][hh * d..(hh + 1) * d] {
                    *e *= lam;
                }
            }
            for hh in 0..nkv {
                rotate(&mut k[i][hh * d..(hh + 1) * d], pos);
            }
        }
        let mut layer_entropy = vec![0.0; entropy_at.len()];
        let mut attn = vec![vec![0.0; nh * d]; t];
        for hh in 0..nh {
            let kvh = hh / rep;
            for i in 0..t {
                let qi = &q[i][hh * d..(hh + 1) * d];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[j][kvh * d..(kvh + 1) * d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let probs: Vec<f64> = e.iter().map(|x| x / z).collect();
                for (kk, &qpos) in entropy_at.iter().enumerate() {
                    if qpos == i {
                        // -sum p ln p, directly (the model uses the ln Z form)
                        let ent: f64 = probs
                            .iter()
                            .filter(|&&pp| pp > 0.0)
                            .map(|pp| -pp * pp.ln())
                            .sum();
                        layer_entropy[kk] += ent / nh as f64;
                    }
                }
                for (j, pj) in probs.iter().enumerate() {
                    let vj = &v[j][kvh * d..(kvh + 1) * d];
                    for e in 0..d {
                        attn[i][hh * d + e] += pj * vj[e];
                    }
                }
            }
        }
        entropy.push(layer_entropy);
        for i in 0..t {
            probe(&format!("{p}.self_attn.o_proj.weight"), &attn[i]);
            let o = matvec(g("self_attn.o_proj.weight"), &attn[i], h);
            for e in 0..h {
                x[i][e] += o[e];
            }
            let hn = rmsnorm(&x[i], g("post_attention_layernorm.weight"), eps);
            probe(&format!("{p}.mlp.gate_proj.weight"), &hn);
            probe(&format!("{p}.mlp.up_proj.weight"), &hn);
            let gate = matvec(g("mlp.gate_proj.weight"), &hn, cfg.intermediate_size);
            let up = matvec(g("mlp.up_proj.weight"), &hn, cfg.intermediate_size);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                .collect();
            probe(&format!("{p}.mlp.down_proj.weight"), &act);
            let down = matvec(g("mlp.down_proj.weight"), &act, h);
            for e in 0..h {
                x[i][e] += down[e];
            }
        }
    }
    let head_name = if cfg.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    let head = w.get(head_name);
    let logits = x
        .iter()
        .map(|xi| {
            let hn = rmsnorm(xi, w.get("model.norm.weight"), eps);
            probe(head_name, &hn);
            matvec(head, &hn, cfg.vocab_size)
        })
        .collect();
    OracleOut { logits, entropy }
}

pub fn exact(x: f64) -> f64 {
    x
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

pub const TOL: f64 = 1e-4;

pub fn base() -> BaseRope {
    BaseRope {
        base: 10_000.0,
        context: C,
    }
}

/// Build a tiny model with `recipe`, run the candle forward (f32) and the oracle, compare.
/// Returns the oracle logits for further checks.
pub fn check_f32(shape: Shape, recipe: Recipe, seed: u64, query_block: usize) -> Vec<Vec<f64>> {
    let cfg = config(shape, recipe);
    let w = random_weights(&cfg, seed);
    let written = write_model(&w, DType::F32, 1);
    let mut model = load(&written, &cfg, DType::F32);
    model.set_query_block(query_block);
    let toks = tokens(SEQ, shape.vocab, seed ^ 0xABCD);
    let got = candle_logits(&model, &toks, 0, Path::Fast);
    let want = oracle(&cfg, &w, &toks, 0, &[], &exact).logits;
    let diff = max_abs_diff(&got, &want);
    eprintln!(
        "{}: max |logit| {:.3}, max abs diff {diff:.2e}",
        cfg.recipe,
        max_abs(&want)
    );
    assert!(
        diff < TOL,
        "{}: max abs diff {diff:e} >= {TOL:e}",
        cfg.recipe
    );
    want
}

/// A comparison is only meaningful if the thing under test moves the logits by much more than the
/// tolerance: checks that two oracle outputs differ by at least `min`.
pub fn assert_differs(a: &[Vec<f64>], b: &[Vec<f64>], min: f64, what: &str) {
    let d = max_abs_diff(a, b);
    assert!(d > min, "{what}: oracle outputs differ by only {d:e}");
}

pub fn oracle_logits(shape: Shape, recipe: Recipe, seed: u64) -> Vec<Vec<f64>> {
    let cfg = config(shape, recipe);
    let w = random_weights(&cfg, seed);
    let toks = tokens(SEQ, shape.vocab, seed ^ 0xABCD);
    oracle(&cfg, &w, &toks, 0, &[], &exact).logits
}

pub fn eabf(skip: usize, law: ScaleLaw) -> Recipe {
    let mut r = Recipe::for_method(RopeMethod::Eabf, base());
    r.skip_layers = skip;
    r.scale_law = law;
    r
}
