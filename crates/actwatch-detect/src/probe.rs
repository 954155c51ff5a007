//! Concept probes: linear scores fitted from labelled examples (a concept present, 1, or absent, 0).
//!
//! An anomaly detector asks "is this unlike the trusted traffic?"; a probe asks "is this concept
//! present?", and is fitted from examples that say so. Both are linear scores `w·x + b` of a trace
//! (higher = more of the concept) here, fitted two ways:
//!
//! - **Logistic regression** ([`fit_logistic`]): the L2-regularised maximum-likelihood fit on
//!   standardised features, the objective of scikit-learn's `LogisticRegression` (intercept not
//!   penalised, sample weights allowed), minimised by L-BFGS to a tight gradient tolerance. The
//!   regularisation strength is chosen by cross-validation on the examples ([`choose_c`]): folds
//!   stratified by label and keeping every trace of one computation in one fold, the held-out
//!   weighted log-loss summed over folds, the largest penalty among equally good ones.
//! - **Difference of means** ([`difference_of_means`]): `w = μ₁ − μ₀`, the "concept direction" of
//!   the steering and refusal-direction literature. No optimisation, no hyper-parameter, and
//!   mergeable: the class sums are sufficient statistics.
//!
//! A probe's raw score is never read as a probability: like every raw score in actwatch it becomes a
//! conformal p-value among benign calibration computations (see the monitor), so a probe flag carries
//! the same false-positive guarantee as an anomaly flag.
//!
//! All arithmetic is in `f64` over `f32` rows, in fixed row chunks combined in order, so a fit gives
//! the same bits whatever the thread count.

use rayon::prelude::*;

use crate::{Error, Result};

/// Rows per parallel chunk of the loss and gradient: fixed, so that the chunks' partial sums (and
/// their order) do not depend on the thread count.
const CHUNK_ROWS: usize = 1024;

/// L-BFGS memory (pairs of steps and gradient changes kept).
const LBFGS_MEMORY: usize = 10;

/// Convergence: the largest gradient component of the objective (a mean per unit of sample weight)
/// at most this. scikit-learn's default stops at 1e-4; a tighter stop makes the solution, not the
/// solver's path, what a fit returns.
pub const LOGISTIC_TOLERANCE: f64 = 1e-8;

/// Most L-BFGS iterations of one fit; a fit that has not converged by then says so.
pub const LOGISTIC_MAX_ITER: usize = 2000;

/// The inverse regularisation strengths cross-validation chooses among: 13 values from 1e-4 to
/// 1e2, evenly spaced in log10. On standardised features C = 1e2 is nearly unregularised and C =
/// 1e-4 shrinks every coefficient almost to zero; the grid spans both.
pub fn default_c_grid() -> Vec<f64> {
    (0..13).map(|i| 10f64.powf(-4.0 + 0.5 * i as f64)).collect()
}

/// Default number of cross-validation folds.
pub const DEFAULT_FOLDS: usize = 5;

/// Labelled examples: `n` rows of width `dim`, a label, a sample weight and a group (the
/// computation it belongs to: cross-validation keeps a group's rows in one fold).
#[derive(Debug, Clone, Copy)]
pub struct Examples<'a> {
    pub rows: &'a [f32],
    pub dim: usize,
    pub labels: &'a [bool],
    pub weights: &'a [f64],
    pub groups: &'a [u32],
}

