//! `abf-eval entropy` (uniform attention has entropy ln n) and the SVG plots (read by a
//! tag-balance check and Python's XML parser; no python3 skips, or fails under ABF_REQUIRE_DATA=1).

mod common;

use abf::eval::plot::{heatmap, line_plot, Heatmap, LinePlot, Series};
use common::bin::{self, Bin, Run};
use common::data::kjv_answers;
use common::model::{Scales, TinyModel};
use common::svg::{check_svg, polylines, texts};
use common::tokenizer::shared_bpe;

// ---------------------------------------------------------------- entropy

#[test]
fn uniform_attention_has_entropy_ln_n_at_every_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinyModel::eval(shared_bpe())
        .seed(11)
        .scales(Scales::uniform(1.0, 0.5, 0.4).zero_qk())
        .write(&tmp.path().join("qk0"));
    let text_path = tmp.path().join("t.txt");
    std::fs::write(&text_path, kjv_answers()).unwrap();
    let plot = tmp.path().join("ent.svg");
    let Run {
        code,
        stdout: out,
        stderr: err,
    } = bin::run(
        Bin::Eval,
        &[
            "entropy",
            "--model",
            dir.to_str().unwrap(),
            "--text",
            text_path.to_str().unwrap(),
            "--positions",
            "0,1,5,17,40",
            "--windows",
            "2",
            "--plot",
            plot.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["entropy"];
    assert_eq!(e["length"], 41);
    assert_eq!(e["windows"], 2);
    let layers = e["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "the eval model has 2 layers");
    for row in layers {
        for (k, p) in [0usize, 1, 5, 17, 40].iter().enumerate() {
            let h = row[k].as_f64().unwrap();
            let want = ((p + 1) as f64).ln();
            assert!((h - want).abs() < 1e-5, "H {h} vs ln {} = {want}", p + 1);
            assert!((e["uniform"][k].as_f64().unwrap() - want).abs() < 1e-12);
        }
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    check_svg(&svg, &plot);
    let t = texts(&svg);
    for want in [
        "layer 0",
        "layer 1",
        "uniform ln n",
        "attention entropy (nats)",
    ] {
        assert!(t.iter().any(|x| x == want), "no text {want:?}");
    }

    // A random model attends non-uniformly: below ln n past the first position, 0 at it.
    let dir = TinyModel::eval(shared_bpe())
        .seed(11)
        .write(&tmp.path().join("r"));
    let Run {
        code,
        stdout: out,
        stderr: err,
    } = bin::run(
        Bin::Eval,
        &[
            "entropy",
            "--model",
            dir.to_str().unwrap(),
            "--text",
            text_path.to_str().unwrap(),
            "--positions",
            "0,30",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for row in v["entropy"]["layers"].as_array().unwrap() {
        assert!(row[0].as_f64().unwrap().abs() < 1e-6);
        let h = row[1].as_f64().unwrap();
        assert!(h > 0.0 && h < 31f64.ln() - 1e-3, "{h}");
    }
}

#[test]
fn plots_are_well_formed_with_title_axes_and_legend() {
    let tmp = tempfile::tempdir().unwrap();
    let plot = LinePlot {
        title: "T & <title>".into(),
        x_label: "x axis".into(),
        y_label: "y axis".into(),
        log2_x: true,
        series: vec![
            Series {
                label: "alpha".into(),
                points: vec![(128.0, 3.0), (256.0, 2.5), (512.0, f64::NAN), (1024.0, 4.0)],
                dashed: false,
            },
            Series {
                label: "beta".into(),
                points: vec![(128.0, 1.0), (1024.0, 2.0)],
                dashed: true,
            },
        ],
    };
    let svg = line_plot(&plot).unwrap();
    let path = tmp.path().join("l.svg");
    std::fs::write(&path, &svg).unwrap();
    check_svg(&svg, &path);
    let t = texts(&svg);
    for want in [
        "x axis", "y axis", "alpha", "beta", "legend", "128", "256", "1024",
    ] {
        assert!(t.iter().any(|x| x == want), "no text {want:?} in {t:?}");
    }
    // The title is escaped, not raw markup.
    assert!(t.iter().any(|x| x == "T &amp; &lt;title&gt;"), "{t:?}");
    // alpha: one polyline of its 3 finite points.
    assert!(polylines(&svg).contains(&3));

    let map = Heatmap {
        title: "H".into(),
        x_label: "len".into(),
        y_label: "depth".into(),
        cols: vec!["a".into(), "b".into(), "c".into()],
        rows: vec!["r0".into(), "r1".into()],
        values: vec![vec![0.0, 0.5, 1.0], vec![1.0, 0.25, 0.0]],
    };
    let svg = heatmap(&map).unwrap();
    let path = tmp.path().join("h.svg");
    std::fs::write(&path, &svg).unwrap();
    check_svg(&svg, &path);
    let t = texts(&svg);
    for want in ["H", "len", "depth", "a", "c", "r1", "0.25", "accuracy 0.5"] {
        assert!(t.iter().any(|x| x == want), "no text {want:?} in {t:?}");
    }
    assert!(svg.matches("<rect").count() >= 6 + 3);
}
