//! The reference check: which parts (groups) of a reference set look unlike the rest of it.
//!
//! A monitor learns "normal" from its reference set, so whoever can add reference data can teach
//! it that an attack is normal. The check runs at fit time and says, for each group of reference
//! rows (the server's groups are ingests), whether that group is an outlier of the *other*
//! groups, judged by a model that never saw it, so that an operator sees a poisoning attempt
//! before it becomes normal. It is a report: it never changes the fit.
//!
//! The model, per site (three passes over the data, in this module's three types):
//! 1. [`BasisSampler`]: rows are L2-normalised; a seeded sample of at most [`CHECK_BASIS_ROWS`]
//!    rows per site gives a mean and the top `r` principal directions (`r` at most
//!    [`CHECK_MAX_RANK`] and a quarter of the sample). A row's *features* are its `r`
//!    coordinates along them plus, when `r < d`, the log of its squared residual off them (what
//!    the top directions miss still counts).
//! 2. [`FeatureAccumulator`]: computations are split by a seeded hash of their id into a *fit*
//!    half and a *null* half. Each group's fit half is folded into Gaussian statistics of the
//!    features; a seeded sample of at most [`CHECK_NULL_ROWS`] null-half rows per site is kept,
//!    with its group.
//! 3. [`GroupScorer`]: for each group `g`, the *leave-out model* is a Ledoit-Wolf Gaussian on the
//!    fit half of every other group; its null is the null half of every other group (never
//!    fitted on). Every row of `g` is scored and flagged when its conformal p-value among that
//!    null is at most [`CHECK_ALPHA`].
//!
//! Why this is a valid test: the rows of `g` and the null rows are both outside the leave-out
//! model's fit, so if `g` is drawn like the rest, each of its rows is flagged with probability at
//! most `α` (conformal exchangeability), whatever the model. Rows of one computation are not
//! independent (tokens of one text), so the share of flagged rows is tested as a binomial over
//! the group's *computations*: `P(X >= k)` for `X ~ Bin(n, α)`, `n` its computations and `k` the
//! flagged share of them, Bonferroni-adjusted over every (group, site) tested. A group is
//! *suspect* when that adjusted p-value is below [`CHECK_SUSPECT_LEVEL`] and at least
//! [`CHECK_MIN_SHARE_FACTOR`] times `α` of its rows are flagged (a large but harmless shift
//! between ingests can be significant without mattering; an injected cluster is flagged at
//! many times the rate).
//!
//! Limits of what it sees: a poison spread thinly over many groups, each mostly clean, dilutes
//! in every group; and when the poison is most of the reference set, the rest looks like the
//! outlier. The basis is fitted on a sample of all groups (a poisoned group's directions are in
//! it, which helps: the leave-out model gives them little variance).

use std::collections::{BTreeMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use actwatch_core::{check_rows, l2_normalize_rows, split_unit};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Side};

use crate::gaussian::{GaussianDetector, GaussianOptions};
use crate::stats::par_for;
use crate::stats::SufficientStats;
use crate::{Error, Result};

/// Per-row level: a row is flagged when its conformal p-value among the null is at most this.
pub const CHECK_ALPHA: f64 = 0.01;
/// Family-wise level below which a group's adjusted p-value makes it suspect.
pub const CHECK_SUSPECT_LEVEL: f64 = 1e-3;
/// A suspect group has at least this many times [`CHECK_ALPHA`] of its rows flagged.
pub const CHECK_MIN_SHARE_FACTOR: f64 = 5.0;
/// Most principal directions of a site's features.
pub const CHECK_MAX_RANK: usize = 64;
/// Most sample rows per site the basis is fitted on (the eigendecomposition is of a matrix of
/// side `min(d, rows)`).
pub const CHECK_BASIS_ROWS: usize = 2048;
/// Most bytes the basis samples of all sites hold together.
pub const CHECK_BASIS_BYTES: usize = 256 << 20;
/// Most null rows kept per site.
pub const CHECK_NULL_ROWS: usize = 8192;
/// Most bytes the null samples of all sites hold together.
pub const CHECK_NULL_BYTES: usize = 64 << 20;
/// Most groups the check compares; a caller with more merges consecutive ones
/// ([`merge_groups`]).
pub const CHECK_MAX_GROUPS: usize = 32;

