//! Scoring Parquet archives through the one scoring door, at computation or trace level.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actwatch_core::{ProvenanceConflict, SiteBatch};
use actwatch_detect::monitor::Monitor;
use actwatch_detect::{OpenComputations, SiteScores};
use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};

use super::table::{slot_column_names, track_passthrough, ComputationTable, PassColumn};
use super::Progress;
use crate::reader::{expand_inputs, ReadOptions, TraceBatch, TraceReader};
use crate::writer::AtomicParquetWriter;
use crate::{Error, Result};

/// One row per computation, or one row per input trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Computation,
    Trace,
}

/// Per site, the first batch whose declared provenance conflicted with the site's, scored
/// anyway under `ProvenancePolicy::Warn` (under `Refuse` the run fails instead).
pub type ProvenanceConflicts = BTreeMap<String, ProvenanceConflict>;

/// What a scoring run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreSummary {
    pub input_rows: u64,
    pub output_rows: u64,
    pub flagged: u64,
    pub provenance_conflicts: ProvenanceConflicts,
}

/// Scores every computation in `inputs`; memory grows with the number of computations, not traces.
pub fn score_computations(
    monitor: &Monitor,
    inputs: &[PathBuf],
    read: &ReadOptions,
    progress: &dyn Progress,
) -> Result<ComputationTable> {
    let files = expand_inputs(inputs)?;
    let read = ComputationScorer::read_options(monitor, read);
    let reader = TraceReader::open(&files, read.clone())?;
    progress.start("score", reader.total_rows());
    let mut scorer = ComputationScorer::new(monitor, &read);
    // Three stages overlap: the reader decodes the batch after next on its own thread, the
    // monitor scores the next batch on the pool, and this batch's rows are added to their
    // computations (which must go in order, on one thread) beside it. Results are the same as
    // pushing each batch in turn.
    let mut pending: Option<(TraceBatch, ScoredBatch)> = None;
    for batch in reader.read_ahead() {
        let mut batch = batch?;
        let (scored, added) = rayon::join(
            || ComputationScorer::score_batch(monitor, &batch),
            || {
                pending
                    .take()
                    .map(|(b, s)| scorer.push_scored(&b, s).map(|()| b))
            },
        );
        if let Some(done) = added.transpose()? {
            progress.advance(done.trace_ids.len() as u64);
        }
        // The vectors live on in the scored site batches.
        batch.vectors = Vec::new();
        pending = Some((batch, scored?));
    }
    if let Some((b, s)) = pending {
        scorer.push_scored(&b, s)?;
        progress.advance(b.trace_ids.len() as u64);
    }
    progress.finish();
    Ok(scorer.finish())
}

/// One batch's sites scored by the monitor ([`ComputationScorer::score_batch`]), to be added to
/// their computations by [`ComputationScorer::push_scored`].
pub struct ScoredBatch {
    sites: Vec<(Vec<usize>, SiteBatch, SiteScores)>,
}

/// Computation-level scoring of batches of traces, wherever they come from (Parquet files, or
/// Arrow batches handed over in memory): every batch goes through the one scoring door, each
/// computation stays open until [`ComputationScorer::finish`], and the other input columns are
/// carried through per computation.
pub struct ComputationScorer<'m> {
    monitor: &'m Monitor,
    trace_column: String,
    skip: [String; 2],
    // Unbounded: a batch run holds every computation until the end (small accumulators).
    open: OpenComputations,
    pass: Vec<PassColumn>,
    pass_index: HashMap<String, usize>,
    input_rows: u64,
    conflicts: ProvenanceConflicts,
}

impl<'m> ComputationScorer<'m> {
    /// `read` restricted to the monitor's sites, keeping the other columns to carry them through.
    pub fn read_options(monitor: &Monitor, read: &ReadOptions) -> ReadOptions {
        ReadOptions {
            sites: Some(monitor.site_names()),
            keep_other_columns: true,
            ..read.clone()
        }
    }

    /// A scorer of batches read with `read` (see [`ComputationScorer::read_options`]).
    pub fn new(monitor: &'m Monitor, read: &ReadOptions) -> Self {
        Self {
            monitor,
            trace_column: read.columns.trace.clone(),
            skip: [read.columns.trace.clone(), read.columns.site.clone()],
            open: OpenComputations::default(),
            pass: Vec::new(),
            pass_index: HashMap::new(),
            input_rows: 0,
            conflicts: ProvenanceConflicts::new(),
        }
    }

    /// Scores one batch; its computations stay open.
    pub fn push(&mut self, batch: &TraceBatch) -> Result<()> {
        let scored = Self::score_batch(self.monitor, batch)?;
        self.push_scored(batch, scored)
    }

    /// The half of [`ComputationScorer::push`] that needs no scorer: each site of `batch` scored
    /// by `monitor`, so that it can run for the next batch while this one is pushed.
    pub fn score_batch(monitor: &Monitor, batch: &TraceBatch) -> Result<ScoredBatch> {
        Ok(ScoredBatch {
            sites: score_sites(monitor, batch, true)?,
        })
    }

    /// The other half of [`ComputationScorer::push`]: adds `batch`, scored as `scored` (by
    /// [`ComputationScorer::score_batch`] with this scorer's monitor), to its computations.
    /// Batches must come in the order they were read.
    pub fn push_scored(&mut self, batch: &TraceBatch, scored: ScoredBatch) -> Result<()> {
        let monitor = self.monitor;
        // Computations are numbered in order of first appearance, row by row.
        let comps = batch
            .trace_ids
            .iter()
            .map(|id| Ok(self.open.open(monitor, id)? as usize))
            .collect::<Result<Vec<usize>>>()?;
        for (rows, site_batch, mut scores) in scored.sites {
            note_conflict(&mut self.conflicts, &site_batch, &mut scores);
            self.open
                .add_scores(monitor, &site_batch, scores)
                .map_err(|e| site_error(batch, &rows, e))?;
        }
        if let Some(other) = &batch.other {
            track_passthrough(
                other,
                &self.skip,
                &comps,
                &mut self.pass,
                &mut self.pass_index,
            )?;
        }
        self.input_rows += batch.trace_ids.len() as u64;
        Ok(())
    }

