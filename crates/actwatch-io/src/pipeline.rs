//! The batch pipeline: fit a monitor from Parquet reference files, score Parquet archives.
//!
//! Both read the input as a stream of row groups ([`TraceReader`]), so memory is bounded by the
//! batch size plus what the result needs: fitting keeps the detectors' state (sufficient
//! statistics; the kNN reference vectors) and one raw score per calibration trace; scoring at
//! computation level keeps one small accumulator per computation, and at trace level nothing at all
//! (each batch is scored and written before the next is read). Fitting reads the input twice: the
//! first pass fits, the second scores the calibration part with the fitted detectors, so the
//! calibration vectors are never held in memory.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actwatch_core::SiteBatch;
use actwatch_detect::monitor::{Monitor, MonitorFitter, MonitorOptions};
use actwatch_detect::{ComputationResult, OpenComputations, SiteScores};
use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, UInt64Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use sha2::{Digest, Sha256};

use crate::artifact::ReferenceSummary;
use crate::reader::{expand_inputs, ReadOptions, TraceBatch, TraceReader};
use crate::writer::AtomicParquetWriter;
use crate::{Error, Result};

/// Receives progress of long work (the CLI draws bars with it).
pub trait Progress {
    /// A new phase over `total_rows` input rows begins.
    fn start(&self, phase: &str, total_rows: u64);
    /// `rows` more rows are done.
    fn advance(&self, rows: u64);
    /// The phase is over.
    fn finish(&self);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// Fits a monitor on the reference traces in `inputs` (files or directories of Parquet):
/// [`fold_reference`] into a new fitter, then [`calibrate_reference`] over the same files.
pub fn fit_monitor(
    inputs: &[PathBuf],
    read: &ReadOptions,
    options: MonitorOptions,
    progress: &dyn Progress,
) -> Result<(Monitor, ReferenceSummary)> {
    let files = expand_inputs(inputs)?;
    let mut fitter = MonitorFitter::new(options)?;
    fold_reference(&mut fitter, &files, read, progress)?;
    calibrate_reference(fitter, &files, read, progress)
}

/// The fit pass: pushes the fit part of the traces in `files` into `fitter` and returns the rows
/// read. Files are read in order, one batch never spans two files, so folding files one call at
/// a time (or resuming a checkpointed fitter with the files that arrived since) leaves the fitter
/// in exactly the state one call over all of them does.
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
    for batch in reader {
        let batch = batch?;
        for (site, idx) in batch.site_groups() {
            let fit_rows: Vec<usize> = idx
                .into_iter()
                .filter(|&i| !fitter.is_calibration(&batch.trace_ids[i]))
                .collect();
            if fit_rows.is_empty() {
                continue;
            }
            let v = batch.gather(&fit_rows)?;
            fitter.push_fit(&site, v.as_slice(), v.dim())?;
        }
        rows += batch.trace_ids.len() as u64;
        progress.advance(batch.trace_ids.len() as u64);
    }
    progress.finish();
    Ok(rows)
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
    for batch in reader {
        let batch = batch?;
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
        for (site, idx) in batch.site_groups() {
            let cal_rows: Vec<usize> = idx
                .into_iter()
                .filter(|&i| calibrator.is_calibration(&batch.trace_ids[i]))
                .collect();
            if cal_rows.is_empty() {
                continue;
            }
            let ids: Vec<&str> = cal_rows
                .iter()
                .map(|&i| batch.trace_ids[i].as_str())
                .collect();
            let v = batch.gather(&cal_rows)?;
            calibrator.push_calibration(&ids, &site, v.as_slice())?;
        }
        rows += batch.trace_ids.len() as u64;
        progress.advance(batch.trace_ids.len() as u64);
    }
    progress.finish();
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

/// One row per computation, or one row per input trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Computation,
    Trace,
}

/// What a scoring run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreSummary {
    pub input_rows: u64,
    pub output_rows: u64,
    pub flagged: u64,
}

/// Scored computations in first-seen order, with the input columns that are constant within
/// every computation.
pub struct ComputationTable {
    pub trace_column: String,
    pub ids: Vec<String>,
    pub results: Vec<ComputationResult>,
    pub slot_names: Vec<String>,
    passthrough: Vec<PassColumn>,
    pub input_rows: u64,
}

/// Values of one pass-through column, one per computation (the first seen), while it stays constant.
struct PassColumn {
    name: String,
    data_type: DataType,
    values: PassValues,
    constant: bool,
}

