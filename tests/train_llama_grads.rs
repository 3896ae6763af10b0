//! The real model (`abf::model`) under training: recomputation and scaled attention against
//! finite differences, and the logit scale reaching the gradient.

mod common;

use abf::model::Llama;
use abf::rope::ScaleLaw;
use abf::rope::{BaseRope, Recipe, RopeMethod};
use abf::train::data::SplitMix64;
use abf::train::examples::Example;
use abf::train::hf::LlamaLayers;
use abf::train::{loss_and_grads, BackwardPlan, Batch, GradAcc, ParamSet};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::model::TinyModel;
use common::tokenizer::train_tokenizer;
use common::toy::flat;

/// A tiny LLaMA on disk, its config with an eabf recipe whose window c = 32 makes the logit
/// scale exceed 1 within the test sequences, and its weights in `dtype`.
fn tiny_llama(
    dtype: DType,
    skip: usize,
) -> (
    tempfile::TempDir,
    abf::checkpoint::ModelConfig,
    Vec<(String, Tensor)>,
) {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::chat(train_tokenizer(400))
        .seed(11)
        .write(dir.path());
    let mut cfg = abf::checkpoint::ModelConfig::load(dir.path()).unwrap();
    let mut r = Recipe::for_method(
        RopeMethod::Eabf,
        BaseRope {
            base: 10000.0,
            context: 32,
        },
    );
    r.skip_layers = skip;
    cfg.recipe = r;
    let w = abf::train::hf::load_weights(dir.path(), &cfg, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(dtype).unwrap()))
        .collect();
    (dir, cfg, w)
}

fn llama_batch() -> Batch {
    let mut rng = SplitMix64(3);
    let n = 48;
    let tokens: Vec<u32> = (0..n).map(|_| 5 + rng.below(300) as u32).collect();
    let mask = (0..n).map(|j| j % 3 != 0).collect();
    let e = Example { tokens, mask };
    Batch::from_examples(&[&e], &Device::Cpu).unwrap()
}

fn llama_loss_grads(
    cfg: &abf::checkpoint::ModelConfig,
    w: Vec<(String, Tensor)>,
    plan: BackwardPlan,
) -> (ParamSet, f64, Vec<Tensor>) {
    llama_loss_grads_at(
        cfg,
        w,
        plan,
        abf::model::DEFAULT_QUERY_BLOCK,
        &llama_batch(),
    )
}

/// Loss and gradients with attention computed in blocks of `block` query rows.
fn llama_loss_grads_at(
    cfg: &abf::checkpoint::ModelConfig,
    w: Vec<(String, Tensor)>,
    plan: BackwardPlan,
    block: usize,
    batch: &Batch,
) -> (ParamSet, f64, Vec<Tensor>) {
    let set = ParamSet::full(w, DType::F64).unwrap();
    set_loss_grads(cfg, set, DType::F64, plan, block, batch)
}

/// Loss and gradients of a parameter set whose model computes in `dtype`.
fn set_loss_grads(
    cfg: &abf::checkpoint::ModelConfig,
    set: ParamSet,
    dtype: DType,
    plan: BackwardPlan,
    block: usize,
    batch: &Batch,
) -> (ParamSet, f64, Vec<Tensor>) {
    let vb = VarBuilder::from_tensors(set.weight_map().unwrap(), dtype, &Device::Cpu);
    let mut model = LlamaLayers::new(Llama::load(vb, cfg).unwrap());
    model.set_query_block(block);
    let mut acc = GradAcc::new(set.params.len());
    let loss = loss_and_grads(&model, batch, 0.05, &set.params, &mut acc, plan).unwrap();
    let g = acc.finish(&set.params).unwrap();
    (set, loss, g)
}

#[test]
fn llama_recomputation_and_scaled_attention_match_finite_differences() {
    let (_d, cfg, w) = tiny_llama(DType::F64, 1);
    let plain = BackwardPlan {
        recompute: false,
        head_chunk: 1 << 20,
        blocked_attention: false,
    };
    let rec = BackwardPlan {
        recompute: true,
        head_chunk: 16,
        blocked_attention: true,
    };
    let (set, l0, g0) = llama_loss_grads(&cfg, w.clone(), plain);
    let (_, l1, g1) = llama_loss_grads(&cfg, w.clone(), rec);
    assert!((l0 - l1).abs() < 1e-12 * l0.abs(), "{l0} {l1}");
    assert_same_grads(&set, &g0, &g1, 1e-12, "recomputed");
    // central differences in f64 through the whole recipe-driven forward (rope with the ABF
    // base, logit scale lambda(p+1) = ln(p+1)/ln 32 > 1 past position 31 on layers 1 and 2)
    let checked = check_central_differences(
        &set,
        &g1,
        &w,
        &[
            "model.layers.2.self_attn.q_proj.weight",
            "model.layers.2.self_attn.k_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.2.input_layernorm.weight",
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        ],
        // the largest-gradient entry and two fixed ones
        &|n| vec![7 % n, n - 1],
        &|w2| llama_loss_grads(&cfg, w2, plain).1,
    );
    assert_eq!(checked, 27);
}

