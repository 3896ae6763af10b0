//! What each runtime runs: `rope::runtime_form` pinned over every method x scale law x target,
//! and the writers held to it: the GGUF keys read back the way llama.cpp reads them, and the
//! config.json fields read back the way transformers reads them, compute the form's recipe.

use std::path::Path;

use abf::checkpoint::{patch_config, HfConfig};
use abf::gguf::keys::ArchKey;
use abf::gguf::{apply_recipe, runtime_recipe, Metadata};
use abf::rope::{runtime_form, BaseRope, Gap, Recipe, RopeMethod, ScaleLaw, Target};
use serde_json::json;

const C: u64 = 4096;
const D: usize = 128;
const MODEL: BaseRope = BaseRope {
    base: 10_000.0,
    context: C,
};

/// Scale-law codes of the table: N none, G log with layers 0-1 exempt, S step with L = c,
/// T step with L = c / 2.
fn with_law(method: RopeMethod, law: char) -> Recipe {
    let mut r = Recipe::for_method(method, MODEL);
    (r.scale_law, r.skip_layers) = match law {
        'N' => (ScaleLaw::None, 0),
        'G' => (ScaleLaw::Log, 2),
        'S' => (Recipe::default_step(C), 0),
        'T' => (
            ScaleLaw::Step {
                beta: 0.12,
                length: C / 2,
            },
            0,
        ),
        other => panic!("law code {other}"),
    };
    r
}

use Gap::{DynamicNtk as Dyn, ExemptLayers as Ex, LogLaw as Log, StepLength as Len};

/// One row of TABLE.
type Row = (
    &'static str,
    char,
    &'static [Gap],
    &'static str,
    &'static [Gap],
    &'static str,
);

/// (method, law, llama.cpp gaps, llama.cpp's method, transformers gaps, transformers' method).
/// Hand-derived from the runtimes' sources: llama.cpp has no dynamic NTK and reads c and the
/// step law's L from rope.scaling.original_context_length (which we write for linear and yarn);
/// transformers' ministral3 reads both from original_max_position_embeddings, which its yarn,
/// llama3 and dynamic ropes also read; neither evaluates the log law nor exempts layers; static
/// NTK is plain rope with its base everywhere.
#[rustfmt::skip]
const TABLE: &[Row] = &[
    ("default", 'N', &[], "default", &[], "default"),
    ("default", 'G', &[Log, Ex], "default", &[Log, Ex], "default"),
    ("default", 'S', &[], "default", &[], "default"),
    ("default", 'T', &[], "default", &[], "default"),
    ("linear", 'N', &[], "linear", &[], "linear"),
    ("linear", 'G', &[Log, Ex], "linear", &[Log, Ex], "linear"),
    ("linear", 'S', &[], "linear", &[], "linear"),
    ("linear", 'T', &[Len], "linear", &[], "linear"),
    ("ntk", 'N', &[], "default", &[], "default"),
    ("ntk", 'G', &[Log, Ex], "default", &[Log, Ex], "default"),
    ("ntk", 'S', &[], "default", &[], "default"),
    ("ntk", 'T', &[], "default", &[], "default"),
    ("dynamic", 'N', &[Dyn], "default", &[], "dynamic"),
    ("dynamic", 'G', &[Log, Ex, Dyn], "default", &[Log, Ex], "dynamic"),
    ("dynamic", 'S', &[Dyn], "default", &[], "dynamic"),
    ("dynamic", 'T', &[Dyn], "default", &[Len], "dynamic"),
    ("yarn", 'N', &[], "yarn", &[], "yarn"),
    ("yarn", 'G', &[Log, Ex], "yarn", &[Log, Ex], "yarn"),
    ("yarn", 'S', &[], "yarn", &[], "yarn"),
    ("yarn", 'T', &[Len], "yarn", &[Len], "yarn"),
    ("ntk-by-parts", 'N', &[], "ntk-by-parts", &[], "ntk-by-parts"),
    ("ntk-by-parts", 'G', &[Log, Ex], "ntk-by-parts", &[Log, Ex], "ntk-by-parts"),
    ("ntk-by-parts", 'S', &[], "ntk-by-parts", &[], "ntk-by-parts"),
    ("ntk-by-parts", 'T', &[Len], "ntk-by-parts", &[Len], "ntk-by-parts"),
    ("llama3", 'N', &[], "llama3", &[], "llama3"),
    ("llama3", 'G', &[Log, Ex], "llama3", &[Log, Ex], "llama3"),
    ("llama3", 'S', &[], "llama3", &[], "llama3"),
    ("llama3", 'T', &[], "llama3", &[Len], "llama3"),
    ("abf", 'N', &[], "abf", &[], "abf"),
    ("abf", 'G', &[Log, Ex], "abf", &[Log, Ex], "abf"),
    ("abf", 'S', &[], "abf", &[], "abf"),
    ("abf", 'T', &[], "abf", &[], "abf"),
    ("eabf", 'N', &[], "eabf", &[], "eabf"),
    ("eabf", 'G', &[Log, Ex], "eabf", &[Log, Ex], "eabf"),
    ("eabf", 'S', &[], "eabf", &[], "eabf"),
    ("eabf", 'T', &[], "eabf", &[], "eabf"),
];

