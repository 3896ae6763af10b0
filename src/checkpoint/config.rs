//! The model's shape and recipe, validated once from config.json.
//!
//! `ModelConfig` is the contract the model, converter and trainer build on; `HfConfig` wraps it
//! with the raw JSON (key order kept, so a rewrite keeps every key it does not own) and with
//! where the recipe came from. docs/checkpoints.md lists the keys read and how c and the
//! target window follow from them.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::{read_json, CheckpointError};
use super::keys;
use crate::rope::{defaults, yarn_mscale, Recipe, RopeMethod, ScaleLaw, CONFIG_BLOCK};

/// The file name of a model's configuration.
pub const CONFIG_FILE: &str = "config.json";

/// LlamaConfig's defaults (transformers `configuration_llama.py`).
const DEFAULT_ROPE_THETA: f64 = 10_000.0;
const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;
const DEFAULT_MAX_POSITIONS: u64 = 2048;

/// Model families read from `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Llama,
    Mistral,
    /// Ministral 3 text model: LLaMA-shaped, with the step scale law on every layer.
    Ministral3,
}

/// Every model type: its `model_type` string and the `architectures` entry transformers loads
/// for a causal LM of it. One table; `name`, `architecture` and `parse` read it.
const MODEL_TYPES: [(ModelType, &str, &str); 3] = [
    (ModelType::Llama, "llama", "LlamaForCausalLM"),
    (ModelType::Mistral, "mistral", "MistralForCausalLM"),
    (ModelType::Ministral3, "ministral3", "Ministral3ForCausalLM"),
];

impl ModelType {
    fn row(self) -> &'static (ModelType, &'static str, &'static str) {
        // the table lists each variant at its discriminant, checked by a unit test
        &MODEL_TYPES[self as usize]
    }

    /// The `model_type` string of config.json.
    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// The `architectures` entry transformers loads for a causal LM of this type.
    pub fn architecture(self) -> &'static str {
        self.row().2
    }

    fn parse(s: &str) -> Option<ModelType> {
        MODEL_TYPES
            .iter()
            .find(|(_, n, _)| *n == s)
            .map(|(t, _, _)| *t)
    }
}

#[cfg(test)]
mod model_type_table {
    use super::*;

    #[test]
    fn every_variant_is_its_own_row() {
        for (i, (t, name, _)) in MODEL_TYPES.iter().enumerate() {
            assert_eq!(*t as usize, i);
            assert_eq!(ModelType::parse(name), Some(*t));
        }
    }
}

/// A validated LLaMA-family configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: u64,
    pub bos_token_id: Option<u32>,
    /// The first of `eos_token_id` when it is a list (all of them: `HfConfig::eos_token_ids`).
    pub eos_token_id: Option<u32>,
    /// The context-extension recipe this model runs with.
    pub recipe: Recipe,
}

impl ModelConfig {
    /// Parse a config.json value; `path` names the file in errors.
    pub fn from_json(path: &Path, value: &Value) -> Result<ModelConfig, CheckpointError> {
        HfConfig::from_value(path, value.clone()).map(|c| c.model)
    }

    /// Read `config.json` of a model directory.
    pub fn load(dir: &Path) -> Result<ModelConfig, CheckpointError> {
        HfConfig::load(dir).map(|c| c.model)
    }
}

/// Where a config's recipe came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipeSource {
    /// Our `abf_recipe` block (the exact recipe; wins over everything else).
    Block,
    /// The Hugging Face rope fields (`rope_theta`, `rope_scaling` / `rope_parameters`, and for
    /// ministral3 `llama_4_scaling_beta`).
    Hf,
}

/// How the rope settings are spelled in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeForm {
    /// transformers 4: top-level `rope_theta` and `rope_scaling`.
    Legacy,
    /// transformers 5: `rope_parameters` holding `rope_theta` and the scaling fields.
    Parameters,
}

/// A parsed config.json: the validated model plus the raw JSON, in file order.
#[derive(Debug, Clone)]
pub struct HfConfig {
    pub path: PathBuf,
    pub raw: Map<String, Value>,
    pub model: ModelConfig,
    /// Every id of `eos_token_id` (one or a list).
    pub eos_token_ids: Vec<u32>,
    pub recipe_source: RecipeSource,
    pub rope_form: RopeForm,
    /// Mistral's `sliding_window`, when set (the abf forward attends to the whole sequence).
    pub sliding_window: Option<u64>,
}

impl HfConfig {
    /// Read `DIR/config.json`.
    pub fn load(dir: &Path) -> Result<HfConfig, CheckpointError> {
        HfConfig::read(&dir.join(CONFIG_FILE))
    }

