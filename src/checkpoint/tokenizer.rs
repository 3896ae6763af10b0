//! Tokenizer files of a model directory: `tokenizer.json` (the `tokenizers` crate),
//! `tokenizer_config.json` (chat template, special tokens, add_bos/add_eos) and the optional
//! `generation_config.json`.

use std::path::Path;

use serde_json::{Map, Value};

use super::error::{read_file, read_json, CheckpointError};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// transformers >= 4.43 may save the chat template beside tokenizer_config.json.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Files a checkpoint writer copies with the tokenizer (those present).
pub const TOKENIZER_FILES: &[&str] = &[
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    CHAT_TEMPLATE_FILE,
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// What `tokenizer_config.json` says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub model_max_length: Option<u64>,
    /// The whole file, in order.
    pub raw: Map<String, Value>,
}

/// What `generation_config.json` says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub raw: Map<String, Value>,
}

/// The tokenizer files of a model directory.
pub struct TokenizerFiles {
    pub tokenizer: tokenizers::Tokenizer,
    /// Empty when `tokenizer_config.json` is absent.
    pub config: TokenizerConfig,
    pub generation: Option<GenerationConfig>,
}

impl std::fmt::Debug for TokenizerFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerFiles")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("config", &self.config)
            .field("generation", &self.generation)
            .finish()
    }
}

impl TokenizerFiles {
    /// Load `tokenizer.json` (required) and the two optional config files of `dir`.
    pub fn load(dir: &Path) -> Result<TokenizerFiles, CheckpointError> {
        let tokenizer = load_tokenizer(&dir.join(TOKENIZER_FILE))?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let mut config = if config_path.is_file() {
            TokenizerConfig::read(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        if config.chat_template.is_none() {
            let p = dir.join(CHAT_TEMPLATE_FILE);
            if p.is_file() {
                let bytes = read_file(&p, "chat template")?;
                config.chat_template =
                    Some(
                        String::from_utf8(bytes).map_err(|_| CheckpointError::Tokenizer {
                            path: p.clone(),
                            reason: "not UTF-8".to_string(),
                        })?,
                    );
            }
        }
        let gen_path = dir.join(GENERATION_CONFIG_FILE);
        let generation = if gen_path.is_file() {
            Some(GenerationConfig::read(&gen_path)?)
        } else {
            None
        };
        Ok(TokenizerFiles {
            tokenizer,
            config,
            generation,
        })
    }
}

/// Load a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, CheckpointError> {
    let bytes = read_file(path, "tokenizer")?;
    // a JSON syntax error is reported with its line; the tokenizers crate's own errors as they
    // are. Parsed to a Value, not skipped over: skipping accepts escapes such as a lone surrogate
    // that the tokenizers crate then panics on.
    if let Err(e) = serde_json::from_slice::<Value>(&bytes) {
        return Err(CheckpointError::json(path, &e));
    }
    tokenizer_from_bytes(&bytes).map_err(|reason| CheckpointError::Tokenizer {
        path: path.to_path_buf(),
        reason: format!("invalid tokenizer: {reason}"),
    })
}

/// `tokenizers::Tokenizer::from_bytes` with its panics turned into errors: the crate `expect`s
/// while deserializing some malformed parts (tokenizers 0.23, `decoders/mod.rs`), and a file a
/// user hands us must give an error naming it, not abort the command.
pub fn tokenizer_from_bytes(bytes: &[u8]) -> Result<tokenizers::Tokenizer, String> {
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(format!("the tokenizers crate failed on it ({what})"))
        }
    }
}

fn object(path: &Path, value: Value) -> Result<Map<String, Value>, CheckpointError> {
    match value {
        Value::Object(m) => Ok(m),
        _ => Err(CheckpointError::invalid(
            path,
            "(top level)",
            "expected a JSON object",
        )),
    }
}

/// A special token: a string or an AddedToken object `{"content": ...}`.
fn special_token(
    path: &Path,
    raw: &Map<String, Value>,
    key: &str,
) -> Result<Option<String>, CheckpointError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(CheckpointError::invalid(
                path,
                key,
                "AddedToken object without a string content",
            )),
        },
        Some(v) => Err(CheckpointError::invalid(
            path,
            key,
            format!("expected a string or an AddedToken object, got {v}"),
        )),
    }
}

fn opt_bool(
    path: &Path,
    raw: &Map<String, Value>,
    key: &str,
) -> Result<Option<bool>, CheckpointError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(CheckpointError::invalid(
            path,
            key,
            format!("expected true or false, got {v}"),
        )),
    }
}

fn token_ids(
    path: &Path,
    raw: &Map<String, Value>,
    key: &str,
) -> Result<Vec<u32>, CheckpointError> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|u| u32::try_from(u).ok())
            .ok_or_else(|| {
                CheckpointError::invalid(path, key, format!("expected a token id, got {v}"))
            })
    };
    match raw.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

impl TokenizerConfig {
    pub fn read(path: &Path) -> Result<TokenizerConfig, CheckpointError> {
        let raw = object(path, read_json(path, "tokenizer configuration")?)?;
        // the chat template is a string, or (older files) a list of {name, template}: take "default"
        let chat_template = match raw.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(items)) => {
                let named = |name: &str| {
                    items.iter().find_map(|t| {
                        (t.get("name")?.as_str()? == name)
                            .then(|| t.get("template")?.as_str().map(str::to_string))
                            .flatten()
                    })
                };
                Some(named("default").ok_or_else(|| {
                    CheckpointError::invalid(
                        path,
                        "chat_template",
                        "a list of templates without one named \"default\"",
                    )
                })?)
            }
            Some(v) => {
                return Err(CheckpointError::invalid(
                    path,
                    "chat_template",
                    format!("expected a string, got {v}"),
                ))
            }
        };
        Ok(TokenizerConfig {
            chat_template,
            bos_token: special_token(path, &raw, "bos_token")?,
            eos_token: special_token(path, &raw, "eos_token")?,
            unk_token: special_token(path, &raw, "unk_token")?,
            pad_token: special_token(path, &raw, "pad_token")?,
            add_bos_token: opt_bool(path, &raw, "add_bos_token")?,
            add_eos_token: opt_bool(path, &raw, "add_eos_token")?,
            model_max_length: raw
                .get("model_max_length")
                .and_then(Value::as_u64)
                .filter(|&n| n < 1 << 53),
            raw,
        })
    }
}

impl GenerationConfig {
    pub fn read(path: &Path) -> Result<GenerationConfig, CheckpointError> {
        let raw = object(path, read_json(path, "generation configuration")?)?;
        Ok(GenerationConfig {
            bos_token_id: token_ids(path, &raw, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(path, &raw, "eos_token_id")?,
            pad_token_id: token_ids(path, &raw, "pad_token_id")?.first().copied(),
            raw,
        })
    }
}
