//! The one durable write: a temporary file next to the destination, written, fsynced, renamed
//! into place, then the directory fsynced, so that once [`AtomicFile::commit`] returns the file
//! is whole and survives a crash, and before it nothing at the destination has changed.
//!
//! Every file actwatch writes for keeps goes through here (monitor state, checkpoints, artifacts,
//! Parquet output and reference segments), with one semantics: a failed directory fsync is an
//! error like any other, never ignored, because whoever records the file as written next (a
//! `state.json` listing a segment, a manifest listing a blob) must be able to rely on it.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Marks temporary files and directories: `<name>.tmp-<pid>-<n>`.
const TMP_MARK: &str = ".tmp-";

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary sibling of `path` (unique within and across processes).
pub fn temporary_path(path: &Path) -> Result<PathBuf> {
    let Some(name) = path.file_name() else {
        return Err(Error::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
        ));
    };
    let mut tmp: OsString = name.to_os_string();
    tmp.push(format!(
        "{TMP_MARK}{}-{}",
        std::process::id(),
        NEXT_TMP.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(path.with_file_name(tmp))
}

/// Whether `name` is a temporary name of this module (a write that never committed).
pub fn is_temporary(name: &str) -> bool {
    name.contains(TMP_MARK)
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes the entries of `dir` (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Writes `bytes` to a new file at `path` and fsyncs it (no rename: for files inside a directory
/// that is itself being built under a temporary name, see [`crate::artifact`]).
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Replaces `path` with `bytes`, atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.commit()
}

/// A file being written under a temporary name; [`AtomicFile::commit`] puts it in place.
/// Dropped without committing, it removes the temporary file and `path` is untouched.
#[derive(Debug)]
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    pub fn create(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let tmp = temporary_path(&path)?;
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self {
            path,
            tmp,
            file: Some(file),
        })
    }

    /// The destination.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open temporary file, for writers that need a `File` (e.g. Parquet's).
    pub fn try_clone_file(&self) -> Result<File> {
        self.file
            .as_ref()
            .expect("open until commit")
            .try_clone()
            .map_err(|e| Error::io(&self.tmp, e))
    }

    /// Starts writing back bytes `offset..offset + len` of the temporary file and drops those of
    /// them already written back from the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`,
    /// which on Linux does both; advice only: neither durability nor the file's bytes change,
    /// and a failure is ignored). For a long file written once and read later, called over the
    /// span behind the writer ([`StreamRelease`]): the disk works while the rest arrives instead
    /// of all at the commit's fsync, and the file's pages are reused instead of the page cache
    /// taking fresh memory for each (on a VM, first touching memory the host has reclaimed cost
    /// about 3 ms per MB here, more than everything else a segment's write did).
    pub fn release_written(&self, offset: u64, len: u64) {
        if let Some(f) = &self.file {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let _ = rustix::fs::fadvise(
                f,
                offset,
                std::num::NonZeroU64::new(len),
                rustix::fs::Advice::DontNeed,
            );
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            let _ = (f, offset, len);
        }
    }

    /// fsync, rename onto the destination, fsync the directory. On failure the temporary file is
    /// removed and the destination keeps whatever it held before.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("open until commit");
        let result = file
            .sync_all()
            .map_err(|e| Error::io(&self.tmp, e))
            .and_then(|()| {
                drop(file);
                fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))
            });
        if let Err(e) = result {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        sync_dir(parent_dir(&self.path))
    }
}

/// When a file written front to back releases what is behind it ([`AtomicFile::release_written`]):
/// every `window` bytes, over the last two windows, so each span is advised twice: once as it is
/// written (its write-back starts) and once a window later (its pages, clean by then, are
/// dropped).
#[derive(Debug, Clone, Copy)]
pub struct StreamRelease {
    window: u64,
    /// Bytes written so far.
    written: u64,
    /// Where the last two windows start.
    older: u64,
    newer: u64,
}

impl StreamRelease {
    pub fn new(window: u64) -> Self {
        Self {
            window: window.max(1),
            written: 0,
            older: 0,
            newer: 0,
        }
    }

    /// Notes `n` more bytes written to `file`, releasing once a window has filled.
    pub fn wrote(&mut self, file: &AtomicFile, n: usize) {
        if let Some((offset, len)) = self.span(n) {
            file.release_written(offset, len);
        }
    }

    /// Notes `n` more bytes written; the span to release now, if a window has filled.
    fn span(&mut self, n: usize) -> Option<(u64, u64)> {
        self.written += n as u64;
        if self.written - self.newer < self.window {
            return None;
        }
        let span = (self.older, self.written - self.older);
        self.older = self.newer;
        self.newer = self.written;
        Some(span)
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().expect("open until commit").write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("open until commit").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte is advised twice (write-back started, then dropped a window later), the spans
    /// never reach past what was written, and nothing is advised before a window fills.
    #[test]
    fn a_stream_releases_each_span_twice_one_window_behind() {
        let mut r = StreamRelease::new(10);
        let spans: Vec<_> = [4, 4, 4, 25, 1, 9, 3].map(|n| r.span(n)).to_vec();
        assert_eq!(
            spans,
            [
                None,
                None,
                Some((0, 12)),
                Some((0, 37)),
                None,
                Some((12, 35)),
                None
            ]
        );
    }

    #[test]
    fn commits_whole_files_and_leaves_nothing_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");

        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"two, unfinished").unwrap();
        drop(f);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["state.json"]);

        let a = temporary_path(&path).unwrap();
        let b = temporary_path(&path).unwrap();
        assert_ne!(a, b);
        assert!(is_temporary(&a.file_name().unwrap().to_string_lossy()));
        assert!(!is_temporary("seg-00000001-d384.parquet"));

        // A directory that cannot be synced (it does not exist) is an error, not ignored.
        assert!(write_atomic(&dir.path().join("missing/x.json"), b"x").is_err());
    }
}
