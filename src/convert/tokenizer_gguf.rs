//! tokenizer.json + tokenizer_config.json <-> `tokenizer.ggml.*`.
//!
//! Two tokenizer models, as llama.cpp reads them (`src/llama-vocab.cpp`):
//! - `gpt2`: byte-level BPE. Tokens are the BPE vocabulary in id order, merges as `"a b"`,
//!   `tokenizer.ggml.pre` names the pre-tokenizer regex set. We recognise the pre-tokenizer by
//!   its configuration (the `pre_tokenizer` block of tokenizer.json, canonicalised) against
//!   [`PRE_TOKENIZERS`]; llama.cpp's Python converter instead hashes the token ids of a fixed
//!   text, which tells apart models whose pre-tokenizers are identical and so tokenize the same.
//!   `--tokenizer-pre` overrides.
//! - `llama`: SentencePiece-style (BPE with byte fallback, or Unigram). Tokens with scores and
//!   types (byte tokens `<0xXX>` are BYTE). A BPE vocabulary has no scores: we give a token made
//!   by merge rank `r` the score `-r` (llama.cpp's SPM tokenizer merges the highest-scoring pair
//!   first, so the merge order is kept) and other tokens 0. Back from GGUF, the merges are
//!   rebuilt from the scores as transformers' `LlamaConverter` does: every split of a token into
//!   two vocabulary pieces, ordered by the merged token's score.
//!
//! Token types are llama.cpp's `llama_token_type`: NORMAL 1, UNKNOWN 2, CONTROL 3,
//! USER_DEFINED 4, UNUSED 5, BYTE 6. Ids missing from the vocabulary up to the model's
//! `vocab_size` become `[PAD{id}]` UNUSED tokens, as llama.cpp's converter writes them.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value as Json};

use super::error::ConvertError;
use crate::checkpoint::tokenizer::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};
use crate::checkpoint::TokenizerConfig;
use crate::gguf::keys::tokenizer as tk;
use crate::gguf::{Array, Metadata, Value};

pub const TYPE_NORMAL: i32 = 1;
pub const TYPE_UNKNOWN: i32 = 2;
pub const TYPE_CONTROL: i32 = 3;
pub const TYPE_USER_DEFINED: i32 = 4;
pub const TYPE_UNUSED: i32 = 5;
pub const TYPE_BYTE: i32 = 6;

pub const MODEL_GPT2: &str = "gpt2";
pub const MODEL_LLAMA: &str = "llama";

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_bytes(regex: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false)
    ]})
}

/// The byte-level pre-tokenizers we name: (`tokenizer.ggml.pre`, tokenizer.json
/// `pre_tokenizer`). Each runs the same regex set as llama.cpp's `llama_vocab` for that name.
/// `smollm` (llama.cpp also has `starcoder` and `refact` with the same regexes) is digits one by
/// one, then GPT-2's regex.
pub fn pre_tokenizer_json(name: &str) -> Option<Json> {
    Some(match name {
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]}),
        "gpt-2" => byte_level(true),
        "llama-bpe" => split_then_bytes(LLAMA3_REGEX),
        "qwen2" => split_then_bytes(QWEN2_REGEX),
        _ => return None,
    })
}

/// Names tried, in order, when recognising a tokenizer.json pre-tokenizer (first match wins).
pub const PRE_TOKENIZERS: &[&str] = &["smollm", "gpt-2", "llama-bpe", "qwen2"];

/// The parts of a pre-tokenizer that change its splits, as one string (offsets and other
/// bookkeeping fields dropped).
fn canonical(v: &Json) -> String {
    let ty = v.get("type").and_then(Json::as_str).unwrap_or("?");
    let b = |k: &str| v.get(k).and_then(Json::as_bool).unwrap_or(false);
    match ty {
        "Sequence" => {
            let items = v
                .get("pretokenizers")
                .and_then(Json::as_array)
                .map(|a| a.iter().map(canonical).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            format!("Sequence[{items}]")
        }
        "ByteLevel" => {
            // use_regex defaults to true in the tokenizers crate
            let re = v.get("use_regex").and_then(Json::as_bool).unwrap_or(true);
            format!("ByteLevel({},{re})", b("add_prefix_space"))
        }
        "Digits" => format!("Digits({})", b("individual_digits")),
        "Split" => {
            let pat = v.get("pattern").map(|p| p.to_string()).unwrap_or_default();
            let behavior = v.get("behavior").and_then(Json::as_str).unwrap_or("?");
            format!("Split({pat},{behavior},{})", b("invert"))
        }
        other => format!("{other}:{v}"),
    }
}

/// The `tokenizer.ggml.pre` name of a tokenizer.json pre-tokenizer, if we know it.
pub fn recognise_pre(pre_tokenizer: &Json) -> Option<&'static str> {
    let c = canonical(pre_tokenizer);
    PRE_TOKENIZERS.iter().copied().find(|name| {
        pre_tokenizer_json(name)
            .map(|j| canonical(&j) == c)
            .unwrap_or(false)
    })
}

