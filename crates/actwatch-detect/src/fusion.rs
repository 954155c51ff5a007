//! Fusion: combine evidence (p-values, as `-ln p`) across detectors, sites and tokens into one
//! statistic (higher = more anomalous).
//!
//! Key decision: every statistic works from `-ln p` and stays finite and monotone even for
//! p-values far below `f64::MIN_POSITIVE` (`-ln p` up to 1e6 and beyond), because actwatch does
//! not trust the textbook null distribution of the fused statistic (the p-values are dependent
//! across sites and tokens): it calibrates the fused statistic itself on calibration computations.
//! [`Fusion::combined_p_value`] (the textbook answer under independence) is informative only.

use std::f64::consts::{LN_2, PI};

use crate::{Error, Result};

/// How p-values combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Fusion {
    /// Fisher: `2 Σ -ln p` (chi-square with 2m dof under independence). Rewards consistent
    /// moderate evidence.
    Fisher,
    /// Cauchy combination (Liu & Xie 2020): mean of `tan((0.5 - p)π)`; robust to dependence,
    /// dominated by the smallest p-values.
    Cauchy,
    /// Minimum p with Bonferroni correction: `-ln(m · p_min)`.
    MinP,
}

/// The fusion used when none is asked for: min-p, the strongest single signal. On real transformer
/// activations it kept the false-positive rate closest to target and was the least disturbed by a
/// detector that is worse than chance at some site (docs/experiments/explore_defaults.py); Fisher adds
/// diffuse evidence better but over-counts correlated detectors (the same layer seen twice).
pub const DEFAULT_FUSION: Fusion = Fusion::MinP;

/// Cauchy: p-values are shrunk by this factor before `tan((0.5 - p)π)`, so `p = 1` (a score at or
/// below every calibration score) gives a finite term (`-cot(0.001π) ≈ -318`) instead of `-∞`,
/// without letting one very ordinary input veto strong evidence elsewhere. The shrink is
/// multiplicative, so the statistic stays strictly increasing in every `-ln p` and tiny p-values
/// are unaffected on the log scale (a shift of 0.001 in `-ln p`).
const CAUCHY_P_SHRINK: f64 = 1.0 - 1e-3;

/// Below this shrunk p, `cot(πp)` is computed as `1/(πp)` in log space (relative error < 1e-15).
const CAUCHY_SMALL_P: f64 = 1e-8;

/// Largest `ln` of the Cauchy sum still summed directly (`e^600 · m` stays finite).
const CAUCHY_LOG_DIRECT_MAX: f64 = 600.0;

/// Cauchy's `T`, directly or (when huge) as `ln T`.
enum CauchyT {
    Direct(f64),
    Log(f64),
}

/// An input `-ln p` as used: NaN (no evidence) and negatives (p > 1) count as 0.
fn clean(nlp: f64) -> f64 {
    if nlp > 0.0 {
        nlp
    } else {
        0.0
    }
}

fn cauchy_t(neg_log_p: &[f64]) -> CauchyT {
    let m = neg_log_p.len() as f64;
    // each term: Ok(c) computed directly, Err(ln c) for tiny p (c = cot(πp) ≈ 1/(πp) > 0)
    let terms: Vec<std::result::Result<f64, f64>> = neg_log_p
        .iter()
        .map(|&x| {
            let nlp = clean(x) - CAUCHY_P_SHRINK.ln();
            let p = (-nlp).exp();
            if p > CAUCHY_SMALL_P {
                Ok(1.0 / (PI * p).tan())
            } else {
                Err(nlp - PI.ln())
            }
        })
        .collect();
    let max_log = terms
        .iter()
        .map(|t| match *t {
            Ok(c) if c > 0.0 => c.ln(),
            Ok(_) => f64::NEG_INFINITY,
            Err(l) => l,
        })
        .fold(f64::NEG_INFINITY, f64::max);
    if max_log <= CAUCHY_LOG_DIRECT_MAX {
        let sum: f64 = terms
            .iter()
            .map(|t| match *t {
                Ok(c) => c,
                Err(l) => l.exp(),
            })
            .sum();
        CauchyT::Direct(sum / m)
    } else {
        // Σ c_i = e^L · R with R >= 1; negative terms (|c| <= 318) vanish against e^L > e^600.
        let r: f64 = terms
            .iter()
            .map(|t| match *t {
                Ok(c) => c * (-max_log).exp(),
                Err(l) => (l - max_log).exp(),
            })
            .sum();
        CauchyT::Log(max_log + r.ln() - m.ln())
    }
}

