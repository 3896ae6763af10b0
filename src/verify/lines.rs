//! Pass lines: what a tensor type may cost (fidelity), and how much worse a band beyond the
//! original window may be than the band within it (long-context correctness).
//! docs/verifier.md gives the source of every number.

use serde::Serialize;

use super::metrics::BandMetrics;
use crate::gguf::types::{self, GgmlType};

/// Models below this many parameters are the `small` tier: llama.cpp's published KLD figures
/// (7-8B) do not say what a quantized type costs them (docs/verifier.md).
pub const SMALL_MODEL_PARAMS: u64 = 1_000_000_000;

/// The plain-quantization rule: a file may cost (KLD) this times what a plain quantization of
/// the checkpoint to the same per-tensor types costs in our forward, ...
pub const PLAIN_FACTOR: f64 = 2.0;

/// ... plus this times the runtime's own arithmetic noise (the consistency comparison within
/// c). To second order KLD is half a squared Fisher distance, so two perturbations that add as
/// vectors cost at most twice the sum of their costs: `KLD(a + b) <= 2 KLD(a) + 2 KLD(b)`.
pub const ARITHMETIC_FACTOR: f64 = 2.0;

/// KLD that f32 arithmetic alone can show (reordered sums): the floor of every KLD line that is
/// measured rather than anchored, so that a measured cost of 0 still leaves a line.
pub const KLD_FLOOR: f64 = 1e-6;

/// The type class a file is judged as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeClass {
    F32,
    F16,
    Q8_0,
    /// Q4_K .. Q6_K, and the legacy 4/5-bit block types (judged alike).
    KQuant,
    /// Q2_K and Q3_K: no published 7-8B anchor, judged by the plain-quantization rule.
    LowBit,
}

impl TypeClass {
    /// The class of the type that carries most of a file's weights.
    pub fn of(ty: GgmlType) -> TypeClass {
        match ty.code() {
            c if c == types::F32.code => TypeClass::F32,
            c if c == types::F16.code || c == types::BF16.code => TypeClass::F16,
            c if c == types::Q8_0.code => TypeClass::Q8_0,
            c if c == types::Q2_K.code || c == types::Q3_K.code => TypeClass::LowBit,
            _ => TypeClass::KQuant,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TypeClass::F32 => "f32",
            TypeClass::F16 => "f16/bf16",
            TypeClass::Q8_0 => "q8_0",
            TypeClass::KQuant => "k-quant/q4-q5",
            TypeClass::LowBit => "q2_k/q3_k",
        }
    }

    /// Whether the weights are block-quantized (llama.cpp then rounds the activations too).
    pub fn quantized(self) -> bool {
        !matches!(self, TypeClass::F32 | TypeClass::F16)
    }
}

/// Where a file's fidelity lines come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineRule {
    /// llama.cpp's published figures for 7-8B models (or the f32/f16 conversion checks).
    Anchor,
    /// [`PLAIN_FACTOR`] x the measured cost of a plain quantization of the same checkpoint to
    /// the same types, plus [`ARITHMETIC_FACTOR`] x the runtime's arithmetic noise.
    Plain,
    /// Given on the command line.
    Override,
}

/// Fidelity lines; `None` means the metric is reported but not judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PassLines {
    pub class: TypeClass,
    /// `large` (the 7-8B lines) or `small` (< 1B parameters).
    pub tier: String,
    pub rule: LineRule,
    pub max_nmse: Option<f64>,
    pub max_kld: Option<f64>,
    pub min_top1: Option<f64>,
    pub source: String,
}

