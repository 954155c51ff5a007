//! The fitted monitor: per-site detectors and calibrations, the computation-level calibration,
//! and what fitting measured. Scoring it is [`crate::score`].

use actwatch_core::Provenance;

use crate::backend::Backend;
use crate::calibration::Calibration;
use crate::joint::{JointMap, JointSummary, JOINT_SITE};
use crate::spec::{DetectorSpec, FittedDetector};
use crate::strata::LengthStrata;
use crate::{Error, Result};

use super::probes::{probe_sites, ProbeModel};
use super::MonitorOptions;

/// Fitted detectors and calibrations of one site.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SiteModel {
    pub name: String,
    pub dim: usize,
    /// In the order of [`MonitorOptions::detectors`].
    pub detectors: Vec<FittedDetector>,
    /// Per detector: calibration of its raw trace scores.
    pub calibrations: Vec<Calibration>,
    /// Calibration of the trace-level statistic fused over this site's detectors.
    pub trace_fused: Calibration,
    pub fit_traces: u64,
    pub calibration_traces: u64,
    /// What produced the site's reference traces, as they declared it
    /// ([`super::MonitorFitter::record_provenance`]). Not in the site's binary encoding: an
    /// artifact keeps it in its manifest, readable.
    #[serde(skip)]
    pub provenance: Provenance,
}

/// Recall of an HNSW index against exact search, measured on calibration traces at fit time.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KnnRecall {
    pub site: String,
    /// Index into the site's detectors.
    pub detector: usize,
    pub queries: usize,
    pub k: usize,
    pub recall: f64,
}

/// What fitting measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FitSummary {
    pub fit_seconds: f64,
    pub calibration_seconds: f64,
    pub calibration_computations: u64,
    /// Share of calibration computations flagged, each judged against the others.
    pub calibration_fpr: f64,
    /// Fused statistic at or above which a computation is flagged (None: too few calibration
    /// computations to flag anything at the target rate, or several length strata, each with
    /// its own threshold).
    pub threshold: Option<f64>,
    pub knn_recall: Vec<KnnRecall>,
    /// What fitting the joint detector saw; None when the options ask for none (and for
    /// monitors saved before joint detectors existed).
    #[serde(default)]
    pub joint: Option<JointSummary>,
    /// The length strata of the computation-level calibration, shortest first (empty for
    /// monitors saved before strata existed: one stratum).
    #[serde(default)]
    pub length_strata: Vec<LengthStratum>,
}

/// One length stratum of the computation-level calibration ([`crate::strata`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LengthStratum {
    /// The longest computation (most traces at one site) in it; None for the last stratum.
    pub max_length: Option<u64>,
    pub computations: u64,
    /// Fused statistic at or above which its computations are flagged.
    pub threshold: Option<f64>,
}

/// A fitted, calibrated monitor. Immutable: a refit builds a new one.
///
/// Built only by [`Monitor::new`] (which [`MonitorCalibrator::finish`](super::MonitorCalibrator::finish) and artifact loading both
/// call), so its invariants hold for every caller: at least one site, site names unique, every
/// site with one fitted detector and one calibration per [`MonitorOptions::detectors`] entry (same
/// kinds, same order), every detector of the site's width, derived state (HNSW graphs) built.
/// Scoring is [`Monitor::score`] (see [`crate::score`]).
#[derive(Debug)]
pub struct Monitor {
    options: MonitorOptions,
    sites: Vec<SiteModel>,
    /// The joint detectors ([`crate::joint`]): a "site" named [`JOINT_SITE`] whose vectors are
    /// the sites' joined; its slots follow the sites'.
    joint: Option<SiteModel>,
    /// How each site's traces become their part of the joint vector (with `joint`; derived from
    /// the sites' detectors, not stored).
    joint_map: Option<JointMap>,
    /// Calibration of the fused computation-level statistic, per length stratum.
    fused: LengthStrata,
    summary: FitSummary,
    /// Where raw scores are computed (not stored: the default backend after loading).
    backend: Backend,
    /// What scoring does with traces whose provenance conflicts with a site's (not stored: a
    /// setting of whoever scores; [`ProvenancePolicy::Refuse`] after loading).
    provenance_policy: ProvenancePolicy,
    /// The concept probes, in the order of [`MonitorOptions::probes`].
    probes: Vec<ProbeModel>,
    /// Per site: (probe index, index among the probe's sites) of every probe that reads it.
    probes_at: Vec<Vec<(usize, usize)>>,
}