impl Fusion {
    /// Fused statistic from `-ln p` values (higher = more anomalous); NaN and negative entries
    /// count as 0 (p = 1). An empty slice gives 0.
    /// - Fisher: `2 Σ nlp`.
    /// - MinP: `max nlp - ln m` = `-ln(m · p_min)` (may be negative; not clamped).
    /// - Cauchy: `asinh(T)`, a strictly increasing transform of Liu & Xie's
    ///   `T = mean tan((0.5 - p)π)` (with p shrunk by 1 - 1e-3, see the module constants):
    ///   `asinh(T) ≈ T` near 0 and `≈ ln(2T)` for large T, which is evaluated in log space
    ///   (`tan((0.5 - p)π) ≈ 1/(πp)` for tiny p), so it stays finite and strictly increasing for
    ///   `-ln p` up to 1e6 and beyond.
    pub fn statistic(&self, neg_log_p: &[f64]) -> f64 {
        if neg_log_p.is_empty() {
            return 0.0;
        }
        match self {
            Fusion::Fisher => 2.0 * neg_log_p.iter().map(|&x| clean(x)).sum::<f64>(),
            Fusion::MinP => {
                let max = neg_log_p.iter().map(|&x| clean(x)).fold(0.0, f64::max);
                max - (neg_log_p.len() as f64).ln()
            }
            Fusion::Cauchy => match cauchy_t(neg_log_p) {
                CauchyT::Direct(t) => t.asinh(),
                CauchyT::Log(ln_t) => LN_2 + ln_t,
            },
        }
    }

    /// Fuses a computation's slots, `NaN` marking a slot without evidence (no trace there yet).
    /// Fisher and min-p count such a slot as `p = 1` (min-p's Bonferroni factor is the number of
    /// slots the monitor has, not the number present), so their statistic never decreases as
    /// evidence arrives ([`Fusion::is_monotone`]); Cauchy averages the slots present.
    pub fn fuse_slots(&self, slots: &[f64]) -> f64 {
        match self {
            Fusion::Fisher | Fusion::MinP => self.statistic(slots),
            Fusion::Cauchy => {
                let present: Vec<f64> = slots.iter().copied().filter(|x| !x.is_nan()).collect();
                self.statistic(&present)
            }
        }
    }

    /// Whether [`Fusion::fuse_slots`] never decreases when a slot's value rises or an absent slot
    /// gains evidence (Fisher and min-p; not Cauchy, whose mean can fall when a slot arrives).
    pub fn is_monotone(&self) -> bool {
        matches!(self, Fusion::Fisher | Fusion::MinP)
    }

    /// The textbook combined p-value assuming independent inputs (informative only: actwatch
    /// calibrates the fused statistic empirically). Fisher: survival function of chi-square with
    /// 2m dof at `X = 2 Σ nlp`, `e^{-X/2} Σ_{j<m} (X/2)^j / j!`, in log space; Cauchy:
    /// `0.5 - atan(T)/π` (as `atan(1/T)/π` for T > 0, no cancellation); MinP: `min(1, m · p_min)`.
    /// Underflows to 0 for overwhelming evidence. An empty slice gives 1.
    pub fn combined_p_value(&self, neg_log_p: &[f64]) -> f64 {
        if neg_log_p.is_empty() {
            return 1.0;
        }
        let m = neg_log_p.len();
        match self {
            Fusion::Fisher => {
                let x: f64 = neg_log_p.iter().map(|&v| clean(v)).sum();
                if x == 0.0 {
                    return 1.0;
                }
                // ln Σ_{j<m} x^j / j! by log-sum-exp
                let ln_x = x.ln();
                let mut ln_fact = 0.0;
                let mut terms = Vec::with_capacity(m);
                for j in 0..m {
                    if j > 0 {
                        ln_fact += (j as f64).ln();
                    }
                    terms.push(j as f64 * ln_x - ln_fact);
                }
                let top = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let ln_sum = top + terms.iter().map(|&a| (a - top).exp()).sum::<f64>().ln();
                (ln_sum - x).exp().min(1.0)
            }
            Fusion::MinP => {
                let max = neg_log_p.iter().map(|&v| clean(v)).fold(0.0, f64::max);
                ((m as f64).ln() - max).min(0.0).exp()
            }
            Fusion::Cauchy => match cauchy_t(neg_log_p) {
                CauchyT::Direct(t) if t > 0.0 => (1.0 / t).atan() / PI,
                CauchyT::Direct(t) => 0.5 - t.atan() / PI,
                CauchyT::Log(ln_t) => (-ln_t).exp() / PI,
            },
        }
    }

