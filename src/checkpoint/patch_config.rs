//! Rewriting config.json for a recipe: for transformers (the Hugging Face fields it runs
//! natively) or exactly (those fields plus our `abf_recipe` block with what they cannot say).
//! Only config.json changes; with a new output directory the weights are hard-linked (or copied)
//! and the other files copied. What transformers runs comes from `rope::runtime_form`.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::config::{HfConfig, ModelType, RopeForm, CONFIG_FILE};
use super::error::CheckpointError;
use super::keys::{self, rope as rk};
use super::writer::{write_json, StagedDir};
use crate::rope::{runtime_form, Recipe, RopeMethod, ScaleLaw, Target, CONFIG_BLOCK};

/// A rewritten configuration.
#[derive(Debug, Clone)]
pub struct PatchedConfig {
    pub config: Map<String, Value>,
    pub model_type: ModelType,
    /// The target written for (transformers or exact).
    pub target: Target,
    /// The recipe asked for (what abf runs from the file).
    pub recipe: Recipe,
    /// What transformers computes from the written fields (differs from `recipe` only when
    /// approximated).
    pub runtime_recipe: Recipe,
    /// What transformers will not apply, empty when its form is exact. With the exact target
    /// these are warnings: the block records the recipe, transformers runs the nearest form.
    pub approximations: Vec<String>,
}

/// The transformers rope fields of a runtime form: (rope_type, rope_theta, other fields).
/// Static NTK arrives as plain rope with its base (`runtime_form`).
fn rope_fields(r: &Recipe) -> (&'static str, f64, Vec<(&'static str, Value)>) {
    let c = r.original_context;
    match r.method {
        // ABF changes only the base
        RopeMethod::Default | RopeMethod::Abf | RopeMethod::Eabf | RopeMethod::Ntk => {
            (keys::DEFAULT_ROPE_TYPE, r.rope_base, vec![])
        }
        RopeMethod::Linear | RopeMethod::Dynamic => (
            if r.method == RopeMethod::Linear {
                keys::LINEAR_ROPE_TYPE
            } else {
                keys::DYNAMIC_ROPE_TYPE
            },
            r.rope_base,
            vec![
                (rk::FACTOR, json!(r.factor)),
                (rk::ORIGINAL_MAX_POSITION_EMBEDDINGS, json!(c)),
            ],
        ),
        RopeMethod::Yarn | RopeMethod::NtkByParts => {
            let mut fields = vec![
                (rk::FACTOR, json!(r.factor)),
                (rk::ORIGINAL_MAX_POSITION_EMBEDDINGS, json!(c)),
                (rk::BETA_FAST, json!(r.beta_fast)),
                (rk::BETA_SLOW, json!(r.beta_slow)),
            ];
            // NTK-by-parts is yarn with attention factor 1; yarn's default (0.1 ln s + 1) is
            // transformers' own default when no mscale keys are present, as here
            let attention = match r.method {
                RopeMethod::NtkByParts => Some(1.0),
                _ => r.yarn_attention_factor,
            };
            if let Some(a) = attention {
                fields.push((rk::ATTENTION_FACTOR, json!(a)));
            }
            (keys::YARN_ROPE_TYPE, r.rope_base, fields)
        }
        RopeMethod::Llama3 => (
            keys::LLAMA3_ROPE_TYPE,
            r.rope_base,
            vec![
                (rk::FACTOR, json!(r.factor)),
                (rk::LOW_FREQ_FACTOR, json!(r.low_freq_factor)),
                (rk::HIGH_FREQ_FACTOR, json!(r.high_freq_factor)),
                (rk::ORIGINAL_MAX_POSITION_EMBEDDINGS, json!(c)),
            ],
        ),
    }
}

/// Rewrite `input` for `recipe`: `Target::Transformers` writes only transformers' fields and
/// refuses a recipe it cannot run exactly unless `allow_approximate`; `Target::Exact` writes the
/// same fields (base, window and scaling as transformers reads them) plus our block, and never
/// refuses: `approximations` name what transformers will not apply.
pub fn patch_config(
    input: &HfConfig,
    recipe: &Recipe,
    target: Target,
    allow_approximate: bool,
) -> Result<PatchedConfig, CheckpointError> {
    recipe
        .validate()
        .map_err(|source| CheckpointError::Recipe {
            path: input.path.clone(),
            source,
        })?;
    if target == Target::LlamaCpp {
        return Err(CheckpointError::Output {
            path: input.path.clone(),
            reason: "config.json is read by transformers: write it for transformers or exact"
                .into(),
        });
    }
    let form = runtime_form(recipe, Target::Transformers, input.model.head_dim);
    if target == Target::Transformers && !form.is_exact() && !allow_approximate {
        return Err(CheckpointError::NotRepresentable {
            runtime: Target::Transformers.name(),
            gaps: form.reasons(),
        });
    }
    let near = &form.recipe;
    let mut config = input.raw.clone();
    let model_type = write_native(&mut config, input, near);
    config.shift_remove(CONFIG_BLOCK);
    if target == Target::Exact {
        config.insert(CONFIG_BLOCK.into(), recipe.to_json_block());
    }
    Ok(PatchedConfig {
        config,
        model_type,
        target,
        recipe: recipe.clone(),
        runtime_recipe: near.clone(),
        approximations: form.reasons(),
    })
}

