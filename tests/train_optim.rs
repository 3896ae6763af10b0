//! Schedule, AdamW (hand-computed update, f32 masters for bf16), global-norm clipping and the
//! masked loss, against hand-derived values.

mod common;

use abf::train::{
    clip_factor, clip_grad_norm, grad_norm, masked_nll_sum, AdamW, AdamWConfig, Schedule,
    ScheduleKind, TrainParam,
};
use candle_core::{DType, Device, Tensor};

// ---------------------------------------------------------------- schedule and optimizer

#[test]
fn schedules_match_hand_derived_values() {
    let s = Schedule {
        kind: ScheduleKind::Cosine,
        peak: 2e-5,
        warmup: 0,
        total: 6,
    };
    // 0.5 (1 + cos(pi k / 6)), k = 0..5
    let want = [
        1.0,
        0.933_012_701_892_219_3,
        0.75,
        0.5,
        0.25,
        0.066_987_298_107_780_7,
    ];
    for (k, w) in want.iter().enumerate() {
        assert!((s.factor(k as u64) - w).abs() < 1e-12, "{k}");
        assert!((s.lr(k as u64) - 2e-5 * w).abs() < 1e-17);
    }
    let s = Schedule {
        kind: ScheduleKind::Cosine,
        peak: 1.0,
        warmup: 2,
        total: 6,
    };
    // warm-up 0, 1/2; then progress (k-2)/4: 1, 0.5(1+cos(pi/4)), 0.5, 0.5(1-cos(pi/4))
    let want = [
        0.0,
        0.5,
        1.0,
        0.853_553_390_593_273_8,
        0.5,
        0.146_446_609_406_726_2,
    ];
    for (k, w) in want.iter().enumerate() {
        assert!((s.factor(k as u64) - w).abs() < 1e-12, "{k}");
    }
    let s = Schedule {
        kind: ScheduleKind::Constant,
        peak: 1.0,
        warmup: 4,
        total: 10,
    };
    let got: Vec<f64> = (0..6).map(|k| s.factor(k)).collect();
    assert_eq!(got, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
}

fn param(name: &str, v: &[f32], decay: bool) -> TrainParam {
    let t = Tensor::new(v, &Device::Cpu).unwrap();
    TrainParam::new(name, &t, DType::F32, decay).unwrap()
}

fn vals(p: &TrainParam) -> Vec<f32> {
    p.value_f32().unwrap().to_vec1().unwrap()
}

#[test]
fn adamw_matches_a_hand_computed_update() {
    let mut ps = vec![
        param("w", &[1.0, -2.0], true),
        param("n", &[1.0, -2.0], false),
    ];
    let cfg = AdamWConfig {
        bf16_moments: false,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(&ps, cfg).unwrap();
    let g = Tensor::new(&[0.5f32, 0.1], &Device::Cpu).unwrap();
    opt.update(&mut ps, &[g.clone(), g.clone()], 0.1).unwrap();
    // step 1: decay p(1 - 0.1*0.1); m = 0.1 g, v = 0.05 g^2; m/(1-0.9) = g, sqrt(v/(1-0.95)) = |g|:
    // p -= 0.1 * g / (|g| + 1e-8)
    let expect_w = [
        0.99 - 0.1 * 0.5 / (0.5 + 1e-8),
        -1.98 - 0.1 * 0.1 / (0.1 + 1e-8),
    ];
    let expect_n = [
        1.0 - 0.1 * 0.5 / (0.5 + 1e-8),
        -2.0 - 0.1 * 0.1 / (0.1 + 1e-8),
    ];
    for (a, b) in vals(&ps[0]).iter().zip(expect_w) {
        assert!((*a as f64 - b).abs() < 1e-6, "{a} {b}");
    }
    for (a, b) in vals(&ps[1]).iter().zip(expect_n) {
        assert!((*a as f64 - b).abs() < 1e-6, "{a} {b}");
    }
    // step 2 against the formula evaluated independently in f64
    let g2 = [-0.25f64, 0.3];
    let gt = Tensor::new(&[-0.25f32, 0.3], &Device::Cpu).unwrap();
    let before = vals(&ps[0]);
    opt.update(&mut ps, &[gt.clone(), gt], 0.05).unwrap();
    for j in 0..2 {
        let g1 = [0.5, 0.1][j];
        let m = 0.9 * (0.1 * g1) + 0.1 * g2[j];
        let v = 0.95 * (0.05 * g1 * g1) + 0.05 * g2[j] * g2[j];
        let (bc1, bc2) = (1.0 - 0.81f64, 1.0 - 0.9025f64);
        let p = before[j] as f64 * (1.0 - 0.05 * 0.1);
        let want = p - (0.05 / bc1) * m / ((v.sqrt() / bc2.sqrt()) + 1e-8);
        assert!((vals(&ps[0])[j] as f64 - want).abs() < 1e-6, "{j}");
    }
    assert_eq!(opt.step, 2);
}

#[test]
fn adamw_keeps_f32_masters_for_bf16_weights() {
    // an update far below bf16's resolution at 1.0 must accumulate in the master
    let t = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
    let mut ps = vec![TrainParam::new("w", &t, DType::BF16, false).unwrap()];
    let cfg = AdamWConfig {
        bf16_moments: false,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::new(&ps, cfg).unwrap();
    let g = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
    for _ in 0..10 {
        opt.update(&mut ps, std::slice::from_ref(&g), 1e-4).unwrap();
    }
    let master = vals(&ps[0])[0];
    assert!((master - (1.0 - 10.0 * 1e-4)).abs() < 1e-5, "{master}");
    let var: Vec<f32> = ps[0]
        .var
        .as_tensor()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(var[0], half::bf16::from_f32(master).to_f32());
    assert_eq!(ps[0].var.dtype(), DType::BF16);
}

#[test]
fn updates_in_place_leave_the_callers_tensors_alone() {
    // the CPU update writes weights and moments in place: a master set from the caller's
    // tensor, or two parameters made from one tensor, must not share its storage
    let t = Tensor::new(&[1.0f32, -0.5, 0.25], &Device::Cpu).unwrap();
    let mut ps = vec![
        TrainParam::new("a", &t, DType::BF16, true).unwrap(),
        TrainParam::new("b", &t, DType::F32, true).unwrap(),
    ];
    let u = Tensor::new(&[2.0f32, 3.0, 4.0], &Device::Cpu).unwrap();
    ps[0].set_f32(&u).unwrap();
    let mut opt = AdamW::new(&ps, AdamWConfig::default()).unwrap();
    let g = Tensor::new(&[0.1f32, 0.2, 0.3], &Device::Cpu).unwrap();
    opt.update(&mut ps, &[g.clone(), g], 1e-2).unwrap();
    assert_eq!(t.to_vec1::<f32>().unwrap(), vec![1.0, -0.5, 0.25]);
    assert_eq!(u.to_vec1::<f32>().unwrap(), vec![2.0, 3.0, 4.0]);
    assert_ne!(vals(&ps[0]), vec![2.0, 3.0, 4.0]);
    assert_ne!(vals(&ps[1]), vec![1.0, -0.5, 0.25]);
}

#[test]
fn global_norm_clipping() {
    let mut g = vec![
        Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
        Tensor::new(&[0.0f32, 4.0], &Device::Cpu).unwrap(),
    ];
    let n = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!((n - 5.0).abs() < 1e-9);
    let a: Vec<f32> = g[1].to_vec1().unwrap();
    assert!((a[1] as f64 - 4.0 / (5.0 + 1e-6)).abs() < 1e-7);
    let n = clip_grad_norm(&mut g, 10.0).unwrap();
    assert!((n - 1.0).abs() < 1e-5);
}

// ---------------------------------------------------------------- loss and recomputation

#[test]
fn masked_nll_matches_hand_values() {
    let logits = Tensor::new(&[[[0.0f32, 1.0, 2.0], [1.0, 1.0, 1.0]]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[[2u32, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1.0f32, 1.0]], &Device::Cpu).unwrap();
    let v: f32 = masked_nll_sum(&logits, &targets, &mask)
        .unwrap()
        .to_scalar()
        .unwrap();
    let want = ((1f64.exp() + 2f64.exp() + 1.0).ln() - 2.0) + 3f64.ln();
    assert!((v as f64 - want).abs() < 1e-6);
    let mask = Tensor::new(&[[0.0f32, 1.0]], &Device::Cpu).unwrap();
    let v: f32 = masked_nll_sum(&logits, &targets, &mask)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((v as f64 - 3f64.ln()).abs() < 1e-6);
}

#[test]
fn fused_cpu_adamw_equals_the_tensor_op_path_bit_for_bit() {
    // the fused CPU loop and the whole-tensor ops (every other device's path) must compute the
    // same f32 arithmetic: 3 steps on 70,007 elements (several rayon chunks and a ragged last
    // one), decayed and not, f32 and bf16 moments, bf16 weights with f32 masters
    let n = 70_007usize;
    let init: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.2).collect();
    for (bf16_moments, dtype) in [
        (false, DType::F32),
        (true, DType::F32),
        (false, DType::BF16),
    ] {
        let cfg = AdamWConfig {
            bf16_moments,
            ..AdamWConfig::default()
        };
        let make = || {
            // 70,007 = 7 x 10,001: a matrix, as the model's weights are
            let t = Tensor::from_vec(init.clone(), (7, n / 7), &Device::Cpu).unwrap();
            vec![
                TrainParam::new("w", &t, dtype, true).unwrap(),
                TrainParam::new("n", &t, dtype, false).unwrap(),
            ]
        };
        let (mut a, mut b) = (make(), make());
        let mut fused = AdamW::new(&a, cfg).unwrap();
        let mut ops = AdamW::new(&b, cfg).unwrap();
        ops.fused = false;
        for step in 0..3 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * (step + 3)) as f32 * 0.011).cos() * 1e-2)
                .collect();
            let g = Tensor::from_vec(g, a[0].var.shape(), &Device::Cpu).unwrap();
            let lr = [1e-3, 7e-4, 2e-5][step];
            // step 2 clips: the fused pass scales by the factor itself (the trainer's way), the
            // tensor-op path scales the gradients first (clip_grad_norm_'s way)
            let max_norm = [0.0, 0.05, 1e9][step];
            let gs = vec![g.clone(), g.clone()];
            let norm = grad_norm(&gs).unwrap();
            let clip = clip_factor(norm, max_norm);
            assert_eq!(clip.is_some(), step == 1, "step {step}: norm {norm}");
            fused.update_scaled(&mut a, &gs, lr, clip).unwrap();
            let mut gs = gs;
            assert_eq!(clip_grad_norm(&mut gs, max_norm).unwrap(), norm);
            ops.update(&mut b, &gs, lr).unwrap();
        }
        let case = format!("bf16 moments {bf16_moments}, {dtype:?}");
        for (pa, pb) in a.iter().zip(&b) {
            let (x, y) = (
                bits(&pa.value_f32().unwrap()),
                bits(&pb.value_f32().unwrap()),
            );
            let differ = x.iter().zip(&y).filter(|(p, q)| p != q).count();
            assert_eq!(differ, 0, "{} ({case}): {differ} elements differ", pa.name);
            let (vx, vy) = (bits(pa.var.as_tensor()), bits(pb.var.as_tensor()));
            assert_eq!(vx, vy, "{} ({case}): the compute variable differs", pa.name);
        }
        let (sa, sb) = (fused.state_tensors(&a), ops.state_tensors(&b));
        for (name, ta) in &sa {
            let tb = &sb[name];
            assert_eq!(ta.dtype(), tb.dtype(), "{name} ({case})");
            assert_eq!(bits(ta), bits(tb), "{name} ({case})");
        }
    }
}

/// A tensor's elements, widened to f32, as bit patterns.
fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}