/// A GGUF vocabulary: everything `tokenizer.ggml.*` holds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GgufVocab {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<Vec<u8>>,
    pub scores: Option<Vec<f32>>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub chat_template: Option<String>,
}

fn tok_err(path: &Path, reason: impl Into<String>) -> ConvertError {
    ConvertError::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_json(path: &Path) -> Result<Json, ConvertError> {
    let bytes = std::fs::read(path).map_err(|e| tok_err(path, e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| tok_err(path, format!("malformed JSON: {e}")))
}

/// Whether an added-token-free BPE token is a SentencePiece byte token `<0xXX>`.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether the template post-processor puts a special token first (transformers' add_bos).
fn post_processor_adds_first(pp: &Json) -> bool {
    let single = match pp.get("type").and_then(Json::as_str) {
        Some("TemplateProcessing") => pp.get("single"),
        Some("Sequence") => {
            return pp
                .get("processors")
                .and_then(Json::as_array)
                .is_some_and(|a| a.iter().any(post_processor_adds_first))
        }
        _ => None,
    };
    single
        .and_then(Json::as_array)
        .and_then(|a| a.first())
        .is_some_and(|first| first.get("SpecialToken").is_some())
}

/// The tokens of tokenizer.json's `model`: id -> (text, score), the BPE merges, and whether it
/// is SentencePiece-style (`llama` in GGUF) rather than byte-level BPE (`gpt2`).
struct ModelTokens {
    entries: HashMap<u32, (String, f32)>,
    merges: Vec<(String, String)>,
    spm: bool,
}

/// Read the tokens of a `BPE` or `Unigram` model.
fn model_tokens(
    path: &Path,
    tj: &Json,
    model: &Json,
    mtype: &str,
) -> Result<ModelTokens, ConvertError> {
    let byte_fallback = model
        .get("byte_fallback")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    match mtype {
        "BPE" => {
            let mut entries = HashMap::new();
            let vocab = model
                .get("vocab")
                .and_then(Json::as_object)
                .ok_or_else(|| tok_err(path, "model.vocab is not an object"))?;
            for (t, id) in vocab {
                let id = id
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| tok_err(path, format!("token {t:?}: bad id {id}")))?;
                entries.insert(id, (t.clone(), 0.0));
            }
            let merges = bpe_merges(path, model)?;
            let has_byte_level = tj
                .get("pre_tokenizer")
                .map(|p| canonical(p).contains("ByteLevel"))
                .unwrap_or(false)
                || tj
                    .get("decoder")
                    .and_then(|d| d.get("type"))
                    .and_then(Json::as_str)
                    == Some("ByteLevel");
            Ok(ModelTokens {
                entries,
                merges,
                spm: byte_fallback || !has_byte_level,
            })
        }
        "Unigram" => {
            let mut entries = HashMap::new();
            let vocab = model
                .get("vocab")
                .and_then(Json::as_array)
                .ok_or_else(|| tok_err(path, "model.vocab is not an array"))?;
            for (i, e) in vocab.iter().enumerate() {
                let (t, s) = match e.as_array().map(Vec::as_slice) {
                    Some([t, s]) => (t.as_str(), s.as_f64()),
                    _ => (None, None),
                };
                let (t, s) = t
                    .zip(s)
                    .ok_or_else(|| tok_err(path, format!("vocab entry {i}: {e}")))?;
                entries.insert(i as u32, (t.to_string(), s as f32));
            }
            Ok(ModelTokens {
                entries,
                merges: Vec::new(),
                spm: true,
            })
        }
        other => Err(tok_err(
            path,
            format!("tokenizer model {other:?} is not supported (BPE or Unigram)"),
        )),
    }
}

/// A BPE model's merges, each `"a b"` or `["a", "b"]`.
fn bpe_merges(path: &Path, model: &Json) -> Result<Vec<(String, String)>, ConvertError> {
    let mut merges = Vec::new();
    for (i, m) in model
        .get("merges")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        let pair = match m {
            Json::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            Json::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                _ => None,
            },
            _ => None,
        };
        let pair = pair.ok_or_else(|| tok_err(path, format!("merge {i}: {m}")))?;
        merges.push(pair);
    }
    Ok(merges)
}

