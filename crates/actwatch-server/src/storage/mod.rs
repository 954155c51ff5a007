//! The data directory: one folder per monitor, every acknowledged write durable.
//!
//! ```text
//! <data-dir>/monitors/<name>/spec.json          what the monitor is (written once, atomically)
//! <data-dir>/monitors/<name>/state.json         sites and widths, committed segments (with their
//!                                               checksum and rows per site), fit version (a cache)
//! <data-dir>/monitors/<name>/reference/seg-<seq>-d<width>.arrow   (Arrow IPC; `.parquet` before
//!                                               2026-12-04, still read)
//! <data-dir>/monitors/<name>/quarantine/        segments that failed verification, each with a
//!                                               `<segment>.reason.json`; never read again
//! <data-dir>/monitors/<name>/fitted/            the offline core's monitor artifact (`save_monitor`)
//!                                               plus `fit.json`: the fit's version, installed with it
//! <data-dir>/monitors/<name>/fitter.bin         fit checkpoint: fitter state + segments folded in
//! <data-dir>/monitors/<name>/scores/log-<seq>.jsonl   the bounded score log
//! ```
//!
//! The decision a reader must know: `state.json` is the commit point of an ingest. A reference
//! segment is written by a `TraceWriter` (temporary name, fsync, rename, directory fsync: the one
//! durable write of `actwatch_io::durable`), hashed as it is written, and only then listed in
//! `state.json` with its checksum (written the same way); the ingest summary is sent after that.
//! At start, segment files that `state.json` does not list belong to ingests that were never
//! acknowledged and are deleted, so a client's retry cannot double them. Every fit first checks
//! each segment against its checksum and quarantines those that fail
//! ([`MonitorEntry::verify_segments`]). A fit's commit point is the rename of `fitted/`, which
//! holds its version (`fit.json`), so `state.json` only caches that version.

mod ingest;
mod monitor;
mod score_log;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use actwatch_io::durable;
use serde::{Deserialize, Serialize};

pub use ingest::{IngestSession, LABEL_COLUMN};
pub(crate) use monitor::load_fitted;
use monitor::SpecFile;
pub use monitor::{
    FitDetails, FitRecord, FitRun, FittedMonitor, Ingest, IngestCheckRecord, MonitorEntry,
    MonitorState, ReferenceCheckRecord,
};
pub use score_log::{LoggedProbe, LoggedScore, LoggedSlot, ScoreFilter, ScoreLog, ANOMALY};

use crate::convert::{options_from_spec, StoredSpec};
use crate::{Error, Result};

const MONITORS_DIR: &str = "monitors";
const SPEC_FILE: &str = "spec.json";
const STATE_FILE: &str = "state.json";
const REFERENCE_DIR: &str = "reference";
const FITTED_DIR: &str = "fitted";
const CHECKPOINT_FILE: &str = "fitter.bin";
const SCORES_DIR: &str = "scores";
const QUARANTINE_DIR: &str = "quarantine";
/// Beside a quarantined segment: why it was quarantined (`<segment>.reason.json`).
const QUARANTINE_REASON_SUFFIX: &str = ".reason.json";
/// Inside `fitted/`: the fit's version and run ([`FitRecord`]).
pub(crate) const FIT_RECORD_FILE: &str = "fit.json";
/// Version of `spec.json` and `state.json`.
const STORAGE_FORMAT_VERSION: u32 = 1;

pub(crate) fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes `value` as JSON to `path` through the one durable write ([`actwatch_io::durable`]).
fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(durable::write_atomic(path, &bytes)?)
}

