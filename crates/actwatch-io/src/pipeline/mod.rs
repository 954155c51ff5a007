//! The batch pipeline: fit a monitor from Parquet reference files, score Parquet archives.
//!
//! Both read the input as a stream of row groups ([`TraceReader`]), so memory is bounded by the
//! batch size plus what the result needs: fitting keeps the detectors' state (sufficient
//! statistics; the kNN reference vectors) and one raw score per calibration trace; scoring at
//! computation level keeps one small accumulator per computation, and at trace level nothing at all
//! (each batch is scored and written before the next is read). Fitting reads the input twice: the
//! first pass fits, the second scores the calibration part with the fitted detectors, so the
//! calibration vectors are never held in memory.

mod check;
mod fit;
mod score;
mod table;

pub use check::check_reference;
pub use fit::{
    calibrate_batch, calibrate_joint_batch, calibrate_reference, calibrate_reference_with,
    fit_monitor, fit_monitor_with_examples, fold_batch, fold_examples, fold_reference,
    ExampleInput,
};
pub use score::{
    score_computations, score_to_parquet, score_trace_batch, trace_level_schema, ComputationScorer,
    Level, ProvenanceConflicts, ScoreSummary,
};
pub use table::ComputationTable;

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