impl Examples<'_> {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn check(&self) -> Result<()> {
        let n = self.labels.len();
        if self.dim == 0
            || self.rows.len() != n * self.dim
            || self.weights.len() != n
            || self.groups.len() != n
        {
            return Err(Error::InvalidOption(format!(
                "probe examples: {} values, {} labels, {} weights and {} groups do not agree with width {}",
                self.rows.len(),
                n,
                self.weights.len(),
                self.groups.len(),
                self.dim
            )));
        }
        if let Some(w) = self.weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
            return Err(Error::InvalidOption(format!(
                "probe examples: sample weight {w} is not a finite non-negative number"
            )));
        }
        let (mut pos, mut neg) = (0.0, 0.0);
        for (&l, &w) in self.labels.iter().zip(self.weights) {
            if l {
                pos += w;
            } else {
                neg += w;
            }
        }
        if pos <= 0.0 || neg <= 0.0 {
            return Err(Error::NotEnoughData(format!(
                "a probe needs positive and negative examples; these have {} positive and {} \
                 negative (by weight {pos} and {neg})",
                self.labels.iter().filter(|&&l| l).count(),
                self.labels.iter().filter(|&&l| !l).count(),
            )));
        }
        Ok(())
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.rows[i * self.dim..(i + 1) * self.dim]
    }

    /// The examples whose index satisfies `keep`, copied.
    fn subset(&self, keep: impl Fn(usize) -> bool) -> OwnedExamples {
        let mut out = OwnedExamples {
            dim: self.dim,
            ..OwnedExamples::default()
        };
        for i in (0..self.len()).filter(|&i| keep(i)) {
            out.rows.extend_from_slice(self.row(i));
            out.labels.push(self.labels[i]);
            out.weights.push(self.weights[i]);
            out.groups.push(self.groups[i]);
        }
        out
    }
}

/// [`Examples`] that own their data.
#[derive(Debug, Clone, Default)]
pub struct OwnedExamples {
    pub rows: Vec<f32>,
    pub dim: usize,
    pub labels: Vec<bool>,
    pub weights: Vec<f64>,
    pub groups: Vec<u32>,
}

impl OwnedExamples {
    pub fn view(&self) -> Examples<'_> {
        Examples {
            rows: &self.rows,
            dim: self.dim,
            labels: &self.labels,
            weights: &self.weights,
            groups: &self.groups,
        }
    }
}

/// A linear score `w·x + b` in the space of the traces as they arrive.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinearProbe {
    pub weights: Vec<f64>,
    pub bias: f64,
}

impl LinearProbe {
    pub fn dim(&self) -> usize {
        self.weights.len()
    }

    /// One score per row of `rows` (row-major, width [`LinearProbe::dim`]).
    pub fn scores(&self, rows: &[f32]) -> Vec<f64> {
        let d = self.dim();
        rows.chunks_exact(d)
            .map(|r| dot(r, &self.weights) + self.bias)
            .collect()
    }
}

fn dot(row: &[f32], w: &[f64]) -> f64 {
    // Four accumulators: the compiler vectorises this; the order is fixed, so it is reproducible.
    let mut acc = [0.0f64; 4];
    let mut chunks = row.chunks_exact(4).zip(w.chunks_exact(4));
    for (r, w) in &mut chunks {
        for k in 0..4 {
            acc[k] += f64::from(r[k]) * w[k];
        }
    }
    let tail = row.len() / 4 * 4;
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for j in tail..row.len() {
        s += f64::from(row[j]) * w[j];
    }
    s
}

/// Weighted mean and standard deviation per feature (the population deviation, as scikit-learn's
/// `StandardScaler` computes it); a constant feature gets scale 1, so it drops out of the fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
}

impl Standardizer {
    pub fn fit(ex: &Examples<'_>) -> Self {
        let d = ex.dim;
        let total: f64 = ex.weights.iter().sum();
        let mut mean = vec![0.0; d];
        for i in 0..ex.len() {
            let w = ex.weights[i];
            for (m, &x) in mean.iter_mut().zip(ex.row(i)) {
                *m += w * f64::from(x);
            }
        }
        mean.iter_mut().for_each(|m| *m /= total);
        let mut var = vec![0.0; d];
        for i in 0..ex.len() {
            let w = ex.weights[i];
            for ((v, &x), m) in var.iter_mut().zip(ex.row(i)).zip(&mean) {
                let c = f64::from(x) - m;
                *v += w * c * c;
            }
        }
        let scale = var
            .iter()
            .map(|v| {
                let s = (v / total).sqrt();
                if s > 1e-12 * (1.0 + s) && s.is_finite() {
                    s
                } else {
                    1.0
                }
            })
            .collect();
        Self { mean, scale }
    }

