//! Fine-tuning: data parsing and splitting, chat templates and masks, schedule, AdamW, the loss,
//! recomputation gradients against plain backward and finite differences, the trainer.

mod train_support;

use std::collections::HashMap;

use abf::train::data::{epoch_order, parse_conversations, Role, SplitMix64};
use abf::train::examples::{encode, prepare, Example, PrepConfig};
use abf::train::template::ChatTemplate;
use abf::train::{
    clip_grad_norm, loss_and_grads, masked_nll_sum, AdamW, AdamWConfig, BackwardPlan, Batch,
    GradAcc, LayerModel, Message, ParamSet, Schedule, ScheduleKind, TrainConfig, TrainParam,
    Trainer,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use train_support::*;

// ---------------------------------------------------------------- data

#[test]
fn sharegpt_jsonl_and_openai_json_parse() {
    let jsonl = br#"{"id": "a", "conversations": [{"from": "gpt", "value": "hello, how can I help"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]}
{"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}]}
"#;
    let (convs, rep) = parse_conversations(jsonl, "x.jsonl").unwrap();
    assert_eq!(rep.records, 2);
    assert_eq!(rep.skipped, 0);
    // the leading assistant greeting is dropped
    assert_eq!(convs[0].id, "a");
    assert_eq!(convs[0].messages.len(), 2);
    assert_eq!(convs[0].messages[0].role, Role::User);
    assert_eq!(convs[1].id, "record 2");
    assert_eq!(convs[1].system().unwrap().content, "sys");

    let json = br#"[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}]}]"#;
    let (convs, rep) = parse_conversations(json, "x.json").unwrap();
    assert_eq!((rep.records, rep.skipped), (1, 0));
    assert_eq!(convs[0].messages[1].content, "hello");
}

#[test]
fn bad_records_are_skipped_counted_and_explained() {
    let jsonl =
        br#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
not json at all
{"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q again"}]}
{"conversations": [{"from": "wizard", "value": "q"}]}
{"messages": [{"role": "user", "content": "only a question"}]}
{"text": "no turns"}
[1, 2]
{"messages": [{"role": "user", "content": null}]}
"#;
    let (convs, rep) = parse_conversations(jsonl, "bad.jsonl").unwrap();
    assert_eq!(convs.len(), 1);
    assert_eq!(rep.records, 8);
    assert_eq!(rep.skipped, 7);
    assert_eq!(rep.reasons.len(), abf::train::data::MAX_REASONS);
    assert!(
        rep.reasons[0].contains("record 2") && rep.reasons[0].contains("malformed JSON"),
        "{:?}",
        rep.reasons
    );
    assert!(rep.reasons[1].contains("alternate"), "{:?}", rep.reasons);
    assert!(
        rep.reasons[2].contains("unknown role \"wizard\""),
        "{:?}",
        rep.reasons
    );
    assert!(
        rep.reasons[3].contains("no assistant message"),
        "{:?}",
        rep.reasons
    );
    assert!(rep.reasons[4].contains("neither"), "{:?}", rep.reasons);
    // a file with no JSON at all is an error naming it
    let err = parse_conversations(b"hello\nworld\n", "prose.txt").unwrap_err();
    assert!(err.to_string().contains("prose.txt"), "{err}");
}

#[test]
fn seeded_orders_are_reproducible_permutations() {
    let a = epoch_order(50, 7, 0);
    assert_eq!(a, epoch_order(50, 7, 0));
    assert_ne!(a, epoch_order(50, 7, 1));
    assert_ne!(a, epoch_order(50, 8, 0));
    let mut s = a.clone();
    s.sort();
    assert_eq!(s, (0..50).collect::<Vec<_>>());
    // SplitMix64 reference values (Vigna's splitmix64.c with seed 0)
    let mut r = SplitMix64(0);
    assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
}

// ---------------------------------------------------------------- templates and masks

fn convo() -> Vec<Message> {
    vec![
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "Say one."),
        Message::new(Role::Assistant, "One."),
        Message::new(Role::User, "Say two."),
        Message::new(Role::Assistant, "Two."),
    ]
}

