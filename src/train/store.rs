//! A run's checkpoint on disk, written so that a kill at any instant leaves a complete one.
//!
//! `checkpoint/` is the current checkpoint. A new one is written into `checkpoint.tmp/`, its
//! files fsynced, and `manifest.json` (each file's size, the step) is written last: a directory
//! is a complete checkpoint only when its manifest is there and every listed file has its size.
//! Then the swap: `checkpoint/` is renamed to `checkpoint.old/`, `checkpoint.tmp/` to
//! `checkpoint/`, and `checkpoint.old/` is removed, each rename made durable by an fsync of the
//! directory. Whatever instant a kill hits, one of the three names holds a complete checkpoint,
//! the previous or the new one; [`latest`] finds the newest complete one and [`settle`] finishes
//! an interrupted swap so that it is `checkpoint/` again.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::fsutil::{failpoint, sync_parent};

/// The file written last into a checkpoint: its presence (with matching sizes) marks it complete.
pub const MANIFEST_FILE: &str = "manifest.json";

/// `manifest.json`: what a complete checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The optimizer steps done when it was saved.
    pub step: u64,
    /// Every other file of the checkpoint and its size in bytes.
    pub files: BTreeMap<String, u64>,
}

/// The three names a checkpoint `dir` can be found under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// `dir` itself: the current checkpoint.
    Current,
    /// `dir.tmp`: a new one being written, or written and not yet swapped in.
    Staging,
    /// `dir.old`: the previous one, moved aside during a swap.
    Aside,
}

impl Slot {
    /// In order of preference between checkpoints of the same step.
    pub const ALL: [Slot; 3] = [Slot::Current, Slot::Aside, Slot::Staging];

    /// This slot's directory for the checkpoint `dir`.
    pub fn path(self, dir: &Path) -> PathBuf {
        let suffix = match self {
            Slot::Current => return dir.to_path_buf(),
            Slot::Staging => "tmp",
            Slot::Aside => "old",
        };
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "checkpoint".into());
        dir.with_file_name(format!("{name}.{suffix}"))
    }
}

/// The manifest of `dir` when it is a complete checkpoint: the manifest parses and every file
/// it lists is there with its size. None otherwise (missing, half written, half removed).
pub fn complete(dir: &Path) -> Option<Manifest> {
    let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).ok()?;
    let m: Manifest = serde_json::from_str(&text).ok()?;
    let all_there = m.files.iter().all(|(name, &size)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|md| md.is_file() && md.len() == size)
    });
    all_there.then_some(m)
}

/// The newest complete checkpoint among `dir`, `dir.tmp` and `dir.old` (by step; a tie goes to
/// the order of [`Slot::ALL`]).
pub fn latest(dir: &Path) -> Option<(Slot, Manifest)> {
    let mut best: Option<(Slot, Manifest)> = None;
    for slot in Slot::ALL {
        if let Some(m) = complete(&slot.path(dir)) {
            if best.as_ref().is_none_or(|(_, b)| m.step > b.step) {
                best = Some((slot, m));
            }
        }
    }
    best
}

/// The newest complete checkpoint's directory, or an error naming `dir` when there is none.
pub fn find(dir: &Path) -> Result<(PathBuf, Manifest), TrainError> {
    latest(dir)
        .map(|(slot, m)| (slot.path(dir), m))
        .ok_or_else(|| no_checkpoint(dir))
}

fn no_checkpoint(dir: &Path) -> TrainError {
    let reason = if dir.exists() {
        format!("it is not a complete checkpoint (no valid {MANIFEST_FILE})")
    } else {
        "no checkpoint there (checkpoints are saved with --save-every or --stop-after)".to_string()
    };
    TrainError::Resume {
        path: dir.display().to_string(),
        reason,
    }
}

/// Finish whatever swap a kill interrupted: the newest complete checkpoint becomes `dir`, the
/// other two names are removed. Every step keeps the newest one complete under some name, so a
/// kill here too is recovered by the next call. Returns its manifest.
pub fn settle(dir: &Path) -> Result<Manifest, TrainError> {
    let (slot, manifest) = latest(dir).ok_or_else(|| no_checkpoint(dir))?;
    let (staging, aside) = (Slot::Staging.path(dir), Slot::Aside.path(dir));
    match slot {
        Slot::Current => {}
        Slot::Staging => {
            if dir.exists() {
                remove(&aside)?;
                rename(dir, &aside)?;
            }
            rename(&staging, dir)?;
        }
        Slot::Aside => {
            remove(dir)?;
            rename(&aside, dir)?;
        }
    }
    remove(&staging)?;
    remove(&aside)?;
    Ok(manifest)
}

/// Remove every checkpoint of `dir` (a fresh run into a used output directory).
pub fn clear(dir: &Path) -> Result<(), TrainError> {
    for slot in Slot::ALL {
        remove(&slot.path(dir))?;
    }
    Ok(())
}

/// Save a checkpoint of `step` as `dir`: `write` fills the staging directory (its files need not
/// be synced), then the files are fsynced, the manifest written, and the swap done.
pub fn save(
    dir: &Path,
    step: u64,
    write: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let (staging, aside) = (Slot::Staging.path(dir), Slot::Aside.path(dir));
    // Leftovers are older than what is being saved (resume settles first); a `dir.old` is the
    // only complete copy when `dir` is missing, so it goes only once the new one is in.
    remove(&staging)?;
    if dir.exists() {
        remove(&aside)?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| TrainError::io(&staging, e))?;
    write(&staging)?;
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&staging).map_err(|e| TrainError::io(&staging, e))? {
        let path = entry.map_err(|e| TrainError::io(&staging, e))?.path();
        let file = File::open(&path).map_err(|e| TrainError::io(&path, e))?;
        file.sync_all().map_err(|e| TrainError::io(&path, e))?;
        let size = file.metadata().map_err(|e| TrainError::io(&path, e))?.len();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        files.insert(name, size);
    }
    let manifest = Manifest {
        format: 1,
        step,
        files,
    };
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| TrainError::Internal(e.to_string()))?;
    // write_atomic fsyncs the manifest and the staging directory: the files' entries and the
    // manifest are durable before anything is swapped
    let mp = staging.join(MANIFEST_FILE);
    crate::fsutil::write_atomic(&mp, &text, true).map_err(|e| TrainError::io(&mp, e))?;
    failpoint("checkpoint-staged");
    if dir.exists() {
        rename(dir, &aside)?;
        failpoint("checkpoint-old-aside");
    }
    rename(&staging, dir)?;
    failpoint("checkpoint-new-in");
    remove(&aside)
}

/// Rename and make the rename durable.
fn rename(from: &Path, to: &Path) -> Result<(), TrainError> {
    std::fs::rename(from, to).map_err(|e| TrainError::Io {
        path: to.display().to_string(),
        source: std::io::Error::new(
            e.kind(),
            format!("renaming {} to {}: {e}", from.display(), to.display()),
        ),
    })?;
    sync_parent(to).map_err(|e| TrainError::io(to, e))
}

/// Remove a directory if it is there, durably.
fn remove(dir: &Path) -> Result<(), TrainError> {
    if !dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    sync_parent(dir).map_err(|e| TrainError::io(dir, e))
}