    /// The probe in the traces' own space of coefficients `beta` on standardised features.
    pub fn unstandardize(&self, beta: &[f64], intercept: f64) -> LinearProbe {
        let weights: Vec<f64> = beta.iter().zip(&self.scale).map(|(b, s)| b / s).collect();
        let bias = intercept
            - weights
                .iter()
                .zip(&self.mean)
                .map(|(w, m)| w * m)
                .sum::<f64>();
        LinearProbe { weights, bias }
    }
}

/// The difference of the weighted class means, `w = μ₁ − μ₀`, with the bias that puts the midpoint
/// of the means at zero.
pub fn difference_of_means(ex: &Examples<'_>) -> Result<LinearProbe> {
    ex.check()?;
    let d = ex.dim;
    let mut sums = [vec![0.0f64; d], vec![0.0f64; d]];
    let mut totals = [0.0f64; 2];
    for i in 0..ex.len() {
        let c = usize::from(ex.labels[i]);
        let w = ex.weights[i];
        totals[c] += w;
        for (s, &x) in sums[c].iter_mut().zip(ex.row(i)) {
            *s += w * f64::from(x);
        }
    }
    let [s0, s1] = &sums;
    let weights: Vec<f64> = s1
        .iter()
        .zip(s0)
        .map(|(a, b)| a / totals[1] - b / totals[0])
        .collect();
    let bias = -s1
        .iter()
        .zip(s0)
        .zip(&weights)
        .map(|((a, b), w)| w * 0.5 * (a / totals[1] + b / totals[0]))
        .sum::<f64>();
    Ok(LinearProbe { weights, bias })
}

/// What [`fit_logistic`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct LogisticFit {
    /// The probe in the traces' own space.
    pub probe: LinearProbe,
    /// Coefficients on standardised features (what the penalty applies to) and the intercept.
    pub beta: Vec<f64>,
    pub intercept: f64,
    pub c: f64,
    pub iterations: usize,
    /// The objective at the solution (per unit of sample weight).
    pub objective: f64,
}

/// L2-regularised logistic regression on standardised features: minimises
/// `C Σᵢ sᵢ ℓ(yᵢ, βᵀzᵢ + β₀) + ½‖β‖²` (scikit-learn's objective; `ℓ` the log-loss, `zᵢ` the
/// standardised row, `sᵢ` its weight), by L-BFGS to [`LOGISTIC_TOLERANCE`].
pub fn fit_logistic(ex: &Examples<'_>, c: f64) -> Result<LogisticFit> {
    ex.check()?;
    let std = Standardizer::fit(ex);
    let fit = minimise(ex, &std, c, None)?;
    Ok(finish(&std, fit, c))
}

fn finish(std: &Standardizer, fit: Solution, c: f64) -> LogisticFit {
    let d = std.mean.len();
    LogisticFit {
        probe: std.unstandardize(&fit.theta[..d], fit.theta[d]),
        beta: fit.theta[..d].to_vec(),
        intercept: fit.theta[d],
        c,
        iterations: fit.iterations,
        objective: fit.objective,
    }
}