const SPLIT_SEED: u64 = 0x6368_6563_6b5f_7370; // "check_sp"
const SAMPLE_SEED: u64 = 0x6368_6563_6b5f_736d; // "check_sm"
/// Fewest rows a leave-out model is fitted on.
const MIN_FIT_ROWS: u64 = 2;

/// Maps `n` groups in order onto at most `max` consecutive blocks of near-equal size: entry `i`
/// is the block of group `i`.
pub fn merge_groups(n: usize, max: usize) -> Vec<usize> {
    let max = max.max(1);
    if n <= max {
        return (0..n).collect();
    }
    (0..n).map(|i| i * max / n).collect()
}

/// A sample kept by the smallest keys (a bottom-k sample): deterministic for a given input order
/// and independent of how the input was cut into batches.
#[derive(Debug)]
struct BottomK<T> {
    cap: usize,
    items: Vec<(f64, u64, T)>,
    /// Keys at or above this can no longer enter.
    bound: f64,
    seq: u64,
}

impl<T> BottomK<T> {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            items: Vec::new(),
            bound: f64::INFINITY,
            seq: 0,
        }
    }

    fn admits(&self, key: f64) -> bool {
        key < self.bound
    }

    fn push(&mut self, key: f64, item: T) {
        self.seq += 1;
        if !self.admits(key) {
            return;
        }
        self.items.push((key, self.seq, item));
        if self.items.len() >= 2 * self.cap.max(1) {
            self.truncate();
        }
    }

    fn truncate(&mut self) {
        self.items
            .sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        self.items.truncate(self.cap);
        if self.items.len() == self.cap {
            if let Some(last) = self.items.last() {
                self.bound = last.0;
            }
        }
    }

    fn into_items(mut self) -> Vec<T> {
        self.truncate();
        self.items.into_iter().map(|(_, _, t)| t).collect()
    }
}

fn width_of(sites: &BTreeMap<String, usize>, site: &str) -> Result<usize> {
    sites.get(site).copied().ok_or_else(|| {
        Error::InvalidOption(format!("reference check: site {site:?} was not declared"))
    })
}

/// Pass 1: samples rows of every site for its basis.
#[derive(Debug)]
pub struct BasisSampler {
    groups: usize,
    widths: BTreeMap<String, usize>,
    samples: BTreeMap<String, BottomK<Vec<f32>>>,
}

impl BasisSampler {
    /// A check of `groups` groups (at least 2, at most [`CHECK_MAX_GROUPS`]) over `sites`
    /// (name, width).
    pub fn new(groups: usize, sites: &[(String, usize)]) -> Result<Self> {
        if !(2..=CHECK_MAX_GROUPS).contains(&groups) {
            return Err(Error::InvalidOption(format!(
                "reference check: needs 2..={CHECK_MAX_GROUPS} groups, got {groups}"
            )));
        }
        let total_width: usize = sites.iter().map(|(_, d)| *d).sum::<usize>().max(1);
        // Rows per site so that all samples fit CHECK_BASIS_BYTES, at least enough for a few
        // directions.
        let rows = (CHECK_BASIS_BYTES / (4 * total_width)).clamp(16, CHECK_BASIS_ROWS);
        Ok(Self {
            groups,
            widths: sites.iter().cloned().collect(),
            samples: sites
                .iter()
                .map(|(s, _)| (s.clone(), BottomK::new(rows)))
                .collect(),
        })
    }

