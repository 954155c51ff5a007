//! The Gaussian / Mahalanobis detector: score = squared Mahalanobis distance of a vector from the
//! mean of the reference set, under a shrunk covariance.
//!
//! Fitting goes through [`SufficientStats`] (so a [`GaussianFitter`] can be fed a stream, or be
//! one of several shards merged at the end), then [`GaussianDetector::fit`] shrinks the covariance
//! (`Σ_s = (1 - a) C + a μ I`, see [`crate::shrinkage`]), eigendecomposes it once and keeps, in
//! `f32`, what scoring needs:
//! - full whitening (`rank = d`): `W = V Λ^{-1/2}` (d×d), score `||(x - m) W||²`;
//! - low rank (`r < d`, for wide models): the top `r` eigenvectors `V_r` and eigenvalues `λ_j`, and
//!   the mean `σ²` of the `d - r` discarded eigenvalues; score
//!   `Σ_j p_j² / λ_j + (||x - m||² - ||p||²) / σ²` with `p = (x - m) V_r`, i.e. the exact
//!   Mahalanobis distance under `V_r Λ_r V_rᵀ + σ² (I - V_r V_rᵀ)`.
//!
//! At full rank scoring does not multiply by `W` itself but by the upper-triangular `Rᵀ` with
//! `R Rᵀ = W Wᵀ = Σ_s⁻¹` (the Cholesky factor of the precision, formed in `f64` from the stored
//! `W`): the same score `||Rᵀ (x - m)||²` for half the multiply-adds and half the bytes.
//!
//! Either way scoring a batch is one `f32` matrix product (batch × d times d × r, on faer's rayon
//! parallelism) plus linear work; a large batch is scored in tiles of [`SCORE_TILE_ROWS`] rows,
//! several at once, so scratch memory stays bounded and each tile stays in one core's cache.
//! Rows are L2-normalised first when [`GaussianOptions::normalize`] is set (the default), both when
//! fitting and when scoring. Precision: scores agree with an `f64` evaluation to about 1e-5
//! relative at full rank; at low rank the residual `||y||² - ||p||²` is a difference of `f32`
//! quantities, so its relative error grows like `f32` epsilon times `λ_1 / σ²`.

use actwatch_core::{check_rows, l2_normalize_rows, Error as CoreError};
use std::sync::OnceLock;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rayon::prelude::*;

use crate::shrinkage::{Shrinkage, DEFAULT_SHRINKAGE};
use crate::stats::{par_for, SufficientStats, STATS_CHUNK_ROWS};
use crate::{Error, Result};

/// Widest model whitened in full by default (`rank: None`): at d = 1024 the whitening matrix is
/// 4 MiB of `f32` and a vector costs 2 MFLOP.
pub const FULL_RANK_MAX_DIM: usize = 1024;

/// Rank kept by default (`rank: None`) above [`FULL_RANK_MAX_DIM`]: at d = 4096 this is 16× cheaper
/// to score than full whitening (and 16× smaller), the rest of the spectrum being modelled as
/// isotropic.
pub const DEFAULT_RANK: usize = 256;

/// Rows per tile when a large batch (at least two tiles) is scored tile by tile, one tile per
/// thread at a time: scratch memory is `SCORE_TILE_ROWS * (d + r)` `f32` values per thread, and at
/// d = 384 the tile, its projections and the whitening matrix (1.4 MB) stay in a core's L2.
pub const SCORE_TILE_ROWS: usize = 256;

/// Eigenvalues of the shrunk covariance are floored at this fraction of its mean eigenvalue
/// `μ = tr(C) / d`. Shrinkage `a > 0` already bounds them below by `a μ`; the floor only keeps
/// scores finite for `Shrinkage::Fixed(0.0)` (or a zero Ledoit-Wolf coefficient) on singular data.
pub const EIGEN_FLOOR_REL: f64 = 1e-10;

/// How a Gaussian detector is fitted.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GaussianOptions {
    /// How the covariance is shrunk (default Ledoit-Wolf).
    pub shrinkage: Shrinkage,
    /// L2-normalise every vector before fitting and scoring (default true).
    pub normalize: bool,
    /// Eigen-directions modelled individually: `Some(r)` with `1 <= r <= d` (`Some(d)` is full
    /// whitening); `None` means full whitening up to [`FULL_RANK_MAX_DIM`], else [`DEFAULT_RANK`].
    pub rank: Option<usize>,
}

impl Default for GaussianOptions {
    fn default() -> Self {
        Self {
            shrinkage: DEFAULT_SHRINKAGE,
            normalize: true,
            rank: None,
        }
    }
}

impl GaussianOptions {
    /// The rank these options give at width `dim`; `InvalidOption` for 0 or more than `dim`.
    pub fn resolved_rank(&self, dim: usize) -> Result<usize> {
        match self.rank {
            None if dim <= FULL_RANK_MAX_DIM => Ok(dim),
            None => Ok(DEFAULT_RANK.min(dim)),
            Some(r) if r >= 1 && r <= dim => Ok(r),
            Some(r) => Err(Error::InvalidOption(format!(
                "rank must lie in 1..={dim}, got {r}"
            ))),
        }
    }
}

/// Bytes of preprocessed rows a [`GaussianFitter`] holds back until they fill one chunk.
const GRID_BYTES: usize = 4 << 20;

/// Rows per chunk of the fixed grid a [`GaussianFitter`] folds its statistics on: 4 MiB of rows,
/// at least 64 and at most [`STATS_CHUNK_ROWS`] (2048 at d = 384, 256 at d = 4096).
pub fn grid_rows(dim: usize) -> usize {
    (GRID_BYTES / (4 * dim.max(1))).clamp(64, STATS_CHUNK_ROWS)
}

/// Accumulates the statistics a [`GaussianDetector`] is fitted from: feed it batches (or merge
/// fitters built on other parts), then [`GaussianFitter::finish`].
///
/// Rows are folded into the statistics in fixed chunks of [`grid_rows`] rows, whatever the
/// batches they came in (the last partial chunk waits in `pending`), so the statistics of a part
/// depend only on its rows in order, not on how a reader or a caller cut them into batches. Parts
/// merged in order ([`GaussianFitter::merge`]: `self`'s pending rows are folded, then `other`'s
/// statistics merged, and `other`'s pending rows become `self`'s) give the same statistics, to the
/// bit, wherever each part was folded: this is what makes a sharded fit equal a single one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GaussianFitter {
    opts: GaussianOptions,
    stats: SufficientStats,
    /// Preprocessed rows not yet folded: fewer than one grid chunk.
    pending: Vec<f32>,
}

impl GaussianFitter {
    pub fn new(dim: usize, opts: GaussianOptions) -> Self {
        Self {
            opts,
            stats: SufficientStats::new(dim),
            pending: Vec::new(),
        }
    }

    /// Folds in a batch (row-major, `len = k * dim`), L2-normalising a copy first if the options
    /// say so. Bad input is rejected (`Input` errors) and leaves the fitter unchanged.
    pub fn push_batch(&mut self, rows: &[f32]) -> Result<()> {
        let d = self.stats.dim();
        check_rows(d, rows)?;
        if self.opts.normalize {
            let mut copy = rows.to_vec();
            l2_normalize_rows(&mut copy, d);
            self.fold(&copy)
        } else {
            self.fold(rows)
        }
    }

