//! The test tokenizers: a hand-written byte-level BPE (SmolLM2's pre-tokenizer, 4 merges) and a
//! byte-level BPE trained on the conversation fixture (no downloads).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Map, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
pub fn byte_chars() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

/// Byte-level BPE tokenizer.json: 256 byte tokens, four merges, one special token; its
/// pre-tokenizer is SmolLM2's (digits one by one, then GPT-2's regex).
pub fn tokenizer_json() -> Value {
    let chars = byte_chars();
    let mut vocab = Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    let merges = [("h", "e"), ("\u{120}", "t"), ("\u{120}t", "he"), ("l", "l")];
    let mut id = 256;
    for (a, b) in merges {
        vocab.insert(format!("{a}{b}"), json!(id));
        id += 1;
    }
    let special = id; // 260
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": special, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    })
}

/// Special tokens the built-in templates spell out.
pub const SPECIALS: &[&str] = &["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"];

/// A byte-level BPE tokenizer of `vocab` entries trained on the fixture's text (no downloads).
pub fn train_tokenizer(vocab: usize) -> Tokenizer {
    let text = std::fs::read_to_string(super::data::conversations()).expect("fixture");
    let mut corpus = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for t in v["conversations"].as_array().unwrap() {
            corpus.push(t["value"].as_str().unwrap().to_string());
        }
    }
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default()));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tok.train(&mut trainer, corpus.into_iter())
        .expect("train bpe");
    let _ = tok.add_special_tokens(specials);
    tok
}

/// Save a tokenizer.json into `dir`.
pub fn save_tokenizer(tok: &Tokenizer, dir: &Path) -> PathBuf {
    let p = dir.join("tokenizer.json");
    tok.save(&p, false).expect("save tokenizer");
    p
}

/// `train_tokenizer(300)`, trained once per process (the evaluation tests' tokenizer).
pub fn shared_bpe() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| train_tokenizer(300))
}
