//! The one tiny-LLaMA builder of the tests: `config.json`, `model.safetensors` (written with the
//! `safetensors` crate, not ours), `tokenizer.json` and `tokenizer_config.json`.
//!
//! ```ignore
//! TinyModel::new().layers(3).heads(4).kv_heads(2).recipe(r).tied(true).seed(7).write(dir);
//! ```
//!
//! Two weight schemes are kept bit-identical to the builders they replace, because tests tune
//! thresholds on them (verify's planted-fault bands, llama.cpp agreement, quantization noise,
//! loss curves): [`Init::Rough`] (the conversion tests') and [`Init::Scaled`] (training and
//! evaluation). Both draw from [`super::rng::Rng`] with the builder's seed.

use std::path::{Path, PathBuf};

use abf::rope::Recipe;
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::rng::Rng;
use super::tokenizer::tokenizer_json;

/// Where the vocabulary comes from.
#[derive(Clone)]
pub enum Vocab {
    /// The hand-written byte-level BPE (`tokenizer::tokenizer_json`, 261 tokens,
    /// `<|endoftext|>` = 260) with `rows` embedding rows (>= 261).
    ByteBpe { rows: usize },
    /// A given tokenizer (e.g. `tokenizer::train_tokenizer`); rows = its size with added tokens.
    Bpe(Box<Tokenizer>),
    /// No tokenizer files: token ids only.
    Ids(usize),
}

/// Uniform scales (weights uniform in +-scale) of [`Init::Scaled`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scales {
    pub embed: f64,
    pub head: f64,
    pub q: f64,
    pub k: f64,
    pub v: f64,
    pub o: f64,
    pub gate: f64,
    pub up: f64,
    pub down: f64,
}

impl Scales {
    /// Embedding 0.5, head 0.2, q/k 2/sqrt(hidden), v/o/gate/up 1/sqrt(hidden),
    /// down 1/sqrt(intermediate): the training tests' model.
    pub fn fan_in(hidden: usize, inter: usize) -> Scales {
        let s = 1.0 / (hidden as f64).sqrt();
        Scales {
            embed: 0.5,
            head: 0.2,
            q: 2.0 * s,
            k: 2.0 * s,
            v: s,
            o: s,
            gate: s,
            up: s,
            down: 1.0 / (inter as f64).sqrt(),
        }
    }

    /// `embed` for the embedding, `head` for the output head, `proj` for every projection.
    pub fn uniform(embed: f64, head: f64, proj: f64) -> Scales {
        Scales {
            embed,
            head,
            q: proj,
            k: proj,
            v: proj,
            o: proj,
            gate: proj,
            up: proj,
            down: proj,
        }
    }

    /// Every weight zero (still drawn, so the other tensors of a seed do not move).
    pub fn zero() -> Scales {
        Scales::uniform(0.0, 0.0, 0.0)
    }

    /// The same with q and k projections zero: every attention row is uniform.
    pub fn zero_qk(mut self) -> Scales {
        self.q = 0.0;
        self.k = 0.0;
        self
    }
}

/// How the weights are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Every tensor, norm gains included, uniform in +-scale from 24-bit f32 draws, in checkpoint
    /// order (embedding; per layer: input norm, post-attention norm, q k v o gate up down; final
    /// norm; head). Norm gains use `embed`'s scale.
    Rough { embed: f32, proj: f32, head: f32 },
    /// Norm gains one; the rest uniform in +-scale from 53-bit draws, in the order embedding,
    /// head, then per layer q k v o gate up down. `None`: [`Scales::fan_in`].
    Scaled(Option<Scales>),
}

/// Safetensors dtype of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

/// A tiny random LLaMA checkpoint. Defaults: hidden 64, intermediate 96, 2 layers, 4 heads,
/// 2 KV heads, context 64, rope_theta 10000, untied, f32, seed 0, the byte-level BPE with 272
/// rows, [`Init::Rough`] with embedding 1.0 and projections/head 0.3.
#[derive(Clone)]
pub struct TinyModel {
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: u64,
    pub rope_theta: f64,
    pub tied: bool,
    pub dtype: WeightDtype,
    pub seed: u64,
    pub vocab: Vocab,
    pub init: Init,
    pub recipe: Option<Recipe>,
    pub tokenizer_config: Option<Value>,
    pub config: Vec<(String, Value)>,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel::new()
    }
}

