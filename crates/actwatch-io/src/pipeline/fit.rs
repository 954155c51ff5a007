//! Fitting from Parquet: the fit pass and the calibration pass.

use std::collections::HashSet;
use std::path::PathBuf;

use actwatch_detect::monitor::{Monitor, MonitorCalibrator, MonitorFitter, MonitorOptions};
use sha2::{Digest, Sha256};

use super::Progress;
use crate::artifact::ReferenceSummary;
use crate::reader::{expand_inputs, ReadOptions, TraceBatch, TraceReader};
use crate::{Error, Result};

/// Fits a monitor on the reference traces in `inputs` (files or directories of Parquet):
/// [`fold_reference`] into a new fitter, then [`calibrate_reference`] over the same files.
pub fn fit_monitor(
    inputs: &[PathBuf],
    read: &ReadOptions,
    options: MonitorOptions,
    progress: &dyn Progress,
) -> Result<(Monitor, ReferenceSummary)> {
    fit_monitor_with_examples(inputs, read, options, None, progress)
}

/// Labelled examples for a monitor's concept probes: Parquet files of traces (the same long
/// format as reference traces) with a label column (boolean, or an integer 0 or 1; one label
/// per computation).
#[derive(Debug, Clone)]
pub struct ExampleInput {
    pub files: Vec<PathBuf>,
    pub read: ReadOptions,
    pub label_column: String,
}

impl ExampleInput {
    /// The examples in `inputs` (files or directories), read with `read`'s columns plus
    /// `label_column`.
    pub fn new(inputs: &[PathBuf], read: &ReadOptions, label_column: &str) -> Result<Self> {
        Ok(Self {
            files: expand_inputs(inputs)?,
            read: ReadOptions {
                keep_other_columns: true,
                ..read.clone()
            },
            label_column: label_column.to_string(),
        })
    }
}

/// [`fit_monitor`], with labelled examples for the monitor's probes: the fit part of the
/// examples is folded after the reference traces ([`fold_examples`]), their calibration part
/// scored after the reference's ([`calibrate_reference_with`]).
pub fn fit_monitor_with_examples(
    inputs: &[PathBuf],
    read: &ReadOptions,
    options: MonitorOptions,
    examples: Option<&ExampleInput>,
    progress: &dyn Progress,
) -> Result<(Monitor, ReferenceSummary)> {
    let files = expand_inputs(inputs)?;
    let mut fitter = MonitorFitter::new(options)?;
    fold_reference(&mut fitter, &files, read, progress)?;
    if let Some(ex) = examples {
        fold_examples(&mut fitter, ex, progress)?;
    }
    calibrate_reference_with(fitter, &files, read, examples, progress)
}

/// The fit pass over labelled examples: pushes their fit part (the same seeded split as the
/// reference traces) into `fitter`'s probes; returns the rows read.
pub fn fold_examples(
    fitter: &mut MonitorFitter,
    examples: &ExampleInput,
    progress: &dyn Progress,
) -> Result<u64> {
    let reader = TraceReader::open(&examples.files, examples.read.clone())?;
    if reader.total_rows() == 0 {
        return Err(Error::NoInput("the labelled examples have no rows".into()));
    }
    progress.start("examples", reader.total_rows());
    let mut rows = 0u64;
    for batch in reader.read_ahead() {
        let batch = batch?;
        let labels = batch.labels(&examples.label_column)?;
        for (site, idx) in batch.site_groups() {
            let fit_rows: Vec<usize> = idx
                .into_iter()
                .filter(|&i| !fitter.is_calibration(&batch.trace_ids[i]))
                .collect();
            if fit_rows.is_empty() {
                continue;
            }
            let (ids, v) = gather(&batch, &fit_rows)?;
            let l: Vec<bool> = fit_rows.iter().map(|&i| labels[i]).collect();
            fitter
                .push_examples(&site, &ids, v.as_slice(), v.dim(), &l)
                .map_err(|e| example_error(&batch, e))?;
        }
        rows += batch.trace_ids.len() as u64;
        progress.advance(batch.trace_ids.len() as u64);
    }
    progress.finish();
    Ok(rows)
}

/// An error about examples, naming their file.
fn example_error(batch: &TraceBatch, e: actwatch_detect::Error) -> Error {
    Error::Examples {
        path: batch.path.as_ref().clone(),
        source: e,
    }
}

