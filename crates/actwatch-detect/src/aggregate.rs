//! Token aggregation: how the evidence of a computation's many traces at one slot (site ×
//! detector) becomes one number, before slots fuse.
//!
//! A per-token trace stream gives, per slot, a sequence `x_1, ..., x_n` of smoothed `-ln p`
//! values in the order the traces arrive (for captured traces, position order). An
//! [`Aggregation`] turns it into one value; the monitor then fuses the slots and calibrates the
//! fused statistic on calibration computations aggregated the same way, so the false-positive
//! guarantee holds for every operator.
//!
//! The operators and their exact definitions (each tested against these formulas):
//! - `max`: `max_t x_t` (a pooled computation with one trace per site: its `-ln p`).
//! - `mean`: `(1/n) Σ x_t`.
//! - `ema:α`: `max_t e_t`, `e_t = α x_t + (1 - α) e_{t-1}`, `e_0 = 0`: the peak of an
//!   exponentially smoothed score.
//! - `max_rolling_mean:w`: `max_t (1/w) Σ_{s = t-w+1..t} x_s`, a window that starts before the
//!   first trace counting the missing ones as 0 (so fewer than `w` traces give `Σ x / w`).
//! - `topk_mean:k`: the mean of the `min(k, n)` largest `x_t`.
//!
//! **Monotone** operators (`max`, `ema`, `max_rolling_mean`) are running maxima: their value
//! never decreases as traces arrive, so a computation whose running value already crosses the
//! threshold will be flagged when it completes, whatever arrives later. Only they raise flags
//! before a computation is complete. `mean` falls when ordinary traces follow an unusual one, and
//! `topk_mean` falls while fewer than `k` traces have arrived.

use crate::{Error, Result};

/// Largest window of `max_rolling_mean` and largest `k` of `topk_mean`: the state of each open
/// computation holds that many values per slot.
pub const MAX_AGGREGATION_WINDOW: usize = 4096;

/// The aggregation of new monitors: the peak mean `-ln p` of 8 consecutive traces. A short
/// anomalous span shows as several unusual tokens in a row, while an in-distribution computation
/// has single unusual tokens scattered over its length; averaging over a window of a few tokens
/// keeps the first and damps the second, so it grows far less with length than the single most
/// anomalous token (`max`) and needs no choice of a decay. It is a running maximum, so it flags
/// early; on pooled traces (one per site) it equals `max` up to a factor, so pooled monitors flag
/// exactly as with `max`. Measured on per-token MiniLM (docs/experiments/tokens.md): span-injected
/// sentences vs in-distribution ones, AUROC 0.912 against `max`'s 0.874 and `mean`'s 0.861 (layer
/// 4, Gaussian; `ema:0.25` is within 0.002); 8 is the window production probe monitors use for
/// their rolling means, not a value tuned here.
pub const DEFAULT_AGGREGATION: Aggregation = Aggregation::MaxRollingMean { window: 8 };

/// How a computation's traces at one slot aggregate (see the module documentation). Its
/// `Default` is `max`, what monitors saved before operators existed did (new monitors get
/// [`DEFAULT_AGGREGATION`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, Default)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Aggregation {
    /// The most anomalous trace (actwatch's behaviour before operators existed).
    #[default]
    Max,
    Mean,
    Ema {
        alpha: f64,
    },
    MaxRollingMean {
        window: usize,
    },
    TopkMean {
        k: usize,
    },
}