    /// Read a config file.
    pub fn read(path: &Path) -> Result<HfConfig, CheckpointError> {
        let value = read_json(path, "model configuration")?;
        HfConfig::from_value(path, value)
    }

    /// Validate a parsed config.json.
    pub fn from_value(path: &Path, value: Value) -> Result<HfConfig, CheckpointError> {
        let Value::Object(raw) = value else {
            return Err(CheckpointError::invalid(
                path,
                "(top level)",
                "expected a JSON object",
            ));
        };
        let f = Fields { path, obj: &raw };
        let model_type_name = f
            .str(keys::MODEL_TYPE)?
            .ok_or_else(|| CheckpointError::invalid(path, keys::MODEL_TYPE, "missing"))?;
        let model_type = ModelType::parse(model_type_name).ok_or_else(|| {
            CheckpointError::UnsupportedModelType {
                path: path.to_path_buf(),
                found: model_type_name.to_string(),
            }
        })?;
        let shape = read_shape(&f)?;
        let rms_norm_eps = f.f64(keys::RMS_NORM_EPS)?.unwrap_or(DEFAULT_RMS_NORM_EPS);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(CheckpointError::invalid(
                path,
                keys::RMS_NORM_EPS,
                format!("must be finite and > 0, got {rms_norm_eps}"),
            ));
        }
        let tie_word_embeddings = f.bool(keys::TIE_WORD_EMBEDDINGS)?.unwrap_or(false);
        let max_position_embeddings = f
            .u64(keys::MAX_POSITION_EMBEDDINGS)?
            .unwrap_or(DEFAULT_MAX_POSITIONS);
        let bos_token_id = f.token_ids(keys::BOS_TOKEN_ID)?.first().copied();
        let eos_token_ids = f.token_ids(keys::EOS_TOKEN_ID)?;
        let sliding_window = f.u64(keys::SLIDING_WINDOW)?;
        let rope_form = if raw.get(keys::ROPE_PARAMETERS).is_some_and(|v| !v.is_null()) {
            RopeForm::Parameters
        } else {
            RopeForm::Legacy
        };

        let (recipe, recipe_source) = config_recipe(&f, model_type, max_position_embeddings)?;

        let model = ModelConfig {
            model_type,
            vocab_size: shape.vocab_size,
            hidden_size: shape.hidden_size,
            intermediate_size: shape.intermediate_size,
            num_hidden_layers: shape.num_hidden_layers,
            num_attention_heads: shape.num_attention_heads,
            num_key_value_heads: shape.num_key_value_heads,
            head_dim: shape.head_dim,
            rms_norm_eps,
            tie_word_embeddings,
            max_position_embeddings,
            bos_token_id,
            eos_token_id: eos_token_ids.first().copied(),
            recipe,
        };
        Ok(HfConfig {
            path: path.to_path_buf(),
            raw,
            model,
            eos_token_ids,
            recipe_source,
            rope_form,
            sliding_window,
        })
    }

    /// The recipe the Hugging Face fields alone describe (what transformers runs), ignoring our
    /// block.
    pub fn hf_recipe(&self) -> Result<Recipe, CheckpointError> {
        let f = Fields {
            path: &self.path,
            obj: &self.raw,
        };
        hf_recipe(
            &f,
            self.model.model_type,
            self.model.max_position_embeddings,
        )
    }
}

/// The model's sizes, each at least 1, heads dividing evenly, an even rotary dimension.
struct Shape {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
}

