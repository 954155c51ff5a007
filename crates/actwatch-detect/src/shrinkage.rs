//! Covariance shrinkage: how far the Gaussian detector pulls the sample covariance towards a
//! multiple of the identity.
//!
//! Activation covariances are singular or nearly so (d of 384 to 4096 against a few thousand
//! reference vectors, and strongly low-rank anyway), so the detector never inverts the sample
//! covariance `C = scatter / n` itself but `Σ_s = (1 - a) C + a μ I` with `μ = tr(C) / d`. The
//! coefficient `a ∈ [0, 1]` comes from Ledoit-Wolf or OAS, computed exactly as scikit-learn (>= 1.3)
//! computes them (`sklearn.covariance.ledoit_wolf_shrinkage`, `sklearn.covariance.oas`), but from
//! [`SufficientStats`] alone, so shards and streams get the same coefficient as one pass over the
//! data would.

use crate::stats::SufficientStats;
use crate::{Error, Result};

/// How the shrinkage coefficient is chosen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Shrinkage {
    /// Ledoit-Wolf (2004), as `sklearn.covariance.ledoit_wolf_shrinkage`.
    LedoitWolf,
    /// Oracle approximating shrinkage (Chen et al. 2010), as `sklearn.covariance.oas` (>= 1.3).
    Oas,
    /// A fixed coefficient in `[0, 1]`; `0` is the plain sample covariance.
    Fixed(f64),
}

/// Ledoit-Wolf: needs no tuning and is what scikit-learn users reach for.
pub const DEFAULT_SHRINKAGE: Shrinkage = Shrinkage::LedoitWolf;

impl Default for Shrinkage {
    fn default() -> Self {
        DEFAULT_SHRINKAGE
    }
}

impl Shrinkage {
    /// The coefficient `a` for these statistics.
    ///
    /// Errors: `NotEnoughData` on empty statistics; `InvalidOption` for a `Fixed` value outside
    /// `[0, 1]` (or NaN); `Input(Malformed)` for statistics whose buffers do not fit their width.
    pub fn coefficient(&self, stats: &SufficientStats) -> Result<f64> {
        stats.validate()?;
        if let Shrinkage::Fixed(a) = *self {
            if !(0.0..=1.0).contains(&a) {
                return Err(Error::InvalidOption(format!(
                    "fixed shrinkage must lie in [0, 1], got {a}"
                )));
            }
        }
        if stats.count() == 0 {
            return Err(Error::NotEnoughData(
                "shrinkage needs at least one vector".into(),
            ));
        }
        Ok(match *self {
            Shrinkage::LedoitWolf => ledoit_wolf_shrinkage(stats),
            Shrinkage::Oas => oas_shrinkage(stats),
            Shrinkage::Fixed(a) => a,
        })
    }
}

/// `(tr(C), ||C||_F²)` of the covariance `C = scatter / n` (`n > 0`).
fn trace_and_frobenius2(stats: &SufficientStats) -> (f64, f64) {
    let d = stats.dim();
    let inv_n = 1.0 / stats.count() as f64;
    let s = stats.scatter();
    let trace = (0..d).map(|i| s[i * d + i]).sum::<f64>() * inv_n;
    let frob2 = s.iter().map(|v| v * v).sum::<f64>() * inv_n * inv_n;
    (trace, frob2)
}