    /// Offers rows (row-major, one id per row) of `site` to its sample.
    pub fn push<S: AsRef<str>>(&mut self, site: &str, ids: &[S], rows: &[f32]) -> Result<()> {
        let d = width_of(&self.widths, site)?;
        check_ids(d, ids, rows)?;
        let sample = self.samples.get_mut(site).expect("one sample per width");
        for (id, row) in ids.iter().zip(rows.chunks_exact(d)) {
            let key = split_unit(SAMPLE_SEED, id.as_ref());
            if sample.admits(key) {
                let mut row = row.to_vec();
                l2_normalize_rows(&mut row, d);
                sample.push(key, row);
            } else {
                sample.push(key, Vec::new());
            }
        }
        Ok(())
    }

    /// Fits every site's basis; sites without rows are left out of the check.
    pub fn finish(self) -> Result<FeatureAccumulator> {
        let mut bases = BTreeMap::new();
        for (site, sample) in self.samples {
            let d = self.widths[&site];
            let rows: Vec<Vec<f32>> = sample.into_items();
            if let Some(basis) = SiteBasis::fit(d, &rows)? {
                bases.insert(site, basis);
            }
        }
        let total_features: usize = bases.values().map(|b| b.features()).sum::<usize>().max(1);
        let null_rows = (CHECK_NULL_BYTES / (4 * total_features)).clamp(256, CHECK_NULL_ROWS);
        let sites = bases
            .into_iter()
            .map(|(site, basis)| {
                let f = basis.features();
                let fit = (0..self.groups).map(|_| SufficientStats::new(f)).collect();
                (
                    site,
                    SiteFeatures {
                        basis,
                        fit,
                        null: BottomK::new(null_rows),
                    },
                )
            })
            .collect();
        Ok(FeatureAccumulator {
            groups: self.groups,
            widths: self.widths,
            sites,
        })
    }
}

/// How the feature Gaussians are fitted: Ledoit-Wolf, features as they are, full rank.
fn feature_options() -> GaussianOptions {
    GaussianOptions {
        normalize: false,
        ..GaussianOptions::default()
    }
}

fn check_ids<S>(d: usize, ids: &[S], rows: &[f32]) -> Result<()> {
    let k = check_rows(d, rows)?;
    if k != ids.len() {
        return Err(Error::InvalidOption(format!(
            "reference check: {k} rows but {} ids",
            ids.len()
        )));
    }
    Ok(())
}

/// A site's mean and top principal directions (unit vectors), over L2-normalised rows.
#[derive(Debug, Clone)]
struct SiteBasis {
    dim: usize,
    rank: usize,
    mean: Vec<f32>,
    /// d×r row-major.
    directions: Vec<f32>,
}

