//! Detector specifications: what a user asks for (`gaussian`, `knn:k=5,metric=l2`), parsed once.
//!
//! A spec is `name[:key=value,...]`. Unknown names, unknown keys and out-of-range values are
//! errors that say what is accepted; nothing is silently ignored.

use crate::gaussian::{GaussianDetector, GaussianFitter, GaussianOptions};
use crate::knn::{KnnDetector, KnnFitter, KnnOptions, Metric};
use crate::shrinkage::Shrinkage;
use crate::{Error, Result};

/// One detector to fit at every site of a monitor.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DetectorSpec {
    /// Mahalanobis distance under a shrunk Gaussian.
    Gaussian(GaussianOptions),
    /// Distance to the k-th nearest reference vector.
    Knn(KnnOptions),
}

/// The default detectors: both families, because they fail differently. The Gaussian sees the
/// global shape of the reference cloud; kNN sees local holes in it and keeps working where a single
/// Gaussian is a poor fit (on MiniLM's last layer the raw Gaussian is worse than chance).
pub const DEFAULT_DETECTORS: &str = "gaussian,knn";

/// The default joint detector ([`crate::joint`]): one Gaussian over the per-site vectors
/// concatenated. It is the one family that models how sites depend on each other (a kNN on the
/// concatenation averages per-site distances and blurs that); its rank follows the Gaussian's
/// width rule (full up to 1024, 256 above), so at 3 × 384 it costs about 5% more arithmetic per
/// computation than the per-site detectors (docs/experiments/joint.md).
pub const DEFAULT_JOINT: &str = "gaussian";

impl DetectorSpec {
    /// Parses one spec, e.g. `gaussian`, `gaussian:shrinkage=oas,normalize=false,rank=64`,
    /// `knn:k=10,metric=cosine,exact_max=200000,ef_search=64`.
    pub fn parse(text: &str) -> Result<Self> {
        let (name, params) = match text.split_once(':') {
            Some((n, p)) => (n.trim(), p),
            None => (text.trim(), ""),
        };
        let pairs = params
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.split_once('=')
                    .map(|(k, v)| (k.trim(), v.trim()))
                    .ok_or_else(|| {
                        Error::InvalidOption(format!("`{p}` in `{text}` is not key=value"))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        match name.to_ascii_lowercase().as_str() {
            "gaussian" | "mahalanobis" => Ok(DetectorSpec::Gaussian(gaussian_options(&pairs)?)),
            "knn" => Ok(DetectorSpec::Knn(knn_options(&pairs)?)),
            other => Err(Error::InvalidOption(format!(
                "unknown detector `{other}`: expected gaussian or knn"
            ))),
        }
    }

    /// Checks the options that do not depend on the data (widths are checked at fit time).
    pub fn validate(&self) -> Result<()> {
        match self {
            DetectorSpec::Gaussian(o) if o.rank == Some(0) => Err(Error::InvalidOption(
                "gaussian: rank must be at least 1".into(),
            )),
            DetectorSpec::Gaussian(_) => Ok(()),
            DetectorSpec::Knn(o) => o.validate(),
        }
    }

    /// Parses a comma-or-semicolon separated list such as `gaussian,knn:k=5`. A `,` followed by
    /// `key=value` continues the previous spec's parameters.
    pub fn parse_list(text: &str) -> Result<Vec<Self>> {
        let mut specs: Vec<String> = Vec::new();
        for part in text
            .split([',', ';'])
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match specs.last_mut() {
                Some(last) if part.contains('=') && !part.contains(':') => {
                    last.push(if last.contains(':') { ',' } else { ':' });
                    last.push_str(part);
                }
                _ => specs.push(part.to_string()),
            }
        }
        if specs.is_empty() {
            return Err(Error::InvalidOption("no detectors given".into()));
        }
        specs.iter().map(|s| Self::parse(s)).collect()
    }

    /// Short name used in column names and reports: `gaussian` or `knn`.
    pub fn name(&self) -> &'static str {
        match self {
            DetectorSpec::Gaussian(_) => "gaussian",
            DetectorSpec::Knn(_) => "knn",
        }
    }

    /// A fitter for vectors of width `dim`.
    pub fn fitter(&self, dim: usize) -> Result<DetectorFitter> {
        Ok(match self {
            DetectorSpec::Gaussian(o) => {
                DetectorFitter::Gaussian(GaussianFitter::new(dim, o.clone()))
            }
            DetectorSpec::Knn(o) => DetectorFitter::Knn(KnnFitter::new(dim, o.clone())),
        })
    }
}

fn unknown_key(det: &str, key: &str, known: &str) -> Error {
    Error::InvalidOption(format!("{det}: unknown parameter `{key}` (known: {known})"))
}

