//! Hugging Face checkpoints: config variants, every error naming its file and thing, safetensors
//! (single, sharded, bf16/f16) against tensors generated here with the `safetensors` crate, the
//! checkpoint writer read back by the `safetensors` crate, tokenizer files, and patch-config
//! (library and binary).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abf::checkpoint::{
    patch_config, save_checkpoint, write_patched, CheckpointError, HfConfig, ModelType,
    PatchOutput, RecipeSource, RopeForm, SafetensorStore, SaveSpec, TensorData, TensorDtype,
    TokenizerFiles,
};
use abf::rope::{BaseRope, Recipe, RopeMethod, ScaleLaw, Target};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView as StView;
use safetensors::Dtype as StDtype;
use serde_json::{json, Value};

// ---------- helpers ----------

/// A deterministic pseudo-random stream (64-bit LCG, Knuth's constants).
struct Lcg(u64);
impl Lcg {
    fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A tiny LLaMA config: vocab 32, hidden 16, 4 heads (2 kv), head_dim 4, 2 layers.
fn tiny_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "custom_key_kept": {"z": 1, "a": 2}
    })
}

/// The tiny model's tensors (name, shape, f32 values), in a fixed order.
fn tiny_tensors(seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Lcg(seed);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![32, 16])];
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![16]));
        shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![16, 16]));
        shapes.push((format!("{p}.self_attn.k_proj.weight"), vec![8, 16]));
        shapes.push((format!("{p}.self_attn.v_proj.weight"), vec![8, 16]));
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![16, 16]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![16]));
        shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![24, 16]));
        shapes.push((format!("{p}.mlp.up_proj.weight"), vec![24, 16]));
        shapes.push((format!("{p}.mlp.down_proj.weight"), vec![16, 24]));
    }
    shapes.push(("model.norm.weight".into(), vec![16]));
    shapes.push(("lm_head.weight".into(), vec![32, 16]));
    shapes
        .into_iter()
        .map(|(n, s)| {
            let count = s.iter().product();
            let v = (0..count).map(|_| rng.next_f32()).collect();
            (n, s, v)
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write tensors with the safetensors crate (an implementation independent of ours).
fn st_write(path: &Path, tensors: &[(String, StDtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, StView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), StView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

fn write_config(dir: &Path, config: &Value) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}

/// A tiny model directory with single-file f32 weights.
fn tiny_model(dir: &Path, config: &Value) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    std::fs::create_dir_all(dir).unwrap();
    write_config(dir, config);
    let tensors = tiny_tensors(7);
    let st: Vec<_> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), StDtype::F32, s.clone(), f32_bytes(v)))
        .collect();
    st_write(&dir.join("model.safetensors"), &st);
    write_tokenizer(dir);
    tensors
}

/// A WordLevel tokenizer.json and its config files.
fn write_tokenizer(dir: &Path) {
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "unk_token": "<unk>",
        "pad_token": null,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "model_max_length": 4096
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let gen = json!({"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": false});
    std::fs::write(dir.join("generation_config.json"), gen.to_string()).unwrap();
}

fn parse(config: Value) -> Result<HfConfig, CheckpointError> {
    HfConfig::from_value(Path::new("/m/config.json"), config)
}

fn with(mut base: Value, patch: Value) -> Value {
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() && k.starts_with('-') {
            base.as_object_mut().unwrap().shift_remove(&k[1..]);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1e-300)
}

// ---------- config.json ----------

#[test]
fn llama_config_with_defaults_and_plain_rope() {
    let c = parse(tiny_config()).unwrap();
    let m = &c.model;
    assert_eq!(m.model_type, ModelType::Llama);
    assert_eq!(
        (m.vocab_size, m.hidden_size, m.intermediate_size),
        (32, 16, 24)
    );
    assert_eq!(
        (m.num_attention_heads, m.num_key_value_heads, m.head_dim),
        (4, 2, 4)
    );
    assert_eq!(m.rms_norm_eps, 1e-5);
    assert_eq!((m.bos_token_id, m.eos_token_id), (Some(1), Some(2)));
    assert_eq!(c.recipe_source, RecipeSource::Hf);
    assert_eq!(c.rope_form, RopeForm::Legacy);
    assert_eq!(
        m.recipe,
        Recipe::plain(BaseRope {
            base: 10_000.0,
            context: 4096
        })
    );

    // every optional field missing: transformers' LlamaConfig defaults
    let bare = json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4});
    let c = parse(bare).unwrap();
    let m = &c.model;
    assert_eq!(m.num_key_value_heads, 4);
    assert_eq!(m.head_dim, 4);
    assert_eq!(m.rms_norm_eps, 1e-6);
    assert!(!m.tie_word_embeddings);
    assert_eq!(m.max_position_embeddings, 2048);
    assert_eq!((m.bos_token_id, m.eos_token_id), (None, None));
    assert_eq!(m.recipe.rope_base, 10_000.0);
    assert_eq!(m.recipe.original_context, 2048);
}

