//! `actwatch_engine._engine`: the actwatch engine in-process, for Python (Ray, Spark, notebooks).
//!
//! Arrow in, Arrow out: inputs are anything that exports the Arrow C stream or array interface
//! (`pyarrow.Table`, `RecordBatch`, `RecordBatchReader`, and other libraries' equivalents); their
//! buffers are imported without a copy, decoded by the same reader checks as Parquet files
//! (`TraceReader::decode_batch`) and scored through the one scoring door. Every call releases the
//! GIL while Rust works. Errors are `ActwatchError` with the engine's message.
//!
//! A fit in parts, as a cluster runs it (see `MonitorFitter::merge` and `CalibrationPart`):
//! 1. per part (a file, or any block of whole computations): `FitState(...)`, `fold(data)`,
//!    `to_bytes()`; the driver merges the states in part order (`FitState.merge`);
//! 2. per part: `Calibrator(merged_state_bytes)`, `calibrate(data)`, `take_part()`; the driver
//!    `absorb`s the parts in order;
//! 3. with a joint detector (`needs_joint_pass`): the driver hands `joint_fit_part()` to each
//!    part's `Calibrator`, which `absorb`s it, runs `calibrate_joint(data)` and `take_part()`; the
//!    driver absorbs those too;
//! 4. the driver `finish()`es: the same monitor as `actwatch fit` over the same files.

use std::path::PathBuf;
use std::sync::Arc;

use actwatch_detect::monitor::{
    Monitor, MonitorCalibrator, MonitorFitter, MonitorOptions, ProvenancePolicy,
};
use actwatch_detect::probe::ProbeSpec;
use actwatch_detect::spec::DetectorSpec;
use actwatch_detect::{Aggregation, Fusion};
use actwatch_io::artifact::{load_monitor, save_monitor, ReferenceSummary};
use actwatch_io::checkpoint::{
    calibration_part_from_bytes, calibration_part_to_bytes, fitter_from_bytes, fitter_to_bytes,
};
use actwatch_io::pipeline::{
    calibrate_batch, calibrate_joint_batch, fold_batch, score_trace_batch, trace_level_schema,
    ComputationScorer, ScoreSummary,
};
use actwatch_io::reader::{ReadOptions, TraceBatch, TraceColumns, TraceReader};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::pyarrow::{FromPyArrow, ToPyArrow};
use arrow::record_batch::{RecordBatch, RecordBatchReader};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

pyo3::create_exception!(
    _engine,
    ActwatchError,
    PyException,
    "An error of the actwatch engine (its message is the engine's)."
);

fn err(e: impl std::fmt::Display) -> PyErr {
    ActwatchError::new_err(e.to_string())
}

/// The schema and record batches of an Arrow object: a C stream (Table, RecordBatchReader, ...)
/// or a C array (RecordBatch). Imported without copying the buffers.
fn batches_of(data: &Bound<'_, PyAny>) -> PyResult<(SchemaRef, Vec<RecordBatch>)> {
    if data.hasattr("__arrow_c_stream__")? {
        let reader = arrow::ffi_stream::RecordBatchStreamReader::from_pyarrow_bound(data)?;
        let schema = reader.schema();
        let batches = reader
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        return Ok((schema, batches));
    }
    let batch = RecordBatch::from_pyarrow_bound(data)?;
    Ok((batch.schema(), vec![batch]))
}

/// Decodes `batches` as traces named `source` in errors, with `read`'s columns.
fn decode(
    read: &ReadOptions,
    source: &str,
    batches: Vec<RecordBatch>,
) -> PyResult<Vec<TraceBatch>> {
    let source = Arc::new(PathBuf::from(source));
    let mut reader = TraceReader::for_batches(read.clone());
    let mut first_row = 0u64;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let n = b.num_rows() as u64;
        if let Some(t) = reader.decode_batch(&source, b, first_row).map_err(err)? {
            out.push(t);
        }
        first_row += n;
    }
    Ok(out)
}

