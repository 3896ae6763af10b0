//! The matrix in memory, reading either file form, and the weights a quantizer takes.

use std::collections::BTreeMap;
use std::path::Path;

use super::error::ImatrixError;

/// One weight's sums: `n_mat` matrices (1 for a dense weight, one per expert for a stack) of
/// `n_per_row` input columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// `n_per_row * n_mat` sums of squared activations, matrix by matrix.
    pub sums: Vec<f32>,
    /// Activation rows summed, one per matrix. The legacy `.dat` form stores averages scaled by
    /// its `ncall`, which stands here as the count (llama.cpp's loader does the same).
    pub counts: Vec<u64>,
}

impl Entry {
    pub fn n_mat(&self) -> usize {
        self.counts.len()
    }

    pub fn n_per_row(&self) -> usize {
        self.sums.len() / self.counts.len().max(1)
    }

    /// Per-column importance as llama.cpp's quantize takes it: each sum divided by its matrix's
    /// count; a matrix that saw no rows gets 1 everywhere (`tools/quantize/quantize.cpp`).
    pub fn weights(&self) -> Vec<f32> {
        let n = self.n_per_row();
        let mut out = Vec::with_capacity(self.sums.len());
        for (m, &c) in self.counts.iter().enumerate() {
            let row = &self.sums[m * n..(m + 1) * n];
            if c == 0 {
                out.extend(std::iter::repeat_n(1.0, n));
            } else {
                out.extend(row.iter().map(|s| (*s as f64 / c as f64) as f32));
            }
        }
        out
    }
}

/// An importance matrix: entries by GGUF weight name (`blk.0.attn_q.weight`) and the run's
/// metadata.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImportanceMatrix {
    pub entries: BTreeMap<String, Entry>,
    /// The calibration texts (`imatrix.datasets`).
    pub datasets: Vec<String>,
    /// Chunks evaluated (`imatrix.chunk_count`).
    pub chunk_count: u32,
    /// Tokens per chunk (`imatrix.chunk_size`; 0 when unknown, as in the legacy form).
    pub chunk_size: u32,
}

impl ImportanceMatrix {
    /// Per-column weights of every entry ([`Entry::weights`]), by GGUF weight name.
    pub fn weights(&self) -> BTreeMap<String, Vec<f32>> {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), e.weights()))
            .collect()
    }
}

/// Read an importance matrix: llama.cpp's GGUF form when the file starts with the GGUF magic,
/// else its legacy `.dat` form (llama.cpp's loader also falls back that way).
pub fn read(path: &Path) -> Result<ImportanceMatrix, ImatrixError> {
    let bytes = std::fs::read(path).map_err(|source| ImatrixError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.starts_with(crate::gguf::reader::MAGIC) {
        super::gguf_file::parse_gguf(&bytes, path)
    } else {
        super::legacy::parse_legacy(&bytes, path)
    }
}