#[test]
fn logit_scaling_reaches_the_gradient() {
    // same weights and base; eabf (scaled) against abf (unscaled) must give different gradients
    // for the scaled layers, and identical ones when the scale is 1 everywhere (short sequence
    // in the window)
    let (_d, cfg, w) = tiny_llama(DType::F64, 0);
    let mut abf_cfg = cfg.clone();
    abf_cfg.recipe.method = RopeMethod::Abf;
    abf_cfg.recipe.scale_law = abf::rope::ScaleLaw::None;
    let plan = BackwardPlan::default();
    let (set, _, ge) = llama_loss_grads(&cfg, w.clone(), plan);
    let (_, _, ga) = llama_loss_grads(&abf_cfg, w, plan);
    let qi = set
        .params
        .iter()
        .position(|p| p.name == "model.layers.2.self_attn.q_proj.weight")
        .unwrap();
    let diff = flat(&ge[qi])
        .iter()
        .zip(flat(&ga[qi]))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff > 1e-6, "{diff}");
}

/// A batch of `n` tokens with every third target masked.
fn batch_of(n: usize, seed: u64) -> Batch {
    let mut rng = SplitMix64(seed);
    let tokens: Vec<u32> = (0..n).map(|_| 5 + rng.below(300) as u32).collect();
    let mask = (0..n).map(|j| j % 3 != 0).collect();
    Batch::from_examples(&[&Example { tokens, mask }], &Device::Cpu).unwrap()
}

/// Every gradient of `a` equals `b`'s to `tol` relative (plus `tol` absolute).
fn assert_same_grads(set: &ParamSet, a: &[Tensor], b: &[Tensor], tol: f64, what: &str) {
    for (p, (a, b)) in set.params.iter().zip(a.iter().zip(b)) {
        for (x, y) in flat(a).iter().zip(flat(b)) {
            assert!(
                (x - y).abs() < tol * (1.0 + x.abs()),
                "{what}: {}: {x} {y}",
                p.name
            );
        }
    }
}

/// Attention rebuilt one query block at a time in the backward gives the gradients of one graph
/// of the whole forward (f64, to rounding), for eabf's log law with 2 exempt layers, the step law
/// runtimes evaluate and plain ABF, at lengths that are not multiples of the block and with
/// blocks of one row; and matches central differences on the weights attention's gradient flows
/// through (q and k of a scaled layer, v, the norm before attention).
#[test]
fn blocked_attention_backward_equals_the_whole_graph() {
    let (_d, base_cfg, w) = tiny_llama(DType::F64, 2);
    let mut step = base_cfg.clone();
    step.recipe.scale_law = ScaleLaw::Step {
        beta: 0.25,
        length: 16,
    };
    step.recipe.skip_layers = 0;
    let mut abf_cfg = base_cfg.clone();
    abf_cfg.recipe.method = RopeMethod::Abf;
    abf_cfg.recipe.scale_law = ScaleLaw::None;
    abf_cfg.recipe.skip_layers = 0;
    let whole = BackwardPlan {
        recompute: false,
        head_chunk: 1 << 20,
        blocked_attention: false,
    };
    let blocked = BackwardPlan {
        recompute: true,
        head_chunk: 13,
        blocked_attention: true,
    };
    for (name, cfg) in [
        ("log, 2 exempt", &base_cfg),
        ("step", &step),
        ("abf", &abf_cfg),
    ] {
        for (n, block) in [(48usize, 16usize), (71, 16), (40, 1), (30, 64)] {
            let batch = batch_of(n, n as u64);
            let (set, l0, g0) = llama_loss_grads_at(cfg, w.clone(), whole, block, &batch);
            let (_, l1, g1) = llama_loss_grads_at(cfg, w.clone(), blocked, block, &batch);
            assert!((l0 - l1).abs() < 1e-12 * l0.abs(), "{name}: {l0} {l1}");
            let what = format!("{name}, {n} tokens, block {block}");
            assert_same_grads(&set, &g0, &g1, 1e-11, &what);
        }
    }
    // central differences through the blocked path itself (log law, 2 exempt, 70 tokens in
    // blocks of 16: layer 2's scale ln(p+1)/ln 32 > 1 past position 31)
    let batch = batch_of(70, 5);
    let (set, _, g) = llama_loss_grads_at(&base_cfg, w.clone(), blocked, 16, &batch);
    let checked = check_central_differences(
        &set,
        &g,
        &w,
        &[
            "model.layers.2.self_attn.q_proj.weight",
            "model.layers.2.self_attn.k_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.layers.2.input_layernorm.weight",
        ],
        &|n| vec![n / 2],
        &|w2| llama_loss_grads_at(&base_cfg, w2, blocked, 16, &batch).1,
    );
    assert_eq!(checked, 8);
}