    /// Folds checked, preprocessed rows on the grid.
    fn fold(&mut self, mut rows: &[f32]) -> Result<()> {
        let chunk = grid_rows(self.stats.dim()) * self.stats.dim();
        if !self.pending.is_empty() {
            let take = (chunk - self.pending.len()).min(rows.len());
            self.pending.extend_from_slice(&rows[..take]);
            rows = &rows[take..];
            if self.pending.len() < chunk {
                return Ok(());
            }
            self.stats.push_batch(&self.pending)?;
            self.pending.clear();
        }
        let whole = rows.len() - rows.len() % chunk;
        self.stats
            .push_chunks(&rows[..whole], grid_rows(self.stats.dim()))?;
        self.pending.extend_from_slice(&rows[whole..]);
        Ok(())
    }

    /// Adds the vectors another fitter has seen, as the part that follows `self`'s (see the type's
    /// docs). Both must have the same width and the same `normalize` (their statistics are over
    /// differently preprocessed vectors otherwise: `InvalidOption`); `self`'s shrinkage and rank
    /// are kept.
    pub fn merge(&mut self, other: &GaussianFitter) -> Result<()> {
        if self.opts.normalize != other.opts.normalize {
            return Err(Error::InvalidOption(
                "cannot merge fitters that disagree on `normalize`".into(),
            ));
        }
        if other.stats.dim() != self.stats.dim() {
            return Err(CoreError::WidthMismatch {
                expected: self.stats.dim(),
                got: other.stats.dim(),
            }
            .into());
        }
        if other.count() == 0 {
            // An empty part changes nothing (not even where the pending rows are folded).
            return Ok(());
        }
        self.flush()?;
        self.stats.merge(&other.stats)?;
        self.pending.clone_from(&other.pending);
        Ok(())
    }

    /// Folds the pending rows (a chunk shorter than the grid's).
    fn flush(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            self.stats.push_batch(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    pub fn dim(&self) -> usize {
        self.stats.dim()
    }

    /// Checks that a deserialised fitter holds buffers of width `dim`: statistics of that width,
    /// pending rows finite, whole and fewer than one grid chunk (what folding assumes).
    pub(crate) fn check_state(&self, dim: usize) -> Result<()> {
        self.stats.validate()?;
        let d = self.stats.dim();
        if d != dim {
            return Err(CoreError::WidthMismatch {
                expected: dim,
                got: d,
            }
            .into());
        }
        let rows = check_rows(d, &self.pending)?;
        if rows >= grid_rows(d) {
            return Err(CoreError::Malformed(format!(
                "corrupt Gaussian fitter: {rows} pending rows, at most {} expected",
                grid_rows(d) - 1
            ))
            .into());
        }
        Ok(())
    }

    /// Vectors seen, pending ones included.
    pub fn count(&self) -> u64 {
        self.stats.count() + (self.pending.len() / self.stats.dim().max(1)) as u64
    }

    /// The statistics of every vector seen (pending ones folded into a copy).
    pub fn stats(&self) -> Result<SufficientStats> {
        let mut s = self.stats.clone();
        if !self.pending.is_empty() {
            s.push_batch(&self.pending)?;
        }
        Ok(s)
    }

    pub fn options(&self) -> &GaussianOptions {
        &self.opts
    }

    pub fn finish(&self) -> Result<GaussianDetector> {
        if self.pending.is_empty() {
            GaussianDetector::fit(&self.stats, &self.opts)
        } else {
            GaussianDetector::fit(&self.stats()?, &self.opts)
        }
    }
}

/// A fitted Gaussian detector; see the module docs for the model.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GaussianDetector {
    dim: usize,
    opts: GaussianOptions,
    shrinkage: f64,
    rank: usize,
    /// Mean of the (preprocessed) reference vectors.
    mean: Vec<f32>,
    /// d×r row-major: `v_j / sqrt(λ_j)` at full rank, `v_j` at low rank.
    proj: Vec<f32>,
    /// The `r` kept eigenvalues of the shrunk covariance (after flooring), largest first.
    eigenvalues: Vec<f64>,
    /// Low rank only: `σ²`, the mean of the discarded eigenvalues.
    residual_variance: Option<f64>,
    /// Full rank only, derived from `proj` on first use (never stored, so a reloaded detector
    /// derives the same bits): see [`Self::precision_factor`].
    #[serde(skip)]
    precision_factor: OnceLock<Option<Vec<f32>>>,
}

impl GaussianDetector {
    /// Fits from statistics over already preprocessed vectors (L2-normalised if `opts.normalize`).
    ///
    /// Errors: `NotEnoughData` when there are no vectors or they are all identical (zero
    /// covariance); `InvalidOption` for a bad rank or fixed shrinkage; `Numerical` if the
    /// eigendecomposition fails.
    pub fn fit(stats: &SufficientStats, opts: &GaussianOptions) -> Result<Self> {
        stats.validate()?;
        let d = stats.dim();
        if d == 0 {
            return Err(CoreError::Malformed("vector width is zero".into()).into());
        }
        let r = opts.resolved_rank(d)?;
        if stats.count() == 0 {
            return Err(Error::NotEnoughData(
                "no reference vectors to fit a Gaussian on".into(),
            ));
        }
        let a = opts.shrinkage.coefficient(stats)?;
        let cov = stats.covariance();
        let mu = (0..d).map(|i| cov[i * d + i]).sum::<f64>() / d as f64;
        if !(mu > 0.0 && mu.is_finite()) {
            return Err(Error::NotEnoughData(format!(
                "the reference vectors have zero (or non-finite) variance (trace/d = {mu}); \
                 at least two distinct vectors are needed"
            )));
        }
        let shrunk = Mat::<f64>::from_fn(d, d, |i, j| {
            (1.0 - a) * cov[i * d + j] + if i == j { a * mu } else { 0.0 }
        });
        let evd = shrunk
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| Error::Numerical(format!("eigendecomposition failed: {e:?}")))?;
        let u = evd.U();
        let s = evd.S().column_vector();
        let floor = mu * EIGEN_FLOOR_REL;
        // Eigenvalues come in nondecreasing order: keep the last r, largest first.
        let lam: Vec<f64> = (0..d).map(|i| s[i].max(floor)).collect();
        let kept: Vec<usize> = (d - r..d).rev().collect();
        let eigenvalues: Vec<f64> = kept.iter().map(|&i| lam[i]).collect();
        let residual_variance = (r < d).then(|| {
            let rest = &lam[..d - r];
            (rest.iter().sum::<f64>() / rest.len() as f64).max(floor)
        });
        let scale: Vec<f64> = if r == d {
            eigenvalues.iter().map(|l| 1.0 / l.sqrt()).collect()
        } else {
            vec![1.0; r]
        };
        let mut proj = vec![0.0f32; d * r];
        for i in 0..d {
            for (jj, (&col, sc)) in kept.iter().zip(&scale).enumerate() {
                proj[i * r + jj] = (u[(i, col)] * sc) as f32;
            }
        }
        Ok(Self {
            dim: d,
            opts: opts.clone(),
            shrinkage: a,
            rank: r,
            mean: stats.mean().iter().map(|&m| m as f32).collect(),
            proj,
            eigenvalues,
            residual_variance,
            precision_factor: OnceLock::new(),
        })
    }

    /// Derives what scoring uses beyond the stored fields (the full-rank precision factor) now
    /// rather than on the first scored batch (3 ms at d = 384, 60 ms at d = 1024, 2.5 s at d = 4096
    /// full rank, on 2 cores).
    pub fn prepare(&self) {
        self.precision_factor();
    }

