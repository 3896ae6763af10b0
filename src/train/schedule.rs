//! Learning-rate schedules, as Hugging Face transformers' `get_cosine_schedule_with_warmup` and
//! `get_constant_schedule_with_warmup` compute them: the optimizer step `k` (0-based) uses
//! `peak * lambda(k)`.

use std::str::FromStr;

/// The shape of the schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Constant,
}

impl FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cosine" => Ok(ScheduleKind::Cosine),
            "constant" => Ok(ScheduleKind::Constant),
            _ => Err(format!(
                "unknown schedule {s:?} (expected cosine or constant)"
            )),
        }
    }
}

/// Peak rate, warm-up steps and total steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
}

impl Schedule {
    /// The multiplier of step `k`: `k / warmup` during warm-up; then 1 (constant) or
    /// `max(0, 0.5 (1 + cos(pi progress)))` with `progress = (k - warmup) / (total - warmup)`.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup {
            return step as f64 / self.warmup.max(1) as f64;
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Cosine => {
                let progress = (step - self.warmup) as f64
                    / (self.total.saturating_sub(self.warmup)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of step `k`.
    pub fn lr(&self, step: u64) -> f64 {
        self.peak * self.factor(step)
    }
}
