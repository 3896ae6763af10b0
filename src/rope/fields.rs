//! The recipe as a flat list of named fields: the one serialization that both the config.json
//! block (`abf_recipe`) and the GGUF keys (`abf.recipe.*`) are made from.

use serde_json::{Map, Value};

use super::recipe::{defaults, Recipe, RopeMethod, ScaleLaw};
use super::RecipeError;

/// Top-level key of our block in config.json (transformers keeps unknown keys on save).
pub const CONFIG_BLOCK: &str = "abf_recipe";
/// Prefix of our GGUF keys; a field `f` is stored as `abf.recipe.f`.
pub const GGUF_PREFIX: &str = "abf.recipe.";
/// Version of the field list, written with it.
pub const FORMAT_VERSION: u64 = 1;

/// Field names, one table (name, kind).
pub const FIELDS: &[(&str, FieldKind)] = &[
    ("version", FieldKind::U64),
    ("method", FieldKind::Str),
    ("rope_base", FieldKind::F64),
    ("factor", FieldKind::F64),
    ("original_context", FieldKind::U64),
    ("context", FieldKind::U64),
    ("beta_fast", FieldKind::F64),
    ("beta_slow", FieldKind::F64),
    ("low_freq_factor", FieldKind::F64),
    ("high_freq_factor", FieldKind::F64),
    ("attention_factor", FieldKind::F64),
    ("scale_law", FieldKind::Str),
    ("scale_beta", FieldKind::F64),
    ("scale_length", FieldKind::U64),
    ("skip_layers", FieldKind::U64),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Str,
    F64,
    U64,
}

/// One field's value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Str(String),
    F64(f64),
    U64(u64),
}

impl FieldValue {
    pub fn to_json(&self) -> Value {
        match self {
            FieldValue::Str(s) => Value::String(s.clone()),
            FieldValue::F64(x) => serde_json::Number::from_f64(*x)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            FieldValue::U64(x) => Value::from(*x),
        }
    }
}

