//! Length-stratified (Mondrian) calibration of the fused statistic.
//!
//! A computation's fused statistic is calibrated against the calibration computations. With
//! per-token traces, computations differ in length, and most token aggregates grow with it (the
//! maximum of more tokens is larger): one calibration for all lengths keeps the false-positive
//! rate on average but over-flags long computations and under-flags short ones. Mondrian
//! conformal prediction calibrates each computation only against calibration computations of a
//! similar length, so the guarantee holds within every length stratum.
//!
//! Strata are quantiles of the calibration computations' lengths (a computation's length is the
//! largest number of traces it has at one site: its tokens; 1 for pooled traces), at most
//! `strata` of them, each with at least `min_per` computations (so each can reach the target
//! rate): ties and small strata merge. Pooled monitors, whose computations all have the same
//! length, get one stratum, exactly the unstratified calibration.

use crate::calibration::Calibration;
use crate::{Error, Result};

/// Calibrations of the fused statistic per length stratum.
///
/// Deserialisation checks the shape (one calibration per stratum, bounds ascending): an artifact
/// that decodes is one that scores.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "LengthStrataRepr")]
pub struct LengthStrata {
    /// Inclusive upper bound of every stratum's lengths but the last one's, ascending.
    upper: Vec<u64>,
    /// One per stratum, shortest first.
    calibrations: Vec<Calibration>,
}

/// What [`LengthStrata`] serialises as (the same fields), checked on the way in.
#[derive(serde::Deserialize)]
struct LengthStrataRepr {
    upper: Vec<u64>,
    calibrations: Vec<Calibration>,
}

impl TryFrom<LengthStrataRepr> for LengthStrata {
    type Error = Error;

    fn try_from(r: LengthStrataRepr) -> Result<Self> {
        if r.calibrations.len() != r.upper.len() + 1 {
            return Err(Error::InvalidOption(format!(
                "corrupt length strata: {} calibrations for {} bounds",
                r.calibrations.len(),
                r.upper.len()
            )));
        }
        if r.upper.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::InvalidOption(
                "corrupt length strata: bounds not ascending".into(),
            ));
        }
        Ok(Self {
            upper: r.upper,
            calibrations: r.calibrations,
        })
    }
}

impl LengthStrata {
    /// One stratum: every length calibrated together.
    pub fn single(calibration: Calibration) -> Self {
        Self {
            upper: Vec::new(),
            calibrations: vec![calibration],
        }
    }