/// tokenizer.json's added tokens override or extend `entries`; returns id -> special.
fn added_tokens(
    path: &Path,
    tj: &Json,
    entries: &mut HashMap<u32, (String, f32)>,
) -> Result<HashMap<u32, bool>, ConvertError> {
    let mut added: HashMap<u32, bool> = HashMap::new();
    for a in tj
        .get("added_tokens")
        .and_then(Json::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let id = a
            .get("id")
            .and_then(Json::as_u64)
            .and_then(|i| u32::try_from(i).ok());
        let content = a.get("content").and_then(Json::as_str);
        let (Some(id), Some(content)) = (id, content) else {
            return Err(tok_err(path, format!("added token {a}")));
        };
        let special = a.get("special").and_then(Json::as_bool).unwrap_or(false);
        entries.entry(id).or_insert((content.to_string(), 0.0)).0 = content.to_string();
        added.insert(id, special);
    }
    Ok(added)
}

/// The GGUF token arrays for ids `0..n`: texts, types and scores; ids without a token become
/// `[PAD<id>]`. Also returns how many were padded.
struct TokenArrays {
    tokens: Vec<Vec<u8>>,
    types: Vec<i32>,
    scores: Vec<f32>,
    padded: usize,
}

fn token_arrays(
    m: &ModelTokens,
    added: &HashMap<u32, bool>,
    n: usize,
    is_bpe: bool,
    unk_text: Option<&str>,
) -> TokenArrays {
    let spm = m.spm;
    // BPE scores for SentencePiece-style use: -(merge rank) for merged tokens
    let mut merge_score: HashMap<String, f32> = HashMap::new();
    if spm && is_bpe {
        for (r, (a, b)) in m.merges.iter().enumerate() {
            merge_score.entry(format!("{a}{b}")).or_insert(-(r as f32));
        }
    }
    let mut out = TokenArrays {
        tokens: Vec::with_capacity(n),
        types: Vec::with_capacity(n),
        scores: Vec::with_capacity(n),
        padded: 0,
    };
    for id in 0..n as u32 {
        match m.entries.get(&id) {
            Some((t, s)) => {
                let ty = match added.get(&id) {
                    Some(true) => TYPE_CONTROL,
                    Some(false) => TYPE_USER_DEFINED,
                    None if spm && Some(t.as_str()) == unk_text => TYPE_UNKNOWN,
                    None if spm && is_byte_token(t) => TYPE_BYTE,
                    None => TYPE_NORMAL,
                };
                let score = if is_bpe {
                    merge_score.get(t).copied().unwrap_or(0.0)
                } else {
                    *s
                };
                out.tokens.push(t.as_bytes().to_vec());
                out.types.push(ty);
                out.scores.push(score);
            }
            None => {
                out.padded += 1;
                out.tokens.push(format!("[PAD{id}]").into_bytes());
                out.types.push(TYPE_UNUSED);
                out.scores.push(0.0);
            }
        }
    }
    out
}

/// `tokenizer.ggml.pre` of a byte-level tokenizer: the override, or the recognised
/// pre-tokenizer (an error naming the known ones when it is not recognised).
fn pre_name(path: &Path, tj: &Json, pre_override: Option<&str>) -> Result<String, ConvertError> {
    Ok(match pre_override {
        Some(p) => p.to_string(),
        None => {
            let p = tj.get("pre_tokenizer").unwrap_or(&Json::Null);
            recognise_pre(p)
                .ok_or_else(|| {
                    tok_err(
                        path,
                        format!(
                            "unrecognised pre-tokenizer {}; pass --tokenizer-pre NAME \
                             (known: {})",
                            canonical(p),
                            PRE_TOKENIZERS.join(", ")
                        ),
                    )
                })?
                .to_string()
        }
    })
}

