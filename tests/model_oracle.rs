//! The candle forward against an independent oracle: a plain f64 LLaMA forward written here with
//! scalar loops (no candle), which computes its own inverse frequencies, attention factor and logit
//! scales from the formulas of method.md / transformers' `modeling_rope_utils` (not from
//! `Recipe::inv_freq`), on tiny random models written as safetensors by this file.

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

// ---------------------------------------------------------------------------------------------
// Tiny random models
// ---------------------------------------------------------------------------------------------

/// splitmix64: a reproducible generator without a dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    /// Approximately standard normal (Irwin-Hall of 4 uniforms, rescaled).
    fn normal(&mut self) -> f64 {
        (0..4).map(|_| self.uniform()).sum::<f64>() * (3.0f64 / 4.0).sqrt()
    }
}

/// Named f64 tensors, row-major, with their shapes (Hugging Face names).
#[derive(Clone)]
struct Weights(BTreeMap<String, (Vec<usize>, Vec<f64>)>);

impl Weights {
    fn get(&self, name: &str) -> &[f64] {
        &self.0.get(name).unwrap_or_else(|| panic!("no {name}")).1
    }
    /// Every value rounded to bf16 (what a bf16 checkpoint holds).
    fn rounded_bf16(&self) -> Weights {
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

fn to_bf16(x: f64) -> f64 {
    bf16::from_f32(x as f32).to_f64()
}

#[derive(Clone, Copy)]
struct Shape {
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    head_dim: usize,
    tied: bool,
}

const TINY: Shape = Shape {
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
const C: u64 = 32;
const SEQ: usize = 128;

fn config(shape: Shape, recipe: Recipe) -> ModelConfig {
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
fn random_weights(cfg: &ModelConfig, seed: u64) -> Weights {
    let mut rng = Rng(seed);
    let mut w = BTreeMap::new();
    let (v, h, i, d) = (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
    );
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut mat = |name: String, rows: usize, cols: usize, std: f64, rng: &mut Rng| {
        let vals = (0..rows * cols).map(|_| rng.normal() * std).collect();
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
        let vals = (0..v * h).map(|_| rng.normal() * s(h)).collect();
        w.insert("lm_head.weight".into(), (vec![v, h], vals));
    }
    Weights(w)
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Write `names` of `w` as one safetensors file in `dtype` (f32 or bf16).
fn write_safetensors(w: &Weights, names: &[&String], dtype: DType, path: &FsPath) {
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
struct Written {
    _dir: tempfile::TempDir,
    files: Vec<PathBuf>,
}

fn write_model(w: &Weights, dtype: DType, shards: usize) -> Written {
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

fn load(written: &Written, cfg: &ModelConfig, dtype: DType) -> Llama {
    // SAFETY: the files were written by this test and are not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&written.files, dtype, &Device::Cpu) }
        .expect("mmap safetensors");
    Llama::load(vb, cfg).expect("load model")
}

/// Logits `[t][vocab]` of the candle model for one sequence.
fn candle_logits(model: &Llama, toks: &[u32], start: usize, path: Path) -> Vec<Vec<f64>> {
    let t = Tensor::from_vec(toks.to_vec(), (1, toks.len()), &Device::Cpu).expect("tokens");
    let logits = model.forward_path(&t, start, path).expect("forward");
    to_rows(&logits)
}

fn to_rows(logits: &Tensor) -> Vec<Vec<f64>> {
    logits
        .squeeze(0)
        .and_then(|l| l.to_dtype(DType::F64))
        .and_then(|l| l.to_vec2::<f64>())
        .expect("logits")
}

fn max_abs_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row length");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max)
}

fn max_abs(a: &[Vec<f64>]) -> f64 {
    a.iter().flatten().fold(0.0f64, |m, x| m.max(x.abs()))
}

// ---------------------------------------------------------------------------------------------
// The oracle: plain f64 loops
// ---------------------------------------------------------------------------------------------

/// Inverse frequencies, computed here from the published formulas (method.md; transformers
/// `_compute_default/linear/dynamic_ntk/yarn/llama3_parameters`).
fn oracle_inv_freq(r: &Recipe, d: usize, seq_len: usize) -> Vec<f64> {
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
fn oracle_attention_factor(r: &Recipe) -> f64 {
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
fn oracle_scale(r: &Recipe, layer: usize, p: usize) -> f64 {
    if layer < r.skip_layers {
        return 1.0;
    }
    match r.scale_law {
        ScaleLaw::None => 1.0,
        ScaleLaw::Log => ((p as f64 + 1.0).ln() / (r.original_context as f64).ln()).max(1.0),
        ScaleLaw::Step { beta, length } => 1.0 + beta * (1.0 + (p as u64 / length) as f64).ln(),
    }
}

struct OracleOut {
    logits: Vec<Vec<f64>>,
    /// `[layer][k]`: entropy of query `entropy_at[k]`, mean over heads.
    entropy: Vec<Vec<f64>>,
}

/// `y = W x` for a row-major `[rows, cols]` matrix.
fn matvec(w: &[f64], x: &[f64], rows: usize) -> Vec<f64> {
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

fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// The whole forward for one sequence at absolute positions `start ..`. `round_scale` maps each
/// logit scale to the value the model multiplies by (identity, or bf16 rounding).
fn oracle(
    cfg: &ModelConfig,
    w: &Weights,
    toks: &[u32],
    start: usize,
    entropy_at: &[usize],
    round_scale: &dyn Fn(f64) -> f64,
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
            let o = matvec(g("self_attn.o_proj.weight"), &attn[i], h);
            for e in 0..h {
                x[i][e] += o[e];
            }
            let hn = rmsnorm(&x[i], g("post_attention_layernorm.weight"), eps);
            let gate = matvec(g("mlp.gate_proj.weight"), &hn, cfg.intermediate_size);
            let up = matvec(g("mlp.up_proj.weight"), &hn, cfg.intermediate_size);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                .collect();
            let down = matvec(g("mlp.down_proj.weight"), &act, h);
            for e in 0..h {
                x[i][e] += down[e];
            }
        }
    }
    let head = if cfg.tie_word_embeddings {
        w.get("model.embed_tokens.weight")
    } else {
        w.get("lm_head.weight")
    };
    let logits = x
        .iter()
        .map(|xi| {
            let hn = rmsnorm(xi, w.get("model.norm.weight"), eps);
            matvec(head, &hn, cfg.vocab_size)
        })
        .collect();
    OracleOut { logits, entropy }
}

fn exact(x: f64) -> f64 {
    x
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

const TOL: f64 = 1e-4;

fn base() -> BaseRope {
    BaseRope {
        base: 10_000.0,
        context: C,
    }
}

/// Build a tiny model with `recipe`, run the candle forward (f32) and the oracle, compare.
/// Returns the oracle logits for further checks.
fn check_f32(shape: Shape, recipe: Recipe, seed: u64, query_block: usize) -> Vec<Vec<f64>> {
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
fn assert_differs(a: &[Vec<f64>], b: &[Vec<f64>], min: f64, what: &str) {
    let d = max_abs_diff(a, b);
    assert!(d > min, "{what}: oracle outputs differ by only {d:e}");
}

fn oracle_logits(shape: Shape, recipe: Recipe, seed: u64) -> Vec<Vec<f64>> {
    let cfg = config(shape, recipe);
    let w = random_weights(&cfg, seed);
    let toks = tokens(SEQ, shape.vocab, seed ^ 0xABCD);
    oracle(&cfg, &w, &toks, 0, &[], &exact).logits
}

fn eabf(skip: usize, law: ScaleLaw) -> Recipe {
    let mut r = Recipe::for_method(RopeMethod::Eabf, base());
    r.skip_layers = skip;
    r.scale_law = law;
    r
}

// ---------------------------------------------------------------------------------------------
// Recipes
// ---------------------------------------------------------------------------------------------

/// The recipe's frequencies against the oracle's at LLaMA-2 scale (d = 128, b = 1e4, c = 4096).
#[test]
fn recipe_frequencies_match_the_oracle_formulas() {
    let llama2 = BaseRope {
        base: 10_000.0,
        context: 4096,
    };
    for m in RopeMethod::ALL {
        let r = Recipe::for_method(m, llama2);
        for seq in [100, 4096, 16_384, 40_000] {
            let got = r.inv_freq(128, Some(seq as u64));
            let want = oracle_inv_freq(&r, 128, seq);
            assert_eq!(got.len(), want.len());
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-12 * w.abs(),
                    "{m} seq {seq} pair {j}: {g} vs {w}"
                );
            }
        }
        assert_eq!(r.attention_factor(), oracle_attention_factor(&r), "{m}");
    }
    // method.md: YaRN s = 4 has mscale 1.1386 (logits x 1.2965)
    let y = oracle_attention_factor(&Recipe::for_method(RopeMethod::Yarn, llama2));
    assert!((y - 1.1386).abs() < 1e-4 && (y * y - 1.2965).abs() < 1e-4);
}

#[test]
fn plain_rope_matches_oracle() {
    check_f32(TINY, Recipe::plain(base()), 1, 512);
}

#[test]
fn abf_matches_oracle() {
    let r = Recipe::for_method(RopeMethod::Abf, base());
    assert_eq!(r.rope_base, 500_000.0);
    let want = check_f32(TINY, r, 2, 512);
    assert_differs(
        &want,
        &oracle_logits(TINY, Recipe::plain(base()), 2),
        1e-2,
        "abf base",
    );
}

#[test]
fn yarn_matches_oracle() {
    let r = Recipe::for_method(RopeMethod::Yarn, base());
    assert_eq!(r.factor, 4.0);
    let want = check_f32(TINY, r.clone(), 3, 512);
    // mscale acts: without it (NTK-by-parts) the logits differ
    let mut nbp = r;
    nbp.method = RopeMethod::NtkByParts;
    assert_differs(
        &want,
        &oracle_logits(TINY, nbp.clone(), 3),
        1e-2,
        "yarn mscale",
    );
    check_f32(TINY, nbp, 3, 512);
}

#[test]
fn llama3_matches_oracle() {
    let r = Recipe::for_method(RopeMethod::Llama3, base());
    // with d = 16, b = 1e4, c = 32 the pairs fall in all three wavelength bands
    let inv = oracle_inv_freq(&r, 16, SEQ);
    let theta: Vec<f64> = (0..8)
        .map(|j| 10_000f64.powf(-(2.0 * j as f64) / 16.0))
        .collect();
    assert_eq!(inv[0], theta[0]);
    assert!(inv[1] < theta[1] && inv[1] > theta[1] / 4.0);
    assert!((inv[7] - theta[7] / 4.0).abs() < 1e-18);
    check_f32(TINY, r, 4, 512);
}

#[test]
fn linear_ntk_and_dynamic_match_oracle() {
    for (k, m) in [RopeMethod::Linear, RopeMethod::Ntk, RopeMethod::Dynamic]
        .into_iter()
        .enumerate()
    {
        check_f32(TINY, Recipe::for_method(m, base()), 10 + k as u64, 512);
    }
}

#[test]
fn log_law_with_two_and_zero_exempt_layers_matches_oracle() {
    let shape = Shape { layers: 4, ..TINY };
    let two = check_f32(shape, eabf(2, ScaleLaw::Log), 5, 512);
    let zero = check_f32(shape, eabf(0, ScaleLaw::Log), 5, 512);
    // the exemption and the law both act on these models
    assert_differs(&two, &zero, 1e-2, "exempt layers");
    assert_differs(
        &two,
        &oracle_logits(shape, eabf(2, ScaleLaw::None), 5),
        1e-2,
        "log law",
    );
}

#[test]
fn step_law_matches_oracle() {
    let mut r = eabf(0, Recipe::default_step(C));
    r.method = RopeMethod::Abf;
    let want = check_f32(TINY, r.clone(), 6, 512);
    let mut log = r;
    log.scale_law = ScaleLaw::Log;
    assert_differs(&want, &oracle_logits(TINY, log, 6), 1e-3, "step vs log law");
}

#[test]
fn grouped_query_multi_query_and_multi_head_attention_match_oracle() {
    let r = eabf(1, ScaleLaw::Log);
    for (kv, head_dim) in [(2, 16), (1, 8), (4, 12)] {
        let shape = Shape {
            kv,
            head_dim,
            ..TINY
        };
        check_f32(shape, r.clone(), 7 + kv as u64, 512);
    }
}

#[test]
fn tied_embeddings_match_oracle() {
    let shape = Shape { tied: true, ..TINY };
    let cfg = config(shape, eabf(2, ScaleLaw::Log));
    let w = random_weights(&cfg, 8);
    assert!(!w.0.contains_key("lm_head.weight"));
    check_f32(shape, eabf(2, ScaleLaw::Log), 8, 512);
}

#[test]
fn query_blocks_do_not_change_the_result() {
    let r = eabf(1, ScaleLaw::Log);
    // SEQ = 128: blocks of 1 row, 7 (ragged last block), 16, 128 (exactly one) and 1000
    for qb in [1, 7, 16, 128, 1000] {
        check_f32(TINY, r.clone(), 9, qb);
    }
}

#[test]
fn start_position_shifts_scales_and_dynamic_base() {
    for r in [
        eabf(1, ScaleLaw::Log),
        Recipe::for_method(RopeMethod::Dynamic, base()),
    ] {
        let cfg = config(TINY, r);
        let w = random_weights(&cfg, 11);
        let written = write_model(&w, DType::F32, 1);
        let mut model = load(&written, &cfg, DType::F32);
        model.set_query_block(24);
        let toks = tokens(40, TINY.vocab, 12);
        let got = candle_logits(&model, &toks, 90, Path::Fast);
        let want = oracle(&cfg, &w, &toks, 90, &[], &exact).logits;
        let at0 = oracle(&cfg, &w, &toks, 0, &[], &exact).logits;
        assert_differs(&want, &at0, 1e-2, "start position");
        let diff = max_abs_diff(&got, &want);
        assert!(diff < TOL, "{}: start 90: diff {diff:e}", cfg.recipe);
    }
}

#[test]
fn batch_rows_are_independent() {
    let cfg = config(TINY, eabf(1, ScaleLaw::Log));
    let w = random_weights(&cfg, 13);
    let written = write_model(&w, DType::F32, 1);
    let model = load(&written, &cfg, DType::F32);
    let (a, b) = (tokens(50, 64, 14), tokens(50, 64, 15));
    let both: Vec<u32> = a.iter().chain(&b).cloned().collect();
    let t = Tensor::from_vec(both, (2, 50), &Device::Cpu).expect("tokens");
    let logits = model.forward(&t, 0).expect("forward");
    for (row, toks) in [a, b].iter().enumerate() {
        let got = to_rows(&logits.narrow(0, row, 1).expect("row"));
        let want = oracle(&cfg, &w, toks, 0, &[], &exact).logits;
        assert!(max_abs_diff(&got, &want) < TOL, "batch row {row}");
    }
}

#[test]
fn sharded_checkpoint_matches_oracle() {
    let cfg = config(TINY, eabf(2, ScaleLaw::Log));
    let w = random_weights(&cfg, 16);
    let written = write_model(&w, DType::F32, 3);
    assert_eq!(written.files.len(), 3);
    let model = load(&written, &cfg, DType::F32);
    let toks = tokens(SEQ, TINY.vocab, 17);
    let diff = max_abs_diff(
        &candle_logits(&model, &toks, 0, Path::Fast),
        &oracle(&cfg, &w, &toks, 0, &[], &exact).logits,
    );
    assert!(diff < TOL, "sharded: {diff:e}");
}

// ---------------------------------------------------------------------------------------------
// bf16
// ---------------------------------------------------------------------------------------------

/// A bf16 checkpoint read into an f32 model holds exactly the bf16-rounded weights, so the f32
/// tolerance applies against the oracle on those weights.
#[test]
fn bf16_checkpoint_in_f32_matches_oracle_on_rounded_weights() {
    let cfg = config(TINY, eabf(2, ScaleLaw::Log));
    let w = random_weights(&cfg, 18);
    let written = write_model(&w, DType::BF16, 1);
    let model = load(&written, &cfg, DType::F32);
    let toks = tokens(SEQ, TINY.vocab, 19);
    let got = candle_logits(&model, &toks, 0, Path::Fast);
    let rounded = w.rounded_bf16();
    let want = oracle(&cfg, &rounded, &toks, 0, &[], &exact).logits;
    let diff = max_abs_diff(&got, &want);
    assert!(diff < TOL, "bf16 weights in f32: {diff:e}");
    // the rounding of the weights is itself visible, so the test saw the bf16 values
    let unrounded = oracle(&cfg, &w, &toks, 0, &[], &exact).logits;
    assert_differs(&want, &unrounded, 10.0 * TOL, "bf16 rounding of weights");
}

/// A bf16 model computes in bf16: every matmul output, the residual stream, q, k, v, the rotary
/// tables and the logit scale are rounded to 8 significant bits (unit roundoff u = 2^-9 ~ 0.002);
/// norms, scores and softmax are f32. Each rounding contributes a relative error up to u, and the
/// tiny model has about 8 rounding points per layer on the residual path (3 layers) plus the head,
/// about 25 in all. Independent errors add like a random walk (sqrt 25 = 5 u) but peaked attention
/// (scores of several units, where a score error of u|q||k| shifts the weights) amplifies them about
/// twofold, so about 10 u max|logit| is expected (observed: 0.083 = 10 u x 4.2). The tolerance
/// `max|logit| / 32 = 16 u max|logit|` leaves that margin; the test also shows that it can fail:
/// the logit scale's effect (what a bf16 model must not lose) is about six times the tolerance.
#[test]
fn bf16_model_matches_oracle_within_bf16_rounding() {
    let cfg = config(TINY, eabf(1, ScaleLaw::Log));
    let w = random_weights(&cfg, 20).rounded_bf16();
    let written = write_model(&w, DType::BF16, 1);
    let mut model = load(&written, &cfg, DType::BF16);
    assert_eq!(model.dtype(), DType::BF16);
    model.set_query_block(48);
    let toks = tokens(SEQ, TINY.vocab, 21);
    // the scale the model uses is rounded to bf16 (the paper's reference): the oracle does too
    let want = oracle(&cfg, &w, &toks, 0, &[], &to_bf16).logits;
    let tol = max_abs(&want) / 32.0;
    for path in [Path::Fast, Path::Differentiable] {
        let got = candle_logits(&model, &toks, 0, path);
        let diff = max_abs_diff(&got, &want);
        eprintln!("bf16 {path:?}: max abs diff {diff:.4} (tolerance {tol:.4})");
        assert!(diff < tol, "bf16 model {path:?}: diff {diff} >= {tol}");
    }
    let mut unscaled = cfg.clone();
    unscaled.recipe.scale_law = ScaleLaw::None;
    let without = oracle(&unscaled, &w, &toks, 0, &[], &to_bf16).logits;
    eprintln!(
        "bf16: logit scale moves logits by {:.4}",
        max_abs_diff(&want, &without)
    );
    assert_differs(&want, &without, 3.0 * tol, "logit scale in bf16");
}

#[test]
fn bf16_logit_scales_are_the_papers_values() {
    // method.md: with c = 4096, lambda(8192) = 1.0859375 and lambda(16384) = 1.1640625 in bf16
    let r = Recipe {
        original_context: 4096,
        context: 16384,
        ..eabf(0, ScaleLaw::Log)
    };
    let pos = abf::model::Positions::new(&r, 8, 1, 8191, 8194, DType::BF16, &Device::Cpu)
        .expect("positions");
    let s: Vec<f32> = pos
        .scale(0)
        .expect("scaled")
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1())
        .expect("scales");
    assert_eq!(s[0], 1.0859375); // p = 8191, n = 8192
    assert_eq!(s[8192], 1.1640625); // p = 16383, n = 16384
}

// ---------------------------------------------------------------------------------------------
// Paths, entropy, gradients
// ---------------------------------------------------------------------------------------------

#[test]
fn fast_and_differentiable_paths_agree_to_f32_rounding() {
    for r in [
        eabf(1, ScaleLaw::Log),
        Recipe::for_method(RopeMethod::Yarn, base()),
    ] {
        let cfg = config(TINY, r);
        let w = random_weights(&cfg, 22);
        let written = write_model(&w, DType::F32, 1);
        let mut model = load(&written, &cfg, DType::F32);
        model.set_query_block(40);
        let toks = tokens(SEQ, TINY.vocab, 23);
        let fast = candle_logits(&model, &toks, 0, Path::Fast);
        let diff = candle_logits(&model, &toks, 0, Path::Differentiable);
        let d = max_abs_diff(&fast, &diff);
        // f32 unit roundoff 6e-8 times logits of a few units and a few hundred operations
        assert!(d < 1e-5, "{}: fast vs differentiable {d:e}", cfg.recipe);
    }
}

#[test]
fn entropy_matches_oracle() {
    let shape = Shape { layers: 4, ..TINY };
    let cfg = config(shape, eabf(2, ScaleLaw::Log));
    let w = random_weights(&cfg, 24);
    let written = write_model(&w, DType::F32, 1);
    let mut model = load(&written, &cfg, DType::F32);
    model.set_query_block(32);
    let toks = tokens(SEQ, TINY.vocab, 25);
    let at = [0usize, 31, 32, 63, 100, 127];
    let t = Tensor::from_vec(toks.clone(), (1, SEQ), &Device::Cpu).expect("tokens");
    let (logits, ent) = model.forward_with_entropy(&t, &at).expect("forward");
    let want = oracle(&cfg, &w, &toks, 0, &at, &exact);
    assert!(max_abs_diff(&to_rows(&logits), &want.logits) < TOL);
    assert_eq!(ent.len(), shape.layers);
    for (l, (got, exp)) in ent.iter().zip(&want.entropy).enumerate() {
        for (k, (g, e)) in got.iter().zip(exp).enumerate() {
            assert!(
                (*g as f64 - e).abs() < 1e-4,
                "layer {l} position {}: entropy {g} vs {e}",
                at[k]
            );
        }
    }
    // a single visible key has zero entropy; later queries do not
    assert!(ent.iter().all(|l| l[0].abs() < 1e-6));
    assert!(ent.iter().all(|l| l[5] > 0.1));
    assert!(model.forward_with_entropy(&t, &[SEQ]).is_err());
}

/// Load f32 weights as candle variables (the way a trainer holds them).
fn load_vars(w: &Weights, cfg: &ModelConfig, dtype: DType) -> (Llama, Vec<(String, Var)>) {
    let mut vars = Vec::new();
    let mut map = std::collections::HashMap::new();
    for (name, (shape, vals)) in &w.0 {
        let t = Tensor::from_vec(vals.clone(), shape.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("tensor");
        let v = Var::from_tensor(&t).expect("var");
        map.insert(name.clone(), v.as_tensor().clone());
        vars.push((name.clone(), v));
    }
    let vb = VarBuilder::from_tensors(map, dtype, &Device::Cpu);
    (Llama::load(vb, cfg).expect("load"), vars)
}

#[test]
fn gradients_reach_every_weight_through_the_differentiable_path() {
    let shape = Shape { layers: 3, ..TINY };
    let cfg = config(shape, eabf(1, ScaleLaw::Log));
    let w = random_weights(&cfg, 26);
    let (model, vars) = load_vars(&w, &cfg, DType::F32);
    assert_eq!(model.named_weights().len(), vars.len());
    let toks = tokens(64, TINY.vocab, 27);
    let t = Tensor::from_vec(toks, (1, 64), &Device::Cpu).expect("tokens");
    let logits = model.forward_train(&t, 0).expect("forward");
    let loss = candle_nn::loss::cross_entropy(
        &logits.squeeze(0).expect("squeeze"),
        &Tensor::from_vec(tokens(64, TINY.vocab, 28), 64, &Device::Cpu).expect("targets"),
    )
    .expect("loss");
    let grads = loss.backward().expect("backward");
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = g
            .sqr()
            .and_then(|s| s.sum_all())
            .and_then(|s| s.to_scalar::<f32>())
            .expect("norm");
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
}

/// Gradients of the f64 differentiable path against central differences of the independent
/// oracle, for weights on the scaled attention path (q, k of a scaled layer), an exempt layer,
/// the norms and the embeddings.
#[test]
fn gradients_match_finite_differences_of_the_oracle() {
    let shape = Shape {
        layers: 2,
        hidden: 32,
        inter: 48,
        ..TINY
    };
    let cfg = config(shape, eabf(1, ScaleLaw::Log));
    let w = random_weights(&cfg, 29);
    let (model, vars) = load_vars(&w, &cfg, DType::F64);
    let n = 80; // past 2c, so lambda reaches ln 80 / ln 32 = 1.26 in layer 1
    let toks = tokens(n, shape.vocab, 30);
    // loss = sum of logits weighted by fixed random coefficients
    let mut rng = Rng(31);
    let coef: Vec<f64> = (0..n * shape.vocab).map(|_| rng.uniform()).collect();
    let t = Tensor::from_vec(toks.clone(), (1, n), &Device::Cpu).expect("tokens");
    let ct = Tensor::from_vec(coef.clone(), (1, n, shape.vocab), &Device::Cpu).expect("coef");
    let loss = (model.forward_train(&t, 0).expect("forward") * &ct)
        .and_then(|x| x.sum_all())
        .expect("loss");
    let grads = loss.backward().expect("backward");
    let oracle_loss = |w: &Weights| -> f64 {
        oracle(&cfg, w, &toks, 0, &[], &exact)
            .logits
            .iter()
            .flatten()
            .zip(&coef)
            .map(|(l, c)| l * c)
            .sum()
    };
    let probes: &[(&str, &[usize])] = &[
        ("model.layers.1.self_attn.q_proj.weight", &[0, 77, 1000]),
        ("model.layers.1.self_attn.k_proj.weight", &[5, 300]),
        ("model.layers.0.self_attn.q_proj.weight", &[9]),
        ("model.layers.1.input_layernorm.weight", &[3]),
        ("model.layers.0.post_attention_layernorm.weight", &[7]),
        ("model.norm.weight", &[11]),
        ("model.embed_tokens.weight", &[toks[5] as usize * 32 + 2]),
        ("lm_head.weight", &[40]),
    ];
    let h = 1e-5;
    for (name, idx) in probes {
        let var = &vars.iter().find(|(n, _)| n == name).expect("var").1;
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .expect("grad")
            .flatten_all()
            .and_then(|g| g.to_vec1())
            .expect("grad values");
        for &i in *idx {
            let mut plus = w.clone();
            plus.0.get_mut(*name).expect("w").1[i] += h;
            let mut minus = w.clone();
            minus.0.get_mut(*name).expect("w").1[i] -= h;
            let fd = (oracle_loss(&plus) - oracle_loss(&minus)) / (2.0 * h);
            let err = (g[i] - fd).abs();
            assert!(
                err < 1e-5 * (1.0 + fd.abs()),
                "{name}[{i}]: autodiff {} vs finite difference {fd}",
                g[i]
            );
            assert!(fd.abs() > 1e-6, "{name}[{i}]: probe has no effect");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn errors_name_the_tensor_and_the_problem() {
    let cfg = config(TINY, eabf(2, ScaleLaw::Log));
    let mut w = random_weights(&cfg, 32);
    let kept = w.clone();
    w.0.remove("model.layers.1.mlp.up_proj.weight");
    let written = write_model(&w, DType::F32, 1);
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&written.files, DType::F32, &Device::Cpu) }
            .expect("mmap");
    let err = Llama::load(vb, &cfg)
        .expect_err("missing tensor")
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");

    let mut wrong = cfg.clone();
    wrong.intermediate_size = 80;
    let written = write_model(&kept, DType::F32, 1);
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&written.files, DType::F32, &Device::Cpu) }
            .expect("mmap");
    let err = Llama::load(vb, &wrong).expect_err("shape").to_string();
    assert!(
        err.contains("gate_proj") && err.contains("96") && err.contains("80"),
        "{err}"
    );

    let model = load(&written, &cfg, DType::F32);
    let t = Tensor::from_vec(vec![1u32, 64], (1, 2), &Device::Cpu).expect("tokens");
    let err = model.forward(&t, 0).expect_err("token range").to_string();
    assert!(err.contains("64") && err.contains("vocab"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Memory of a 16k-token forward
// ---------------------------------------------------------------------------------------------

const LONG: usize = 16_384;
const MEM_SHAPE: Shape = Shape {
    vocab: 64,
    hidden: 32,
    inter: 64,
    layers: 2,
    heads: 4,
    kv: 2,
    head_dim: 8,
    tied: false,
};

/// `VmRSS` and `VmHWM` (peak resident set) of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} not in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Runs only as the child process of `forward_of_16k_tokens_runs_in_bounded_memory`, so that its
/// peak resident set is its own.
#[test]
fn memory_child_16k() {
    if std::env::var("ABF_MEMORY_CHILD").is_err() {
        return;
    }
    let cfg = config(MEM_SHAPE, eabf(2, ScaleLaw::Log));
    let w = random_weights(&cfg, 40);
    let written = write_model(&w, DType::F32, 1);
    let model = load(&written, &cfg, DType::F32);
    assert_eq!(model.query_block(), abf::model::DEFAULT_QUERY_BLOCK);
    let toks = tokens(LONG, MEM_SHAPE.vocab, 41);
    // warm up thread pools and allocator on a short prefix
    let short = Tensor::from_vec(toks[..600].to_vec(), (1, 600), &Device::Cpu).expect("tokens");
    let prefix = to_rows(&model.forward(&short, 0).expect("short forward"));
    let (before, _) = rss_kib();
    let t = Tensor::from_vec(toks, (1, LONG), &Device::Cpu).expect("tokens");
    let logits = model.forward(&t, 0).expect("16k forward");
    let (_, peak) = rss_kib();
    assert_eq!(logits.dims(), &[1, LONG, MEM_SHAPE.vocab]);
    // causality: the first 600 rows of the long forward are the short forward's
    let head = to_rows(&logits.narrow(1, 0, 600).expect("narrow"));
    assert!(
        max_abs_diff(&head, &prefix) < 1e-5,
        "prefix of the long forward"
    );
    let last = to_rows(&logits.narrow(1, LONG - 1, 1).expect("narrow"));
    assert!(last[0].iter().all(|x| x.is_finite()));
    println!("ABF_MEM before_kib={before} peak_kib={peak}");
}

/// A 16k-token forward never holds a full 16k x 16k score matrix: its peak resident set above the
/// loaded model stays under a bound derived from the blocked attention. One block's scores are
/// `S = heads * block * seq * 4 B = 4 * 512 * 16384 * 4 B = 128 MiB` (f32); the fast path holds at
/// most two of them plus the `block x seq` mask (`S / heads`), and everything else (activations,
/// logits: `16384 x 64` f32 each) is a few MiB. The bound allows a third score tensor and 64 MiB:
/// `3 S + S/4 + 64 MiB = 480 MiB`, against 4 GiB for the full matrix of all heads (1 GiB for a
/// single head).
#[test]
fn forward_of_16k_tokens_runs_in_bounded_memory() {
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "memory_child_16k",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("ABF_MEMORY_CHILD", "1")
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("ABF_MEM ").map(|(_, m)| m))
        .unwrap_or_else(|| panic!("no measurement in child output: {stdout}"));
    let num = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .expect("number")
    };
    let (before, peak) = (num("before_kib="), num("peak_kib="));
    let s = (MEM_SHAPE.heads * abf::model::DEFAULT_QUERY_BLOCK * LONG * 4) as u64;
    let bound = 3 * s + s / MEM_SHAPE.heads as u64 + (64 << 20);
    let full = (MEM_SHAPE.heads * LONG * LONG * 4) as u64;
    let grew = (peak.saturating_sub(before)) << 10;
    eprintln!(
        "16k forward: resident {} MiB before, peak {} MiB, growth {} MiB (bound {} MiB, full matrix {} MiB)",
        before >> 10,
        peak >> 10,
        grew >> 20,
        bound >> 20,
        full >> 20
    );
    assert!(grew < bound, "peak growth {grew} B exceeds {bound} B");
}