    /// Full rank: `Rᵀ`, d×d column-major and upper triangular, where `R` is the lower Cholesky
    /// factor of `W Wᵀ` (the precision `Σ_s⁻¹`, formed in `f64` from the `f32` projection `W`), so
    /// `||Rᵀ y||² = ||W y||²` up to rounding and a triangular product costs half of `W`'s.
    /// `None` at low rank, or should the factorisation fail (scoring then multiplies by `W`).
    fn precision_factor(&self) -> Option<&[f32]> {
        self.precision_factor
            .get_or_init(|| {
                let d = self.dim;
                if self.residual_variance.is_some() || self.proj.len() != d * d {
                    return None;
                }
                let w = Mat::<f64>::from_fn(d, d, |i, j| f64::from(self.proj[i * d + j]));
                let mut p = Mat::<f64>::zeros(d, d);
                matmul(
                    p.as_mut(),
                    Accum::Replace,
                    &w,
                    w.transpose(),
                    1.0,
                    par_for(d * d * d),
                );
                let llt = p.llt(Side::Lower).ok()?;
                let l = llt.L();
                // Rᵀ column-major: column j holds row j of R, i.e. R[j, i] for i <= j.
                let mut rt = vec![0.0f32; d * d];
                for j in 0..d {
                    for i in 0..=j {
                        rt[j * d + i] = l[(j, i)] as f32;
                    }
                }
                rt.iter().all(|v| v.is_finite()).then_some(rt)
            })
            .as_deref()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn options(&self) -> &GaussianOptions {
        &self.opts
    }

    /// The shrinkage coefficient `a` used.
    pub fn shrinkage(&self) -> f64 {
        self.shrinkage
    }

    /// Eigen-directions modelled individually; `dim()` for full whitening.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Mean of the reference vectors (after preprocessing).
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// The kept eigenvalues of the shrunk covariance, largest first (`rank()` of them).
    pub fn eigenvalues(&self) -> &[f64] {
        &self.eigenvalues
    }

    /// Low rank only: the variance assumed in every discarded direction.
    pub fn residual_variance(&self) -> Option<f64> {
        self.residual_variance
    }

    /// The d×r row-major projection `W` scoring multiplies the centred rows by: column j is
    /// `v_j / sqrt(λ_j)` at full rank (score = `||(y - mean) W||²`), the unit eigenvector `v_j` at
    /// low rank (score = `Σ_j (1/λ_j - 1/σ²) p_j² + ||y - mean||² / σ²`, `σ²` =
    /// [`Self::residual_variance`]). For other compute backends; see [`Self::score_batch`].
    pub fn projection(&self) -> &[f32] {
        &self.proj
    }

    /// The top `r` (at most [`Self::rank`]) whitened principal coordinates of each of `rows`,
    /// row-major, `r` per row: `(y - mean)·v_j / sqrt(λ_j)` with `y` the row as scoring prepares
    /// it, so each has unit variance under the shrunk covariance (what the joint detector reduces
    /// a wide site to, [`crate::joint`]). At low rank they come out of the product scoring makes,
    /// the same bits as [`Self::score_with_coordinates`] gives; at full rank from a product of
    /// their own. Errors as [`Self::score_batch`].
    pub fn whitened_coordinates(&self, rows: &[f32], r: usize) -> Result<Vec<f32>> {
        if self.residual_variance.is_some() {
            Ok(self.score_rows(rows, r.clamp(1, self.rank))?.1)
        } else {
            self.full_rank_coordinates(rows, r)
        }
    }

    /// [`Self::score_batch`] and [`Self::whitened_coordinates`] together: at low rank in one
    /// pass, so the coordinates cost no second read of the projection (at d = 4096, rank 256, it
    /// is 4 MiB per batch: a live token's joint detector reads it again otherwise).
    pub fn score_with_coordinates(&self, rows: &[f32], r: usize) -> Result<(Vec<f64>, Vec<f32>)> {
        if self.residual_variance.is_some() {
            self.score_rows(rows, r.clamp(1, self.rank))
        } else {
            Ok((
                self.score_batch(rows)?,
                self.full_rank_coordinates(rows, r)?,
            ))
        }
    }

    /// Full rank: `proj` already holds `v_j / sqrt(λ_j)`; multiply by its first `r` columns.
    fn full_rank_coordinates(&self, rows: &[f32], r: usize) -> Result<Vec<f32>> {
        self.validate()?;
        let d = self.dim;
        let r = r.clamp(1, self.rank);
        let m = check_rows(d, rows)?;
        let y = centre_rows(rows, &self.mean, self.opts.normalize);
        // Pᵀ (r×m) = Bᵀ (r×d) · Yᵀ (d×m), as scoring lays it out
        let mut out = vec![0.0f32; m * r];
        let pt = MatMut::from_column_major_slice_mut(&mut out, r, m);
        let bt = MatRef::from_row_major_slice(&self.proj, d, self.rank)
            .subcols(0, r)
            .transpose();
        let yt = MatRef::from_column_major_slice(&y, d, m);
        matmul(pt, Accum::Replace, bt, yt, 1.0f32, par_for(m * d * r));
        Ok(out)
    }

    /// The rows as scoring multiplies them by [`Self::projection`] (L2-normalised if fitted so,
    /// minus the mean; row-major f32, bit for bit what [`Self::score_batch`] uses), and per row the
    /// low-rank residual term `||y||² / σ²` (0 at full rank). For other compute backends, which
    /// then only compute the product and the weighted sum of squares. Errors as `score_batch`.
    pub fn centred_rows(&self, rows: &[f32]) -> Result<(Vec<f32>, Vec<f64>)> {
        self.validate()?;
        let d = self.dim;
        let k = check_rows(d, rows)?;
        let resid_inv = self.residual_variance.map_or(0.0, |s2| 1.0 / s2);
        let mut y = vec![0.0f32; k * d];
        let mut resid = vec![0.0f64; k];
        rows.par_chunks_exact(d)
            .zip(y.par_chunks_exact_mut(d).zip(resid.par_iter_mut()))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(src, (dst, r))| {
                *r = prepare_row(src, dst, &self.mean, self.opts.normalize, resid_inv);
            });
        Ok((y, resid))
    }

    /// Squared Mahalanobis distance under the shrunk covariance, one per row of `rows`
    /// (row-major, `len = k * dim`); higher = more anomalous. Rows are L2-normalised first if the
    /// detector was fitted that way.
    ///
    /// Errors (never panics on input): a length that is not a multiple of `dim` gives
    /// `Input(Malformed)`, NaN or infinity `Input(NonFinite)`. An empty batch gives no scores.
    pub fn score_batch(&self, rows: &[f32]) -> Result<Vec<f64>> {
        Ok(self.score_rows(rows, 0)?.0)
    }