/// The options of a `gaussian:...` spec.
fn gaussian_options(pairs: &[(&str, &str)]) -> Result<GaussianOptions> {
    let mut o = GaussianOptions::default();
    for &(k, v) in pairs {
        match k {
            "shrinkage" => {
                o.shrinkage = match v.to_ascii_lowercase().as_str() {
                    "ledoit-wolf" | "ledoitwolf" | "lw" => Shrinkage::LedoitWolf,
                    "oas" => Shrinkage::Oas,
                    x => {
                        let a: f64 = x.parse().map_err(|_| {
                            Error::InvalidOption(format!(
                                "shrinkage `{v}`: expected lw, oas or a number in [0, 1]"
                            ))
                        })?;
                        if !(0.0..=1.0).contains(&a) {
                            return Err(Error::InvalidOption(format!(
                                "shrinkage {a} is outside [0, 1]"
                            )));
                        }
                        Shrinkage::Fixed(a)
                    }
                }
            }
            "normalize" | "normalise" => o.normalize = parse_bool(k, v)?,
            "rank" => {
                o.rank = match v {
                    "full" => None,
                    _ => Some(parse_positive(k, v)?),
                }
            }
            _ => return Err(unknown_key("gaussian", k, "shrinkage, normalize, rank")),
        }
    }
    Ok(o)
}

/// The options of a `knn:...` spec.
fn knn_options(pairs: &[(&str, &str)]) -> Result<KnnOptions> {
    let mut o = KnnOptions::default();
    for &(k, v) in pairs {
        match k {
            "k" => o.k = parse_positive(k, v)?,
            "metric" => {
                o.metric = match v.to_ascii_lowercase().as_str() {
                    "cosine" => Metric::Cosine,
                    "l2" | "euclidean" => Metric::L2,
                    _ => {
                        return Err(Error::InvalidOption(format!(
                            "metric `{v}`: expected cosine or l2"
                        )))
                    }
                }
            }
            "exact_max" => o.exact_max = parse_usize(k, v)?,
            "max_references" => o.max_references = parse_positive(k, v)?,
            "m" => o.hnsw_m = parse_positive(k, v)?,
            "ef_construction" => o.hnsw_ef_construction = parse_positive(k, v)?,
            "ef_search" => o.hnsw_ef_search = parse_positive(k, v)?,
            _ => {
                return Err(unknown_key(
                    "knn",
                    k,
                    "k, metric, exact_max, max_references, m, ef_construction, ef_search",
                ))
            }
        }
    }
    Ok(o)
}

fn parse_bool(k: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(Error::InvalidOption(format!(
            "{k} `{v}`: expected true or false"
        ))),
    }
}

fn parse_usize(k: &str, v: &str) -> Result<usize> {
    v.parse()
        .map_err(|_| Error::InvalidOption(format!("{k} `{v}`: expected a whole number")))
}

fn parse_positive(k: &str, v: &str) -> Result<usize> {
    match parse_usize(k, v)? {
        0 => Err(Error::InvalidOption(format!("{k} must be at least 1"))),
        n => Ok(n),
    }
}

/// A detector being fitted. Serialisable, so a fit can be checkpointed and resumed with more data.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum DetectorFitter {
    Gaussian(GaussianFitter),
    Knn(KnnFitter),
}

impl DetectorFitter {
    pub fn push_batch(&mut self, rows: &[f32]) -> Result<()> {
        match self {
            DetectorFitter::Gaussian(f) => f.push_batch(rows),
            DetectorFitter::Knn(f) => f.push_batch(rows),
        }
    }

    /// Adds what a fitter of the same detector saw on the part that follows `self`'s
    /// ([`GaussianFitter::merge`], [`KnnFitter::merge`]).
    pub fn merge(&mut self, other: &DetectorFitter) -> Result<()> {
        match (self, other) {
            (DetectorFitter::Gaussian(a), DetectorFitter::Gaussian(b)) => a.merge(b),
            (DetectorFitter::Knn(a), DetectorFitter::Knn(b)) => a.merge(b),
            _ => Err(Error::InvalidOption(
                "cannot merge fitters of different detectors".into(),
            )),
        }
    }

    /// Checks that a deserialised fitter is one of `spec`'s detector, of width `dim`, with
    /// buffers of that shape.
    pub(crate) fn check_state(&self, spec: &DetectorSpec, dim: usize) -> Result<()> {
        match (self, spec) {
            (DetectorFitter::Gaussian(f), DetectorSpec::Gaussian(_)) => f.check_state(dim),
            (DetectorFitter::Knn(f), DetectorSpec::Knn(_)) => f.check_state(dim),
            _ => Err(Error::InvalidOption(format!(
                "a fitter of another detector than {}",
                spec.name()
            ))),
        }
    }

    /// Checks that a deserialised fitter is of `like`'s detector and width, with buffers of
    /// that shape (before it is merged into `like`).
    pub(crate) fn check_as(&self, like: &DetectorFitter) -> Result<()> {
        match (self, like) {
            (DetectorFitter::Gaussian(f), DetectorFitter::Gaussian(l)) => f.check_state(l.dim()),
            (DetectorFitter::Knn(f), DetectorFitter::Knn(l)) => f.check_state(l.dim()),
            _ => Err(Error::InvalidOption("a fitter of another detector".into())),
        }
    }

