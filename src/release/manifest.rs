//! `release.json` and `SHA256SUMS`: what a release holds, computed once and read by the card.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::verify::{BandMetrics, VerifyReport};

/// KLD, top-1 and PPL ratio over a set of positions (position-weighted over bands).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub positions: usize,
    pub kld: f64,
    pub top1: f64,
    pub ppl_ratio: f64,
}

impl Summary {
    /// Position-weighted means of KLD and top-1; the PPL ratio as the exp of the weighted mean
    /// of its logs (it is an exp of a mean NLL difference per band). None for no bands.
    pub fn of(bands: &[&BandMetrics]) -> Option<Summary> {
        let n: usize = bands.iter().map(|b| b.positions).sum();
        if n == 0 {
            return None;
        }
        let w = |f: &dyn Fn(&BandMetrics) -> f64| {
            bands.iter().map(|b| f(b) * b.positions as f64).sum::<f64>() / n as f64
        };
        Some(Summary {
            positions: n,
            kld: w(&|b| b.kld_mean),
            top1: w(&|b| b.top1),
            ppl_ratio: w(&|b| b.ppl_ratio.ln()).exp(),
        })
    }
}

/// One backend's numbers for a file: fidelity within and beyond the original window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendSummary {
    pub backend: String,
    pub within: Option<Summary>,
    pub beyond: Option<Summary>,
    pub pass: bool,
}

/// One file of the release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Names relative to the release directory (the first part of a split set first).
    pub files: Vec<String>,
    pub outtype: String,
    pub bytes: u64,
    pub bits_per_weight: f64,
    pub sha256: Vec<String>,
    pub backends: Vec<BackendSummary>,
    pub pass: bool,
    /// Why it failed (the verifier's metadata issues, weight findings and diagnosis).
    pub findings: Vec<String>,
}

/// `release.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub source: String,
    /// The recipe in words and as the `abf_recipe` block.
    pub recipe: String,
    pub recipe_block: serde_json::Value,
    pub original_context: u64,
    pub context: u64,
    pub parameters: u64,
    pub verified_tokens: String,
    pub verified_length: usize,
    pub imatrix: Option<String>,
    pub files: Vec<FileEntry>,
    pub pass: bool,
    pub abf_version: String,
}

/// The numbers of one verified file, by backend.
pub fn backend_summaries(r: &VerifyReport) -> Vec<BackendSummary> {
    r.backends
        .iter()
        .map(|b| {
            let within: Vec<&BandMetrics> = b
                .bands
                .iter()
                .filter(|x| x.within_original)
                .map(|x| &x.metrics)
                .collect();
            let beyond: Vec<&BandMetrics> = b
                .bands
                .iter()
                .filter(|x| !x.within_original)
                .map(|x| &x.metrics)
                .collect();
            BackendSummary {
                backend: b.backend.clone(),
                within: Summary::of(&within),
                beyond: Summary::of(&beyond),
                pass: b.fidelity_pass && b.runtime_pass,
            }
        })
        .collect()
}

/// What a failed report says, one line per finding.
pub fn findings(r: &VerifyReport) -> Vec<String> {
    if r.pass {
        return Vec::new();
    }
    let mut out: Vec<String> = r
        .metadata
        .iter()
        .map(|i| format!("metadata: {}", i.message))
        .collect();
    for b in &r.backends {
        for d in &b.diagnosis {
            let line = format!("{}: {}", b.backend, d.trim());
            if !out.contains(&line) {
                out.push(line);
            }
        }
    }
    out
}

/// SHA-256 of a file, hex, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `SHA256SUMS` in `sha256sum`'s format (`HEX  NAME`), names sorted.
pub fn sha256sums(entries: &[(String, String)]) -> String {
    let mut e = entries.to_vec();
    e.sort_by(|a, b| a.0.cmp(&b.0));
    e.iter()
        .map(|(name, hex)| format!("{hex}  {name}\n"))
        .collect()
}
