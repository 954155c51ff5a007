//! Mergeable sufficient statistics of a set of vectors: count, mean, scatter and the two
//! higher moments that Ledoit-Wolf shrinkage needs.
//!
//! Every Gaussian fit in actwatch goes through [`SufficientStats`]: a stream is folded in batch by
//! batch ([`SufficientStats::push_batch`]), shards fitted on different workers are combined exactly
//! ([`SufficientStats::merge`], Chan et al.'s parallel update), and the detector is fitted from the
//! result. Accumulation is in `f64` even though vectors arrive as `f32`.
//!
//! With `y_k = x_k - mean` the statistics are
//! - `scatter = Σ y_k y_kᵀ` (d×d, row-major; covariance = scatter / n),
//! - `third = Σ ||y_k||² y_k` (d),
//! - `fourth = Σ ||y_k||⁴` (the Ledoit-Wolf estimator needs `Σ_k ||y_k y_kᵀ - C||_F² =
//!   fourth - n ||C||_F²`).
//!
//! `third` exists only so that `fourth` stays mergeable: moving the centre by `δ` (`y' = y - δ`,
//! `c = ||δ||²`, `S` = scatter, `T` = third, `Q` = fourth, `Σ y = 0`) gives
//! `Q' = Q + 4 δᵀSδ + n c² - 4 T·δ + 2c tr(S)` and `T' = T - tr(S) δ - 2 S δ - n c δ`, and
//! `S' = S + n δδᵀ`, which summed over two shards is exactly Chan's
//! `S = S_A + S_B + n_A n_B / n (m_B - m_A)(m_B - m_A)ᵀ`.

use actwatch_core::{check_rows, Error as CoreError};
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows centred per GEMM in [`SufficientStats::push_batch`]: bounds the `f64` scratch to
/// `STATS_CHUNK_ROWS * dim` values whatever the batch size.
pub const STATS_CHUNK_ROWS: usize = 2048;

/// Below this many multiply-adds a matrix product runs on the calling thread: waking the rayon pool
/// costs more than it saves for tiny batches.
pub(crate) const PAR_MIN_FLOPS: usize = 1 << 20;

