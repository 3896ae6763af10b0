//! The logits verifier: reference against candidate, by position band.
//!
//! `metrics` (bands, streamed per-band metrics), `lines` (pass lines per type and the
//! long-context rule), `metadata` (key checks before compute), `run` (the verifier), `report`
//! (the text table). docs/verifier.md describes them.

pub mod lines;
pub mod metadata;
pub mod metrics;
pub mod report;
pub mod run;
pub mod weights;

pub use lines::{Check, LongContextRule, PassLines, TypeClass, SMALL_MODEL_PARAMS};
pub use metadata::Issue;
pub use metrics::{bands, Band, BandMetrics, Comparison, MetricsError, Reference};
pub use report::render;
pub use run::{
    parameter_count, verify, verify_many, BackendResult, BandResult, TokenSource, VerifyError,
    VerifyOptions, VerifyReport,
};