fn sync_dir(dir: &Path) -> Result<()> {
    Ok(durable::sync_dir(dir)?)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(|e| Error::storage(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// All monitors of one data directory.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    monitors: RwLock<BTreeMap<String, Arc<MonitorEntry>>>,
    /// Monitors that could not be loaded at start (folder name -> why): not served, reported by
    /// `get` as damaged, removable by `delete`, so one damaged monitor never stops the others.
    damaged: Mutex<BTreeMap<String, String>>,
    /// Serialises create and delete, which touch the folder layout.
    layout: Mutex<()>,
    max_score_log_bytes: u64,
}

impl DataDir {
    /// Opens (creating if needed) a data directory and loads every monitor, with its fit where
    /// one was saved. Blocking: call it from `spawn_blocking` or before the runtime serves.
    pub fn open(root: impl Into<PathBuf>, max_score_log_bytes: u64) -> Result<Self> {
        let root = root.into();
        let monitors_dir = root.join(MONITORS_DIR);
        fs::create_dir_all(&monitors_dir).map_err(|e| Error::storage(&monitors_dir, e))?;
        let mut monitors = BTreeMap::new();
        let mut damaged = BTreeMap::new();
        let entries = fs::read_dir(&monitors_dir).map_err(|e| Error::storage(&monitors_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::storage(&monitors_dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A create or delete that did not finish.
                let _ = fs::remove_dir_all(&path);
                continue;
            }
            if !path.is_dir() {
                continue;
            }
            match load_entry(&path, max_score_log_bytes) {
                Ok(m) => {
                    monitors.insert(m.name.clone(), Arc::new(m));
                }
                Err(e) => {
                    tracing::error!(
                        monitor = %name,
                        error = %e,
                        "damaged monitor not served (DeleteMonitor removes it)"
                    );
                    damaged.insert(name, e.to_string());
                }
            }
        }
        Ok(Self {
            root,
            monitors: RwLock::new(monitors),
            damaged: Mutex::new(damaged),
            layout: Mutex::new(()),
            max_score_log_bytes,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The monitors that could not be loaded at start, with why.
    pub fn damaged(&self) -> Vec<(String, String)> {
        lock(&self.damaged)
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect()
    }

    /// The monitor `name`; a damaged one is [`Error::MonitorDamaged`], saying why.
    pub fn get(&self, name: &str) -> Result<Arc<MonitorEntry>> {
        let found = self
            .monitors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned();
        found.ok_or_else(|| match lock(&self.damaged).get(name) {
            Some(reason) => Error::MonitorDamaged {
                name: name.to_string(),
                reason: reason.clone(),
            },
            None => Error::MonitorNotFound(name.to_string()),
        })
    }

    pub fn list(&self) -> Vec<Arc<MonitorEntry>> {
        self.monitors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Creates an empty monitor: its folder is built under a dot name and renamed into place.
    pub fn create(&self, name: &str, spec: StoredSpec) -> Result<Arc<MonitorEntry>> {
        let _layout = lock(&self.layout);
        if self.get(name).is_ok() {
            return Err(Error::MonitorExists(name.to_string()));
        }
        let options = options_from_spec(&spec)?;
        let monitors_dir = self.root.join(MONITORS_DIR);
        let dir = monitors_dir.join(name);
        if dir.exists() {
            return Err(Error::MonitorExists(name.to_string()));
        }
        let tmp = monitors_dir.join(format!(".{name}.creating"));
        let _ = fs::remove_dir_all(&tmp);
        let build = || -> Result<()> {
            for sub in [REFERENCE_DIR, SCORES_DIR] {
                let d = tmp.join(sub);
                fs::create_dir_all(&d).map_err(|e| Error::storage(&d, e))?;
            }
            write_json_atomic(
                &tmp.join(SPEC_FILE),
                &SpecFile {
                    format_version: STORAGE_FORMAT_VERSION,
                    name: name.to_string(),
                    spec: spec.clone(),
                    created_unix_ms: now_unix_ms(),
                },
            )?;
            write_json_atomic(&tmp.join(STATE_FILE), &MonitorState::default())?;
            fs::rename(&tmp, &dir).map_err(|e| Error::storage(&dir, e))?;
            sync_dir(&monitors_dir)
        };
        if let Err(e) = build() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let entry = Arc::new(MonitorEntry {
            name: name.to_string(),
            spec,
            options,
            log: Mutex::new(ScoreLog::open(
                &dir.join(SCORES_DIR),
                self.max_score_log_bytes,
            )?),
            dir,
            state: Mutex::new(MonitorState::default()),
            fitted: RwLock::new(None),
            fit_lock: Arc::new(tokio::sync::Mutex::new(())),
            deleted: AtomicBool::new(false),
        });
        self.monitors
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), entry.clone());
        Ok(entry)
    }

    /// Deletes a monitor with everything it stored. Calls still holding it finish on their own
    /// copies, and commit nothing.
    pub fn delete(&self, name: &str) -> Result<()> {
        let _layout = lock(&self.layout);
        if lock(&self.damaged).remove(name).is_some() {
            return self.remove_folder(&self.root.join(MONITORS_DIR).join(name), name);
        }
        let entry = self.get(name)?;
        {
            let _state = lock(&entry.state);
            entry.deleted.store(true, Ordering::SeqCst);
        }
        self.monitors
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        self.remove_folder(&entry.dir, name)
    }

    /// Renames a monitor's folder out of the way (a dot name, removed at start if this stops
    /// half-way), makes that durable, then removes it.
    fn remove_folder(&self, dir: &Path, name: &str) -> Result<()> {
        let monitors_dir = self.root.join(MONITORS_DIR);
        let trash = monitors_dir.join(format!(".{name}.deleted-{}", now_unix_ms()));
        fs::rename(dir, &trash).map_err(|e| Error::storage(dir, e))?;
        sync_dir(&monitors_dir)?;
        fs::remove_dir_all(&trash).map_err(|e| Error::storage(&trash, e))
    }
}

fn load_entry(dir: &Path, max_score_log_bytes: u64) -> Result<MonitorEntry> {
    let spec_file: SpecFile = read_json(&dir.join(SPEC_FILE))?;
    let mut state: MonitorState = read_json(&dir.join(STATE_FILE))?;
    for (path, version) in [
        (dir.join(SPEC_FILE), spec_file.format_version),
        (dir.join(STATE_FILE), state.format_version),
    ] {
        if version != STORAGE_FORMAT_VERSION {
            return Err(Error::Corrupt {
                path,
                message: format!(
                    "format version {version}; this build reads {STORAGE_FORMAT_VERSION}"
                ),
            });
        }
    }
    let options = options_from_spec(&spec_file.spec)?;

    // Whether `state.json` must be rewritten (a quarantine or a fit whose recording a crash
    // interrupted).
    let mut repaired = reconcile_segments(dir, &mut state)?;

    remove_temporaries(dir);
    remove_temporaries(&dir.join(QUARANTINE_DIR));
    let fitted_dir = dir.join(FITTED_DIR);
    let fitted = if fitted_dir.exists() {
        match load_fitted(&fitted_dir) {
            Ok((monitor, manifest, record)) => {
                // The version is the fit's own; a fit saved before it carried one has
                // state.json's.
                let record = match record {
                    Some(r) => {
                        if r.fit_version > state.fit_version {
                            tracing::warn!(
                                monitor = %spec_file.name,
                                fit_version = r.fit_version,
                                recorded = state.fit_version,
                                "the fit was installed but its version not recorded in \
                                 state.json (a crash); serving it as fitted, repairing state.json"
                            );
                            state.fit_version = r.fit_version;
                            state.last_fit = r.run;
                            repaired = true;
                        }
                        r
                    }
                    None => FitRecord::new(state.fit_version.max(1), state.last_fit),
                };
                Some(Arc::new(FittedMonitor::new(
                    monitor,
                    &spec_file.spec,
                    record,
                    manifest.reference.rows,
                )?))
            }
            Err(e) => {
                // Never serve a damaged fit; the monitor stays usable and a refit repairs it.
                tracing::warn!(
                    monitor = %spec_file.name,
                    error = %e,
                    "not serving the stored fit; a refit repairs it"
                );
                None
            }
        }
    } else {
        None
    };
    if repaired {
        // What is served is already right (and the next write of state.json records it from
        // memory); failing to write the repair now only means repeating it at the next start.
        if let Err(e) = write_json_atomic(&dir.join(STATE_FILE), &state) {
            tracing::warn!(
                monitor = %spec_file.name,
                error = %e,
                "cannot write the repaired state.json; the next start repairs it again"
            );
        }
    }
    let scores = dir.join(SCORES_DIR);
    Ok(MonitorEntry {
        name: spec_file.name,
        spec: spec_file.spec,
        options,
        dir: dir.to_path_buf(),
        state: Mutex::new(state),
        fitted: RwLock::new(fitted),
        fit_lock: Arc::new(tokio::sync::Mutex::new(())),
        log: Mutex::new(ScoreLog::open(&scores, max_score_log_bytes)?),
        deleted: AtomicBool::new(false),
    })
}

/// Deletes the segments `state.json` does not list (ingests that were never acknowledged), keeping
/// their sequence numbers from being reused, leaves (and logs) files that are not segments,
/// finishes quarantines that a crash interrupted (a listed segment found in `quarantine/` is
/// dropped from `state`), and checks that every other listed segment is there. Returns whether
/// `state` changed in a way `state.json` must record.
fn reconcile_segments(dir: &Path, state: &mut MonitorState) -> Result<bool> {
    let reference = dir.join(REFERENCE_DIR);
    fs::create_dir_all(&reference).map_err(|e| Error::storage(&reference, e))?;
    let listed: HashSet<&str> = state.segments.iter().map(|s| s.file.as_str()).collect();
    for e in fs::read_dir(&reference).map_err(|e| Error::storage(&reference, e))? {
        let e = e.map_err(|e| Error::storage(&reference, e))?;
        let file = e.file_name().to_string_lossy().into_owned();
        if listed.contains(file.as_str()) {
            continue;
        }
        match segment_seq(&file) {
            // A segment (or its temporary file) of an ingest that was never acknowledged.
            Some(seq) => {
                state.next_segment = state.next_segment.max(seq + 1);
                tracing::info!(file = %e.path().display(), "removing an unacknowledged segment");
                let _ = fs::remove_file(e.path());
            }
            // Not ours: never read, never deleted, but said.
            None => tracing::warn!(
                file = %e.path().display(),
                "a file that is not a reference segment is in the reference folder; it is ignored"
            ),
        }
    }
    // Every listed segment holds the rows state.json says (its footer, read without the data),
    // and the segments hold the rows the sites add up to: a monitor whose files disagree is
    // quarantined, never fitted.
    let mut total = 0u64;
    let mut quarantined = Vec::new();
    for s in &state.segments {
        let p = reference.join(&s.file);
        if !p.is_file() && dir.join(QUARANTINE_DIR).join(&s.file).is_file() {
            quarantined.push(s.file.clone());
            continue;
        }
        if !p.is_file() {
            return Err(Error::Corrupt {
                path: dir.join(STATE_FILE),
                message: format!("listed segment {} is missing", p.display()),
            });
        }
        let rows = actwatch_io::reader::file_rows(&p).map_err(|e| Error::Corrupt {
            path: p.clone(),
            message: format!("unreadable reference segment: {e}"),
        })?;
        if rows != s.rows {
            return Err(Error::Corrupt {
                path: p,
                message: format!(
                    "the segment holds {rows} rows, but state.json lists {} for it",
                    s.rows
                ),
            });
        }
        total += rows;
    }
    for file in &quarantined {
        state.drop_segment(file).map_err(|message| Error::Corrupt {
            path: dir.join(STATE_FILE),
            message: format!("cannot finish quarantining segment {file}: {message}"),
        })?;
        tracing::warn!(
            file = %file,
            "finishing a quarantine a crash interrupted: the segment is dropped from state.json"
        );
    }
    let sites_total = state.reference_rows() + state.example_rows();
    if total != sites_total {
        return Err(Error::Corrupt {
            path: dir.join(STATE_FILE),
            message: format!(
                "the segments hold {total} rows, but the sites add up to {sites_total}"
            ),
        });
    }

    Ok(!quarantined.is_empty())
}

/// Removes what durable writes that did not finish left in `dir` (state, checkpoint, a fit
/// being saved).
fn remove_temporaries(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if durable::is_temporary(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        }
    }
}

fn segment_seq(file: &str) -> Option<u64> {
    file.strip_prefix("seg-")?
        .split(['-', '.'])
        .next()?
        .parse()
        .ok()
}