enum PassValues {
    Str(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
}

impl PassValues {
    /// The normalised type values are kept in, or None for types that are not carried.
    fn for_type(dt: &DataType) -> Option<(DataType, PassValues)> {
        use DataType::*;
        Some(match dt {
            Utf8 | LargeUtf8 | Utf8View => (Utf8, PassValues::Str(Vec::new())),
            Dictionary(_, v) if matches!(**v, Utf8 | LargeUtf8) => {
                (Utf8, PassValues::Str(Vec::new()))
            }
            Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 => {
                (Int64, PassValues::Int(Vec::new()))
            }
            Float16 | Float32 | Float64 => (Float64, PassValues::Float(Vec::new())),
            Boolean => (Boolean, PassValues::Bool(Vec::new())),
            _ => return None,
        })
    }

    /// Records row `row` of `col` (already cast to the normalised type) for computation `comp`;
    /// returns false if it differs from what that computation already has.
    fn observe(&mut self, col: &ArrayRef, row: usize, comp: usize) -> bool {
        fn put<T: PartialEq>(v: &mut Vec<Option<T>>, comp: usize, x: Option<T>) -> bool {
            if comp == v.len() {
                v.push(x);
                true
            } else {
                v[comp] == x
            }
        }
        let null = col.is_null(row);
        match self {
            PassValues::Str(v) => {
                let a = col
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .expect("cast to Utf8");
                put(v, comp, (!null).then(|| a.value(row).to_string()))
            }
            PassValues::Int(v) => {
                let a = col
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("cast to Int64");
                put(v, comp, (!null).then(|| a.value(row)))
            }
            PassValues::Float(v) => {
                let a = col
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .expect("cast to Float64");
                put(v, comp, (!null).then(|| a.value(row)))
            }
            PassValues::Bool(v) => {
                let a = col
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .expect("cast to Boolean");
                put(v, comp, (!null).then(|| a.value(row)))
            }
        }
    }

    fn push_null(&mut self) {
        match self {
            PassValues::Str(v) => v.push(None),
            PassValues::Int(v) => v.push(None),
            PassValues::Float(v) => v.push(None),
            PassValues::Bool(v) => v.push(None),
        }
    }

