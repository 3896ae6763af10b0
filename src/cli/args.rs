//! The values and flag groups the binaries share, each parsed once by clap into a typed value:
//! devices, compute and weight dtypes, backends, runtime targets, GGUF out types, `--json`.
//! A command flattens the group it needs (`#[command(flatten)]`); no command parses these strings
//! itself.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, ValueEnum};

use crate::checkpoint::TensorDtype;
use crate::convert::quant_plan::OUT_TYPES;
use crate::convert::OutType;
use crate::rope::Target;
use crate::runtime::BackendKind;
use crate::train::schedule::ScheduleKind;

/// `--json`, the same in every command.
#[derive(Args, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JsonFlag {
    /// Print machine-readable JSON on stdout instead of the text summary.
    #[arg(long)]
    pub json: bool,
}

/// A compute device named on the command line: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(name: &str) -> Result<Device, String> {
        let bad = || format!("unknown device {name:?} (expected cpu or cuda:N)");
        if name == "cpu" {
            return Ok(Device::Cpu);
        }
        let rest = name.strip_prefix("cuda").ok_or_else(bad)?;
        match rest.strip_prefix(':') {
            Some(i) => i.parse().map(Device::Cuda).map_err(|_| bad()),
            None if rest.is_empty() => Ok(Device::Cuda(0)),
            None => Err(bad()),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Device {
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// The candle device; `cuda:N` needs a build with the `cuda` feature.
    pub fn open(self) -> anyhow::Result<candle_core::Device> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            Device::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!(
                        "device {self}: this binary was built without CUDA (rebuild with \
                         --features cuda, see scripts/build-cuda.sh)"
                    )
                }
                candle_core::Device::new_cuda(ordinal).with_context(|| format!("opening {self}"))
            }
        }
    }
}

/// `--device`.
#[derive(Args, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceArgs {
    /// cpu or cuda:N (CUDA needs a build with the `cuda` feature, scripts/build-cuda.sh).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// A compute dtype: `f32` or `bf16`.
pub fn compute_dtype() -> impl TypedValueParser<Value = DType> {
    PossibleValuesParser::new(["f32", "bf16"]).map(|s| {
        if s == "bf16" {
            DType::BF16
        } else {
            DType::F32
        }
    })
}

/// `--dtype` (f32 default) and `--device`: how a model directory runs in candle.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Compute dtype (model directories).
    #[arg(long, default_value = "f32", value_parser = compute_dtype())]
    pub dtype: DType,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The element type of written safetensors: `f32`, `f16` or `bf16`.
pub fn weight_dtype() -> impl TypedValueParser<Value = TensorDtype> {
    PossibleValuesParser::new(["f32", "f16", "bf16"]).map(|s| match s.as_str() {
        "f16" => TensorDtype::F16,
        "bf16" => TensorDtype::BF16,
        _ => TensorDtype::F32,
    })
}

/// One backend: `candle` or `llama.cpp`.
pub fn backend() -> impl TypedValueParser<Value = BackendKind> {
    PossibleValuesParser::new(["candle", "llama.cpp"]).try_map(|s| s.parse::<BackendKind>())
}

/// `--backend`, `--dtype` and `--device`: how a model (directory or GGUF) runs.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Engine for GGUF models: our candle reading of the file (as llama.cpp reads it) or real
    /// llama.cpp (builds with the `llamacpp` feature). Model directories run on candle.
    #[arg(long, default_value = "candle", value_parser = backend())]
    pub backend: BackendKind,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// abf-verify's candidates: one backend or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backends {
    Candle,
    #[value(name = "llama.cpp")]
    LlamaCpp,
    Both,
}

impl Backends {
    /// `both` in builds with llama.cpp, else `candle`.
    pub const fn default_for_build() -> Backends {
        if cfg!(feature = "llamacpp") {
            Backends::Both
        } else {
            Backends::Candle
        }
    }

    pub fn kinds(self) -> Vec<BackendKind> {
        match self {
            Backends::Candle => vec![BackendKind::Candle],
            Backends::LlamaCpp => vec![BackendKind::LlamaCpp],
            Backends::Both => vec![BackendKind::Candle, BackendKind::LlamaCpp],
        }
    }
}

/// The runtime GGUF keys are written for: `llama.cpp` or `exact` (`rope::Target`).
pub fn gguf_runtime() -> impl TypedValueParser<Value = Target> {
    PossibleValuesParser::new([Target::LlamaCpp.name(), Target::Exact.name()])
        .try_map(|s| s.parse::<Target>())
}