/// Cross-validated choice of C: per C of `grid` (ascending), the weighted held-out log-loss summed
/// over `folds` stratified group folds ([`folds`]), each fold's fits warm-started along the grid.
/// Returns the chosen C and the loss per grid value (per unit of held-out weight). Ties (within
/// 1e-9 relative) go to the smaller C: the stronger penalty.
pub fn choose_c(
    ex: &Examples<'_>,
    grid: &[f64],
    n_folds: usize,
    seed: u64,
) -> Result<(f64, Vec<f64>)> {
    ex.check()?;
    if grid.is_empty() || grid.iter().any(|c| !(c.is_finite() && *c > 0.0)) {
        return Err(Error::InvalidOption(
            "the C grid must hold finite positive values".into(),
        ));
    }
    let fold_of = folds(ex, n_folds, seed)?;
    let mut loss = vec![0.0f64; grid.len()];
    let mut held_weight = 0.0;
    for f in 0..n_folds {
        let train = ex.subset(|i| fold_of[i] != f);
        let test = ex.subset(|i| fold_of[i] == f);
        let (train, test) = (train.view(), test.view());
        // A fold without both classes in its training part cannot fit; stratification prevents
        // it whenever each class has at least `n_folds` groups (checked by `folds`).
        train.check()?;
        let std = Standardizer::fit(&train);
        let mut warm: Option<Vec<f64>> = None;
        for (k, &c) in grid.iter().enumerate() {
            let sol = minimise(&train, &std, c, warm.as_deref())?;
            let probe = std.unstandardize(&sol.theta[..ex.dim], sol.theta[ex.dim]);
            loss[k] += weighted_log_loss(&test, &probe);
            warm = Some(sol.theta);
        }
        held_weight += test.weights.iter().sum::<f64>();
    }
    loss.iter_mut().for_each(|l| *l /= held_weight);
    let best = loss.iter().copied().fold(f64::INFINITY, f64::min);
    let k = loss
        .iter()
        .position(|&l| l <= best + 1e-9 * best.abs())
        .expect("a finite minimum exists");
    Ok((grid[k], loss))
}

/// Fold of each example: the groups of each label, ordered by a seeded hash of the group, dealt
/// round-robin into `n_folds` folds (so each fold holds about the same share of each label, and
/// all rows of a group share a fold).
pub fn folds(ex: &Examples<'_>, n_folds: usize, seed: u64) -> Result<Vec<usize>> {
    if n_folds < 2 {
        return Err(Error::InvalidOption(format!(
            "cross-validation needs at least 2 folds, not {n_folds}"
        )));
    }
    // One label per group (the first row's); a group holding both labels is an input error.
    let mut group_label: std::collections::BTreeMap<u32, bool> = Default::default();
    for (&g, &l) in ex.groups.iter().zip(ex.labels) {
        if *group_label.entry(g).or_insert(l) != l {
            return Err(Error::InvalidOption(format!(
                "probe examples: computation {g} has rows labelled both 0 and 1"
            )));
        }
    }
    let mut fold_of_group: std::collections::BTreeMap<u32, usize> = Default::default();
    for label in [false, true] {
        let mut gs: Vec<(u64, u32)> = group_label
            .iter()
            .filter(|(_, &l)| l == label)
            .map(|(&g, _)| (mix(seed, u64::from(g)), g))
            .collect();
        if gs.len() < n_folds {
            return Err(Error::NotEnoughData(format!(
                "{}-fold cross-validation needs at least {n_folds} {} computations; there are {}",
                n_folds,
                if label { "positive" } else { "negative" },
                gs.len()
            )));
        }
        gs.sort_unstable();
        for (rank, (_, g)) in gs.into_iter().enumerate() {
            fold_of_group.insert(g, rank % n_folds);
        }
    }
    Ok(ex.groups.iter().map(|g| fold_of_group[g]).collect())
}