impl Aggregation {
    /// Parses `max`, `mean`, `ema:ALPHA` (0 < ALPHA <= 1), `max_rolling_mean:W` or `topk_mean:K`
    /// (1 <= W, K <= [`MAX_AGGREGATION_WINDOW`]).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::InvalidOption(format!(
                "aggregation {text:?}: {why} (expected max, mean, ema:ALPHA, \
                 max_rolling_mean:WINDOW or topk_mean:K)"
            ))
        };
        let (name, arg) = match text.trim().split_once(':') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (text.trim(), None),
        };
        let count = |arg: Option<&str>| -> Result<usize> {
            let a = arg.ok_or_else(|| bad("the operator needs a whole number"))?;
            a.parse::<usize>()
                .map_err(|_| bad(&format!("{a:?} is not a whole number")))
        };
        let agg = match (name.to_ascii_lowercase().as_str(), arg) {
            ("max", None) => Aggregation::Max,
            ("mean", None) => Aggregation::Mean,
            ("max" | "mean", Some(_)) => return Err(bad("takes no parameter")),
            ("ema", Some(a)) => Aggregation::Ema {
                alpha: a
                    .parse::<f64>()
                    .map_err(|_| bad(&format!("{a:?} is not a number")))?,
            },
            ("ema", None) => return Err(bad("ema needs its smoothing factor, e.g. ema:0.25")),
            ("max_rolling_mean", a) => Aggregation::MaxRollingMean { window: count(a)? },
            ("topk_mean", a) => Aggregation::TopkMean { k: count(a)? },
            _ => return Err(bad("unknown operator")),
        };
        agg.validate()?;
        Ok(agg)
    }

    /// Checks the parameter ranges (also for options read back from JSON).
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidOption(format!("aggregation {self}: {why}")));
        match *self {
            Aggregation::Ema { alpha } if !(alpha > 0.0 && alpha <= 1.0) => {
                bad(format!("the smoothing factor {alpha} is outside (0, 1]"))
            }
            Aggregation::MaxRollingMean { window: n } | Aggregation::TopkMean { k: n }
                if n == 0 || n > MAX_AGGREGATION_WINDOW =>
            {
                bad(format!("{n} is outside 1..={MAX_AGGREGATION_WINDOW}"))
            }
            _ => Ok(()),
        }
    }

    /// Whether the running value never decreases as traces arrive (then, and only then, a
    /// computation can be flagged before it is complete).
    pub fn is_monotone(&self) -> bool {
        matches!(
            self,
            Aggregation::Max | Aggregation::Ema { .. } | Aggregation::MaxRollingMean { .. }
        )
    }

    /// An empty running state.
    pub fn start(&self) -> AggState {
        let buffer = match *self {
            Aggregation::MaxRollingMean { window } => Vec::with_capacity(window.min(64)),
            Aggregation::TopkMean { k } => Vec::with_capacity(k.min(64)),
            _ => Vec::new(),
        };
        AggState {
            n: 0,
            acc: 0.0,
            best: f64::NEG_INFINITY,
            buffer,
            head: 0,
        }
    }

    /// Adds the next value `x` (NaN is ignored: it carries no evidence).
    pub fn push(&self, st: &mut AggState, x: f64) {
        if x.is_nan() {
            return;
        }
        st.n += 1;
        match *self {
            Aggregation::Max => st.best = st.best.max(x),
            Aggregation::Mean => st.acc += x,
            Aggregation::Ema { alpha } => {
                st.acc = alpha * x + (1.0 - alpha) * st.acc;
                st.best = st.best.max(st.acc);
            }
            Aggregation::MaxRollingMean { window } => {
                // A ring of the last `window` values; the window sum is recomputed oldest first
                // (O(w), w small), so it equals the direct formula to the bit.
                if st.buffer.len() < window {
                    st.buffer.push(x);
                } else {
                    st.buffer[st.head] = x;
                    st.head = (st.head + 1) % window;
                }
                let (new, old) = st.buffer.split_at(st.head);
                let sum: f64 = old.iter().chain(new).sum();
                st.best = st.best.max(sum / window as f64);
            }
            Aggregation::TopkMean { k } => {
                // The k largest so far, sorted largest first.
                let at = st.buffer.partition_point(|&v| v >= x);
                if at < k {
                    if st.buffer.len() == k {
                        st.buffer.pop();
                    }
                    st.buffer.insert(at, x);
                }
            }
        }
    }

    /// The aggregate of what was pushed; None before the first value.
    pub fn value(&self, st: &AggState) -> Option<f64> {
        if st.n == 0 {
            return None;
        }
        Some(match *self {
            Aggregation::Max | Aggregation::Ema { .. } | Aggregation::MaxRollingMean { .. } => {
                st.best
            }
            Aggregation::Mean => st.acc / st.n as f64,
            Aggregation::TopkMean { .. } => st.buffer.iter().sum::<f64>() / st.buffer.len() as f64,
        })
    }

    /// The aggregate of a whole sequence at once (what pushing every value gives).
    pub fn of(&self, values: &[f64]) -> Option<f64> {
        let mut st = self.start();
        for &x in values {
            self.push(&mut st, x);
        }
        self.value(&st)
    }
}

impl std::fmt::Display for Aggregation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Aggregation::Max => f.write_str("max"),
            Aggregation::Mean => f.write_str("mean"),
            Aggregation::Ema { alpha } => write!(f, "ema:{alpha}"),
            Aggregation::MaxRollingMean { window } => write!(f, "max_rolling_mean:{window}"),
            Aggregation::TopkMean { k } => write!(f, "topk_mean:{k}"),
        }
    }
}

