//! Conversation data: ShareGPT (`conversations: [{from, value}]`) and OpenAI (`messages: [{role,
//! content}]`) records in JSON or JSONL, validated into alternating user/assistant turns.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::TrainError;

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The name chat templates expect (`messages[i]['role']`).
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// ShareGPT `from` and OpenAI `role` spellings, in one table.
    fn parse(s: &str) -> Option<Role> {
        const NAMES: &[(&str, Role)] = &[
            ("system", Role::System),
            ("human", Role::User),
            ("user", Role::User),
            ("gpt", Role::Assistant),
            ("assistant", Role::Assistant),
            ("chatgpt", Role::Assistant),
            ("bard", Role::Assistant),
            ("bing", Role::Assistant),
            ("model", Role::Assistant),
        ];
        let key = s.trim().to_ascii_lowercase();
        NAMES.iter().find(|(n, _)| *n == key).map(|(_, r)| *r)
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// A validated conversation: an optional system message first, then user and assistant messages
/// alternating, starting with the user and holding at least one assistant message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The record's `id` when it has one, else `record N` (1-based).
    pub id: String,
    pub messages: Vec<Message>,
}

impl Conversation {
    /// The system message, when the conversation has one.
    pub fn system(&self) -> Option<&Message> {
        self.messages.first().filter(|m| m.role == Role::System)
    }

    /// Index of the first non-system message.
    pub fn body_start(&self) -> usize {
        usize::from(self.system().is_some())
    }
}

/// How many records were read and why some were skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParseReport {
    pub records: usize,
    pub skipped: usize,
    /// The first few reasons, each naming its record.
    pub reasons: Vec<String>,
    /// Every skipped record counted by its kind of fault ([`RecordError::kind`], or
    /// [`TEMPLATE_REFUSED`]).
    pub by_kind: BTreeMap<String, usize>,
}

/// The kind of a record the chat template refused to render.
pub const TEMPLATE_REFUSED: &str = "refused by the chat template";

/// How many skip reasons a report keeps.
pub const MAX_REASONS: usize = 5;

impl ParseReport {
    pub(crate) fn skip(&mut self, kind: &str, reason: String) {
        self.skipped += 1;
        *self.by_kind.entry(kind.to_string()).or_default() += 1;
        if self.reasons.len() < MAX_REASONS {
            self.reasons.push(reason);
        }
    }
}

/// Why one data record was skipped (counted in [`ParseReport`]; a record is not fatal).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("line {line}: malformed JSON: {reason}")]
    Json { line: usize, reason: String },
    #[error("not a JSON object")]
    NotObject,
    #[error("has neither \"conversations\" nor \"messages\"")]
    NoMessageList,
    #[error("the message list is not an array")]
    NotArray,
    #[error("message {index} has no \"{key}\" string")]
    NoRole { index: usize, key: &'static str },
    #[error("message {index} has unknown role {role:?}")]
    UnknownRole { index: usize, role: String },
    #[error("message {index} has no \"{key}\"")]
    NoContent { index: usize, key: &'static str },
    #[error("message {index}: {reason}")]
    Content { index: usize, reason: &'static str },
    #[error("no user or assistant messages")]
    NoTurns,
    #[error("message {index} is {got} where {expected} was expected (roles must alternate user/assistant)")]
    Order {
        index: usize,
        got: &'static str,
        expected: &'static str,
    },
    #[error("no assistant message")]
    NoAssistant,
}

impl RecordError {
    /// The fault without the record's details: the key of [`ParseReport::by_kind`].
    pub fn kind(&self) -> &'static str {
        match self {
            RecordError::Json { .. } => "malformed JSON",
            RecordError::NotObject => "not a JSON object",
            RecordError::NoMessageList => "no message list",
            RecordError::NotArray => "message list not an array",
            RecordError::NoRole { .. } => "message without a role",
            RecordError::UnknownRole { .. } => "unknown role",
            RecordError::NoContent { .. } => "message without content",
            RecordError::Content { .. } => "unreadable message content",
            RecordError::NoTurns => "no user or assistant messages",
            RecordError::Order { .. } => "roles out of order",
            RecordError::NoAssistant => "no assistant message",
        }
    }
}

/// How many skipped (bad) records a run tolerates before it refuses the data: a count, or a
/// percentage of the records read (`--max-bad-records N` or `P%`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BadRecordLimit {
    Count(usize),
    Percent(f64),
}

