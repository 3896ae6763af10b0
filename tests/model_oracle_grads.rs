//! The candle forward against the independent f64 oracle of tests/common/oracle.rs: gradients
//! reach every weight through the differentiable path and match the oracle's finite differences.

mod common;

use abf::checkpoint::ModelConfig;
use abf::model::Llama;
use abf::rope::ScaleLaw;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use common::oracle::*;
use common::rng::Rng;

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
    let mut rng = Rng::new(31);
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