/// What scoring does with a batch whose declared provenance conflicts with the provenance its
/// site's reference traces declared ([`actwatch_core::Provenance::conflict`]).
///
/// The default refuses: a monitor applied to traces read another way gives p-values that look
/// right and are not (its calibration is for the other path), and a refused call is seen by
/// whoever wired the capture, while a warning is easily seen by nobody. `Warn` is for a user who
/// knows the paths agree (or wants to measure how far they differ): the batch is scored and the
/// conflict comes back with its scores ([`crate::SiteScores::provenance_conflict`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProvenancePolicy {
    #[default]
    Refuse,
    Warn,
}

impl ProvenancePolicy {
    /// "refuse" or "warn".
    pub fn name(self) -> &'static str {
        match self {
            Self::Refuse => "refuse",
            Self::Warn => "warn",
        }
    }
}

impl std::str::FromStr for ProvenancePolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "refuse" => Ok(Self::Refuse),
            "warn" => Ok(Self::Warn),
            _ => Err(Error::InvalidOption(format!(
                "provenance policy {s:?}: expected \"refuse\" or \"warn\""
            ))),
        }
    }
}

impl Monitor {
    /// Checks the invariants above and builds derived state (see [`FittedDetector::prepare`]).
    pub fn new(
        options: MonitorOptions,
        mut sites: Vec<SiteModel>,
        mut joint: Option<SiteModel>,
        fused: LengthStrata,
        summary: FitSummary,
        probes: Vec<ProbeModel>,
    ) -> Result<Self> {
        options.validate()?;
        if sites.is_empty() {
            return Err(Error::InvalidOption(
                "a monitor needs at least one site".into(),
            ));
        }
        let kinds: Vec<&str> = options.detectors.iter().map(DetectorSpec::name).collect();
        for (i, s) in sites.iter().enumerate() {
            let bad = |why: String| Err(Error::InvalidOption(format!("site {:?}: {why}", s.name)));
            if s.name.is_empty() {
                return bad("the site name is empty".into());
            }
            if sites[..i].iter().any(|o| o.name == s.name) {
                return bad("the site appears twice".into());
            }
            if s.dim == 0 {
                return bad("width zero".into());
            }
            let got: Vec<&str> = s.detectors.iter().map(FittedDetector::name).collect();
            if got != kinds {
                return bad(format!("detectors {got:?}, but the options say {kinds:?}"));
            }
            if s.calibrations.len() != s.detectors.len() {
                return bad(format!(
                    "{} calibrations for {} detectors",
                    s.calibrations.len(),
                    s.detectors.len()
                ));
            }
            if let Some(d) = s.detectors.iter().find(|d| d.dim() != s.dim) {
                return bad(format!("a {} detector of width {}", d.name(), d.dim()));
            }
        }
        let joint_map = match &joint {
            None => None,
            Some(_) => Some(
                JointMap::new(&super::joint_inputs(
                    sites.iter().map(|s| (s.dim, &s.detectors[..])),
                ))
                .map_err(|why| Error::InvalidOption(format!("joint detector: {why}")))?,
            ),
        };
        if let (Some(j), Some(map)) = (&joint, &joint_map) {
            let bad = |why: String| Err(Error::InvalidOption(format!("joint detector: {why}")));
            let width = map.width();
            let kinds: Vec<&str> = options.joint.iter().map(DetectorSpec::name).collect();
            let got: Vec<&str> = j.detectors.iter().map(FittedDetector::name).collect();
            if j.name != JOINT_SITE || sites.iter().any(|s| s.name == JOINT_SITE) {
                return bad(format!(
                    "its slots must be the only ones named {JOINT_SITE:?}"
                ));
            }
            if j.dim != width || j.detectors.iter().any(|d| d.dim() != width) {
                return bad(format!(
                    "width {}, but the sites' parts add up to {width}",
                    j.dim
                ));
            }
            if got != kinds || j.calibrations.len() != got.len() {
                return bad(format!("detectors {got:?}, but the options say {kinds:?}"));
            }
        }
        let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        if probes.len() != options.probes.len() {
            return Err(Error::InvalidOption(format!(
                "{} fitted probes, but the options ask for {}",
                probes.len(),
                options.probes.len()
            )));
        }
        let mut probes_at = vec![Vec::new(); sites.len()];
        for (i, (p, spec)) in probes.iter().zip(&options.probes).enumerate() {
            let bad = |why: String| {
                Err(Error::InvalidOption(format!(
                    "probe {:?}: {why}",
                    spec.name
                )))
            };
            if &p.spec != spec {
                return bad("its spec differs from the options'".into());
            }
            let want = probe_sites(spec, &names)?;
            let got: Vec<usize> = p.sites.iter().map(|s| s.site).collect();
            if got != want {
                return bad(format!(
                    "fitted at sites {got:?}, but it reads sites {want:?}"
                ));
            }
            for (k, ps) in p.sites.iter().enumerate() {
                if ps.probe.dim() != sites[ps.site].dim {
                    return bad(format!(
                        "width {} at site {:?} of width {}",
                        ps.probe.dim(),
                        sites[ps.site].name,
                        sites[ps.site].dim
                    ));
                }
                if ps.calibration.is_empty() {
                    return bad("an empty calibration".into());
                }
                probes_at[ps.site].push((i, k));
            }
            if p.fused.is_empty() {
                return bad("an empty computation-level calibration".into());
            }
        }
        for s in sites.iter_mut().chain(joint.as_mut()) {
            for d in &mut s.detectors {
                d.prepare()?;
            }
        }
        Ok(Self {
            probes,
            probes_at,
            options,
            sites,
            joint,
            joint_map,
            fused,
            summary,
            backend: Backend::default(),
            provenance_policy: ProvenancePolicy::default(),
        })
    }

