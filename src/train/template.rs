//! Chat templates: the model's own Jinja template from `tokenizer_config.json` (rendered with
//! minijinja, configured as transformers' `apply_chat_template` is) or a named built-in, and the
//! character spans of the assistant turns found by rendering incrementally.

use std::ops::Range;
use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::{json, Value};

use super::data::{Message, Role};
use super::TrainError;

/// Llama-2-chat's template as published in its `tokenizer_config.json`.
pub const LLAMA2_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/// ChatML (`<|im_start|>role\n...<|im_end|>\n`), as used by SmolLM2 and Qwen.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The built-in templates by name: (name, source, bos, eos).
pub const BUILTIN_TEMPLATES: &[(&str, &str, &str, &str)] = &[
    ("llama-2", LLAMA2_TEMPLATE, "<s>", "</s>"),
    ("chatml", CHATML_TEMPLATE, "", "<|im_end|>"),
];

/// A chat template ready to render conversations.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (a file or a built-in name), for messages.
    pub origin: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish()
    }
}

/// `tokenizer_config.json` writes special tokens either as strings or as `{"content": ...}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// A template from source text.
    pub fn new(
        source: &str,
        origin: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, TrainError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on (ImmutableSandboxedEnvironment).
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(origin, &e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // A fixed date keeps renders reproducible (templates such as Llama 3.1's print "today").
        env.add_function("strftime_now", |_fmt: String| "26 Jul 2024".to_string());
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| template_error(origin, &e))?;
        Ok(ChatTemplate {
            env,
            origin: origin.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// A built-in template by name (`llama-2`, `chatml`).
    pub fn builtin(name: &str) -> Result<ChatTemplate, TrainError> {
        let (n, src, bos, eos) = BUILTIN_TEMPLATES
            .iter()
            .find(|(n, ..)| *n == name)
            .ok_or_else(|| TrainError::Template {
                origin: name.to_string(),
                reason: format!(
                    "unknown built-in template (expected one of {})",
                    BUILTIN_TEMPLATES
                        .iter()
                        .map(|t| t.0)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        ChatTemplate::new(src, n, bos, eos)
    }

    /// The `chat_template` of a `tokenizer_config.json` (a string, or a list of named templates
    /// of which `default` is taken), with its bos and eos tokens.
    pub fn from_tokenizer_config(path: &Path) -> Result<ChatTemplate, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let cfg: Value = serde_json::from_str(&text).map_err(|e| TrainError::Template {
            origin: path.display().to_string(),
            reason: format!("malformed JSON at line {}: {e}", e.line()),
        })?;
        let origin = path.display().to_string();
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string)
                .ok_or_else(|| TrainError::Template {
                    origin: origin.clone(),
                    reason: "chat_template list has no \"default\" entry".to_string(),
                })?,
            _ => {
                return Err(TrainError::Template {
                    origin,
                    reason: "no chat_template (name a built-in with --template llama-2|chatml)"
                        .to_string(),
                })
            }
        };
        ChatTemplate::new(
            &source,
            &origin,
            &token_text(cfg.get("bos_token")),
            &token_text(cfg.get("eos_token")),
        )
    }

    /// Render messages; `add_generation_prompt` appends the assistant header as for inference.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TrainError> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| json!({"role": m.role.name(), "content": m.content}))
            .collect();
        let ctx = json!({
            "messages": msgs,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        });
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| template_error(&self.origin, &e))?;
        tmpl.render(minijinja::Value::from(minijinja::value::Serde(ctx)))
            .map_err(|e| template_error(&self.origin, &e))
    }

    /// Render a conversation and find the text of each assistant turn: for assistant message `k`
    /// the span runs from the end of `render(messages[..k], add_generation_prompt)` to the end of
    /// `render(messages[..=k])`, so it holds the reply and its end-of-turn marker but not the
    /// header. Also returns the byte offset where each message starts (for splitting).
    pub fn render_with_spans(&self, messages: &[Message]) -> Result<Rendered, TrainError> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        let mut starts = Vec::with_capacity(messages.len());
        for k in 0..messages.len() {
            // an empty list renders as nothing (templates may index messages[0])
            let before = if k == 0 {
                String::new()
            } else {
                self.render(&messages[..k], false)?
            };
            starts.push(prefix_len(&full, &before, &self.origin, k)?);
            if messages[k].role != Role::Assistant {
                continue;
            }
            let prompt = self.render(&messages[..k], true)?;
            let with = self.render(&messages[..=k], false)?;
            let a = prefix_len(&with, &prompt, &self.origin, k)?;
            let b = prefix_len(&full, &with, &self.origin, k)?;
            spans.push(a..b);
        }
        Ok(Rendered {
            text: full,
            assistant: spans,
            message_starts: starts,
        })
    }
}

/// A rendered conversation with its assistant spans (byte ranges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub assistant: Vec<Range<usize>>,
    pub message_starts: Vec<usize>,
}

/// `prefix.len()` when `prefix` is a prefix of `whole`: the incremental-render property the
/// masks rely on.
fn prefix_len(whole: &str, prefix: &str, origin: &str, k: usize) -> Result<usize, TrainError> {
    if whole.starts_with(prefix) {
        Ok(prefix.len())
    } else {
        Err(TrainError::Template {
            origin: origin.to_string(),
            reason: format!(
                "rendering is not incremental at message {k}: the text of the first messages is not \
                 a prefix of the longer conversation's, so assistant tokens cannot be located"
            ),
        })
    }
}

fn template_error(origin: &str, e: &JinjaError) -> TrainError {
    let mut reason = e.to_string();
    if let Some(detail) = e.detail() {
        if !reason.contains(detail) {
            reason = format!("{reason}: {detail}");
        }
    }
    TrainError::Template {
        origin: origin.to_string(),
        reason,
    }
}
