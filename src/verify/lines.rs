//! Pass lines: what a tensor type may cost (fidelity), and how much worse a band beyond the
//! original window may be than the band within it (long-context correctness).
//! docs/verifier.md gives the source of every number.

use serde::Serialize;

use super::metrics::BandMetrics;
use crate::gguf::types::{self, GgmlType};

/// Models below this many parameters get the small-model lines (docs/verifier.md).
pub const SMALL_MODEL_PARAMS: u64 = 1_000_000_000;

/// Small models' KLD lines are the 7-8B lines times this (docs/verifier.md).
pub const SMALL_KLD_FACTOR: f64 = 3.0;

/// The type class a file is judged as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeClass {
    F32,
    F16,
    Q8_0,
    /// Q2_K .. Q6_K, and the legacy 4/5-bit block types (judged alike).
    KQuant,
}

impl TypeClass {
    /// The class of the type that carries most of a file's weights.
    pub fn of(ty: GgmlType) -> TypeClass {
        match ty.code() {
            c if c == types::F32.code => TypeClass::F32,
            c if c == types::F16.code || c == types::BF16.code => TypeClass::F16,
            c if c == types::Q8_0.code => TypeClass::Q8_0,
            _ => TypeClass::KQuant,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TypeClass::F32 => "f32",
            TypeClass::F16 => "f16/bf16",
            TypeClass::Q8_0 => "q8_0",
            TypeClass::KQuant => "k-quant/q4-q5",
        }
    }
}

/// Fidelity lines; `None` means the metric is reported but not judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PassLines {
    pub class: TypeClass,
    /// `large` (the 7-8B lines) or `small` (< 1B parameters), or `override`.
    pub tier: String,
    pub max_nmse: Option<f64>,
    pub max_kld: Option<f64>,
    pub min_top1: Option<f64>,
    pub source: String,
}

impl PassLines {
    /// The lines for 7-8B models, from llama.cpp's published figures (issue 5; docs/verifier.md).
    pub fn large(class: TypeClass) -> PassLines {
        let (nmse, kld, top1, source) = match class {
            TypeClass::F32 => (Some(1e-6), None, None, "llama.cpp conversion check: NMSE < 1e-6 identical"),
            TypeClass::F16 => (
                Some(1e-4),
                None,
                Some(0.995),
                "llama.cpp conversion check: NMSE < 1e-4 excellent (f16); Llama-3-8B BF16 vs F16 99.74% same top",
            ),
            TypeClass::Q8_0 => (None, Some(5e-3), None, "llama-perplexity KLD: Llama-3-8B Q8_0 0.0014, Llama-2-7B 0.00037"),
            TypeClass::KQuant => (None, Some(5e-2), None, "llama-perplexity KLD: Llama-3-8B Q6_K 0.0055, Q4_K_M ~0.03"),
        };
        PassLines {
            class,
            tier: "large".into(),
            max_nmse: nmse,
            max_kld: kld,
            min_top1: top1,
            source: source.into(),
        }
    }

    /// The lines for models under [`SMALL_MODEL_PARAMS`] (docs/verifier.md, "Small models"):
    /// f32 and f16/bf16 keep the 7-8B lines (SmolLM2-135M f16 measures NMSE 6e-7..1.6e-6,
    /// top-1 99.9%); KLD lines are the 7-8B lines times [`SMALL_KLD_FACTOR`], the ratio of
    /// llama.cpp's own SmolLM2-135M q8_0 KLD (4.6e-3) to Llama-3-8B's (1.4e-3), rounded up.
    pub fn small(class: TypeClass) -> PassLines {
        let mut l = PassLines::large(class);
        l.tier = "small".into();
        if let Some(k) = l.max_kld.as_mut() {
            *k *= SMALL_KLD_FACTOR;
            l.source = format!(
                "{} x {SMALL_KLD_FACTOR}: llama.cpp's SmolLM2-135M q8_0 KLD 4.6e-3 / Llama-3-8B 1.4e-3",
                l.source
            );
        } else {
            l.source = format!("{}; SmolLM2-135M f16 measured within it", l.source);
        }
        l
    }

