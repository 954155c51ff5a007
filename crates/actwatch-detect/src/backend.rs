//! Where raw detector scores are computed.
//!
//! A [`Monitor`](crate::Monitor) turns raw scores into p-values, fuses them and calibrates the
//! result; only the raw-score kernel (a detector's `score_batch`) is pluggable. The default backend
//! is the detectors' own pure-Rust code. Another backend (libtorch on a CPU or a GPU, in
//! `actwatch-torch`) implements [`RawScorer`] and is attached with
//! [`Monitor::set_backend`](crate::Monitor::set_backend); calibration, fusion and flags are then
//! computed by the very same code, so a backend can only change raw scores, by rounding.

use std::fmt;
use std::sync::Arc;

use crate::spec::FittedDetector;
use crate::Result;

/// Computes raw scores (higher = more anomalous) in place of [`FittedDetector::score_batch`].
pub trait RawScorer: Send + Sync {
    /// Short name for reports (`"torch:cuda:0"`).
    fn name(&self) -> String;

    /// Raw scores of `detector`, the `index`-th detector of the monitor's site `site`, for the
    /// row-major batch `rows` (a whole number of `detector.dim()`-wide rows), equal to
    /// `detector.score_batch(rows)` up to floating-point rounding and with the same errors on bad
    /// input. `Ok(None)` hands this detector back to the default backend (e.g. one it does not
    /// implement).
    fn raw_scores(
        &self,
        site: usize,
        index: usize,
        detector: &FittedDetector,
        rows: &[f32],
    ) -> Result<Option<Vec<f64>>>;
}

/// The backend a monitor scores with: the default (pure Rust) unless one was attached.
#[derive(Clone, Default)]
pub struct Backend(Option<Arc<dyn RawScorer>>);

impl Backend {
    /// The default backend: every detector scores itself.
    pub fn native() -> Self {
        Self(None)
    }

    pub fn new(scorer: Arc<dyn RawScorer>) -> Self {
        Self(Some(scorer))
    }

    /// Whether every detector scores itself (no scorer attached).
    pub fn is_native(&self) -> bool {
        self.0.is_none()
    }

    /// `"native"`, or the attached scorer's name.
    pub fn name(&self) -> String {
        self.0
            .as_ref()
            .map_or_else(|| "native".to_string(), |s| s.name())
    }

    /// Raw scores of `detector` (the `index`-th of site `site`) for `rows`.
    pub fn raw_scores(
        &self,
        site: usize,
        index: usize,
        detector: &FittedDetector,
        rows: &[f32],
    ) -> Result<Vec<f64>> {
        if let Some(scorer) = &self.0 {
            if let Some(raw) = scorer.raw_scores(site, index, detector, rows)? {
                return Ok(raw);
            }
        }
        detector.score_batch(rows)
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Backend({})", self.name())
    }
}