/// The running state of one slot of one computation (see [`Aggregation::push`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AggState {
    /// Values pushed.
    n: u64,
    /// Mean: the sum; EMA: the current `e_t`.
    acc: f64,
    /// Running maximum (max, EMA, rolling mean).
    best: f64,
    /// Rolling mean: the ring of the last values; top-k: the largest values, largest first.
    buffer: Vec<f64>,
    /// Rolling mean: the oldest value's index once the ring is full.
    head: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module documentation's formulas, written out directly.
    fn direct(agg: Aggregation, x: &[f64]) -> f64 {
        let n = x.len();
        match agg {
            Aggregation::Max => x.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            Aggregation::Mean => x.iter().sum::<f64>() / n as f64,
            Aggregation::Ema { alpha } => {
                let mut e = 0.0;
                let mut best = f64::NEG_INFINITY;
                for &v in x {
                    e = alpha * v + (1.0 - alpha) * e;
                    best = best.max(e);
                }
                best
            }
            Aggregation::MaxRollingMean { window } => (0..n)
                .map(|t| x[(t + 1).saturating_sub(window)..=t].iter().sum::<f64>() / window as f64)
                .fold(f64::NEG_INFINITY, f64::max),
            Aggregation::TopkMean { k } => {
                let mut s = x.to_vec();
                s.sort_by(|a, b| b.total_cmp(a));
                s.truncate(k);
                s.iter().sum::<f64>() / s.len() as f64
            }
        }
    }

    fn all() -> Vec<Aggregation> {
        vec![
            Aggregation::Max,
            Aggregation::Mean,
            Aggregation::Ema { alpha: 0.25 },
            Aggregation::Ema { alpha: 1.0 },
            Aggregation::MaxRollingMean { window: 1 },
            Aggregation::MaxRollingMean { window: 4 },
            Aggregation::MaxRollingMean { window: 16 },
            Aggregation::TopkMean { k: 1 },
            Aggregation::TopkMean { k: 4 },
        ]
    }

    /// Deterministic pseudo-random sequences of many lengths (a small LCG: no dev-dependency).
    fn sequences() -> Vec<Vec<f64>> {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        (1..60)
            .map(|n| (0..n).map(|_| -next().max(1e-300).ln()).collect())
            .collect()
    }

    #[test]
    fn every_operator_equals_its_formula() {
        for agg in all() {
            for x in sequences() {
                let got = agg.of(&x).unwrap();
                let want = direct(agg, &x);
                let tol = if matches!(agg, Aggregation::TopkMean { .. }) {
                    1e-12 * want.abs()
                } else {
                    0.0
                };
                assert!(
                    (got - want).abs() <= tol,
                    "{agg} on {} values: {got} vs {want}",
                    x.len()
                );
            }
        }
    }

    #[test]
    fn monotone_operators_never_decrease_and_the_others_can() {
        for agg in all() {
            let mut fell = false;
            for x in sequences() {
                let mut st = agg.start();
                let mut last = f64::NEG_INFINITY;
                for &v in &x {
                    agg.push(&mut st, v);
                    let now = agg.value(&st).unwrap();
                    if agg.is_monotone() {
                        assert!(now >= last, "{agg} fell from {last} to {now}");
                    }
                    fell |= now < last;
                    last = now;
                }
            }
            // every non-monotone operator here is seen to fall on these sequences
            assert_eq!(
                fell,
                !agg.is_monotone() && agg != Aggregation::TopkMean { k: 1 },
                "{agg}"
            );
        }
    }

    #[test]
    fn nan_is_no_evidence_and_empty_is_none() {
        for agg in all() {
            assert_eq!(agg.of(&[]), None);
            assert_eq!(agg.of(&[f64::NAN]), None);
            assert_eq!(agg.of(&[2.0, f64::NAN]), agg.of(&[2.0]));
        }
    }

    #[test]
    fn parse_round_trips_and_refuses_bad_parameters() {
        for agg in all() {
            assert_eq!(Aggregation::parse(&agg.to_string()).unwrap(), agg);
        }
        assert_eq!(
            Aggregation::parse(" EMA : 0.5 ").unwrap(),
            Aggregation::Ema { alpha: 0.5 }
        );
        for bad in [
            "",
            "median",
            "max:3",
            "ema",
            "ema:0",
            "ema:1.5",
            "ema:nan",
            "max_rolling_mean",
            "max_rolling_mean:0",
            "max_rolling_mean:-1",
            "topk_mean:100000",
        ] {
            let e = Aggregation::parse(bad).unwrap_err().to_string();
            assert!(e.contains("aggregation"), "{bad}: {e}");
        }
    }
}