/// Parallelism for a product of `flops` multiply-adds: faer over the whole rayon pool when it pays.
pub(crate) fn par_for(flops: usize) -> Par {
    if flops >= PAR_MIN_FLOPS && rayon::current_num_threads() > 1 {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// Count, mean, scatter and third/fourth central moments of a set of vectors; see the module docs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SufficientStats {
    n: u64,
    mean: Vec<f64>,
    /// `Σ y yᵀ`, d×d row-major.
    scatter: Vec<f64>,
    /// `Σ ||y||² y`.
    third: Vec<f64>,
    /// `Σ ||y||⁴`.
    fourth: f64,
}

impl SufficientStats {
    /// Empty statistics of vectors of width `dim`.
    pub fn new(dim: usize) -> Self {
        Self {
            n: 0,
            mean: vec![0.0; dim],
            scatter: vec![0.0; dim * dim],
            third: vec![0.0; dim],
            fourth: 0.0,
        }
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Number of vectors folded in.
    pub fn count(&self) -> u64 {
        self.n
    }

    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// `Σ (x - mean)(x - mean)ᵀ`, d×d row-major.
    pub fn scatter(&self) -> &[f64] {
        &self.scatter
    }

    /// `Σ ||x - mean||² (x - mean)`.
    pub fn third(&self) -> &[f64] {
        &self.third
    }

    /// `Σ ||x - mean||⁴`.
    pub fn fourth(&self) -> f64 {
        self.fourth
    }

    /// Folds in a batch of rows (row-major, `len = k * dim`).
    ///
    /// The batch's own statistics are computed first (two passes: mean, then centred moments, the
    /// scatter as one `f64` GEMM per [`STATS_CHUNK_ROWS`] rows) and merged with Chan's update. An empty
    /// batch is a no-op; a malformed or non-finite batch is rejected and leaves `self` unchanged.
    pub fn push_batch(&mut self, rows: &[f32]) -> Result<()> {
        self.push_chunks(rows, usize::MAX)
    }

    /// Folds in `rows` in consecutive chunks of `chunk_rows` rows, each exactly as
    /// [`Self::push_batch`] would (the same statistics, to the bit), but with one buffer for the
    /// chunks' scatter: at d = 4096 a fresh one per chunk is 128 MiB of zeroed pages, and mapping
    /// and unmapping it cost more than the chunk's product. The whole input is checked first: a
    /// malformed or non-finite row leaves `self` unchanged.
    pub fn push_chunks(&mut self, rows: &[f32], chunk_rows: usize) -> Result<()> {
        let d = self.dim();
        check_rows(d, rows)?;
        let mut buffer = Vec::new();
        for chunk in rows.chunks(chunk_rows.max(1).saturating_mul(d.max(1))) {
            let k = chunk.len() / d.max(1);
            if k == 0 {
                continue;
            }
            let batch = Self::from_rows(chunk, d, k, buffer);
            self.merge(&batch)?;
            buffer = batch.scatter;
        }
        Ok(())
    }

    /// Statistics of `k` finite rows of width `d > 0`; the scatter is built in `buffer`.
    fn from_rows(rows: &[f32], d: usize, k: usize, mut buffer: Vec<f64>) -> Self {
        let mut mean = vec![0.0f64; d];
        for row in rows.chunks_exact(d) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += f64::from(x);
            }
        }
        let inv_k = 1.0 / k as f64;
        mean.iter_mut().for_each(|m| *m *= inv_k);

        buffer.clear();
        buffer.resize(d * d, 0.0);
        let mut scatter = buffer;
        let mut third = vec![0.0f64; d];
        let mut fourth = 0.0f64;
        let chunk = k.min(STATS_CHUNK_ROWS);
        let mut y: Vec<f64> = Vec::with_capacity(chunk * d);
        for block in rows.chunks(chunk * d) {
            let m = block.len() / d;
            y.clear();
            for row in block.chunks_exact(d) {
                y.extend(row.iter().zip(&mean).map(|(&x, &mu)| f64::from(x) - mu));
            }
            for yr in y.chunks_exact(d) {
                let s: f64 = yr.iter().map(|v| v * v).sum();
                fourth += s * s;
                for (t, v) in third.iter_mut().zip(yr) {
                    *t += s * v;
                }
            }
            // Only the lower triangle (the scatter is symmetric): half the multiply-adds.
            let ym = MatRef::from_row_major_slice(&y, m, d);
            let sm = MatMut::from_row_major_slice_mut(&mut scatter, d, d);
            triangular::matmul(
                sm,
                BlockStructure::TriangularLower,
                Accum::Add,
                ym.transpose(),
                BlockStructure::Rectangular,
                ym,
                BlockStructure::Rectangular,
                1.0,
                par_for(m * d * d / 2),
            );
        }
        mirror_lower(&mut scatter, d);
        Self {
            n: k as u64,
            mean,
            scatter,
            third,
            fourth,
        }
    }

    /// Adds `other`'s vectors to `self` exactly (Chan et al.'s parallel update, extended to `third`
    /// and `fourth` by the shift formulas in the module docs). Merging empty statistics is the
    /// identity. Fails on a width mismatch or on statistics whose buffers do not fit their width
    /// (e.g. a corrupt deserialised value), leaving `self` unchanged.
    pub fn merge(&mut self, other: &SufficientStats) -> Result<()> {
        self.validate()?;
        other.validate()?;
        let d = self.dim();
        if other.dim() != d {
            return Err(CoreError::WidthMismatch {
                expected: d,
                got: other.dim(),
            }
            .into());
        }
        if other.n == 0 {
            return Ok(());
        }
        if self.n == 0 {
            self.clone_from(other);
            return Ok(());
        }
        let n = self
            .n
            .checked_add(other.n)
            .ok_or_else(|| Error::Numerical("vector count overflows u64".into()))?;
        let (na, nb, nf) = (self.n as f64, other.n as f64, n as f64);
        let diff: Vec<f64> = other
            .mean
            .iter()
            .zip(&self.mean)
            .map(|(b, a)| b - a)
            .collect();
        // Centres move to the combined mean: A by n_B/n · diff, B by -n_A/n · diff.
        let delta_a: Vec<f64> = diff.iter().map(|v| v * (nb / nf)).collect();
        let delta_b: Vec<f64> = diff.iter().map(|v| -v * (na / nf)).collect();
        let (ta, qa) = self.shifted_higher(&delta_a);
        let (tb, qb) = other.shifted_higher(&delta_b);

        let w = na * nb / nf;
        // Row by row, on the pool when the matrix is large (the same sums either way).
        let update = |((row, orow), di): ((&mut [f64], &[f64]), &f64)| {
            let wi = w * di;
            for ((s, o), dj) in row.iter_mut().zip(orow).zip(&diff) {
                *s += o + wi * dj;
            }
        };
        if parallel_pass(d) {
            self.scatter
                .par_chunks_exact_mut(d)
                .zip(other.scatter.par_chunks_exact(d))
                .zip(diff.par_iter())
                .with_min_len(rows_per_task(d))
                .for_each(update);
        } else {
            self.scatter
                .chunks_exact_mut(d)
                .zip(other.scatter.chunks_exact(d))
                .zip(&diff)
                .for_each(update);
        }
        for (m, da) in self.mean.iter_mut().zip(&delta_a) {
            *m += da;
        }
        for ((t, a), b) in self.third.iter_mut().zip(&ta).zip(&tb) {
            *t = a + b;
        }
        self.fourth = qa + qb;
        self.n = n;
        Ok(())
    }

    /// `third` and `fourth` re-centred at `mean + delta`.
    fn shifted_higher(&self, delta: &[f64]) -> (Vec<f64>, f64) {
        let d = self.dim();
        let n = self.n as f64;
        let dot = |row: &[f64]| row.iter().zip(delta).map(|(s, v)| s * v).sum::<f64>();
        let sd: Vec<f64> = if parallel_pass(d) {
            self.scatter
                .par_chunks_exact(d)
                .with_min_len(rows_per_task(d))
                .map(dot)
                .collect()
        } else {
            self.scatter.chunks_exact(d).map(dot).collect()
        };
        let c: f64 = delta.iter().map(|v| v * v).sum();
        let tr = self.trace_scatter();
        let dsd: f64 = delta.iter().zip(&sd).map(|(a, b)| a * b).sum();
        let td: f64 = self.third.iter().zip(delta).map(|(a, b)| a * b).sum();
        let q = self.fourth + 4.0 * dsd + n * c * c - 4.0 * td + 2.0 * c * tr;
        let t = self
            .third
            .iter()
            .zip(delta)
            .zip(&sd)
            .map(|((t, v), s)| t - tr * v - 2.0 * s - n * c * v)
            .collect();
        (t, q)
    }

    fn trace_scatter(&self) -> f64 {
        let d = self.dim();
        (0..d).map(|i| self.scatter[i * d + i]).sum()
    }

    /// Maximum-likelihood covariance `scatter / n` (d×d row-major); all zeros while empty.
    pub fn covariance(&self) -> Vec<f64> {
        if self.n == 0 {
            return vec![0.0; self.scatter.len()];
        }
        let inv = 1.0 / self.n as f64;
        self.scatter.iter().map(|s| s * inv).collect()
    }

    /// Checks that the buffers fit the width (a deserialised value may not).
    pub(crate) fn validate(&self) -> Result<()> {
        let d = self.dim();
        if self.scatter.len() != d * d || self.third.len() != d {
            return Err(CoreError::Malformed(format!(
                "sufficient statistics of width {d} hold a scatter of {} values and a third moment of {}",
                self.scatter.len(),
                self.third.len()
            ))
            .into());
        }
        Ok(())
    }
}

