//! `abf-convert release`: a model directory to a published set of GGUF files: every type in one
//! pass, every file verified against the checkpoint in one run (the reference computed once),
//! `release.json`, `SHA256SUMS` and a model card whose numbers are `release.json`'s. Built in a
//! staging directory and renamed into place when complete.

pub mod card;
pub mod manifest;
pub mod run;

pub use manifest::{BackendSummary, FileEntry, Manifest, Summary};
pub use run::{release, ImatrixSource, ReleaseError, ReleaseOptions, IMATRIX_FILE};