    /// The scores of `rows`, and at low rank with `keep` > 0 the first `keep` whitened principal
    /// coordinates of each row (row-major; empty when `keep` is 0).
    fn score_rows(&self, rows: &[f32], keep: usize) -> Result<(Vec<f64>, Vec<f32>)> {
        self.validate()?;
        let (d, r) = (self.dim, self.rank);
        let k = check_rows(d, rows)?;
        let mut out = Vec::with_capacity(k);
        if k == 0 {
            return Ok((out, Vec::new()));
        }
        // score = Σ_j w_j p_j² + c ||y||²: full rank w = 1 (None), c = 0; low rank
        // w_j = 1/λ_j - 1/σ², c = 1/σ².
        let (weights, resid_inv): (Option<Vec<f64>>, f64) = match self.residual_variance {
            None => (None, 0.0),
            Some(s2) => (
                Some(
                    self.eigenvalues
                        .iter()
                        .map(|l| 1.0 / l - 1.0 / s2)
                        .collect(),
                ),
                1.0 / s2,
            ),
        };
        let wt = match self.precision_factor() {
            Some(rt) => Whitening::Upper(MatRef::from_column_major_slice(rt, d, d)),
            None => Whitening::Dense(MatRef::from_row_major_slice(&self.proj, d, r).transpose()),
        };
        let weights = weights.as_deref();
        out.resize(k, 0.0);
        // At low rank, coordinate j is p_j / sqrt(λ_j) (`keep` <= r). `keep` = 0 still gets one
        // ignored column per row, so the tiles below always have something to chunk.
        debug_assert!(keep == 0 || (self.residual_variance.is_some() && keep <= r));
        let inv_sqrt: Vec<f32> = self.eigenvalues[..keep]
            .iter()
            .map(|l| (1.0 / l.sqrt()) as f32)
            .collect();
        let cw = keep.max(1);
        let mut coords = vec![0.0f32; k * cw];
        let threads = rayon::current_num_threads();
        // A small batch is split over the threads by rows too: faer's own split of a thin low-rank
        // product was slower than one thread (d = 4096, r = 256, 64 rows), and at full rank the
        // triangular blocks of the whole batch on the threads gave 147k rows/s where rows split
        // over them give 163k (d = 1024, 64 rows, 2 threads). Fewer rows than twice the threads
        // are one tile, whose triangular blocks run on the threads at full rank.
        let tile = if k >= 2 * SCORE_TILE_ROWS {
            Some(SCORE_TILE_ROWS)
        } else if k >= 2 * threads && threads > 1 {
            Some(k.div_ceil(threads))
        } else {
            None
        };
        if let Some(tile) = tile {
            // Tiles in parallel, each prepared, multiplied and reduced on one thread while it is
            // in that core's cache (a sequential product per tile: no synchronisation inside it).
            rows.par_chunks(tile * d)
                .zip(
                    out.par_chunks_mut(tile)
                        .zip(coords.par_chunks_mut(tile * cw)),
                )
                .for_each_init(
                    || (vec![0.0f32; tile * d], vec![0.0f32; tile * r]),
                    |(buf, pbuf), (block, (acc, co))| {
                        self.score_tile(block, acc, buf, pbuf, wt, weights, resid_inv, Par::Seq);
                        write_coordinates(&inv_sqrt, pbuf, r, co);
                    },
                );
        } else {
            // A small batch: one tile; at full rank its triangular blocks on the threads.
            let (mut buf, mut pbuf) = (vec![0.0f32; k * d], vec![0.0f32; k * r]);
            let par = match wt {
                Whitening::Upper(_) => par_for(k * d * r),
                Whitening::Dense(_) => Par::Seq,
            };
            self.score_tile(
                rows, &mut out, &mut buf, &mut pbuf, wt, weights, resid_inv, par,
            );
            write_coordinates(&inv_sqrt, &pbuf, r, &mut coords);
        }
        if keep == 0 {
            coords = Vec::new();
        }
        Ok((out, coords))
    }

    /// Scores the rows of `block` into `acc` (one per row): copy, normalise and centre each row
    /// (and `||y||²/σ²` at low rank), project all of them with one product (`par` threads), add
    /// `Σ w_j p_j²`. `buf` and `pbuf` hold at least `rows * d` and `rows * r` values.
    #[allow(clippy::too_many_arguments)]
    fn score_tile(
        &self,
        block: &[f32],
        acc: &mut [f64],
        buf: &mut [f32],
        pbuf: &mut [f32],
        wt: Whitening<'_>,
        weights: Option<&[f64]>,
        resid_inv: f64,
        par: Par,
    ) {
        let (d, r) = (self.dim, self.rank);
        let m = block.len() / d;
        let y = &mut buf[..m * d];
        for ((src, dst), a) in block
            .chunks_exact(d)
            .zip(y.chunks_exact_mut(d))
            .zip(acc.iter_mut())
        {
            *a = prepare_row(src, dst, &self.mean, self.opts.normalize, resid_inv);
        }
        // Pᵀ (r×m) = Wᵀ (r×d) · Yᵀ (d×m): every operand column-major, faer's fastest layout,
        // and P comes out row-major (one contiguous row of r projections per vector).
        let pt = MatMut::from_column_major_slice_mut(&mut pbuf[..m * r], r, m);
        let yt = MatRef::from_column_major_slice(y, d, m);
        match wt {
            Whitening::Dense(wt) => matmul(pt, Accum::Replace, wt, yt, 1.0f32, par),
            Whitening::Upper(rt) => upper_triangular_product(pt, rt, yt, par != Par::Seq),
        }
        for (prow, a) in pbuf[..m * r].chunks_exact(r).zip(acc.iter_mut()) {
            *a += match weights {
                None => f64::from(sum_sq(prow)),
                Some(w) => weighted_sum_sq(prow, w),
            };
            // Rounding can push a low-rank score a hair below 0: a distance is never negative.
            // Vectors so large that f32 overflows (|x| ~ 1e19 unnormalised) score +inf, not NaN.
            *a = if a.is_nan() {
                f64::INFINITY
            } else {
                a.max(0.0)
            };
        }
    }

    /// Checks that the buffers fit the shape (a deserialised value may not).
    fn validate(&self) -> Result<()> {
        let (d, r) = (self.dim, self.rank);
        let ok = d > 0
            && r >= 1
            && r <= d
            && self.mean.len() == d
            && self.proj.len() == d * r
            && self.eigenvalues.len() == r
            && (self.residual_variance.is_some() == (r < d));
        if ok {
            Ok(())
        } else {
            Err(CoreError::Malformed(format!(
                "corrupt Gaussian detector (dim {d}, rank {r}, mean {}, projection {}, {} eigenvalues)",
                self.mean.len(),
                self.proj.len(),
                self.eigenvalues.len()
            ))
            .into())
        }
    }
}

/// Writes a tile's whitened principal coordinates out of its projections (low rank): `pbuf`
/// holds `r` projections per row, `out` gets the first `inv_sqrt.len()` of each row's times
/// `inv_sqrt` (`1 / sqrt(λ_j)`; nothing when it is empty).
fn write_coordinates(inv_sqrt: &[f32], pbuf: &[f32], r: usize, out: &mut [f32]) {
    let keep = inv_sqrt.len();
    if keep == 0 {
        return;
    }
    for (prow, orow) in pbuf.chunks_exact(r).zip(out.chunks_exact_mut(keep)) {
        for ((o, &p), &s) in orow.iter_mut().zip(prow).zip(inv_sqrt) {
            *o = p * s;
        }
    }
}

/// Rows per rayon task in preparation and reduction.
const ROWS_PER_TASK: usize = 64;

