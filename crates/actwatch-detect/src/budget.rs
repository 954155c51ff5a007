//! What a fit will hold in memory at its peak, estimated from the monitor's options and its
//! sites' widths and rows before anything is allocated, so that a server can refuse a fit that
//! would exhaust the machine instead of aborting half-way (one request of 10 rows x 100,000
//! columns once asked for 80 GB).
//!
//! The estimate is an upper bound of the large buffers, not an exact figure; small per-row
//! bookkeeping is covered by a margin:
//! - a Gaussian detector at width d: its statistics (mean, scatter, third moments: about d^2 f64),
//!   the covariance, its shrunk copy and the eigendecomposition's workspace at the finish: 5 d^2
//!   f64 in all, plus its whitening matrix (d x rank f32);
//! - a kNN detector: its reference sample (min(rows, max_references) x d f32) held by the fitter,
//!   the copy its index is built from, and for HNSW the graph (2 m neighbour ids a row, with
//!   their distances), for exact search the bound columns (the largest kernel's rows, f16 at
//!   2 bytes an entry padded to 16, and 5 f32 a row; kernels are tried one at a time);
//! - calibration: one raw score (f64) and computation index (u32) per calibration trace and
//!   detector;
//! - the joint detectors, at the joint width (the sum of the sites' widths, at most
//!   [`crate::joint::JOINT_MAX_WIDTH`]), over as many vectors as the widest site has rows.

use crate::joint::JOINT_MAX_WIDTH;
use crate::monitor::MonitorOptions;
use crate::DetectorSpec;

/// Bytes one detector needs to fit on `rows` vectors of width `d`.
pub fn detector_fit_bytes(spec: &DetectorSpec, d: usize, rows: u64) -> u64 {
    let d = d as u64;
    match spec {
        DetectorSpec::Gaussian(o) => {
            let rank = o.rank.map_or(d, |r| (r as u64).min(d));
            5 * d * d * 8 + d * rank * 4
        }
        DetectorSpec::Knn(o) => {
            let kept = rows.min(o.max_references as u64);
            let index = if kept > o.exact_max as u64 {
                kept * (o.hnsw_m as u64) * 2 * (4 + 4)
            } else {
                kept * (d.div_ceil(16) * 16 * 2 + 5 * 4)
            };
            2 * kept * d * 4 + kept * 8 + index
        }
    }
}

/// The fit's peak, for sites given as (width, reference rows).
pub fn fit_bytes(options: &MonitorOptions, sites: &[(usize, u64)]) -> u64 {
    let calibration = |rows: u64| (rows as f64 * options.calibration_fraction).ceil() as u64 * 12;
    let mut total = 0u64;
    for &(d, rows) in sites {
        for spec in &options.detectors {
            total = total
                .saturating_add(detector_fit_bytes(spec, d, rows))
                .saturating_add(calibration(rows));
        }
    }
    if !options.joint.is_empty() && sites.len() > 1 {
        let width = sites
            .iter()
            .map(|s| s.0)
            .sum::<usize>()
            .min(JOINT_MAX_WIDTH);
        let rows = sites.iter().map(|s| s.1).max().unwrap_or(0);
        for spec in &options.joint {
            total = total
                .saturating_add(detector_fit_bytes(spec, width, rows))
                .saturating_add(calibration(rows));
        }
    }
    // A quarter more for what the estimate leaves out (per-row keys, ids, allocator slack).
    total.saturating_add(total / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_grows_with_width_squared_and_with_rows() {
        let options = MonitorOptions::default();
        let small = fit_bytes(&options, &[(384, 6000)]);
        let wide = fit_bytes(&options, &[(100_000, 10)]);
        // 10 rows x 100,000 columns: the Gaussian's statistics alone are 5 x 10^10 x 8 bytes
        assert!(wide > 400_000_000_000, "{wide}");
        assert!(small < 200 << 20, "{small}");
        assert!(fit_bytes(&options, &[(384, 60_000)]) > small);
        // more sites, more memory; the joint detector adds its own
        assert!(fit_bytes(&options, &[(384, 6000), (384, 6000)]) > 2 * small);
    }
}
