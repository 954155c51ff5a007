//! Conversions between the API's monitor specs and the core's [`MonitorOptions`].

use actwatch_detect::fusion::DEFAULT_FUSION;
use actwatch_detect::monitor::{MonitorOptions, DEFAULT_CALIBRATION_FRACTION, DEFAULT_FPR};
use actwatch_detect::spec::DEFAULT_DETECTORS;
use actwatch_detect::{DetectorSpec, Fusion};
use actwatch_proto::v1;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Longest monitor name.
pub const MAX_NAME_LEN: usize = 64;

/// A monitor spec with every default filled in, as stored in `spec.json` and returned by
/// GetMonitor: what the client asked, in the client's words.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSpec {
    pub detectors: Vec<String>,
    pub fusion: String,
    pub fpr: f64,
    pub calibration_fraction: f64,
    pub seed: u64,
}

impl StoredSpec {
    /// Fills in the defaults of a proto spec (see the field docs of `MonitorSpec`) and validates it.
    pub fn from_proto(spec: Option<v1::MonitorSpec>) -> Result<Self> {
        let v1::MonitorSpec {
            detectors,
            fusion,
            fpr,
            calibration_fraction,
            seed,
        } = spec.unwrap_or_default();
        let spec = StoredSpec {
            detectors: if detectors.is_empty() {
                DEFAULT_DETECTORS.split(',').map(str::to_string).collect()
            } else {
                detectors
            },
            fusion: if fusion.is_empty() {
                DEFAULT_FUSION.name().to_string()
            } else {
                fusion
            },
            fpr: if fpr == 0.0 { DEFAULT_FPR } else { fpr },
            calibration_fraction: if calibration_fraction == 0.0 {
                DEFAULT_CALIBRATION_FRACTION
            } else {
                calibration_fraction
            },
            seed,
        };
        options_from_spec(&spec)?;
        Ok(spec)
    }

    pub fn to_proto(&self) -> v1::MonitorSpec {
        v1::MonitorSpec {
            detectors: self.detectors.clone(),
            fusion: self.fusion.clone(),
            fpr: self.fpr,
            calibration_fraction: self.calibration_fraction,
            seed: self.seed,
        }
    }
}

/// The core options a spec stands for.
pub fn options_from_spec(spec: &StoredSpec) -> Result<MonitorOptions> {
    let detectors = spec
        .detectors
        .iter()
        .map(|d| DetectorSpec::parse(d).map_err(|e| Error::BadSpec(format!("detector {d:?}: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    let fusion = Fusion::parse(&spec.fusion).map_err(|e| Error::BadSpec(e.to_string()))?;
    let options = MonitorOptions {
        detectors,
        fusion,
        fpr: spec.fpr,
        calibration_fraction: spec.calibration_fraction,
        seed: spec.seed,
    };
    options
        .validate()
        .map_err(|e| Error::BadSpec(e.to_string()))?;
    Ok(options)
}

/// Checks a monitor name: `[A-Za-z0-9_.-]{1,64}`, not starting with a dot (dot names are the
/// data directory's own temporary folders).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in_and_bad_specs_are_rejected() {
        let s = StoredSpec::from_proto(None).unwrap();
        assert_eq!(s.detectors, ["gaussian", "knn"]);
        assert_eq!(s.fusion, "minp");
        assert_eq!(s.fpr, DEFAULT_FPR);
        let bad = v1::MonitorSpec {
            detectors: vec!["gaussian:shrinkage=nope".into()],
            ..Default::default()
        };
        assert!(matches!(
            StoredSpec::from_proto(Some(bad)),
            Err(Error::BadSpec(_))
        ));
        let bad = v1::MonitorSpec {
            fpr: 1.5,
            ..Default::default()
        };
        assert!(matches!(
            StoredSpec::from_proto(Some(bad)),
            Err(Error::BadSpec(_))
        ));
    }

    #[test]
    fn names() {
        for ok in ["a", "minilm-v1.2_x", &"x".repeat(64)] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