impl Default for BadRecordLimit {
    /// Half the file: a few bad records are normal in scraped chat data, a file that is mostly
    /// unreadable is the wrong file or a format the parser does not read.
    fn default() -> Self {
        BadRecordLimit::Percent(50.0)
    }
}

impl BadRecordLimit {
    /// Whether `bad` skipped records of `records` read exceed the limit.
    pub fn exceeded(self, bad: usize, records: usize) -> bool {
        match self {
            BadRecordLimit::Count(n) => bad > n,
            BadRecordLimit::Percent(p) => bad as f64 > p / 100.0 * records as f64,
        }
    }
}

impl std::fmt::Display for BadRecordLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadRecordLimit::Count(n) => write!(f, "{n}"),
            BadRecordLimit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for BadRecordLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(BadRecordLimit::Percent(p)),
                _ => Err(format!("{s:?}: expected a percentage from 0% to 100%")),
            },
            None => s.parse::<usize>().map(BadRecordLimit::Count).map_err(|_| {
                format!("{s:?}: expected a count of records (like 10) or a percentage (like 5%)")
            }),
        }
    }
}

impl TryFrom<String> for BadRecordLimit {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<BadRecordLimit> for String {
    fn from(l: BadRecordLimit) -> String {
        l.to_string()
    }
}

/// Refuse the data when more records were skipped than `limit` allows: the error names the file
/// and counts the skipped records by kind, then gives the first reasons.
pub fn check_bad_records(
    report: &ParseReport,
    limit: BadRecordLimit,
    source: &str,
) -> Result<(), TrainError> {
    if !limit.exceeded(report.skipped, report.records) {
        return Ok(());
    }
    let kinds: Vec<String> = report
        .by_kind
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    let mut reason = format!(
        "{} of {} records are bad, more than --max-bad-records {limit} allows ({})",
        report.skipped,
        report.records,
        kinds.join(", ")
    );
    for r in &report.reasons {
        reason.push_str(&format!("; {r}"));
    }
    Err(TrainError::Data {
        file: source.to_string(),
        reason,
    })
}

/// Read a data file (JSON array, one JSON object, or JSONL) into conversations.
pub fn load_conversations(path: &Path) -> Result<(Vec<Conversation>, ParseReport), TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    parse_conversations(&bytes, &path.display().to_string())
}

