//! GGUF: the type and key tables, reader, writer, patcher, and the recipe <-> keys mapping
//! (ours; candle's writer emits v2 and ignores alignment).

pub mod error;
pub mod keys;
pub mod metadata;
pub mod patch;
pub mod reader;
pub mod recipe;
pub mod set;
pub mod split;
pub mod types;
pub mod value;
pub mod writer;

pub use error::GgufError;
pub use keys::ArchKey;
pub use metadata::Metadata;
pub use patch::{diff, in_place_writes, rewrite, write_in_place, Change, InPlaceWrite};
pub use reader::{open_mmap, FieldSpan, GgufFile, MappedGguf, TensorInfo};
pub use recipe::{
    apply_recipe, apply_recipe_with_freq_factors, read_recipe, rope_dim, runtime_recipe,
    RuntimeRecipe,
};
pub use set::{open_set, GgufSet, SetPart};
pub use split::{
    output_prefix, plan_parts, split_path, split_prefix, write_parts, PartsWritten, SplitLimits,
    SplitWriter,
};
pub use types::{GgmlType, TypeInfo};
pub use value::{Array, Value, ValueType};
pub use writer::{GgufWriter, TensorSpec};