#[test]
fn builtin_templates_render_as_published() {
    let chatml = ChatTemplate::builtin("chatml").unwrap();
    let text = chatml.render(&convo(), false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay one.<|im_end|>\n\
         <|im_start|>assistant\nOne.<|im_end|>\n<|im_start|>user\nSay two.<|im_end|>\n\
         <|im_start|>assistant\nTwo.<|im_end|>\n"
    );
    let llama = ChatTemplate::builtin("llama-2").unwrap();
    let text = llama.render(&convo(), false).unwrap();
    assert_eq!(
        text,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nSay one. [/INST] One. </s><s>[INST] Say two. [/INST] Two. </s>"
    );
    // raise_exception works (roles must alternate)
    let bad = vec![Message::new(Role::User, "a"), Message::new(Role::User, "b")];
    let err = llama.render(&bad, false).unwrap_err().to_string();
    assert!(err.contains("alternate"), "{err}");
    assert!(ChatTemplate::builtin("vicuna").is_err());
}

#[test]
fn assistant_spans_cover_replies_and_end_markers_only() {
    let chatml = ChatTemplate::builtin("chatml").unwrap();
    let r = chatml.render_with_spans(&convo()).unwrap();
    let spans: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, vec!["One.<|im_end|>\n", "Two.<|im_end|>\n"]);
    let llama = ChatTemplate::builtin("llama-2").unwrap();
    let r = llama.render_with_spans(&convo()).unwrap();
    let spans: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, vec![" One. </s>", " Two. </s>"]);
}

#[test]
fn template_from_tokenizer_config_with_python_methods() {
    let dir = tempfile::tempdir().unwrap();
    // pycompat string methods, loop variables, namespace and raise_exception, as HF templates use
    let cfg = serde_json::json!({
        "bos_token": {"content": "<s>"},
        "eos_token": "</s>",
        "chat_template": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}{{ bos_token if loop.first else '' }}{{ m['role'].upper() }}: {{ m['content'].strip() }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    });
    let p = dir.path().join("tokenizer_config.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&p).unwrap();
    let msgs = vec![
        Message::new(Role::User, "  hi "),
        Message::new(Role::Assistant, "yo"),
    ];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<s>USER: hi\nASSISTANT: yo</s>\n"
    );
    let err = t
        .render(&[Message::new(Role::System, "s")], false)
        .unwrap_err();
    assert!(err.to_string().contains("bad role"), "{err}");
    // no template: a clear error naming the file
    std::fs::write(&p, "{}").unwrap();
    let err = ChatTemplate::from_tokenizer_config(&p)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("chat_template"),
        "{err}"
    );
}

#[test]
fn mask_positions_match_the_rendered_assistant_text() {
    let tok = train_tokenizer(400);
    for name in ["chatml", "llama-2"] {
        let t = ChatTemplate::builtin(name).unwrap();
        let enc = encode(&tok, &t, &convo()).unwrap();
        let r = t.render_with_spans(&convo()).unwrap();
        // the text under each run of masked tokens (by the tokenizer's own offsets) is exactly
        // one assistant span: reply and end marker, no header
        let offsets = tok
            .encode(r.text.as_str(), false)
            .unwrap()
            .get_offsets()
            .to_vec();
        assert_eq!(offsets.len(), enc.example.len());
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut open = false;
        for (i, m) in enc.example.mask.iter().enumerate() {
            if *m && !open {
                runs.push((offsets[i].0, offsets[i].1));
            } else if *m {
                runs.last_mut().unwrap().1 = offsets[i].1;
            }
            open = *m;
        }
        let got: Vec<&str> = runs.iter().map(|&(a, b)| &r.text[a..b]).collect();
        let expected: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(got, expected, "{name}");
        let want = if name == "chatml" {
            vec!["One.<|im_end|>\n", "Two.<|im_end|>\n"]
        } else {
            vec![" One. </s>", " Two. </s>"]
        };
        assert_eq!(got, want, "{name}");
    }
}

// ---------------------------------------------------------------- splitting

