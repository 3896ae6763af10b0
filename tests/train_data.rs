//! Fine-tuning data: ShareGPT/OpenAI parsing with skipped records explained, seeded epoch
//! orders, and long conversations split at turn boundaries.

mod common;

use abf::train::data::{epoch_order, parse_conversations, BadRecordLimit, Role, SplitMix64};
use abf::train::examples::{encode, prepare, PrepConfig};
use abf::train::template::ChatTemplate;
use abf::train::Message;
use common::data::conversations as fixture;
use common::tokenizer::train_tokenizer;

// ---------------------------------------------------------------- data

#[test]
fn bad_record_limits_parse_and_compare_counts_and_fractions() {
    let p = |s: &str| s.parse::<BadRecordLimit>();
    assert_eq!(p("3"), Ok(BadRecordLimit::Count(3)));
    assert_eq!(p("12.5%"), Ok(BadRecordLimit::Percent(12.5)));
    assert_eq!(p("0%"), Ok(BadRecordLimit::Percent(0.0)));
    for bad in ["-1", "101%", "x", "NaN%", "%", "1e3"] {
        assert!(p(bad).is_err(), "{bad}");
    }
    // the limit allows up to and including it
    assert!(!BadRecordLimit::Count(3).exceeded(3, 4));
    assert!(BadRecordLimit::Count(3).exceeded(4, 100));
    assert!(!BadRecordLimit::Percent(50.0).exceeded(2, 4));
    assert!(BadRecordLimit::Percent(50.0).exceeded(3, 4));
    assert!(BadRecordLimit::Percent(0.0).exceeded(1, 1000));
    assert!(!BadRecordLimit::Percent(0.0).exceeded(0, 1000));
    // the default: more than half
    assert_eq!(BadRecordLimit::default(), BadRecordLimit::Percent(50.0));
    // it round-trips through its text (how a checkpoint stores it)
    let v = serde_json::to_value(BadRecordLimit::Percent(12.5)).unwrap();
    assert_eq!(v, serde_json::json!("12.5%"));
    let back: BadRecordLimit = serde_json::from_value(v).unwrap();
    assert_eq!(back, BadRecordLimit::Percent(12.5));
}

#[test]
fn sharegpt_jsonl_and_openai_json_parse() {
    let jsonl = br#"{"id": "a", "conversations": [{"from": "gpt", "value": "hello, how can I help"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}]}
{"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}]}
"#;
    let (convs, rep) = parse_conversations(jsonl, "x.jsonl").unwrap();
    assert_eq!(rep.records, 2);
    assert_eq!(rep.skipped, 0);
    // the leading assistant greeting is dropped
    assert_eq!(convs[0].id, "a");
    assert_eq!(convs[0].messages.len(), 2);
    assert_eq!(convs[0].messages[0].role, Role::User);
    assert_eq!(convs[1].id, "record 2");
    assert_eq!(convs[1].system().unwrap().content, "sys");

    let json = br#"[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}]}]"#;
    let (convs, rep) = parse_conversations(json, "x.json").unwrap();
    assert_eq!((rep.records, rep.skipped), (1, 0));
    assert_eq!(convs[0].messages[1].content, "hello");
}

#[test]
fn bad_records_are_skipped_counted_and_explained() {
    let jsonl =
        br#"{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
not json at all
{"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q again"}]}
{"conversations": [{"from": "wizard", "value": "q"}]}
{"messages": [{"role": "user", "content": "only a question"}]}
{"text": "no turns"}
[1, 2]
{"messages": [{"role": "user", "content": null}]}
"#;
    let (convs, rep) = parse_conversations(jsonl, "bad.jsonl").unwrap();
    assert_eq!(convs.len(), 1);
    assert_eq!(rep.records, 8);
    assert_eq!(rep.skipped, 7);
    assert_eq!(rep.reasons.len(), abf::train::data::MAX_REASONS);
    assert!(
        rep.reasons[0].contains("record 2") && rep.reasons[0].contains("malformed JSON"),
        "{:?}",
        rep.reasons
    );
    assert!(rep.reasons[1].contains("alternate"), "{:?}", rep.reasons);
    assert!(
        rep.reasons[2].contains("unknown role \"wizard\""),
        "{:?}",
        rep.reasons
    );
    assert!(
        rep.reasons[3].contains("no assistant message"),
        "{:?}",
        rep.reasons
    );
    assert!(rep.reasons[4].contains("neither"), "{:?}", rep.reasons);
    // every skipped record is counted by kind, read off the lines above
    let kinds: Vec<(&str, usize)> = rep.by_kind.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    let mut want = vec![
        ("malformed JSON", 1),
        ("roles out of order", 1),
        ("unknown role", 1),
        ("no assistant message", 1),
        ("no message list", 1),
        ("not a JSON object", 1),
        ("unreadable message content", 1),
    ];
    want.sort();
    assert_eq!(kinds, want);
    // a file with no JSON at all is an error naming it
    let err = parse_conversations(b"hello\nworld\n", "prose.txt").unwrap_err();
    assert!(err.to_string().contains("prose.txt"), "{err}");
}