impl SiteBasis {
    /// `None` when the sample is too small or has no variance.
    fn fit(d: usize, rows: &[Vec<f32>]) -> Result<Option<Self>> {
        let k = rows.len();
        if k < 4 || d == 0 {
            return Ok(None);
        }
        let mut mean = vec![0.0f64; d];
        for r in rows {
            for (m, &x) in mean.iter_mut().zip(r) {
                *m += f64::from(x);
            }
        }
        mean.iter_mut().for_each(|m| *m /= k as f64);
        let xc = Mat::<f64>::from_fn(k, d, |i, j| f64::from(rows[i][j]) - mean[j]);
        let max_rank = CHECK_MAX_RANK.min(d).min(k / 4).max(1);
        // Eigen-decompose the smaller of the covariance (d×d) and the Gram matrix (k×k).
        let (m, gram) = if d <= k {
            (xc.transpose() * &xc, false)
        } else {
            (&xc * xc.transpose(), true)
        };
        let side = m.nrows();
        let trace: f64 = (0..side).map(|i| m[(i, i)]).sum();
        if !(trace > 0.0 && trace.is_finite()) {
            return Ok(None);
        }
        let evd = m
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| Error::Numerical(format!("reference check: eigendecomposition: {e:?}")))?;
        let u = evd.U();
        let s = evd.S().column_vector();
        // Ascending: the largest last. Directions with a share of the variance too small to be
        // told from rounding are dropped.
        let kept: Vec<usize> = (0..side)
            .rev()
            .take(max_rank)
            .filter(|&j| s[j] > 1e-9 * trace)
            .collect();
        let rank = kept.len();
        if rank == 0 {
            return Ok(None);
        }
        let mut directions = vec![0.0f32; d * rank];
        for (c, &j) in kept.iter().enumerate() {
            if gram {
                // v = Xcᵀ u / sqrt(λ): unit, since ||Xcᵀ u||² = uᵀ G u = λ.
                let scale = 1.0 / s[j].sqrt();
                for i in 0..d {
                    let v: f64 = (0..k).map(|t| xc[(t, i)] * u[(t, j)]).sum();
                    directions[i * rank + c] = (v * scale) as f32;
                }
            } else {
                for i in 0..d {
                    directions[i * rank + c] = u[(i, j)] as f32;
                }
            }
        }
        Ok(Some(Self {
            dim: d,
            rank,
            mean: mean.iter().map(|&m| m as f32).collect(),
            directions,
        }))
    }

    /// Width of a row's features: the coordinates, and the log residual when `rank < dim`.
    fn features(&self) -> usize {
        self.rank + usize::from(self.rank < self.dim)
    }

    /// The features of `rows` (raw, row-major), `features()` per row.
    fn project(&self, rows: &[f32]) -> Vec<f32> {
        let (d, r, f) = (self.dim, self.rank, self.features());
        let k = rows.len() / d;
        let mut y = rows.to_vec();
        l2_normalize_rows(&mut y, d);
        let mut sq = vec![0.0f64; k];
        for (row, s) in y.chunks_exact_mut(d).zip(&mut sq) {
            for (x, m) in row.iter_mut().zip(&self.mean) {
                *x -= m;
            }
            *s = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        }
        let mut p = vec![0.0f32; k * r];
        {
            let pm = MatMut::from_row_major_slice_mut(&mut p, k, r);
            let ym = MatRef::from_row_major_slice(&y, k, d);
            let vm = MatRef::from_row_major_slice(&self.directions, d, r);
            matmul(pm, Accum::Replace, ym, vm, 1.0f32, par_for(k * d * r));
        }
        let mut out = vec![0.0f32; k * f];
        for ((o, pr), s) in out.chunks_exact_mut(f).zip(p.chunks_exact(r)).zip(&sq) {
            o[..r].copy_from_slice(pr);
            if f > r {
                let along: f64 = pr.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                // The residual's share of the squared norm, floored so that a row inside the
                // span stays finite.
                let resid = (s - along).max(0.0) + 1e-12;
                o[r] = resid.ln() as f32;
            }
        }
        out
    }
}

#[derive(Debug)]
struct SiteFeatures {
    basis: SiteBasis,
    /// Per group: the features of its fit half.
    /// (Plain statistics, not a `GaussianFitter`: no grid buffer per group and site.)
    fit: Vec<SufficientStats>,
    /// (group, features) of null-half rows.
    null: BottomK<(usize, Vec<f32>)>,
}

/// Pass 2: folds each group's fit half and samples the null half.
#[derive(Debug)]
pub struct FeatureAccumulator {
    groups: usize,
    widths: BTreeMap<String, usize>,
    sites: BTreeMap<String, SiteFeatures>,
}

impl FeatureAccumulator {
    /// Folds rows of `site` from `group`.
    pub fn push<S: AsRef<str>>(
        &mut self,
        group: usize,
        site: &str,
        ids: &[S],
        rows: &[f32],
    ) -> Result<()> {
        check_push(&self.widths, self.groups, group, site, ids, rows)?;
        let Some(s) = self.sites.get_mut(site) else {
            return Ok(()); // a site left out of the check
        };
        let feats = s.basis.project(rows);
        let f = s.basis.features();
        let mut fit = Vec::new();
        for (id, x) in ids.iter().zip(feats.chunks_exact(f)) {
            if split_unit(SPLIT_SEED, id.as_ref()) < 0.5 {
                fit.extend_from_slice(x);
            } else {
                s.null
                    .push(split_unit(SAMPLE_SEED, id.as_ref()), (group, x.to_vec()));
            }
        }
        if !fit.is_empty() {
            s.fit[group].push_batch(&fit)?;
        }
        Ok(())
    }