#[test]
fn long_conversations_split_at_turn_boundaries() {
    let tok = train_tokenizer(400);
    let t = ChatTemplate::builtin("chatml").unwrap();
    let (convs, mut rep) = abf::train::load_conversations(&fixture()).unwrap();
    assert_eq!(convs.len(), 8);
    let whole: Vec<usize> = convs
        .iter()
        .map(|c| encode(&tok, &t, &c.messages).unwrap().example.len())
        .collect();
    let seq_len = 2048;
    let cfg = PrepConfig {
        seq_len,
        min_tokens: 0,
        samples: None,
        seed: 1,
    };
    let (ex, prep) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    let longer = whole.iter().filter(|&&n| n > seq_len).count();
    assert!(
        longer >= 4,
        "fixture should have long conversations: {whole:?}"
    );
    assert_eq!(prep.split, longer);
    assert!(ex.len() > convs.len());
    for e in &ex {
        assert!(e.len() <= seq_len);
        // every piece is a well-formed conversation opening (system, then) a user turn
        assert_eq!(e.tokens[0], tok.token_to_id("<|im_start|>").unwrap());
        let head = tok.decode(&e.tokens[1..8], false).unwrap();
        let head = head.trim_start();
        assert!(
            head.starts_with("user\n") || head.starts_with("system\n"),
            "{head}"
        );
        assert!(e.targets() > 0);
    }
    // pieces with a system message repeat it
    let sys = ex
        .iter()
        .filter(|e| {
            tok.decode(&e.tokens[1..8], false)
                .unwrap()
                .trim_start()
                .starts_with("system")
        })
        .count();
    assert!(sys >= 3 + prep.split / 2, "{sys}");

    // --min-tokens drops whole conversations
    let min = *whole.iter().max().unwrap();
    let cfg = PrepConfig {
        seq_len: 1 << 20,
        min_tokens: min,
        samples: None,
        seed: 1,
    };
    let (ex, prep) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    assert_eq!((ex.len(), prep.dropped_short), (1, 7));

    // --samples keeps that many after a seeded shuffle
    let cfg = PrepConfig {
        seq_len: 2048,
        min_tokens: 0,
        samples: Some(5),
        seed: 3,
    };
    let (a, _) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    let (b, _) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    assert_eq!(a.len(), 5);
    assert_eq!(a, b);
    let cfg = PrepConfig { seed: 4, ..cfg };
    let (c, _) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    assert_ne!(a, c);
}

#[test]
fn an_exchange_longer_than_seq_len_is_truncated() {
    let tok = train_tokenizer(300);
    let t = ChatTemplate::builtin("chatml").unwrap();
    let c = abf::train::Conversation {
        id: "x".into(),
        messages: vec![
            Message::new(Role::User, "short"),
            Message::new(Role::Assistant, "word ".repeat(300)),
            Message::new(Role::User, "again"),
            Message::new(Role::Assistant, "ok"),
        ],
    };
    let mut rep = Default::default();
    let cfg = PrepConfig {
        seq_len: 64,
        min_tokens: 0,
        samples: None,
        seed: 0,
    };
    let (ex, prep) = prepare(&[c], &tok, &t, &cfg, &mut rep).unwrap();
    assert_eq!(prep.truncated, 1);
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].len(), 64);
}

#[test]
fn empty_result_is_an_error_naming_the_file() {
    let tok = train_tokenizer(300);
    let t = ChatTemplate::builtin("chatml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data.jsonl");
    std::fs::write(
        &p,
        "{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}]}\n",
    )
    .unwrap();
    let cfg = PrepConfig {
        seq_len: 64,
        min_tokens: 0,
        samples: None,
        seed: 0,
    };
    let err = abf::train::load_examples(&p, &tok, &t, &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.jsonl") && err.contains("no assistant message"),
        "{err}"
    );
}

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

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
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
    };
    let rec = BackwardPlan {
        recompute: true,
        head_chunk: 3,
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

// ---------------------------------------------------------------- the real model (crate::model)

use abf::rope::{BaseRope, Recipe, RopeMethod};

/// A tiny LLaMA on disk, its config with an eabf recipe whose window c = 32 makes the logit
/// scale exceed 1 within the test sequences, and its weights in `dtype`.
fn tiny_llama(
    dtype: DType,
    skip: usize,
) -> (
    tempfile::TempDir,
    abf::checkpoint::ModelConfig,
    Vec<(String, Tensor)>,
) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &TinySpec::default(), 11);
    let mut cfg = abf::checkpoint::ModelConfig::load(dir.path()).unwrap();
    let mut r = Recipe::for_method(
        RopeMethod::Eabf,
        BaseRope {
            base: 10000.0,
            context: 32,
        },
    );
    r.skip_layers = skip;
    cfg.recipe = r;
    let w = abf::train::hf::load_weights(dir.path(), &cfg, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(dtype).unwrap()))
        .collect();
    (dir, cfg, w)
}