#[test]
fn mistral_gqa_head_dim_tied_and_eos_list() {
    let cfg = with(
        tiny_config(),
        json!({"model_type": "mistral", "head_dim": 8, "num_key_value_heads": 1,
               "tie_word_embeddings": true, "eos_token_id": [2, 5, 7], "sliding_window": 4096}),
    );
    let c = parse(cfg).unwrap();
    assert_eq!(c.model.model_type, ModelType::Mistral);
    assert_eq!(c.model.head_dim, 8);
    assert_eq!(c.model.num_key_value_heads, 1);
    assert!(c.model.tie_word_embeddings);
    assert_eq!(c.model.eos_token_id, Some(2));
    assert_eq!(c.eos_token_ids, vec![2, 5, 7]);
    assert_eq!(c.sliding_window, Some(4096));
}

#[test]
fn rope_scaling_variants() {
    // legacy "type" spelling, yarn with c given
    let c = parse(with(
        tiny_config(),
        json!({"max_position_embeddings": 16384,
               "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}}),
    ))
    .unwrap();
    let r = &c.model.recipe;
    assert_eq!(r.method, RopeMethod::Yarn);
    assert_eq!(
        (r.factor, r.original_context, r.context),
        (4.0, 4096, 16384)
    );
    assert_eq!((r.beta_fast, r.beta_slow), (32.0, 1.0));
    // method.md: mscale = 0.1 ln 4 + 1
    assert!(close(r.attention_factor(), 0.1 * 4f64.ln() + 1.0));

    // yarn with attention_factor 1 is NTK-by-parts
    let c = parse(with(
        tiny_config(),
        json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.0, "beta_fast": 16}}),
    ))
    .unwrap();
    let r = &c.model.recipe;
    assert_eq!(r.method, RopeMethod::NtkByParts);
    assert_eq!(
        (r.original_context, r.context, r.beta_fast),
        (4096, 8192, 16.0)
    );

    // llama3 (Llama 3.1's numbers)
    let c = parse(with(
        tiny_config(),
        json!({"max_position_embeddings": 131072, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    ))
    .unwrap();
    let r = &c.model.recipe;
    assert_eq!(r.method, RopeMethod::Llama3);
    assert_eq!(
        (r.rope_base, r.factor, r.original_context, r.context),
        (500000.0, 8.0, 8192, 131072)
    );
    assert_eq!((r.low_freq_factor, r.high_freq_factor), (1.0, 4.0));

    // linear and dynamic without c: c = max_position_embeddings, target = factor * c
    for (name, method) in [
        ("linear", RopeMethod::Linear),
        ("dynamic", RopeMethod::Dynamic),
    ] {
        let c = parse(with(
            tiny_config(),
            json!({"rope_scaling": {"type": name, "factor": 2.0}}),
        ))
        .unwrap();
        let r = &c.model.recipe;
        assert_eq!(r.method, method);
        assert_eq!((r.factor, r.original_context, r.context), (2.0, 4096, 8192));
    }

    // yarn with mscale / mscale_all_dim: transformers' ratio of get_mscale
    let c = parse(with(
        tiny_config(),
        json!({"max_position_embeddings": 16384,
               "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                                "mscale": 0.707, "mscale_all_dim": 1.0}}),
    ))
    .unwrap();
    let want = (0.1 * 0.707 * 4f64.ln() + 1.0) / (0.1 * 4f64.ln() + 1.0);
    assert!(close(c.model.recipe.attention_factor(), want));
}

#[test]
fn transformers5_rope_parameters_and_ministral3_step_law() {
    let cfg = with(
        tiny_config(),
        json!({"-rope_theta": null, "-rope_scaling": null,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    );
    let c = parse(cfg).unwrap();
    assert_eq!(c.rope_form, RopeForm::Parameters);
    assert_eq!(c.model.recipe.rope_base, 1_000_000.0);
    assert_eq!(c.model.recipe.method, RopeMethod::Default);

    // Ministral 3's text config: yarn (mscale ratio 1 = NTK-by-parts) plus the step law
    let cfg = with(
        tiny_config(),
        json!({"-rope_theta": null, "-rope_scaling": null, "model_type": "ministral3",
               "architectures": ["Ministral3ForCausalLM"], "max_position_embeddings": 262144,
               "rope_parameters": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 16.0,
                   "llama_4_scaling_beta": 0.1, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 16384, "rope_theta": 1000000.0,
                   "rope_type": "yarn", "type": "yarn"}}),
    );
    let c = parse(cfg).unwrap();
    assert_eq!(c.model.model_type, ModelType::Ministral3);
    let r = &c.model.recipe;
    assert_eq!(r.method, RopeMethod::NtkByParts);
    assert_eq!(
        (r.factor, r.original_context, r.context),
        (16.0, 16384, 262144)
    );
    assert_eq!(
        r.scale_law,
        ScaleLaw::Step {
            beta: 0.1,
            length: 16384
        }
    );
    assert_eq!(r.skip_layers, 0);
    // every layer: s(p) = 1 + 0.1 ln(1 + floor(p / 16384))
    assert!(close(r.logit_scale(0, 16384 * 3), 1.0 + 0.1 * 4f64.ln()));

    // a llama config ignores llama_4_scaling_beta (transformers' llama does)
    let cfg = with(
        tiny_config(),
        json!({"rope_scaling": {"rope_type": "default", "llama_4_scaling_beta": 0.1,
                                "original_max_position_embeddings": 4096}}),
    );
    assert_eq!(parse(cfg).unwrap().model.recipe.scale_law, ScaleLaw::None);
}

#[test]
fn our_block_wins_over_hf_fields() {
    let mut eabf = Recipe::for_method(
        RopeMethod::Eabf,
        BaseRope {
            base: 10_000.0,
            context: 4096,
        },
    );
    eabf.skip_layers = 0;
    let cfg = with(
        tiny_config(),
        json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
               "abf_recipe": eabf.to_json_block()}),
    );
    let c = parse(cfg.clone()).unwrap();
    assert_eq!(c.recipe_source, RecipeSource::Block);
    assert_eq!(c.model.recipe, eabf);
    // the HF fields alone still read as linear
    assert_eq!(c.hf_recipe().unwrap().method, RopeMethod::Linear);
}

// ---------- errors ----------

#[test]
fn malformed_json_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        "{\n  \"model_type\": \"llama\",\n  \"vocab_size\": 32,,\n}\n",
    )
    .unwrap();
    let err = HfConfig::load(dir.path()).unwrap_err();
    match &err {
        CheckpointError::Json { line, .. } => assert_eq!(*line, 3),
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("line 3"),
        "{msg}"
    );
}

