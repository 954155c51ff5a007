//! Fitting a served monitor: the batch pipeline over its committed segments, from scratch or
//! incrementally from the fit checkpoint, then the artifact saved, loaded back and installed.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use actwatch_detect::check::{merge_groups, CHECK_ALPHA, CHECK_MAX_GROUPS};
use actwatch_detect::monitor::MonitorFitter;
use actwatch_io::artifact::save_monitor_with;
use actwatch_io::checkpoint::{load_checkpoint, save_checkpoint, FitCheckpoint};
use actwatch_io::pipeline::{
    calibrate_reference_with, check_reference, fold_examples, fold_reference, ExampleInput,
    Progress,
};
use actwatch_io::reader::ReadOptions;
use actwatch_proto::v1;
use tokio::sync::mpsc;
use tonic::Status;

use crate::storage::{
    load_fitted, FitDetails, FitRecord, FitRun, FittedMonitor, Ingest, IngestCheckRecord,
    MonitorEntry, ReferenceCheckRecord, FIT_RECORD_FILE, LABEL_COLUMN,
};
use crate::{Error, Limits, Result};

/// What one fit reads: the ingests it uses (every one, or those a `FitSelection` names), in
/// commit order, and whether it runs the reference check.
#[derive(Debug, Clone)]
pub(crate) struct FitPlan {
    pub ingests: Vec<Ingest>,
    pub check: bool,
}

impl FitPlan {
    /// Every committed ingest of `entry`.
    pub(crate) fn all(entry: &MonitorEntry, check: bool) -> Self {
        Self {
            ingests: entry.ingests(),
            check,
        }
    }

    /// The ingests of `entry` that `select` keeps (see `FitSelection` in the proto): those
    /// listed (all when the list is empty), minus those excluded, committed within the time
    /// bounds. An id the monitor does not hold is NOT_FOUND; a time bound over an ingest whose
    /// commit time is not recorded, or a selection without reference rows, FAILED_PRECONDITION;
    /// lists longer than `max_ingests_per_monitor`, RESOURCE_EXHAUSTED.
    pub(crate) fn select(
        entry: &MonitorEntry,
        select: &v1::FitSelection,
        check: bool,
        limits: &Limits,
    ) -> Result<Self> {
        let max = limits.max_ingests_per_monitor;
        if select.ingests.len() + select.exclude_ingests.len() > max {
            return Err(Error::LimitExceeded {
                limit: "max_ingests_per_monitor",
                max: max as u64,
                detail: format!(
                    "the fit selection lists {} ingests",
                    select.ingests.len() + select.exclude_ingests.len()
                ),
            });
        }
        let all = entry.ingests();
        let held: HashSet<u64> = all.iter().map(|i| i.id).collect();
        if let Some(&id) = select
            .ingests
            .iter()
            .chain(&select.exclude_ingests)
            .find(|id| !held.contains(id))
        {
            return Err(Error::IngestNotFound {
                monitor: entry.name.clone(),
                ingest: id,
            });
        }
        let (from, to) = (select.committed_from_unix_ms, select.committed_to_unix_ms);
        if from != 0 && to != 0 && from >= to {
            return Err(Error::BadSelection(format!(
                "committed_from_unix_ms ({from}) is not before committed_to_unix_ms ({to})"
            )));
        }
        let only: HashSet<u64> = select.ingests.iter().copied().collect();
        let exclude: HashSet<u64> = select.exclude_ingests.iter().copied().collect();
        let mut ingests = Vec::new();
        for i in all {
            if (!only.is_empty() && !only.contains(&i.id)) || exclude.contains(&i.id) {
                continue;
            }
            if from != 0 || to != 0 {
                let Some(t) = i.committed_unix_ms else {
                    return Err(Error::BadSelection(format!(
                        "ingest {} has no recorded commit time (it was stored by an older \
                         server): select by ingest id",
                        i.id
                    )));
                };
                if (from != 0 && t < from) || (to != 0 && t >= to) {
                    continue;
                }
            }
            ingests.push(i);
        }
        let plan = Self { ingests, check };
        if plan.reference_rows() == 0 {
            return Err(Error::BadSelection(format!(
                "it keeps {} ingests and no reference rows",
                plan.ingests.len()
            )));
        }
        Ok(plan)
    }

    /// The segments to read, in commit order: (file name, path, labelled).
    pub(crate) fn segments(&self) -> Vec<(String, PathBuf, bool)> {
        self.ingests
            .iter()
            .flat_map(|i| i.segments.iter().cloned())
            .collect()
    }