/// The kind a field name has, if it is one of ours.
pub fn field_kind(name: &str) -> Option<FieldKind> {
    FIELDS.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

impl Recipe {
    /// The recipe as (field, value) pairs, in table order; fields a method does not use are left out.
    pub fn to_fields(&self) -> Vec<(&'static str, FieldValue)> {
        use FieldValue::*;
        let mut out = vec![
            ("version", U64(FORMAT_VERSION)),
            ("method", Str(self.method.name().to_string())),
            ("rope_base", F64(self.rope_base)),
            ("factor", F64(self.factor)),
            ("original_context", U64(self.original_context)),
            ("context", U64(self.context)),
        ];
        if matches!(self.method, RopeMethod::Yarn | RopeMethod::NtkByParts) {
            out.push(("beta_fast", F64(self.beta_fast)));
            out.push(("beta_slow", F64(self.beta_slow)));
        }
        if self.method == RopeMethod::Llama3 {
            out.push(("low_freq_factor", F64(self.low_freq_factor)));
            out.push(("high_freq_factor", F64(self.high_freq_factor)));
        }
        if let Some(a) = self.yarn_attention_factor {
            out.push(("attention_factor", F64(a)));
        }
        out.push(("scale_law", Str(self.scale_law.name().to_string())));
        if let ScaleLaw::Step { beta, length } = self.scale_law {
            out.push(("scale_beta", F64(beta)));
            out.push(("scale_length", U64(length)));
        }
        out.push(("skip_layers", U64(self.skip_layers as u64)));
        out
    }

    /// Rebuild a recipe from fields; `get` returns a field's value when present.
    /// `source` names where the fields came from, for errors.
    pub fn from_fields(
        source: &str,
        get: impl Fn(&str) -> Option<FieldValue>,
    ) -> Result<Recipe, RecipeError> {
        let missing = |field: &str| RecipeError::Field {
            origin: source.to_string(),
            field: field.to_string(),
            reason: "missing".to_string(),
        };
        let wrong = |field: &str, want: &str| RecipeError::Field {
            origin: source.to_string(),
            field: field.to_string(),
            reason: format!("expected {want}"),
        };
        let f64_of = |field: &str| -> Result<Option<f64>, RecipeError> {
            match get(field) {
                None => Ok(None),
                Some(FieldValue::F64(x)) => Ok(Some(x)),
                Some(FieldValue::U64(x)) => Ok(Some(x as f64)),
                Some(_) => Err(wrong(field, "a number")),
            }
        };
        let u64_of = |field: &str| -> Result<Option<u64>, RecipeError> {
            match get(field) {
                None => Ok(None),
                Some(FieldValue::U64(x)) => Ok(Some(x)),
                Some(FieldValue::F64(x)) if x >= 0.0 && x.fract() == 0.0 && x < 1e18 => {
                    Ok(Some(x as u64))
                }
                Some(_) => Err(wrong(field, "a non-negative integer")),
            }
        };
        let str_of = |field: &str| -> Result<Option<String>, RecipeError> {
            match get(field) {
                None => Ok(None),
                Some(FieldValue::Str(s)) => Ok(Some(s)),
                Some(_) => Err(wrong(field, "a string")),
            }
        };
        if let Some(v) = u64_of("version")? {
            if v > FORMAT_VERSION {
                return Err(RecipeError::Field {
                    origin: source.to_string(),
                    field: "version".into(),
                    reason: format!("version {v} is newer than this abf reads ({FORMAT_VERSION})"),
                });
            }
        }
        let method: RopeMethod = str_of("method")?
            .ok_or_else(|| missing("method"))?
            .parse()?;
        let rope_base = f64_of("rope_base")?.ok_or_else(|| missing("rope_base"))?;
        let original_context =
            u64_of("original_context")?.ok_or_else(|| missing("original_context"))?;
        let context = u64_of("context")?.unwrap_or(original_context);
        let scale_law = match str_of("scale_law")?.as_deref() {
            None | Some("none") => ScaleLaw::None,
            Some("log") => ScaleLaw::Log,
            Some("step") => {
                let ScaleLaw::Step { beta, length } = Recipe::default_step(original_context) else {
                    unreachable!("default_step returns the step law")
                };
                ScaleLaw::Step {
                    beta: f64_of("scale_beta")?.unwrap_or(beta),
                    length: u64_of("scale_length")?.unwrap_or(length),
                }
            }
            Some(other) => return Err(RecipeError::UnknownScaleLaw(other.to_string())),
        };
        let recipe = Recipe {
            method,
            rope_base,
            factor: f64_of("factor")?.unwrap_or(1.0),
            original_context,
            context,
            beta_fast: f64_of("beta_fast")?.unwrap_or(defaults::BETA_FAST),
            beta_slow: f64_of("beta_slow")?.unwrap_or(defaults::BETA_SLOW),
            low_freq_factor: f64_of("low_freq_factor")?.unwrap_or(defaults::LOW_FREQ_FACTOR),
            high_freq_factor: f64_of("high_freq_factor")?.unwrap_or(defaults::HIGH_FREQ_FACTOR),
            yarn_attention_factor: f64_of("attention_factor")?,
            scale_law,
            skip_layers: u64_of("skip_layers")?.unwrap_or(0) as usize,
        };
        recipe.validate()?;
        Ok(recipe)
    }

    /// Our config.json block: a JSON object of the fields.
    pub fn to_json_block(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in self.to_fields() {
            m.insert(k.to_string(), v.to_json());
        }
        Value::Object(m)
    }

    /// Read our config.json block.
    pub fn from_json_block(source: &str, block: &Value) -> Result<Recipe, RecipeError> {
        let obj = block.as_object().ok_or_else(|| RecipeError::Field {
            origin: source.to_string(),
            field: CONFIG_BLOCK.to_string(),
            reason: "expected an object".to_string(),
        })?;
        Recipe::from_fields(source, |name| {
            let v = obj.get(name)?;
            match v {
                Value::String(s) => Some(FieldValue::Str(s.clone())),
                Value::Number(n) => match n.as_u64() {
                    Some(u) if field_kind(name) == Some(FieldKind::U64) => Some(FieldValue::U64(u)),
                    _ => n.as_f64().map(FieldValue::F64),
                },
                Value::Null => None,
                // a wrong JSON type is reported by from_fields as a kind mismatch
                _ => Some(FieldValue::Str(v.to_string())),
            }
        })
    }
}