/// The layer backward written out by hand in f32 (the fused CPU kernels for the norms and SwiGLU)
/// gives the f64 whole-graph gradients to f32 rounding; and under LoRA (adapters of every
/// projection, B made non-zero so A's gradient is too) its weight gradients reach A and B
/// through the merge exactly as one graph of the whole forward does (f64).
#[test]
fn f32_kernels_and_lora_backward_equal_the_whole_graph() {
    let (_d, cfg, w) = tiny_llama(DType::F64, 1);
    let whole = BackwardPlan {
        recompute: false,
        head_chunk: 1 << 20,
        blocked_attention: false,
    };
    let blocked = BackwardPlan {
        recompute: true,
        head_chunk: 16,
        blocked_attention: true,
    };
    let batch = batch_of(70, 9);
    let (set, l64, g64) = llama_loss_grads_at(&cfg, w.clone(), whole, 16, &batch);
    let w32 = w
        .iter()
        .map(|(n, t)| (n.clone(), t.to_dtype(DType::F32).unwrap()))
        .collect();
    let set32 = ParamSet::full(w32, DType::F32).unwrap();
    let (_, l32, g32) = set_loss_grads(&cfg, set32, DType::F32, blocked, 16, &batch);
    assert!((l64 - l32).abs() < 1e-5 * l64.abs(), "{l64} {l32}");
    for (p, (a, b)) in set.params.iter().zip(g64.iter().zip(&g32)) {
        let (a, b) = (flat(a), flat(b));
        let scale = a.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-4 * scale, "f32 {}: {worst} of {scale}", p.name);
    }
    let lora = |plan| {
        let cfg_l = abf::train::LoraConfig {
            rank: 3,
            alpha: 6.0,
        };
        let set = ParamSet::lora(w.clone(), DType::F64, cfg_l, 4).unwrap();
        let mut rng = SplitMix64(8);
        for p in set
            .params
            .iter()
            .filter(|p| p.name.ends_with("lora_B.weight"))
        {
            let n = p.var.elem_count();
            let v: Vec<f64> = (0..n).map(|_| rng.below(2001) as f64 / 1e4 - 0.1).collect();
            p.var
                .set(&Tensor::from_vec(v, p.var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        set_loss_grads(&cfg, set, DType::F64, plan, 16, &batch)
    };
    let (set, l0, g0) = lora(whole);
    let (_, l1, g1) = lora(blocked);
    assert!((l0 - l1).abs() < 1e-12 * l0.abs(), "{l0} {l1}");
    assert_same_grads(&set, &g0, &g1, 1e-11, "lora");
    let a_grad = set
        .params
        .iter()
        .position(|p| p.name == "model.layers.1.mlp.up_proj.lora_A.weight")
        .unwrap();
    assert!(flat(&g1[a_grad]).iter().any(|v| v.abs() > 1e-9));
}

/// Central differences (step 1e-6, f64) of `loss` against the analytic `grads` of each named
/// weight, at its largest-gradient entry and at `more(len)`; returns how many entries were checked.
fn check_central_differences(
    set: &ParamSet,
    grads: &[Tensor],
    w: &[(String, Tensor)],
    names: &[&str],
    more: &dyn Fn(usize) -> Vec<usize>,
    loss: &dyn Fn(Vec<(String, Tensor)>) -> f64,
) -> usize {
    let h = 1e-6;
    let loss_with = |name: &str, j: usize, d: f64| -> f64 {
        let mut w2 = w.to_vec();
        let t = &mut w2.iter_mut().find(|(n, _)| n == name).unwrap().1;
        let mut v = flat(t);
        v[j] += d;
        *t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
        loss(w2)
    };
    let mut checked = 0;
    for &name in names {
        let pi = set.params.iter().position(|p| p.name == name).unwrap();
        let g = flat(&grads[pi]);
        let big = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for j in std::iter::once(big).chain(more(g.len())) {
            let fd = (loss_with(name, j, h) - loss_with(name, j, -h)) / (2.0 * h);
            assert!(
                (fd - g[j]).abs() < 1e-7 + 1e-5 * fd.abs(),
                "{name}[{j}]: fd {fd} analytic {}",
                g[j]
            );
            checked += 1;
        }
    }
    checked
}