fn llama_batch() -> Batch {
    let mut rng = SplitMix64(3);
    let n = 48;
    let tokens: Vec<u32> = (0..n).map(|_| 5 + rng.below(300) as u32).collect();
    let mask = (0..n).map(|j| j % 3 != 0).collect();
    let e = Example { tokens, mask };
    Batch::from_examples(&[&e], &Device::Cpu).unwrap()
}

fn llama_loss_grads(
    cfg: &abf::checkpoint::ModelConfig,
    w: Vec<(String, Tensor)>,
    plan: BackwardPlan,
) -> (ParamSet, f64, Vec<Tensor>) {
    let set = ParamSet::full(w, DType::F64).unwrap();
    let vb = VarBuilder::from_tensors(set.weight_map().unwrap(), DType::F64, &Device::Cpu);
    let model = abf::train::hf::llama_factory(cfg.clone())(vb).unwrap();
    let mut acc = GradAcc::new(set.params.len());
    let loss = loss_and_grads(
        model.as_ref(),
        &llama_batch(),
        0.05,
        &set.params,
        &mut acc,
        plan,
    )
    .unwrap();
    let g = acc.finish(&set.params).unwrap();
    (set, loss, g)
}

#[test]
fn llama_recomputation_and_scaled_attention_match_finite_differences() {
    let (_d, cfg, w) = tiny_llama(DType::F64, 1);
    let plain = BackwardPlan {
        recompute: false,
        head_chunk: 1 << 20,
    };
    let rec = BackwardPlan {
        recompute: true,
        head_chunk: 16,
    };
    let (set, l0, g0) = llama_loss_grads(&cfg, w.clone(), plain);
    let (_, l1, g1) = llama_loss_grads(&cfg, w.clone(), rec);
    assert!((l0 - l1).abs() < 1e-12 * l0.abs(), "{l0} {l1}");
    for (p, (a, b)) in set.params.iter().zip(g0.iter().zip(&g1)) {
        for (x, y) in flat(a).iter().zip(flat(b)) {
            assert!(
                (x - y).abs() < 1e-12 * (1.0 + x.abs()),
                "{}: {x} {y}",
                p.name
            );
        }
    }
    // central differences in f64 through the whole recipe-driven forward (rope with the ABF
    // base, logit scale lambda(p+1) = ln(p+1)/ln 32 > 1 past position 31 on layers 1 and 2)
    let h = 1e-6;
    let loss_with = |name: &str, j: usize, d: f64| -> f64 {
        let mut w2 = w.clone();
        let t = &mut w2.iter_mut().find(|(n, _)| n == name).unwrap().1;
        let mut v = flat(t);
        v[j] += d;
        *t = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
        llama_loss_grads(&cfg, w2, plain).1
    };
    let mut checked = 0;
    for name in [
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        let pi = set.params.iter().position(|p| p.name == name).unwrap();
        let g = flat(&g1[pi]);
        // the largest-gradient entry and two fixed ones
        let big = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for j in [big, 7 % g.len(), g.len() - 1] {
            let fd = (loss_with(name, j, h) - loss_with(name, j, -h)) / (2.0 * h);
            assert!(
                (fd - g[j]).abs() < 1e-7 + 1e-5 * fd.abs(),
                "{name}[{j}]: fd {fd} analytic {}",
                g[j]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 27);
}

#[test]
fn logit_scaling_reaches_the_gradient() {
    // same weights and base; eabf (scaled) against abf (unscaled) must give different gradients
    // for the scaled layers, and identical ones when the scale is 1 everywhere (short sequence
    // in the window)
    let (_d, cfg, w) = tiny_llama(DType::F64, 0);
    let mut abf_cfg = cfg.clone();
    abf_cfg.recipe.method = RopeMethod::Abf;
    abf_cfg.recipe.scale_law = abf::rope::ScaleLaw::None;
    let plan = BackwardPlan::default();
    let (set, _, ge) = llama_loss_grads(&cfg, w.clone(), plan);
    let (_, _, ga) = llama_loss_grads(&abf_cfg, w, plan);
    let qi = set
        .params
        .iter()
        .position(|p| p.name == "model.layers.2.self_attn.q_proj.weight")
        .unwrap();
    let diff = flat(&ge[qi])
        .iter()
        .zip(flat(&ga[qi]))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff > 1e-6, "{diff}");
}

fn read_log(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("training_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn fixture_str() -> String {
    fixture().display().to_string()
}

/// Common flags of the CLI runs: 4 examples, batch 4, so every step sees the same batch and
/// losses are comparable step to step.
fn run_flags<'a>(model: &'a str, out: &'a str, data: &'a str) -> Vec<&'a str> {
    vec![
        "--model",
        model,
        "--data",
        data,
        "-o",
        out,
        "--seq-len",
        "96",
        "--samples",
        "4",
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--lr",
        "1e-2",
        "--seed",
        "5",
        "--head-chunk",
        "32",
    ]
}