#[test]
fn config_errors_name_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let err = HfConfig::load(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::MissingFile { .. }));
    assert!(err.to_string().contains("config.json"), "{err}");

    let err = parse(with(tiny_config(), json!({"model_type": "gpt2"}))).unwrap_err();
    assert!(matches!(err, CheckpointError::UnsupportedModelType { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("/m/config.json") && msg.contains("\"gpt2\""),
        "{msg}"
    );

    let err = parse(with(
        tiny_config(),
        json!({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}),
    ))
    .unwrap_err();
    assert!(matches!(err, CheckpointError::UnsupportedRope { .. }));
    assert!(err.to_string().contains("longrope"), "{err}");

    let err = parse(with(tiny_config(), json!({"num_key_value_heads": 3}))).unwrap_err();
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");

    let err = parse(with(tiny_config(), json!({"-vocab_size": null}))).unwrap_err();
    assert!(err.to_string().contains("vocab_size: missing"), "{err}");

    let err = parse(with(
        tiny_config(),
        json!({"abf_recipe": {"method": "nonsense", "rope_base": 1e4, "original_context": 4096}}),
    ))
    .unwrap_err();
    assert!(matches!(err, CheckpointError::Recipe { .. }));
    assert!(err.to_string().contains("nonsense"), "{err}");
}

#[test]
fn tensor_errors_name_file_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), &tiny_config());
    let store = Arc::new(SafetensorStore::open(dir.path()).unwrap());

    let err = store.tensor_view("model.nope.weight").unwrap_err();
    assert!(matches!(err, CheckpointError::MissingTensor { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.nope.weight"),
        "{msg}"
    );

    // shape mismatch through the VarBuilder: our error, naming expected and found
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let err = vb
        .get((16, 8), "model.norm.weight")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.norm.weight") && err.contains("[16]") && err.contains("[16, 8]"),
        "{err}"
    );
    let err = vb.get((16,), "model.missing").unwrap_err().to_string();
    assert!(
        err.contains("model.missing") && err.contains("not found"),
        "{err}"
    );
    assert!(vb.get(16, "model.norm.weight").is_ok());

    // unsupported dtype
    st_write(
        &dir.path().join("model.safetensors"),
        &[(
            "ids".into(),
            StDtype::I32,
            vec![2],
            vec![1, 0, 0, 0, 2, 0, 0, 0],
        )],
    );
    let store = SafetensorStore::open(dir.path()).unwrap();
    let err = store.tensor_view("ids").unwrap_err();
    assert!(matches!(err, CheckpointError::UnsupportedDtype { .. }));
    assert!(
        err.to_string().contains("\"ids\"") && err.to_string().contains("I32"),
        "{err}"
    );

    // a truncated file
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() - 1],
    )
    .unwrap();
    let err = SafetensorStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::Safetensors { .. }), "{err}");
}