fn columns(
    trace: Option<String>,
    site: Option<String>,
    vector: Option<String>,
    base: &TraceColumns,
) -> TraceColumns {
    TraceColumns {
        trace: trace.unwrap_or_else(|| base.trace.clone()),
        site: site.unwrap_or_else(|| base.site.clone()),
        vector: vector.unwrap_or_else(|| base.vector.clone()),
    }
}

/// A fitted monitor, loaded from a directory (`actwatch fit`'s output) or finished by a fit in
/// parts.
#[pyclass(module = "actwatch_engine._engine", frozen)]
struct MonitorHandle {
    monitor: Arc<Monitor>,
    reference: ReferenceSummary,
}

#[pymethods]
impl MonitorHandle {
    /// Loads (and verifies) the monitor in directory `path`. `provenance_policy`: `"refuse"`
    /// (the default: a batch whose declared provenance contradicts its site's is an error) or
    /// `"warn"` (scored anyway).
    #[staticmethod]
    #[pyo3(signature = (path, *, provenance_policy = "refuse"))]
    fn load(py: Python<'_>, path: PathBuf, provenance_policy: &str) -> PyResult<Self> {
        let policy = match provenance_policy {
            "refuse" => ProvenancePolicy::Refuse,
            "warn" => ProvenancePolicy::Warn,
            other => {
                return Err(err(format!(
                    "provenance_policy must be \"refuse\" or \"warn\", got {other:?}"
                )))
            }
        };
        let (mut monitor, manifest) = py.detach(|| load_monitor(&path)).map_err(err)?;
        monitor.set_provenance_policy(policy);
        Ok(Self {
            monitor: Arc::new(monitor),
            reference: manifest.reference,
        })
    }

    /// Writes the monitor to directory `path` (which must not exist), as `actwatch fit` does.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| save_monitor(&self.monitor, &self.reference, &path))
            .map(|_| ())
            .map_err(err)
    }

    /// The monitor's sites, sorted.
    #[getter]
    fn sites(&self) -> Vec<String> {
        self.monitor.site_names()
    }

    /// Target false-positive rate.
    #[getter]
    fn fpr(&self) -> f64 {
        self.monitor.options().fpr
    }

    /// The column names the monitor was fitted with (trace, site, vector).
    #[getter]
    fn columns(&self) -> (String, String, String) {
        let c = &self.reference.columns;
        (c.trace.clone(), c.site.clone(), c.vector.clone())
    }

    /// Scores `data` (traces in the long format) and returns a `pyarrow.RecordBatch` with the
    /// columns `actwatch score` writes at that level: `"computation"` (one row per computation,
    /// every computation of `data` complete in this call) or `"trace"` (one row per trace of the
    /// monitor's sites: the input's columns but the vector, then the scores). Column names
    /// default to the ones the monitor was fitted with.
    #[pyo3(signature = (data, *, level = "computation", trace_column = None, site_column = None, vector_column = None))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        level: &str,
        trace_column: Option<String>,
        site_column: Option<String>,
        vector_column: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let cols = columns(
            trace_column,
            site_column,
            vector_column,
            &self.reference.columns,
        );
        let read = ComputationScorer::read_options(
            &self.monitor,
            &ReadOptions {
                columns: cols,
                ..ReadOptions::default()
            },
        );
        let (schema, batches) = batches_of(data)?;
        let monitor = self.monitor.clone();
        let out = py
            .detach(move || -> Result<RecordBatch, String> {
                let m = monitor;
                let traces = decode(&read, "<arrow input>", batches).map_err(|e| e.to_string())?;
                match level {
                    "computation" => {
                        let mut scorer = ComputationScorer::new(&m, &read);
                        for t in &traces {
                            scorer.push(t).map_err(|e| e.to_string())?;
                        }
                        scorer.finish().to_record_batch().map_err(|e| e.to_string())
                    }
                    "trace" => {
                        let mut summary = ScoreSummary::default();
                        let parts = traces
                            .iter()
                            .map(|t| score_trace_batch(&m, t, &mut summary))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| e.to_string())?;
                        // A batch without traces of the monitor's sites scores to no rows (a map
                        // over batches must not fail on one), with the schema it would have.
                        let other: Vec<_> = schema
                            .fields()
                            .iter()
                            .filter(|f| f.name() != &read.columns.vector)
                            .cloned()
                            .collect();
                        let out = trace_level_schema(&m, &Schema::new(other));
                        arrow::compute::concat_batches(&out, &parts).map_err(|e| e.to_string())
                    }
                    other => Err(format!(
                        "level must be \"computation\" or \"trace\", got {other:?}"
                    )),
                }
            })
            .map_err(err)?;
        out.to_pyarrow(py)
    }
}