#[test]
fn cli_trains_the_fixture_and_writes_a_checkpoint_with_the_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_model(&model, &TinySpec::default(), 1);
    let out = dir.path().join("out");
    let (m, o, d) = (
        model.display().to_string(),
        out.display().to_string(),
        fixture_str(),
    );
    let mut args = run_flags(&m, &o, &d);
    args.extend(["--steps", "6", "--json"]);
    let (code, stdout, stderr) = tune_cli(&args);
    assert_eq!(code, 0, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["finished"], true);
    assert_eq!(summary["steps_done"], 6);
    let log = read_log(&out);
    assert_eq!(log.len(), 6);
    let losses: Vec<f64> = log.iter().map(|l| l["loss"].as_f64().unwrap()).collect();
    // the same batch every step: the loss falls
    assert!(losses[5] < 0.8 * losses[0], "{losses:?}");
    for (k, l) in log.iter().enumerate() {
        assert_eq!(l["step"], k as u64 + 1);
        for key in ["lr", "grad_norm", "tokens_per_s", "tokens"] {
            assert!(l[key].as_f64().is_some(), "{key}");
        }
    }
    // cosine over 6 steps from 1e-2
    assert!((log[3]["lr"].as_f64().unwrap() - 0.5e-2).abs() < 1e-12);
    // the output is a checkpoint whose config carries the recipe and the target window
    let cfg = abf::checkpoint::ModelConfig::load(&out).unwrap();
    let want = Recipe::for_method(
        RopeMethod::Eabf,
        BaseRope {
            base: 10000.0,
            context: 32,
        },
    );
    assert_eq!(cfg.recipe, want);
    assert_eq!(cfg.max_position_embeddings, 128);
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // and the model code loads it, with weights that moved
    let before = abf::train::hf::load_weights(&model, &cfg, &Device::Cpu).unwrap();
    let after: HashMap<String, Tensor> = abf::train::hf::load_weights(&out, &cfg, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(before.len(), after.len());
    let (n, t) = &before[before.len() / 2];
    assert_ne!(flat(t), flat(&after[n]), "{n}");
    let vb = VarBuilder::from_tensors(after, DType::F32, &Device::Cpu);
    abf::model::Llama::load(vb, &cfg).unwrap();
}