/// Read the vocabulary of a model directory (tokenizer.json and, when present,
/// tokenizer_config.json). `vocab_size` is the embedding's row count; `config_ids` the
/// config.json bos/eos ids used when tokenizer_config.json names none. Returns notes.
pub fn vocab_from_dir(
    dir: &Path,
    vocab_size: usize,
    config_ids: (Option<u32>, Option<u32>),
    pre_override: Option<&str>,
) -> Result<(GgufVocab, Vec<String>), ConvertError> {
    let path = dir.join(TOKENIZER_FILE);
    let tj = read_json(&path)?;
    let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
    let cfg = if cfg_path.is_file() {
        TokenizerConfig::read(&cfg_path)?
    } else {
        TokenizerConfig::default()
    };
    let mut notes = Vec::new();
    let model = tj
        .get("model")
        .ok_or_else(|| tok_err(&path, "no \"model\""))?;
    let mtype = model.get("type").and_then(Json::as_str).unwrap_or("BPE");
    let mut mt = model_tokens(&path, &tj, model, mtype)?;
    let added = added_tokens(&path, &tj, &mut mt.entries)?;
    let max_id = mt
        .entries
        .keys()
        .copied()
        .max()
        .map(|m| m as usize + 1)
        .unwrap_or(0);
    let n = max_id.max(vocab_size);
    if max_id > vocab_size {
        notes.push(format!(
            "tokenizer has {max_id} ids, more than the embedding's {vocab_size} rows"
        ));
    }
    let unk_text = model.get("unk_token").and_then(Json::as_str);
    let spm = mt.spm;
    let arrays = token_arrays(&mt, &added, n, mtype == "BPE", unk_text);
    if arrays.padded > 0 {
        notes.push(format!(
            "{} vocabulary ids without a token written as [PAD<id>]",
            arrays.padded
        ));
    }
    let tokens = arrays.tokens;
    let id_of = |text: &Option<String>| -> Option<u32> {
        let text = text.as_deref()?;
        tokens
            .iter()
            .position(|t| t == text.as_bytes())
            .map(|i| i as u32)
    };
    let pre = if spm {
        None
    } else {
        Some(pre_name(&path, &tj, pre_override)?)
    };
    let add_bos = cfg.add_bos_token.or_else(|| {
        tj.get("post_processor")
            .filter(|p| !p.is_null())
            .map(post_processor_adds_first)
    });
    let vocab = GgufVocab {
        model: if spm { MODEL_LLAMA } else { MODEL_GPT2 }.to_string(),
        pre,
        scores: spm.then_some(arrays.scores),
        merges: if spm {
            Vec::new()
        } else {
            mt.merges.iter().map(|(a, b)| format!("{a} {b}")).collect()
        },
        bos: id_of(&cfg.bos_token).or(config_ids.0),
        eos: id_of(&cfg.eos_token).or(config_ids.1),
        unk: id_of(&cfg.unk_token).or_else(|| id_of(&unk_text.map(str::to_string))),
        pad: id_of(&cfg.pad_token),
        add_bos,
        add_eos: cfg.add_eos_token,
        chat_template: cfg.chat_template.clone(),
        tokens,
        token_types: arrays.types,
    };
    Ok((vocab, notes))
}

impl GgufVocab {
    /// Write the `tokenizer.*` keys.
    pub fn write(&self, meta: &mut Metadata) {
        meta.set(tk::MODEL, Value::string(&self.model));
        if let Some(p) = &self.pre {
            meta.set(tk::PRE, Value::string(p));
        }
        meta.set(tk::TOKENS, Value::Array(Array::String(self.tokens.clone())));
        if let Some(s) = &self.scores {
            meta.set(tk::SCORES, Value::Array(Array::F32(s.clone())));
        }
        meta.set(
            tk::TOKEN_TYPE,
            Value::Array(Array::I32(self.token_types.clone())),
        );
        if !self.merges.is_empty() {
            let m = self.merges.iter().map(|s| s.as_bytes().to_vec()).collect();
            meta.set(tk::MERGES, Value::Array(Array::String(m)));
        }
        for (k, v) in [
            (tk::BOS_TOKEN_ID, self.bos),
            (tk::EOS_TOKEN_ID, self.eos),
            (tk::UNKNOWN_TOKEN_ID, self.unk),
            (tk::PADDING_TOKEN_ID, self.pad),
        ] {
            if let Some(id) = v {
                meta.set(k, Value::U32(id));
            }
        }
        for (k, v) in [
            (tk::ADD_BOS_TOKEN, self.add_bos),
            (tk::ADD_EOS_TOKEN, self.add_eos),
        ] {
            if let Some(b) = v {
                meta.set(k, Value::Bool(b));
            }
        }
        if let Some(t) = &self.chat_template {
            meta.set(tk::CHAT_TEMPLATE, Value::string(t));
        }
    }