/// The fit pass: pushes the fit part of the traces in `files` into `fitter` and returns the rows
/// read. Each file is folded into its own part ([`MonitorFitter::part`]) and merged into `fitter`
/// in order ([`MonitorFitter::merge`]), so folding files one call at a time, resuming a
/// checkpointed fitter with the files that arrived since, or folding each file on another
/// worker and merging the parts in file order all leave the fitter in exactly the state one
/// call over all of them does.
pub fn fold_reference(
    fitter: &mut MonitorFitter,
    files: &[PathBuf],
    read: &ReadOptions,
    progress: &dyn Progress,
) -> Result<u64> {
    if files.is_empty() {
        // Nothing new since the checkpoint.
        return Ok(0);
    }
    let read = ReadOptions {
        keep_other_columns: false,
        ..read.clone()
    };
    let reader = TraceReader::open(files, read)?;
    progress.start("fit", reader.total_rows());
    let mut rows = 0u64;
    let mut part: Option<(std::sync::Arc<PathBuf>, MonitorFitter)> = None;
    for batch in reader.read_ahead() {
        let batch = batch?;
        if part.as_ref().is_none_or(|(p, _)| p != &batch.path) {
            if let Some((path, done)) = part.take() {
                merge_part(fitter, done, &path)?;
            }
            part = Some((batch.path.clone(), fitter.part()));
        }
        let (_, part) = part.as_mut().expect("set above");
        fold_batch(part, &batch)?;
        rows += batch.trace_ids.len() as u64;
        progress.advance(batch.trace_ids.len() as u64);
    }
    if let Some((path, done)) = part {
        merge_part(fitter, done, &path)?;
    }
    progress.finish();
    Ok(rows)
}

/// Merges the part of one file; a provenance that contradicts the earlier files' names the file.
fn merge_part(
    fitter: &mut MonitorFitter,
    part: MonitorFitter,
    path: &std::path::Path,
) -> Result<()> {
    fitter.merge(part).map_err(|e| match e {
        e @ actwatch_detect::Error::Provenance { .. } => Error::Metadata {
            path: path.to_path_buf(),
            key: crate::provenance::PROVENANCE_KEY,
            message: e.to_string(),
        },
        e => e.into(),
    })
}

/// Pushes the fit part of one batch of reference traces into `fitter` (the provenance of every
/// row, calibration part included, is recorded).
pub fn fold_batch(fitter: &mut MonitorFitter, batch: &TraceBatch) -> Result<()> {
    for (site, idx) in batch.site_groups() {
        if let Some(p) = batch.provenance(&site) {
            // Every reference row's provenance, calibration part included.
            fitter
                .record_provenance(&site, p)
                .map_err(|e| batch.provenance_error(e))?;
        }
        let fit_rows: Vec<usize> = idx
            .into_iter()
            .filter(|&i| !fitter.is_calibration(&batch.trace_ids[i]))
            .collect();
        if fit_rows.is_empty() {
            continue;
        }
        let (ids, v) = gather(batch, &fit_rows)?;
        fitter.push_fit(&site, v.as_slice(), v.dim())?;
        fitter.push_reference_negatives(&site, &ids, v.as_slice(), v.dim())?;
    }
    Ok(())
}

/// The calibration pass over all the reference `files` (every file the fitter has folded): fits
/// the detectors, scores the calibration part with them and calibrates. It also hashes every row
/// and counts computations for the provenance summary, so those cover all the data even when the
/// fit pass only folded new files.
pub fn calibrate_reference(
    fitter: MonitorFitter,
    files: &[PathBuf],
    read: &ReadOptions,
    progress: &dyn Progress,
) -> Result<(Monitor, ReferenceSummary)> {
    calibrate_reference_with(fitter, files, read, None, progress)
}

