//! The q/k row permutation between Hugging Face's rotate-half RoPE layout and llama.cpp's
//! interleaved pairs. llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) reshapes a
//! `[n_head * d, hidden]` weight to `[n_head, 2, d/2, hidden]`, swaps axes 1 and 2 and reshapes
//! back. As a row gather: GGUF row `h*d + 2i + j` is HF row `h*d + j*d/2 + i`
//! (`h` head, `i < d/2`, `j < 2`). Rows are moved as raw bytes, so any element type works.

use super::error::ConvertError;

/// The HF row that lands at GGUF row `r` (heads of `d` rows).
#[inline]
fn hf_row_for(r: usize, d: usize) -> usize {
    let (h, k) = (r / d, r % d);
    let (i, j) = (k / 2, k % 2);
    h * d + j * (d / 2) + i
}

fn check(name: &str, len: usize, rows: usize, n_head: usize) -> Result<usize, ConvertError> {
    if n_head == 0 || rows == 0 || !rows.is_multiple_of(n_head) {
        return Err(ConvertError::tensor(
            name,
            format!("{rows} rows do not split into {n_head} heads"),
        ));
    }
    let d = rows / n_head;
    if !d.is_multiple_of(2) {
        return Err(ConvertError::tensor(
            name,
            format!("head size {d} is odd: no rotary pairs"),
        ));
    }
    if !len.is_multiple_of(rows) {
        return Err(ConvertError::tensor(
            name,
            format!("{len} bytes are not {rows} whole rows"),
        ));
    }
    Ok(d)
}

fn gather(data: &[u8], rows: usize, d: usize, inverse: bool) -> Vec<u8> {
    let row = data.len() / rows;
    let mut out = vec![0u8; data.len()];
    for (r, dst) in out.chunks_exact_mut(row).enumerate() {
        let s = hf_row_for(r, d);
        // forward: out[gguf r] = in[hf s]; inverse: out[hf s] = in[gguf r]
        if inverse {
            continue;
        }
        dst.copy_from_slice(&data[s * row..(s + 1) * row]);
    }
    if inverse {
        for r in 0..rows {
            let s = hf_row_for(r, d);
            out[s * row..(s + 1) * row].copy_from_slice(&data[r * row..(r + 1) * row]);
        }
    }
    out
}

/// HF -> GGUF: permute the `rows` rows of `data` (row-major bytes) for `n_head` heads.
pub fn permute_qk(
    name: &str,
    data: &[u8],
    rows: usize,
    n_head: usize,
) -> Result<Vec<u8>, ConvertError> {
    let d = check(name, data.len(), rows, n_head)?;
    Ok(gather(data, rows, d, false))
}

/// GGUF -> HF: the inverse of [`permute_qk`].
pub fn unpermute_qk(
    name: &str,
    data: &[u8],
    rows: usize,
    n_head: usize,
) -> Result<Vec<u8>, ConvertError> {
    let d = check(name, data.len(), rows, n_head)?;
    Ok(gather(data, rows, d, true))
}