    /// Read the `tokenizer.*` keys of a GGUF (None when it has no vocabulary).
    pub fn read(meta: &Metadata) -> Result<Option<GgufVocab>, ConvertError> {
        let bad = |key: &str, reason: &str| ConvertError::Key {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let Some(model) = meta.get_str(tk::MODEL)? else {
            return Ok(None);
        };
        let tokens = match meta.get(tk::TOKENS) {
            Some(Value::Array(Array::String(v))) => v.clone(),
            _ => return Err(bad(tk::TOKENS, "missing or not an array of strings")),
        };
        let n = tokens.len();
        let token_types = match meta.get(tk::TOKEN_TYPE) {
            Some(Value::Array(Array::I32(v))) if v.len() == n => v.clone(),
            Some(Value::Array(Array::U32(v))) if v.len() == n => {
                v.iter().map(|&x| x as i32).collect()
            }
            None => vec![TYPE_NORMAL; n],
            _ => {
                return Err(bad(
                    tk::TOKEN_TYPE,
                    "not an i32 array as long as the tokens",
                ))
            }
        };
        let scores = match meta.get(tk::SCORES) {
            Some(Value::Array(Array::F32(v))) if v.len() == n => Some(v.clone()),
            None => None,
            _ => return Err(bad(tk::SCORES, "not an f32 array as long as the tokens")),
        };
        let merges = match meta.get(tk::MERGES) {
            Some(Value::Array(Array::String(v))) => v
                .iter()
                .map(|m| {
                    String::from_utf8(m.clone())
                        .map_err(|_| bad(tk::MERGES, "a merge is not UTF-8"))
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
            _ => return Err(bad(tk::MERGES, "not an array of strings")),
        };
        let id = |k: &str| -> Result<Option<u32>, ConvertError> {
            match meta.get(k) {
                None => Ok(None),
                Some(v) => match v.as_u64().and_then(|x| u32::try_from(x).ok()) {
                    Some(x) if (x as usize) < n => Ok(Some(x)),
                    _ => Err(bad(k, "not a token id of the vocabulary")),
                },
            }
        };
        let flag = |k: &str| match meta.get(k) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        Ok(Some(GgufVocab {
            model: model.to_string(),
            pre: meta.get_str(tk::PRE)?.map(str::to_string),
            tokens,
            scores,
            token_types,
            merges,
            bos: id(tk::BOS_TOKEN_ID)?,
            eos: id(tk::EOS_TOKEN_ID)?,
            unk: id(tk::UNKNOWN_TOKEN_ID)?,
            pad: id(tk::PADDING_TOKEN_ID)?,
            add_bos: flag(tk::ADD_BOS_TOKEN),
            add_eos: flag(tk::ADD_EOS_TOKEN),
            chat_template: meta.get_str(tk::CHAT_TEMPLATE)?.map(str::to_string),
        }))
    }

    fn text(&self, id: u32) -> Option<String> {
        self.tokens
            .get(id as usize)
            .map(|t| String::from_utf8_lossy(t).into_owned())
    }

    /// Rebuild tokenizer.json and tokenizer_config.json. Returns (tokenizer.json,
    /// tokenizer_config.json, notes).
    pub fn to_hf(&self) -> Result<(Json, Json, Vec<String>), ConvertError> {
        let mut notes = Vec::new();
        let (vocab, added) = self.hf_vocab(&mut notes)?;
        let tokenizer = self.tokenizer_json(vocab, added)?;
        Ok((tokenizer, self.tokenizer_config(), notes))
    }

    /// tokenizer.json's `model.vocab` (text -> first id) and `added_tokens` (control and
    /// user-defined tokens); notes texts that repeat.
    fn hf_vocab(
        &self,
        notes: &mut Vec<String>,
    ) -> Result<(Map<String, Json>, Vec<Json>), ConvertError> {
        let bad = |reason: String| ConvertError::Key {
            key: tk::TOKENS.to_string(),
            reason,
        };
        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let text =
                String::from_utf8(t.clone()).map_err(|_| bad(format!("token {i} is not UTF-8")))?;
            let ty = self.token_types.get(i).copied().unwrap_or(TYPE_NORMAL);
            if ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED {
                added.push(json!({
                    "id": i, "content": text, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": ty == TYPE_USER_DEFINED,
                    "special": ty == TYPE_CONTROL,
                }));
            }
            if vocab.contains_key(&text) {
                notes.push(format!("token {i} repeats {text:?}: only the first id is kept in tokenizer.json's vocab"));
                continue;
            }
            vocab.insert(text, json!(i));
        }
        Ok((vocab, added))
    }

    /// The post-processor: BOS first when the GGUF adds it, else byte-level offsets for a
    /// byte-level tokenizer, else none.
    fn post_processor(&self, byte_level: bool) -> Json {
        let bos_first = self.add_bos == Some(true) && self.bos.is_some();
        match (bos_first, self.bos.and_then(|b| self.text(b))) {
            (true, Some(bos)) => {
                let b = self.bos.unwrap_or(0);
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {bos.clone(): {"id": bos, "ids": [b], "tokens": [bos]}}})
            }
            _ if byte_level => {
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
            }
            _ => Json::Null,
        }
    }