    /// Fits every group's leave-out model and its null threshold.
    pub fn finish(self) -> Result<GroupScorer> {
        let groups = self.groups;
        let mut sites = BTreeMap::new();
        for (site, s) in self.sites {
            let null = s.null.into_items();
            let mut models = Vec::with_capacity(groups);
            for g in 0..groups {
                models.push(leave_out_model(g, &s.fit, &null)?);
            }
            sites.insert(
                site,
                SiteScorer {
                    basis: s.basis,
                    models,
                    rows: vec![0; groups],
                    flagged: vec![0; groups],
                },
            );
        }
        Ok(GroupScorer {
            groups,
            widths: self.widths,
            sites,
            computations: vec![HashSet::new(); groups],
            rows: vec![0; groups],
        })
    }
}

/// Checks a push of `rows` of `site` from `group` (of `groups`).
fn check_push<S>(
    widths: &BTreeMap<String, usize>,
    groups: usize,
    group: usize,
    site: &str,
    ids: &[S],
    rows: &[f32],
) -> Result<()> {
    check_ids(width_of(widths, site)?, ids, rows)?;
    check_group(group, groups)
}

fn check_group(group: usize, groups: usize) -> Result<()> {
    if group >= groups {
        return Err(Error::InvalidOption(format!(
            "reference check: group {group} of {groups}"
        )));
    }
    Ok(())
}

