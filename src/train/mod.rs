//! Fine-tuning: data, chat templates, optimizer, trainer, recomputation.
