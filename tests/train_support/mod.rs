//! Helpers of tests/train.rs: a BPE tokenizer trained on the fixture text, chat-template
//! conversations, and a toy layered model for the recomputation tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture() -> PathBuf {
    repo().join("fixtures/conversations/kjv_long.jsonl")
}

/// Special tokens the built-in templates spell out.
pub const SPECIALS: &[&str] = &["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"];

/// A byte-level BPE tokenizer of `vocab` entries trained on the fixture's text (no downloads).
pub fn train_tokenizer(vocab: usize) -> Tokenizer {
    let text = std::fs::read_to_string(fixture()).expect("fixture");
    let mut corpus = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for t in v["conversations"].as_array().unwrap() {
            corpus.push(t["value"].as_str().unwrap().to_string());
        }
    }
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default()));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tok.train(&mut trainer, corpus.into_iter())
        .expect("train bpe");
    let _ = tok.add_special_tokens(specials);
    tok
}

/// Save a tokenizer.json into `dir`.
pub fn save_tokenizer(tok: &Tokenizer, dir: &Path) -> PathBuf {
    let p = dir.join("tokenizer.json");
    tok.save(&p, false).expect("save tokenizer");
    p
}

/// A toy decoder for the recomputation tests: `embed` is a table lookup, layer `i` is
/// `x + tanh(x W_i) * s_i` with a position-dependent factor (like a logit scale), `head` is a
/// projection. Weights come from a VarBuilder like the real model's.
pub struct Toy {
    pub emb: Tensor,
    pub ws: Vec<Tensor>,
    pub out: Tensor,
}

impl Toy {
    pub fn names(layers: usize) -> Vec<String> {
        let mut n = vec!["emb".to_string(), "out".to_string()];
        n.extend((0..layers).map(|i| format!("w{i}")));
        n
    }

    pub fn random(
        vocab: usize,
        hidden: usize,
        layers: usize,
        dtype: DType,
        seed: u64,
    ) -> Vec<(String, Tensor)> {
        let mut rng = abf::train::data::SplitMix64(seed);
        let mut rand = |shape: (usize, usize), s: f64| {
            let v: Vec<f64> = (0..shape.0 * shape.1)
                .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * s)
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let mut out = vec![
            ("emb".to_string(), rand((vocab, hidden), 1.0)),
            ("out".to_string(), rand((vocab, hidden), 0.5)),
        ];
        for i in 0..layers {
            out.push((format!("w{i}"), rand((hidden, hidden), 0.7)));
        }
        out
    }

    pub fn load(
        vb: candle_nn::VarBuilder,
        vocab: usize,
        hidden: usize,
        layers: usize,
    ) -> candle_core::Result<Toy> {
        Ok(Toy {
            emb: vb.get((vocab, hidden), "emb")?,
            out: vb.get((vocab, hidden), "out")?,
            ws: (0..layers)
                .map(|i| vb.get((hidden, hidden), &format!("w{i}")))
                .collect::<candle_core::Result<_>>()?,
        })
    }
}

impl abf::train::LayerModel for Toy {
    fn num_layers(&self) -> usize {
        self.ws.len()
    }
    fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.emb
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, ()))
    }
    fn layer(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let t = x.dim(1)?;
        let scale: Vec<f64> = (0..t).map(|p| 1.0 + 0.1 * (p as f64 + 1.0).ln()).collect();
        let scale = Tensor::from_vec(scale, (1, t, 1), x.device())?.to_dtype(x.dtype())?;
        let h = x
            .broadcast_matmul(&self.ws[i])?
            .tanh()?
            .broadcast_mul(&scale)?;
        x + h
    }
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.out.t()?)
    }
}

/// The chat template written into the tiny model's tokenizer_config.json (ChatML).
pub const TINY_TEMPLATE: &str = abf::train::template::CHATML_TEMPLATE;

/// Shape of the tiny LLaMA the tests train.
pub struct TinySpec {
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: u64,
    pub tied: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            hidden: 32,
            inter: 64,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            context: 32,
            tied: false,
        }
    }
}

/// Write a tiny random LLaMA checkpoint (config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json) into `dir`; returns the tokenizer.
pub fn write_tiny_model(dir: &Path, spec: &TinySpec, seed: u64) -> Tokenizer {
    std::fs::create_dir_all(dir).unwrap();
    let tok = train_tokenizer(400);
    save_tokenizer(&tok, dir);
    let vocab = tok.get_vocab_size(true);
    let hd = spec.hidden / spec.heads;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.inter,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.context,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": "float32",
        "bos_token_id": tok.token_to_id("<s>"),
        "eos_token_id": tok.token_to_id("<|im_end|>"),
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let tc = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "chat_template": TINY_TEMPLATE,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let mut rng = abf::train::data::SplitMix64(seed);
    let mut rand = |shape: &[usize], s: f64| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * s) as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut w = std::collections::HashMap::new();
    let (h, i) = (spec.hidden, spec.inter);
    w.insert(
        "model.embed_tokens.weight".to_string(),
        rand(&[vocab, h], 0.5),
    );
    w.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
    );
    if !spec.tied {
        w.insert("lm_head.weight".to_string(), rand(&[vocab, h], 0.2));
    }
    let s = 1.0 / (h as f64).sqrt();
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        w.insert(
            format!("{p}.input_layernorm.weight"),
            Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
        );
        w.insert(
            format!("{p}.self_attn.q_proj.weight"),
            rand(&[spec.heads * hd, h], 2.0 * s),
        );
        w.insert(
            format!("{p}.self_attn.k_proj.weight"),
            rand(&[spec.kv_heads * hd, h], 2.0 * s),
        );
        w.insert(
            format!("{p}.self_attn.v_proj.weight"),
            rand(&[spec.kv_heads * hd, h], s),
        );
        w.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rand(&[h, spec.heads * hd], s),
        );
        w.insert(format!("{p}.mlp.gate_proj.weight"), rand(&[i, h], s));
        w.insert(format!("{p}.mlp.up_proj.weight"), rand(&[i, h], s));
        w.insert(
            format!("{p}.mlp.down_proj.weight"),
            rand(&[h, i], 1.0 / (i as f64).sqrt()),
        );
    }
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    tok
}

/// Run abf-tune with `args`; returns (exit code, stdout, stderr).
pub fn tune_cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_abf-tune"))
        .args(args)
        .output()
        .expect("run abf-tune");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