/// Whether a pass over a d×d matrix runs on the rayon pool: from 4 tasks of [`PAR_MIN_FLOPS`]
/// values (d >= 2048); below that, waking the pool costs more than the pass.
fn parallel_pass(d: usize) -> bool {
    d.saturating_mul(d) >= 4 * PAR_MIN_FLOPS && rayon::current_num_threads() > 1
}

/// Rows of a d×d pass per rayon task: about [`PAR_MIN_FLOPS`] values.
fn rows_per_task(d: usize) -> usize {
    (PAR_MIN_FLOPS / d.max(1)).max(1)
}

/// Copies the lower triangle of a row-major d×d matrix onto its upper triangle, in square tiles
/// (a plain loop writes a column at a time: one cache line, and at large d one TLB entry, per value).
fn mirror_lower(m: &mut [f64], d: usize) {
    const TILE: usize = 64;
    for i0 in (0..d).step_by(TILE) {
        for j0 in (0..=i0).step_by(TILE) {
            for i in i0..(i0 + TILE).min(d) {
                for j in j0..(j0 + TILE).min(i) {
                    m[j * d + i] = m[i * d + j];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actwatch_testkit::{on_threads, Rng};
    use proptest::prelude::*;

    #[test]
    fn statistics_are_the_same_bits_on_any_number_of_threads() {
        // Wide and long enough that the scatter product runs in parallel (PAR_MIN_FLOPS).
        let (n, d) = (3000, 200);
        let rows = Rng::new(5).gaussian_rows(n, d, 0.5);
        let on = |threads: usize| {
            on_threads(threads, || {
                let mut st = SufficientStats::new(d);
                st.push_batch(&rows).unwrap();
                st
            })
        };
        let one = on(1);
        assert!(n.min(STATS_CHUNK_ROWS) * d * d / 2 >= PAR_MIN_FLOPS);
        for threads in [2, 3, 8] {
            assert!(on(threads) == one, "{threads} threads");
        }
        // and the scatter is exactly symmetric
        for i in 0..d {
            for j in 0..i {
                assert_eq!(one.scatter[i * d + j], one.scatter[j * d + i]);
            }
        }
    }

    /// Naive two-pass statistics: (mean, scatter, third, fourth).
    fn naive(rows: &[f32], d: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
        naive_about(rows, d, None)
    }

    /// Naive moments about `centre` (the sample mean when `None`).
    fn naive_about(
        rows: &[f32],
        d: usize,
        centre: Option<&[f64]>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
        let k = rows.len() / d;
        let mut mean = vec![0.0; d];
        for r in rows.chunks_exact(d) {
            for j in 0..d {
                mean[j] += r[j] as f64 / k as f64;
            }
        }
        let c: Vec<f64> = centre.map(|c| c.to_vec()).unwrap_or_else(|| mean.clone());
        let mut s = vec![0.0; d * d];
        let mut t = vec![0.0; d];
        let mut q = 0.0;
        for r in rows.chunks_exact(d) {
            let y: Vec<f64> = (0..d).map(|j| r[j] as f64 - c[j]).collect();
            let n2: f64 = y.iter().map(|v| v * v).sum();
            q += n2 * n2;
            for a in 0..d {
                t[a] += n2 * y[a];
                for b in 0..d {
                    s[a * d + b] += y[a] * y[b];
                }
            }
        }
        (mean, s, t, q)
    }

    fn close_vec(got: &[f64], want: &[f64], rel: f64) -> bool {
        let scale = want.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
        got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| (g - w).abs() <= rel * scale)
    }

    fn close(got: f64, want: f64, rel: f64) -> bool {
        (got - want).abs() <= rel * want.abs().max(1e-300)
    }

    fn assert_matches_naive(st: &SufficientStats, rows: &[f32], d: usize, rel: f64) {
        let (m, s, t, q) = naive(rows, d);
        assert_eq!(st.count() as usize, rows.len() / d);
        assert!(
            close_vec(st.mean(), &m, rel),
            "mean {:?} vs {:?}",
            st.mean(),
            m
        );
        assert!(close_vec(st.scatter(), &s, rel), "scatter");
        assert!(
            close_vec(st.third(), &t, rel),
            "third {:?} vs {:?}",
            st.third(),
            t
        );
        assert!(
            close(st.fourth(), q, rel),
            "fourth {} vs {}",
            st.fourth(),
            q
        );
    }

    fn assert_stats_close(a: &SufficientStats, b: &SufficientStats, rel: f64) {
        assert_eq!(a.count(), b.count());
        assert!(close_vec(a.mean(), b.mean(), rel));
        assert!(close_vec(a.scatter(), b.scatter(), rel));
        assert!(close_vec(a.third(), b.third(), rel));
        assert!(close(a.fourth(), b.fourth(), rel));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn push_batches_equal_two_pass(
            seed in any::<u64>(),
            d in 1usize..9,
            sizes in prop::collection::vec(0usize..40, 1..6),
            offset in -5.0f64..5.0,
        ) {
            let mut rng = Rng::new(seed);
            let total: usize = sizes.iter().sum();
            let rows = rng.correlated_rows(total, d, offset, seed ^ 1);
            let mut st = SufficientStats::new(d);
            let mut at = 0;
            for &s in &sizes {
                st.push_batch(&rows[at * d..(at + s) * d]).unwrap();
                at += s;
            }
            if total == 0 {
                prop_assert_eq!(st, SufficientStats::new(d));
            } else {
                assert_matches_naive(&st, &rows, d, 1e-9);
            }
        }

        #[test]
        fn merged_shards_equal_one_pass(
            seed in any::<u64>(),
            d in 1usize..9,
            k in 1usize..120,
            cuts in prop::collection::vec(0usize..120, 0..5),
        ) {
            let mut rng = Rng::new(seed);
            let rows = rng.correlated_rows(k, d, 2.0, seed.wrapping_add(7));
            let mut one = SufficientStats::new(d);
            one.push_batch(&rows).unwrap();

            let mut points: Vec<usize> = cuts.iter().map(|c| c % (k + 1)).collect();
            points.push(0);
            points.push(k);
            points.sort_unstable();
            let shards: Vec<SufficientStats> = points
                .windows(2)
                .map(|w| {
                    let mut s = SufficientStats::new(d);
                    s.push_batch(&rows[w[0] * d..w[1] * d]).unwrap();
                    s
                })
                .collect();
            // Left fold.
            let mut left = SufficientStats::new(d);
            for s in &shards {
                left.merge(s).unwrap();
            }
            assert_stats_close(&left, &one, 1e-9);
            // Right fold (different association order).
            let mut right = SufficientStats::new(d);
            for s in shards.iter().rev() {
                let mut t = s.clone();
                t.merge(&right).unwrap();
                right = t;
            }
            assert_stats_close(&right, &one, 1e-9);
            assert_matches_naive(&one, &rows, d, 1e-9);
        }

        #[test]
        fn shift_formulas_match_naive_moments_about_any_point(
            seed in any::<u64>(),
            d in 1usize..7,
            k in 1usize..50,
        ) {
            let mut rng = Rng::new(seed);
            let rows = rng.correlated_rows(k, d, -1.0, seed ^ 99);
            let mut st = SufficientStats::new(d);
            st.push_batch(&rows).unwrap();
            let delta: Vec<f64> = (0..d).map(|_| rng.normal() * 2.0).collect();
            let centre: Vec<f64> = st.mean().iter().zip(&delta).map(|(m, v)| m + v).collect();
            let (t, q) = st.shifted_higher(&delta);
            let (_, s_want, t_want, q_want) = naive_about(&rows, d, Some(&centre));
            prop_assert!(close_vec(&t, &t_want, 1e-9));
            prop_assert!(close(q, q_want, 1e-9));
            // S' = S + n δδᵀ, the scatter about the shifted centre.
            let n = k as f64;
            let s_shift: Vec<f64> = (0..d * d)
                .map(|i| st.scatter()[i] + n * delta[i / d] * delta[i % d])
                .collect();
            prop_assert!(close_vec(&s_shift, &s_want, 1e-9));
        }
    }

    #[test]
    fn shifted_scatters_sum_to_chans_update() {
        let d = 5;
        let mut rng = Rng::new(42);
        let a_rows = rng.correlated_rows(17, d, 1.0, 3);
        let b_rows = rng.correlated_rows(29, d, -2.0, 4);
        let (mut a, mut b) = (SufficientStats::new(d), SufficientStats::new(d));
        a.push_batch(&a_rows).unwrap();
        b.push_batch(&b_rows).unwrap();
        let (na, nb) = (17.0, 29.0);
        let n = na + nb;
        let diff: Vec<f64> = (0..d).map(|j| b.mean()[j] - a.mean()[j]).collect();
        let da: Vec<f64> = diff.iter().map(|v| v * nb / n).collect();
        let db: Vec<f64> = diff.iter().map(|v| -v * na / n).collect();
        let via_shift: Vec<f64> = (0..d * d)
            .map(|i| {
                let (r, c) = (i / d, i % d);
                a.scatter()[i] + na * da[r] * da[c] + b.scatter()[i] + nb * db[r] * db[c]
            })
            .collect();
        let chan: Vec<f64> = (0..d * d)
            .map(|i| a.scatter()[i] + b.scatter()[i] + na * nb / n * diff[i / d] * diff[i % d])
            .collect();
        assert!(close_vec(&via_shift, &chan, 1e-12));
        let mut merged = a.clone();
        merged.merge(&b).unwrap();
        assert!(close_vec(merged.scatter(), &chan, 1e-12));
    }

    #[test]
    fn merge_with_empty_is_identity() {
        let d = 4;
        let rows = Rng::new(5).correlated_rows(33, d, 0.5, 6);
        let mut st = SufficientStats::new(d);
        st.push_batch(&rows).unwrap();
        let before = st.clone();
        st.merge(&SufficientStats::new(d)).unwrap();
        assert_eq!(st, before);
        let mut empty = SufficientStats::new(d);
        empty.merge(&before).unwrap();
        assert_eq!(empty, before);
    }

    #[test]
    fn large_batch_spans_several_gemm_chunks() {
        let d = 3;
        let k = 2 * STATS_CHUNK_ROWS + 17;
        let rows = Rng::new(8).correlated_rows(k, d, 10.0, 9);
        let mut st = SufficientStats::new(d);
        st.push_batch(&rows).unwrap();
        assert_matches_naive(&st, &rows, d, 1e-9);
    }

    #[test]
    fn hand_checked_small_case() {
        // Points (0,0), (2,0), (0,2), (2,2): mean (1,1), y = (±1, ±1).
        let mut st = SufficientStats::new(2);
        st.push_batch(&[0.0, 0.0, 2.0, 0.0]).unwrap();
        st.push_batch(&[0.0, 2.0, 2.0, 2.0]).unwrap();
        assert_eq!(st.count(), 4);
        assert_eq!(st.mean(), &[1.0, 1.0]);
        assert_eq!(st.scatter(), &[4.0, 0.0, 0.0, 4.0]);
        assert_eq!(st.covariance(), vec![1.0, 0.0, 0.0, 1.0]);
        assert_eq!(st.third(), &[0.0, 0.0]);
        assert_eq!(st.fourth(), 16.0); // four points with ||y||² = 2
    }

    #[test]
    fn bad_input_is_rejected_and_leaves_stats_unchanged() {
        let mut st = SufficientStats::new(3);
        st.push_batch(&[1.0, 2.0, 3.0]).unwrap();
        let before = st.clone();
        assert!(matches!(
            st.push_batch(&[1.0, 2.0]),
            Err(Error::Input(CoreError::Malformed(_)))
        ));
        match st.push_batch(&[1.0, 2.0, 3.0, 4.0, f32::NAN, 6.0]) {
            Err(Error::Input(CoreError::NonFinite { row, component, .. })) => {
                assert_eq!((row, component), (1, 1));
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        assert!(st.push_batch(&[f32::INFINITY, 0.0, 0.0]).is_err());
        assert_eq!(st, before);
        assert!(matches!(
            st.merge(&SufficientStats::new(2)),
            Err(Error::Input(CoreError::WidthMismatch {
                expected: 3,
                got: 2
            }))
        ));
        assert!(SufficientStats::new(0).push_batch(&[1.0]).is_err());
        assert!(SufficientStats::new(0).push_batch(&[]).is_err());
        // A corrupt (e.g. deserialised) value is an error, not a panic.
        let mut corrupt = before.clone();
        corrupt.scatter.pop();
        assert!(st.merge(&corrupt).is_err());
        assert_eq!(st, before);
        assert_eq!(SufficientStats::new(3).covariance(), vec![0.0; 9]);
    }
}