/// [`calibrate_reference`], then the calibration part of labelled examples for the probes
/// (their negatives join the benign calibration computations, their positives measure recall).
pub fn calibrate_reference_with(
    fitter: MonitorFitter,
    files: &[PathBuf],
    read: &ReadOptions,
    examples: Option<&ExampleInput>,
    progress: &dyn Progress,
) -> Result<(Monitor, ReferenceSummary)> {
    let read = ReadOptions {
        keep_other_columns: false,
        ..read.clone()
    };
    let reader = TraceReader::open(files, read.clone())?;
    if reader.total_rows() == 0 {
        return Err(Error::NoInput("the reference input has no rows".into()));
    }
    let mut calibrator = fitter.finish_fit()?;
    let mut hasher = Sha256::new();
    let mut rows = 0u64;
    let mut computations: HashSet<String> = HashSet::new();
    // One reusable buffer per row: the hash sees the same bytes as value-by-value updates, in far
    // fewer calls.
    let mut row_bytes: Vec<u8> = Vec::new();
    progress.start("calibrate", reader.total_rows());
    let mut current: Option<std::sync::Arc<PathBuf>> = None;
    for batch in reader.read_ahead() {
        let batch = batch?;
        if current.as_ref().is_some_and(|p| p != &batch.path) {
            // Each file is a part, as in a fit in parts (`MonitorCalibrator::end_part`).
            calibrator.end_part()?;
        }
        current = Some(batch.path.clone());
        for (i, id) in batch.trace_ids.iter().enumerate() {
            row_bytes.clear();
            row_bytes.extend_from_slice(batch.sites[i].as_bytes());
            row_bytes.push(0);
            row_bytes.extend_from_slice(id.as_bytes());
            row_bytes.push(0);
            for x in batch.row_vector(i) {
                row_bytes.extend_from_slice(&x.to_le_bytes());
            }
            hasher.update(&row_bytes);
            if !computations.contains(id.as_str()) {
                computations.insert(id.clone());
            }
        }
        calibrate_batch(&mut calibrator, &batch)?;
        rows += batch.trace_ids.len() as u64;
        progress.advance(batch.trace_ids.len() as u64);
    }
    progress.finish();
    calibrator.finish_joint_fit()?;
    if calibrator.joint_calibrating() {
        // The joint detector is fitted only now (its vectors need every site): a third pass
        // scores the calibration part's joint vectors.
        let reader = TraceReader::open(files, read.clone())?;
        progress.start("calibrate_joint", reader.total_rows());
        for batch in reader.read_ahead() {
            let batch = batch?;
            calibrate_joint_batch(&mut calibrator, &batch)?;
            progress.advance(batch.trace_ids.len() as u64);
        }
        progress.finish();
    }
    if let Some(ex) = examples {
        let reader = TraceReader::open(&ex.files, ex.read.clone())?;
        progress.start("calibrate_examples", reader.total_rows());
        for batch in reader.read_ahead() {
            let batch = batch?;
            let labels = batch.labels(&ex.label_column)?;
            for (site, idx) in batch.site_groups() {
                let cal_rows: Vec<usize> = idx
                    .into_iter()
                    .filter(|&i| calibrator.is_calibration(&batch.trace_ids[i]))
                    .collect();
                if cal_rows.is_empty() {
                    continue;
                }
                let (ids, v) = gather(&batch, &cal_rows)?;
                let l: Vec<bool> = cal_rows.iter().map(|&i| labels[i]).collect();
                calibrator
                    .push_example_calibration(&ids, &site, v.as_slice(), &l)
                    .map_err(|e| example_error(&batch, e))?;
            }
            progress.advance(batch.trace_ids.len() as u64);
        }
        progress.finish();
    }
    let monitor = calibrator.finish()?;
    let summary = ReferenceSummary {
        columns: read.columns.clone(),
        files: files.iter().map(|p| p.display().to_string()).collect(),
        rows,
        computations: computations.len() as u64,
        sha256: hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    };
    Ok((monitor, summary))
}

/// The calibration pass over one batch of reference traces: scores its calibration part (and,
/// for a joint detector, pushes its fit part, whose joint vectors need every site).
pub fn calibrate_batch(calibrator: &mut MonitorCalibrator, batch: &TraceBatch) -> Result<()> {
    for (site, idx) in batch.site_groups() {
        let (cal_rows, fit_rows): (Vec<usize>, Vec<usize>) = idx
            .into_iter()
            .partition(|&i| calibrator.is_calibration(&batch.trace_ids[i]));
        if calibrator.joint_wanted() && !fit_rows.is_empty() {
            let (ids, v) = gather(batch, &fit_rows)?;
            calibrator.push_joint_fit(&ids, &site, v.as_slice())?;
        }
        if cal_rows.is_empty() {
            continue;
        }
        let (ids, v) = gather(batch, &cal_rows)?;
        calibrator.push_calibration(&ids, &site, v.as_slice())?;
    }
    Ok(())
}

/// The joint detector's calibration pass over one batch of reference traces (after
/// [`MonitorCalibrator::finish_joint_fit`]): scores the joint vectors of its calibration part.
pub fn calibrate_joint_batch(calibrator: &mut MonitorCalibrator, batch: &TraceBatch) -> Result<()> {
    for (site, idx) in batch.site_groups() {
        let cal_rows: Vec<usize> = idx
            .into_iter()
            .filter(|&i| calibrator.is_calibration(&batch.trace_ids[i]))
            .collect();
        if !cal_rows.is_empty() {
            let (ids, v) = gather(batch, &cal_rows)?;
            calibrator.push_joint_calibration(&ids, &site, v.as_slice())?;
        }
    }
    Ok(())
}

/// The trace ids and vectors of `rows` of `batch`.
fn gather<'a>(
    batch: &'a TraceBatch,
    rows: &[usize],
) -> Result<(Vec<&'a str>, actwatch_core::Vectors)> {
    let ids = rows.iter().map(|&i| batch.trace_ids[i].as_str()).collect();
    Ok((ids, batch.gather(rows)?))
}