    /// The lines for a file whose weights are mostly `ty`, for a model of `params` parameters.
    pub fn for_type(ty: GgmlType, params: u64) -> PassLines {
        let class = TypeClass::of(ty);
        if params < SMALL_MODEL_PARAMS {
            PassLines::small(class)
        } else {
            PassLines::large(class)
        }
    }

    /// Replace lines given on the command line (each independently).
    pub fn with_overrides(
        mut self,
        max_nmse: Option<f64>,
        max_kld: Option<f64>,
        min_top1: Option<f64>,
    ) -> PassLines {
        if max_nmse.is_some() || max_kld.is_some() || min_top1.is_some() {
            self.tier = format!("{} with overrides", self.tier);
        }
        self.max_nmse = max_nmse.or(self.max_nmse);
        self.max_kld = max_kld.or(self.max_kld);
        self.min_top1 = min_top1.or(self.min_top1);
        self
    }
}

/// One judged number.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub metric: &'static str,
    pub value: f64,
    /// The line: an upper bound, or a lower bound for top-1.
    pub line: f64,
    pub pass: bool,
}

fn upper(metric: &'static str, value: f64, line: f64) -> Check {
    Check {
        metric,
        value,
        line,
        pass: value.is_finite() && value < line,
    }
}

/// A metric that must be at least `line`.
fn lower(metric: &'static str, value: f64, line: f64) -> Check {
    Check {
        metric,
        value,
        line,
        pass: value >= line,
    }
}

/// Rows with a NaN or infinite logit fail any band, whatever the lines.
fn non_finite(m: &BandMetrics) -> Option<Check> {
    (m.non_finite_rows > 0).then_some(Check {
        metric: "non_finite_rows",
        value: m.non_finite_rows as f64,
        line: 0.0,
        pass: false,
    })
}

/// Fidelity of one band against the type's lines.
pub fn fidelity(m: &BandMetrics, lines: &PassLines) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(l) = lines.max_nmse {
        out.push(upper("nmse", m.nmse, l));
    }
    if let Some(l) = lines.max_kld {
        out.push(upper("kld_mean", m.kld_mean, l));
    }
    if let Some(l) = lines.min_top1 {
        out.push(lower("top1", m.top1, l));
    }
    out.extend(non_finite(m));
    out
}

/// How much worse than the band within c a band beyond it may be before it is "materially
/// worse": `x <= ratio * within + floor * line` for NMSE and KLD, and top-1 at most `top1_drop`
/// below the band within (docs/verifier.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LongContextRule {
    pub ratio: f64,
    pub floor: f64,
    pub top1_drop: f64,
}

impl Default for LongContextRule {
    fn default() -> Self {
        LongContextRule {
            ratio: 3.0,
            floor: 0.25,
            top1_drop: 0.05,
        }
    }
}

/// A band beyond c against the band within c. KLD is always judged (with the type's KLD line,
/// or 1e-3 for types judged on NMSE) so that a type without a KLD line still has one.
pub fn long_context(
    m: &BandMetrics,
    within: &BandMetrics,
    lines: &PassLines,
    rule: &LongContextRule,
) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(l) = lines.max_nmse {
        out.push(upper(
            "nmse_vs_within",
            m.nmse,
            rule.ratio * within.nmse + rule.floor * l,
        ));
    }
    let kl_line = lines.max_kld.unwrap_or(1e-3);
    out.push(upper(
        "kld_vs_within",
        m.kld_mean,
        rule.ratio * within.kld_mean + rule.floor * kl_line,
    ));
    let t = within.top1 - rule.top1_drop;
    out.push(lower("top1_vs_within", m.top1, t));
    out.extend(non_finite(m));
    out
}
