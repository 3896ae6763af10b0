//! `abf-convert release`: an ABF + step-law tiny model and the real SmolLM2 released end to end
//! (one pass, verified on every backend); the card's numbers are release.json's; SHA256SUMS
//! checks with the system's `sha256sum`; an existing release is kept unless --force.

mod common;

use std::path::Path;

use abf::release::card;
use abf::release::{BackendSummary, FileEntry, Manifest, Summary};
use common::bin::{self, Bin};
use common::model::{Init, TinyModel};

fn backend() -> &'static str {
    if cfg!(feature = "llamacpp") {
        "both"
    } else {
        "candle"
    }
}

fn tiny(dir: &Path) {
    TinyModel::new()
        .kquant_shape()
        .init(Init::Scaled(None))
        .abf_step()
        .seed(21)
        .write(dir);
}

/// The card's table rows: file -> cells.
fn card_rows(card: &str) -> Vec<Vec<String>> {
    card.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| file"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// The cell equals `want` to the cell's printed precision (half a unit of its last digit).
fn close(cell: &str, want: f64) {
    let c = cell.trim_end_matches('%');
    let v: f64 = c.parse().unwrap();
    let (mantissa, exp) = match c.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap()),
        None => (c, 0),
    };
    let decimals = mantissa.split_once('.').map_or(0, |(_, d)| d.len()) as i32;
    let tol = 0.5 * 10f64.powi(exp - decimals) * (1.0 + 1e-9);
    assert!(
        (v - want).abs() <= tol,
        "card {cell} vs release.json {want}"
    );
}

/// Every number of the card equals release.json's, to the card's printed precision.
fn card_matches_manifest(out: &Path) -> Manifest {
    let m: Manifest =
        serde_json::from_str(&std::fs::read_to_string(out.join("release.json")).unwrap()).unwrap();
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let rows = card_rows(&card);
    assert_eq!(rows.len(), m.files.len());
    for (row, f) in rows.iter().zip(&m.files) {
        assert_eq!(row[0], f.files.join(", "));
        assert_eq!(row[1], f.outtype);
        close(&row[2], f.bytes as f64 / 1e6);
        close(&row[3], f.bits_per_weight);
        let b = card::shown(f).unwrap();
        for (cells, s) in [(&row[4..7], &b.within), (&row[7..10], &b.beyond)] {
            match s {
                Some(s) => {
                    close(&cells[0], s.kld);
                    close(&cells[1], s.top1 * 100.0);
                    close(&cells[2], s.ppl_ratio);
                }
                None => assert_eq!(cells[0], "-"),
            }
        }
        assert_eq!(row[10], if f.pass { "PASS" } else { "FAIL" });
    }
    assert!(card.contains(&format!("-c {}", m.context)), "{card}");
    m
}

fn sha256sum_checks(out: &Path) {
    let r = std::process::Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(out)
        .output();
    match r {
        Ok(o) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => {
            common::data::skip_or_fail::<()>(format_args!("sha256sum ({e})"));
        }
    }
}