/// SplitMix64 of a seeded value: the order in which groups are dealt into folds.
fn mix(seed: u64, x: u64) -> u64 {
    let mut z = x.wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `log(1 + e^z)`, without overflow.
fn softplus(z: f64) -> f64 {
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Σ sᵢ ℓᵢ of a probe on examples (ℓ the log-loss of the label).
fn weighted_log_loss(ex: &Examples<'_>, probe: &LinearProbe) -> f64 {
    let z = probe.scores(ex.rows);
    z.iter()
        .zip(ex.labels)
        .zip(ex.weights)
        .map(|((&z, &y), &w)| w * (softplus(z) - if y { z } else { 0.0 }))
        .sum()
}

struct Solution {
    /// β (standardised coefficients) then β₀.
    theta: Vec<f64>,
    iterations: usize,
    objective: f64,
}

/// The objective `f(θ) = (1/S) Σ sᵢ ℓᵢ + ‖β‖² / (2 C S)` (scikit-learn's divided by `C S`, `S` the
/// total weight: the same minimiser, on a scale that does not grow with the data) and its
/// gradient, at `theta` = (β, β₀) on standardised features.
struct Objective<'a> {
    ex: &'a Examples<'a>,
    std: &'a Standardizer,
    lambda: f64,
    total: f64,
}

impl Objective<'_> {
    fn eval(&self, theta: &[f64], grad: &mut [f64]) -> f64 {
        let d = self.ex.dim;
        // In raw space: z = Σⱼ xⱼ βⱼ/σⱼ + (β₀ − Σⱼ μⱼ βⱼ/σⱼ).
        let probe = self.std.unstandardize(&theta[..d], theta[d]);
        let ex = self.ex;
        // Per fixed chunk: (loss, Σ rᵢ xᵢ (raw), Σ rᵢ), with rᵢ = sᵢ (σ(zᵢ) − yᵢ).
        let parts: Vec<(f64, Vec<f64>, f64)> = (0..ex.len().div_ceil(CHUNK_ROWS))
            .into_par_iter()
            .map(|chunk| {
                let mut loss = 0.0;
                let mut gx = vec![0.0f64; d];
                let mut gr = 0.0;
                for i in chunk * CHUNK_ROWS..((chunk + 1) * CHUNK_ROWS).min(ex.len()) {
                    let row = ex.row(i);
                    let z = dot(row, &probe.weights) + probe.bias;
                    let (y, s) = (ex.labels[i], ex.weights[i]);
                    loss += s * (softplus(z) - if y { z } else { 0.0 });
                    let r = s * (sigmoid(z) - f64::from(u8::from(y)));
                    if r != 0.0 {
                        for (g, &x) in gx.iter_mut().zip(row) {
                            *g += r * f64::from(x);
                        }
                    }
                    gr += r;
                }
                (loss, gx, gr)
            })
            .collect();
        let mut loss = 0.0;
        let mut gx = vec![0.0f64; d];
        let mut gr = 0.0;
        for (l, g, r) in parts {
            loss += l;
            gx.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
            gr += r;
        }
        // Back to standardised coordinates: ∂/∂βⱼ = (Σ rᵢ xᵢⱼ − μⱼ Σ rᵢ) / σⱼ.
        let mut penalty = 0.0;
        for j in 0..d {
            let b = theta[j];
            grad[j] =
                (gx[j] - self.std.mean[j] * gr) / self.std.scale[j] / self.total + self.lambda * b;
            penalty += b * b;
        }
        grad[d] = gr / self.total;
        loss / self.total + 0.5 * self.lambda * penalty
    }
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// L-BFGS with a backtracking (Armijo) line search, from `warm` or zero.
fn minimise(
    ex: &Examples<'_>,
    std: &Standardizer,
    c: f64,
    warm: Option<&[f64]>,
) -> Result<Solution> {
    if !(c.is_finite() && c > 0.0) {
        return Err(Error::InvalidOption(format!(
            "the inverse regularisation strength C must be finite and positive, not {c}"
        )));
    }
    let d = ex.dim;
    let total: f64 = ex.weights.iter().sum();
    let obj = Objective {
        ex,
        std,
        lambda: 1.0 / (c * total),
        total,
    };
    let n = d + 1;
    let mut x = warm.map_or_else(|| vec![0.0; n], <[f64]>::to_vec);
    let mut g = vec![0.0; n];
    let mut f = obj.eval(&x, &mut g);
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let mut rho: Vec<f64> = Vec::new();
    let mut x_new = vec![0.0; n];
    let mut g_new = vec![0.0; n];
    // The initial Hessian scale: the latest curvature pair's, kept across restarts; the first
    // step has length about 1 in its largest coordinate.
    let mut gamma = 1.0 / max_abs(&g).max(1.0);
    // Whether the curvature pairs were dropped after a stall, and no step has made progress since.
    let mut reset = false;
    for it in 0..LOGISTIC_MAX_ITER {
        if max_abs(&g) <= LOGISTIC_TOLERANCE {
            return Ok(Solution {
                theta: x,
                iterations: it,
                objective: f,
            });
        }
        // Two-loop recursion: dir = −H g.
        let mut q = g.clone();
        let mut alpha = vec![0.0; s_hist.len()];
        for k in (0..s_hist.len()).rev() {
            alpha[k] = rho[k] * dotf(&s_hist[k], &q);
            axpy(-alpha[k], &y_hist[k], &mut q);
        }
        if let (Some(s), Some(y)) = (s_hist.last(), y_hist.last()) {
            gamma = dotf(s, y) / dotf(y, y);
        }
        q.iter_mut().for_each(|v| *v *= gamma);
        for k in 0..s_hist.len() {
            let beta = rho[k] * dotf(&y_hist[k], &q);
            axpy(alpha[k] - beta, &s_hist[k], &mut q);
        }
        let dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dotf(&g, &dir);
        let dir = if slope < 0.0 {
            dir
        } else {
            // Not a descent direction (numerical): restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            rho.clear();
            slope = -gamma * dotf(&g, &g);
            g.iter().map(|v| -gamma * v).collect()
        };
        let mut t = 1.0;
        let mut accepted = false;
        let mut stalled = false;
        for _ in 0..60 {
            for j in 0..n {
                x_new[j] = x[j] + t * dir[j];
            }
            let f_new = obj.eval(&x_new, &mut g_new);
            if f_new <= f + 1e-4 * t * slope {
                let s: Vec<f64> = (0..n).map(|j| x_new[j] - x[j]).collect();
                let y: Vec<f64> = (0..n).map(|j| g_new[j] - g[j]).collect();
                let sy = dotf(&s, &y);
                if sy > 1e-12 * dotf(&y, &y).sqrt() * dotf(&s, &s).sqrt() {
                    if s_hist.len() == LBFGS_MEMORY {
                        s_hist.remove(0);
                        y_hist.remove(0);
                        rho.remove(0);
                    }
                    s_hist.push(s);
                    y_hist.push(y);
                    rho.push(1.0 / sy);
                }
                std::mem::swap(&mut x, &mut x_new);
                std::mem::swap(&mut g, &mut g_new);
                stalled = (f - f_new).abs() <= f64::EPSILON * f.abs().max(1.0);
                reset &= stalled;
                f = f_new;
                accepted = true;
                break;
            }
            t *= 0.5;
        }
        if !accepted || stalled {
            // No decrease the objective's rounding can see. The curvature pairs may be stale:
            // drop them and retry from steepest descent, once. Stalling again means this is as
            // close as f64 gets (near the optimum the decrease per step, about the gradient
            // squared, is below the objective's rounding); accept it if the gradient is nearly
            // at the tolerance.
            if !s_hist.is_empty() && !reset {
                s_hist.clear();
                y_hist.clear();
                rho.clear();
                reset = true;
                continue;
            }
            if max_abs(&g) <= LOGISTIC_TOLERANCE.sqrt() {
                return Ok(Solution {
                    theta: x,
                    iterations: it + 1,
                    objective: f,
                });
            }
            return Err(Error::Numerical(format!(
                "logistic regression (C = {c}): the line search found no decrease at iteration \
                 {it} (largest gradient component {:.3e})",
                max_abs(&g)
            )));
        }
    }
    if max_abs(&g) <= LOGISTIC_TOLERANCE.sqrt() {
        // Slow, but as close as it gets.
        return Ok(Solution {
            theta: x,
            iterations: LOGISTIC_MAX_ITER,
            objective: f,
        });
    }
    Err(Error::Numerical(format!(
        "logistic regression (C = {c}) did not converge in {LOGISTIC_MAX_ITER} iterations \
         (largest gradient component {:.3e}); the examples may be separable: choose a smaller C",
        max_abs(&g)
    )))
}

fn dotf(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// How a probe is fitted.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProbeKind {
    /// L2 logistic regression on standardised features ([`fit_logistic`]); `c` None: chosen by
    /// cross-validation on the examples ([`choose_c`]).
    Logistic { c: Option<f64> },
    /// The difference of the class means ([`difference_of_means`]).
    DiffMeans,
}

impl ProbeKind {
    /// `logistic` or `diff_means`.
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::Logistic { .. } => "logistic",
            ProbeKind::DiffMeans => "diff_means",
        }
    }
}

