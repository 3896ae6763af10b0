//! Atomic output: every file abf writes goes to a sibling temporary file that is renamed over
//! the target only when complete, so a failure never leaves a half-written output.

mod direct;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use direct::Sink;

/// A file being written beside its final path; `commit` renames it into place, dropping it
/// without `commit` removes it.
pub struct AtomicFile {
    tmp: PathBuf,
    target: PathBuf,
    writer: Option<Sink>,
    /// Bytes written through `Write` so far, and how many of them writeback was started for.
    written: u64,
    kicked: u64,
}

/// Start the kernel's writeback every this many bytes, so that the disk works while the caller
/// converts the next tensor and the final fsync has little left to wait for.
const WRITEBACK_EVERY: u64 = 32 << 20;

impl AtomicFile {
    /// Create `target`'s temporary sibling. With `overwrite` false an existing target is an error.
    pub fn create(target: &Path, overwrite: bool) -> io::Result<AtomicFile> {
        if !overwrite && target.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists (use --force to replace it)", target.display()),
            ));
        }
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".to_string());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let sink = direct::create(&tmp)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", tmp.display())))?;
        Ok(AtomicFile {
            tmp,
            target: target.to_path_buf(),
            writer: Some(sink),
            written: 0,
            kicked: 0,
        })
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The writer over the temporary file (direct where the filesystem allows: `direct.rs`).
    pub(crate) fn writer(&mut self) -> &mut Sink {
        self.writer.as_mut().expect("writer present until commit")
    }

    /// Flush, sync, rename into place, and sync the directory so the rename itself survives a
    /// crash (POSIX: a rename is durable only once its directory is).
    pub fn commit(mut self) -> io::Result<()> {
        // sync while open (a failure drops self, which removes the temporary), then rename
        self.sync()?;
        let target = self.target.clone();
        self.rename_into_place()?;
        sync_parent(&target)
    }
}

impl AtomicFile {
    /// Flush and fsync the temporary file, keeping it open (and removed on drop).
    fn sync(&mut self) -> io::Result<()> {
        let w = self.writer();
        w.flush()?;
        w.file().sync_all()
    }

    /// Close the synced temporary file and rename it over the target (no directory sync); the
    /// temporary is removed when the rename fails.
    fn rename_into_place(mut self) -> io::Result<()> {
        drop(self.writer.take());
        fs::rename(&self.tmp, &self.target).map_err(|e| {
            let _ = fs::remove_file(&self.tmp);
            io::Error::new(
                e.kind(),
                format!(
                    "renaming {} to {}: {e}",
                    self.tmp.display(),
                    self.target.display()
                ),
            )
        })
    }
}

/// Commit several files as one output (the parts of a split GGUF): every file is synced before
/// any is renamed, so a failure while writing or syncing leaves no output (each dropped file
/// removes its temporary). The first file names the set (readers open it and find the others
/// by name), so an existing file at its path is removed before any rename and the first file
/// is renamed last: an interruption between the renames leaves no first file beside a mix of
/// old and new parts. A failed rename removes the files renamed before it.
pub fn commit_all(mut files: Vec<AtomicFile>) -> io::Result<()> {
    for f in &mut files {
        f.sync()?;
    }
    if let Some(first) = files.first() {
        match fs::remove_file(&first.target) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("removing {}: {e}", first.target.display()),
                ))
            }
            _ => {}
        }
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut renamed: Vec<PathBuf> = Vec::new();
    while let Some(f) = files.pop() {
        let target = f.target.clone();
        if let Err(e) = f.rename_into_place() {
            for t in &renamed {
                let _ = fs::remove_file(t);
            }
            return Err(e);
        }
        failpoint("commit-all-after-first-rename");
        let dir = target.parent().map(Path::to_path_buf).unwrap_or_default();
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
        renamed.push(target);
    }
    for d in dirs {
        sync_dir(if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &d
        })?;
    }
    Ok(())
}

impl AtomicFile {
    /// Flush the buffer and ask the kernel to begin writing back what was written since the last
    /// call (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`: it does not wait). Only a hint: the
    /// durability of the output still comes from the `sync_all` in `commit`.
    fn start_writeback(&mut self) -> io::Result<()> {
        let (from, to) = (self.kicked, self.written);
        let w = self.writer();
        if matches!(w, Sink::Direct(_)) {
            // direct writes reach the device as they are made: nothing waits in the page cache
            self.kicked = to;
            return Ok(());
        }
        w.flush()?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = w.file().as_raw_fd();
            if let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) {
                // SAFETY: a valid open descriptor and a byte range; the call reads no memory.
                unsafe { libc::sync_file_range(fd, off, len, libc::SYNC_FILE_RANGE_WRITE) };
            }
        }
        self.kicked = to;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.writer().write(buf)?;
        self.written += n as u64;
        if self.written - self.kicked >= WRITEBACK_EVERY {
            self.start_writeback()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer = None;
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Write a whole small file atomically.
pub fn write_atomic(target: &Path, bytes: &[u8], overwrite: bool) -> io::Result<()> {
    let mut f = AtomicFile::create(target, overwrite)?;
    f.write_all(bytes)?;
    f.commit()
}

/// fsync the directory holding `path` (after a rename or a create in it).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    sync_dir(dir)
}

/// fsync a directory itself (its entries: files created, renamed or removed in it).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The environment variable of [`failpoint`].
pub const FAILPOINT_ENV: &str = "ABF_FAILPOINT";

/// Test-only crash injection: when `ABF_FAILPOINT` equals `name`, the process kills itself with
/// SIGKILL on the spot (no unwinding, no destructors, no core dump), so a test can look at what
/// a crash at exactly that point leaves on disk. Unset in normal use: one environment lookup.
/// Points: `patch-after-first-write` (src/gguf/patch.rs, `write_in_place`);
/// `checkpoint-staging-partial` (src/train/trainer.rs, `save_checkpoint`: parameters written,
/// the rest not), `checkpoint-staged`, `checkpoint-old-aside`, `checkpoint-new-in`
/// (src/train/store.rs, `save`: before, in the middle of and after the swap), `export-partial`
/// (src/train/hf.rs, `export`: weights and tokenizer files moved in, config.json not),
/// `commit-all-after-first-rename` ([`commit_all`]: the last part of a split set in place, the
/// others not).
pub fn failpoint(name: &str) {
    if failpoint_set(name) {
        // SAFETY: kill(2) on our own pid with a constant signal has no memory-safety conditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Whether `ABF_FAILPOINT` equals `name`: for test-only faults other than a crash
/// (`poison-weights-step-N`, src/train/trainer.rs: step N's update leaves a NaN weight;
/// `multi-write-error`, src/convert/multi.rs; `buffered-output`, [`direct`]: no direct I/O).
pub fn failpoint_set(name: &str) -> bool {
    std::env::var_os(FAILPOINT_ENV).is_some_and(|v| v == name)
}
