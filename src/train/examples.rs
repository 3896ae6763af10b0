//! From conversations to training examples: render with the chat template, tokenize with byte
//! offsets, mark assistant tokens, drop short conversations and split long ones at turn
//! boundaries into pieces of at most `seq_len` tokens (the paper's preprocessing, method.md).

use tokenizers::Tokenizer;

use super::data::{Conversation, Message, ParseReport, Role, SplitMix64};
use super::template::ChatTemplate;
use super::TrainError;

/// One training sequence. `mask[i]` is true when token `i` is a loss target (an assistant token):
/// the loss at position `i - 1` predicts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Number of loss targets (assistant tokens after the first position).
    pub fn targets(&self) -> usize {
        self.mask.iter().skip(1).filter(|m| **m).count()
    }
}

/// Preprocessing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepConfig {
    pub seq_len: usize,
    /// Conversations with fewer tokens than this are dropped.
    pub min_tokens: usize,
    /// Keep this many examples after a seeded shuffle (all when None).
    pub samples: Option<usize>,
    pub seed: u64,
    /// More skipped records than this is an error.
    pub max_bad_records: super::data::BadRecordLimit,
}

/// What preprocessing did, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrepReport {
    pub conversations: usize,
    /// Conversations the template refused (counted with the parse skips).
    pub render_failed: usize,
    pub dropped_short: usize,
    /// Conversations longer than `seq_len`, split at turn boundaries.
    pub split: usize,
    /// Pieces whose single exchange exceeded `seq_len` and was cut.
    pub truncated: usize,
    /// Pieces with no assistant token left.
    pub dropped_no_target: usize,
    /// Examples before `--samples`.
    pub pieces: usize,
    pub kept: usize,
    pub tokens: usize,
    pub target_tokens: usize,
}

/// A conversation encoded whole: its tokens, mask and the token index where each message starts.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub example: Example,
    pub message_starts: Vec<usize>,
    pub text: String,
}

