//! Fine-tuning: data, chat templates, optimizer, schedule, recomputation, LoRA, the trainer.

pub mod bench;
pub mod data;
pub mod examples;
pub mod heap;
pub mod hf;
pub mod lora;
pub mod optim;
pub mod plan;
pub mod recompute;
pub mod run;
pub mod schedule;
pub mod store;
pub mod template;
pub mod trainer;

pub use data::{load_conversations, parse_conversations, Conversation, Message, ParseReport, Role};
pub use examples::{encode, load_examples, prepare, Example, PrepConfig, PrepReport};
pub use lora::{LoraConfig, ParamSet};
pub use optim::{clip_factor, clip_grad_norm, grad_norm, AdamW, AdamWConfig, TrainParam};
pub use recompute::{
    loss_and_grads, masked_nll_sum, whole_layer_backward, BackwardPlan, Batch, GradAcc, Grads,
    LayerModel,
};
pub use schedule::{Schedule, ScheduleKind};
pub use template::ChatTemplate;
pub use trainer::{ModelFactory, StepStats, TrainConfig, Trainer};

use std::path::Path;

/// Errors of fine-tuning.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Data { file: String, reason: String },
    #[error("chat template {origin}: {reason}")]
    Template { origin: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Config(String),
    #[error("resume from {path}: {reason}")]
    Resume { path: String, reason: String },
    /// A NaN or infinity in step `step`'s loss, gradients, updated weights or optimizer moments:
    /// the run stops and saves nothing of that step.
    #[error("step {step}: {what}; stopped without saving it: {}", kept_text(.kept))]
    NonFinite {
        step: u64,
        what: String,
        /// The checkpoint left on disk (filled in by the run, which knows what it saved).
        kept: Option<KeptCheckpoint>,
    },
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("safetensors {path}: {reason}")]
    Safetensors { path: String, reason: String },
    #[error(transparent)]
    Checkpoint(Box<crate::checkpoint::CheckpointError>),
    #[error("internal: {0}")]
    Internal(String),
}

/// The last checkpoint a run saved, which a failure leaves as it was.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeptCheckpoint {
    pub step: u64,
    pub dir: std::path::PathBuf,
}

fn kept_text(kept: &Option<KeptCheckpoint>) -> String {
    match kept {
        Some(k) => format!(
            "the last good checkpoint, of step {}, is kept in {}",
            k.step,
            k.dir.display()
        ),
        None => "no checkpoint had been saved (--save-every N saves them)".to_string(),
    }
}

impl TrainError {
    pub fn io(path: &Path, source: std::io::Error) -> TrainError {
        TrainError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
