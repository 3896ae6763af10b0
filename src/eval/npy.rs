//! NumPy `.npy` (format 1.0) writer for f32 arrays: the hand-off of logits to other tools.
//! Layout per numpy's `numpy/lib/format.py`: magic, version, u16 header length, a Python-dict
//! header padded with spaces to a multiple of 64 bytes and ending in a newline, then the data.

use std::io::{self, Write};
use std::path::Path;

use crate::fsutil::AtomicFile;

/// Encode the header of a little-endian f32 C-order array of `shape`.
pub fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let mut out = Vec::with_capacity(unpadded + pad);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&((dict.len() + pad + 1) as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    out
}

/// Write `data` (C order, `shape`) as an `.npy` file, atomically.
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32], overwrite: bool) -> io::Result<()> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: shape {shape:?} holds {n} values, got {}",
                path.display(),
                data.len()
            ),
        ));
    }
    let mut f = AtomicFile::create(path, overwrite)?;
    f.write_all(&npy_header(shape))?;
    for chunk in data.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        f.write_all(&bytes)?;
    }
    f.commit()
}
