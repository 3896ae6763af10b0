//! The context-extension recipe: its type, its frequencies and scale laws (pure f64, no
//! tensors), and its conversions to the config.json block and flat fields.

mod fields;
mod freqs;
mod recipe;
mod runtime;

pub use fields::{
    field_kind, FieldKind, FieldValue, CONFIG_BLOCK, FIELDS, FORMAT_VERSION, GGUF_PREFIX,
};
pub use freqs::{base_inv_freq, dynamic_base, ntk_base, yarn_mscale, yarn_range};
pub use recipe::{defaults, BaseRope, Recipe, RopeMethod, ScaleLaw};
pub use runtime::{runtime_form, Approximation, Gap, RuntimeForm, Target};

/// Errors of building or reading a recipe.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("unknown rope method {0:?} (expected one of default, linear, ntk, dynamic, yarn, ntk-by-parts, llama3, abf, eabf)")]
    UnknownMethod(String),
    #[error("unknown scale law {0:?} (expected none, log or step)")]
    UnknownScaleLaw(String),
    #[error("invalid recipe: {field} {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("unknown runtime {0:?} (expected llama.cpp, transformers or exact)")]
    UnknownTarget(String),
    #[error("{target} cannot run this recipe exactly: {reasons}; pass --allow-approximate to write its nearest runtime form")]
    NotExact {
        target: &'static str,
        reasons: String,
    },
    #[error("{origin}: recipe field {field}: {reason}")]
    Field {
        origin: String,
        field: String,
        reason: String,
    },
}