/// Write transformers' fields for the runtime form `near` into `config`; returns the model type.
fn write_native(config: &mut Map<String, Value>, input: &HfConfig, near: &Recipe) -> ModelType {
    let (rope_type, theta, fields) = rope_fields(near);
    let step = match near.scale_law {
        ScaleLaw::Step { beta, length } => Some((beta, length)),
        _ => None,
    };
    // the step law needs ministral3; a ministral3 input stays one (beta 0 is no scaling)
    let model_type = if step.is_some() {
        ModelType::Ministral3
    } else {
        input.model.model_type
    };
    // transformers 5 (and so ministral3) spells rope settings as rope_parameters
    let parameters_form =
        model_type == ModelType::Ministral3 || input.rope_form == RopeForm::Parameters;
    if model_type != input.model.model_type {
        config.insert(keys::MODEL_TYPE.into(), json!(model_type.name()));
        config.insert(
            keys::ARCHITECTURES.into(),
            json!([model_type.architecture()]),
        );
    }
    if parameters_form {
        let mut p = Map::new();
        p.insert(rk::ROPE_TYPE.into(), json!(rope_type));
        p.insert(keys::ROPE_THETA.into(), json!(theta));
        for (k, v) in fields {
            p.insert(k.into(), v);
        }
        if model_type == ModelType::Ministral3 {
            let (beta, length) = step.unwrap_or((0.0, near.original_context));
            p.insert(rk::ORIGINAL_MAX_POSITION_EMBEDDINGS.into(), json!(length));
            p.insert(rk::LLAMA_4_SCALING_BETA.into(), json!(beta));
        }
        config.shift_remove(keys::ROPE_THETA);
        config.shift_remove(keys::ROPE_SCALING);
        config.insert(keys::ROPE_PARAMETERS.into(), Value::Object(p));
    } else {
        config.insert(keys::ROPE_THETA.into(), json!(theta));
        if rope_type == keys::DEFAULT_ROPE_TYPE {
            if config.contains_key(keys::ROPE_SCALING) {
                config.insert(keys::ROPE_SCALING.into(), Value::Null);
            }
        } else {
            let mut s = Map::new();
            s.insert(rk::ROPE_TYPE.into(), json!(rope_type));
            for (k, v) in fields {
                s.insert(k.into(), v);
            }
            config.insert(keys::ROPE_SCALING.into(), Value::Object(s));
        }
    }
    // transformers' dynamic NTK takes L from max_position_embeddings: it must stay c
    let max_positions = if near.method == RopeMethod::Dynamic {
        near.original_context
    } else {
        near.context
    };
    config.insert(keys::MAX_POSITION_EMBEDDINGS.into(), json!(max_positions));
    model_type
}

/// Where the rewritten checkpoint goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchOutput {
    /// A new directory (absent or empty).
    Dir(PathBuf),
    /// config.json of the model directory itself, replaced atomically.
    InPlace,
}

/// What writing did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatchFiles {
    pub config_path: PathBuf,
    pub linked: Vec<String>,
    pub copied: Vec<String>,
    /// Entries not carried (subdirectories, special files).
    pub skipped: Vec<String>,
}

/// Weights are never rewritten, so sharing their inode with the input is safe.
fn is_weights(name: &str) -> bool {
    [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".gguf",
        ".ckpt",
        ".h5",
        ".msgpack",
    ]
    .iter()
    .any(|ext| name.ends_with(ext))
}

/// Write a patched config: in place, or into a new directory with the rest of the model.
pub fn write_patched(
    model_dir: &Path,
    patched: &PatchedConfig,
    output: &PatchOutput,
) -> Result<PatchFiles, CheckpointError> {
    let config = Value::Object(patched.config.clone());
    match output {
        PatchOutput::InPlace => {
            let path = model_dir.join(CONFIG_FILE);
            write_json(&path, &config, true)?;
            Ok(PatchFiles {
                config_path: path,
                ..PatchFiles::default()
            })
        }
        PatchOutput::Dir(out) => {
            let same_dir = match (model_dir.canonicalize(), out.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            if same_dir {
                return Err(CheckpointError::Output {
                    path: out.clone(),
                    reason: "the output is the model directory itself (use --in-place)".into(),
                });
            }
            let staged = StagedDir::create(out)?;
            let mut files = PatchFiles::default();
            let mut entries: Vec<_> = std::fs::read_dir(model_dir)
                .map_err(|e| CheckpointError::io(model_dir, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| CheckpointError::io(model_dir, e))?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let name = entry.file_name().to_string_lossy().into_owned();
                let src = entry.path();
                if name == CONFIG_FILE {
                    continue;
                }
                if !src.is_file() {
                    files.skipped.push(name);
                    continue;
                }
                let dst = staged.path().join(&name);
                if is_weights(&name) && std::fs::hard_link(&src, &dst).is_ok() {
                    files.linked.push(name);
                    continue;
                }
                std::fs::copy(&src, &dst).map_err(|e| CheckpointError::io(&src, e))?;
                files.copied.push(name);
            }
            write_json(&staged.path().join(CONFIG_FILE), &config, false)?;
            let dir = staged.commit()?;
            files.config_path = dir.join(CONFIG_FILE);
            Ok(files)
        }
    }
}
