//! Split-conformal calibration of one raw score.
//!
//! Scores of held-out trusted data are kept sorted; a fresh score's p-value is, by definition,
//! `(1 + #{c >= s}) / (n + 1)`, so flagging `p <= α` has false-positive rate at most α on fresh
//! in-distribution data (exchangeability), whatever the score's scale.
//!
//! Key decision: the exact conformal p-value (a step function with floor `1/(n+1)`) decides flags,
//! but it is a poor *fusion ingredient*: every score beyond the calibration maximum ties at the
//! floor. [`Calibration::smooth_neg_log_p`] therefore provides a continuous, monotone version
//! (linear between order statistics, exponential tail fitted to the top scores, computed in log
//! space) used only inside fused statistics, which are themselves calibrated conformally, so the
//! smoothing changes power, never the guarantee.

use crate::{Error, Result};

/// Calibration of one score: the sorted calibration scores and cached sums for the tail fit.
///
/// Serialised as the scores alone; deserialisation re-validates them and rebuilds the rest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "CalibrationRepr", into = "CalibrationRepr")]
pub struct Calibration {
    /// Ascending, finite, non-empty.
    sorted: Vec<f64>,
    /// `top_sums[j]` = sum of the j largest scores, `j = 0..=min(n, tail_size(n) + 1)`.
    top_sums: Vec<f64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CalibrationRepr {
    scores: Vec<f64>,
}

impl TryFrom<CalibrationRepr> for Calibration {
    type Error = Error;
    fn try_from(r: CalibrationRepr) -> Result<Self> {
        Calibration::new(r.scores)
    }
}

impl From<Calibration> for CalibrationRepr {
    fn from(c: Calibration) -> Self {
        CalibrationRepr { scores: c.sorted }
    }
}

/// Number of top scores the exponential tail is fitted to for `n` calibration scores:
/// `max(10, ceil(0.05 n))`, capped at `n - 1`.
fn tail_size(n: usize) -> usize {
    10usize.max(n.div_ceil(20)).min(n.saturating_sub(1))
}

/// The calibration scores, possibly with one entry left out (leave-one-out view).
struct View<'a> {
    cal: &'a Calibration,
    skip: Option<usize>,
}

impl View<'_> {
    fn len(&self) -> usize {
        self.cal.sorted.len() - usize::from(self.skip.is_some())
    }

    fn get(&self, i: usize) -> f64 {
        match self.skip {
            Some(r) if i >= r => self.cal.sorted[i + 1],
            _ => self.cal.sorted[i],
        }
    }

    /// First index whose value is >= x.
    fn lower_bound(&self, x: f64) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.get(mid) < x {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Sum of the `m` largest values (`m + 1 < top_sums.len()`).
    fn top_sum(&self, m: usize) -> f64 {
        let n = self.cal.sorted.len();
        match self.skip {
            // the left-out entry is among the m + 1 largest: take those and remove it
            Some(r) if r + m + 1 >= n => self.cal.top_sums[m + 1] - self.cal.sorted[r],
            _ => self.cal.top_sums[m],
        }
    }

    /// `-ln` of the conformal p-value at a value `v` of the view: `(1 + #{c >= v}) / (N + 1)`.
    fn knot_neg_log_p(&self, v: f64) -> f64 {
        let n = self.len();
        let count = n - self.lower_bound(v);
        ((n + 1) as f64).ln() - ((1 + count) as f64).ln()
    }

    fn knot_p(&self, v: f64) -> f64 {
        let n = self.len();
        (1 + n - self.lower_bound(v)) as f64 / (n + 1) as f64
    }

    fn smooth_neg_log_p(&self, s: f64) -> f64 {
        let n = self.len();
        if n == 0 || s.is_nan() {
            return 0.0;
        }
        let m = tail_size(n);
        let t = self.get(n - 1 - m);
        if s > t {
            let beta = self.tail_scale(m, t);
            let nlp = self.knot_neg_log_p(t) + (s - t) / beta;
            return nlp.min(f64::MAX);
        }
        let lo = self.get(0);
        if s <= lo {
            return 0.0;
        }
        // lo < s <= t: s lies in (v_a, v_b], two consecutive distinct values of the view.
        let ib = self.lower_bound(s);
        let vb = self.get(ib);
        if vb == s {
            return self.knot_neg_log_p(s);
        }
        let va = self.get(ib - 1);
        let (pa, pb) = (self.knot_p(va), self.knot_p(vb));
        let p = pa + (pb - pa) * ((s - va) / (vb - va));
        -p.ln()
    }

    /// β: mean excess of the m largest values over t, guarded to stay positive and finite.
    fn tail_scale(&self, m: usize, t: f64) -> f64 {
        if m > 0 {
            let beta = self.top_sum(m) / m as f64 - t;
            if beta > 0.0 && beta.is_finite() {
                return beta;
            }
        }
        // Degenerate tops (all equal to t, or a single score): the mean gap of the whole set,
        // else a small scale relative to |t|.
        let n = self.len();
        let gap = (self.get(n - 1) - self.get(0)) / n as f64;
        if gap > 0.0 && gap.is_finite() {
            gap
        } else {
            (1e-9 * t.abs().max(1.0)).max(f64::MIN_POSITIVE)
        }
    }
}