/// The fit state of one part of the reference traces (or of parts merged in order): sufficient
/// statistics and kNN samples, mergeable to the bit.
#[pyclass(module = "actwatch_engine._engine")]
struct FitState {
    fitter: MonitorFitter,
    columns: TraceColumns,
    rows: u64,
}

/// What travels with a fit state's bytes besides the fitter: its columns and rows read.
#[derive(serde::Serialize, serde::Deserialize)]
struct StateHeader {
    columns: TraceColumns,
    rows: u64,
}

#[pymethods]
impl FitState {
    /// A new, empty fit state. Options are `actwatch fit`'s, with its defaults.
    #[new]
    #[pyo3(signature = (*, detectors = None, joint = None, aggregation = None, fusion = None, fpr = None, calibration_fraction = None, seed = None, length_strata = None, probes = None, trace_column = None, site_column = None, vector_column = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        detectors: Option<&str>,
        joint: Option<&str>,
        aggregation: Option<&str>,
        fusion: Option<&str>,
        fpr: Option<f64>,
        calibration_fraction: Option<f64>,
        seed: Option<u64>,
        length_strata: Option<usize>,
        probes: Option<Vec<String>>,
        trace_column: Option<String>,
        site_column: Option<String>,
        vector_column: Option<String>,
    ) -> PyResult<Self> {
        let d = MonitorOptions::default();
        let options = MonitorOptions {
            detectors: match detectors {
                Some(s) => DetectorSpec::parse_list(s).map_err(err)?,
                None => d.detectors,
            },
            joint: match joint {
                Some(s) if s.trim().eq_ignore_ascii_case("none") => Vec::new(),
                Some(s) => DetectorSpec::parse_list(s).map_err(err)?,
                None => d.joint,
            },
            aggregation: match aggregation {
                Some(s) => Aggregation::parse(s).map_err(err)?,
                None => d.aggregation,
            },
            fusion: match fusion {
                Some(s) => Fusion::parse(s).map_err(err)?,
                None => d.fusion,
            },
            fpr: fpr.unwrap_or(d.fpr),
            calibration_fraction: calibration_fraction.unwrap_or(d.calibration_fraction),
            seed: seed.unwrap_or(d.seed),
            length_strata: length_strata.unwrap_or(d.length_strata),
            probes: probes
                .unwrap_or_default()
                .iter()
                .map(|p| ProbeSpec::parse(p))
                .collect::<Result<_, _>>()
                .map_err(err)?,
        };
        let fitter = MonitorFitter::new(options).map_err(err)?;
        Ok(Self {
            fitter,
            columns: columns(
                trace_column,
                site_column,
                vector_column,
                &TraceColumns::default(),
            ),
            rows: 0,
        })
    }

    /// Folds the fit part of `data` (reference traces; the seeded split by computation id routes
    /// each computation). Within a part the result does not depend on how `data` is batched.
    fn fold(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let (_, batches) = batches_of(data)?;
        let read = ReadOptions {
            columns: self.columns.clone(),
            ..ReadOptions::default()
        };
        let fitter = &mut self.fitter;
        let rows = py.detach(|| -> PyResult<u64> {
            let mut rows = 0;
            for t in decode(&read, "<arrow input>", batches)? {
                fold_batch(fitter, &t).map_err(err)?;
                rows += t.trace_ids.len() as u64;
            }
            Ok(rows)
        })?;
        self.rows += rows;
        Ok(())
    }

    /// Adds the state of the part that follows this one's (a `FitState` or its bytes).
    fn merge(&mut self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<()> {
        let other = state_of(other)?;
        if other.columns != self.columns {
            return Err(err("cannot merge fit states read with different columns"));
        }
        let fitter = &mut self.fitter;
        py.detach(|| fitter.merge(other.fitter)).map_err(err)?;
        self.rows += other.rows;
        Ok(())
    }

    /// Rows read so far (fit and calibration parts).
    #[getter]
    fn rows(&self) -> u64 {
        self.rows
    }

    /// Fit-part traces folded so far.
    #[getter]
    fn fit_traces(&self) -> u64 {
        self.fitter.fit_traces()
    }

    /// The state as bytes for another process (checksummed; `FitState.from_bytes` verifies).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let b = py.detach(|| self.to_bytes_inner())?;
        Ok(PyBytes::new(py, &b))
    }

    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: &[u8]) -> PyResult<Self> {
        py.detach(|| state_from_bytes(data))
    }
}