    fn to_array(&self) -> ArrayRef {
        match self {
            PassValues::Str(v) => Arc::new(v.iter().map(|x| x.as_deref()).collect::<StringArray>()),
            PassValues::Int(v) => Arc::new(v.iter().copied().collect::<Int64Array>()),
            PassValues::Float(v) => Arc::new(v.iter().copied().collect::<Float64Array>()),
            PassValues::Bool(v) => Arc::new(v.iter().copied().collect::<BooleanArray>()),
        }
    }
}

fn slot_column_names(monitor: &Monitor) -> Vec<String> {
    monitor
        .slots()
        .into_iter()
        .map(|(site, det)| format!("p_{site}_{det}"))
        .collect()
}

/// Scores every computation in `inputs`; memory grows with the number of computations, not traces.
pub fn score_computations(
    monitor: &Monitor,
    inputs: &[PathBuf],
    read: &ReadOptions,
    progress: &dyn Progress,
) -> Result<ComputationTable> {
    let files = expand_inputs(inputs)?;
    let read = ReadOptions {
        sites: Some(monitor.site_names()),
        keep_other_columns: true,
        ..read.clone()
    };
    let skip = [read.columns.trace.clone(), read.columns.site.clone()];
    let reader = TraceReader::open(&files, read.clone())?;
    progress.start("score", reader.total_rows());
    // Unbounded: a batch run holds every computation until the end (small accumulators).
    let mut open = OpenComputations::default();
    let mut pass: Vec<PassColumn> = Vec::new();
    let mut pass_index: HashMap<String, usize> = HashMap::new();
    let mut input_rows = 0u64;
    for batch in reader {
        let batch = batch?;
        // Computations are numbered in order of first appearance, row by row.
        let comps = batch
            .trace_ids
            .iter()
            .map(|id| Ok(open.open(monitor, id)? as usize))
            .collect::<Result<Vec<usize>>>()?;
        score_batch_sites(&batch, |site_batch| open.score(monitor, site_batch))?;
        if let Some(other) = &batch.other {
            track_passthrough(other, &skip, &comps, &mut pass, &mut pass_index)?;
        }
        input_rows += batch.trace_ids.len() as u64;
        progress.advance(batch.trace_ids.len() as u64);
    }
    progress.finish();
    let (ids, results) = open.complete_all(monitor).into_iter().unzip();
    Ok(ComputationTable {
        trace_column: read.columns.trace.clone(),
        ids,
        results,
        slot_names: slot_column_names(monitor),
        passthrough: pass,
        input_rows,
    })
}

fn track_passthrough(
    other: &RecordBatch,
    skip: &[String],
    comps: &[usize],
    pass: &mut Vec<PassColumn>,
    pass_index: &mut HashMap<String, usize>,
) -> Result<()> {
    let schema = other.schema();
    for (f, col) in schema.fields().iter().zip(other.columns()) {
        if skip.iter().any(|s| s == f.name()) {
            continue;
        }
        let ci = match pass_index.get(f.name()) {
            Some(&ci) => ci,
            None => {
                let Some((_, values)) = PassValues::for_type(f.data_type()) else {
                    continue;
                };
                pass.push(PassColumn {
                    name: f.name().clone(),
                    data_type: f.data_type().clone(),
                    values,
                    constant: true,
                });
                pass_index.insert(f.name().clone(), pass.len() - 1);
                pass.len() - 1
            }
        };
        let pc = &mut pass[ci];
        if !pc.constant {
            continue;
        }
        let norm_type = PassValues::for_type(&pc.data_type).map(|(d, _)| d);
        let Some(norm_type) = norm_type.filter(|_| f.data_type() == &pc.data_type) else {
            pc.constant = false;
            continue;
        };
        let col = cast(col, &norm_type)?;
        // Computations first seen before this column existed get nulls.
        for (row, &c) in comps.iter().enumerate() {
            while values_len(&pc.values) < c {
                pc.values.push_null();
            }
            if !pc.values.observe(&col, row, c) {
                pc.constant = false;
                break;
            }
        }
    }
    Ok(())
}

fn values_len(v: &PassValues) -> usize {
    match v {
        PassValues::Str(v) => v.len(),
        PassValues::Int(v) => v.len(),
        PassValues::Float(v) => v.len(),
        PassValues::Bool(v) => v.len(),
    }
}

/// Scores each site of `batch` with `score` (the one scoring door, [`Monitor::score`], or
/// [`OpenComputations::score`] around it) and returns per site the scores with the row indices
/// they belong to. A width that differs from the monitor's is reported with its file and row.
fn score_batch_sites(
    batch: &TraceBatch,
    mut score: impl FnMut(&SiteBatch) -> actwatch_detect::Result<SiteScores>,
) -> Result<Vec<(Vec<usize>, SiteScores)>> {
    batch
        .site_batches()?
        .into_iter()
        .map(|(rows, site_batch)| match score(&site_batch) {
            Ok(scores) => Ok((rows, scores)),
            Err(actwatch_detect::Error::SiteWidth {
                site,
                expected,
                got,
            }) => Err(Error::WidthMismatch {
                path: batch.path.to_path_buf(),
                site,
                expected,
                got,
                row: batch.file_row(rows[0]),
            }),
            Err(e) => Err(e.into()),
        })
        .collect()
}

impl ComputationTable {
    /// Values of a pass-through column as strings, one per computation; None if the column is
    /// absent or not constant within every computation.
    pub fn column_strings(&self, name: &str) -> Option<Vec<Option<String>>> {
        let pc = self
            .passthrough
            .iter()
            .find(|p| p.name == name && p.constant)?;
        let mut v: Vec<Option<String>> = match &pc.values {
            PassValues::Str(v) => v.clone(),
            PassValues::Int(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
            PassValues::Float(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
            PassValues::Bool(v) => v.iter().map(|x| x.map(|x| x.to_string())).collect(),
        };
        v.resize(self.ids.len(), None);
        Some(v)
    }

    /// The table as one Arrow batch: trace id, constant pass-through columns, score, p_value,
    /// flagged, traces, and one p-value column per (site, detector).
    pub fn to_record_batch(&self) -> Result<RecordBatch> {
        let n = self.ids.len();
        let mut fields = vec![Field::new(&self.trace_column, DataType::Utf8, false)];
        let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(&self.ids))];
        for pc in self.passthrough.iter().filter(|p| p.constant) {
            if pc.name == "score" || pc.name == "p_value" || pc.name == "flagged" {
                continue;
            }
            let mut values = match &pc.values {
                PassValues::Str(v) => PassValues::Str(v.clone()),
                PassValues::Int(v) => PassValues::Int(v.clone()),
                PassValues::Float(v) => PassValues::Float(v.clone()),
                PassValues::Bool(v) => PassValues::Bool(v.clone()),
            };
            while values_len(&values) < n {
                values.push_null();
            }
            let arr = values.to_array();
            let arr = match &pc.data_type {
                DataType::Dictionary(..) | DataType::Utf8View | DataType::Float16 => arr,
                dt => cast(&arr, dt)?,
            };
            fields.push(Field::new(&pc.name, arr.data_type().clone(), true));
            cols.push(arr);
        }
        fields.push(Field::new("score", DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from_iter_values(
            self.results.iter().map(|r| r.score),
        )));
        fields.push(Field::new("p_value", DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from_iter_values(
            self.results.iter().map(|r| r.p_value),
        )));
        fields.push(Field::new("flagged", DataType::Boolean, false));
        cols.push(Arc::new(
            self.results
                .iter()
                .map(|r| Some(r.flagged))
                .collect::<BooleanArray>(),
        ));
        fields.push(Field::new("traces", DataType::UInt64, false));
        cols.push(Arc::new(UInt64Array::from_iter_values(
            self.results.iter().map(|r| r.traces),
        )));
        for (j, name) in self.slot_names.iter().enumerate() {
            fields.push(Field::new(name, DataType::Float64, true));
            cols.push(Arc::new(
                self.results
                    .iter()
                    .map(|r| r.slot_p[j])
                    .collect::<Float64Array>(),
            ));
        }
        Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
    }
}

/// Scores `inputs` and writes the result to `output` (Parquet), which appears only when complete.
pub fn score_to_parquet(
    monitor: &Monitor,
    inputs: &[PathBuf],
    read: &ReadOptions,
    level: Level,
    output: &Path,
    progress: &dyn Progress,
) -> Result<ScoreSummary> {
    match level {
        Level::Computation => {
            let table = score_computations(monitor, inputs, read, progress)?;
            let batch = table.to_record_batch()?;
            let mut w = AtomicParquetWriter::create(output, batch.schema())?;
            w.write(&batch)?;
            w.finish()?;
            Ok(ScoreSummary {
                input_rows: table.input_rows,
                output_rows: table.ids.len() as u64,
                flagged: table.results.iter().filter(|r| r.flagged).count() as u64,
            })
        }
        Level::Trace => score_traces_to_parquet(monitor, inputs, read, output, progress),
    }
}

fn score_traces_to_parquet(
    monitor: &Monitor,
    inputs: &[PathBuf],
    read: &ReadOptions,
    output: &Path,
    progress: &dyn Progress,
) -> Result<ScoreSummary> {
    let files = expand_inputs(inputs)?;
    let read = ReadOptions {
        sites: Some(monitor.site_names()),
        keep_other_columns: true,
        ..read.clone()
    };
    let det_names: Vec<&str> = monitor
        .options()
        .detectors
        .iter()
        .map(|d| d.name())
        .collect();
    let reader = TraceReader::open(&files, read)?;
    progress.start("score", reader.total_rows());
    let mut writer: Option<AtomicParquetWriter> = None;
    let mut summary = ScoreSummary::default();
    for batch in reader {
        let batch = batch?;
        let n = batch.trace_ids.len();
        let nd = det_names.len();
        let mut score = vec![0.0; n];
        let mut p = vec![0.0; n];
        let mut raw = vec![vec![0.0; n]; nd];
        let mut det_p = vec![vec![0.0; n]; nd];
        for (rows, s) in score_batch_sites(&batch, |b| monitor.score(b))? {
            for (k, &r) in rows.iter().enumerate() {
                score[r] = s.trace_score[k];
                p[r] = s.trace_p[k];
                for j in 0..nd {
                    raw[j][r] = s.raw[j][k];
                    det_p[j][r] = s.p[j][k];
                }
            }
        }
        let other = batch.other.as_ref().expect("keep_other_columns was set");
        let mut fields: Vec<Field> = other
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut cols: Vec<ArrayRef> = other.columns().to_vec();
        let flagged: BooleanArray = p
            .iter()
            .map(|&x| Some(x <= monitor.options().fpr))
            .collect();
        summary.flagged += flagged.true_count() as u64;
        fields.push(Field::new("score", DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from(score)));
        fields.push(Field::new("p_value", DataType::Float64, false));
        cols.push(Arc::new(Float64Array::from(p)));
        fields.push(Field::new("flagged", DataType::Boolean, false));
        cols.push(Arc::new(flagged));
        for (j, name) in det_names.iter().enumerate() {
            fields.push(Field::new(format!("raw_{name}"), DataType::Float64, false));
            cols.push(Arc::new(Float64Array::from(std::mem::take(&mut raw[j]))));
            fields.push(Field::new(format!("p_{name}"), DataType::Float64, false));
            cols.push(Arc::new(Float64Array::from(std::mem::take(&mut det_p[j]))));
        }
        let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?;
        let w = match &mut writer {
            Some(w) => w,
            None => writer.insert(AtomicParquetWriter::create(output, out.schema())?),
        };
        w.write(&out)?;
        summary.input_rows += n as u64;
        summary.output_rows += n as u64;
        progress.advance(n as u64);
    }
    progress.finish();
    match writer {
        Some(w) => {
            w.finish()?;
        }
        None => {
            return Err(Error::NoInput(
                "no traces of the monitor's sites in the input".into(),
            ))
        }
    }
    Ok(summary)
}