    /// A fitter of the same detector and width that has seen nothing.
    pub fn emptied(&self) -> DetectorFitter {
        match self {
            DetectorFitter::Gaussian(f) => {
                DetectorFitter::Gaussian(GaussianFitter::new(f.dim(), f.options().clone()))
            }
            DetectorFitter::Knn(f) => {
                DetectorFitter::Knn(KnnFitter::new(f.dim(), f.options().clone()))
            }
        }
    }

    pub fn finish(self) -> Result<FittedDetector> {
        Ok(match self {
            DetectorFitter::Gaussian(f) => FittedDetector::Gaussian(f.finish()?),
            DetectorFitter::Knn(f) => FittedDetector::Knn(f.finish()?),
        })
    }
}

/// A fitted detector: raw scores, higher = more anomalous. (Externally tagged: blobs are bincode.)
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum FittedDetector {
    Gaussian(GaussianDetector),
    Knn(KnnDetector),
}

impl FittedDetector {
    pub fn dim(&self) -> usize {
        match self {
            FittedDetector::Gaussian(d) => d.dim(),
            FittedDetector::Knn(d) => d.dim(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            FittedDetector::Gaussian(_) => "gaussian",
            FittedDetector::Knn(_) => "knn",
        }
    }

    /// Raw scores for a row-major batch of `dim()`-wide rows.
    pub fn score_batch(&self, rows: &[f32]) -> Result<Vec<f64>> {
        match self {
            FittedDetector::Gaussian(d) => d.score_batch(rows),
            FittedDetector::Knn(d) => d.score_batch(rows),
        }
    }

    /// Builds derived state after a fit or a load (the HNSW graph, the Gaussian's triangular
    /// precision factor), so that the first scores do not pay for it.
    pub fn prepare(&mut self) -> Result<()> {
        match self {
            FittedDetector::Gaussian(d) => {
                d.prepare();
                Ok(())
            }
            FittedDetector::Knn(d) => d.prepare(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (found by the fuzz suite, `crates/actwatch-io/tests/fuzz.rs`): fitters decoded
    /// from a checksummed but hostile fit state (or calibration part) were merged and folded
    /// into unchecked: a pending block of a whole grid chunk underflowed `fold`, rows of another
    /// width indexed out of bounds. They are now checked before use.
    #[test]
    fn decoded_fitters_are_checked_before_use() {
        let gaussian = DetectorSpec::parse("gaussian").unwrap();
        let good = gaussian.fitter(3).unwrap();
        assert!(good.check_state(&gaussian, 3).is_ok());
        assert!(good.check_state(&gaussian, 4).is_err());
        let mut v = serde_json::to_value(&good).unwrap();
        v["Gaussian"]["pending"] = vec![0.5f32; 3 * crate::gaussian::grid_rows(3)].into();
        let bad: DetectorFitter = serde_json::from_value(v).unwrap();
        assert!(bad.check_state(&gaussian, 3).is_err());
        assert!(bad.check_as(&good).is_err());

        let knn = DetectorSpec::parse("knn").unwrap();
        let good = knn.fitter(2).unwrap();
        assert!(good.check_state(&knn, 2).is_ok());
        assert!(good.check_state(&gaussian, 2).is_err(), "another detector");
        let mut v = serde_json::to_value(&good).unwrap();
        v["Knn"]["refs"] = vec![1.0f32; 3].into();
        v["Knn"]["seen"] = 3.into();
        let bad: DetectorFitter = serde_json::from_value(v).unwrap();
        assert!(bad.check_as(&good).is_err(), "not whole rows");
    }

    #[test]
    fn parses_specs_and_rejects_nonsense() {
        let v = DetectorSpec::parse_list("gaussian,knn:k=5,metric=l2").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0], DetectorSpec::Gaussian(GaussianOptions::default()));
        match &v[1] {
            DetectorSpec::Knn(o) => {
                assert_eq!(o.k, 5);
                assert_eq!(o.metric, Metric::L2);
            }
            _ => panic!("expected knn"),
        }
        let g = DetectorSpec::parse("gaussian:shrinkage=oas,normalize=false,rank=8").unwrap();
        match g {
            DetectorSpec::Gaussian(o) => {
                assert_eq!(o.shrinkage, Shrinkage::Oas);
                assert!(!o.normalize);
                assert_eq!(o.rank, Some(8));
            }
            _ => panic!("expected gaussian"),
        }
        for bad in ["lof", "knn:k=0", "knn:q=1", "gaussian:shrinkage=2", "knn:k"] {
            assert!(DetectorSpec::parse_list(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            DetectorSpec::parse_list(DEFAULT_DETECTORS).unwrap().len(),
            2
        );
    }
}