/// Group `g`'s leave-out model at one site and the score above which its rows are flagged, or
/// `None` when the other groups hold too little data for one (too few fit rows, or too few null
/// rows for a p-value of `α`).
fn leave_out_model(
    g: usize,
    fit: &[SufficientStats],
    null: &[(usize, Vec<f32>)],
) -> Result<Option<(GaussianDetector, f64)>> {
    let f = fit[0].dim();
    let mut merged = SufficientStats::new(f);
    for (h, part) in fit.iter().enumerate() {
        if h != g {
            merged.merge(part)?;
        }
    }
    let rows: Vec<f32> = null
        .iter()
        .filter(|(h, _)| *h != g)
        .flat_map(|(_, x)| x.iter().copied())
        .collect();
    let n = rows.len() / f.max(1);
    // With n null scores, a row is flagged when at most m = floor(α (n + 1)) - 1 of them are at
    // least its score: its conformal p-value (1 + #{null >= s}) / (n + 1) is then <= α.
    let m = ((CHECK_ALPHA * (n as f64 + 1.0)).floor() as usize).checked_sub(1);
    let (Some(m), true) = (m, merged.count() >= MIN_FIT_ROWS) else {
        return Ok(None);
    };
    let model = match GaussianDetector::fit(&merged, &feature_options()) {
        Ok(model) => model,
        Err(Error::NotEnoughData(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut scores = model.score_batch(&rows)?;
    scores.sort_by(|a, b| b.total_cmp(a));
    Ok(Some((model, scores[m])))
}

#[derive(Debug)]
struct SiteScorer {
    basis: SiteBasis,
    models: Vec<Option<(GaussianDetector, f64)>>,
    rows: Vec<u64>,
    flagged: Vec<u64>,
}

/// Pass 3: scores every row of each group under its leave-out model.
#[derive(Debug)]
pub struct GroupScorer {
    groups: usize,
    widths: BTreeMap<String, usize>,
    sites: BTreeMap<String, SiteScorer>,
    /// Per group: hashes of its computation ids.
    computations: Vec<HashSet<u64>>,
    rows: Vec<u64>,
}

impl GroupScorer {
    /// Scores rows of `site` from `group`.
    pub fn push<S: AsRef<str>>(
        &mut self,
        group: usize,
        site: &str,
        ids: &[S],
        rows: &[f32],
    ) -> Result<()> {
        check_push(&self.widths, self.groups, group, site, ids, rows)?;
        self.rows[group] += ids.len() as u64;
        let seen = &mut self.computations[group];
        for id in ids {
            let mut h = DefaultHasher::new();
            id.as_ref().hash(&mut h);
            seen.insert(h.finish());
        }
        let Some(s) = self.sites.get_mut(site) else {
            return Ok(());
        };
        let Some((model, threshold)) = &s.models[group] else {
            return Ok(());
        };
        let feats = s.basis.project(rows);
        let scores = model.score_batch(&feats)?;
        s.rows[group] += ids.len() as u64;
        s.flagged[group] += scores.iter().filter(|&&x| x > *threshold).count() as u64;
        Ok(())
    }

    /// What the check found, one entry per group.
    pub fn finish(self) -> CheckReport {
        let mut groups: Vec<GroupCheck> = (0..self.groups)
            .map(|g| GroupCheck {
                rows: self.rows[g],
                computations: self.computations[g].len() as u64,
                sites: Vec::new(),
                p_value: None,
                suspect: false,
            })
            .collect();
        for (site, s) in &self.sites {
            for (g, check) in groups.iter_mut().enumerate() {
                if s.models[g].is_none() || s.rows[g] == 0 {
                    continue;
                }
                let share = s.flagged[g] as f64 / s.rows[g] as f64;
                let n = check.computations.max(1);
                let k = (share * n as f64).round() as u64;
                check.sites.push(SiteCheck {
                    site: site.clone(),
                    rows: s.rows[g],
                    flagged: s.flagged[g],
                    share,
                    p_value: binomial_tail(n, k, CHECK_ALPHA),
                });
            }
        }
        let tests: usize = groups.iter().map(|g| g.sites.len()).sum();
        for g in &mut groups {
            // Worst site first: the smallest p-value, then the largest share.
            g.sites.sort_by(|a, b| {
                a.p_value
                    .total_cmp(&b.p_value)
                    .then(b.share.total_cmp(&a.share))
            });
            if let Some(worst) = g.sites.first() {
                let p = (worst.p_value * tests as f64).min(1.0);
                g.p_value = Some(p);
                g.suspect =
                    p < CHECK_SUSPECT_LEVEL && worst.share >= CHECK_MIN_SHARE_FACTOR * CHECK_ALPHA;
            }
        }
        CheckReport {
            alpha: CHECK_ALPHA,
            groups,
        }
    }
}

/// `P(X >= k)` for `X ~ Binomial(n, p)`, summed in log space from `k` up (exact to rounding).
pub fn binomial_tail(n: u64, k: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    // ln C(n, k) = Σ_{i=1..k} ln((n - k + i) / i)
    let ln_choose: f64 = (1..=k)
        .map(|i| ((n - k + i) as f64).ln() - (i as f64).ln())
        .sum();
    let (lp, lq) = (p.ln(), (-p).ln_1p());
    let mut term = (ln_choose + k as f64 * lp + (n - k) as f64 * lq).exp();
    let mut sum = term;
    let ratio = p / (1.0 - p);
    for i in k..n {
        term *= (n - i) as f64 / (i + 1) as f64 * ratio;
        sum += term;
        if term < sum * 1e-17 {
            break;
        }
    }
    sum.min(1.0)
}

/// What the reference check found.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckReport {
    /// The per-row level ([`CHECK_ALPHA`]).
    pub alpha: f64,
    /// In group order.
    pub groups: Vec<GroupCheck>,
}

/// One group's result.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupCheck {
    /// Its rows, over all sites, and its computations.
    pub rows: u64,
    pub computations: u64,
    /// Each site where it was scored, worst first (empty when the other groups hold too little
    /// data for a leave-out model anywhere).
    pub sites: Vec<SiteCheck>,
    /// The worst site's p-value, Bonferroni-adjusted over every (group, site) tested.
    pub p_value: Option<f64>,
    /// See the module docs.
    pub suspect: bool,
}

/// One group at one site.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SiteCheck {
    pub site: String,
    /// Its rows at the site and those flagged at `α`.
    pub rows: u64,
    pub flagged: u64,
    pub share: f64,
    /// The binomial tail of the share over the group's computations, unadjusted.
    pub p_value: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use actwatch_testkit::Rng;

    #[test]
    fn binomial_tail_matches_the_naive_sum() {
        fn naive(n: u64, k: u64, p: f64) -> f64 {
            let mut c = 1.0f64;
            let mut total = 0.0;
            for i in 0..=n {
                if i > 0 {
                    c = c * (n - i + 1) as f64 / i as f64;
                }
                if i >= k {
                    total += c * p.powi(i as i32) * (1.0 - p).powi((n - i) as i32);
                }
            }
            total
        }
        for &(n, k, p) in &[
            (10, 0, 0.3),
            (10, 3, 0.3),
            (50, 5, 0.01),
            (100, 1, 0.01),
            (40, 40, 0.5),
        ] {
            let (a, b) = (binomial_tail(n, k, p), naive(n, k, p));
            assert!(
                (a - b).abs() <= 1e-12 * b.max(1e-300) + 1e-15,
                "{n} {k} {p}: {a} vs {b}"
            );
        }
        assert_eq!(binomial_tail(5, 6, 0.5), 0.0);
        // Far in the tail it is tiny (or underflows to 0), never NaN.
        let t = binomial_tail(1000, 500, 0.01);
        assert!((0.0..1e-200).contains(&t), "{t}");
    }

    #[test]
    fn groups_merge_into_consecutive_blocks() {
        assert_eq!(merge_groups(3, 32), vec![0, 1, 2]);
        let m = merge_groups(100, 32);
        assert_eq!(m.len(), 100);
        assert_eq!(*m.last().unwrap(), 31);
        assert!(m.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1));
    }

    /// Rows of `n` computations with `per` rows each at one site: a Gaussian cloud in `d`
    /// dimensions around `centre`, spread `sd`.
    fn cloud(
        rng: &mut Rng,
        tag: &str,
        n: usize,
        per: usize,
        d: usize,
        centre: &[f32],
        sd: f32,
    ) -> (Vec<String>, Vec<f32>) {
        assert_eq!(centre.len(), d);
        let mut ids = Vec::new();
        let mut rows = Vec::new();
        for c in 0..n {
            for _ in 0..per {
                ids.push(format!("{tag}-{c}"));
                rows.extend(centre.iter().map(|&m| m + sd * rng.normal() as f32));
            }
        }
        (ids, rows)
    }

    fn run(groups: &[(Vec<String>, Vec<f32>)], d: usize) -> CheckReport {
        let sites = vec![("s".to_string(), d)];
        let mut sampler = BasisSampler::new(groups.len(), &sites).unwrap();
        for (ids, rows) in groups {
            sampler.push("s", ids, rows).unwrap();
        }
        let mut acc = sampler.finish().unwrap();
        for (g, (ids, rows)) in groups.iter().enumerate() {
            acc.push(g, "s", ids, rows).unwrap();
        }
        let mut scorer = acc.finish().unwrap();
        for (g, (ids, rows)) in groups.iter().enumerate() {
            // In two batches, as a reader would cut them.
            let d2 = ids.len() / 2;
            scorer.push(g, "s", &ids[..d2], &rows[..d2 * d]).unwrap();
            scorer.push(g, "s", &ids[d2..], &rows[d2 * d..]).unwrap();
        }
        scorer.finish()
    }

    #[test]
    fn clean_groups_are_not_suspect_and_flag_near_alpha() {
        let d = 48;
        let mut rng = Rng::new(7);
        let centre: Vec<f32> = (0..d).map(|i| if i == 0 { 3.0 } else { 0.0 }).collect();
        let groups: Vec<_> = (0..6)
            .map(|g| cloud(&mut rng, &format!("g{g}"), 400, 2, d, &centre, 1.0))
            .collect();
        let report = run(&groups, d);
        assert_eq!(report.groups.len(), 6);
        let mut total = (0u64, 0u64);
        for g in &report.groups {
            assert!(!g.suspect, "{g:?}");
            assert_eq!(g.rows, 800);
            assert_eq!(g.computations, 400);
            let s = &g.sites[0];
            total.0 += s.flagged;
            total.1 += s.rows;
        }
        let share = total.0 as f64 / total.1 as f64;
        assert!(share < 3.0 * CHECK_ALPHA, "flagged {share}");
    }

    #[test]
    fn an_injected_cluster_is_suspect_and_the_clean_groups_are_not() {
        let d = 48;
        let mut rng = Rng::new(11);
        let centre: Vec<f32> = (0..d).map(|i| if i == 0 { 3.0 } else { 0.0 }).collect();
        let mut groups: Vec<_> = (0..5)
            .map(|g| cloud(&mut rng, &format!("g{g}"), 300, 1, d, &centre, 1.0))
            .collect();
        // The poison: 60 computations from elsewhere, in one ingest of their own.
        let other: Vec<f32> = (0..d).map(|i| if i == 1 { 3.0 } else { 0.0 }).collect();
        groups.insert(2, cloud(&mut rng, "p", 60, 1, d, &other, 1.0));
        let report = run(&groups, d);
        for (g, check) in report.groups.iter().enumerate() {
            assert_eq!(check.suspect, g == 2, "group {g}: {check:?}");
        }
        assert!(
            report.groups[2].sites[0].share > 0.5,
            "{:?}",
            report.groups[2]
        );
    }

    #[test]
    fn wide_sites_use_the_gram_matrix_and_agree_in_verdict() {
        // d larger than the sample: the basis comes from the Gram matrix. Little isotropic noise
        // around the centres, as in real activations (most variance in few directions).
        let d = 3000;
        let mut rng = Rng::new(5);
        let centre: Vec<f32> = (0..d).map(|i| if i < 3 { 2.0 } else { 0.0 }).collect();
        let mut groups: Vec<_> = (0..3)
            .map(|g| cloud(&mut rng, &format!("g{g}"), 150, 1, d, &centre, 0.1))
            .collect();
        let other: Vec<f32> = (0..d)
            .map(|i| if (3..6).contains(&i) { 2.0 } else { 0.0 })
            .collect();
        groups.push(cloud(&mut rng, "p", 40, 1, d, &other, 0.1));
        let report = run(&groups, d);
        let verdicts: Vec<bool> = report.groups.iter().map(|g| g.suspect).collect();
        assert_eq!(verdicts, vec![false, false, false, true], "{report:?}");
    }

    #[test]
    fn bad_input_is_refused_not_panicked_on() {
        let sites = vec![("s".to_string(), 4)];
        assert!(BasisSampler::new(1, &sites).is_err());
        assert!(BasisSampler::new(CHECK_MAX_GROUPS + 1, &sites).is_err());
        let mut s = BasisSampler::new(2, &sites).unwrap();
        assert!(s.push("t", &["a"], &[0.0; 4]).is_err());
        assert!(s.push("s", &["a"], &[0.0; 3]).is_err());
        assert!(s.push("s", &["a", "b"], &[0.0; 4]).is_err());
        let mut acc = s.finish().unwrap();
        // No rows anywhere: the site is left out, pushes are accepted and ignored.
        acc.push(1, "s", &["a"], &[1.0; 4]).unwrap();
        assert!(acc.push(2, "s", &["a"], &[1.0; 4]).is_err());
        let report = acc.finish().unwrap().finish();
        assert!(report
            .groups
            .iter()
            .all(|g| !g.suspect && g.sites.is_empty()));
    }
}