/// Smallest f64 strictly greater than finite `x` (`f64::next_up` needs Rust 1.86).
fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let bits = x.to_bits();
    f64::from_bits(if x > 0.0 { bits + 1 } else { bits - 1 })
}

impl Calibration {
    /// Calibration from held-out scores (any order). [`Error::NotEnoughData`] when empty,
    /// [`Error::Input`] on NaN/Inf.
    pub fn new(mut scores: Vec<f64>) -> Result<Self> {
        if scores.is_empty() {
            return Err(Error::NotEnoughData(
                "calibration needs at least one score".into(),
            ));
        }
        if let Some(i) = scores.iter().position(|x| !x.is_finite()) {
            return Err(actwatch_core::Error::Malformed(format!(
                "calibration score {i} is not finite ({})",
                scores[i]
            ))
            .into());
        }
        scores.sort_by(f64::total_cmp);
        let n = scores.len();
        let top = (tail_size(n) + 1).min(n);
        let mut top_sums = Vec::with_capacity(top + 1);
        top_sums.push(0.0);
        let mut acc = 0.0;
        for &c in scores.iter().rev().take(top) {
            acc += c;
            top_sums.push(acc);
        }
        Ok(Self {
            sorted: scores,
            top_sums,
        })
    }

    /// Number of calibration scores.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Always false: a calibration holds at least one score.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The calibration scores, ascending.
    pub fn scores(&self) -> &[f64] {
        &self.sorted
    }

    /// Conformal p-value by definition: `(1 + #{c >= s}) / (n + 1)` (binary search). A NaN score
    /// gets 1 (nothing is learnt from it).
    pub fn p_value(&self, s: f64) -> f64 {
        let n = self.sorted.len();
        (1 + self.count_at_least(s)) as f64 / (n + 1) as f64
    }

    fn count_at_least(&self, s: f64) -> usize {
        if s.is_nan() {
            return self.sorted.len();
        }
        self.sorted.len() - self.sorted.partition_point(|&c| c < s)
    }

    /// Smallest threshold t such that flagging `s >= t` has calibration FPR <= `fpr`: the flag
    /// rule `p_value(s) <= fpr` on the raw score (for every non-NaN s, `s >= t` iff
    /// `p_value(s) <= fpr`). `f64::INFINITY` when `fpr < 1/(n+1)` (or NaN): nothing can be
    /// flagged; `f64::NEG_INFINITY` when `fpr >= 1`: everything is.
    pub fn threshold(&self, fpr: f64) -> f64 {
        let n = self.sorted.len();
        let p_of = |count: usize| (1 + count) as f64 / (n + 1) as f64;
        // j = the largest count c in 0..=n with p_of(c) <= fpr (same arithmetic as p_value).
        if fpr.is_nan() || p_of(0) > fpr {
            return f64::INFINITY;
        }
        let guess = (fpr * (n + 1) as f64 - 1.0).floor();
        let mut j = if guess >= n as f64 {
            n
        } else {
            guess.max(0.0) as usize
        };
        while j > 0 && p_of(j) > fpr {
            j -= 1;
        }
        while j < n && p_of(j + 1) <= fpr {
            j += 1;
        }
        if j >= n {
            return f64::NEG_INFINITY;
        }
        // count(s) <= j  iff  s > c, c the (j+1)-th largest score.
        next_up(self.sorted[n - 1 - j])
    }

