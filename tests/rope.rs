//! The recipe's numbers against values derived independently (method.md, and transformers'
//! formulas evaluated by hand in Python's f64), plus the flags / config-block round trips.

use abf::cli::RecipeArgs;
use abf::rope::{runtime_form, BaseRope, Gap, Recipe, RopeMethod, ScaleLaw, Target};

const LLAMA2: BaseRope = BaseRope {
    base: 10_000.0,
    context: 4096,
};

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-300)
}

fn recipe(args: &[&str]) -> Recipe {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        r: RecipeArgs,
    }
    let mut argv = vec!["t"];
    argv.extend_from_slice(args);
    P::parse_from(argv)
        .r
        .resolve(None, LLAMA2)
        .expect("valid recipe")
}

#[test]
fn ntk_aware_base_is_40890_for_s4() {
    let r = recipe(&["--method", "ntk", "--factor", "4"]);
    // method.md: b' = b * s^(d/(d-2)) = 40,890 for s = 4, b = 1e4, d = 128
    let b = r.effective_base(128, None);
    assert!(close(b, 40_889.942_432_486_22, 1e-12), "{b}");
    assert_eq!(r.context, 16384);
    let f = r.inv_freq(128, None);
    assert!(close(
        f[1],
        40_889.942_432_486_22f64.powf(-2.0 / 128.0),
        1e-12
    ));
}

#[test]
fn yarn_range_mscale_and_blend() {
    let (low, high) = abf::rope::yarn_range(32.0, 1.0, 128, 1e4, 4096);
    assert_eq!((low, high), (20.0, 46.0));
    let r = recipe(&["--method", "yarn", "--factor", "4"]);
    assert!(close(r.attention_factor(), 1.138_629_436_111_989, 1e-14));
    // logits grow by mscale^2
    assert!(close(
        r.attention_factor().powi(2),
        1.296_476_992_780_706_3,
        1e-12
    ));
    let f = r.inv_freq(128, None);
    let expect = [
        (0, 1.0),
        (19, 0.064_938_163_157_621_13),
        (20, 0.056_234_132_519_034_91),
        (30, 0.009_488_517_882_700_576),
        (46, 0.000_333_380_358_040_831),
        (63, 2.886_954_961_723_645_5e-05),
    ];
    for (j, v) in expect {
        assert!(close(f[j], v, 1e-12), "j {j}: {} vs {v}", f[j]);
    }
    // NTK-by-parts: same frequencies, no attention factor
    let p = recipe(&["--method", "ntk-by-parts", "--factor", "4"]);
    assert_eq!(p.inv_freq(128, None), f);
    assert_eq!(p.attention_factor(), 1.0);
}

#[test]
fn linear_divides_every_frequency() {
    let r = recipe(&["--method", "linear", "--context", "16384"]);
    assert_eq!(r.factor, 4.0);
    for (j, f) in r.inv_freq(128, None).iter().enumerate() {
        let plain = 1e4f64.powf(-((2 * j) as f64) / 128.0);
        assert!(close(*f, plain / 4.0, 1e-14));
    }
}

#[test]
fn dynamic_ntk_follows_sequence_length() {
    let r = recipe(&["--method", "dynamic", "--factor", "4"]);
    // at or below L the base is unchanged
    assert_eq!(r.effective_base(128, Some(100)), 1e4);
    assert!(close(r.effective_base(128, Some(4096)), 1e4, 1e-15));
    // at 8192: b * (4 * 2 - 3)^(128/126)
    assert!(close(
        r.effective_base(128, Some(8192)),
        51_293.787_268_152_44,
        1e-12
    ));
}

#[test]
fn llama3_bands() {
    let r = recipe(&[
        "--method",
        "llama3",
        "--rope-base",
        "500000",
        "--factor",
        "8",
        "--original-context",
        "8192",
    ]);
    let f = r.inv_freq(128, None);
    let expect = [
        (0, 1.0),
        (10, 0.128_687_373_432_650_52),
        (28, 0.003_211_445_994_752_591),
        (31, 0.000_856_751_412_919_632_1),
        (33, 0.000_312_693_750_384_065_17),
        (35, 9.556_212_353_964_683e-05),
        (63, 3.068_925_988_914_511e-07),
    ];
    for (j, v) in expect {
        assert!(close(f[j], v, 1e-12), "j {j}: {} vs {v}", f[j]);
    }
}

#[test]
fn eabf_defaults_follow_the_paper() {
    let r = recipe(&["--method", "eabf"]);
    assert_eq!(r.rope_base, 500_000.0);
    assert_eq!(r.scale_law, ScaleLaw::Log);
    assert_eq!(r.skip_layers, 2);
    assert_eq!(r.context, 4 * 4096);
    assert_eq!(r.factor, 1.0);
    // theta_j = 500000^(-2j/128)
    assert!(close(
        r.inv_freq(128, None)[32],
        500_000f64.powf(-0.5),
        1e-14
    ));
    // exempt layers stay at 1
    assert_eq!(r.logit_scale(0, 16383), 1.0);
    assert_eq!(r.logit_scale(1, 16383), 1.0);
    // log law: lambda(16384) = 14/12, lambda(32768) = 15/12, 1 inside the window
    assert!(close(r.logit_scale(2, 16383), 7.0 / 6.0, 1e-14));
    assert!(close(r.logit_scale(5, 32767), 1.25, 1e-14));
    assert!(close(r.logit_scale(2, 8191), 13.0 / 12.0, 1e-14));
    assert_eq!(r.logit_scale(2, 4095), 1.0);
    assert_eq!(r.logit_scale(2, 0), 1.0);
    // the reference patch's behaviour: every layer scaled
    let all = recipe(&["--method", "eabf", "--skip-layers", "0"]);
    assert!(close(all.logit_scale(0, 16383), 7.0 / 6.0, 1e-14));
}

