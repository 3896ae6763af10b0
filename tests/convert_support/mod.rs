//! Tiny random LLaMA checkpoints for the conversion tests (shared by tests/convert.rs and
//! tests/convert_llamacpp.rs).
#![allow(dead_code)]

use std::borrow::Cow;
use std::path::Path;

use abf::checkpoint::{write_safetensors, TensorData, TensorDtype, DEFAULT_SHARD_BYTES};
use serde_json::{json, Map, Value};

/// A deterministic generator (SplitMix64), so the tests need no extra crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut g = abf::train::data::SplitMix64(self.0);
        let v = g.next_u64();
        self.0 = g.0;
        v
    }

    /// Uniform in [-scale, scale).
    pub fn f32(&mut self, scale: f32) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
}

/// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
pub fn byte_chars() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

/// Shape of a tiny model.
#[derive(Debug, Clone, Copy)]
pub struct Tiny {
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
    pub context: u64,
    pub rope_theta: f64,
}

impl Default for Tiny {
    fn default() -> Self {
        Tiny {
            hidden: 64,
            inter: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 272,
            tied: false,
            context: 64,
            rope_theta: 10000.0,
        }
    }
}

/// Byte-level BPE tokenizer.json: 256 byte tokens, four merges, one special token; its
/// pre-tokenizer is SmolLM2's (digits one by one, then GPT-2's regex).
pub fn tokenizer_json() -> Value {
    let chars = byte_chars();
    let mut vocab = Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let merges = [("h", "e"), ("\u{120}", "t"), ("\u{120}t", "he"), ("l", "l")];
    let mut id = 256;
    for (a, b) in merges {
        vocab.insert(format!("{a}{b}"), json!(id));
        id += 1;
    }
    let special = id; // 260
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": special, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    })
}

/// Write a random tiny LLaMA checkpoint (f32) with a tokenizer into `dir`.
pub fn write_tiny(dir: &Path, t: Tiny, seed: u64, extra_config: &[(&str, Value)]) {
    std::fs::create_dir_all(dir).unwrap();
    let d = t.hidden / t.heads;
    let mut rng = Rng(seed);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let data: Vec<u8> = (0..n).flat_map(|_| rng.f32(scale).to_le_bytes()).collect();
        tensors.push(TensorData {
            name,
            dtype: TensorDtype::F32,
            shape,
            data: Cow::Owned(data),
        });
    };
    let h = t.hidden;
    add(
        "model.embed_tokens.weight".into(),
        vec![t.vocab, h],
        1.0,
        &mut rng,
    );
    for l in 0..t.layers {
        let p = format!("model.layers.{l}");
        add(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            1.0,
            &mut rng,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            1.0,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![t.heads * d, h],
            0.3,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![t.kv_heads * d, h],
            0.3,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![t.kv_heads * d, h],
            0.3,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, t.heads * d],
            0.3,
            &mut rng,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![t.inter, h],
            0.3,
            &mut rng,
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            vec![t.inter, h],
            0.3,
            &mut rng,
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, t.inter],
            0.3,
            &mut rng,
        );
    }
    add("model.norm.weight".into(), vec![h], 1.0, &mut rng);
    if !t.tied {
        add("lm_head.weight".into(), vec![t.vocab, h], 0.3, &mut rng);
    }
    write_safetensors(dir, &tensors, DEFAULT_SHARD_BYTES, true).unwrap();
    let mut cfg = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": t.inter, "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads, "num_key_value_heads": t.kv_heads,
        "rms_norm_eps": 1e-5, "vocab_size": t.vocab, "max_position_embeddings": t.context,
        "rope_theta": t.rope_theta, "tie_word_embeddings": t.tied,
        "bos_token_id": 260, "eos_token_id": 260, "hidden_act": "silu", "torch_dtype": "float32"
    });
    for (k, v) in extra_config {
        cfg[*k] = v.clone();
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&cfg).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tokenizer_json()).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec(&json!({
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "add_bos_token": false,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        }))
        .unwrap(),
    )
    .unwrap();
}
