//! `abf-eval` CLI errors: each names its input and exits 2 with nothing on stdout.

mod common;

use common::bin::{self, Bin, Run};
use common::model::TinyModel;
use common::tokenizer::shared_bpe;

// ---------------------------------------------------------------- errors

#[test]
fn cli_errors_name_the_input_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinyModel::eval(shared_bpe())
        .seed(1)
        .write(&tmp.path().join("m"));
    let d = dir.to_str().unwrap();
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "In the beginning.").unwrap();
    let s = short.to_str().unwrap();
    let gguf = tmp.path().join("x.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    let missing = tmp.path().join("nope.txt");
    let m = missing.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["ppl", "--model", d, "--text", m, "--lengths", "8"],
            "nope.txt",
        ),
        (
            vec!["ppl", "--model", d, "--text", s, "--lengths", "64"],
            "short.txt",
        ),
        (
            vec![
                "ppl",
                "--model",
                gguf.to_str().unwrap(),
                "--text",
                s,
                "--lengths",
                "8",
            ],
            "x.gguf",
        ),
        (
            vec![
                "ppl",
                "--model",
                "/no/such/dir",
                "--text",
                s,
                "--lengths",
                "2",
            ],
            "/no/such/dir",
        ),
        (
            vec![
                "ppl",
                "--model",
                d,
                "--text",
                s,
                "--lengths",
                "2",
                "--plot",
                "p.png",
            ],
            "p.png",
        ),
        (
            vec![
                "ppl",
                "--model",
                d,
                "--label",
                "a",
                "--label",
                "b",
                "--text",
                s,
                "--lengths",
                "2",
            ],
            "--label",
        ),
        (
            vec!["ppl", "--model", d, "--text", s, "--lengths", "1"],
            "--lengths",
        ),
        (
            vec![
                "passkey",
                "--model",
                d,
                "--lengths",
                "64",
                "--depths",
                "1.5",
            ],
            "--depths",
        ),
        (
            vec!["passkey", "--model", d, "--lengths", "10"],
            "too short",
        ),
        (
            vec![
                "entropy",
                "--model",
                d,
                "--text",
                s,
                "--positions",
                "9",
                "--length",
                "5",
            ],
            "--positions",
        ),
        (
            vec!["entropy", "--model", d, "--text", s, "--positions", "200"],
            "short.txt",
        ),
        (vec!["ppl", "--model", d, "--text", s], "--lengths"),
    ];
    for (args, want) in cases {
        let Run {
            code,
            stdout: out,
            stderr: err,
        } = bin::run(Bin::Eval, &args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed {out}");
        assert!(err.contains(want), "{args:?}: {want:?} not in {err}");
    }
}