fn rows() -> impl Iterator<Item = (Recipe, &'static Row)> {
    TABLE.iter().map(|row| {
        let method: RopeMethod = row.0.parse().unwrap();
        (with_law(method, row.1), row)
    })
}

#[test]
fn the_table_covers_every_method_and_law() {
    assert_eq!(TABLE.len(), RopeMethod::ALL.len() * 4);
    for m in RopeMethod::ALL {
        for law in ['N', 'G', 'S', 'T'] {
            assert!(
                TABLE.iter().any(|r| r.0 == m.name() && r.1 == law),
                "{m} {law}"
            );
        }
    }
}

#[test]
fn every_method_law_and_target_has_its_pinned_form() {
    for (recipe, &(name, law, llama_gaps, llama_method, tf_gaps, tf_method)) in rows() {
        for (target, gaps, method) in [
            (Target::LlamaCpp, llama_gaps, llama_method),
            (Target::Transformers, tf_gaps, tf_method),
        ] {
            let form = runtime_form(&recipe, target, D);
            let what = format!("{name} law {law} on {target}");
            assert_eq!(form.gaps(), gaps, "{what}: {:?}", form.reasons());
            assert_eq!(form.is_exact(), gaps.is_empty(), "{what}");
            assert_eq!(form.recipe.method.name(), method, "{what}");
            // runtimes exempt no layer and evaluate no log law
            assert_eq!(form.recipe.skip_layers, 0, "{what}");
            assert_ne!(form.recipe.scale_law, ScaleLaw::Log, "{what}");
            let want_law = match law {
                'N' => ScaleLaw::None,
                'G' | 'S' => Recipe::default_step(C),
                _ if gaps.contains(&Len) => ScaleLaw::Step {
                    beta: 0.12,
                    length: C,
                },
                _ => recipe.scale_law,
            };
            assert_eq!(form.recipe.scale_law, want_law, "{what}");
            assert_eq!(form.recipe.context, recipe.context, "{what}");
            // every reason names what it is about
            for a in &form.approximations {
                assert!(!a.reason.is_empty());
            }
            let refused = form.require_exact(false);
            assert_eq!(refused.is_err(), !gaps.is_empty(), "{what}");
            if let Err(e) = refused {
                assert!(e.to_string().contains("--allow-approximate"), "{e}");
            }
        }
        // abf's own forward runs the recipe itself
        let exact = runtime_form(&recipe, Target::Exact, D);
        assert!(exact.is_exact());
        assert_eq!(exact.recipe, recipe);
    }
}

