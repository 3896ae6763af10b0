//! Recomputation and the trainer on a toy layered model: recomputed gradients equal plain
//! backward and finite differences, padding and micro-batches change nothing, the loss falls,
//! resume is exact, LoRA starts at the base model and merges at export.

mod common;

use std::collections::HashMap;

use abf::train::data::SplitMix64;
use abf::train::examples::Example;
use abf::train::{
    loss_and_grads, BackwardPlan, Batch, GradAcc, LayerModel, ParamSet, TrainConfig, Trainer,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::toy::{flat, Toy};

const V: usize = 11;

const H: usize = 6;

const L: usize = 3;

fn toy_set(dtype: DType) -> ParamSet {
    ParamSet::full(Toy::random(V, H, L, dtype, 5), dtype).unwrap()
}

fn toy_model(set: &ParamSet, dtype: DType) -> Toy {
    let vb = VarBuilder::from_tensors(set.weight_map().unwrap(), dtype, &Device::Cpu);
    Toy::load(vb, V, H, L).unwrap()
}

fn toy_examples() -> Vec<Example> {
    vec![
        Example {
            tokens: vec![1, 4, 2, 9, 3, 3, 7, 10],
            mask: vec![false, false, true, true, false, true, true, true],
        },
        Example {
            tokens: vec![5, 6, 0, 8, 2],
            mask: vec![false, true, true, false, true],
        },
    ]
}

fn grads(
    set: &ParamSet,
    model: &dyn LayerModel,
    batch: &Batch,
    plan: BackwardPlan,
) -> (f64, Vec<Tensor>) {
    let mut acc = GradAcc::new(set.params.len());
    let loss = loss_and_grads(model, batch, 0.25, &set.params, &mut acc, plan).unwrap();
    (loss, acc.finish(&set.params).unwrap())
}

#[test]
fn recomputation_equals_plain_backward_and_finite_differences() {
    let dt = DType::F64;
    let set = toy_set(dt);
    let model = toy_model(&set, dt);
    let ex = toy_examples();
    let batch = Batch::from_examples(&[&ex[0], &ex[1]], &Device::Cpu).unwrap();
    let plain = BackwardPlan {
        recompute: false,
        head_chunk: 1 << 20,
        blocked_attention: false,
    };
    let rec = BackwardPlan {
        recompute: true,
        head_chunk: 3,
        blocked_attention: true,
    };
    let (l0, g0) = grads(&set, &model, &batch, plain);
    let (l1, g1) = grads(&set, &model, &batch, rec);
    assert!((l0 - l1).abs() < 1e-6 * l0.abs(), "{l0} {l1}");
    for (a, b) in g0.iter().zip(&g1) {
        for (x, y) in flat(a).iter().zip(flat(b)) {
            assert!((x - y).abs() < 1e-12, "{x} {y}");
        }
    }
    // central finite differences of the (f64) loss in every parameter, a few entries each
    let loss_at = |pi: usize, j: usize, h: f64| -> f64 {
        let mut weights = Toy::random(V, H, L, dt, 5);
        let name = &set.params[pi].name;
        let w = weights.iter_mut().find(|(n, _)| n == name).unwrap();
        let mut v = flat(&w.1);
        v[j] += h;
        w.1 = Tensor::from_vec(v, w.1.shape(), &Device::Cpu).unwrap();
        let s = ParamSet::full(weights, dt).unwrap();
        let m = toy_model(&s, dt);
        let logits = {
            let mut x = m.embed(&batch.ids).unwrap();
            for i in 0..L {
                x = m.layer(i, &x).unwrap();
            }
            m.head(&x).unwrap()
        };
        // the loss in f64 (masked_nll_sum computes in f32; do it here independently)
        let lg: Vec<Vec<Vec<f64>>> = logits.to_vec3().unwrap();
        let t: Vec<Vec<u32>> = batch.targets.to_vec2().unwrap();
        let mk: Vec<Vec<f32>> = batch.mask.to_vec2().unwrap();
        let mut sum = 0.0;
        for b in 0..lg.len() {
            for p in 0..lg[b].len() {
                if mk[b][p] == 1.0 {
                    let mx = lg[b][p].iter().cloned().fold(f64::MIN, f64::max);
                    let lse = lg[b][p].iter().map(|z| (z - mx).exp()).sum::<f64>().ln() + mx;
                    sum += lse - lg[b][p][t[b][p] as usize];
                }
            }
        }
        sum * 0.25
    };
    let h = 1e-5;
    for (pi, g) in g1.iter().enumerate() {
        let g = flat(g);
        for j in [0, g.len() / 2, g.len() - 1] {
            let fd = (loss_at(pi, j, h) - loss_at(pi, j, -h)) / (2.0 * h);
            // the analytic loss is accumulated in f32, so allow f32-level agreement
            assert!(
                (fd - g[j]).abs() < 2e-5 + 1e-4 * fd.abs(),
                "{} [{j}]: fd {fd} analytic {}",
                set.params[pi].name,
                g[j]
            );
        }
    }
}

#[test]
fn padding_and_micro_batches_do_not_change_gradients() {
    let dt = DType::F64;
    let set = toy_set(dt);
    let model = toy_model(&set, dt);
    let ex = toy_examples();
    let plan = BackwardPlan::default();
    let both = Batch::from_examples(&[&ex[0], &ex[1]], &Device::Cpu).unwrap();
    let (l, g) = grads(&set, &model, &both, plan);
    let mut acc = GradAcc::new(set.params.len());
    let mut l2 = 0.0;
    for e in &ex {
        let b = Batch::from_examples(&[e], &Device::Cpu).unwrap();
        l2 += loss_and_grads(&model, &b, 0.25, &set.params, &mut acc, plan).unwrap();
    }
    let g2 = acc.finish(&set.params).unwrap();
    assert!((l - l2).abs() < 1e-6);
    for (a, b) in g.iter().zip(&g2) {
        for (x, y) in flat(a).iter().zip(flat(b)) {
            assert!((x - y).abs() < 1e-10);
        }
    }
}

#[test]
fn fully_masked_conversation_contributes_no_loss_or_gradient() {
    let dt = DType::F64;
    let set = toy_set(dt);
    let model = toy_model(&set, dt);
    let ex = toy_examples();
    let masked = Example {
        tokens: ex[1].tokens.clone(),
        mask: vec![false; ex[1].len()],
    };
    assert_eq!(masked.targets(), 0);
    let plan = BackwardPlan::default();
    let alone = Batch::from_examples(&[&ex[0]], &Device::Cpu).unwrap();
    let with = Batch::from_examples(&[&ex[0], &masked], &Device::Cpu).unwrap();
    let (la, ga) = grads(&set, &model, &alone, plan);
    let (lw, gw) = grads(&set, &model, &with, plan);
    assert_eq!(la, lw);
    for (a, b) in ga.iter().zip(&gw) {
        for (x, y) in flat(a).iter().zip(flat(b)) {
            assert!((x - y).abs() < 1e-12);
        }
    }
    let only = Batch::from_examples(&[&masked], &Device::Cpu).unwrap();
    let (l, g) = grads(&set, &model, &only, plan);
    assert_eq!(l, 0.0);
    assert!(g.iter().all(|t| flat(t).iter().all(|x| *x == 0.0)));
}

// ---------------------------------------------------------------- trainer on the toy model

fn toy_factory(vb: VarBuilder<'static>) -> Result<Box<dyn LayerModel>, abf::train::TrainError> {
    Ok(Box::new(Toy::load(vb, V, H, L)?))
}

fn toy_trainer(cfg: &TrainConfig) -> Trainer {
    let mut ex = Vec::new();
    let mut rng = SplitMix64(9);
    for i in 0..12 {
        let n = 6 + i % 5;
        let tokens: Vec<u32> = (0..n).map(|_| rng.below(V as u64) as u32).collect();
        let mask = (0..n).map(|j| j >= 2).collect();
        ex.push(Example { tokens, mask });
    }
    Trainer::new(
        cfg.clone(),
        Toy::random(V, H, L, DType::F32, 5),
        ex,
        DType::F32,
        Device::Cpu,
    )
    .unwrap()
}

fn toy_cfg() -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        micro_batch: 2,
        epochs: 2,
        lr: 3e-2,
        head_chunk: 4,
        ..TrainConfig::default()
    }
}

