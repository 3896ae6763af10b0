//! Training that cannot lose work, through the real `abf-tune`: a kill (SIGKILL from a failpoint)
//! at each stage of a checkpoint swap and of the export leaves a complete checkpoint that a resume
//! finishes from, to weights bit-identical to an uninterrupted run; a non-finite update is never
//! saved and the checkpoint before it stays byte for byte; resume is bit-exact with LoRA and bf16;
//! resume picks the newest complete checkpoint of the three names and settles it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::bin::{self, Bin, Run};
use common::data::conversations as fixture;
use common::model::{tensor_bytes, TinyModel};
use common::tokenizer::train_tokenizer;

/// A tiny model and the run flags shared by every run of a test.
struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
}

impl Setup {
    fn new(seed: u64) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let model = root.join("model");
        TinyModel::chat(train_tokenizer(400))
            .seed(seed)
            .write(&model);
        Setup {
            _tmp: tmp,
            root,
            model,
        }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// 8 examples at batch 4 (two batches an epoch, reshuffled each epoch), 6 steps.
    fn flags(&self, out: &Path, save_every: u64, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--model",
            &self.model.display().to_string(),
            "--data",
            &fixture().display().to_string(),
            "-o",
            &out.display().to_string(),
            "--seq-len",
            "96",
            "--samples",
            "8",
            "--batch-size",
            "4",
            "--micro-batch",
            "2",
            "--lr",
            "1e-2",
            "--seed",
            "5",
            "--head-chunk",
            "32",
            "--steps",
            "6",
            "--save-every",
            &save_every.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

/// Run abf-tune, with `ABF_FAILPOINT` set when given.
fn tune(args: &[String], failpoint: Option<&str>) -> Run {
    let mut cmd = Bin::Tune.command();
    cmd.args(args).env_remove("ABF_FAILPOINT");
    if let Some(f) = failpoint {
        cmd.env("ABF_FAILPOINT", f);
    }
    bin::output(&mut cmd)
}

fn resume(out: &Path, failpoint: Option<&str>) -> Run {
    tune(
        &[
            "--resume".to_string(),
            out.display().to_string(),
            "--json".into(),
        ],
        failpoint,
    )
}

/// Every file of a directory and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// The step a checkpoint directory's trainer_state.json names.
fn state_step(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("trainer_state.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["step"].as_u64().unwrap()
}

/// `(step, loss)` of every line of the training log.
fn log(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("training_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// The run finished: its weights are the straight run's bit for bit, its log the same steps with
/// the same losses, and no staging or aside directory is left.
#[track_caller]
fn assert_same_result(out: &Path, straight: &Path, what: &str) {
    let (a, b) = (
        tensor_bytes(&straight.join("model.safetensors")),
        tensor_bytes(&out.join("model.safetensors")),
    );
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, t) in &a {
        assert!(
            *t == b[name],
            "{what}: {name} differs from the straight run"
        );
    }
    assert_eq!(log(out), log(straight), "{what}");
    assert!(out.join("config.json").is_file(), "{what}");
    for leftover in ["checkpoint.tmp", "checkpoint.old", ".export.tmp"] {
        assert!(!out.join(leftover).exists(), "{what}: {leftover} left");
    }
}

/// What a kill leaves on disk, checked against the step-2 checkpoint's bytes.
#[derive(Debug, Clone, Copy)]
enum Left {
    /// `checkpoint` is step 2 unchanged; `checkpoint.tmp` is half written (no manifest).
    HalfStaged,
    /// `checkpoint` is step 2 unchanged; `checkpoint.tmp` is step 4, complete.
    Staged,
    /// no `checkpoint`; `checkpoint.old` is step 2 unchanged; `checkpoint.tmp` step 4, complete.
    OldAside,
    /// `checkpoint` is step 4, complete; `checkpoint.old` is step 2 unchanged.
    NewIn,
    /// `checkpoint` is step 4; the weights were moved into the output but config.json was not.
    ExportPartial,
}

#[test]
fn a_kill_at_each_stage_resumes_to_the_uninterrupted_result() {
    let s = Setup::new(21);
    let straight = s.out("straight");
    tune(&s.flags(&straight, 2, &[]), None).expect_code(0);
    let stages = [
        ("checkpoint-staging-partial", Left::HalfStaged, 2),
        ("checkpoint-staged", Left::Staged, 4),
        ("checkpoint-old-aside", Left::OldAside, 4),
        ("checkpoint-new-in", Left::NewIn, 4),
        ("export-partial", Left::ExportPartial, 4),
    ];
    for (failpoint, left, resumed_from) in stages {
        let out = s.out(failpoint);
        // a checkpoint of step 2 to be replaced, then a run killed at the stage
        tune(&s.flags(&out, 2, &["--stop-after", "2"]), None).expect_code(0);
        let ck = out.join("checkpoint");
        let (tmp, old) = (out.join("checkpoint.tmp"), out.join("checkpoint.old"));
        let step2 = snapshot(&ck);
        assert_eq!(state_step(&ck), 2);
        let killed = resume(&out, Some(failpoint));
        assert_eq!(
            killed.code, -1,
            "{failpoint}: not killed\n{}",
            killed.stderr
        );
        let complete = |d: &Path| d.join("manifest.json").is_file();
        match left {
            Left::HalfStaged => {
                assert_eq!(snapshot(&ck), step2, "{failpoint}");
                assert!(tmp.join("params.safetensors").is_file() && !complete(&tmp));
                assert!(!old.exists());
            }
            Left::Staged => {
                assert_eq!(snapshot(&ck), step2, "{failpoint}");
                assert!(complete(&tmp) && state_step(&tmp) == 4, "{failpoint}");
                assert!(!old.exists());
            }
            Left::OldAside => {
                assert!(!ck.exists(), "{failpoint}");
                assert_eq!(snapshot(&old), step2, "{failpoint}");
                assert!(complete(&tmp) && state_step(&tmp) == 4, "{failpoint}");
            }
            Left::NewIn => {
                assert!(complete(&ck) && state_step(&ck) == 4, "{failpoint}");
                assert_eq!(snapshot(&old), step2, "{failpoint}");
                assert!(!tmp.exists());
            }
            Left::ExportPartial => {
                assert!(complete(&ck) && state_step(&ck) == 4, "{failpoint}");
                assert!(out.join("model.safetensors").is_file(), "{failpoint}");
                // without config.json the half-moved export is no model to any loader
                assert!(!out.join("config.json").exists(), "{failpoint}");
                assert!(abf::checkpoint::ModelConfig::load(&out).is_err());
            }
        }
        let r = resume(&out, None);
        r.expect_code(0);
        let summary = r.json();
        assert_eq!(summary["resumed_from"], resumed_from, "{failpoint}");
        assert_eq!(summary["finished"], true, "{failpoint}");
        assert_same_result(&out, &straight, failpoint);
    }
}

#[test]
fn lora_and_bf16_resume_is_bit_exact() {
    let s = Setup::new(22);
    let extra = ["--lora", "4", "--dtype", "bf16"];
    let straight = s.out("straight");
    tune(&s.flags(&straight, 0, &extra), None).expect_code(0);
    let out = s.out("resumed");
    let mut first = extra.to_vec();
    first.extend(["--stop-after", "3"]);
    tune(&s.flags(&out, 0, &first), None).expect_code(0);
    assert_eq!(state_step(&out.join("checkpoint")), 3);
    let r = resume(&out, None);
    r.expect_code(0);
    assert_eq!(r.json()["resumed_from"], 3);
    assert_same_result(&out, &straight, "lora bf16");
}

#[test]
fn a_non_finite_update_is_not_saved_and_the_last_good_checkpoint_stays() {
    let s = Setup::new(23);
    let straight = s.out("straight");
    tune(&s.flags(&straight, 1, &[]), None).expect_code(0);
    let out = s.out("poisoned");
    tune(&s.flags(&out, 1, &["--stop-after", "2"]), None).expect_code(0);
    let ck = out.join("checkpoint");
    let step2 = snapshot(&ck);
    assert_eq!(state_step(&ck), 2);
    // step 3's update leaves a NaN weight: with --save-every 1 it would be saved right after
    let r = resume(&out, Some("poison-weights-step-3"));
    r.expect_code(2);
    assert!(
        r.stderr.contains("step 3: the update made tensor")
            && r.stderr.contains("non-finite")
            && r.stderr
                .contains("the last good checkpoint, of step 2, is kept"),
        "{}",
        r.stderr
    );
    let j = r.json();
    assert_eq!(j["failed_step"], 3);
    assert_eq!(j["kept_step"], 2);
    assert_eq!(j["finished"], false);
    assert_eq!(snapshot(&ck), step2, "the kept checkpoint changed");
    assert!(!out.join("checkpoint.tmp").exists() && !out.join("checkpoint.old").exists());
    assert_eq!(log(&out).iter().map(|l| l.0).collect::<Vec<_>>(), [1, 2]);
    assert!(!out.join("model.safetensors").exists());
    // the kept checkpoint is good: a resume finishes as if nothing had happened
    resume(&out, None).expect_code(0);
    assert_same_result(&out, &straight, "after the guard");

    // without checkpoints there is nothing to keep, and the message says so
    let bare = s.out("bare");
    let r = tune(
        &s.flags(&bare, 0, &["--json"]),
        Some("poison-weights-step-2"),
    );
    r.expect_code(2);
    assert!(
        r.stderr.contains("step 2: the update made") && r.stderr.contains("no checkpoint"),
        "{}",
        r.stderr
    );
    assert_eq!(r.json()["kept_step"], serde_json::Value::Null);
    assert!(!bare.join("checkpoint").exists() && !bare.join("model.safetensors").exists());

    // a real overflow: a learning rate beyond f32 turns the first update's weights infinite
    // while its loss and gradients are finite
    let huge = s.out("huge");
    let mut args = s.flags(&huge, 1, &["--json"]);
    let lr = args.iter().position(|a| a == "--lr").unwrap();
    args[lr + 1] = "1e39".into();
    let r = tune(&args, None);
    r.expect_code(2);
    assert!(
        r.stderr.contains("step 1: the update made") && r.stderr.contains("no checkpoint"),
        "{}",
        r.stderr
    );
    assert_eq!(r.json()["failed_step"], 1);
    assert!(!huge.join("checkpoint").exists());
}

#[test]
fn resume_picks_the_newest_complete_checkpoint_and_settles_it() {
    use abf::train::store::{self, Slot};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoint");
    let save = |step: u64| {
        store::save(&dir, step, |d| {
            std::fs::write(d.join("a.bin"), vec![step as u8; 100]).unwrap();
            std::fs::write(d.join("b.json"), format!("{{\"step\": {step}}}")).unwrap();
            Ok(())
        })
        .unwrap()
    };
    let a_bin = |d: &Path| std::fs::read(d.join("a.bin")).unwrap();
    save(1);
    save(2);
    let (staging, aside) = (Slot::Staging.path(&dir), Slot::Aside.path(&dir));
    assert_eq!(staging, tmp.path().join("checkpoint.tmp"));
    assert_eq!(aside, tmp.path().join("checkpoint.old"));
    assert!(!staging.exists() && !aside.exists());
    assert_eq!(a_bin(&dir), vec![2u8; 100]);
    // a checkpoint whose file lost bytes, or whose manifest is gone, is not complete
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    };
    copy(&dir, &aside);
    std::fs::write(dir.join("a.bin"), vec![2u8; 99]).unwrap();
    assert!(store::complete(&dir).is_none());
    // the current one is broken (half removed, say): the old one with the same step is taken
    let (slot, m) = store::latest(&dir).unwrap();
    assert_eq!((slot, m.step), (Slot::Aside, 2));
    assert_eq!(store::settle(&dir).unwrap().step, 2);
    assert_eq!(a_bin(&dir), vec![2u8; 100]);
    assert!(!aside.exists());
    // a newer complete staging directory wins over the current one; a half-written one does not
    save(3);
    copy(&dir, &staging);
    std::fs::remove_file(staging.join("manifest.json")).unwrap();
    assert_eq!(store::latest(&dir).unwrap().0, Slot::Current);
    save(4);
    copy(&dir, &staging);
    std::fs::remove_dir_all(&dir).unwrap();
    copy(&staging, &dir);
    std::fs::write(dir.join("a.bin"), vec![9u8; 100]).unwrap(); // same size: still complete
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        text.replace("\"step\": 4", "\"step\": 3"),
    )
    .unwrap();
    assert_eq!(
        store::latest(&dir).unwrap(),
        (Slot::Staging, store::complete(&staging).unwrap())
    );
    store::settle(&dir).unwrap();
    assert_eq!(a_bin(&dir), vec![4u8; 100]);
    assert!(!staging.exists() && !aside.exists());
    // nothing complete anywhere: an error naming the directory
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let err = store::settle(&dir).unwrap_err().to_string();
    assert!(
        err.contains("checkpoint") && err.contains("manifest.json"),
        "{err}"
    );
    store::clear(&dir).unwrap();
    assert!(!dir.exists());
}
