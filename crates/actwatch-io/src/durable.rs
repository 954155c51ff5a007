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