    /// Strata from the calibration computations' fused `scores` and `lengths` (see the module
    /// documentation); `strata` 0 or 1 means one.
    pub fn fit(scores: &[f64], lengths: &[u64], strata: usize, min_per: usize) -> Result<Self> {
        if scores.len() != lengths.len() {
            return Err(Error::InvalidOption(format!(
                "{} scores for {} lengths",
                scores.len(),
                lengths.len()
            )));
        }
        let n = scores.len();
        let k = strata.min(n / min_per.max(1)).max(1);
        let mut sorted = lengths.to_vec();
        sorted.sort_unstable();
        // candidate bounds: the largest length of each quantile group but the last
        let mut upper: Vec<u64> = (1..k).map(|b| sorted[b * n / k - 1]).collect();
        upper.dedup();
        // merge strata with too few computations into their longer neighbour (the last one
        // into its shorter neighbour)
        let count = |upper: &[u64]| -> Vec<usize> {
            let mut c = vec![0; upper.len() + 1];
            for &l in lengths {
                c[upper.partition_point(|&u| u < l)] += 1;
            }
            c
        };
        loop {
            let c = count(&upper);
            let Some(i) = c.iter().position(|&x| x < min_per) else {
                break;
            };
            if upper.is_empty() {
                break;
            }
            upper.remove(i.min(upper.len() - 1));
        }
        let mut groups: Vec<Vec<f64>> = vec![Vec::new(); upper.len() + 1];
        for (&s, &l) in scores.iter().zip(lengths) {
            groups[upper.partition_point(|&u| u < l)].push(s);
        }
        let calibrations = groups
            .into_iter()
            .map(Calibration::new)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            upper,
            calibrations,
        })
    }

    /// Number of strata.
    pub fn len(&self) -> usize {
        self.calibrations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calibrations.is_empty()
    }

    /// Calibration computations over all strata.
    pub fn computations(&self) -> usize {
        self.calibrations.iter().map(Calibration::len).sum()
    }

    /// Inclusive upper length bound of every stratum but the last.
    pub fn upper_bounds(&self) -> &[u64] {
        &self.upper
    }

    pub fn calibrations(&self) -> &[Calibration] {
        &self.calibrations
    }

    /// The stratum of computations of `length`.
    pub fn stratum(&self, length: u64) -> usize {
        self.upper.partition_point(|&u| u < length)
    }

    /// The calibration of computations of `length`.
    pub fn calibration(&self, length: u64) -> &Calibration {
        &self.calibrations[self.stratum(length)]
    }

    /// Conformal p-value of a fused statistic among calibration computations of its stratum.
    pub fn p_value(&self, score: f64, length: u64) -> f64 {
        self.calibration(length).p_value(score)
    }

    /// The p-value of a calibration member (statistic `score`, of `length`) judged against the
    /// other members of its stratum: `(1 + #{others >= s}) / n = #{all >= s} / n`, counted
    /// exactly (a round trip through [`Calibration::p_value`] can round just above a target).
    pub fn member_p_value(&self, score: f64, length: u64) -> f64 {
        let c = self.calibration(length);
        let at_least = c.len() - c.scores().partition_point(|&x| x < score);
        at_least as f64 / c.len() as f64
    }

    /// Whether a computation of `length` so far, whose statistic can only grow, is already
    /// flagged at `fpr` whatever length it ends at: in its stratum and every longer one.
    pub fn flagged_at_any_longer(&self, score: f64, length: u64, fpr: f64) -> bool {
        self.calibrations[self.stratum(length)..]
            .iter()
            .all(|c| c.p_value(score) <= fpr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strata_are_length_quantiles_with_enough_computations_each() {
        // lengths 1..=400, scores = length: four strata of 100
        let lengths: Vec<u64> = (1..=400).collect();
        let scores: Vec<f64> = lengths.iter().map(|&l| l as f64).collect();
        let s = LengthStrata::fit(&scores, &lengths, 4, 100).unwrap();
        assert_eq!(s.upper_bounds(), &[100, 200, 300]);
        assert_eq!(s.len(), 4);
        assert!(s.calibrations().iter().all(|c| c.len() == 100));
        assert_eq!(
            (
                s.stratum(1),
                s.stratum(100),
                s.stratum(101),
                s.stratum(10_000)
            ),
            (0, 0, 1, 3)
        );
        // p-value within the stratum: 250 is the 51st of 201..=300 from the top
        assert_eq!(s.p_value(250.0, 250), (1.0 + 51.0) / 101.0);
        // too few for four strata of 150: two
        let s = LengthStrata::fit(&scores, &lengths, 4, 150).unwrap();
        assert_eq!(s.upper_bounds(), &[200]);
        // one length only: one stratum, the plain calibration
        let s = LengthStrata::fit(&scores, &[7; 400], 4, 10).unwrap();
        assert_eq!(
            s,
            LengthStrata::single(Calibration::new(scores.clone()).unwrap())
        );
    }

    #[test]
    fn ties_and_small_strata_merge() {
        // 300 of length 5, 50 of length 6, 50 of length 9
        let lengths: Vec<u64> = [vec![5; 300], vec![6; 50], vec![9; 50]].concat();
        let scores: Vec<f64> = (0..400).map(f64::from).collect();
        let s = LengthStrata::fit(&scores, &lengths, 4, 60).unwrap();
        // quartile bounds 5, 5, 5 dedup to [5]; the stratum above holds 100 >= 60
        assert_eq!(s.upper_bounds(), &[5]);
        assert_eq!(s.calibrations()[0].len(), 300);
        let s = LengthStrata::fit(&scores, &lengths, 4, 120).unwrap();
        assert_eq!(s.len(), 1);
    }

    /// Regression (found by the fuzz suite, `crates/actwatch-io/tests/fuzz.rs`): strata decoded
    /// from a checksummed but hostile artifact with no calibration (or one too few) panicked
    /// when a computation was scored; now they are refused when decoded.
    #[test]
    fn decoding_checks_the_shape() {
        let s = LengthStrata::fit(&[1.0, 2.0, 3.0, 4.0], &[1, 1, 2, 2], 2, 2).unwrap();
        assert_eq!(s.len(), 2);
        let bytes = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LengthStrata>(&bytes).unwrap(), s);
        for bad in [
            r#"{"upper": [], "calibrations": []}"#,
            r#"{"upper": [1], "calibrations": [{"scores": [1.0]}]}"#,
            r#"{"upper": [2, 1], "calibrations": [{"scores": [1.0]}, {"scores": [1.0]}, {"scores": [1.0]}]}"#,
        ] {
            let e = serde_json::from_str::<LengthStrata>(bad).unwrap_err();
            assert!(e.to_string().contains("corrupt length strata"), "{e}");
        }
    }

    #[test]
    fn an_early_flag_needs_every_longer_stratum() {
        let lengths: Vec<u64> = (1..=200).collect();
        // long computations score higher
        let scores: Vec<f64> = lengths.iter().map(|&l| l as f64).collect();
        let s = LengthStrata::fit(&scores, &lengths, 2, 50).unwrap();
        let fpr = 0.05;
        // 99.5 is extreme among lengths <= 100 but ordinary among longer ones
        assert!(s.p_value(99.5, 50) <= fpr);
        assert!(!s.flagged_at_any_longer(99.5, 50, fpr));
        assert!(s.flagged_at_any_longer(199.5, 50, fpr));
    }
}
