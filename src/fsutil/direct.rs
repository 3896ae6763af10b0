//! Output written around the page cache (Linux `O_DIRECT`): whole 4 KiB blocks go from one
//! reused, aligned buffer straight to the device. Buffered output costs a kernel copy of every
//! byte into fresh page-cache pages plus their writeback; on the machines abf is measured on that
//! copy is the pass's largest cost beside the quantizers, and it grows when it runs next to them
//! (docs/benchmarks.md, "to-gguf memory and one-pass types"). The buffer copy here stays in cache.
//!
//! Where the filesystem refuses direct I/O (at open, or on the first write) the file is written
//! buffered instead; the bytes are the same either way. The unaligned tail goes out buffered at
//! `flush`, after which the file is an ordinary buffered one.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// Direct writes must start at, and be a multiple of, the device's logical block size in both
/// the file and memory; 4 KiB covers every block size in use.
const ALIGN: usize = 4096;
/// Bytes gathered before a direct write: large enough that each write keeps the device busy.
const CAP: usize = 8 << 20;

/// A file being written, directly when the filesystem allows it.
pub(crate) enum Sink {
    Buffered(BufWriter<File>),
    Direct(DirectWriter),
}

pub(crate) struct DirectWriter {
    file: File,
    /// `CAP + ALIGN` bytes; the aligned window starts at `off`.
    buf: Vec<u8>,
    off: usize,
    len: usize,
    /// Whether a direct write has succeeded yet (a refusal before that falls back quietly).
    proven: bool,
}

fn buffered(file: File) -> Sink {
    Sink::Buffered(BufWriter::with_capacity(1 << 22, file))
}

/// Open `path` for writing (created, truncated; readable too), directly where possible.
pub(crate) fn create(path: &Path) -> io::Result<Sink> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(true);
    #[cfg(target_os = "linux")]
    if !crate::fsutil::failpoint_set("buffered-output") {
        use std::os::unix::fs::OpenOptionsExt;
        let mut direct = opts.clone();
        direct.custom_flags(libc::O_DIRECT);
        if let Ok(file) = direct.open(path) {
            let buf = vec![0u8; CAP + ALIGN];
            let off = buf.as_ptr().align_offset(ALIGN);
            return Ok(Sink::Direct(DirectWriter {
                file,
                buf,
                off,
                len: 0,
                proven: false,
            }));
        }
    }
    opts.open(path).map(buffered)
}

/// Turn off `O_DIRECT` on an open file (Linux allows it through `F_SETFL`).
#[cfg(target_os = "linux")]
fn clear_direct(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a valid open descriptor with integer arguments; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn clear_direct(_: &File) -> io::Result<()> {
    Ok(())
}

impl DirectWriter {
    /// Write the whole blocks held, keeping the tail at the front of the window. Ok(false)
    /// when the filesystem refused the first direct write (nothing was written).
    fn write_blocks(&mut self) -> io::Result<bool> {
        let n = self.len / ALIGN * ALIGN;
        if n == 0 {
            return Ok(true);
        }
        let window = &self.buf[self.off..self.off + n];
        match (&self.file).write_all(window) {
            Ok(()) => self.proven = true,
            Err(e) if !self.proven && e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
            Err(e) => return Err(e),
        }
        self.buf
            .copy_within(self.off + n..self.off + self.len, self.off);
        self.len -= n;
        Ok(true)
    }

    /// The bytes held (not yet in the file).
    fn held(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl Sink {
    /// The open file (its content may lag what was written until `flush`).
    pub(crate) fn file(&self) -> &File {
        match self {
            Sink::Buffered(w) => w.get_ref(),
            Sink::Direct(d) => &d.file,
        }
    }

    /// Leave direct mode: the held bytes are written buffered, and so is everything after.
    fn leave_direct(&mut self) -> io::Result<()> {
        if let Sink::Direct(d) = self {
            clear_direct(&d.file)?;
            let file = d.file.try_clone()?;
            let held = d.held().to_vec();
            *self = buffered(file);
            self.write_all(&held)?;
        }
        Ok(())
    }
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let d = match self {
            Sink::Buffered(w) => return w.write(data),
            Sink::Direct(d) => d,
        };
        let mut rest = data;
        while !rest.is_empty() {
            let n = (CAP - d.len).min(rest.len());
            let at = d.off + d.len;
            d.buf[at..at + n].copy_from_slice(&rest[..n]);
            d.len += n;
            rest = &rest[n..];
            if d.len == CAP && !d.write_blocks()? {
                // refused: everything so far goes out buffered, and the rest too
                self.leave_direct()?;
                self.write_all(rest)?;
                return Ok(data.len());
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Sink::Direct(d) = self {
            // whole blocks directly; the tail (not a block) leaves direct mode
            d.write_blocks()?;
            self.leave_direct()?;
        }
        match self {
            Sink::Buffered(w) => w.flush(),
            Sink::Direct(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes written through a sink in pieces of awkward sizes (single bytes, less than a block,
    /// more than the buffer), with a flush in the middle and writes after it, land in the file
    /// exactly, whichever mode the file was opened in.
    #[test]
    fn pieces_land_exactly_in_either_mode() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [1usize, 4095, 1, CAP + 3, 7, ALIGN, 2 * CAP - 1, 0, 13];
        let mut expected = Vec::new();
        let mut x = 0x9e37_79b9u32;
        let pieces: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| {
                        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (x >> 24) as u8
                    })
                    .collect()
            })
            .collect();
        for p in &pieces {
            expected.extend_from_slice(p);
        }
        for direct in [true, false] {
            let path = dir.path().join(format!("out-{direct}"));
            let mut sink = if direct {
                create(&path).unwrap()
            } else {
                buffered(File::create(&path).unwrap())
            };
            for (i, p) in pieces.iter().enumerate() {
                sink.write_all(p).unwrap();
                if i == 3 {
                    sink.flush().unwrap();
                }
            }
            sink.flush().unwrap();
            sink.file().sync_all().unwrap();
            drop(sink);
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), expected.len(), "direct={direct}");
            assert!(got == expected, "direct={direct}: content differs");
        }
    }

    /// Where the filesystem opens files for direct I/O (this machine's temp dir, ext4), `create`
    /// takes it, so the test above exercises the direct path and not only the fallback.
    #[test]
    #[cfg(target_os = "linux")]
    fn direct_io_is_taken_where_the_filesystem_has_it() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let probe = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("probe"));
        let sink = create(&dir.path().join("x")).unwrap();
        match probe {
            Ok(_) if !crate::fsutil::failpoint_set("buffered-output") => {
                assert!(matches!(sink, Sink::Direct(_)))
            }
            _ => eprintln!(
                "{}: no direct I/O here; only the fallback ran",
                dir.path().display()
            ),
        }
    }
}