    /// Reference rows (labelled examples not counted) of the ingests.
    pub(crate) fn reference_rows(&self) -> u64 {
        self.ingests.iter().map(|i| i.rows).sum()
    }
}

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
    plan: &FitPlan,
    incremental: bool,
    progress: &dyn Progress,
) -> Result<Arc<FittedMonitor>> {
    let saved = fit_and_save(entry, plan, incremental, progress)?;
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
    plan: &FitPlan,
    incremental: bool,
    progress: &dyn Progress,
) -> Result<SavedFit> {
    let segments = &plan.segments();
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
    let mut record = FitRecord::new(
        entry.next_fit_version(),
        FitRun {
            incremental: run_incremental,
            rows_folded,
        },
    );
    record.details = FitDetails {
        ingests: plan.ingests.iter().map(|i| i.id).collect(),
        reference_check: plan
            .check
            .then(|| reference_check(entry, &plan.ingests, &read, progress)),
    };
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
    if record.as_ref() != Some(&saved.record) {
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

/// The reference check of a fit ([`actwatch_detect::check`]) over its ingests with reference
/// rows, each its own group (consecutive ones merged into blocks beyond
/// [`CHECK_MAX_GROUPS`]). It never fails the fit: what stops it is reported as `skipped`.
fn reference_check(
    entry: &MonitorEntry,
    ingests: &[Ingest],
    read: &ReadOptions,
    progress: &dyn Progress,
) -> ReferenceCheckRecord {
    let started = Instant::now();
    let skipped = |why: String| ReferenceCheckRecord {
        skipped: Some(why),
        alpha: CHECK_ALPHA,
        seconds: started.elapsed().as_secs_f64(),
        ingests: Vec::new(),
    };
    let checked: Vec<&Ingest> = ingests.iter().filter(|i| i.rows > 0).collect();
    if checked.len() < 2 {
        return skipped(
            "fewer than two ingests of reference rows: no ingest to compare another with".into(),
        );
    }
    let blocks = merge_groups(checked.len(), CHECK_MAX_GROUPS);
    let n = blocks.last().map_or(0, |b| b + 1);
    let mut files: Vec<Vec<PathBuf>> = vec![Vec::new(); n];
    let mut members: Vec<Vec<&Ingest>> = vec![Vec::new(); n];
    for (ingest, &b) in checked.iter().zip(&blocks) {
        files[b].extend(
            ingest
                .segments
                .iter()
                .filter(|(_, _, labelled)| !labelled)
                .map(|(_, path, _)| path.clone()),
        );
        members[b].push(ingest);
    }
    let sites: Vec<(String, usize)> = entry
        .state()
        .sites
        .iter()
        .map(|s| (s.name.clone(), s.width))
        .collect();
    let report = match check_reference(&files, &sites, read, progress) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(monitor = %entry.name, error = %e, "reference check failed; the fit goes on");
            return skipped(format!("failed: {e}"));
        }
    };
    let ingests: Vec<IngestCheckRecord> = report
        .groups
        .iter()
        .zip(&members)
        .map(|(g, m)| {
            let mut principals: Vec<String> =
                m.iter().filter_map(|i| i.principal.clone()).collect();
            principals.sort();
            principals.dedup();
            let worst = g.sites.first();
            IngestCheckRecord {
                first_ingest: m.first().map_or(0, |i| i.id),
                last_ingest: m.last().map_or(0, |i| i.id),
                principals,
                rows: g.rows,
                computations: g.computations,
                site: worst.map(|w| w.site.clone()),
                flagged_share: worst.map_or(0.0, |w| w.share),
                p_value: g.p_value,
                suspect: g.suspect,
            }
        })
        .collect();
    for i in ingests.iter().filter(|i| i.suspect) {
        tracing::warn!(
            monitor = %entry.name,
            first_ingest = i.first_ingest,
            last_ingest = i.last_ingest,
            principals = ?i.principals,
            flagged_share = i.flagged_share,
            site = i.site.as_deref().unwrap_or(""),
            "reference check: an ingest looks unlike the rest of the reference data \
             (poisoning, or data from elsewhere); exclude it with FitRequest.select if so"
        );
    }
    ReferenceCheckRecord {
        skipped: None,
        alpha: report.alpha,
        seconds: started.elapsed().as_secs_f64(),
        ingests,
    }
}
