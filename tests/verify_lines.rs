//! The verifier's lines and the runtime arithmetic it reproduces, against independent facts:
//! ggml-cpu's `vec_dot_type` table written out by hand, activation rounding recomputed here from
//! ggml's reference formulas, and the stated rules of every line (docs/verifier.md).

mod common;

use abf::gguf::{types, GgmlType};
use abf::model::round_activations;
use abf::runtime::llamacpp_activation_type;
use abf::verify::lines::{
    LineRule, PassLines, TypeClass, ARITHMETIC_FACTOR, KLD_FLOOR, PLAIN_FACTOR,
};
use candle_core::{Device, Tensor};
use common::rng::Rng;

fn ty(name: &str) -> GgmlType {
    GgmlType::from_name(name).unwrap()
}

#[test]
fn activation_types_are_ggml_cpu_vec_dot_types() {
    // ggml/src/ggml-cpu/ggml-cpu.c, type_traits_cpu[].vec_dot_type (q8_1 values equal q8_0's)
    let table = [
        ("F32", None),
        ("F16", Some("F16")),
        ("BF16", Some("BF16")),
        ("Q4_0", Some("Q8_0")),
        ("Q4_1", Some("Q8_0")),
        ("Q5_0", Some("Q8_0")),
        ("Q5_1", Some("Q8_0")),
        ("Q8_0", Some("Q8_0")),
        ("Q2_K", Some("Q8_K")),
        ("Q3_K", Some("Q8_K")),
        ("Q4_K", Some("Q8_K")),
        ("Q5_K", Some("Q8_K")),
        ("Q6_K", Some("Q8_K")),
    ];
    for (w, a) in table {
        assert_eq!(
            llamacpp_activation_type(ty(w)).map(|t| t.to_string()),
            a.map(String::from),
            "{w}"
        );
    }
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.uniform() * 3.0) as f32).collect()
}