/// The default probe: the difference of means. Labelled examples are rarely drawn from the
/// traffic a probe will watch: they come from datasets with their own phrasing, length and topic,
/// and any feature that separates their classes (harmful *orders* against long chatty benign
/// requests, say) is a feature a discriminative fit is rewarded for using. Logistic regression
/// finds every such direction (on the shared concept data its cross-validation chooses the
/// weakest penalty of the grid: the classes are nearly separable); the difference of means has
/// no such freedom, it is the mean shift and nothing else, which is why it carries a concept
/// across distribution shifts better in the probing literature ("mass-mean" probes, Marks &
/// Tegmark 2023; refusal directions, Arditi et al. 2024). It also needs no hyper-parameter and
/// its statistics merge exactly. Measured, not chosen, on the style-shifted dev set:
/// docs/experiments/probes.md.
pub const DEFAULT_PROBE_KIND: ProbeKind = ProbeKind::DiffMeans;

/// Most probes one monitor holds.
pub const MAX_PROBES: usize = 16;
/// Longest probe name, in bytes.
pub const MAX_PROBE_NAME_LEN: usize = 64;

/// One probe a monitor fits from labelled examples: what a user asks for with
/// `NAME[:key=value,...]`, e.g. `harmful_request`, `harmful_request:kind=diff_means,sites=6`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeSpec {
    /// Names its p-value in results (`p_probe_<name>`): letters, digits, `_` and `-`.
    pub name: String,
    pub kind: ProbeKind,
    /// The sites it reads, one probe per site fused like detector slots; empty: every site of
    /// the monitor.
    #[serde(default)]
    pub sites: Vec<String>,
    /// How a computation's traces aggregate per site; None: the monitor's aggregation.
    #[serde(default)]
    pub aggregation: Option<crate::Aggregation>,
    /// Also fit on the fit part of the monitor's (trusted, unlabelled) reference traffic, as
    /// negatives weighing as much in total as the labelled negatives.
    #[serde(default)]
    pub reference_negatives: bool,
    /// A second, looser rate: computations with a p-value at or below it (and not flagged) are
    /// *deferred*, the uncertain band a cascade sends to a more expensive judge.
    #[serde(default)]
    pub defer_fpr: Option<f64>,
}

