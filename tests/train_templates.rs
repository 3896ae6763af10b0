//! Chat templates and masks: the built-in templates render as published, assistant spans cover
//! replies and end markers only, templates from tokenizer_config.json, SmolLM2's template.

mod common;

use abf::train::data::Role;
use abf::train::examples::encode;
use abf::train::template::ChatTemplate;
use abf::train::Message;
use common::tokenizer::train_tokenizer;

// ---------------------------------------------------------------- templates and masks

fn convo() -> Vec<Message> {
    vec![
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, "Say one."),
        Message::new(Role::Assistant, "One."),
        Message::new(Role::User, "Say two."),
        Message::new(Role::Assistant, "Two."),
    ]
}

#[test]
fn builtin_templates_render_as_published() {
    let chatml = ChatTemplate::builtin("chatml").unwrap();
    let text = chatml.render(&convo(), false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay one.<|im_end|>\n\
         <|im_start|>assistant\nOne.<|im_end|>\n<|im_start|>user\nSay two.<|im_end|>\n\
         <|im_start|>assistant\nTwo.<|im_end|>\n"
    );
    let llama = ChatTemplate::builtin("llama-2").unwrap();
    let text = llama.render(&convo(), false).unwrap();
    assert_eq!(
        text,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nSay one. [/INST] One. </s><s>[INST] Say two. [/INST] Two. </s>"
    );
    // raise_exception works (roles must alternate)
    let bad = vec![Message::new(Role::User, "a"), Message::new(Role::User, "b")];
    let err = llama.render(&bad, false).unwrap_err().to_string();
    assert!(err.contains("alternate"), "{err}");
    assert!(ChatTemplate::builtin("vicuna").is_err());
}

#[test]
fn assistant_spans_cover_replies_and_end_markers_only() {
    let chatml = ChatTemplate::builtin("chatml").unwrap();
    let r = chatml.render_with_spans(&convo()).unwrap();
    let spans: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, vec!["One.<|im_end|>\n", "Two.<|im_end|>\n"]);
    let llama = ChatTemplate::builtin("llama-2").unwrap();
    let r = llama.render_with_spans(&convo()).unwrap();
    let spans: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, vec![" One. </s>", " Two. </s>"]);
}

#[test]
fn template_from_tokenizer_config_with_python_methods() {
    let dir = tempfile::tempdir().unwrap();
    // pycompat string methods, loop variables, namespace and raise_exception, as HF templates use
    let cfg = serde_json::json!({
        "bos_token": {"content": "<s>"},
        "eos_token": "</s>",
        "chat_template": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}{{ bos_token if loop.first else '' }}{{ m['role'].upper() }}: {{ m['content'].strip() }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    });
    let p = dir.path().join("tokenizer_config.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&p).unwrap();
    let msgs = vec![
        Message::new(Role::User, "  hi "),
        Message::new(Role::Assistant, "yo"),
    ];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<s>USER: hi\nASSISTANT: yo</s>\n"
    );
    let err = t
        .render(&[Message::new(Role::System, "s")], false)
        .unwrap_err();
    assert!(err.to_string().contains("bad role"), "{err}");
    // no template: a clear error naming the file
    std::fs::write(&p, "{}").unwrap();
    let err = ChatTemplate::from_tokenizer_config(&p)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("chat_template"),
        "{err}"
    );
}

#[test]
fn mask_positions_match_the_rendered_assistant_text() {
    let tok = train_tokenizer(400);
    for name in ["chatml", "llama-2"] {
        let t = ChatTemplate::builtin(name).unwrap();
        let enc = encode(&tok, &t, &convo()).unwrap();
        let r = t.render_with_spans(&convo()).unwrap();
        // the text under each run of masked tokens (by the tokenizer's own offsets) is exactly
        // one assistant span: reply and end marker, no header
        let offsets = tok
            .encode(r.text.as_str(), false)
            .unwrap()
            .get_offsets()
            .to_vec();
        assert_eq!(offsets.len(), enc.example.len());
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut open = false;
        for (i, m) in enc.example.mask.iter().enumerate() {
            if *m && !open {
                runs.push((offsets[i].0, offsets[i].1));
            } else if *m {
                runs.last_mut().unwrap().1 = offsets[i].1;
            }
            open = *m;
        }
        let got: Vec<&str> = runs.iter().map(|&(a, b)| &r.text[a..b]).collect();
        let expected: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
        assert_eq!(got, expected, "{name}");
        let want = if name == "chatml" {
            vec!["One.<|im_end|>\n", "Two.<|im_end|>\n"]
        } else {
            vec![" One. </s>", " Two. </s>"]
        };
        assert_eq!(got, want, "{name}");
    }
}

/// SmolLM2-135M-Instruct's `chat_template` (as stored in its GGUF's `tokenizer.chat_template`):
/// it adds a default system prompt when the conversation has none, which the incremental spans
/// must survive.
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn smollm2_template_spans() {
    let t = ChatTemplate::new(SMOLLM2_TEMPLATE, "smollm2", "", "<|im_end|>").unwrap();
    let msgs = &convo()[1..];
    let r = t.render_with_spans(msgs).unwrap();
    assert!(r
        .text
        .starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
    let spans: Vec<&str> = r.assistant.iter().map(|s| &r.text[s.clone()]).collect();
    assert_eq!(spans, vec!["One.<|im_end|>\n", "Two.<|im_end|>\n"]);
    // with a system message of its own, no default is added
    let r = t.render_with_spans(&convo()).unwrap();
    assert!(r
        .text
        .starts_with("<|im_start|>system\nBe brief.<|im_end|>"));
}