#[test]
fn static_ntk_is_its_base_and_yarn_details_follow_each_runtime() {
    // b' = b s^(d/(d-2)) evaluated here in f64: 10000 * 4^(128/126)
    let ntk = Recipe::for_method(RopeMethod::Ntk, MODEL);
    for target in [Target::LlamaCpp, Target::Transformers] {
        let f = runtime_form(&ntk, target, D);
        let want = 10_000.0 * 4f64.powf(128.0 / 126.0);
        assert!((f.recipe.rope_base - want).abs() < 1e-9 * want, "{target}");
        assert_eq!(f.recipe.factor, 1.0);
    }
    // llama.cpp's llama graph ignores non-default yarn betas; its mistral3 graph reads them
    let mut yarn = Recipe::for_method(RopeMethod::Yarn, MODEL);
    yarn.beta_fast = 16.0;
    let f = runtime_form(&yarn, Target::LlamaCpp, D);
    assert_eq!(f.gaps(), vec![Gap::YarnBetas]);
    assert_eq!(f.recipe.beta_fast, 32.0);
    assert!(runtime_form(&yarn, Target::Transformers, D).is_exact());
    yarn.scale_law = Recipe::default_step(C);
    assert!(runtime_form(&yarn, Target::LlamaCpp, D).is_exact());
    // transformers derives yarn's factor from the windows
    let mut y = Recipe::for_method(RopeMethod::Yarn, MODEL);
    y.context = 8 * C;
    let f = runtime_form(&y, Target::Transformers, D);
    assert_eq!(f.gaps(), vec![Gap::YarnFactor]);
    assert_eq!(f.recipe.context, 4 * C);
    assert!(runtime_form(&y, Target::LlamaCpp, D).is_exact());
}

/// Two recipes compute the same: frequencies (at the window and at a dynamic length), the
/// attention factor, the logit scale of every layer at positions around the windows.
fn assert_same_computation(a: &Recipe, b: &Recipe, what: &str) {
    for seq in [None, Some(4 * C)] {
        let (fa, fb) = (a.inv_freq(D, seq), b.inv_freq(D, seq));
        for (x, y) in fa.iter().zip(&fb) {
            assert!(
                ((x - y) / x).abs() < 2e-6,
                "{what}: inv_freq {x} vs {y}\n{a}\n{b}"
            );
        }
    }
    assert!(
        (a.attention_factor() - b.attention_factor()).abs() < 1e-6,
        "{what}"
    );
    for layer in 0..3 {
        for p in [0, C / 2, C - 1, C, 2 * C, 4 * C - 1, 16 * C] {
            let (x, y) = (a.logit_scale(layer, p), b.logit_scale(layer, p));
            assert!(
                (x - y).abs() < 1e-6,
                "{what}: layer {layer} p {p}: {x} vs {y}"
            );
        }
    }
    assert_eq!(a.context, b.context, "{what}");
}

fn gguf_meta() -> Metadata {
    let mut m = Metadata::new();
    m.set_architecture("llama");
    m.set_context_length("llama", C).unwrap();
    m.set_arch_u32("llama", ArchKey::EmbeddingLength, (4 * D) as u64)
        .unwrap();
    m.set_arch_u32("llama", ArchKey::HeadCount, 4).unwrap();
    m
}

#[test]
fn gguf_keys_make_llama_cpp_run_the_form() {
    for (recipe, &(name, law, ..)) in rows() {
        if recipe.method == RopeMethod::Llama3 {
            continue; // its factors are a tensor (tests/convert_llamacpp.rs runs it)
        }
        let what = format!("{name} law {law}");
        let form = runtime_form(&recipe, Target::LlamaCpp, D);
        for target in [Target::LlamaCpp, Target::Exact] {
            let mut meta = gguf_meta();
            apply_recipe(&mut meta, &recipe, target, true).unwrap();
            let read = runtime_recipe(&meta, D).unwrap();
            assert!(read.ignored.is_empty(), "{what}: {:?}", read.ignored);
            assert_same_computation(&form.recipe, &read.recipe, &what);
        }
    }
}

fn tiny_config() -> HfConfig {
    let v = json!({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 4 * D,
        "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "max_position_embeddings": C, "rope_theta": 10000.0
    });
    HfConfig::from_value(Path::new("config.json"), v).unwrap()
}

#[test]
fn config_fields_make_transformers_run_the_form() {
    let input = tiny_config();
    for (recipe, &(name, law, ..)) in rows() {
        let what = format!("{name} law {law}");
        let form = runtime_form(&recipe, Target::Transformers, D);
        for target in [Target::Transformers, Target::Exact] {
            let p = patch_config(&input, &recipe, target, true).unwrap();
            assert_eq!(p.runtime_recipe, form.recipe, "{what}");
            let back =
                HfConfig::from_value(Path::new("config.json"), p.config.clone().into()).unwrap();
            // transformers reads only its own fields
            assert_same_computation(&form.recipe, &back.hf_recipe().unwrap(), &what);
            if target == Target::Exact {
                assert_eq!(back.model.recipe, recipe, "{what}: the block");
            }
        }
    }
}