impl ProbeSpec {
    /// A probe named `name` with the defaults: [`DEFAULT_PROBE_KIND`], every site, the
    /// monitor's aggregation, no reference negatives, no deferral band.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            kind: DEFAULT_PROBE_KIND,
            sites: Vec::new(),
            aggregation: None,
            reference_negatives: false,
            defer_fpr: None,
        }
    }

    /// Parses `NAME[:key=value,...]` with keys `kind` (`logistic`, `diff_means`), `c` (a
    /// positive number, or `auto`: cross-validated), `sites` (`+`-separated, e.g. `2+4+6`),
    /// `aggregation` (as the monitor's, e.g. `max`, `max_rolling_mean:8`),
    /// `reference_negatives` (`true`/`false`) and `defer_fpr` (a rate).
    pub fn parse(text: &str) -> Result<Self> {
        let (name, params) = match text.split_once(':') {
            Some((n, p)) => (n.trim(), p),
            None => (text.trim(), ""),
        };
        let mut spec = Self::named(name);
        let mut c: Option<Option<f64>> = None;
        let bad = |why: String| Error::InvalidOption(format!("probe `{text}`: {why}"));
        for p in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = p
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| bad(format!("`{p}` is not key=value")))?;
            match k {
                "kind" => {
                    spec.kind = match v {
                        "logistic" => ProbeKind::Logistic { c: None },
                        "diff_means" => ProbeKind::DiffMeans,
                        _ => {
                            return Err(bad(format!(
                                "unknown kind `{v}`: expected logistic or diff_means"
                            )))
                        }
                    }
                }
                "c" => {
                    c = Some(if v == "auto" {
                        None
                    } else {
                        Some(
                            v.parse::<f64>()
                                .map_err(|_| bad(format!("c `{v}` is not a number (or `auto`)")))?,
                        )
                    })
                }
                "sites" => {
                    spec.sites = v
                        .split('+')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                }
                "aggregation" => spec.aggregation = Some(crate::Aggregation::parse(v)?),
                "reference_negatives" => {
                    spec.reference_negatives = v
                        .parse::<bool>()
                        .map_err(|_| bad(format!("reference_negatives `{v}` is not true/false")))?
                }
                "defer_fpr" => {
                    spec.defer_fpr = Some(
                        v.parse::<f64>()
                            .map_err(|_| bad(format!("defer_fpr `{v}` is not a number")))?,
                    )
                }
                _ => {
                    return Err(bad(format!(
                        "unknown parameter `{k}` (known: kind, c, sites, aggregation, \
                         reference_negatives, defer_fpr)"
                    )))
                }
            }
        }
        if let Some(c) = c {
            match &mut spec.kind {
                ProbeKind::Logistic { c: slot } => *slot = c,
                ProbeKind::DiffMeans => {
                    return Err(bad("c applies to kind=logistic only".into()));
                }
            }
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Checks what can be checked without data (`fpr`: the monitor's target rate, which a
    /// deferral rate must exceed).
    pub fn validate_with(&self, fpr: f64) -> Result<()> {
        self.validate()?;
        if let Some(d) = self.defer_fpr {
            if d <= fpr {
                return Err(Error::InvalidOption(format!(
                    "probe {:?}: defer_fpr {d} must be above the monitor's target rate {fpr}",
                    self.name
                )));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let bad = |why: String| {
            Err(Error::InvalidOption(format!(
                "probe {:?}: {why}",
                self.name
            )))
        };
        if self.name.is_empty()
            || self.name.len() > MAX_PROBE_NAME_LEN
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return bad(format!(
                "a probe name is 1 to {MAX_PROBE_NAME_LEN} letters, digits, `_` or `-`"
            ));
        }
        if self.name == "anomaly" {
            return bad("`anomaly` names the anomaly question in flags and filters".into());
        }
        if let ProbeKind::Logistic { c: Some(c) } = self.kind {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("c {c} is not a finite positive number"));
            }
        }
        if let Some(a) = &self.aggregation {
            a.validate()?;
        }
        for (i, s) in self.sites.iter().enumerate() {
            if self.sites[..i].contains(s) {
                return bad(format!("site {s:?} is listed twice"));
            }
        }
        if let Some(d) = self.defer_fpr {
            if !(d > 0.0 && d < 1.0) {
                return bad(format!("defer_fpr {d} is outside (0, 1)"));
            }
        }
        Ok(())
    }
}