fn rounded(x: &[f32], rows: usize, t: GgmlType) -> Vec<f32> {
    let k = x.len() / rows;
    let t_in = Tensor::from_vec(x.to_vec(), (rows, k), &Device::Cpu).unwrap();
    round_activations(&t_in, t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn activation_rounding_follows_ggml_reference_formulas() {
    let x = data(2 * 512, 3);
    // f16: round to nearest even, per element
    let got = rounded(&x, 2, types::F16.ty());
    for (g, v) in got.iter().zip(&x) {
        assert_eq!(*g, half::f16::from_f32(*v).to_f32());
    }
    // q8_0 (ggml quantize_row_q8_0_ref): per 32, d = amax / 127 stored as f16, q = round(x / d)
    let got = rounded(&x, 2, types::Q8_0.ty());
    for (b, (gs, xs)) in got.chunks(32).zip(x.chunks(32)).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let d16 = half::f16::from_f32(d).to_f32();
        for (g, v) in gs.iter().zip(xs) {
            let q = (f64::from(*v) / f64::from(d)).round();
            let want = (f64::from(d16) * q) as f32;
            assert!(
                (g - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "block {b}: {g} vs {want}"
            );
        }
    }
    // q8_K (ggml quantize_row_q8_K_ref): per 256, the signed extreme maps to -127,
    // d = 1 / iscale kept in f32
    let got = rounded(&x, 2, types::Q8_K.ty());
    for (gs, xs) in got.chunks(256).zip(x.chunks(256)) {
        let max = xs
            .iter()
            .copied()
            .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
        let iscale = -127.0 / f64::from(max);
        for (g, v) in gs.iter().zip(xs) {
            let q = (iscale * f64::from(*v)).round().min(127.0);
            let want = q / iscale;
            assert!(
                (f64::from(*g) - want).abs() <= 1e-5 * want.abs().max(1e-3),
                "{g} vs {want}"
            );
        }
    }
}

#[test]
fn lines_follow_their_stated_rules() {
    let small = 100_000_000;
    let large = 8_000_000_000;
    // f32 / f16 keep the conversion-check lines at any size
    for p in [small, large] {
        let l = PassLines::for_type(types::F32.ty(), p);
        assert_eq!((l.rule, l.max_nmse), (LineRule::Anchor, Some(1e-6)));
        let l = PassLines::for_type(types::F16.ty(), p);
        assert_eq!((l.max_nmse, l.min_top1), (Some(1e-4), Some(0.995)));
    }
    // 7-8B quantized types with a published anchor keep it
    let l = PassLines::for_type(types::Q8_0.ty(), large);
    assert_eq!((l.rule, l.max_kld), (LineRule::Anchor, Some(5e-3)));
    let l = PassLines::for_type(types::Q4_K.ty(), large);
    assert_eq!((l.rule, l.max_kld), (LineRule::Anchor, Some(5e-2)));
    // no anchor (q2_k, q3_k at any size; every quantized type of a small model): measured
    for (t, p) in [
        (types::Q2_K.ty(), large),
        (types::Q3_K.ty(), large),
        (types::Q8_0.ty(), small),
        (types::Q4_K.ty(), small),
        (types::Q2_K.ty(), small),
    ] {
        let l = PassLines::for_type(t, p);
        assert_eq!(l.rule, LineRule::Plain, "{t}");
        assert!(l.needs_plain());
        let l = l.with_plain(0.01);
        assert!(!l.needs_plain());
        assert_eq!(l.max_kld, Some(PLAIN_FACTOR * 0.01 + KLD_FLOOR));
        // a backend adds its arithmetic, anchored lines do not
        let b = l.for_backend(0.002);
        assert_eq!(
            b.max_kld,
            Some(PLAIN_FACTOR * 0.01 + KLD_FLOOR + ARITHMETIC_FACTOR * 0.002)
        );
    }
    assert_eq!(TypeClass::of(types::Q3_K.ty()), TypeClass::LowBit);
    let a = PassLines::for_type(types::Q8_0.ty(), large).for_backend(0.002);
    assert_eq!(a.max_kld, Some(5e-3));
    // an override is its own rule
    let o = PassLines::for_type(types::Q8_0.ty(), small).with_overrides(None, Some(0.1), None);
    assert_eq!(
        (o.rule, o.max_kld, o.needs_plain()),
        (LineRule::Override, Some(0.1), false)
    );
}

fn band(kld: f64, nmse: f64, top1: f64) -> abf::verify::BandMetrics {
    abf::verify::BandMetrics {
        band: abf::verify::Band {
            start: 64,
            end: 128,
        },
        positions: 64,
        nmse,
        max_abs_diff: 0.0,
        kld_mean: kld,
        kld_p99: kld,
        kld_max: kld,
        top1,
        ppl_ratio: 1.0,
        non_finite_rows: 0,
    }
}

fn failed(checks: &[abf::verify::Check]) -> Vec<&'static str> {
    checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.metric)
        .collect()
}

#[test]
fn consistency_rule_separates_a_runtime_noise_from_a_recipe_fault() {
    use abf::verify::lines::{consistency, ROUNDING_FACTOR};
    let rule = abf::verify::LongContextRule::default();
    let rounding = band(1e-4, 6e-5, 0.99);
    let reading = band(1.2e-4, 7e-5, 0.98);
    // the runtime's own noise: the reference recipe costs what the reading costs
    assert!(failed(&consistency(&reading, &reading, &rounding, &rule)).is_empty());
    // a fault adds more than (ratio - 1) x the noise: 4.6e-4 against 3 x 1.2e-4 + 1e-6
    let fault = band(4.6e-4, 2.8e-4, 0.97);
    assert_eq!(
        failed(&consistency(&fault, &reading, &rounding, &rule)),
        ["nmse_vs_reading", "kld_vs_reading"]
    );
    // a runtime that does not compute its own keys: its reading exceeds twice the rounding cost
    let misread = band(ROUNDING_FACTOR * 1e-4 + 2e-6, 7e-5, 0.98);
    assert_eq!(
        failed(&consistency(&misread, &misread, &rounding, &rule)),
        ["reading_kld"]
    );
    // our own reading rounds nothing: any difference is a fault
    let zero = band(0.0, 0.0, 1.0);
    assert_eq!(
        failed(&consistency(&band(2e-6, 2e-7, 1.0), &zero, &zero, &rule)),
        ["kld_vs_reading"]
    );
}