    /// `-ln` of a *smoothed* p-value, a fusion ingredient only: continuous, non-decreasing in s,
    /// `0` at and below the smallest calibration score. In the bulk it interpolates linearly
    /// between the conformal p-values at consecutive distinct calibration scores (so it lies
    /// within `1/(n+1)` above the conformal p-value). Beyond `t`, the (m+1)-th largest score
    /// (`m = max(10, ceil(0.05 n))` capped at `n - 1`), it is an exponential tail
    /// `p = p_t · exp(-(s - t)/β)` with β the mean excess of the top m over t, evaluated in log
    /// space: scores far beyond every calibration score get distinct, finite, growing values
    /// (capped at `f64::MAX` only for absurd ranges). NaN gives 0.
    ///
    /// `exclude_self`: `s` is itself one of the calibration scores; compute as if one copy of it
    /// were absent (leave-one-out), so calibration members are treated like fresh points. If `s`
    /// is not a calibration score, the flag is ignored.
    pub fn smooth_neg_log_p(&self, s: f64, exclude_self: bool) -> f64 {
        let skip = if exclude_self && !s.is_nan() {
            // the last copy of s (any copy leaves the same multiset)
            let r = self.sorted.partition_point(|&c| c <= s);
            (r > 0 && self.sorted[r - 1] == s).then(|| r - 1)
        } else {
            None
        };
        View { cal: self, skip }.smooth_neg_log_p(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use actwatch_testkit::Rng;

    fn p_by_scan(scores: &[f64], s: f64) -> f64 {
        let count = scores.iter().filter(|&&c| c >= s).count();
        (1 + count) as f64 / (scores.len() + 1) as f64
    }

    /// Scores on a coarse grid, so ties are common.
    fn tied_scores() -> impl Strategy<Value = Vec<f64>> {
        prop::collection::vec((-20i32..20).prop_map(|x| f64::from(x) * 0.5), 1..60)
    }

    proptest! {
        #[test]
        fn p_value_matches_definition(scores in tied_scores(), s in -25.0f64..25.0, grid in -25i32..25) {
            let cal = Calibration::new(scores.clone()).unwrap();
            prop_assert_eq!(cal.p_value(s), p_by_scan(&scores, s));
            let on_grid = f64::from(grid) * 0.5;
            prop_assert_eq!(cal.p_value(on_grid), p_by_scan(&scores, on_grid));
        }

        #[test]
        fn threshold_is_the_flag_rule(scores in tied_scores(), fpr in 0.0f64..1.2, grid in -25i32..25, s in -25.0f64..25.0) {
            let cal = Calibration::new(scores.clone()).unwrap();
            let t = cal.threshold(fpr);
            let mut probes = vec![s, f64::from(grid) * 0.5, t, next_up(t), -next_up(-t)];
            probes.extend(scores.iter().copied());
            probes.extend(scores.iter().map(|&c| next_up(c)));
            for x in probes.into_iter().filter(|x| x.is_finite()) {
                prop_assert_eq!(x >= t, cal.p_value(x) <= fpr, "x = {}, t = {}, fpr = {}", x, t, fpr);
            }
            // smallest: the largest finite value below t is not flagged (unless t is -inf)
            if t.is_finite() {
                let below = -next_up(-t);
                prop_assert!(cal.p_value(below) > fpr);
            }
        }

        #[test]
        fn smooth_is_monotone_and_leave_one_out_is_exact(scores in tied_scores(), a in -30.0f64..30.0, b in -30.0f64..30.0, pick in 0usize..60) {
            let cal = Calibration::new(scores.clone()).unwrap();
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let (fl, fh) = (cal.smooth_neg_log_p(lo, false), cal.smooth_neg_log_p(hi, false));
            prop_assert!(fl <= fh, "{} at {} > {} at {}", fl, lo, fh, hi);
            prop_assert!(fl >= 0.0 && fh.is_finite());
            // leave-one-out equals the calibration rebuilt without that copy
            let i = pick % scores.len();
            let s = scores[i];
            let loo = cal.smooth_neg_log_p(s, true);
            if scores.len() > 1 {
                let mut rest = scores.clone();
                rest.remove(i);
                let reference = Calibration::new(rest).unwrap().smooth_neg_log_p(s, false);
                prop_assert!((loo - reference).abs() <= 1e-12 * (1.0 + reference.abs()), "{} vs {}", loo, reference);
            } else {
                prop_assert_eq!(loo, 0.0);
            }
        }
    }

    #[test]
    fn smooth_matches_conformal_in_the_bulk_and_grows_in_the_tail() {
        let mut rng = Rng::new(42);
        let scores: Vec<f64> = (0..20_000).map(|_| rng.exponential()).collect();
        let cal = Calibration::new(scores.clone()).unwrap();
        let n = scores.len() as f64;
        // bulk: within 1/(n+1) of the conformal p-value, on the p scale
        for i in 0..500 {
            let s = i as f64 * 0.005;
            let p_smooth = (-cal.smooth_neg_log_p(s, false)).exp();
            let p = cal.p_value(s);
            assert!(
                p_smooth >= p - 1e-12 && p_smooth <= p + 1.0 / (n + 1.0) + 1e-12,
                "s = {s}"
            );
        }
        // tail: distinct, finite, growing far beyond every calibration score
        let max = cal.scores()[cal.len() - 1];
        let mut last = cal.smooth_neg_log_p(max, false);
        for s in [max + 1.0, max + 10.0, 1e3, 1e6, 1e9, 1e12] {
            let v = cal.smooth_neg_log_p(s, false);
            assert!(v.is_finite() && v > last, "s = {s}: {v} <= {last}");
            last = v;
        }
        // the fitted tail is sensible for exponential scores: the excesses of the top m over the
        // (m+1)-th largest are i.i.d. Exp(1) (Rényi), so beta = 1 ± 1/sqrt(m) = 1 ± 0.03
        let t_idx = cal.len() - 1 - tail_size(cal.len());
        let t = cal.scores()[t_idx];
        let slope = cal.smooth_neg_log_p(t + 2.0, false) - cal.smooth_neg_log_p(t + 1.0, false);
        assert!((slope - 1.0).abs() < 0.15, "1/beta = {slope}");
        // continuity at t
        let at = cal.smooth_neg_log_p(t, false);
        let after = cal.smooth_neg_log_p(next_up(t), false);
        assert!((after - at).abs() < 1e-9);
        assert_eq!(cal.smooth_neg_log_p(-1.0, false), 0.0);
        assert_eq!(cal.smooth_neg_log_p(f64::NAN, false), 0.0);
    }

    #[test]
    fn degenerate_calibrations_stay_finite_and_monotone() {
        for scores in [vec![3.0], vec![2.0; 50], vec![0.0; 5], vec![1.0, 1.0, 2.0]] {
            let cal = Calibration::new(scores.clone()).unwrap();
            let mut last = -1.0;
            for s in [-1.0, 0.0, 1.0, 2.0, 3.0, 3.5, 10.0, 1e12] {
                let v = cal.smooth_neg_log_p(s, false);
                assert!(v.is_finite() && v >= last, "{scores:?} at {s}: {v}");
                last = v;
                let w = cal.smooth_neg_log_p(s, true);
                assert!(w.is_finite() && w >= 0.0);
            }
            assert!(cal.smooth_neg_log_p(1e12, false) > cal.smooth_neg_log_p(1e11, false));
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            Calibration::new(vec![]),
            Err(Error::NotEnoughData(_))
        ));
        assert!(matches!(
            Calibration::new(vec![1.0, f64::NAN]),
            Err(Error::Input(_))
        ));
        assert!(Calibration::new(vec![f64::INFINITY]).is_err());
    }

    #[test]
    fn threshold_edges() {
        let cal = Calibration::new((1..=99).map(f64::from).collect()).unwrap();
        assert_eq!(cal.threshold(0.001), f64::INFINITY);
        assert_eq!(cal.threshold(f64::NAN), f64::INFINITY);
        assert_eq!(cal.threshold(1.0), f64::NEG_INFINITY);
        // p = (1 + #{c >= s}) / 100 <= 0.05 iff at most 4 scores >= s iff s > 95
        assert_eq!(cal.threshold(0.05), next_up(95.0));
        assert_eq!(cal.p_value(96.0), 0.05);
        assert_eq!(cal.p_value(95.0), 0.06);
    }
}