#[test]
fn cli_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_model(&model, &TinySpec::default(), 2);
    let (m, d) = (model.display().to_string(), fixture_str());
    let a = dir.path().join("a").display().to_string();
    let b = dir.path().join("b").display().to_string();
    // 8 examples, batch 4: two batches an epoch, order reshuffled each epoch
    let flags = |o: &str| -> Vec<String> {
        let mut v: Vec<String> = run_flags(&m, o, &d).iter().map(|s| s.to_string()).collect();
        if let Some(s) = v.iter_mut().skip_while(|s| *s != "--samples").nth(1) {
            *s = "8".to_string();
        }
        v.extend([
            "--steps".into(),
            "6".into(),
            "--save-every".into(),
            "2".into(),
        ]);
        v
    };
    let straight: Vec<String> = flags(&a);
    let (code, _, err) = tune_cli(&straight.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let mut first: Vec<String> = flags(&b);
    first.extend(["--stop-after".into(), "3".into()]);
    let (code, out, err) = tune_cli(&first.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stopped after 3 of 6"), "{out}");
    assert!(!std::path::Path::new(&b).join("model.safetensors").exists());
    let (code, _, err) = tune_cli(&["--resume", &b]);
    assert_eq!(code, 0, "{err}");
    let la = read_log(std::path::Path::new(&a));
    let lb = read_log(std::path::Path::new(&b));
    assert_eq!(lb.len(), 6);
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x["loss"], y["loss"]);
        assert_eq!(x["lr"], y["lr"]);
        assert_eq!(x["grad_norm"], y["grad_norm"]);
    }
    let wa = candle_core::safetensors::load(
        std::path::Path::new(&a).join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let wb = candle_core::safetensors::load(
        std::path::Path::new(&b).join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(wa.len(), wb.len());
    let mut max = 0f64;
    for (n, t) in &wa {
        for (x, y) in flat(t).iter().zip(flat(&wb[n])) {
            max = max.max((x - y).abs());
        }
    }
    assert!(max <= 1e-6, "{max}");
    // resuming a finished run has nothing to do but is not an error; a missing checkpoint is
    let (code, _, err) = tune_cli(&[
        "--resume",
        &dir.path().join("nowhere").display().to_string(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("nowhere"), "{err}");
}

#[test]
fn cli_lora_trains_adapters_and_merges_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_model(
        &model,
        &TinySpec {
            tied: true,
            ..TinySpec::default()
        },
        3,
    );
    let out = dir.path().join("out");
    let (m, o, d) = (
        model.display().to_string(),
        out.display().to_string(),
        fixture_str(),
    );
    let mut args = run_flags(&m, &o, &d);
    args.extend([
        "--steps",
        "3",
        "--lora",
        "4",
        "--json",
        "--method",
        "abf",
        "--rope-base",
        "40000",
    ]);
    let (code, stdout, stderr) = tune_cli(&args);
    assert_eq!(code, 0, "{stderr}");
    let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let trainable = s["trainable_parameters"].as_u64().unwrap();
    let total = s["parameters"].as_u64().unwrap();
    assert!(trainable < total / 2, "{trainable} of {total}");
    let cfg = abf::checkpoint::ModelConfig::load(&out).unwrap();
    assert_eq!(cfg.recipe.method, RopeMethod::Abf);
    assert_eq!(cfg.recipe.rope_base, 40000.0);
    let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.keys().all(|k| !k.contains("lora")), "adapters are merged");
    let base =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let q = "model.layers.1.self_attn.q_proj.weight";
    assert_ne!(flat(&w[q]), flat(&base[q]));
    // frozen: lm_head is tied here, so check a norm moved (trainable) and shapes are unchanged
    assert_eq!(w[q].dims(), base[q].dims());
}

#[test]
fn nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_model(&model, &TinySpec::default(), 4);
    let out = dir.path().join("out");
    let (m, o, d) = (
        model.display().to_string(),
        out.display().to_string(),
        fixture_str(),
    );
    let mut args = run_flags(&m, &o, &d);
    let lr = args.iter().position(|a| *a == "--lr").unwrap();
    args[lr + 1] = "1e30";
    args.extend(["--steps", "6", "--save-every", "1", "--weight-decay", "0"]);
    let (code, _, stderr) = tune_cli(&args);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        (stderr.contains("the loss is") || stderr.contains("the gradient norm is"))
            && stderr.contains("last good checkpoint"),
        "{stderr}"
    );
    let state = abf::train::trainer::read_state(&out.join("checkpoint")).unwrap();
    assert!(state.step >= 1 && state.step < 6, "{}", state.step);
    // the checkpoint is the step before the failing one, and its weights are finite
    let failed: u64 = stderr
        .split("error: step ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(state.step, failed - 1, "{stderr}");
    let p = candle_core::safetensors::load(out.join("checkpoint/params.safetensors"), &Device::Cpu)
        .unwrap();
    assert!(p.values().all(|t| flat(t).iter().all(|x| x.is_finite())));
}