impl FitState {
    fn to_bytes_inner(&self) -> PyResult<Vec<u8>> {
        let header = serde_json::to_vec(&StateHeader {
            columns: self.columns.clone(),
            rows: self.rows,
        })
        .map_err(err)?;
        let mut out = (header.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend_from_slice(&fitter_to_bytes(&self.fitter).map_err(err)?);
        Ok(out)
    }
}

/// A copy of a fit state given as a `FitState` or as its bytes.
fn state_of(value: &Bound<'_, PyAny>) -> PyResult<FitState> {
    if let Ok(b) = value.cast::<PyBytes>() {
        return state_from_bytes(b.as_bytes());
    }
    let o = value.extract::<PyRef<'_, FitState>>()?;
    Ok(FitState {
        fitter: o.fitter.clone(),
        columns: o.columns.clone(),
        rows: o.rows,
    })
}

fn state_from_bytes(data: &[u8]) -> PyResult<FitState> {
    let bad = || err("fit state: truncated or not a fit state");
    let n =
        u32::from_le_bytes(data.get(..4).ok_or_else(bad)?.try_into().expect("4 bytes")) as usize;
    let header = data.get(4..4 + n).ok_or_else(bad)?;
    let header: StateHeader =
        serde_json::from_slice(header).map_err(|e| err(format!("fit state: {e}")))?;
    Ok(FitState {
        fitter: fitter_from_bytes(&data[4 + n..]).map_err(err)?,
        columns: header.columns,
        rows: header.rows,
    })
}

/// The calibration passes of a fit in parts: built from the merged fit state's bytes on every
/// worker and on the driver (see the module docs).
#[pyclass(module = "actwatch_engine._engine")]
struct Calibrator {
    calibrator: Option<MonitorCalibrator>,
    columns: TraceColumns,
    rows: u64,
}

impl Calibrator {
    fn inner(&mut self) -> PyResult<&mut MonitorCalibrator> {
        self.calibrator
            .as_mut()
            .ok_or_else(|| err("this calibrator has finished"))
    }