#[test]
fn tiny_abf_release_passes_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    tiny(&dir);
    let out = tmp.path().join("release");
    let args = [
        "release",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--types",
        "f16,q8_0,q4_k_m,q2_k",
        "--backend",
        backend(),
        "--split-max-tensors",
        "12",
        "--json",
    ];
    let r = bin::run(Bin::Convert, &args);
    r.expect_code(0);
    let m = card_matches_manifest(&out);
    assert!(m.pass);
    assert_eq!(m.files.len(), 4);
    assert_eq!((m.original_context, m.context), (64, 256));
    for f in &m.files {
        // 21 tensors in parts of 12: two parts per type, each listed and summed
        assert_eq!(f.files.len(), 2, "{f:?}");
        assert_eq!(f.sha256.len(), 2);
        assert!(f.files[0].ends_with("-00001-of-00002.gguf"), "{f:?}");
        let total: u64 = f
            .files
            .iter()
            .map(|p| std::fs::metadata(out.join(p)).unwrap().len())
            .sum();
        assert_eq!(total, f.bytes);
        // within and beyond the window, on every backend
        for b in &f.backends {
            assert!(b.within.is_some() && b.beyond.is_some(), "{f:?}");
        }
    }
    sha256sum_checks(&out);
    // no staging or aside directories left next to it
    let stray: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    // an existing release is kept without --force (exit 2), replaced with it
    let before = std::fs::read(out.join("release.json")).unwrap();
    bin::run(Bin::Convert, &args[..args.len() - 1]).expect_code(2);
    assert_eq!(std::fs::read(out.join("release.json")).unwrap(), before);
    // --force with a calibration text: the k-quant is importance-weighted, imatrix.gguf kept
    let calib = tmp.path().join("calib.txt");
    std::fs::write(
        &calib,
        "In the beginning was the word, and the word was with God. ".repeat(20),
    )
    .unwrap();
    let mut forced = args.to_vec();
    forced[5] = "q4_k_m";
    forced.extend(["--force", "--calibration", calib.to_str().unwrap()]);
    bin::run(Bin::Convert, &forced).expect_code(0);
    let m = card_matches_manifest(&out);
    assert_eq!(m.files.len(), 1);
    assert!(!out.join("tiny-f16.gguf").exists());
    let matrix = abf::imatrix::read(&out.join(abf::release::IMATRIX_FILE)).unwrap();
    assert!(matrix.entries.contains_key("blk.0.ffn_down.weight"));
    assert!(m
        .imatrix
        .as_deref()
        .is_some_and(|i| i.contains("calib.txt")));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("importance matrix"), "{card}");
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    assert!(sums.contains(abf::release::IMATRIX_FILE));
    sha256sum_checks(&out);
}

#[test]
fn a_failed_file_is_marked_in_the_card() {
    let s = Summary {
        positions: 64,
        kld: 0.5,
        top1: 0.4,
        ppl_ratio: 1.3,
    };
    let f = FileEntry {
        files: vec!["m-q2_k.gguf".into()],
        outtype: "q2_k".into(),
        bytes: 1_000_000,
        bits_per_weight: 2.9,
        sha256: vec!["00".into()],
        backends: vec![BackendSummary {
            backend: "llama.cpp".into(),
            within: Some(s),
            beyond: None,
            pass: false,
        }],
        pass: false,
        findings: vec!["llama.cpp: right within the original window, wrong beyond it".into()],
    };
    let m = Manifest {
        name: "m".into(),
        source: "dir".into(),
        recipe: "r".into(),
        recipe_block: serde_json::json!({}),
        original_context: 64,
        context: 256,
        parameters: 1,
        verified_tokens: "t".into(),
        verified_length: 256,
        imatrix: None,
        files: vec![f],
        pass: false,
        abf_version: "0".into(),
    };
    let card = card::render(&m);
    assert!(card.contains("| FAIL |"), "{card}");
    assert!(card.contains("## Failed verification"));
    assert!(card.contains("wrong beyond it"));
}

#[test]
fn smollm_release_passes_end_to_end() {
    let Some(orig) = common::smollm_gguf() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm");
    abf::convert::from_gguf(&orig, &dir, &abf::convert::FromGgufOptions::default()).unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "The General Public License is a free, copyleft license for software and other kinds \
         of works. ",
    )
    .unwrap();
    let out = tmp.path().join("release");
    let r = bin::run(
        Bin::Convert,
        &[
            "release",
            dir.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--types",
            "q8_0,q4_k_m",
            "--verify-text",
            text.to_str().unwrap(),
            "--lengths",
            "256",
            "--backend",
            backend(),
            "--json",
        ],
    );
    r.expect_code(0);
    let m = card_matches_manifest(&out);
    assert!(m.pass);
    sha256sum_checks(&out);
}
