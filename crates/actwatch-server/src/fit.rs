//! Fitting a served monitor: the batch pipeline over its committed segments, from scratch or
//! incrementally from the fit checkpoint, then the artifact saved, loaded back and installed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use actwatch_detect::monitor::MonitorFitter;
use actwatch_io::artifact::save_monitor_with;
use actwatch_io::checkpoint::{load_checkpoint, save_checkpoint, FitCheckpoint};
use actwatch_io::pipeline::{
    calibrate_reference_with, fold_examples, fold_reference, ExampleInput, Progress,
};
use actwatch_io::reader::ReadOptions;
use actwatch_proto::v1;
use tokio::sync::mpsc;
use tonic::Status;

use crate::storage::{
    load_fitted, FitRecord, FitRun, FittedMonitor, MonitorEntry, FIT_RECORD_FILE, LABEL_COLUMN,
};
use crate::{Error, Result};

/// Fit progress into a bounded channel; lossy, so a slow client never stalls the fit.
pub(crate) struct ChannelProgress {
    tx: mpsc::Sender<Result<v1::FitProgress, Status>>,
    /// (phase, rows done, rows total)
    phase: Mutex<(String, u64, u64)>,
}

impl ChannelProgress {
    pub(crate) fn new(tx: mpsc::Sender<Result<v1::FitProgress, Status>>) -> Self {
        Self {
            tx,
            phase: Mutex::new((String::new(), 0, 0)),
        }
    }
}

impl ChannelProgress {
    fn update(&self, f: impl FnOnce(&mut (String, u64, u64))) {
        let mut p = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut p);
        let _ = self.tx.try_send(Ok(v1::FitProgress {
            event: Some(v1::fit_progress::Event::Phase(v1::Phase {
                name: p.0.clone(),
                rows_done: p.1,
                rows_total: p.2,
            })),
        }));
    }
}

impl Progress for ChannelProgress {
    fn start(&self, phase: &str, total_rows: u64) {
        self.update(|p| *p = (phase.to_string(), 0, total_rows));
    }

    fn advance(&self, rows: u64) {
        self.update(|p| p.1 += rows);
    }

    fn finish(&self) {
        self.update(|p| p.1 = p.2);
    }
}

/// The saved fit state, if it can be resumed with `segments`: it must be intact, made with the
/// monitor's options, and have folded a prefix of the committed segments (they are append-only,
/// so anything else means it belongs to other data). `None` means: fit from scratch.
fn resumable(entry: &MonitorEntry, segments: &[String]) -> Option<(MonitorFitter, usize)> {
    let path = entry.checkpoint_path();
    if !path.exists() {
        return None;
    }
    let why = match load_checkpoint(&path) {
        Ok(ck) if ck.fitter.options() != &entry.options => "it was made with other options".into(),
        Ok(ck) if !segments.starts_with(&ck.folded) => {
            "its segments are not a prefix of the committed ones".into()
        }
        Ok(ck) => return Some((ck.fitter, ck.folded.len())),
        Err(e) => e.to_string(),
    };
    tracing::warn!(monitor = %entry.name, reason = %why, "fit checkpoint unusable; fitting from scratch");
    None
}

/// Verifies every segment against its checksum (quarantining those that fail, and then failing
/// with DATA_LOSS before anything is folded: [`MonitorEntry::verify_segments`]), fits on the
/// committed segments (from scratch, or, when `incremental`, by folding only the segments the
/// checkpoint has not seen), checkpoints the fitter, calibrates on all segments, saves the
/// artifact with its version (`fit.json`) in one atomic rename replacing the old one, loads it
/// back (so the served fit is exactly what a restart loads) and swaps it in. Segments of
/// labelled examples (`labelled`) go to the probes: their fit part is folded after the reference
/// segments, their calibration part scored after the reference's.
///
/// The checkpoint is written before calibration and names the segments it holds, so it is
/// consistent on its own whatever happens next: a later incremental fit resumes from it (a
/// checkpoint that folded a segment since quarantined is not a prefix of the segments left, so
/// the next fit starts over).
pub(crate) fn fit_and_install(
    entry: &MonitorEntry,
    segments: &[(String, PathBuf, bool)],
    incremental: bool,
    progress: &dyn Progress,
) -> Result<Arc<FittedMonitor>> {
    let saved = fit_and_save(entry, segments, incremental, progress)?;
    install_saved(entry, saved)
}

/// A fit saved in `fitted/` and not yet served.
pub(crate) struct SavedFit {
    record: FitRecord,
}

/// The first part of [`fit_and_install`]: everything up to and including the artifact's
/// installation in `fitted/`, with its version; a crash after it serves the new fit under that
/// version at restart.
pub(crate) fn fit_and_save(
    entry: &MonitorEntry,
    segments: &[(String, PathBuf, bool)],
    incremental: bool,
    progress: &dyn Progress,
) -> Result<SavedFit> {
    entry.verify_segments(segments)?;
    let read = ReadOptions::default();
    let names: Vec<String> = segments.iter().map(|(n, _, _)| n.clone()).collect();
    let paths = |labelled: bool, from: usize| -> Vec<PathBuf> {
        segments[from..]
            .iter()
            .filter(|s| s.2 == labelled)
            .map(|s| s.1.clone())
            .collect()
    };
    let resumed = if incremental {
        resumable(entry, &names)
    } else {
        None
    };
    let run_incremental = resumed.is_some();
    let (mut fitter, done) = match resumed {
        Some(r) => r,
        None => (MonitorFitter::new(entry.options.clone())?, 0),
    };
    let examples = |from: usize| -> Result<Option<ExampleInput>> {
        let files = paths(true, from);
        Ok((!files.is_empty())
            .then(|| ExampleInput::new(&files, &read, LABEL_COLUMN))
            .transpose()?)
    };
    let rows_folded = fold_reference(&mut fitter, &paths(false, done), &read, progress)?;
    if let Some(new) = examples(done)? {
        fold_examples(&mut fitter, &new, progress)?;
    }
    let checkpoint = FitCheckpoint {
        folded: names,
        fitter,
    };
    save_checkpoint(&checkpoint, &entry.checkpoint_path())?;
    let (monitor, reference) = calibrate_reference_with(
        checkpoint.fitter,
        &paths(false, 0),
        &read,
        examples(0)?.as_ref(),
        progress,
    )?;
    let record = FitRecord::new(
        entry.next_fit_version(),
        FitRun {
            incremental: run_incremental,
            rows_folded,
        },
    );
    let record_json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Corrupt {
        path: entry.fitted_dir().join(FIT_RECORD_FILE),
        message: format!("cannot encode the fit record: {e}"),
    })?;
    save_monitor_with(
        &monitor,
        &reference,
        &entry.fitted_dir(),
        &[(FIT_RECORD_FILE, &record_json)],
    )?;
    Ok(SavedFit { record })
}

/// The second part of [`fit_and_install`]: the saved fit loaded back, with its record, and
/// served.
pub(crate) fn install_saved(entry: &MonitorEntry, saved: SavedFit) -> Result<Arc<FittedMonitor>> {
    let dir = entry.fitted_dir();
    let (monitor, manifest, record) = load_fitted(&dir)?;
    if record != Some(saved.record) {
        return Err(Error::Corrupt {
            path: dir.join(FIT_RECORD_FILE),
            message: format!(
                "the fit just saved reads back as {record:?}, not as {:?}",
                saved.record
            ),
        });
    }
    entry.install_fit(monitor, manifest.reference.rows, saved.record)
}