fn read_shape(f: &Fields<'_>) -> Result<Shape, CheckpointError> {
    let path = f.path;
    let need = |key: &str| -> Result<usize, CheckpointError> {
        let v = f
            .u64(key)?
            .ok_or_else(|| CheckpointError::invalid(path, key, "missing"))?;
        if v == 0 {
            return Err(CheckpointError::invalid(path, key, "must be at least 1"));
        }
        usize::try_from(v).map_err(|_| CheckpointError::invalid(path, key, "too large"))
    };
    // in the order the keys were always checked, so the first error is the same
    let vocab_size = need(keys::VOCAB_SIZE)?;
    let hidden_size = need(keys::HIDDEN_SIZE)?;
    let intermediate_size = need(keys::INTERMEDIATE_SIZE)?;
    let num_hidden_layers = need(keys::NUM_HIDDEN_LAYERS)?;
    let num_attention_heads = need(keys::NUM_ATTENTION_HEADS)?;
    let num_key_value_heads = match f.u64(keys::NUM_KEY_VALUE_HEADS)? {
        None => num_attention_heads,
        Some(_) => need(keys::NUM_KEY_VALUE_HEADS)?,
    };
    if !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(CheckpointError::invalid(
            path,
            keys::NUM_KEY_VALUE_HEADS,
            format!(
                "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
            ),
        ));
    }
    let head_dim = match f.u64(keys::HEAD_DIM)? {
        Some(_) => need(keys::HEAD_DIM)?,
        None => {
            if !hidden_size.is_multiple_of(num_attention_heads) {
                return Err(CheckpointError::invalid(
                    path,
                    keys::HIDDEN_SIZE,
                    format!(
                        "{hidden_size} is not a multiple of num_attention_heads \
                         {num_attention_heads} (and head_dim is not given)"
                    ),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    if !head_dim.is_multiple_of(2) {
        return Err(CheckpointError::invalid(
            path,
            keys::HEAD_DIM,
            format!("rotary dimension {head_dim} must be even"),
        ));
    }
    Ok(Shape {
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
    })
}

/// The recipe: our block when present (it wins), else the Hugging Face rope fields.
fn config_recipe(
    f: &Fields<'_>,
    model_type: ModelType,
    max_positions: u64,
) -> Result<(Recipe, RecipeSource), CheckpointError> {
    let path = f.path;
    match f.obj.get(CONFIG_BLOCK) {
        Some(block) if !block.is_null() => {
            let origin = format!("{} {CONFIG_BLOCK}", path.display());
            let recipe = Recipe::from_json_block(&origin, block).map_err(|source| {
                CheckpointError::Recipe {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            Ok((recipe, RecipeSource::Block))
        }
        _ => Ok((hf_recipe(f, model_type, max_positions)?, RecipeSource::Hf)),
    }
}

/// Typed access to one JSON object's keys, naming the file and key in errors.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(CheckpointError::invalid(
                self.path,
                key,
                format!("expected a string, got {v}"),
            )),
        }
    }

    fn f64(&self, key: &str) -> Result<Option<f64>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                CheckpointError::invalid(self.path, key, format!("expected a number, got {v}"))
            }),
        }
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match (v.as_u64(), v.as_f64()) {
                (Some(u), _) => Ok(Some(u)),
                // some configs write integers as 4096.0
                (None, Some(x)) if x >= 0.0 && x.fract() == 0.0 && x < 9.0e15 => Ok(Some(x as u64)),
                _ => Err(CheckpointError::invalid(
                    self.path,
                    key,
                    format!("expected a non-negative integer, got {v}"),
                )),
            },
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(CheckpointError::invalid(
                self.path,
                key,
                format!("expected true or false, got {v}"),
            )),
        }
    }

    /// One token id or a list of them (`eos_token_id` may be either).
    fn token_ids(&self, key: &str) -> Result<Vec<u32>, CheckpointError> {
        let one = |v: &Value| -> Result<u32, CheckpointError> {
            v.as_u64()
                .and_then(|u| u32::try_from(u).ok())
                .ok_or_else(|| {
                    CheckpointError::invalid(
                        self.path,
                        key,
                        format!("expected a token id, got {v}"),
                    )
                })
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    /// A nested object (`rope_scaling`, `rope_parameters`), None when absent or null.
    fn object(&self, key: &str) -> Result<Option<Fields<'a>>, CheckpointError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(obj)) => Ok(Some(Fields {
                path: self.path,
                obj,
            })),
            Some(v) => Err(CheckpointError::invalid(
                self.path,
                key,
                format!("expected an object, got {v}"),
            )),
        }
    }
}