impl PassLines {
    /// The lines for 7-8B models, from llama.cpp's published figures (issue 5; docs/verifier.md).
    /// q2_k/q3_k have none: they take the plain rule's lines, set by [`PassLines::with_plain`].
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
            TypeClass::LowBit => return PassLines::plain(class, "large"),
        };
        PassLines {
            class,
            tier: "large".into(),
            rule: LineRule::Anchor,
            max_nmse: nmse,
            max_kld: kld,
            min_top1: top1,
            source: source.into(),
        }
    }

    /// Lines of the plain-quantization rule, before the measurement sets the KLD line.
    fn plain(class: TypeClass, tier: &str) -> PassLines {
        PassLines {
            class,
            tier: tier.into(),
            rule: LineRule::Plain,
            max_nmse: None,
            max_kld: None,
            min_top1: None,
            source: format!(
                "{PLAIN_FACTOR} x the KLD of a plain quantization of the checkpoint to the same \
                 types (our forward) + {ARITHMETIC_FACTOR} x the runtime's arithmetic noise"
            ),
        }
    }

    /// The lines for models under [`SMALL_MODEL_PARAMS`] (docs/verifier.md, "Small models"):
    /// f32 and f16/bf16 keep the 7-8B lines (SmolLM2-135M f16 measures NMSE 6e-7..1.6e-6,
    /// top-1 99.9%); quantized types take the plain-quantization rule, measured on the model
    /// itself, since the 7-8B KLD figures do not say what a type costs a small model.
    pub fn small(class: TypeClass) -> PassLines {
        if class.quantized() {
            return PassLines::plain(class, "small");
        }
        let mut l = PassLines::large(class);
        l.tier = "small".into();
        l.source = format!("{}; SmolLM2-135M f16 measured within it", l.source);
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

    /// Whether the KLD line waits for the plain quantization's measured cost.
    pub fn needs_plain(&self) -> bool {
        self.rule == LineRule::Plain && self.max_kld.is_none()
    }

    /// The plain rule's KLD line from `plain_kld`, the within-window KLD of a plain quantization
    /// of the checkpoint to the file's types in our forward (before the runtime's arithmetic,
    /// which [`PassLines::for_backend`] adds).
    pub fn with_plain(mut self, plain_kld: f64) -> PassLines {
        if self.needs_plain() {
            self.max_kld = Some(PLAIN_FACTOR * plain_kld + KLD_FLOOR);
        }
        self
    }

    /// The lines one backend is judged by: under the plain rule, plus [`ARITHMETIC_FACTOR`] x
    /// its arithmetic noise (`arith_kld`, the consistency comparison's KLD within c).
    pub fn for_backend(&self, arith_kld: f64) -> PassLines {
        let mut l = self.clone();
        if l.rule == LineRule::Plain {
            if let Some(k) = l.max_kld.as_mut() {
                *k += ARITHMETIC_FACTOR * arith_kld.max(0.0);
            }
        }
        l
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
            self.rule = LineRule::Override;
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

/// How much the runtime may differ from our forward of the file with the reference recipe
/// beyond how much it differs from our forward of what its keys say (both rounded as the
/// runtime rounds, same band): the second is the runtime's own noise, so a recipe fault is what
/// the first adds. `x <= ratio * reading + floor` for NMSE and KLD, top-1 at most `top1_drop`
/// below (docs/verifier.md).
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

/// NMSE that f32 arithmetic alone may show: the conversion check's "identical" line.
pub const NMSE_F32: f64 = 1e-6;

/// How many times the measured cost of the runtime's rounding (our rounded forward against our
/// f32 forward of the same weights) the runtime may differ from our rounded reading of its keys.
/// Two roundings of the same activations that do not land on the same side of every rounding
/// boundary (a deep model's f32 reorderings flip some, and the flips compound layer by layer) are
/// two independent draws of the same noise; to second order their KL divergence is at most the
/// sum of each one's against f32, i.e. twice the measured cost.
pub const ROUNDING_FACTOR: f64 = 2.0;

/// One consistency band: `m`, the runtime against our forward of the file's own weights with
/// the reference recipe; `reading`, the same band against our forward of what the keys say;
/// `rounding`, the same band of our rounded forward against our f32 forward (zero when the
/// runtime rounds nothing).
/// - `nmse_vs_reading` / `kld_vs_reading` / `top1_vs_reading`: `m` at most `ratio` x the
///   reading plus `floor` x the f32 lines (NMSE 1e-6, KLD 4 x [`KLD_FLOOR`]): a recipe fault;
/// - `reading_nmse` / `reading_kld`: the reading at most [`ROUNDING_FACTOR`] x the rounding's
///   cost plus the f32 lines (NMSE 1e-6, KLD [`KLD_FLOOR`]): the runtime computes what its keys
///   say, to its arithmetic.
pub fn consistency(
    m: &BandMetrics,
    reading: &BandMetrics,
    rounding: &BandMetrics,
    rule: &LongContextRule,
) -> Vec<Check> {
    let mut out = vec![
        upper(
            "nmse_vs_reading",
            m.nmse,
            rule.ratio * reading.nmse + rule.floor * NMSE_F32,
        ),
        upper(
            "kld_vs_reading",
            m.kld_mean,
            rule.ratio * reading.kld_mean + rule.floor * 4.0 * KLD_FLOOR,
        ),
        lower("top1_vs_reading", m.top1, reading.top1 - rule.top1_drop),
        upper(
            "reading_nmse",
            reading.nmse,
            ROUNDING_FACTOR * rounding.nmse + NMSE_F32,
        ),
        upper(
            "reading_kld",
            reading.kld_mean,
            ROUNDING_FACTOR * rounding.kld_mean + KLD_FLOOR,
        ),
    ];
    out.extend(non_finite(m));
    out
}
