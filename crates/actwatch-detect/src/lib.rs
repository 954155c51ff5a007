//! actwatch-detect: detectors, mergeable statistics, conformal calibration and p-value fusion.
//!
//! Pure compute: no I/O, no async, no transport. The one decision a reader must know: every
//! detector turns a batch of vectors into raw scores (higher = more anomalous) with one matrix
//! product per batch, and raw scores are only ever compared through a [`Calibration`] built on
//! held-out trusted data, so detectors with different scales fuse through their p-values and the
//! fused statistic is itself calibrated at the level of whole computations (see [`monitor`]).

mod error;

pub mod aggregate;
pub mod backend;
pub mod budget;
pub mod calibration;
pub mod check;
pub mod fusion;
pub mod gaussian;
pub mod joint;
pub mod knn;
pub mod metrics;
pub mod monitor;
pub mod probe;
pub mod score;
pub mod shrinkage;
pub mod spec;
pub mod stats;
pub mod strata;

pub use aggregate::Aggregation;
pub use calibration::Calibration;
pub use error::{Error, Result};
pub use fusion::Fusion;
pub use gaussian::{GaussianDetector, GaussianFitter, GaussianOptions};
pub use knn::{KnnDetector, KnnFitter, KnnIndex, KnnOptions, Metric};
pub use monitor::{Monitor, MonitorOptions};
pub use score::{ComputationResult, OpenComputations, ProbeResult, ProbeTraceScores, SiteScores};
pub use shrinkage::Shrinkage;
pub use spec::DetectorSpec;
pub use stats::SufficientStats;
