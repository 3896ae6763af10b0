//! The candle forward against the independent f64 oracle of tests/common/oracle.rs: every rope
//! method and scale law (frequencies, YaRN, Llama 3, linear/NTK/dynamic, log and step laws) and
//! start positions.

mod common;

use abf::model::Path;
use abf::rope::{BaseRope, Recipe, RopeMethod, ScaleLaw};
use candle_core::DType;
use common::oracle::*;

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