    pub fn options(&self) -> &MonitorOptions {
        &self.options
    }

    /// The concept probes ([`super::ProbeModel`]), in the order of the options'.
    pub fn probes(&self) -> &[ProbeModel] {
        &self.probes
    }

    /// (probe index, index among that probe's sites) of every probe that reads site `site`.
    pub(crate) fn probes_at(&self, site: usize) -> &[(usize, usize)] {
        &self.probes_at[site]
    }

    /// The sites, in slot order.
    pub fn sites(&self) -> &[SiteModel] {
        &self.sites
    }

    /// The joint detectors and their calibrations, when fitted ([`crate::joint`]).
    pub fn joint(&self) -> Option<&SiteModel> {
        self.joint.as_ref()
    }

    /// Site `site`'s parts of the joint vector for its traces `rows` (row-major): their
    /// L2-normalised vectors, or for wide monitors their principal coordinates
    /// ([`crate::joint`]); `None` without a joint detector.
    pub fn joint_parts(&self, site: usize, rows: &[f32]) -> Result<Option<Vec<f32>>> {
        self.joint_map
            .as_ref()
            .map(|m| m.map_rows(site, rows, &self.sites[site].detectors))
            .transpose()
    }

    /// How the joint vector is made, with a joint detector.
    pub fn joint_map(&self) -> Option<&JointMap> {
        self.joint_map.as_ref()
    }

    /// Calibration of the fused computation-level statistic, per length stratum.
    pub fn fused(&self) -> &LengthStrata {
        &self.fused
    }

    pub fn summary(&self) -> &FitSummary {
        &self.summary
    }

    /// Where raw scores are computed.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Computes raw scores with `backend` from now on (see [`crate::backend`]).
    pub fn set_backend(&mut self, backend: Backend) {
        self.backend = backend;
    }

    pub fn provenance_policy(&self) -> ProvenancePolicy {
        self.provenance_policy
    }

    /// What scoring does with conflicting provenance from now on.
    pub fn set_provenance_policy(&mut self, policy: ProvenancePolicy) {
        self.provenance_policy = policy;
    }

    pub fn site_index(&self, name: &str) -> Option<usize> {
        self.sites.iter().position(|s| s.name == name)
    }

    pub fn site_names(&self) -> Vec<String> {
        self.sites.iter().map(|s| s.name.clone()).collect()
    }

    /// `(site, detector name)` of every slot, in slot order: the sites', then the joint
    /// detectors' (site [`JOINT_SITE`]).
    pub fn slots(&self) -> Vec<(String, &'static str)> {
        self.sites
            .iter()
            .chain(self.joint.as_ref())
            .flat_map(|s| s.detectors.iter().map(|d| (s.name.clone(), d.name())))
            .collect()
    }

    /// The index of the first joint slot.
    pub(crate) fn joint_offset(&self) -> usize {
        self.slot_offset(self.sites.len())
    }

    /// The index of the first slot of site `site`.
    pub(crate) fn slot_offset(&self, site: usize) -> usize {
        self.sites[..site].iter().map(|s| s.detectors.len()).sum()
    }

    /// Number of (site, detector) slots.
    pub(crate) fn slot_count(&self) -> usize {
        self.sites
            .iter()
            .chain(self.joint.as_ref())
            .map(|s| s.detectors.len())
            .sum()
    }
}
