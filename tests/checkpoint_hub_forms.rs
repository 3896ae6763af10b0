//! config.json as the Hub has it, in both spellings: transformers 4's top-level `rope_theta`
//! with `rope_scaling` (its rope type as `type` or `rope_type`) and transformers 5's
//! `rope_parameters` (the base inside). For every rope type abf reads, each spelling gives the
//! same recipe, equal to the one derived by hand from transformers' `modeling_rope_utils.py`
//! (`_compute_*_parameters`) and abf's documented window rule (docs/checkpoints.md: c is
//! `original_max_position_embeddings`, else `max_position_embeddings`; the target is
//! `max_position_embeddings` when c is given, else `round(factor * c)`, and always that for dynamic).

mod common;

use std::path::Path;

use abf::checkpoint::{HfConfig, RecipeSource, RopeForm};
use abf::rope::{BaseRope, Recipe, RopeMethod};
use serde_json::{json, Map, Value};

/// One Hub config: the scaling fields (no base, no type), the rope type, the base,
/// `max_position_embeddings`, and the recipe derived by hand.
struct Case {
    name: &'static str,
    rope_type: &'static str,
    fields: Value,
    theta: f64,
    max_positions: u64,
    expect: Recipe,
}

fn recipe(method: RopeMethod, base: f64, factor: f64, c: u64, context: u64) -> Recipe {
    let mut r = Recipe::plain(BaseRope { base, context: c });
    r.method = method;
    r.factor = factor;
    r.context = context;
    r
}

/// transformers `get_mscale(scale, mscale) = 0.1 * mscale * ln(scale) + 1` (scale > 1).
fn get_mscale(scale: f64, mscale: f64) -> f64 {
    0.1 * mscale * scale.ln() + 1.0
}

fn cases() -> Vec<Case> {
    use RopeMethod::*;
    let mut v = Vec::new();
    let mut case = |name, rope_type, fields: Value, theta, max_positions, expect| {
        v.push(Case {
            name,
            rope_type,
            fields,
            theta,
            max_positions,
            expect,
        })
    };
    case(
        "default",
        "default",
        json!({}),
        500000.0,
        4096,
        recipe(Default, 500000.0, 1.0, 4096, 4096),
    );
    // linear without the original window: c = max_position_embeddings, target = s c
    case(
        "linear",
        "linear",
        json!({"factor": 4.0}),
        10000.0,
        2048,
        recipe(Linear, 10000.0, 4.0, 2048, 8192),
    );
    case(
        "linear with original",
        "linear",
        json!({"factor": 4.0, "original_max_position_embeddings": 1024}),
        10000.0,
        4096,
        recipe(Linear, 10000.0, 4.0, 1024, 4096),
    );
    // dynamic keeps max_position_embeddings = c in transformers' form: target = s c
    case(
        "dynamic",
        "dynamic",
        json!({"factor": 2.0}),
        10000.0,
        2048,
        recipe(Dynamic, 10000.0, 2.0, 2048, 4096),
    );
    // yarn: attention factor 0.1 ln s + 1 when none is given (recipe field None)
    case(
        "yarn",
        "yarn",
        json!({"factor": 4.0, "original_max_position_embeddings": 4096}),
        1_000_000.0,
        16384,
        recipe(Yarn, 1_000_000.0, 4.0, 4096, 16384),
    );
    case(
        "yarn without original",
        "yarn",
        json!({"factor": 4.0}),
        10000.0,
        8192,
        recipe(Yarn, 10000.0, 4.0, 8192, 32768),
    );
    let mut r = recipe(Yarn, 10000.0, 8.0, 4096, 32768);
    r.beta_fast = 16.0;
    r.beta_slow = 2.0;
    r.yarn_attention_factor = Some(1.25);
    case(
        "yarn attention_factor and betas",
        "yarn",
        json!({"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0,
               "beta_slow": 2.0, "attention_factor": 1.25}),
        10000.0,
        32768,
        r,
    );
    // DeepSeek-style: get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)
    let mut r = recipe(Yarn, 10000.0, 40.0, 4096, 163840);
    r.yarn_attention_factor = Some(get_mscale(40.0, 1.0) / get_mscale(40.0, 0.5));
    case(
        "yarn mscale / mscale_all_dim",
        "yarn",
        json!({"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
               "mscale_all_dim": 0.5}),
        10000.0,
        163840,
        r,
    );
    // equal mscales cancel: attention factor 1 is NTK-by-parts (method.md)
    case(
        "yarn equal mscales",
        "yarn",
        json!({"factor": 4.0, "original_max_position_embeddings": 2048, "mscale": 0.707,
               "mscale_all_dim": 0.707}),
        10000.0,
        8192,
        recipe(NtkByParts, 10000.0, 4.0, 2048, 8192),
    );
    case(
        "yarn attention_factor 1",
        "yarn",
        json!({"factor": 4.0, "original_max_position_embeddings": 2048, "attention_factor": 1.0}),
        10000.0,
        8192,
        recipe(NtkByParts, 10000.0, 4.0, 2048, 8192),
    );
    // a lone mscale is ignored by transformers (both are needed)
    case(
        "yarn lone mscale",
        "yarn",
        json!({"factor": 4.0, "original_max_position_embeddings": 2048, "mscale": 0.5}),
        10000.0,
        8192,
        recipe(Yarn, 10000.0, 4.0, 2048, 8192),
    );
    // Llama 3.1's own rope block
    case(
        "llama3",
        "llama3",
        json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}),
        500000.0,
        131072,
        recipe(Llama3, 500000.0, 8.0, 8192, 131072),
    );
    let mut r = recipe(Llama3, 500000.0, 32.0, 8192, 131072);
    r.low_freq_factor = 2.0;
    r.high_freq_factor = 8.0;
    case(
        "llama3 bands",
        "llama3",
        json!({"factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 8192}),
        500000.0,
        131072,
        r,
    );
    v
}

/// A LLaMA config.json around the rope settings.
fn config(max_positions: u64, rope: Map<String, Value>) -> Value {
    let mut c = json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 272,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": max_positions,
    });
    c.as_object_mut().unwrap().extend(rope);
    c
}