impl TinyModel {
    pub fn new() -> TinyModel {
        TinyModel {
            hidden: 64,
            inter: 96,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context: 64,
            rope_theta: 10000.0,
            tied: false,
            dtype: WeightDtype::F32,
            seed: 0,
            vocab: Vocab::ByteBpe { rows: 272 },
            init: Init::Rough {
                embed: 1.0,
                proj: 0.3,
                head: 0.3,
            },
            recipe: None,
            tokenizer_config: None,
            config: Vec::new(),
        }
    }

    /// The training tests' model: hidden 32, intermediate 64, 3 layers, 4 heads, 2 KV heads,
    /// context 32, [`Scales::fan_in`] weights, `tok` with a ChatML template
    /// (bos `<s>`, eos `<|im_end|>`).
    pub fn chat(tok: Tokenizer) -> TinyModel {
        TinyModel {
            hidden: 32,
            inter: 64,
            layers: 3,
            context: 32,
            vocab: Vocab::Bpe(Box::new(tok)),
            init: Init::Scaled(None),
            tokenizer_config: Some(json!({
                "bos_token": "<s>",
                "eos_token": "<|im_end|>",
                "chat_template": abf::train::template::CHATML_TEMPLATE,
            })),
            ..TinyModel::new()
        }
    }

    /// The evaluation tests' model: hidden 32, intermediate 64, 2 layers, 4 heads, 2 KV heads,
    /// context 16, norm gains one, embedding +-1, head +-0.5, projections +-0.4, `tok` with BOS
    /// added (`add_bos_token: true`, bos `<s>`, eos `</s>`) so that windows start with it.
    pub fn eval(tok: &Tokenizer) -> TinyModel {
        TinyModel {
            hidden: 32,
            inter: 64,
            layers: 2,
            context: 16,
            vocab: Vocab::Bpe(Box::new(tok.clone())),
            init: Init::Scaled(Some(Scales::uniform(1.0, 0.5, 0.4))),
            tokenizer_config: Some(
                json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}),
            ),
            ..TinyModel::new()
        }
    }

    /// Every matrix's rows a whole number of 256-element k-quant blocks: hidden 256,
    /// intermediate 512, 2 layers, 4 heads, 2 KV heads (the rest unchanged).
    pub fn kquant_shape(self) -> Self {
        self.hidden(256).inter(512).layers(2).heads(4).kv_heads(2)
    }

    /// ABF base 500000 from 10000 with the step law (beta 1/ln c, L = c) at this model's context.
    pub fn abf_step(self) -> Self {
        let mut r = Recipe::for_method(
            abf::rope::RopeMethod::Abf,
            abf::rope::BaseRope {
                base: 10000.0,
                context: self.context,
            },
        );
        r.scale_law = Recipe::default_step(self.context);
        self.recipe(r)
    }

    /// [`Init::Scaled`] with these scales.
    pub fn scales(self, s: Scales) -> Self {
        self.init(Init::Scaled(Some(s)))
    }

    pub fn hidden(mut self, n: usize) -> Self {
        self.hidden = n;
        self
    }
    pub fn inter(mut self, n: usize) -> Self {
        self.inter = n;
        self
    }
    pub fn layers(mut self, n: usize) -> Self {
        self.layers = n;
        self
    }
    pub fn heads(mut self, n: usize) -> Self {
        self.heads = n;
        self
    }
    pub fn kv_heads(mut self, n: usize) -> Self {
        self.kv_heads = n;
        self
    }
    /// `max_position_embeddings`.
    pub fn context(mut self, n: u64) -> Self {
        self.context = n;
        self
    }
    pub fn rope_theta(mut self, t: f64) -> Self {
        self.rope_theta = t;
        self
    }
    pub fn tied(mut self, t: bool) -> Self {
        self.tied = t;
        self
    }
    pub fn dtype(mut self, d: WeightDtype) -> Self {
        self.dtype = d;
        self
    }
    pub fn seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }
    pub fn vocab(mut self, v: Vocab) -> Self {
        self.vocab = v;
        self
    }
    pub fn init(mut self, i: Init) -> Self {
        self.init = i;
        self
    }
    /// Writes the recipe as config.json's `abf_recipe` block.
    pub fn recipe(mut self, r: Recipe) -> Self {
        self.recipe = Some(r);
        self
    }
    /// Replaces the default tokenizer_config.json.
    pub fn tokenizer_config(mut self, v: Value) -> Self {
        self.tokenizer_config = Some(v);
        self
    }
    /// An extra (or overriding) config.json key.
    pub fn config(mut self, key: &str, v: Value) -> Self {
        self.config.push((key.to_string(), v));
        self
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Embedding rows.
    pub fn vocab_size(&self) -> usize {
        match &self.vocab {
            Vocab::ByteBpe { rows } => *rows,
            Vocab::Bpe(t) => t.get_vocab_size(true),
            Vocab::Ids(n) => *n,
        }
    }

    /// The tensors (name, shape) in checkpoint order: embedding; per layer input norm,
    /// post-attention norm, q k v o gate up down; final norm; head (unless tied).
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, h, i, d) = (self.vocab_size(), self.hidden, self.inter, self.head_dim());
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (n, s) in [
                ("input_layernorm", vec![h]),
                ("post_attention_layernorm", vec![h]),
                ("self_attn.q_proj", vec![self.heads * d, h]),
                ("self_attn.k_proj", vec![self.kv_heads * d, h]),
                ("self_attn.v_proj", vec![self.kv_heads * d, h]),
                ("self_attn.o_proj", vec![h, self.heads * d]),
                ("mlp.gate_proj", vec![i, h]),
                ("mlp.up_proj", vec![i, h]),
                ("mlp.down_proj", vec![h, i]),
            ] {
                out.push((format!("{p}.{n}.weight"), s));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tied {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// The weights (name, shape, f32 values) in checkpoint order, drawn as `init` says.
    pub fn weights(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let shapes = self.shapes();
        let mut rng = Rng::new(self.seed);
        let mut values: Vec<Option<Vec<f32>>> = vec![None; shapes.len()];
        match self.init {
            Init::Rough { embed, proj, head } => {
                for (k, (name, s)) in shapes.iter().enumerate() {
                    let scale = if name.contains("layernorm") || name.contains("norm.weight") {
                        embed
                    } else if name.starts_with("lm_head") {
                        head
                    } else if name.contains("embed_tokens") {
                        embed
                    } else {
                        proj
                    };
                    values[k] = Some(
                        (0..s.iter().product::<usize>())
                            .map(|_| rng.uniform_f32(scale))
                            .collect(),
                    );
                }
            }
            Init::Scaled(scales) => {
                let sc = scales.unwrap_or_else(|| Scales::fan_in(self.hidden, self.inter));
                // embedding, head, then the projections in checkpoint order
                let mut order: Vec<usize> = (0..shapes.len()).collect();
                if let Some(h) = shapes.iter().position(|(n, _)| n == "lm_head.weight") {
                    order.retain(|&k| k != h);
                    order.insert(1, h);
                }
                for k in order {
                    let (name, s) = &shapes[k];
                    let scale = if name.contains("norm") {
                        values[k] = Some(vec![1.0; s.iter().product::<usize>()]);
                        continue;
                    } else if name.contains("embed_tokens") {
                        sc.embed
                    } else if name.starts_with("lm_head") {
                        sc.head
                    } else if name.contains("q_proj") {
                        sc.q
                    } else if name.contains("k_proj") {
                        sc.k
                    } else if name.contains("v_proj") {
                        sc.v
                    } else if name.contains("o_proj") {
                        sc.o
                    } else if name.contains("gate_proj") {
                        sc.gate
                    } else if name.contains("up_proj") {
                        sc.up
                    } else {
                        sc.down
                    };
                    values[k] = Some(
                        (0..s.iter().product::<usize>())
                            .map(|_| {
                                let r = rng.uniform() * scale;
                                if scale == 0.0 {
                                    0.0
                                } else {
                                    r as f32
                                }
                            })
                            .collect(),
                    );
                }
            }
        }
        shapes
            .into_iter()
            .zip(values)
            .map(|((n, s), v)| (n, s, v.expect("every tensor drawn")))
            .collect()
    }

    /// config.json as written.
    pub fn config_json(&self) -> Value {
        let torch_dtype = match self.dtype {
            WeightDtype::F32 => "float32",
            WeightDtype::F16 => "float16",
            WeightDtype::Bf16 => "bfloat16",
        };
        let mut cfg = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.inter,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "rms_norm_eps": 1e-5,
            "vocab_size": self.vocab_size(), "max_position_embeddings": self.context,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tied,
            "hidden_act": "silu", "torch_dtype": torch_dtype,
        });
        let tc = self.tokenizer_config_json();
        let id = |key: &str| -> Option<u32> {
            let tok = tc.as_ref()?[key].as_str()?;
            match &self.vocab {
                Vocab::ByteBpe { .. } => (tok == "<|endoftext|>").then_some(260),
                Vocab::Bpe(t) => t.token_to_id(tok),
                Vocab::Ids(_) => None,
            }
        };
        for (key, tok) in [("bos_token_id", "bos_token"), ("eos_token_id", "eos_token")] {
            if let Some(v) = id(tok) {
                cfg[key] = json!(v);
            }
        }
        if let Some(r) = &self.recipe {
            cfg[abf::rope::CONFIG_BLOCK] = r.to_json_block();
        }
        for (k, v) in &self.config {
            cfg[k.as_str()] = v.clone();
        }
        cfg
    }

    fn tokenizer_config_json(&self) -> Option<Value> {
        if let Some(v) = &self.tokenizer_config {
            return Some(v.clone());
        }
        match self.vocab {
            Vocab::ByteBpe { .. } => Some(json!({
                "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "add_bos_token": false,
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"
            })),
            Vocab::Bpe(_) | Vocab::Ids(_) => None,
        }
    }

    /// Write the checkpoint into `dir` (created); returns `dir`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let (dt, bytes): (Dtype, fn(f32) -> Vec<u8>) = match self.dtype {
            WeightDtype::F32 => (Dtype::F32, |x| x.to_le_bytes().to_vec()),
            WeightDtype::F16 => (Dtype::F16, |x| f16::from_f32(x).to_le_bytes().to_vec()),
            WeightDtype::Bf16 => (Dtype::BF16, |x| bf16::from_f32(x).to_le_bytes().to_vec()),
        };
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .weights()
            .into_iter()
            .map(|(n, s, v)| (n, s, v.into_iter().flat_map(bytes).collect()))
            .collect();
        let views: Vec<(String, TensorView)> = data
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(dt, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&self.config_json()).unwrap(),
        )
        .unwrap();
        match &self.vocab {
            Vocab::ByteBpe { .. } => std::fs::write(
                dir.join("tokenizer.json"),
                serde_json::to_vec(&tokenizer_json()).unwrap(),
            )
            .unwrap(),
            Vocab::Bpe(t) => t.save(dir.join("tokenizer.json"), false).unwrap(),
            Vocab::Ids(_) => {}
        }
        if let Some(tc) = self.tokenizer_config_json() {
            std::fs::write(
                dir.join("tokenizer_config.json"),
                serde_json::to_vec(&tc).unwrap(),
            )
            .unwrap();
        }
        dir.to_path_buf()
    }
}

/// Every tensor of a safetensors file as (dtype, shape, raw bytes), by name: for comparing
/// weights bit for bit, whatever order or padding the file's header has.
pub fn tensor_bytes(
    path: &Path,
) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let view = (
                format!("{:?}", v.dtype()),
                v.shape().to_vec(),
                v.data().to_vec(),
            );
            (n, view)
        })
        .collect()
}