/// Parse conversations from bytes; `source` names the file in messages. Records that do not
/// parse or validate are skipped and counted; a file that is not JSON/JSONL at all is an error.
pub fn parse_conversations(
    bytes: &[u8],
    source: &str,
) -> Result<(Vec<Conversation>, ParseReport), TrainError> {
    let text = std::str::from_utf8(bytes).map_err(|e| TrainError::Data {
        file: source.to_string(),
        reason: format!("not UTF-8: {e}"),
    })?;
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    let mut report = ParseReport::default();
    let mut out = Vec::new();
    let mut take = |value: Result<Value, RecordError>, n: usize, report: &mut ParseReport| {
        report.records += 1;
        match value.and_then(|v| record_to_conversation(&v, n)) {
            Ok(c) => out.push(c),
            Err(reason) => report.skip(reason.kind(), format!("record {n}: {reason}")),
        }
    };
    if trimmed.starts_with('[') {
        // one JSON array of records
        let all: Value = serde_json::from_str(trimmed).map_err(|e| TrainError::Data {
            file: source.to_string(),
            reason: format!(
                "malformed JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        })?;
        let items = all.as_array().map(|a| a.as_slice()).unwrap_or(&[]);
        for (i, item) in items.iter().enumerate() {
            take(Ok(item.clone()), i + 1, &mut report);
        }
    } else if let Ok(single @ Value::Object(_)) = serde_json::from_str::<Value>(trimmed) {
        // one pretty-printed record, or `{"data": [...]}`-style wrappers are not guessed at
        take(Ok(single), 1, &mut report);
    } else {
        // JSONL: one record per non-empty line
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let parsed = serde_json::from_str::<Value>(line).map_err(|e| RecordError::Json {
                line: i + 1,
                reason: e.to_string(),
            });
            take(parsed, report.records + 1, &mut report);
        }
        if report.records > 0 && report.skipped == report.records && out.is_empty() {
            // nothing on any line parsed: say so as a file error only when no line was JSON at all
            let any_json = text
                .lines()
                .any(|l| serde_json::from_str::<Value>(l.trim()).is_ok());
            if !any_json {
                return Err(TrainError::Data {
                    file: source.to_string(),
                    reason: "neither a JSON array, a JSON object nor JSON lines".to_string(),
                });
            }
        }
    }
    Ok((out, report))
}

/// Content of an OpenAI message: a string, or a list of `{type: text, text}` parts.
fn content_text(v: &Value, index: usize) -> Result<String, RecordError> {
    let bad = |reason| Err(RecordError::Content { index, reason });
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => s.push_str(t),
                    _ => return bad("content part is not {type: text, text}"),
                }
            }
            Ok(s)
        }
        Value::Null => bad("content is null"),
        _ => bad("content is not a string"),
    }
}

fn record_to_conversation(v: &Value, n: usize) -> Result<Conversation, RecordError> {
    let obj = v.as_object().ok_or(RecordError::NotObject)?;
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(x)) => x.to_string(),
        _ => format!("record {n}"),
    };
    let (list, role_key, text_key) = if let Some(c) = obj.get("conversations") {
        (c, "from", "value")
    } else if let Some(m) = obj.get("messages") {
        (m, "role", "content")
    } else {
        return Err(RecordError::NoMessageList);
    };
    let list = list.as_array().ok_or(RecordError::NotArray)?;
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m
            .get(role_key)
            .and_then(Value::as_str)
            .ok_or(RecordError::NoRole {
                index: i,
                key: role_key,
            })?;
        let role = Role::parse(role).ok_or_else(|| RecordError::UnknownRole {
            index: i,
            role: role.to_string(),
        })?;
        let content = m
            .get(text_key)
            .ok_or(RecordError::NoContent {
                index: i,
                key: text_key,
            })
            .and_then(|c| content_text(c, i))?;
        messages.push(Message { role, content });
    }
    validate(messages).map(|messages| Conversation { id, messages })
}

/// Normalize and check the turn structure. ShareGPT dumps often open with the assistant's
/// greeting; like FastChat's preprocessing, leading assistant messages are dropped.
pub fn validate(mut messages: Vec<Message>) -> Result<Vec<Message>, RecordError> {
    let sys = usize::from(messages.first().map(|m| m.role) == Some(Role::System));
    while messages.get(sys).map(|m| m.role) == Some(Role::Assistant) {
        messages.remove(sys);
    }
    if messages.len() <= sys {
        return Err(RecordError::NoTurns);
    }
    for (i, m) in messages.iter().enumerate().skip(sys) {
        let expected = if (i - sys) % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if m.role != expected {
            return Err(RecordError::Order {
                index: i,
                got: m.role.name(),
                expected: expected.name(),
            });
        }
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err(RecordError::NoAssistant);
    }
    Ok(messages)
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seeded generator whose whole state is one u64,
/// so data order is reproducible and resumable without a dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0) by rejection, without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The order of examples in `epoch`: a shuffle seeded by `(seed, epoch)`, so any step's batch is
/// known without replaying earlier epochs.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    rng.shuffle(&mut order);
    order
}