/// Write the tiny tensors as two shards + index with the safetensors crate.
fn write_sharded(dir: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let half = tensors.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&tensors[..half], &tensors[half..]].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let st: Vec<_> = part
            .iter()
            .map(|(n, s, v)| (n.clone(), StDtype::F32, s.clone(), f32_bytes(v)))
            .collect();
        st_write(&dir.join(&file), &st);
        for (n, _, _) in part.iter() {
            map.insert(n.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_and_single_file_give_the_same_tensors() {
    let single = tempfile::tempdir().unwrap();
    let tensors = tiny_model(single.path(), &tiny_config());
    let sharded = tempfile::tempdir().unwrap();
    write_sharded(sharded.path(), &tensors);

    let ck = abf::checkpoint::Checkpoint::open(sharded.path());
    assert!(ck.is_err(), "no config.json in the sharded directory");
    let a = SafetensorStore::open(single.path()).unwrap();
    let b = SafetensorStore::open(sharded.path()).unwrap();
    assert!(!a.is_sharded() && b.is_sharded());
    assert_eq!(b.shard_paths().len(), 2);
    assert_eq!(a.len(), tensors.len());
    assert_eq!(b.len(), tensors.len());
    let mut names_a: Vec<_> = a.names().collect();
    let mut names_b: Vec<_> = b.names().collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b);
    for (name, shape, values) in &tensors {
        for store in [&a, &b] {
            let v = store.tensor_view(name).unwrap();
            assert_eq!(v.dtype, TensorDtype::F32);
            assert_eq!(v.shape, shape.as_slice());
            assert_eq!(v.data, f32_bytes(values).as_slice(), "{name}");
            let t = store.load(name, &Device::Cpu).unwrap();
            assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), *values);
        }
    }

    // an index naming a shard that is not there
    std::fs::remove_file(sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = SafetensorStore::open(sharded.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::MissingShard { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors.index.json")
            && msg.contains("model-00002-of-00002.safetensors"),
        "{msg}"
    );
    // an index naming a tensor its shard lacks
    let idx = sharded.path().join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&idx).unwrap()).unwrap();
    index["weight_map"] = json!({"ghost.weight": "model-00001-of-00002.safetensors"});
    std::fs::write(&idx, index.to_string()).unwrap();
    let err = SafetensorStore::open(sharded.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::MissingTensor { .. }));
    assert!(err.to_string().contains("ghost.weight"), "{err}");
}