    /// `"fisher"`, `"cauchy"` or `"minp"` (ASCII case-insensitive); [`Error::InvalidOption`] otherwise.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "fisher" => Ok(Fusion::Fisher),
            "cauchy" => Ok(Fusion::Cauchy),
            "minp" => Ok(Fusion::MinP),
            _ => Err(Error::InvalidOption(format!(
                "unknown fusion {name:?} (expected fisher, cauchy or minp)"
            ))),
        }
    }

    /// The name [`Fusion::parse`] accepts.
    pub fn name(&self) -> &'static str {
        match self {
            Fusion::Fisher => "fisher",
            Fusion::Cauchy => "cauchy",
            Fusion::MinP => "minp",
        }
    }
}

impl std::fmt::Display for Fusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Fusion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Fusion::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Fusion; 3] = [Fusion::Fisher, Fusion::Cauchy, Fusion::MinP];

    fn nlp(p: &[f64]) -> Vec<f64> {
        p.iter().map(|p| -p.ln()).collect()
    }

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-300)
    }

    #[test]
    fn fisher_matches_closed_forms() {
        // m = 2: chi-square with 4 dof, survival e^{-X/2} (1 + X/2)
        for p in [[0.5, 0.5], [0.01, 0.2], [1e-10, 0.9], [1.0, 1.0]] {
            let v = nlp(&p);
            let x = Fusion::Fisher.statistic(&v);
            assert!(close(x, -2.0 * (p[0] * p[1]).ln(), 1e-12));
            let expect = (-x / 2.0).exp() * (1.0 + x / 2.0);
            let got = Fusion::Fisher.combined_p_value(&v);
            assert!(close(got, expect, 1e-12), "{p:?}: {got} vs {expect}");
        }
        // m = 1: the p-value itself
        assert!(close(
            Fusion::Fisher.combined_p_value(&nlp(&[0.037])),
            0.037,
            1e-12
        ));
        // m = 3 at X = 10: e^-5 (1 + 5 + 12.5) = 0.124652... (scipy chi2.sf(10, 6))
        let got = Fusion::Fisher.combined_p_value(&[1.0, 2.0, 2.0]);
        assert!(close(got, 0.124_652_019_483_081_6, 1e-12), "{got}");
        // overwhelming evidence: no NaN, underflows gracefully
        let got = Fusion::Fisher.combined_p_value(&[1e6, 3.0]);
        assert!((0.0..1e-300).contains(&got));
    }

    #[test]
    fn cauchy_matches_direct_formula_for_moderate_p() {
        for p in [
            vec![0.5],
            vec![0.01, 0.3, 0.8],
            vec![0.2, 0.2],
            vec![0.001, 0.999, 0.5, 0.05],
            vec![1e-6, 0.4],
        ] {
            let shrunk: Vec<f64> = p.iter().map(|p| p * CAUCHY_P_SHRINK).collect();
            let t: f64 =
                shrunk.iter().map(|p| ((0.5 - p) * PI).tan()).sum::<f64>() / p.len() as f64;
            let v = nlp(&p);
            assert!(
                close(Fusion::Cauchy.statistic(&v), t.asinh(), 1e-9),
                "{p:?}"
            );
            let expect = 0.5 - t.atan() / PI;
            assert!(
                close(Fusion::Cauchy.combined_p_value(&v), expect, 1e-9),
                "{p:?}"
            );
        }
        // one input: the combined p-value is the (shrunk) p-value itself, also for tiny p
        for p in [0.3, 1e-5, 1e-12, 1e-200] {
            let got = Fusion::Cauchy.combined_p_value(&nlp(&[p]));
            assert!(close(got, p * CAUCHY_P_SHRINK, 1e-9), "{p}: {got}");
        }
        // beyond f64: T ≈ e^{nlp} / (π m)
        let s = Fusion::Cauchy.statistic(&[1e4, 0.0]);
        let expect = LN_2 + 1e4 - CAUCHY_P_SHRINK.ln() - PI.ln() - 2f64.ln();
        assert!(close(s, expect, 1e-12), "{s} vs {expect}");
    }

    #[test]
    fn minp_is_bonferroni() {
        let v = nlp(&[0.01, 0.5, 0.2]);
        assert!(close(Fusion::MinP.combined_p_value(&v), 0.03, 1e-12));
        assert!(close(Fusion::MinP.statistic(&v), -(0.03f64).ln(), 1e-12));
        assert_eq!(Fusion::MinP.combined_p_value(&nlp(&[0.9, 0.5])), 1.0);
    }

    #[test]
    fn statistics_are_finite_and_increasing_up_to_1e6() {
        let grid = [
            0.0, 1e-9, 0.1, 0.5, 1.0, 5.0, 18.0, 18.5, 19.0, 30.0, 100.0, 599.0, 600.0, 601.0,
            700.0, 710.0, 800.0, 1e3, 1e4, 1e5, 5e5, 1e6,
        ];
        // Strictly increasing in an input that dominates; against a far larger input an increase
        // can be below one ulp of the statistic (Cauchy's sum is dominated by e^{max nlp}).
        for (others, strict) in [
            (vec![], true),
            (vec![0.0, 0.0], true),
            (vec![2.0, 5.0], true),
            (vec![2.0, 800.0], false),
            (vec![1e6], false),
        ] {
            for f in ALL {
                let mut last = f64::NEG_INFINITY;
                for &x in &grid {
                    let mut v = others.clone();
                    v.push(x);
                    let s = f.statistic(&v);
                    assert!(s.is_finite(), "{f:?} {v:?}");
                    if f == Fusion::MinP || !strict {
                        assert!(s >= last, "{f:?} {v:?}: {s} < {last}");
                    } else {
                        assert!(s > last, "{f:?} {v:?}: {s} <= {last}");
                    }
                    last = s;
                    let p = f.combined_p_value(&v);
                    assert!((0.0..=1.0).contains(&p), "{f:?} {v:?}: p = {p}");
                }
            }
        }
        for f in ALL {
            assert_eq!(f.statistic(&[]), 0.0);
            assert_eq!(f.combined_p_value(&[]), 1.0);
            assert!(f.statistic(&[f64::NAN, 1.0]).is_finite());
        }
    }

    proptest! {
        #[test]
        fn cauchy_is_monotone_in_each_input(v in prop::collection::vec(0.0f64..2000.0, 1..6), i in 0usize..6, d in 1e-3f64..50.0) {
            let i = i % v.len();
            let mut w = v.clone();
            w[i] += d;
            let dominant = w.iter().all(|&x| x <= w[i]);
            if dominant {
                prop_assert!(Fusion::Cauchy.statistic(&w) > Fusion::Cauchy.statistic(&v));
            } else {
                prop_assert!(Fusion::Cauchy.statistic(&w) >= Fusion::Cauchy.statistic(&v));
            }
            prop_assert!(Fusion::Fisher.statistic(&w) > Fusion::Fisher.statistic(&v));
            prop_assert!(Fusion::Cauchy.combined_p_value(&w) <= Fusion::Cauchy.combined_p_value(&v));
            prop_assert!(Fusion::Fisher.combined_p_value(&w) <= Fusion::Fisher.combined_p_value(&v));
        }
    }

    #[test]
    fn parse_round_trip() {
        for f in ALL {
            assert_eq!(Fusion::parse(f.name()).unwrap(), f);
            assert_eq!(f.to_string().parse::<Fusion>().unwrap(), f);
        }
        assert_eq!(Fusion::parse("Fisher").unwrap(), Fusion::Fisher);
        assert!(matches!(
            Fusion::parse("stouffer"),
            Err(Error::InvalidOption(_))
        ));
        assert!(Fusion::parse("").is_err());
        assert_eq!(DEFAULT_FUSION, Fusion::MinP);
    }
}