/// Render and tokenize one list of messages, marking assistant tokens.
pub fn encode(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<Encoded, TrainError> {
    let rendered = template.render_with_spans(messages)?;
    // Templates spell out the special tokens (bos, end-of-turn) themselves; transformers'
    // apply_chat_template tokenizes with add_special_tokens=False for the same reason.
    let enc = tokenizer
        .encode(rendered.text.as_str(), false)
        .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    let tokens = enc.get_ids().to_vec();
    let offsets = enc.get_offsets();
    let mask = offsets
        .iter()
        .map(|&(s, _)| rendered.assistant.iter().any(|r| r.contains(&s)))
        .collect();
    let message_starts = rendered
        .message_starts
        .iter()
        .map(|&b| {
            offsets
                .iter()
                .position(|&(s, _)| s >= b)
                .unwrap_or(tokens.len())
        })
        .collect();
    Ok(Encoded {
        example: Example { tokens, mask },
        message_starts,
        text: rendered.text,
    })
}

/// A piece of a conversation: its system message (if any) and messages `from..to`.
fn piece(conv: &Conversation, from: usize, to: usize) -> Vec<Message> {
    let mut m: Vec<Message> = conv.system().cloned().into_iter().collect();
    m.extend_from_slice(&conv.messages[from..to]);
    m
}

/// Turn the conversations into examples. Conversations the template rejects are skipped and
/// counted into `parse` (with their reason).
pub fn prepare(
    conversations: &[Conversation],
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    cfg: &PrepConfig,
    parse: &mut ParseReport,
) -> Result<(Vec<Example>, PrepReport), TrainError> {
    let mut report = PrepReport {
        conversations: conversations.len(),
        ..PrepReport::default()
    };
    let mut out = Vec::new();
    for conv in conversations {
        let full = match encode(tokenizer, template, &conv.messages) {
            Ok(e) => e,
            Err(TrainError::Template { reason, .. }) => {
                report.render_failed += 1;
                parse.skip(
                    super::data::TEMPLATE_REFUSED,
                    format!("{}: chat template: {reason}", conv.id),
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        if full.example.len() < cfg.min_tokens {
            report.dropped_short += 1;
            continue;
        }
        let mut pieces = Vec::new();
        if full.example.len() <= cfg.seq_len {
            pieces.push(full.example);
        } else {
            report.split += 1;
            split(
                conv,
                &full,
                tokenizer,
                template,
                cfg.seq_len,
                &mut pieces,
                &mut report,
            )?;
        }
        for p in pieces {
            if p.targets() == 0 {
                report.dropped_no_target += 1;
            } else {
                out.push(p);
            }
        }
    }
    report.pieces = out.len();
    if let Some(n) = cfg.samples {
        let mut rng = SplitMix64(cfg.seed);
        rng.shuffle(&mut out);
        out.truncate(n);
    }
    report.kept = out.len();
    report.tokens = out.iter().map(Example::len).sum();
    report.target_tokens = out.iter().map(Example::targets).sum();
    Ok((out, report))
}

/// Greedy split at user-turn boundaries: estimate each piece's length from the whole render's
/// token positions, then render the piece for real and shrink it until it fits.
fn split(
    conv: &Conversation,
    full: &Encoded,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    seq_len: usize,
    pieces: &mut Vec<Example>,
    report: &mut PrepReport,
) -> Result<(), TrainError> {
    let body = conv.body_start();
    let n = conv.messages.len();
    let users: Vec<usize> = (body..n)
        .filter(|&i| conv.messages[i].role == Role::User)
        .collect();
    let tok_at = |msg: usize| {
        if msg >= n {
            full.example.len()
        } else {
            full.message_starts[msg]
        }
    };
    // Tokens before the first user message (bos, system prompt) repeat in every piece.
    let header = tok_at(users[0]);
    let mut a = 0;
    while a < users.len() {
        let start = tok_at(users[a]);
        let mut b = a + 1;
        while b < users.len() && tok_at(users[b]) - start + header <= seq_len {
            b += 1;
        }
        if b > a + 1 && tok_at(users.get(b).copied().unwrap_or(n)) - start + header > seq_len {
            b -= 1;
        }
        loop {
            let end = users.get(b).copied().unwrap_or(n);
            let enc = encode(tokenizer, template, &piece(conv, users[a], end))?;
            if enc.example.len() <= seq_len {
                pieces.push(enc.example);
                break;
            }
            if b == a + 1 {
                let mut ex = enc.example;
                ex.tokens.truncate(seq_len);
                ex.mask.truncate(seq_len);
                report.truncated += 1;
                pieces.push(ex);
                break;
            }
            b -= 1;
        }
        a = b;
    }
    Ok(())
}

/// Read, render, tokenize and select a data file's examples. An empty result is an error naming
/// the file, with the first skip reasons.
pub fn load_examples(
    path: &std::path::Path,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    cfg: &PrepConfig,
) -> Result<(Vec<Example>, ParseReport, PrepReport), TrainError> {
    let (convs, mut parse) = super::data::load_conversations(path)?;
    let (examples, prep) = prepare(&convs, tokenizer, template, cfg, &mut parse)?;
    super::data::check_bad_records(&parse, cfg.max_bad_records, &path.display().to_string())?;
    if examples.is_empty() {
        let mut reason = format!(
            "no training examples: {} record(s), {} skipped, {} conversation(s) under --min-tokens {}, \
             {} piece(s) without assistant tokens",
            parse.records, parse.skipped, prep.dropped_short, cfg.min_tokens, prep.dropped_no_target
        );
        for r in &parse.reasons {
            reason.push_str(&format!("; {r}"));
        }
        return Err(TrainError::Data {
            file: path.display().to_string(),
            reason,
        });
    }
    Ok((examples, parse, prep))
}