/// The runtime config.json is written for: `transformers` or `exact` (`rope::Target`).
pub fn config_runtime() -> impl TypedValueParser<Value = Target> {
    PossibleValuesParser::new([Target::Transformers.name(), Target::Exact.name()])
        .try_map(|s| s.parse::<Target>())
}

/// `--runtime` and `--allow-approximate` of the commands that write GGUF recipe keys.
#[derive(Args, Debug, Clone, Copy)]
pub struct GgufTarget {
    /// llama.cpp (its native keys) or exact (also our abf.recipe.* keys).
    #[arg(long, default_value = "llama.cpp", value_parser = gguf_runtime())]
    pub runtime: Target,
    /// Write the nearest runtime form of a recipe llama.cpp cannot run exactly.
    #[arg(long)]
    pub allow_approximate: bool,
}

/// A GGUF out type (`f32` ... `q5_k_m`, any case).
pub fn out_type() -> impl TypedValueParser<Value = OutType> {
    PossibleValuesParser::new(OUT_TYPES.iter().map(|r| r.1)).try_map(|s| s.parse::<OutType>())
}

/// A byte count: `N`, `NK`, `NM` or `NG` in decimal units (1K = 1000 bytes), as gguf-split and
/// `convert_hf_to_gguf.py --split-max-size` read it; at least 1.
pub fn byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, ' '),
    };
    let scale: u64 = match unit {
        ' ' => 1,
        'K' => 1_000,
        'M' => 1_000_000,
        'G' => 1_000_000_000,
        other => return Err(format!("{text:?}: unit {other:?} is not K, M or G")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected N, NK, NM or NG with N a whole number"))?;
    match n.checked_mul(scale) {
        Some(0) => Err(format!("{text:?}: must be at least 1 byte")),
        Some(b) => Ok(b),
        None => Err(format!("{text:?}: too large")),
    }
}

/// A learning-rate schedule: `cosine` or `constant`.
pub fn schedule() -> impl TypedValueParser<Value = ScheduleKind> {
    PossibleValuesParser::new(["cosine", "constant"]).try_map(|s| s.parse::<ScheduleKind>())
}

/// Token ids from a JSON file holding a list of integers.
pub fn read_token_ids(path: &Path) -> anyhow::Result<Vec<u32>> {
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&raw)
        .with_context(|| format!("{}: expected a JSON list of token ids", path.display()))
}

/// A whole text file.
pub fn read_text_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn byte_sizes_are_decimal_like_gguf_split() {
        assert_eq!(byte_size("4096"), Ok(4096));
        assert_eq!(byte_size("2K"), Ok(2_000));
        assert_eq!(byte_size("3m"), Ok(3_000_000));
        assert_eq!(byte_size("5G"), Ok(5_000_000_000));
        for bad in ["", "0", "0M", "1.5G", "-1", "7T", "G", "99999999999999G"] {
            assert!(byte_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_names() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        for bad in ["gpu", "cuda3", "cuda:", "cuda:x", "CPU", ""] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }

    fn leaves(cmd: clap::Command, out: &mut Vec<clap::Command>) {
        if cmd.has_subcommands() {
            for sub in cmd.get_subcommands() {
                leaves(sub.clone(), out);
            }
        } else {
            out.push(cmd);
        }
    }

    /// Every command of every binary: a valid clap definition, and `--json` the one boolean flag.
    #[test]
    fn json_is_the_same_flag_everywhere() {
        let mut all = Vec::new();
        for root in [
            crate::cli::convert::Cli::command(),
            crate::cli::eval::Cli::command(),
            crate::cli::tune::Cli::command(),
            crate::cli::verify::Cli::command(),
        ] {
            root.clone().debug_assert();
            leaves(root, &mut all);
        }
        assert_eq!(all.len(), 8 + 4 + 1 + 1);
        let help = |cmd: &clap::Command| {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == "json")
                .unwrap_or_else(|| panic!("{} has no --json", cmd.get_name()));
            assert!(
                matches!(arg.get_action(), clap::ArgAction::SetTrue),
                "{}: --json takes a value",
                cmd.get_name()
            );
            arg.get_help().map(|h| h.to_string())
        };
        let first = help(&all[0]);
        assert!(first.is_some());
        for cmd in &all {
            assert_eq!(help(cmd), first, "{}", cmd.get_name());
        }
    }
}