    /// tokenizer.json for the GGUF's tokenizer model (gpt2: byte-level BPE; llama: SentencePiece
    /// BPE with byte fallback).
    fn tokenizer_json(
        &self,
        vocab: Map<String, Json>,
        added: Vec<Json>,
    ) -> Result<Json, ConvertError> {
        Ok(match self.model.as_str() {
            MODEL_GPT2 => {
                let pre_name = self.pre.as_deref().unwrap_or("gpt-2");
                let pre = pre_tokenizer_json(pre_name).ok_or_else(|| ConvertError::Key {
                    key: tk::PRE.to_string(),
                    reason: format!(
                        "pre-tokenizer {pre_name:?} has no tokenizer.json form here (known: {})",
                        PRE_TOKENIZERS.join(", ")
                    ),
                })?;
                json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added, "normalizer": null, "pre_tokenizer": pre,
                    "post_processor": self.post_processor(true),
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null,
                        "continuing_subword_prefix": null, "end_of_word_suffix": null,
                        "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                        "vocab": vocab, "merges": self.merges}
                })
            }
            MODEL_LLAMA => {
                let merges = self.spm_merges(&vocab);
                json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added,
                    "normalizer": {"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "\u{2581}"},
                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
                    "pre_tokenizer": null,
                    "post_processor": self.post_processor(false),
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"},
                        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                    "model": {"type": "BPE", "dropout": null,
                        "unk_token": self.unk.and_then(|u| self.text(u)),
                        "continuing_subword_prefix": null, "end_of_word_suffix": null,
                        "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                        "vocab": vocab, "merges": merges}
                })
            }
            other => {
                return Err(ConvertError::Key {
                    key: tk::MODEL.to_string(),
                    reason: format!("tokenizer model {other:?} is not supported (gpt2 or llama)"),
                })
            }
        })
    }

    /// tokenizer_config.json: the special tokens' texts, the add-BOS/EOS flags, the template.
    fn tokenizer_config(&self) -> Json {
        let mut cfg = Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        for (k, id) in [
            ("bos_token", self.bos),
            ("eos_token", self.eos),
            ("unk_token", self.unk),
            ("pad_token", self.pad),
        ] {
            if let Some(t) = id.and_then(|i| self.text(i)) {
                cfg.insert(k.into(), json!(t));
            }
        }
        if let Some(b) = self.add_bos {
            cfg.insert("add_bos_token".into(), json!(b));
        }
        if let Some(b) = self.add_eos {
            cfg.insert("add_eos_token".into(), json!(b));
        }
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        Json::Object(cfg)
    }

    /// SentencePiece-style merges from scores (transformers `SentencePieceExtractor`): every
    /// split of a normal token into two vocabulary pieces, by the merged token's score, highest
    /// first (ties by the token's id, then the left piece's length).
    fn spm_merges(&self, vocab: &Map<String, Json>) -> Vec<String> {
        let scores = self.scores.as_deref().unwrap_or(&[]);
        let mut found: Vec<(f32, usize, usize, String)> = Vec::new();
        for (id, t) in self.tokens.iter().enumerate() {
            if self.token_types.get(id).copied().unwrap_or(TYPE_NORMAL) != TYPE_NORMAL {
                continue;
            }
            let Ok(text) = std::str::from_utf8(t) else {
                continue;
            };
            let score = scores.get(id).copied().unwrap_or(0.0);
            for (k, _) in text.char_indices().skip(1) {
                let (a, b) = text.split_at(k);
                if vocab.contains_key(a) && vocab.contains_key(b) {
                    found.push((score, id, k, format!("{a} {b}")));
                }
            }
        }
        found.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        found.into_iter().map(|f| f.3).collect()
    }
}