#[test]
fn step_law_meets_log_law_at_multiples_of_c() {
    let r = recipe(&["--method", "abf", "--scale-law", "step"]);
    assert_eq!(r.skip_layers, 0);
    let ScaleLaw::Step { beta, length } = r.scale_law else {
        panic!("step law expected")
    };
    assert!(close(beta, 1.0 / 4096f64.ln(), 1e-15));
    assert_eq!(length, 4096);
    let log = recipe(&["--method", "eabf", "--skip-layers", "0"]);
    for k in 1..=8u64 {
        let p = k * 4096 - 1;
        assert!(
            close(r.logit_scale(0, p), log.logit_scale(0, p), 1e-14),
            "k {k}"
        );
    }
    // below c: 1; just past c: 1 + ln 2 / ln c = 13/12, where the log law is still ~1
    assert_eq!(r.logit_scale(0, 4095), 1.0);
    assert!(close(r.logit_scale(0, 4096), 13.0 / 12.0, 1e-14));
    assert!(close(
        r.logit_scale(0, 16383),
        1.0 + 4f64.ln() / 4096f64.ln(),
        1e-14
    ));
    // explicit beta and L
    let e = recipe(&[
        "--method",
        "abf",
        "--scale-law",
        "step",
        "--beta",
        "0.1",
        "--scale-length",
        "1000",
    ]);
    assert!(close(e.logit_scale(3, 2500), 1.0 + 0.1 * 3f64.ln(), 1e-14));
}

#[test]
fn bad_recipes_are_refused() {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        r: RecipeArgs,
    }
    let bad = |args: &[&str]| {
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        let p = P::try_parse_from(argv);
        match p {
            Err(_) => true,
            Ok(p) => p.r.resolve(None, LLAMA2).is_err(),
        }
    };
    assert!(bad(&["--method", "bogus"]));
    assert!(bad(&["--method", "abf", "--context", "1024"]));
    assert!(bad(&[
        "--method",
        "yarn",
        "--beta-fast",
        "1",
        "--beta-slow",
        "2"
    ]));
    assert!(bad(&["--method", "abf", "--rope-base", "-3"]));
    assert!(bad(&["--method", "eabf", "--beta", "0.1"]));
    assert!(bad(&["--scale-law", "cubic"]));
}

#[test]
fn config_block_round_trips_every_method() {
    for m in RopeMethod::ALL {
        for law in ["none", "log", "step"] {
            let r = recipe(&["--method", m.name(), "--scale-law", law]);
            let block = r.to_json_block();
            let back = Recipe::from_json_block("config.json", &block).unwrap();
            assert_eq!(back, r, "{m} {law}");
            let text = serde_json::to_string(&block).unwrap();
            let reparsed: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                Recipe::from_json_block("config.json", &reparsed).unwrap(),
                r
            );
        }
    }
}

#[test]
fn config_block_errors_name_the_field() {
    let block = serde_json::json!({"method": "abf", "rope_base": "big", "original_context": 4096});
    let err = Recipe::from_json_block("m/config.json", &block)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("m/config.json") && err.contains("rope_base"),
        "{err}"
    );
    let block = serde_json::json!({"method": "abf", "rope_base": 5e5});
    let err = Recipe::from_json_block("m/config.json", &block)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("original_context") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn flags_override_a_model_recipe() {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        r: RecipeArgs,
    }
    let current = Recipe::for_method(RopeMethod::Eabf, LLAMA2);
    let p = P::parse_from(["t", "--skip-layers", "0"]);
    let r = p.r.resolve(Some(&current), LLAMA2).unwrap();
    assert_eq!(r.skip_layers, 0);
    assert_eq!(r.rope_base, 500_000.0);
    assert_eq!(r.scale_law, ScaleLaw::Log);
    let p = P::parse_from(["t", "--scale-law", "step"]);
    let r = p.r.resolve(Some(&current), LLAMA2).unwrap();
    assert_eq!(r.skip_layers, 0);
    assert!(matches!(r.scale_law, ScaleLaw::Step { length: 4096, .. }));
    assert!(RecipeArgs::default().is_empty());
    assert_eq!(
        RecipeArgs::default()
            .resolve(Some(&current), LLAMA2)
            .unwrap(),
        current
    );
}

#[test]
fn runtime_gaps_name_log_law_and_exempt_layers() {
    let r = recipe(&["--method", "eabf"]);
    for target in [Target::LlamaCpp, Target::Transformers] {
        let gaps = runtime_form(&r, target, 128).gaps();
        assert_eq!(gaps, vec![Gap::LogLaw, Gap::ExemptLayers], "{target}");
    }
    let s = recipe(&["--method", "abf", "--scale-law", "step"]);
    assert!(runtime_form(&s, Target::LlamaCpp, 128).is_exact());
}