#[test]
fn toy_loss_falls_and_resume_is_exact() {
    let cfg = toy_cfg();
    let mut straight = toy_trainer(&cfg);
    assert_eq!(straight.total_steps, 6);
    let mut losses = Vec::new();
    for _ in 0..6 {
        losses.push(straight.train_step(&toy_factory).unwrap().loss);
    }
    // the same batch 0 again after training: lower loss than at the start
    let (after, ..) = straight.loss_and_grads(&toy_factory, 0).unwrap();
    assert!(after < losses[0], "{losses:?} then {after}");

    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("checkpoint");
    let mut first = toy_trainer(&cfg);
    for _ in 0..3 {
        first.train_step(&toy_factory).unwrap();
    }
    first.save_checkpoint(&ck, &serde_json::json!({})).unwrap();
    drop(first);
    let mut second = toy_trainer(&cfg);
    second.load_checkpoint(&ck).unwrap();
    assert_eq!(second.step(), 3);
    let mut resumed = Vec::new();
    for _ in 0..3 {
        resumed.push(second.train_step(&toy_factory).unwrap().loss);
    }
    assert_eq!(&losses[3..], &resumed[..]);
    let a: HashMap<String, Tensor> = straight.set.export(None).unwrap().into_iter().collect();
    for (name, t) in second.set.export(None).unwrap() {
        assert_eq!(flat(&t), flat(&a[&name]), "{name}");
    }
    // a checkpoint of other data is refused
    let mut other = toy_trainer(&TrainConfig {
        seed: 1,
        ..cfg.clone()
    });
    other.examples.pop();
    let err = other.load_checkpoint(&ck).unwrap_err().to_string();
    assert!(err.contains("data differ"), "{err}");
}

