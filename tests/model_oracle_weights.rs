//! The candle forward against the independent f64 oracle of tests/common/oracle.rs: sharded
//! and bf16 checkpoints, bf16 logit scales, and load errors naming the tensor.

mod common;

use abf::model::{Llama, Path};
use abf::rope::{Recipe, ScaleLaw};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::oracle::*;

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
