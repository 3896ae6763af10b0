//! Rewriting config.json for a recipe: for transformers (the Hugging Face fields it runs
//! natively) or exactly (our `abf_recipe` block). Only config.json changes; with a new output
//! directory the weights are hard-linked (or copied) and the other files copied.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::config::{HfConfig, ModelType, RopeForm, CONFIG_FILE};
use super::error::CheckpointError;
use super::writer::{write_json, StagedDir};
use crate::rope::{ntk_base, Recipe, RopeMethod, ScaleLaw, CONFIG_BLOCK};

/// Which runtime the rewritten config is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// Hugging Face transformers' own fields (LLaMA rope settings; ministral3 for the step law).
    Transformers,
    /// The model type kept, the whole recipe in our `abf_recipe` block.
    Exact,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Transformers => "transformers",
            Runtime::Exact => "exact",
        }
    }
}

/// A rewritten configuration.
#[derive(Debug, Clone)]
pub struct PatchedConfig {
    pub config: Map<String, Value>,
    pub model_type: ModelType,
    /// The recipe asked for.
    pub recipe: Recipe,
    /// What the runtime computes from the written config (differs from `recipe` only when
    /// approximated).
    pub runtime_recipe: Recipe,
    /// Why the runtime form differs, empty when it is exact.
    pub approximations: Vec<String>,
}

/// Relative equality for factors that should be equal by construction.
fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

/// Methods whose transformers form reads `original_max_position_embeddings` as c.
fn uses_original_context(method: RopeMethod) -> bool {
    matches!(
        method,
        RopeMethod::Yarn | RopeMethod::NtkByParts | RopeMethod::Llama3 | RopeMethod::Dynamic
    )
}

/// Why transformers cannot run `recipe` exactly, and the nearest recipe it can run.
pub fn transformers_form(recipe: &Recipe) -> (Recipe, Vec<String>) {
    let mut gaps = recipe.runtime_gaps();
    let mut near = recipe.clone();
    if near.scale_law == ScaleLaw::Log {
        near.scale_law = Recipe::default_step(near.original_context);
    }
    if near.scale_law != ScaleLaw::None {
        near.skip_layers = 0;
    }
    let c = near.original_context;
    if let ScaleLaw::Step { beta, length } = near.scale_law {
        if length != c && uses_original_context(near.method) {
            gaps.push(format!(
                "transformers' ministral3 reads the step law's L ({length}) and the rope's \
                 original context c ({c}) from one key, original_max_position_embeddings"
            ));
            near.scale_law = ScaleLaw::Step { beta, length: c };
        }
    }
    if matches!(near.method, RopeMethod::Yarn | RopeMethod::NtkByParts) {
        let implied = near.context as f64 / c as f64;
        if !same(near.factor, implied) {
            gaps.push(format!(
                "transformers derives yarn's factor from max_position_embeddings / \
                 original_max_position_embeddings = {} / {c}, not {}",
                near.context, near.factor
            ));
            near.context = (near.factor * c as f64).round() as u64;
        }
    }
    (near, gaps)
}

/// The transformers rope fields of a recipe: (rope_type, rope_theta, other fields in order).
fn rope_fields(r: &Recipe, head_dim: usize) -> (&'static str, f64, Vec<(&'static str, Value)>) {
    let c = r.original_context;
    match r.method {
        // ABF changes only the base
        RopeMethod::Default | RopeMethod::Abf | RopeMethod::Eabf => {
            ("default", r.rope_base, vec![])
        }
        // static NTK-aware is plain rope with the NTK base (method.md), exact
        RopeMethod::Ntk => ("default", ntk_base(r.rope_base, r.factor, head_dim), vec![]),
        RopeMethod::Linear => (
            "linear",
            r.rope_base,
            vec![
                ("factor", json!(r.factor)),
                ("original_max_position_embeddings", json!(c)),
            ],
        ),
        RopeMethod::Dynamic => (
            "dynamic",
            r.rope_base,
            vec![
                ("factor", json!(r.factor)),
                ("original_max_position_embeddings", json!(c)),
            ],
        ),
        RopeMethod::Yarn | RopeMethod::NtkByParts => {
            let mut fields = vec![
                ("factor", json!(r.factor)),
                ("original_max_position_embeddings", json!(c)),
                ("beta_fast", json!(r.beta_fast)),
                ("beta_slow", json!(r.beta_slow)),
            ];
            // NTK-by-parts is yarn with attention factor 1; yarn's default (0.1 ln s + 1) is
            // transformers' own default when no mscale keys are present, as here
            let attention = match r.method {
                RopeMethod::NtkByParts => Some(1.0),
                _ => r.yarn_attention_factor,
            };
            if let Some(a) = attention {
                fields.push(("attention_factor", json!(a)));
            }
            ("yarn", r.rope_base, fields)
        }
        RopeMethod::Llama3 => (
            "llama3",
            r.rope_base,
            vec![
                ("factor", json!(r.factor)),
                ("low_freq_factor", json!(r.low_freq_factor)),
                ("high_freq_factor", json!(r.high_freq_factor)),
                ("original_max_position_embeddings", json!(c)),
            ],
        ),
    }
}