#[test]
fn lora_starts_at_the_base_model_and_merges_at_export() {
    let dt = DType::F32;
    // name the toy weights like projections so that LoRA adapts them
    let rename = |w: Vec<(String, Tensor)>| -> Vec<(String, Tensor)> {
        w.into_iter()
            .map(|(n, t)| match n.as_str() {
                "emb" => ("model.embed_tokens.weight".into(), t),
                "out" => ("lm_head.weight".into(), t),
                _ => (
                    format!("model.layers.{}.self_attn.q_proj.weight", &n[1..]),
                    t,
                ),
            })
            .collect()
    };
    let base = rename(Toy::random(V, H, L, dt, 5));
    let set = ParamSet::lora(
        base.clone(),
        dt,
        abf::train::LoraConfig {
            rank: 2,
            alpha: 4.0,
        },
        0,
    )
    .unwrap();
    let (trainable, total) = set.counts();
    // embeddings + 3 x (A 2x6 + B 6x2); the head and the base projections are frozen
    assert_eq!(trainable, V * H + L * (2 * H + H * 2));
    assert_eq!(total, 2 * V * H + L * H * H);
    // B = 0: the merged weights equal the base
    let map = set.weight_map().unwrap();
    for (n, t) in &base {
        assert_eq!(flat(&map[n]), flat(t), "{n}");
    }
    // with B set, export = W + (alpha/r) B A
    let mut set = set;
    let bi = set
        .params
        .iter()
        .position(|p| p.name.ends_with("0.self_attn.q_proj.lora_B.weight"))
        .unwrap();
    let ai = bi - 1;
    let b = Tensor::ones((H, 2), DType::F32, &Device::Cpu).unwrap();
    set.params[bi].set_f32(&b).unwrap();
    let a = set.params[ai].value_f32().unwrap();
    let out: HashMap<String, Tensor> = set.export(None).unwrap().into_iter().collect();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let w0 = &base.iter().find(|(n, _)| n == name).unwrap().1;
    let want = (w0 + b.matmul(&a).unwrap().affine(2.0, 0.0).unwrap()).unwrap();
    for (x, y) in flat(&out[name]).iter().zip(flat(&want)) {
        assert!((x - y).abs() < 1e-6);
    }
}