/// The Ledoit-Wolf coefficient, as scikit-learn's `ledoit_wolf_shrinkage` (`assume_centered=False`).
///
/// With `y_k = x_k - mean`, `C = Σ y yᵀ / n`, `μ = tr(C) / d`:
/// `β = (Σ_k ||y_k||⁴ / n - ||C||_F²) / (d n)`, `δ = (||C||_F² - 2 μ tr(C) + d μ²) / d`,
/// `a = min(β, δ) / δ` (0 when that is 0). As in scikit-learn, a single feature gives 0. Empty
/// statistics give 0. Deviation: the result is clamped to `[0, 1]`, which only matters when rounding
/// makes `β` (a sum of squares) come out slightly negative.
pub fn ledoit_wolf_shrinkage(stats: &SufficientStats) -> f64 {
    let d = stats.dim();
    if d <= 1 || stats.count() == 0 || stats.validate().is_err() {
        return 0.0;
    }
    let n = stats.count() as f64;
    let df = d as f64;
    let (trace, delta_) = trace_and_frobenius2(stats);
    let mu = trace / df;
    let beta_ = stats.fourth();
    let beta = (beta_ / n - delta_) / (df * n);
    let delta = (delta_ - 2.0 * mu * trace + df * mu * mu) / df;
    let beta = beta.min(delta);
    let a = if beta == 0.0 { 0.0 } else { beta / delta };
    if a.is_finite() {
        a.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// The OAS coefficient, as scikit-learn (>= 1.3) `oas`.
///
/// `α = ||C||_F² / d²`, `μ = tr(C) / d`, `a = min((α + μ²) / ((n + 1)(α - μ²/d)), 1)`, and 1 when the
/// denominator is 0 (isotropic `C`). A single feature gives 0 as in scikit-learn; empty statistics
/// give 0. Deviation: a denominator that rounding pushes below 0 (it is `||C||_F² - tr(C)²/d ≥ 0`
/// over `d²`) is treated as 0, i.e. gives 1.
pub fn oas_shrinkage(stats: &SufficientStats) -> f64 {
    let d = stats.dim();
    if d <= 1 || stats.count() == 0 || stats.validate().is_err() {
        return 0.0;
    }
    let n = stats.count() as f64;
    let df = d as f64;
    let (trace, frob2) = trace_and_frobenius2(stats);
    let alpha = frob2 / (df * df);
    let mu = trace / df;
    let mu2 = mu * mu;
    let num = alpha + mu2;
    let den = (n + 1.0) * (alpha - mu2 / df);
    if den <= 0.0 {
        return 1.0;
    }
    let a = (num / den).min(1.0);
    if a.is_finite() {
        a.max(0.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actwatch_testkit::Rng;
    use proptest::prelude::*;

    /// The centred data matrix (n×d, row-major, f64), as sklearn's `X - X.mean(0)`.
    fn centred(rows: &[f32], d: usize) -> Vec<f64> {
        let n = rows.len() / d;
        let mut mean = vec![0.0; d];
        for r in rows.chunks_exact(d) {
            for j in 0..d {
                mean[j] += r[j] as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        rows.iter()
            .enumerate()
            .map(|(i, &x)| x as f64 - mean[i % d])
            .collect()
    }

    /// Transcription of sklearn's `ledoit_wolf_shrinkage` (block_size >= d, so one block).
    fn sklearn_lw(rows: &[f32], d: usize) -> f64 {
        if d == 1 {
            return 0.0;
        }
        let n = rows.len() / d;
        let x = centred(rows, d);
        let x2: Vec<f64> = x.iter().map(|v| v * v).collect();
        let emp_cov_trace: Vec<f64> = (0..d)
            .map(|j| (0..n).map(|i| x2[i * d + j]).sum::<f64>() / n as f64)
            .collect();
        let mu = emp_cov_trace.iter().sum::<f64>() / d as f64;
        // delta_ = sum((X.T @ X) ** 2) / n²; beta_ = sum(X2.T @ X2)
        let mut delta_ = 0.0;
        let mut beta_ = 0.0;
        for a in 0..d {
            for b in 0..d {
                let xtx: f64 = (0..n).map(|i| x[i * d + a] * x[i * d + b]).sum();
                delta_ += xtx * xtx;
                beta_ += (0..n).map(|i| x2[i * d + a] * x2[i * d + b]).sum::<f64>();
            }
        }
        delta_ /= (n * n) as f64;
        let beta = 1.0 / (d * n) as f64 * (beta_ / n as f64 - delta_);
        let mut delta = delta_ - 2.0 * mu * emp_cov_trace.iter().sum::<f64>() + d as f64 * mu * mu;
        delta /= d as f64;
        let beta = beta.min(delta);
        if beta == 0.0 {
            0.0
        } else {
            beta / delta
        }
    }

    /// Transcription of sklearn's `_oas` (>= 1.3).
    fn sklearn_oas(rows: &[f32], d: usize) -> f64 {
        if d == 1 {
            return 0.0;
        }
        let n = rows.len() / d;
        let x = centred(rows, d);
        let mut emp_cov = vec![0.0; d * d];
        for a in 0..d {
            for b in 0..d {
                emp_cov[a * d + b] =
                    (0..n).map(|i| x[i * d + a] * x[i * d + b]).sum::<f64>() / n as f64;
            }
        }
        let alpha = emp_cov.iter().map(|v| v * v).sum::<f64>() / (d * d) as f64;
        let mu = (0..d).map(|i| emp_cov[i * d + i]).sum::<f64>() / d as f64;
        let mu2 = mu * mu;
        let num = alpha + mu2;
        let den = (n as f64 + 1.0) * (alpha - mu2 / d as f64);
        if den == 0.0 {
            1.0
        } else {
            (num / den).min(1.0)
        }
    }

    fn stats_of(rows: &[f32], d: usize) -> SufficientStats {
        let mut st = SufficientStats::new(d);
        st.push_batch(rows).unwrap();
        st
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn lw_and_oas_match_sklearn_transcriptions(
            seed in any::<u64>(),
            d in 1usize..10,
            n in 2usize..60,
            shards in 1usize..4,
        ) {
            let rows = Rng::new(seed).correlated_rows(n, d, 3.0, seed ^ 0xABCD);
            // Fit from shards: the coefficient must not depend on how the data arrived.
            let mut st = SufficientStats::new(d);
            let per = n.div_ceil(shards);
            for chunk in rows.chunks(per * d) {
                st.merge(&stats_of(chunk, d)).unwrap();
            }
            let (lw, lw_want) = (ledoit_wolf_shrinkage(&st), sklearn_lw(&rows, d));
            let (oas, oas_want) = (oas_shrinkage(&st), sklearn_oas(&rows, d));
            prop_assert!((lw - lw_want).abs() <= 1e-9 * lw_want.abs().max(1e-3), "lw {} vs {}", lw, lw_want);
            prop_assert!((oas - oas_want).abs() <= 1e-9 * oas_want.abs().max(1e-3), "oas {} vs {}", oas, oas_want);
            prop_assert!((0.0..=1.0).contains(&lw) && (0.0..=1.0).contains(&oas));
        }
    }

    #[test]
    fn wide_undersampled_case_matches_sklearn() {
        // d > n, the regime activations live in.
        let (d, n) = (40, 12);
        let rows = Rng::new(11).correlated_rows(n, d, 0.0, 12);
        let st = stats_of(&rows, d);
        let (lw, want) = (ledoit_wolf_shrinkage(&st), sklearn_lw(&rows, d));
        assert!((lw - want).abs() < 1e-9 * want, "{lw} vs {want}");
        assert!(lw > 0.0 && lw < 1.0);
        let (oas, want) = (oas_shrinkage(&st), sklearn_oas(&rows, d));
        assert!(
            (oas - want).abs() < 1e-9 * want.max(1e-3),
            "{oas} vs {want}"
        );
    }

    /// `(2,0), (-2,0), (0,1), (0,-1)` repeated `k` times: C = diag(2, 0.5), tr = 2.5, μ = 1.25,
    /// ||C||_F² = 4.25, Σ||y||⁴ = 34k, n = 4k.
    fn hand_rows(k: usize) -> Vec<f32> {
        let mut rows = Vec::new();
        for _ in 0..k {
            rows.extend_from_slice(&[2.0, 0.0, -2.0, 0.0, 0.0, 1.0, 0.0, -1.0]);
        }
        rows
    }

    #[test]
    fn hand_checked_coefficients() {
        // LW: β = (34k/4k - 4.25)/(2·4k) = 4.25/(8k); δ = (4.25 - 6.25 + 3.125)/2 = 0.5625;
        // a = 17/(18k). OAS: α = 4.25/4, μ² = 1.5625, num = 2.625,
        // den = (4k+1)(1.0625 - 0.78125) = 0.28125(4k+1); a = (28/3)/(4k+1).
        let st = stats_of(&hand_rows(1), 2);
        assert!((ledoit_wolf_shrinkage(&st) - 17.0 / 18.0).abs() < 1e-15);
        assert_eq!(oas_shrinkage(&st), 1.0); // 28/15 > 1, capped
        let st = stats_of(&hand_rows(5), 2);
        assert!((ledoit_wolf_shrinkage(&st) - 17.0 / 90.0).abs() < 1e-15);
        assert!((oas_shrinkage(&st) - 4.0 / 9.0).abs() < 1e-15);
        assert_eq!(
            Shrinkage::LedoitWolf.coefficient(&st).unwrap(),
            ledoit_wolf_shrinkage(&st)
        );
        assert_eq!(Shrinkage::Oas.coefficient(&st).unwrap(), oas_shrinkage(&st));
        assert_eq!(Shrinkage::Fixed(0.25).coefficient(&st).unwrap(), 0.25);
    }

    #[test]
    fn degenerate_cases() {
        // Isotropic C: LW δ = 0 gives 0, OAS denominator 0 gives 1 (as sklearn).
        let st = stats_of(&[1.0, 0.0, -1.0, 0.0, 0.0, 1.0, 0.0, -1.0], 2);
        assert_eq!(ledoit_wolf_shrinkage(&st), 0.0);
        assert_eq!(oas_shrinkage(&st), 1.0);
        // One feature: 0 whatever the data.
        let st = stats_of(&[1.0, 4.0, -2.0], 1);
        assert_eq!(ledoit_wolf_shrinkage(&st), 0.0);
        assert_eq!(oas_shrinkage(&st), 0.0);
        // One sample: centred data is zero, LW gives 0.
        let st = stats_of(&[1.0, 2.0, 3.0], 3);
        assert_eq!(ledoit_wolf_shrinkage(&st), 0.0);
        // Empty statistics.
        let empty = SufficientStats::new(3);
        assert_eq!(ledoit_wolf_shrinkage(&empty), 0.0);
        assert_eq!(oas_shrinkage(&empty), 0.0);
        assert!(matches!(
            Shrinkage::LedoitWolf.coefficient(&empty),
            Err(Error::NotEnoughData(_))
        ));
    }

    #[test]
    fn fixed_out_of_range_is_an_invalid_option() {
        let st = stats_of(&hand_rows(2), 2);
        for bad in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                Shrinkage::Fixed(bad).coefficient(&st),
                Err(Error::InvalidOption(_))
            ));
        }
        assert_eq!(Shrinkage::Fixed(0.0).coefficient(&st).unwrap(), 0.0);
        assert_eq!(Shrinkage::Fixed(1.0).coefficient(&st).unwrap(), 1.0);
        assert_eq!(Shrinkage::default(), DEFAULT_SHRINKAGE);
    }
}