    /// Completes every computation: one result each, in order of first appearance.
    pub fn finish(mut self) -> ComputationTable {
        let (ids, results) = self.open.complete_all(self.monitor).into_iter().unzip();
        ComputationTable {
            trace_column: self.trace_column,
            ids,
            results,
            slot_names: slot_column_names(self.monitor),
            probe_names: self
                .monitor
                .probes()
                .iter()
                .map(|p| p.name().to_string())
                .collect(),
            passthrough: std::mem::take(&mut self.pass),
            input_rows: self.input_rows,
            provenance_conflicts: self.conflicts,
        }
    }
}

/// Each site of `batch` scored by `monitor` ([`Monitor::score`], the one scoring door; with
/// `computations`, [`Monitor::score_for_computations`], which adds the rows' joint parts): the
/// row indices it was gathered from, the site batch and its scores. A width that differs from the
/// monitor's is reported with its file and row.
fn score_sites(
    monitor: &Monitor,
    batch: &TraceBatch,
    computations: bool,
) -> Result<Vec<(Vec<usize>, SiteBatch, SiteScores)>> {
    let score = |b: &SiteBatch| {
        if computations {
            monitor.score_for_computations(b)
        } else {
            monitor.score(b)
        }
    };
    batch
        .site_batches()?
        .into_iter()
        .map(|(rows, site_batch)| match score(&site_batch) {
            Ok(scores) => Ok((rows, site_batch, scores)),
            Err(e) => Err(site_error(batch, &rows, e)),
        })
        .collect()
}

/// A scoring error of the site batch gathered from `rows` of `batch`, with its file and row.
fn site_error(batch: &TraceBatch, rows: &[usize], e: actwatch_detect::Error) -> Error {
    match e {
        e @ actwatch_detect::Error::Provenance { .. } => batch.provenance_error(e),
        actwatch_detect::Error::SiteWidth {
            site,
            expected,
            got,
        } => Error::WidthMismatch {
            path: batch.path.to_path_buf(),
            site,
            expected,
            got,
            row: batch.file_row(rows[0]),
        },
        e => e.into(),
    }
}

/// Notes a provenance conflict scored anyway (under the policy `warn`) in `conflicts`, the first
/// per site.
fn note_conflict(
    conflicts: &mut ProvenanceConflicts,
    site_batch: &SiteBatch,
    scores: &mut SiteScores,
) {
    if let Some(c) = scores.provenance_conflict.take() {
        conflicts.entry(site_batch.site().to_string()).or_insert(c);
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
                provenance_conflicts: table.provenance_conflicts,
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
    let reader = TraceReader::open(&files, read)?;
    progress.start("score", reader.total_rows());
    let mut writer: Option<AtomicParquetWriter> = None;
    let mut summary = ScoreSummary::default();
    for batch in reader.read_ahead() {
        let batch = batch?;
        let n = batch.trace_ids.len();
        let out = score_trace_batch(monitor, &batch, &mut summary)?;
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

/// One input batch (read with `keep_other_columns`) with its trace-level results appended: the
/// input's columns (but the vector), then score, p_value, flagged, and per detector its raw score
/// and p-value. `summary` counts the flags and notes provenance conflicts.
pub fn score_trace_batch(
    monitor: &Monitor,
    batch: &TraceBatch,
    summary: &mut ScoreSummary,
) -> Result<RecordBatch> {
    let n = batch.trace_ids.len();
    let nd = monitor.options().detectors.len();
    let mut score = vec![0.0; n];
    let mut p = vec![0.0; n];
    let mut raw = vec![vec![0.0; n]; nd];
    let mut det_p = vec![vec![0.0; n]; nd];
    for (rows, site_batch, mut s) in score_sites(monitor, batch, false)? {
        note_conflict(&mut summary.provenance_conflicts, &site_batch, &mut s);
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
    let schema = trace_level_schema(monitor, &other.schema());
    let mut cols: Vec<ArrayRef> = other.columns().to_vec();
    let flagged: BooleanArray = p
        .iter()
        .map(|&x| Some(x <= monitor.options().fpr))
        .collect();
    summary.flagged += flagged.true_count() as u64;
    cols.push(Arc::new(Float64Array::from(score)));
    cols.push(Arc::new(Float64Array::from(p)));
    cols.push(Arc::new(flagged));
    for j in 0..nd {
        cols.push(Arc::new(Float64Array::from(std::mem::take(&mut raw[j]))));
        cols.push(Arc::new(Float64Array::from(std::mem::take(&mut det_p[j]))));
    }
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// The schema of [`score_trace_batch`]'s output for input columns `other` (every input column
/// but the vector): those, then score, p_value, flagged, and per detector `raw_<name>`,
/// `p_<name>`.
pub fn trace_level_schema(monitor: &Monitor, other: &Schema) -> Arc<Schema> {
    let mut fields: Vec<Field> = other.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("score", DataType::Float64, false));
    fields.push(Field::new("p_value", DataType::Float64, false));
    fields.push(Field::new("flagged", DataType::Boolean, false));
    for d in &monitor.options().detectors {
        let name = d.name();
        fields.push(Field::new(format!("raw_{name}"), DataType::Float64, false));
        fields.push(Field::new(format!("p_{name}"), DataType::Float64, false));
    }
    Arc::new(Schema::new(fields))
}