/// The recipe of the Hugging Face rope fields.
///
/// c (`original_context`) is `original_max_position_embeddings` when given, else
/// `max_position_embeddings` (transformers' own fallback for yarn and dynamic). The target window
/// is `max_position_embeddings` when `original_max_position_embeddings` is given, else (and always
/// for dynamic, whose transformers form keeps `max_position_embeddings` = c) `round(factor * c)`.
fn hf_recipe(
    f: &Fields<'_>,
    model_type: ModelType,
    max_positions: u64,
) -> Result<Recipe, CheckpointError> {
    let path = f.path;
    let unsupported = |reason: String| CheckpointError::UnsupportedRope {
        path: path.to_path_buf(),
        reason,
    };
    // transformers 5 keeps everything in rope_parameters; transformers 4 in rope_theta + rope_scaling
    let (params, theta) = match f.object(keys::ROPE_PARAMETERS)? {
        Some(p) => {
            if p.get(keys::rope::ROPE_TYPE).is_none()
                && p.get(keys::rope::TYPE).is_none()
                && p.get(keys::ROPE_THETA).is_none()
            {
                return Err(unsupported(
                    "rope_parameters without rope_type or rope_theta (per-layer-type rope \
                     parameters are not supported)"
                        .to_string(),
                ));
            }
            let theta = match p.f64(keys::ROPE_THETA)? {
                Some(t) => Some(t),
                None => f.f64(keys::ROPE_THETA)?,
            };
            (Some(p), theta)
        }
        None => (f.object(keys::ROPE_SCALING)?, f.f64(keys::ROPE_THETA)?),
    };
    let base = theta.unwrap_or(DEFAULT_ROPE_THETA);
    let empty = Map::new();
    let p = params.unwrap_or(Fields { path, obj: &empty });
    let rope_type = match p.str(keys::rope::ROPE_TYPE)? {
        Some(t) => t,
        None => p.str(keys::rope::TYPE)?.unwrap_or("default"),
    };
    let method = keys::rope_type(rope_type).ok_or_else(|| {
        unsupported(format!(
            "rope_type {rope_type:?} (expected one of {})",
            keys::ROPE_TYPES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let factor = if method.uses_factor() {
        let s = p
            .f64(keys::rope::FACTOR)?
            .ok_or_else(|| unsupported(format!("rope_type {rope_type} needs a factor")))?;
        if !(s.is_finite() && s >= 1.0) {
            return Err(unsupported(format!("factor must be >= 1, got {s}")));
        }
        s
    } else {
        1.0
    };
    let original = p.u64(keys::rope::ORIGINAL_MAX_POSITION_EMBEDDINGS)?;
    let c = original.unwrap_or(max_positions);
    let context = match (method, original) {
        (RopeMethod::Dynamic, _) | (RopeMethod::Linear | RopeMethod::Yarn, None) => {
            (factor * c as f64).round() as u64
        }
        _ => max_positions,
    }
    .max(c);

    let mut recipe = Recipe::plain(crate::rope::BaseRope { base, context: c });
    recipe.method = method;
    recipe.factor = factor;
    recipe.context = context;
    if method == RopeMethod::Yarn {
        if p.bool(keys::rope::TRUNCATE)? == Some(false) {
            return Err(unsupported(
                "yarn with truncate: false (abf truncates the ramp bounds as transformers' default)"
                    .to_string(),
            ));
        }
        recipe.beta_fast = p.f64(keys::rope::BETA_FAST)?.unwrap_or(defaults::BETA_FAST);
        recipe.beta_slow = p.f64(keys::rope::BETA_SLOW)?.unwrap_or(defaults::BETA_SLOW);
        // transformers _compute_yarn_parameters: attention_factor, else
        // get_mscale(s, mscale) / get_mscale(s, mscale_all_dim) when both are set, else get_mscale(s)
        let get_mscale = |m: f64| 1.0 + m * (yarn_mscale(factor) - 1.0);
        recipe.yarn_attention_factor = match (
            p.f64(keys::rope::ATTENTION_FACTOR)?,
            p.f64(keys::rope::MSCALE)?,
            p.f64(keys::rope::MSCALE_ALL_DIM)?,
        ) {
            (Some(a), _, _) => Some(a),
            (None, Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                Some(get_mscale(m) / get_mscale(m_all))
            }
            _ => None,
        };
        // yarn without the attention factor is NTK-by-parts (method.md)
        if recipe.yarn_attention_factor == Some(1.0) {
            recipe.method = RopeMethod::NtkByParts;
            recipe.yarn_attention_factor = None;
        }
    }
    if method == RopeMethod::Llama3 {
        recipe.low_freq_factor = p
            .f64(keys::rope::LOW_FREQ_FACTOR)?
            .unwrap_or(defaults::LOW_FREQ_FACTOR);
        recipe.high_freq_factor = p
            .f64(keys::rope::HIGH_FREQ_FACTOR)?
            .unwrap_or(defaults::HIGH_FREQ_FACTOR);
    }
    // Only transformers' ministral3 evaluates llama_4_scaling_beta; a llama config ignores it.
    if model_type == ModelType::Ministral3 {
        if let Some(beta) = p.f64(keys::rope::LLAMA_4_SCALING_BETA)? {
            let length = original.ok_or_else(|| {
                unsupported(
                    "llama_4_scaling_beta needs rope_parameters.original_max_position_embeddings"
                        .to_string(),
                )
            })?;
            if beta != 0.0 {
                recipe.scale_law = ScaleLaw::Step { beta, length };
            }
        }
    }
    recipe
        .validate()
        .map_err(|source| CheckpointError::Recipe {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(recipe)
}