/// Rewrite `input` for `recipe`.
pub fn patch_config(
    input: &HfConfig,
    recipe: &Recipe,
    runtime: Runtime,
    allow_approximate: bool,
) -> Result<PatchedConfig, CheckpointError> {
    recipe
        .validate()
        .map_err(|source| CheckpointError::Recipe {
            path: input.path.clone(),
            source,
        })?;
    let mut config = input.raw.clone();
    match runtime {
        Runtime::Exact => {
            config.insert("max_position_embeddings".into(), json!(recipe.context));
            config.insert(CONFIG_BLOCK.into(), recipe.to_json_block());
            Ok(PatchedConfig {
                config,
                model_type: input.model.model_type,
                recipe: recipe.clone(),
                runtime_recipe: recipe.clone(),
                approximations: Vec::new(),
            })
        }
        Runtime::Transformers => {
            let (near, gaps) = transformers_form(recipe);
            if !gaps.is_empty() && !allow_approximate {
                return Err(CheckpointError::NotRepresentable {
                    runtime: "transformers",
                    gaps,
                });
            }
            let (rope_type, theta, fields) = rope_fields(&near, input.model.head_dim);
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
            // the block wins on our read; the transformers form is exactly the HF fields
            config.shift_remove(CONFIG_BLOCK);
            if model_type != input.model.model_type {
                config.insert("model_type".into(), json!(model_type.name()));
                config.insert("architectures".into(), json!([model_type.architecture()]));
            }
            if parameters_form {
                let mut p = Map::new();
                p.insert("rope_type".into(), json!(rope_type));
                p.insert("rope_theta".into(), json!(theta));
                for (k, v) in fields {
                    p.insert(k.into(), v);
                }
                if model_type == ModelType::Ministral3 {
                    let (beta, length) = step.unwrap_or((0.0, near.original_context));
                    p.insert("original_max_position_embeddings".into(), json!(length));
                    p.insert("llama_4_scaling_beta".into(), json!(beta));
                }
                config.shift_remove("rope_theta");
                config.shift_remove("rope_scaling");
                config.insert("rope_parameters".into(), Value::Object(p));
            } else {
                config.insert("rope_theta".into(), json!(theta));
                if rope_type == "default" {
                    if config.contains_key("rope_scaling") {
                        config.insert("rope_scaling".into(), Value::Null);
                    }
                } else {
                    let mut s = Map::new();
                    s.insert("rope_type".into(), json!(rope_type));
                    for (k, v) in fields {
                        s.insert(k.into(), v);
                    }
                    config.insert("rope_scaling".into(), Value::Object(s));
                }
            }
            // transformers' dynamic NTK takes L from max_position_embeddings: it must stay c
            let max_positions = if near.method == RopeMethod::Dynamic {
                near.original_context
            } else {
                near.context
            };
            config.insert("max_position_embeddings".into(), json!(max_positions));
            Ok(PatchedConfig {
                config,
                model_type,
                recipe: recipe.clone(),
                runtime_recipe: near,
                approximations: gaps,
            })
        }
    }
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