#[test]
fn cli_exit_codes_and_messages() {
    let (code, out, _) = tune_cli(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--method",
        "--lora",
        "--resume",
        "--adam-betas",
        "--save-every",
        "--skip-layers",
    ] {
        assert!(out.contains(flag), "{flag}");
    }
    let (code, _, err) = tune_cli(&["--data", "x.jsonl"]);
    assert_eq!(code, 2, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_model(&model, &TinySpec::default(), 5);
    let m = model.display().to_string();
    let o = dir.path().join("o").display().to_string();
    // a missing data file
    let (code, _, err) = tune_cli(&["--model", &m, "--data", "/nonexistent/data.jsonl", "-o", &o]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/data.jsonl"), "{err}");
    // no usable records
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": []}\n").unwrap();
    let (code, _, err) = tune_cli(&[
        "--model",
        &m,
        "--data",
        &bad.display().to_string(),
        "-o",
        &o,
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.jsonl") && err.contains("no training examples"),
        "{err}"
    );
    // CUDA on a build without it
    if !candle_core::utils::cuda_is_available() {
        let (code, _, err) = tune_cli(&[
            "--model",
            &m,
            "--data",
            &fixture_str(),
            "-o",
            &o,
            "--device",
            "cuda:0",
        ]);
        assert_eq!(code, 2);
        assert!(err.contains("without CUDA"), "{err}");
    }
    // a bad flag value
    let (code, _, _) = tune_cli(&[
        "--model",
        &m,
        "--data",
        &fixture_str(),
        "-o",
        &o,
        "--adam-betas",
        "0.9",
    ]);
    assert_eq!(code, 2);
    // an existing non-empty output directory without --force
    std::fs::create_dir_all(&o).unwrap();
    std::fs::write(std::path::Path::new(&o).join("x"), "x").unwrap();
    let (code, _, err) = tune_cli(&["--model", &m, "--data", &fixture_str(), "-o", &o]);
    assert_eq!(code, 2);
    assert!(err.contains("not empty"), "{err}");
}

#[test]
fn cli_bf16_compute_runs_and_saves_in_the_checkpoint_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_tiny_model(&model, &TinySpec::default(), 6);
    let out = dir.path().join("out");
    let (m, o, d) = (
        model.display().to_string(),
        out.display().to_string(),
        fixture_str(),
    );
    let mut args = run_flags(&m, &o, &d);
    args.extend(["--steps", "2", "--dtype", "bf16", "--json"]);
    let (code, stdout, stderr) = tune_cli(&args);
    assert_eq!(code, 0, "{stderr}");
    let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(s["last_loss"].as_f64().unwrap().is_finite());
    let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.values().all(|t| t.dtype() == DType::F32));
    // the f32 masters moved by amounts that bf16 weights alone could not hold
    let base =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let q = "model.layers.2.mlp.up_proj.weight";
    let off_grid = flat(&w[q])
        .iter()
        .filter(|x| half::bf16::from_f64(**x).to_f64() != **x)
        .count();
    assert!(off_grid > 0);
    assert_ne!(flat(&w[q]), flat(&base[q]));
}

/// A measurement, not a check (run with `--ignored --nocapture`): one SmolLM2-135M-shaped model
/// (30 layers, hidden 576, 9/3 heads, MLP 1536; random weights, the test vocabulary) trained for
/// 2 steps of one `ABF_BENCH_SEQ`-token sequence (default 1024) on the CPU; prints the log.
/// `ABF_BENCH_NO_RECOMPUTE=1` keeps all activations, `ABF_BENCH_LORA=R` trains adapters.
#[test]
#[ignore]
fn measure_smollm_shaped_steps() {
    let seq = std::env::var("ABF_BENCH_SEQ").unwrap_or_else(|_| "1024".into());
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let spec = TinySpec {
        hidden: 576,
        inter: 1536,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        context: 2048,
        tied: true,
    };
    write_tiny_model(&model, &spec, 8);
    let out = dir.path().join("out");
    let (m, o, d) = (
        model.display().to_string(),
        out.display().to_string(),
        fixture_str(),
    );
    let mut args = vec![
        "--model",
        &m,
        "--data",
        &d,
        "-o",
        &o,
        "--seq-len",
        &seq,
        "--samples",
        "1",
        "--batch-size",
        "1",
        "--steps",
        "2",
    ];
    if std::env::var("ABF_BENCH_NO_RECOMPUTE").is_ok() {
        args.push("--no-recompute");
    }
    let lora = std::env::var("ABF_BENCH_LORA").ok();
    if let Some(r) = &lora {
        args.extend(["--lora", r.as_str()]);
    }
    let (code, _, err) = tune_cli(&args);
    assert_eq!(code, 0, "{err}");
    for l in read_log(&out) {
        println!("{l}");
    }
}

/// SmolLM2-135M-Instruct's `chat_template` (as stored in its GGUF's `tokenizer.chat_template`):
/// it adds a default system prompt when the conversation has none, which the incremental spans
/// must survive.
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn smollm2_template_spans() {
    let t = ChatTemplate::new(SMOLLM2_TEMPLATE, "smollm2", "", "<|im_end|>").unwrap();
    let msgs = &convo()[1..];
    let r = t.render_with_spans(msgs).unwrap();
    assert!(r
        .text
        .starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    let spans: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, vec!["One.<|im_end|>\n", "Two.<|im_end|>\n"]);
    // with a system message of its own, no default is added
    let r = t.render_with_spans(&convo()).unwrap();
    assert!(r
        .text
        .starts_with("<|im_start|>system\nBe brief.<|im_end|>"));
}