#[test]
fn bf16_and_f16_weights_load_as_their_values() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<f32> = Lcg(3).next_f32_vec(24);
    let bf: Vec<half::bf16> = values.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let hf: Vec<half::f16> = values.iter().map(|&x| half::f16::from_f32(x)).collect();
    st_write(
        &dir.path().join("model.safetensors"),
        &[
            (
                "b".into(),
                StDtype::BF16,
                vec![4, 6],
                bf.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            ),
            (
                "h".into(),
                StDtype::F16,
                vec![4, 6],
                hf.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            ),
        ],
    );
    let store = Arc::new(SafetensorStore::open(dir.path()).unwrap());
    assert_eq!(store.tensor_view("b").unwrap().dtype, TensorDtype::BF16);
    assert_eq!(store.tensor_view("h").unwrap().dtype, TensorDtype::F16);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    let b = vb
        .get((4, 6), "b")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let h = vb
        .get((4, 6), "h")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(b, bf.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
    assert_eq!(h, hf.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
    // bf16 kept as bf16
    let vb16 = store.var_builder(DType::BF16, &Device::Cpu);
    let t = vb16.get((4, 6), "b").unwrap();
    assert_eq!(t.dtype(), DType::BF16);
    assert_eq!(
        t.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
        bf
    );
}

impl Lcg {
    fn next_f32_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

// ---------- writer ----------

#[test]
fn save_then_read_round_trip_sharded() {
    let src = tempfile::tempdir().unwrap();
    let tensors = tiny_tensors(11);
    tiny_model(src.path(), &tiny_config());
    let mut data: Vec<TensorData> = Vec::new();
    for (n, s, v) in &tensors {
        let t = Tensor::from_vec(v.clone(), s.as_slice(), &Device::Cpu).unwrap();
        data.push(TensorData::from_candle(n, &t).unwrap());
    }
    // one bf16 tensor from candle
    let bt = Tensor::from_vec(vec![1.5f32, -2.25, 3.0], 3, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    data.push(TensorData::from_candle("extra.bf16", &bt).unwrap());

    let out_parent = tempfile::tempdir().unwrap();
    let out = out_parent.path().join("saved");
    let config = tiny_config();
    let total: usize = data.iter().map(|t| t.data.len()).sum();
    let report = save_checkpoint(
        &out,
        &SaveSpec {
            config: &config,
            tensors: &data,
            tokenizer_dir: Some(src.path()),
            max_shard_bytes: (total / 3) as u64,
        },
    )
    .unwrap();
    // 3+ shards and an index
    assert!(report.weight_files.len() >= 4, "{:?}", report.weight_files);
    assert!(out.join("model.safetensors.index.json").is_file());
    assert_eq!(
        report.tokenizer_files,
        vec![
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json"
        ]
    );
    // no temp directory left beside it
    let left: Vec<_> = std::fs::read_dir(out_parent.path()).unwrap().collect();
    assert_eq!(left.len(), 1);

    // every shard read by the safetensors crate itself
    let index: Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["metadata"]["total_size"], json!(total));
    let mut seen = HashMap::new();
    for (name, file) in index["weight_map"].as_object().unwrap() {
        let bytes = std::fs::read(out.join(file.as_str().unwrap())).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let v = st.tensor(name).unwrap();
        seen.insert(
            name.clone(),
            (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
        );
    }
    for (n, s, v) in &tensors {
        assert_eq!(seen[n], (StDtype::F32, s.clone(), f32_bytes(v)), "{n}");
    }
    let bf: Vec<u8> = [1.5f32, -2.25, 3.0]
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    assert_eq!(seen["extra.bf16"], (StDtype::BF16, vec![3], bf));

    // our store reads it back in the order written; config keys keep their order
    let store = SafetensorStore::open(&out).unwrap();
    let names: Vec<_> = store.names().map(str::to_string).collect();
    let want: Vec<_> = data.iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, want);
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    let back: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(back, config);
    let keys: Vec<_> = back.as_object().unwrap().keys().cloned().collect();
    let want: Vec<_> = config.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, want);

    // an existing non-empty output is refused
    let err = save_checkpoint(
        &out,
        &SaveSpec {
            config: &config,
            tensors: &data,
            tokenizer_dir: None,
            max_shard_bytes: u64::MAX,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
}

#[test]
fn tokenizer_files_load() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer(dir.path());
    let t = TokenizerFiles::load(dir.path()).unwrap();
    let enc = t.tokenizer.encode("hello world", false).unwrap();
    assert_eq!(enc.get_ids(), &[3, 4]);
    assert_eq!(t.config.bos_token.as_deref(), Some("<s>"));
    assert_eq!(t.config.eos_token.as_deref(), Some("</s>"));
    assert_eq!(t.config.pad_token, None);
    assert_eq!(t.config.add_bos_token, Some(true));
    assert_eq!(t.config.add_eos_token, Some(false));
    assert!(t
        .config
        .chat_template
        .as_deref()
        .unwrap()
        .contains("messages"));
    let g = t.generation.unwrap();
    assert_eq!((g.bos_token_id, g.eos_token_ids), (Some(1), vec![2, 3]));

    std::fs::write(dir.path().join("tokenizer.json"), "{\n\"model\": [\n").unwrap();
    let err = TokenizerFiles::load(dir.path()).unwrap_err();
    assert!(matches!(err, CheckpointError::Json { .. }));
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

// ---------- patch-config ----------

const LLAMA2: BaseRope = BaseRope {
    base: 10_000.0,
    context: 4096,
};

/// The two recipes compute the same thing: frequencies (also at several lengths, for
/// dynamic), attention factor and logit scale of every layer at positions across windows.
fn assert_same_computation(a: &Recipe, b: &Recipe, head_dim: usize, layers: usize) {
    for seq in [None, Some(100), Some(8192), Some(40000)] {
        let (fa, fb) = (a.inv_freq(head_dim, seq), b.inv_freq(head_dim, seq));
        for (x, y) in fa.iter().zip(&fb) {
            assert!(close(*x, *y), "inv_freq {x} vs {y}: {a} / {b}");
        }
    }
    assert!(
        close(a.attention_factor(), b.attention_factor()),
        "{a} / {b}"
    );
    for layer in 0..layers {
        for p in [0, 4095, 4096, 8191, 8192, 20000, 65535, 65536] {
            assert!(
                close(a.logit_scale(layer, p), b.logit_scale(layer, p)),
                "layer {layer} pos {p}: {a} / {b}"
            );
        }
    }
}

fn tiny_hf(config: Value) -> HfConfig {
    parse(config).unwrap()
}

#[test]
fn patch_transformers_round_trips_every_rope_method() {
    let input = tiny_hf(tiny_config());
    let mut cases: Vec<Recipe> = [
        RopeMethod::Linear,
        RopeMethod::Dynamic,
        RopeMethod::Yarn,
        RopeMethod::NtkByParts,
        RopeMethod::Llama3,
        RopeMethod::Abf,
        RopeMethod::Ntk,
    ]
    .into_iter()
    .map(|m| Recipe::for_method(m, LLAMA2))
    .collect();
    let mut step = Recipe::for_method(RopeMethod::Abf, LLAMA2);
    step.scale_law = Recipe::default_step(4096);
    cases.push(step);
    let mut yarn_step = Recipe::for_method(RopeMethod::Yarn, LLAMA2);
    yarn_step.scale_law = ScaleLaw::Step {
        beta: 0.1,
        length: 4096,
    };
    cases.push(yarn_step);

    for recipe in cases {
        let p = patch_config(&input, &recipe, Target::Transformers, false).unwrap();
        assert!(p.approximations.is_empty());
        // static NTK runs as plain rope with its base: the same computation
        assert_same_computation(&p.runtime_recipe, &recipe, 4, 2);
        assert!(!p.config.contains_key("abf_recipe"));
        let back = parse(Value::Object(p.config.clone())).unwrap();
        assert_eq!(back.recipe_source, RecipeSource::Hf);
        assert_same_computation(&recipe, &back.model.recipe, 4, 2);
        // the unchanged keys keep their place and value
        assert_eq!(p.config["custom_key_kept"], json!({"z": 1, "a": 2}));
        assert_eq!(p.config.keys().next().unwrap(), "architectures");
        // methods that transformers names one to one come back as the same recipe
        if matches!(
            recipe.method,
            RopeMethod::Linear
                | RopeMethod::Dynamic
                | RopeMethod::Yarn
                | RopeMethod::NtkByParts
                | RopeMethod::Llama3
        ) {
            assert_eq!(back.model.recipe, recipe, "{recipe}");
        }
    }
}

#[test]
fn patch_transformers_writes_exactly_the_hf_fields() {
    let input = tiny_hf(tiny_config());
    // yarn s = 4 from c = 4096: legacy form, since the input uses it
    let yarn = Recipe::for_method(RopeMethod::Yarn, LLAMA2);
    let p = patch_config(&input, &yarn, Target::Transformers, false).unwrap();
    assert_eq!(p.config["max_position_embeddings"], json!(16384));
    assert_eq!(p.config["rope_theta"], json!(10000.0));
    assert_eq!(
        p.config["rope_scaling"],
        json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
               "beta_fast": 32.0, "beta_slow": 1.0})
    );
    // an explicit attention factor is written; NTK-by-parts is yarn with attention factor 1
    let mut yarn_a = yarn.clone();
    yarn_a.yarn_attention_factor = Some(1.25);
    let p = patch_config(&input, &yarn_a, Target::Transformers, false).unwrap();
    assert_eq!(p.config["rope_scaling"]["attention_factor"], json!(1.25));
    let nbp = Recipe::for_method(RopeMethod::NtkByParts, LLAMA2);
    let p = patch_config(&input, &nbp, Target::Transformers, false).unwrap();
    assert_eq!(p.config["rope_scaling"]["rope_type"], json!("yarn"));
    assert_eq!(p.config["rope_scaling"]["attention_factor"], json!(1.0));
    assert_eq!(p.config["model_type"], json!("llama"));

    // ABF: only rope_theta changes; static NTK: rope_theta = b s^(d/(d-2)) (d = 4: s^2)
    let abf = Recipe::for_method(RopeMethod::Abf, LLAMA2);
    let p = patch_config(&input, &abf, Target::Transformers, false).unwrap();
    assert_eq!(p.config["rope_theta"], json!(500000.0));
    assert_eq!(p.config["rope_scaling"], Value::Null);
    assert_eq!(p.config["max_position_embeddings"], json!(16384));
    let ntk = Recipe::for_method(RopeMethod::Ntk, LLAMA2);
    let p = patch_config(&input, &ntk, Target::Transformers, false).unwrap();
    assert!(close(
        p.config["rope_theta"].as_f64().unwrap(),
        10_000.0 * 16.0
    ));

    // dynamic keeps max_position_embeddings = c (transformers reads L there)
    let dynamic = Recipe::for_method(RopeMethod::Dynamic, LLAMA2);
    let p = patch_config(&input, &dynamic, Target::Transformers, false).unwrap();
    assert_eq!(p.config["max_position_embeddings"], json!(4096));

    // the step law: ministral3 with rope_parameters
    let mut step = Recipe::for_method(RopeMethod::Abf, LLAMA2);
    step.scale_law = Recipe::default_step(4096);
    let p = patch_config(&input, &step, Target::Transformers, false).unwrap();
    assert_eq!(p.model_type, ModelType::Ministral3);
    assert_eq!(p.config["model_type"], json!("ministral3"));
    assert_eq!(p.config["architectures"], json!(["Ministral3ForCausalLM"]));
    assert!(!p.config.contains_key("rope_theta") && !p.config.contains_key("rope_scaling"));
    assert_eq!(
        p.config["rope_parameters"],
        json!({"rope_type": "default", "rope_theta": 500000.0,
               "original_max_position_embeddings": 4096,
               "llama_4_scaling_beta": 1.0 / 4096f64.ln()})
    );

    // a rope_parameters input is updated in that form
    let input5 = tiny_hf(with(
        tiny_config(),
        json!({"-rope_theta": null, "-rope_scaling": null,
               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    ));
    let linear = Recipe::for_method(RopeMethod::Linear, LLAMA2);
    let p = patch_config(&input5, &linear, Target::Transformers, false).unwrap();
    assert!(!p.config.contains_key("rope_scaling") && !p.config.contains_key("rope_theta"));
    assert_eq!(
        p.config["rope_parameters"],
        json!({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0,
               "original_max_position_embeddings": 4096})
    );
}

#[test]
fn patch_transformers_refuses_what_it_cannot_run() {
    let input = tiny_hf(tiny_config());
    let eabf = Recipe::for_method(RopeMethod::Eabf, LLAMA2);
    let err = patch_config(&input, &eabf, Target::Transformers, false).unwrap_err();
    assert!(matches!(err, CheckpointError::NotRepresentable { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("log scale law") && msg.contains("exempts the first 2"),
        "{msg}"
    );
    assert!(msg.contains("--allow-approximate"), "{msg}");

    // allowed: the nearest form is the step law (beta = 1/ln c, L = c) on every layer
    let p = patch_config(&input, &eabf, Target::Transformers, true).unwrap();
    assert_eq!(p.approximations.len(), 2);
    assert_eq!(p.runtime_recipe.scale_law, Recipe::default_step(4096));
    assert_eq!(p.runtime_recipe.skip_layers, 0);
    let back = parse(Value::Object(p.config.clone())).unwrap();
    assert_same_computation(&p.runtime_recipe, &back.model.recipe, 4, 2);

    // yarn whose factor disagrees with target / c
    let mut yarn = Recipe::for_method(RopeMethod::Yarn, LLAMA2);
    yarn.context = 32768;
    let err = patch_config(&input, &yarn, Target::Transformers, false).unwrap_err();
    assert!(err.to_string().contains("factor"), "{err}");
    // the step law with L != c together with yarn
    let mut ys = Recipe::for_method(RopeMethod::Yarn, LLAMA2);
    ys.scale_law = ScaleLaw::Step {
        beta: 0.1,
        length: 8192,
    };
    let err = patch_config(&input, &ys, Target::Transformers, false).unwrap_err();
    assert!(
        err.to_string().contains("original_max_position_embeddings"),
        "{err}"
    );
}

#[test]
fn patch_exact_writes_the_native_form_and_records_the_rest() {
    let input = tiny_hf(tiny_config());
    // ABF and YaRN: transformers runs them exactly, so the HF fields alone carry the recipe
    for recipe in [
        Recipe::for_method(RopeMethod::Abf, LLAMA2),
        Recipe::for_method(RopeMethod::Yarn, LLAMA2),
    ] {
        let p = patch_config(&input, &recipe, Target::Exact, false).unwrap();
        assert!(p.approximations.is_empty(), "{recipe}");
        assert_eq!(p.model_type, ModelType::Llama);
        assert_eq!(p.config["model_type"], json!("llama"));
        assert_eq!(p.config["max_position_embeddings"], json!(recipe.context));
        // the base transformers reads is the recipe's (the defect: it stayed at 10000)
        assert_eq!(p.config["rope_theta"], json!(recipe.rope_base));
        let back = parse(Value::Object(p.config.clone())).unwrap();
        assert_eq!(back.recipe_source, RecipeSource::Block);
        assert_eq!(back.model.recipe, recipe);
        // transformers' reading: the recipe's base and window (a plain rope has no c of its own)
        let hf = back.hf_recipe().unwrap();
        assert_eq!(
            (hf.rope_base, hf.context),
            (recipe.rope_base, recipe.context)
        );
        assert_same_computation(&hf, &recipe, 4, 2);
        // the keys before ours keep their order
        let keys: Vec<_> = p.config.keys().cloned().collect();
        let orig: Vec<_> = tiny_config().as_object().unwrap().keys().cloned().collect();
        assert_eq!(&keys[..orig.len()], orig.as_slice());
        assert_eq!(keys.last().unwrap(), "abf_recipe");
    }
    // eabf: the base, window and step law natively (ministral3), the log law and exempt layers
    // only in the block, and a warning for each; never refused
    let eabf = Recipe::for_method(RopeMethod::Eabf, LLAMA2);
    let p = patch_config(&input, &eabf, Target::Exact, false).unwrap();
    assert_eq!(p.approximations.len(), 2, "{:?}", p.approximations);
    assert_eq!(p.model_type, ModelType::Ministral3);
    let rp = &p.config["rope_parameters"];
    assert_eq!(rp["rope_theta"], json!(500000.0));
    assert_eq!(rp["original_max_position_embeddings"], json!(4096));
    let beta = rp["llama_4_scaling_beta"].as_f64().unwrap();
    assert!((beta - 1.0 / 4096f64.ln()).abs() < 1e-15);
    assert_eq!(p.config["max_position_embeddings"], json!(16384));
    let back = parse(Value::Object(p.config.clone())).unwrap();
    assert_eq!(back.model.recipe, eabf);
    let hf = back.hf_recipe().unwrap();
    assert_eq!(hf.rope_base, 500000.0);
    assert_eq!(hf.context, 16384);
    assert!(matches!(hf.scale_law, ScaleLaw::Step { length: 4096, .. }));
}

#[test]
fn write_patched_links_weights_and_leaves_input_alone() {
    use std::os::unix::fs::MetadataExt;
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("model");
    tiny_model(&src, &tiny_config());
    let before = snapshot(&src);
    let input = HfConfig::load(&src).unwrap();
    let abf = Recipe::for_method(RopeMethod::Abf, LLAMA2);
    let p = patch_config(&input, &abf, Target::Transformers, false).unwrap();
    let out = root.path().join("out");
    let files = write_patched(&src, &p, &PatchOutput::Dir(out.clone())).unwrap();
    assert_eq!(files.linked, vec!["model.safetensors"]);
    assert_eq!(
        files.copied,
        vec![
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(snapshot(&src), before);
    let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(src.join("model.safetensors")),
        ino(out.join("model.safetensors"))
    );
    assert_eq!(
        HfConfig::load(&out).unwrap().model.recipe.rope_base,
        500000.0
    );
    // the output is a loadable model: same tensors
    let a = SafetensorStore::open(&src).unwrap();
    let b = SafetensorStore::open(&out).unwrap();
    for n in a.names() {
        assert_eq!(
            a.tensor_view(n).unwrap().data,
            b.tensor_view(n).unwrap().data
        );
    }
    // a transformers rewrite of a config carrying our block drops the block
    let exact = patch_config(&input, &abf, Target::Exact, false).unwrap();
    let with_block = parse(Value::Object(exact.config)).unwrap();
    assert_eq!(with_block.recipe_source, RecipeSource::Block);
    let p2 = patch_config(
        &with_block,
        &with_block.model.recipe,
        Target::Transformers,
        false,
    )
    .unwrap();
    assert!(!p2.config.contains_key("abf_recipe"));
    assert_eq!(p2.config["rope_theta"], json!(500000.0));
    // the whole directory opens as a checkpoint
    let ck = abf::checkpoint::Checkpoint::open(&out).unwrap();
    let vb = ck.var_builder(DType::F32, &Device::Cpu);
    assert_eq!(
        vb.get((32, 16), "lm_head.weight").unwrap().dims(),
        &[32, 16]
    );
    assert_eq!(ck.tokenizer().unwrap().config.add_bos_token, Some(true));
    // writing over the model directory itself with -o is refused
    let err = write_patched(&src, &p, &PatchOutput::Dir(src.clone())).unwrap_err();
    assert!(err.to_string().contains("--in-place"), "{err}");
}

/// Every file's bytes in a directory.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

// ---------- the binary ----------

fn convert(args: &[&str]) -> (i32, String, String) {
    common::bin::run(common::bin::Bin::Convert, args).parts()
}

#[test]
fn cli_patch_config_exit_codes_and_outputs() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("model");
    tiny_model(&src, &tiny_config());
    let before = snapshot(&src);
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // eabf cannot run in transformers: refused, nothing written, input untouched
    let out = root.path().join("eabf");
    let (code, _, err) = convert(&["patch-config", &s(&src), "-o", &s(&out), "--method", "eabf"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--allow-approximate"), "{err}");
    assert!(!out.exists());
    assert_eq!(snapshot(&src), before);

    // the same with --allow-approximate, JSON
    let (code, stdout, err) = convert(&[
        "patch-config",
        &s(&src),
        "-o",
        &s(&out),
        "--method",
        "eabf",
        "--allow-approximate",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["exact"], json!(false));
    assert_eq!(report["model_type"], json!("ministral3"));
    assert_eq!(report["runtime_recipe"]["scale_law"], json!("step"));
    assert_eq!(report["approximations"].as_array().unwrap().len(), 2);
    assert_eq!(
        HfConfig::load(&out).unwrap().model.model_type,
        ModelType::Ministral3
    );
    assert_eq!(snapshot(&src), before);

    // exact runtime: the block read back is the recipe asked for
    let exact = root.path().join("exact");
    let (code, _, err) = convert(&[
        "patch-config",
        &s(&src),
        "-o",
        &s(&exact),
        "--runtime",
        "exact",
        "--method",
        "eabf",
        "--context",
        "16384",
    ]);
    assert_eq!(code, 0, "{err}");
    let back = HfConfig::load(&exact).unwrap();
    assert_eq!(
        back.model.recipe,
        Recipe::for_method(RopeMethod::Eabf, LLAMA2)
    );
    assert_eq!(snapshot(&src), before);

    // neither -o nor --in-place; a missing directory; an existing non-empty output
    let (code, _, err) = convert(&["patch-config", &s(&src), "--method", "abf"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = convert(&["patch-config", &s(&root.path().join("nope")), "--in-place"]);
    assert_eq!(code, 2);
    assert!(err.contains("config.json"), "{err}");
    let (code, _, err) = convert(&[
        "patch-config",
        &s(&src),
        "-o",
        &s(&exact),
        "--method",
        "abf",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("not empty"), "{err}");

    // in place: only config.json changes
    let (code, stdout, err) = convert(&["patch-config", &s(&src), "--in-place", "--method", "abf"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("config.json"), "{stdout}");
    let after = snapshot(&src);
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a == b, n != "config.json", "{n}");
    }
    assert_eq!(
        HfConfig::load(&src).unwrap().model.recipe.rope_base,
        500000.0
    );
}
