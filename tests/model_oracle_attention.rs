//! The candle forward against the independent f64 oracle of tests/common/oracle.rs: grouped,
//! multi-query and multi-head attention, tied embeddings, query blocks, batch rows, the fast and
//! differentiable paths, attention entropy.

mod common;

use abf::model::Path;
use abf::rope::{Recipe, RopeMethod, ScaleLaw};
use candle_core::{DType, Device, Tensor};
use common::oracle::*;

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