    fn push(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>, joint: bool) -> PyResult<()> {
        let (_, batches) = batches_of(data)?;
        let read = ReadOptions {
            columns: self.columns.clone(),
            ..ReadOptions::default()
        };
        let cal = self.inner()?;
        py.detach(|| -> PyResult<()> {
            for t in decode(&read, "<arrow input>", batches)? {
                if joint {
                    calibrate_joint_batch(cal, &t).map_err(err)?;
                } else {
                    calibrate_batch(cal, &t).map_err(err)?;
                }
            }
            Ok(())
        })
    }
}

#[pymethods]
impl Calibrator {
    /// Fits the detectors of the merged fit state (a `FitState` or its bytes): every worker and
    /// the driver get the same detectors.
    #[new]
    fn new(py: Python<'_>, state: &Bound<'_, PyAny>) -> PyResult<Self> {
        let state = state_of(state)?;
        let FitState {
            fitter,
            columns,
            rows,
        } = state;
        let calibrator = py.detach(|| fitter.finish_fit()).map_err(err)?;
        Ok(Self {
            calibrator: Some(calibrator),
            columns,
            rows,
        })
    }

    /// The calibration pass over `data`: scores its calibration part (and gathers the joint
    /// detector's fit rows).
    fn calibrate(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        self.push(py, data, false)
    }

    /// The joint detector's calibration pass over `data` (after `absorb(joint_fit_part)` and
    /// `finish_joint_fit()`).
    fn calibrate_joint(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        self.push(py, data, true)
    }

    /// What this calibrator gathered, as bytes for the driver; it starts over empty.
    fn take_part<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let part = self.inner()?.take_part().map_err(err)?;
        let b = calibration_part_to_bytes(&part).map_err(err)?;
        Ok(PyBytes::new(py, &b))
    }

    /// Adds a part (bytes from `take_part` or `joint_fit_part`) after those absorbed so far.
    fn absorb(&mut self, py: Python<'_>, part: &[u8]) -> PyResult<()> {
        let cal = self.inner()?;
        py.detach(|| {
            let part = calibration_part_from_bytes(part)?;
            cal.absorb(part).map_err(actwatch_io::Error::from)
        })
        .map_err(err)
    }

    /// Whether a joint detector is still being fitted (its statistics come with the parts).
    #[getter]
    fn joint_wanted(&self) -> bool {
        self.calibrator
            .as_ref()
            .is_some_and(MonitorCalibrator::joint_wanted)
    }

    /// The joint detector's merged fit statistics, as bytes for the joint pass's workers.
    fn joint_fit_part<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let part = self.inner()?.joint_fit_part().map_err(err)?;
        let b = calibration_part_to_bytes(&part).map_err(err)?;
        Ok(PyBytes::new(py, &b))
    }

    /// Fits the joint detector on the statistics absorbed; afterwards `needs_joint_pass` says
    /// whether its calibration pass must run.
    fn finish_joint_fit(&mut self, py: Python<'_>) -> PyResult<bool> {
        let cal = self.inner()?;
        py.detach(|| cal.finish_joint_fit()).map_err(err)?;
        Ok(cal.joint_calibrating())
    }

    /// Whether the joint detector waits for its calibration pass.
    #[getter]
    fn needs_joint_pass(&self) -> bool {
        self.calibrator
            .as_ref()
            .is_some_and(MonitorCalibrator::joint_calibrating)
    }

    /// Builds every calibration: the monitor. `files` names the inputs in its manifest.
    #[pyo3(signature = (files = None))]
    fn finish(&mut self, py: Python<'_>, files: Option<Vec<String>>) -> PyResult<MonitorHandle> {
        let cal = self
            .calibrator
            .take()
            .ok_or_else(|| err("this calibrator has finished"))?;
        let monitor = py.detach(|| cal.finish()).map_err(err)?;
        Ok(MonitorHandle {
            monitor: Arc::new(monitor),
            reference: ReferenceSummary {
                columns: self.columns.clone(),
                files: files.unwrap_or_default(),
                rows: self.rows,
                // Not known to a fit in parts: counting distinct computations, or hashing every
                // row in order, would need one pass in one place.
                computations: 0,
                sha256: String::new(),
            },
        })
    }
}

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ActwatchError", m.py().get_type::<ActwatchError>())?;
    m.add_class::<MonitorHandle>()?;
    m.add_class::<FitState>()?;
    m.add_class::<Calibrator>()?;
    Ok(())
}