/// `Σ x²` with 16 independent lanes, so it vectorises (a plain fold is a serial chain).
fn sum_sq(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ w_j x_j²` in `f64` with 8 independent lanes.
fn weighted_sum_sq(x: &[f32], w: &[f64]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let xs = x.chunks_exact(8);
    let ws = w.chunks_exact(8);
    let tail: f64 = xs
        .remainder()
        .iter()
        .zip(ws.remainder())
        .map(|(&v, wj)| wj * f64::from(v * v))
        .sum();
    for (xc, wc) in xs.zip(ws) {
        for ((l, &v), wj) in lanes.iter_mut().zip(xc).zip(wc) {
            *l += wj * f64::from(v * v);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// What a tile's rows are multiplied by: `Wᵀ` (r×d), or at full rank the upper-triangular `Rᵀ`.
#[derive(Clone, Copy)]
enum Whitening<'a> {
    Dense(MatRef<'a, f32>),
    Upper(MatRef<'a, f32>),
}

/// Rows per block of [`upper_triangular_product`]. Measured on one core (256 rows): at d = 384
/// blocks of 32-64 take 0.24 ms against 0.41 ms for the dense product and 0.32 ms for faer's
/// triangular product; at d = 1024, 1.84 ms (64) against 3.38 and 2.10 ms.
const TRI_BLOCK: usize = 64;

/// `pt = rt · yt` for an upper-triangular d×d `rt`, in row blocks of [`TRI_BLOCK`]: rows
/// `a..a+h` of the result only need columns `a..` of `rt` and rows `a..` of `yt`, one dense
/// product each (the few zeros below the diagonal inside a block are multiplied, not skipped). Every
/// block is one sequential product whatever the batch or the thread count, so a row's score does
/// not depend on what it was batched with; `parallel` runs the blocks on the rayon pool.
fn upper_triangular_product(
    pt: MatMut<'_, f32>,
    rt: MatRef<'_, f32>,
    yt: MatRef<'_, f32>,
    parallel: bool,
) {
    let d = rt.nrows();
    let mut blocks = Vec::with_capacity(d.div_ceil(TRI_BLOCK));
    let (mut rest, mut a) = (pt, 0);
    while a < d {
        let h = TRI_BLOCK.min(d - a);
        let (top, bottom) = rest.split_at_row_mut(h);
        blocks.push((a, h, top));
        rest = bottom;
        a += h;
    }
    let run = |(a, h, dst): (usize, usize, MatMut<'_, f32>)| {
        let lhs = rt.submatrix(a, a, h, d - a);
        matmul(
            dst,
            Accum::Replace,
            lhs,
            yt.subrows(a, d - a),
            1.0f32,
            Par::Seq,
        );
    };
    if parallel {
        blocks.into_par_iter().for_each(run);
    } else {
        blocks.into_iter().for_each(run);
    }
}

/// `rows` (row-major, `mean.len()` wide) as a Gaussian with this mean prepares them: each
/// L2-normalised if `normalize`, minus the mean (what the joint detector projects, [`crate::joint`]).
pub(crate) fn centre_rows(rows: &[f32], mean: &[f32], normalize: bool) -> Vec<f32> {
    let d = mean.len();
    let mut out = vec![0.0f32; rows.len()];
    for (src, dst) in rows.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        prepare_row(src, dst, mean, normalize, 0.0);
    }
    out
}

/// Writes `src` (L2-normalised if `normalize`; a zero row stays zero) minus `mean` into `dst`;
/// returns `||dst||² · resid_inv` (0 without computing the norm when `resid_inv` is 0).
fn prepare_row(src: &[f32], dst: &mut [f32], mean: &[f32], normalize: bool, resid_inv: f64) -> f64 {
    let scale = if normalize {
        let mut n2 = f64::from(sum_sq(src));
        if !n2.is_finite() {
            // Overflowed in f32: redo in f64 (every value is finite).
            n2 = src.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        }
        if n2 > 0.0 {
            // Same scaling as `l2_normalize_rows` (which sums in f64): equal up to f32 rounding.
            (1.0 / n2.sqrt()) as f32
        } else {
            1.0
        }
    } else {
        1.0
    };
    for ((o, &x), &mu) in dst.iter_mut().zip(src).zip(mean) {
        *o = x * scale - mu;
    }
    if resid_inv > 0.0 {
        f64::from(sum_sq(dst)) * resid_inv
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shrinkage::{ledoit_wolf_shrinkage, oas_shrinkage};
    use actwatch_testkit::Rng;

    /// Explicit inverse of a d×d row-major matrix by Gauss-Jordan with partial pivoting.
    fn invert(a: &[f64], d: usize) -> Vec<f64> {
        let mut m = a.to_vec();
        let mut inv: Vec<f64> = (0..d * d)
            .map(|i| if i / d == i % d { 1.0 } else { 0.0 })
            .collect();
        for c in 0..d {
            let p = (c..d)
                .max_by(|&x, &y| m[x * d + c].abs().total_cmp(&m[y * d + c].abs()))
                .unwrap();
            for j in 0..d {
                m.swap(c * d + j, p * d + j);
                inv.swap(c * d + j, p * d + j);
            }
            let piv = m[c * d + c];
            for j in 0..d {
                m[c * d + j] /= piv;
                inv[c * d + j] /= piv;
            }
            for r in 0..d {
                if r != c {
                    let f = m[r * d + c];
                    for j in 0..d {
                        m[r * d + j] -= f * m[c * d + j];
                        inv[r * d + j] -= f * inv[c * d + j];
                    }
                }
            }
        }
        inv
    }

    /// Cyclic Jacobi eigendecomposition of a symmetric d×d matrix: (eigenvalues, eigenvectors as
    /// columns of a row-major matrix), independent of faer.
    fn jacobi_eigen(a: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
        let mut m = a.to_vec();
        let mut v: Vec<f64> = (0..d * d)
            .map(|i| if i / d == i % d { 1.0 } else { 0.0 })
            .collect();
        for _sweep in 0..100 {
            let off: f64 = (0..d * d)
                .filter(|i| i / d != i % d)
                .map(|i| m[i] * m[i])
                .sum();
            if off < 1e-30 {
                break;
            }
            for p in 0..d {
                for q in (p + 1)..d {
                    let apq = m[p * d + q];
                    if apq.abs() < 1e-300 {
                        continue;
                    }
                    let theta = (m[q * d + q] - m[p * d + p]) / (2.0 * apq);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (t * t + 1.0).sqrt();
                    let s = t * c;
                    for k in 0..d {
                        let (akp, akq) = (m[k * d + p], m[k * d + q]);
                        m[k * d + p] = c * akp - s * akq;
                        m[k * d + q] = s * akp + c * akq;
                    }
                    for k in 0..d {
                        let (apk, aqk) = (m[p * d + k], m[q * d + k]);
                        m[p * d + k] = c * apk - s * aqk;
                        m[q * d + k] = s * apk + c * aqk;
                    }
                    for k in 0..d {
                        let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                        v[k * d + p] = c * vkp - s * vkq;
                        v[k * d + q] = s * vkp + c * vkq;
                    }
                }
            }
        }
        ((0..d).map(|i| m[i * d + i]).collect(), v)
    }

    /// Naive two-pass mean and MLE covariance of (already preprocessed) rows.
    fn naive_mean_cov(rows: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
        let n = rows.len() / d;
        let mut mean = vec![0.0; d];
        for r in rows.chunks_exact(d) {
            for j in 0..d {
                mean[j] += r[j] as f64 / n as f64;
            }
        }
        let mut cov = vec![0.0; d * d];
        for r in rows.chunks_exact(d) {
            for a in 0..d {
                for b in 0..d {
                    cov[a * d + b] += (r[a] as f64 - mean[a]) * (r[b] as f64 - mean[b]) / n as f64;
                }
            }
        }
        (mean, cov)
    }

    fn shrunk(cov: &[f64], d: usize, a: f64) -> Vec<f64> {
        let mu = (0..d).map(|i| cov[i * d + i]).sum::<f64>() / d as f64;
        (0..d * d)
            .map(|i| (1.0 - a) * cov[i] + if i / d == i % d { a * mu } else { 0.0 })
            .collect()
    }

    fn normalized(rows: &[f32], d: usize) -> Vec<f32> {
        let mut v = rows.to_vec();
        l2_normalize_rows(&mut v, d);
        v
    }

    fn quad(y: &[f64], m: &[f64], d: usize) -> f64 {
        (0..d)
            .map(|a| y[a] * (0..d).map(|b| m[a * d + b] * y[b]).sum::<f64>())
            .sum()
    }

    fn assert_rel(got: &[f64], want: &[f64], rel: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= rel * w.abs().max(1e-12),
                "row {i}: {g} vs {w}"
            );
        }
    }

    fn fit_rows(rows: &[f32], d: usize, opts: &GaussianOptions) -> GaussianDetector {
        let mut f = GaussianFitter::new(d, opts.clone());
        f.push_batch(rows).unwrap();
        f.finish().unwrap()
    }

    #[test]
    fn full_rank_scores_match_explicit_inverse() {
        for (seed, d, n, shrink, normalize) in [
            (1u64, 6usize, 200usize, Shrinkage::LedoitWolf, false),
            (2, 10, 25, Shrinkage::LedoitWolf, true),
            (3, 16, 12, Shrinkage::Oas, true), // d > n: singular sample covariance
            (4, 5, 500, Shrinkage::Fixed(0.0), false),
            (5, 8, 60, Shrinkage::Fixed(0.3), true),
        ] {
            let mut rng = Rng::new(seed);
            let train = rng.correlated_rows(n, d, 1.5, seed + 100);
            let test = rng.correlated_rows(50, d, 1.0, seed + 100);
            let outliers: Vec<f32> = (0..5 * d).map(|_| (rng.normal() * 6.0) as f32).collect();
            let opts = GaussianOptions {
                shrinkage: shrink,
                normalize,
                rank: None,
            };
            let det = fit_rows(&train, d, &opts);
            assert_eq!(det.rank(), d);
            assert_eq!(det.dim(), d);
            assert_eq!(det.options(), &opts);
            let prep = |r: &[f32]| {
                if normalize {
                    normalized(r, d)
                } else {
                    r.to_vec()
                }
            };
            let train_p = prep(&train);
            let (mean, cov) = naive_mean_cov(&train_p, d);
            let mut st = SufficientStats::new(d);
            st.push_batch(&train_p).unwrap();
            let a = match shrink {
                Shrinkage::LedoitWolf => ledoit_wolf_shrinkage(&st),
                Shrinkage::Oas => oas_shrinkage(&st),
                Shrinkage::Fixed(a) => a,
            };
            assert!((det.shrinkage() - a).abs() < 1e-12);
            let inv = invert(&shrunk(&cov, d, a), d);
            for batch in [&test, &outliers, &train] {
                let got = det.score_batch(batch).unwrap();
                let want: Vec<f64> = prep(batch)
                    .chunks_exact(d)
                    .map(|x| {
                        let y: Vec<f64> = (0..d).map(|j| x[j] as f64 - mean[j]).collect();
                        quad(&y, &inv, d)
                    })
                    .collect();
                assert_rel(&got, &want, 1e-3);
            }
            // Mean in-distribution score is about d (it is exactly tr(Σ_s⁻¹ C) on the training set);
            // the outliers score well above the training set.
            let tr_scores = det.score_batch(&train).unwrap();
            let out_scores = det.score_batch(&outliers).unwrap();
            let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            assert!(avg(&out_scores) > avg(&tr_scores), "seed {seed}");
        }
    }

    #[test]
    fn full_rank_scores_through_the_triangular_factor_equal_those_through_w() {
        let mut rng = Rng::new(17);
        let d = 150; // three row blocks of the triangular product, the last one partial
        let train = rng.correlated_rows(400, d, 1.5, 117);
        let test = rng.correlated_rows(3 * SCORE_TILE_ROWS, d, 1.0, 117);
        let det = fit_rows(&train, d, &GaussianOptions::default());
        assert!(
            det.precision_factor().is_some(),
            "full rank scores through Rᵀ"
        );
        let got = det.score_batch(&test).unwrap();
        // ||Wᵀ y||² in f64 from the stored projection, on the rows as scoring prepares them.
        let (y, _) = det.centred_rows(&test).unwrap();
        let w = det.projection();
        let want: Vec<f64> = y
            .chunks_exact(d)
            .map(|y| {
                (0..d)
                    .map(|j| {
                        let p: f64 = (0..d)
                            .map(|i| f64::from(y[i]) * f64::from(w[i * d + j]))
                            .sum();
                        p * p
                    })
                    .sum()
            })
            .collect();
        assert_rel(&got, &want, 1e-4);
        // A row scores the same bits alone, in a small batch (blocks on the thread pool) and in
        // a large one (tiles).
        for i in [0, 1, SCORE_TILE_ROWS, 3 * SCORE_TILE_ROWS - 1] {
            assert_eq!(
                det.score_batch(&test[i * d..(i + 1) * d]).unwrap()[0],
                got[i]
            );
        }
        assert_eq!(det.score_batch(&test[..64 * d]).unwrap(), got[..64]);
        // The factor is derived, not stored: a detector rebuilt from the same fields (as a
        // reloaded one is) derives the same bits and scores identically.
        let reloaded = GaussianDetector {
            precision_factor: OnceLock::new(),
            ..det.clone()
        };
        assert_eq!(reloaded.score_batch(&test).unwrap(), got);
        // Low rank keeps multiplying by the d×r projection.
        let low = fit_rows(
            &train,
            d,
            &GaussianOptions {
                rank: Some(8),
                ..GaussianOptions::default()
            },
        );
        assert!(low.precision_factor().is_none());
        // At low rank too: the same bits in any batch.
        let low = fit_rows(
            &train,
            d,
            &GaussianOptions {
                rank: Some(100),
                ..GaussianOptions::default()
            },
        );
        let all = low.score_batch(&test).unwrap();
        for i in [0, SCORE_TILE_ROWS, 3 * SCORE_TILE_ROWS - 1] {
            assert_eq!(
                low.score_batch(&test[i * d..(i + 1) * d]).unwrap()[0],
                all[i]
            );
        }
        assert_eq!(low.score_batch(&test[..64 * d]).unwrap(), all[..64]);
    }

    #[test]
    fn whitened_coordinates_match_the_naive_formula_in_any_batch() {
        let d = 24;
        let mut rng = Rng::new(71);
        let train = rng.correlated_rows(400, d, 1.2, 72);
        let test = rng.correlated_rows(3 * SCORE_TILE_ROWS, d, 1.0, 73);
        for (rank, r) in [(Some(10), 10), (Some(10), 4), (None, 6)] {
            let opts = GaussianOptions {
                rank,
                normalize: true,
                ..GaussianOptions::default()
            };
            let det = fit_rows(&train, d, &opts);
            let full = rank.is_none();
            // the naive coordinates: (y - mean)·v_j / sqrt(λ_j), in f64
            let prow = |x: &[f32]| -> Vec<f64> {
                let n = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
                (0..r)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|i| {
                                let y = f64::from(x[i]) / n - f64::from(det.mean()[i]);
                                y * f64::from(det.projection()[i * det.rank() + j])
                            })
                            .sum();
                        // full rank stores v_j / sqrt(λ_j) already
                        if full {
                            dot
                        } else {
                            dot / det.eigenvalues()[j].sqrt()
                        }
                    })
                    .collect()
            };
            let (scores, coords) = det.score_with_coordinates(&test, r).unwrap();
            assert_eq!(scores, det.score_batch(&test).unwrap());
            assert_eq!(coords, det.whitened_coordinates(&test, r).unwrap());
            assert_eq!(coords.len(), test.len() / d * r);
            for (x, got) in test.chunks_exact(d).zip(coords.chunks_exact(r)) {
                for (g, w) in got.iter().zip(prow(x)) {
                    assert!(
                        (f64::from(*g) - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{g} vs {w}"
                    );
                }
            }
            // A row's coordinates are the same bits alone as in a batch of tiles (low rank).
            if !full {
                for i in [0, SCORE_TILE_ROWS + 1, 3 * SCORE_TILE_ROWS - 1] {
                    let (_, one) = det
                        .score_with_coordinates(&test[i * d..(i + 1) * d], r)
                        .unwrap();
                    assert_eq!(one, coords[i * r..(i + 1) * r]);
                }
            }
        }
    }

    #[test]
    fn low_rank_scores_match_naive_low_rank_model() {
        for (seed, d, n, r, normalize) in [
            (7u64, 12usize, 300usize, 4usize, false),
            (8, 9, 150, 1, true),
            (9, 20, 40, 6, true),
            (10, 7, 80, 6, false),
        ] {
            let mut rng = Rng::new(seed);
            let train = rng.correlated_rows(n, d, -0.5, seed + 200);
            let test = rng.correlated_rows(40, d, 0.0, seed + 300);
            let opts = GaussianOptions {
                shrinkage: Shrinkage::LedoitWolf,
                normalize,
                rank: Some(r),
            };
            let det = fit_rows(&train, d, &opts);
            assert_eq!(det.rank(), r);
            let prep = |x: &[f32]| {
                if normalize {
                    normalized(x, d)
                } else {
                    x.to_vec()
                }
            };
            let (mean, cov) = naive_mean_cov(&prep(&train), d);
            let sig = shrunk(&cov, d, det.shrinkage());
            let (vals, vecs) = jacobi_eigen(&sig, d);
            let mut order: Vec<usize> = (0..d).collect();
            order.sort_by(|&x, &y| vals[y].total_cmp(&vals[x]));
            let top = &order[..r];
            let s2 = order[r..].iter().map(|&i| vals[i]).sum::<f64>() / (d - r) as f64;
            for (got, want) in det.eigenvalues().iter().zip(top.iter().map(|&i| vals[i])) {
                assert!((got - want).abs() < 1e-9 * want);
            }
            assert!((det.residual_variance().unwrap() - s2).abs() < 1e-9 * s2);
            for batch in [&test, &train] {
                let got = det.score_batch(batch).unwrap();
                let want: Vec<f64> = prep(batch)
                    .chunks_exact(d)
                    .map(|x| {
                        let y: Vec<f64> = (0..d).map(|j| x[j] as f64 - mean[j]).collect();
                        let y2: f64 = y.iter().map(|v| v * v).sum();
                        let mut p2 = 0.0;
                        let mut s = 0.0;
                        for &j in top {
                            let p: f64 = (0..d).map(|a| y[a] * vecs[a * d + j]).sum();
                            p2 += p * p;
                            s += p * p / vals[j];
                        }
                        s + (y2 - p2) / s2
                    })
                    .collect();
                assert_rel(&got, &want, 1e-3);
            }
        }
    }

    #[test]
    fn low_rank_model_is_mahalanobis_under_its_covariance() {
        // V_r Λ_r V_rᵀ + σ² (I - V_r V_rᵀ), inverted explicitly.
        let (d, r) = (10, 3);
        let mut rng = Rng::new(21);
        let train = rng.correlated_rows(120, d, 0.0, 22);
        let opts = GaussianOptions {
            shrinkage: Shrinkage::Oas,
            normalize: false,
            rank: Some(r),
        };
        let det = fit_rows(&train, d, &opts);
        let (mean, cov) = naive_mean_cov(&train, d);
        let (vals, vecs) = jacobi_eigen(&shrunk(&cov, d, det.shrinkage()), d);
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&x, &y| vals[y].total_cmp(&vals[x]));
        let s2 = det.residual_variance().unwrap();
        let mut model = vec![0.0; d * d];
        for (rank_pos, &j) in order.iter().enumerate() {
            let l = if rank_pos < r { vals[j] } else { s2 };
            for a in 0..d {
                for b in 0..d {
                    model[a * d + b] += l * vecs[a * d + j] * vecs[b * d + j];
                }
            }
        }
        let inv = invert(&model, d);
        let test = rng.correlated_rows(30, d, 0.3, 22);
        let want: Vec<f64> = test
            .chunks_exact(d)
            .map(|x| {
                let y: Vec<f64> = (0..d).map(|j| x[j] as f64 - mean[j]).collect();
                quad(&y, &inv, d)
            })
            .collect();
        assert_rel(&det.score_batch(&test).unwrap(), &want, 1e-3);
    }

    #[test]
    fn rank_d_equals_full_and_defaults_resolve() {
        let d = 8;
        let train = Rng::new(31).correlated_rows(100, d, 0.0, 32);
        let test = Rng::new(33).correlated_rows(20, d, 0.0, 32);
        let full = fit_rows(&train, d, &GaussianOptions::default());
        let explicit = fit_rows(
            &train,
            d,
            &GaussianOptions {
                rank: Some(d),
                ..GaussianOptions::default()
            },
        );
        assert_eq!(
            full.score_batch(&test).unwrap(),
            explicit.score_batch(&test).unwrap()
        );
        let o = GaussianOptions::default();
        assert_eq!(o.shrinkage, Shrinkage::LedoitWolf);
        assert!(o.normalize);
        assert_eq!(o.resolved_rank(384).unwrap(), 384);
        assert_eq!(
            o.resolved_rank(FULL_RANK_MAX_DIM).unwrap(),
            FULL_RANK_MAX_DIM
        );
        assert_eq!(o.resolved_rank(4096).unwrap(), DEFAULT_RANK);
    }

    #[test]
    fn tiled_scoring_equals_row_by_row() {
        let d = 4;
        let k = 3 * SCORE_TILE_ROWS + 123;
        let mut rng = Rng::new(41);
        let train = rng.correlated_rows(500, d, 0.2, 42);
        let test = rng.correlated_rows(k, d, 0.2, 42);
        for rank in [None, Some(2)] {
            let det = fit_rows(
                &train,
                d,
                &GaussianOptions {
                    rank,
                    ..GaussianOptions::default()
                },
            );
            let all = det.score_batch(&test).unwrap();
            assert_eq!(all.len(), k);
            for i in [0, 1, SCORE_TILE_ROWS - 1, SCORE_TILE_ROWS, k - 1] {
                let one = det.score_batch(&test[i * d..(i + 1) * d]).unwrap();
                assert!((one[0] - all[i]).abs() <= 1e-5 * all[i].max(1e-6));
            }
        }
    }

    #[test]
    fn fitters_merge_like_one_stream_and_normalise() {
        let d = 6;
        let rows = Rng::new(51).correlated_rows(90, d, 2.0, 52);
        let opts = GaussianOptions::default();
        let mut one = GaussianFitter::new(d, opts.clone());
        one.push_batch(&rows).unwrap();
        let mut a = GaussianFitter::new(d, opts.clone());
        let mut b = GaussianFitter::new(d, opts.clone());
        a.push_batch(&rows[..30 * d]).unwrap();
        b.push_batch(&rows[30 * d..]).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.count(), 90);
        let test = Rng::new(53).correlated_rows(10, d, 2.0, 52);
        let (sa, so) = (
            a.finish().unwrap().score_batch(&test).unwrap(),
            one.finish().unwrap().score_batch(&test).unwrap(),
        );
        assert_rel(&sa, &so, 1e-6);
        // normalize = true fits on L2-normalised copies.
        let mut manual = SufficientStats::new(d);
        manual.push_batch(&normalized(&rows, d)).unwrap();
        let stats = one.stats().unwrap();
        assert_eq!(stats.count(), manual.count());
        for (x, y) in stats.mean().iter().zip(manual.mean()) {
            assert!((x - y).abs() < 1e-12);
        }
        // Scale invariance under normalisation.
        let scaled: Vec<f32> = test.iter().map(|v| v * 7.0).collect();
        assert_rel(
            &one.finish().unwrap().score_batch(&scaled).unwrap(),
            &so,
            1e-4,
        );
        let other = GaussianFitter::new(
            d,
            GaussianOptions {
                normalize: false,
                ..opts
            },
        );
        assert!(matches!(a.merge(&other), Err(Error::InvalidOption(_))));
        assert!(matches!(
            a.merge(&GaussianFitter::new(d + 1, GaussianOptions::default())),
            Err(Error::Input(CoreError::WidthMismatch { .. }))
        ));
    }

    /// The statistics of a part depend only on its rows in order, never on its batches; parts
    /// merged in order equal one fitter over all of them, to the bit.
    #[test]
    fn statistics_fold_on_a_grid_and_merge_exactly_in_part_order() {
        let d = 8;
        let g = grid_rows(d);
        let rows = Rng::new(71).correlated_rows(3 * g + 37, d, 0.3, 72);
        let opts = GaussianOptions::default();
        let fold = |cuts: &[usize]| {
            let mut f = GaussianFitter::new(d, opts.clone());
            let mut start = 0;
            for &c in cuts.iter().chain([rows.len() / d].iter()) {
                f.push_batch(&rows[start * d..c * d]).unwrap();
                start = c;
            }
            f
        };
        let one = fold(&[]);
        for cuts in [vec![1, 2, 3], vec![g - 1, g + 1, 2 * g], vec![5, 2 * g + 7]] {
            assert_eq!(fold(&cuts), one, "batches cut at {cuts:?}");
        }
        // Parts [0, p) and [p, q) and [q, n) merged in order into an empty fitter, as a driver
        // merges shards: the same as `fold_reference` merging per-file parts.
        let n = rows.len() / d;
        for (p, q) in [(1, 2), (g, 2 * g), (g + 3, n - 5)] {
            let part = |a: usize, b: usize| {
                let mut f = GaussianFitter::new(d, opts.clone());
                f.push_batch(&rows[a * d..b * d]).unwrap();
                f
            };
            let merged_in_order = |parts: &[GaussianFitter]| {
                let mut m = GaussianFitter::new(d, opts.clone());
                for x in parts {
                    m.merge(x).unwrap();
                }
                m
            };
            let parts = [part(0, p), part(p, q), part(q, n)];
            let a = merged_in_order(&parts);
            let b = merged_in_order(&[part(0, p), part(p, q), part(q, n)]);
            assert_eq!(a, b);
            assert_eq!(a.count(), n as u64);
            let (sa, so) = (a.stats().unwrap(), one.stats().unwrap());
            for (x, y) in sa.scatter().iter().zip(so.scatter()) {
                assert!((x - y).abs() <= 1e-9 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn bad_input_gives_errors_not_panics() {
        let d = 4;
        let train = Rng::new(61).correlated_rows(50, d, 0.0, 62);
        let det = fit_rows(&train, d, &GaussianOptions::default());
        assert!(matches!(
            det.score_batch(&[0.0; 7]),
            Err(Error::Input(CoreError::Malformed(_)))
        ));
        let mut bad = train[..3 * d].to_vec();
        bad[2 * d + 3] = f32::NAN;
        match det.score_batch(&bad) {
            Err(Error::Input(CoreError::NonFinite { row, component, .. })) => {
                assert_eq!((row, component), (2, 3));
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        bad[2 * d + 3] = f32::NEG_INFINITY;
        assert!(det.score_batch(&bad).is_err());
        assert_eq!(det.score_batch(&[]).unwrap(), Vec::<f64>::new());
        // A zero row (normalisation leaves it zero) is fine.
        assert!(det.score_batch(&[0.0; 4]).unwrap()[0].is_finite());
        // Huge but finite values: normalisation copes; unnormalised, f32 overflow scores +inf.
        let huge = [3e38f32, -3e38, 3e38, -3e38];
        let s = det.score_batch(&huge).unwrap()[0];
        assert!(s.is_finite() && s > 0.0);
        let raw = fit_rows(
            &train,
            d,
            &GaussianOptions {
                normalize: false,
                ..GaussianOptions::default()
            },
        );
        let s = raw.score_batch(&huge).unwrap()[0];
        assert!(s.is_infinite() && s > 0.0);
        let s = fit_rows(
            &train,
            d,
            &GaussianOptions {
                normalize: false,
                rank: Some(2),
                ..GaussianOptions::default()
            },
        )
        .score_batch(&huge)
        .unwrap()[0];
        assert!(s.is_infinite() && s > 0.0);

        let mut f = GaussianFitter::new(d, GaussianOptions::default());
        assert!(f.push_batch(&[1.0; 5]).is_err());
        assert!(f.push_batch(&[1.0, f32::NAN, 0.0, 0.0]).is_err());
        assert_eq!(f.count(), 0);
        assert!(matches!(f.finish(), Err(Error::NotEnoughData(_))));
        f.push_batch(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        f.push_batch(&[2.0, 4.0, 6.0, 8.0]).unwrap(); // same direction: identical once normalised
        assert!(matches!(f.finish(), Err(Error::NotEnoughData(_))));

        let mut st = SufficientStats::new(d);
        st.push_batch(&train).unwrap();
        for rank in [Some(0), Some(d + 1)] {
            let o = GaussianOptions {
                rank,
                ..GaussianOptions::default()
            };
            assert!(matches!(
                GaussianDetector::fit(&st, &o),
                Err(Error::InvalidOption(_))
            ));
        }
        let o = GaussianOptions {
            shrinkage: Shrinkage::Fixed(2.0),
            ..GaussianOptions::default()
        };
        assert!(matches!(
            GaussianDetector::fit(&st, &o),
            Err(Error::InvalidOption(_))
        ));
        // A corrupt (deserialised) detector errors instead of panicking in the GEMM.
        let mut corrupt = det.clone();
        corrupt.proj.pop();
        assert!(corrupt.score_batch(&train).is_err());
    }

    #[test]
    fn singular_data_with_no_shrinkage_stays_finite() {
        // Vectors in a 2-D subspace of R^5, Fixed(0.0): the floor keeps scores finite.
        let d = 5;
        let mut rng = Rng::new(71);
        let rows: Vec<f32> = (0..40)
            .flat_map(|_| {
                let (a, b) = (rng.normal(), rng.normal());
                [a, b, a + b, a - b, 0.0].map(|v| v as f32)
            })
            .collect();
        let opts = GaussianOptions {
            shrinkage: Shrinkage::Fixed(0.0),
            normalize: false,
            rank: None,
        };
        let det = fit_rows(&rows, d, &opts);
        let s = det.score_batch(&rows).unwrap();
        assert!(s.iter().all(|v| v.is_finite()));
    }
}