fn with(fields: &Value, extra: &[(&str, Value)]) -> Value {
    let mut m = fields.as_object().unwrap().clone();
    for (k, v) in extra {
        m.insert(k.to_string(), v.clone());
    }
    Value::Object(m)
}

/// The spellings of one case: (label, config.json, expected form).
fn spellings(c: &Case) -> Vec<(&'static str, Value, RopeForm)> {
    let theta = json!(c.theta);
    let legacy = |scaling: Value| {
        let mut m = Map::new();
        m.insert("rope_theta".into(), theta.clone());
        m.insert("rope_scaling".into(), scaling);
        config(c.max_positions, m)
    };
    let params = |p: Value, top_theta: bool| {
        let mut m = Map::new();
        if top_theta {
            m.insert("rope_theta".into(), theta.clone());
        }
        m.insert("rope_parameters".into(), p);
        config(c.max_positions, m)
    };
    let ty = json!(c.rope_type);
    let mut out = vec![
        (
            "rope_scaling.type",
            legacy(with(&c.fields, &[("type", ty.clone())])),
            RopeForm::Legacy,
        ),
        (
            "rope_scaling.rope_type",
            legacy(with(&c.fields, &[("rope_type", ty.clone())])),
            RopeForm::Legacy,
        ),
        (
            "rope_parameters",
            params(
                with(
                    &c.fields,
                    &[("rope_type", ty.clone()), ("rope_theta", theta.clone())],
                ),
                false,
            ),
            RopeForm::Parameters,
        ),
        (
            "rope_parameters, top-level rope_theta",
            params(with(&c.fields, &[("rope_type", ty)]), true),
            RopeForm::Parameters,
        ),
    ];
    if c.rope_type == "default" {
        // older checkpoints have no scaling at all, or "rope_scaling": null
        out.push(("no rope_scaling", legacy(Value::Null), RopeForm::Legacy));
        let mut m = Map::new();
        m.insert("rope_theta".into(), theta.clone());
        out.push((
            "rope_theta only",
            config(c.max_positions, m),
            RopeForm::Legacy,
        ));
    }
    out
}

#[test]
fn every_rope_type_reads_the_same_in_both_hub_spellings() {
    let path = Path::new("config.json");
    let all = cases();
    for c in &all {
        c.expect.validate().unwrap();
        for (label, value, form) in spellings(c) {
            let cfg = HfConfig::from_value(path, value.clone())
                .unwrap_or_else(|e| panic!("{} ({label}): {e}\n{value}", c.name));
            assert_eq!(cfg.rope_form, form, "{} ({label})", c.name);
            assert_eq!(cfg.recipe_source, RecipeSource::Hf, "{} ({label})", c.name);
            assert_eq!(
                cfg.model.recipe, c.expect,
                "{} ({label}): read {} expected {}",
                c.name, cfg.model.recipe, c.expect
            );
            assert_eq!(cfg.hf_recipe().unwrap(), c.expect, "{} ({label})", c.name);
        }
    }
    // every rope type abf reads has a case
    for (name, _) in abf::checkpoint::keys::ROPE_TYPES {
        assert!(
            all.iter().any(|c| c.rope_type == *name),
            "no case for {name}"
        );
    }
}

/// The hand-derived attention factors are what the formulas give (a typo in a case would
/// otherwise test nothing): (0.1 ln 40 + 1) / (0.05 ln 40 + 1) = 1.15572199019626, evaluated
/// apart (Python's math.log).
#[test]
fn deepseek_mscale_ratio_by_hand() {
    let a = get_mscale(40.0, 1.0) / get_mscale(40.0, 0.5);
    assert!((a - 1.155_721_990_196_26).abs() < 1e-13, "{a}");
    assert_eq!(get_mscale(4.0, 1.0), 1.0 + 0.1 * 4f64.ln());
}