#[test]
fn seeded_orders_are_reproducible_permutations() {
    let a = epoch_order(50, 7, 0);
    assert_eq!(a, epoch_order(50, 7, 0));
    assert_ne!(a, epoch_order(50, 7, 1));
    assert_ne!(a, epoch_order(50, 8, 0));
    let mut s = a.clone();
    s.sort();
    assert_eq!(s, (0..50).collect::<Vec<_>>());
    // SplitMix64 reference values (Vigna's splitmix64.c with seed 0)
    let mut r = SplitMix64(0);
    assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
}

// ---------------------------------------------------------------- splitting

#[test]
fn long_conversations_split_at_turn_boundaries() {
    let tok = train_tokenizer(400);
    let t = ChatTemplate::builtin("chatml").unwrap();
    let (convs, mut rep) = abf::train::load_conversations(&fixture()).unwrap();
    assert_eq!(convs.len(), 8);
    let whole: Vec<usize> = convs
        .iter()
        .map(|c| encode(&tok, &t, &c.messages).unwrap().example.len())
        .collect();
    let seq_len = 2048;
    let cfg = PrepConfig {
        seq_len,
        min_tokens: 0,
        samples: None,
        seed: 1,
        max_bad_records: Default::default(),
    };
    let (ex, prep) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    let longer = whole.iter().filter(|&&n| n > seq_len).count();
    assert!(
        longer >= 4,
        "fixture should have long conversations: {whole:?}"
    );
    assert_eq!(prep.split, longer);
    assert!(ex.len() > convs.len());
    for e in &ex {
        assert!(e.len() <= seq_len);
        // every piece is a well-formed conversation opening (system, then) a user turn
        assert_eq!(e.tokens[0], tok.token_to_id("<|im_start|>").unwrap());
        let head = tok.decode(&e.tokens[1..8], false).unwrap();
        let head = head.trim_start();
        assert!(
            head.starts_with("user\n") || head.starts_with("system\n"),
            "{head}"
        );
        assert!(e.targets() > 0);
    }
    // pieces with a system message repeat it
    let sys = ex
        .iter()
        .filter(|e| {
            tok.decode(&e.tokens[1..8], false)
                .unwrap()
                .trim_start()
                .starts_with("system")
        })
        .count();
    assert!(sys >= 3 + prep.split / 2, "{sys}");

    // --min-tokens drops whole conversations
    let min = *whole.iter().max().unwrap();
    let cfg = PrepConfig {
        seq_len: 1 << 20,
        min_tokens: min,
        samples: None,
        seed: 1,
        max_bad_records: Default::default(),
    };
    let (ex, prep) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    assert_eq!((ex.len(), prep.dropped_short), (1, 7));

    // --samples keeps that many after a seeded shuffle
    let cfg = PrepConfig {
        seq_len: 2048,
        min_tokens: 0,
        samples: Some(5),
        seed: 3,
        max_bad_records: Default::default(),
    };
    let (a, _) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    let (b, _) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    assert_eq!(a.len(), 5);
    assert_eq!(a, b);
    let cfg = PrepConfig { seed: 4, ..cfg };
    let (c, _) = prepare(&convs, &tok, &t, &cfg, &mut rep).unwrap();
    assert_ne!(a, c);
}

#[test]
fn an_exchange_longer_than_seq_len_is_truncated() {
    let tok = train_tokenizer(300);
    let t = ChatTemplate::builtin("chatml").unwrap();
    let c = abf::train::Conversation {
        id: "x".into(),
        messages: vec![
            Message::new(Role::User, "short"),
            Message::new(Role::Assistant, "word ".repeat(300)),
            Message::new(Role::User, "again"),
            Message::new(Role::Assistant, "ok"),
        ],
    };
    let mut rep = Default::default();
    let cfg = PrepConfig {
        seq_len: 64,
        min_tokens: 0,
        samples: None,
        seed: 0,
        max_bad_records: Default::default(),
    };
    let (ex, prep) = prepare(&[c], &tok, &t, &cfg, &mut rep).unwrap();
    assert_eq!(prep.truncated, 1);
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].len(), 64);
}

#[test]
fn empty_result_is_an_error_naming_the_file() {
    let tok = train_tokenizer(300);
    let t = ChatTemplate::builtin("chatml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data.jsonl");
    std::fs::write(
        &p,
        "{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}]}\n",
    )
    .unwrap();
    let cfg = PrepConfig {
        seq_len: 64,
        min_tokens: 0,
        samples: None,
        seed: 0,
        max_bad_records: Default::default(),
    };
    let err = abf::train::load_examples(&p, &tok, &t, &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.jsonl") && err.contains("no assistant message"),
        "{err}"
    );
}
