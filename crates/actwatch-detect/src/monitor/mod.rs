//! Monitors: sites × detectors, calibrated per detector, aggregated over tokens, fused over
//! detectors and sites, and calibrated again at the level of whole computations.
//!
//! The decision a reader must know: the reference set is split by computation id (seeded hash,
//! [`actwatch_core::split_unit`]) into a *fit* part and a *calibration* part, and the
//! calibration part is used for two things without ever being fitted on:
//! 1. per (site, detector), the raw scores of calibration traces form a [`Calibration`]; a score's
//!    smoothed `-ln p` against it puts every detector on one scale (leave-one-out for calibration
//!    members, so they are treated exactly like fresh traces);
//! 2. per computation, the most anomalous trace of each (site, detector) slot gives one `-ln p`;
//!    the slots fuse into one statistic ([`Fusion`]), and the fused statistics of the calibration
//!    computations form the computation-level calibration. The monitor's p-value is conformal on
//!    that, so its false-positive rate holds on fresh in-distribution computations whatever the
//!    detectors, their scales or their correlations. A weak detector adds noise to the fused
//!    statistic but cannot break the guarantee, and a strong one dominates where it sees something.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use actwatch_core::{Provenance, SplitHasher};

use crate::aggregate::{AggState, Aggregation, DEFAULT_AGGREGATION};
use crate::calibration::Calibration;
use crate::fusion::{Fusion, DEFAULT_FUSION};
use crate::joint::{Joiner, JointMap, JointSummary, JOINT_PENDING_MAX_BYTES, JOINT_SITE};
use crate::probe::{ProbeSpec, MAX_PROBES};
use crate::spec::{DetectorFitter, DetectorSpec, FittedDetector, DEFAULT_DETECTORS, DEFAULT_JOINT};
use crate::strata::LengthStrata;
mod fitted;
mod probes;

pub use fitted::{FitSummary, KnnRecall, LengthStratum, Monitor, ProvenancePolicy, SiteModel};
pub use probes::{
    Counts, ProbeModel, ProbeSite, ProbeSiteSummary, ProbeSummary, MAX_PROBE_EXAMPLE_VALUES,
};
use probes::{PendingProbe, ProbeExamples};

use crate::{Error, Result};

/// Target false-positive rate at computation level.
pub const DEFAULT_FPR: f64 = 0.01;
/// Share of reference computations held out for calibration.
pub const DEFAULT_CALIBRATION_FRACTION: f64 = 0.25;
/// Seed of the fit/calibration split.
pub const DEFAULT_SEED: u64 = 0;
/// Calibration queries used to measure an HNSW index's recall against exact search.
pub const RECALL_SAMPLE: usize = 500;
/// k of the reported recall@k.
pub const RECALL_K: usize = 10;

/// What a monitor is: detectors, token aggregation, fusion, calibration split and target
/// false-positive rate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MonitorOptions {
    pub detectors: Vec<DetectorSpec>,
    /// Detectors fitted on the joint vector of a computation ([`crate::joint`]); empty: none.
    /// Options saved before joint detectors existed read back as none, what they did.
    #[serde(default)]
    pub joint: Vec<DetectorSpec>,
    /// How a computation's traces at one slot aggregate ([`crate::aggregate`]); options saved
    /// before it existed read back as `max`, what they did.
    #[serde(default)]
    pub aggregation: Aggregation,
    pub fusion: Fusion,
    pub fpr: f64,
    pub calibration_fraction: f64,
    pub seed: u64,
    /// Length strata of the computation-level calibration ([`crate::strata`]): at most this
    /// many, each with enough calibration computations for the target rate; 1: none. Options
    /// saved before strata existed read back as 1, what they did.
    #[serde(default = "one")]
    pub length_strata: usize,
    /// Concept probes fitted from labelled examples ([`crate::probe`], [`ProbeModel`]); empty:
    /// none (and for options saved before probes existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeSpec>,
}

fn one() -> usize {
    1
}

/// Length strata by default: quartiles of the calibration computations' token counts (see
/// [`crate::strata`]); pooled traces, all of one length, get one stratum whatever this says.
pub const DEFAULT_LENGTH_STRATA: usize = 4;
/// Most detectors per site (and most joint detectors): each one holds its own statistics per
/// site, so a spec's detector count multiplies the fit's memory.
pub const MAX_DETECTORS: usize = 16;

/// Most length strata a monitor may ask for.
pub const MAX_LENGTH_STRATA: usize = 64;

impl Default for MonitorOptions {
    fn default() -> Self {
        Self {
            detectors: DetectorSpec::parse_list(DEFAULT_DETECTORS)
                .expect("the default detector list parses"),
            joint: DetectorSpec::parse_list(DEFAULT_JOINT).expect("the default joint list parses"),
            aggregation: DEFAULT_AGGREGATION,
            fusion: DEFAULT_FUSION,
            fpr: DEFAULT_FPR,
            calibration_fraction: DEFAULT_CALIBRATION_FRACTION,
            seed: DEFAULT_SEED,
            length_strata: DEFAULT_LENGTH_STRATA,
            probes: Vec::new(),
        }
    }
}

impl MonitorOptions {
    /// Checks everything that can be checked before data arrives: at least one detector, each
    /// detector's own options ([`DetectorSpec::validate`]), no detector twice (it would count the
    /// same evidence twice in fusion), and the rates in range.
    pub fn validate(&self) -> Result<()> {
        if self.detectors.is_empty() {
            return Err(Error::InvalidOption(
                "a monitor needs at least one detector".into(),
            ));
        }
        for list in [&self.detectors, &self.joint] {
            if list.len() > MAX_DETECTORS {
                return Err(Error::InvalidOption(format!(
                    "{} detectors in one list, over the limit of {MAX_DETECTORS}",
                    list.len()
                )));
            }
            for (i, d) in list.iter().enumerate() {
                d.validate()?;
                if list[..i].contains(d) {
                    return Err(Error::InvalidOption(format!(
                        "the detector {} is listed twice with the same options",
                        d.name()
                    )));
                }
            }
        }
        self.aggregation.validate()?;
        if !(1..=MAX_LENGTH_STRATA).contains(&self.length_strata) {
            return Err(Error::InvalidOption(format!(
                "length strata {} is outside 1..={MAX_LENGTH_STRATA}",
                self.length_strata
            )));
        }
        if !(self.fpr > 0.0 && self.fpr < 1.0) {
            return Err(Error::InvalidOption(format!(
                "target false-positive rate {} is outside (0, 1)",
                self.fpr
            )));
        }
        if !(self.calibration_fraction > 0.0 && self.calibration_fraction < 1.0) {
            return Err(Error::InvalidOption(format!(
                "calibration fraction {} is outside (0, 1)",
                self.calibration_fraction
            )));
        }
        if self.probes.len() > MAX_PROBES {
            return Err(Error::InvalidOption(format!(
                "{} probes, over the limit of {MAX_PROBES}",
                self.probes.len()
            )));
        }
        for (i, p) in self.probes.iter().enumerate() {
            p.validate_with(self.fpr)?;
            if self.probes[..i].iter().any(|o| o.name == p.name) {
                return Err(Error::InvalidOption(format!(
                    "the probe name {:?} is used twice",
                    p.name
                )));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SiteFitter {
    dim: usize,
    fitters: Vec<DetectorFitter>,
    traces: u64,
}

/// First phase of fitting: route reference traces with [`MonitorFitter::is_calibration`], push
/// the fit part here, then [`MonitorFitter::finish_fit`].
///
/// A fitter serialises (options and per-site detector fitters: sufficient statistics, the kNN
/// sample), so a fit can be checkpointed and resumed later with newly arrived traces, or run in
/// parts on other machines: fitters of consecutive parts ([`MonitorFitter::part`]) merged in order
/// ([`MonitorFitter::merge`]) give exactly the fitter that folds the parts one after the other.
#[derive(Clone)]
pub struct MonitorFitter {
    options: MonitorOptions,
    split: SplitHasher,
    sites: BTreeMap<String, SiteFitter>,
    /// Per site: what produced its reference traces, as declared by their batches
    /// ([`MonitorFitter::record_provenance`]).
    provenance: BTreeMap<String, Provenance>,
    /// The fit part of the labelled examples (and reference negatives) of the probes.
    examples: ProbeExamples,
    started: Instant,
}

impl MonitorFitter {
    pub fn new(options: MonitorOptions) -> Result<Self> {
        options.validate()?;
        Ok(Self {
            split: SplitHasher::new(options.seed),
            options,
            sites: BTreeMap::new(),
            provenance: BTreeMap::new(),
            examples: ProbeExamples::default(),
            started: Instant::now(),
        })
    }

    /// Adds fit-part labelled examples of one site for the probes (`labels[i]`: whether row
    /// `i`'s computation carries the concept; one label per computation). Route them with
    /// [`MonitorFitter::is_calibration`] like reference traces: the calibration part goes to
    /// [`MonitorCalibrator::push_example_calibration`]. A monitor without probes refuses them.
    pub fn push_examples<S: AsRef<str>>(
        &mut self,
        site: &str,
        trace_ids: &[S],
        rows: &[f32],
        dim: usize,
        labels: &[bool],
    ) -> Result<()> {
        if self.options.probes.is_empty() {
            return Err(Error::InvalidOption(
                "labelled examples were given, but the monitor has no probe to fit on them \
                 (ask for one, e.g. --probe NAME)"
                    .into(),
            ));
        }
        self.examples
            .push_labelled(site, trace_ids, rows, dim, labels)
    }

    /// Whether a probe fits on reference traffic too (`reference_negatives`): then pass the fit
    /// part's traces with their computations to [`MonitorFitter::push_reference_negatives`] as
    /// well as to [`MonitorFitter::push_fit`].
    pub fn wants_reference_negatives(&self) -> bool {
        self.options.probes.iter().any(|p| p.reference_negatives)
    }

    /// Fit-part reference traces of one site, kept as negatives for the probes that ask for them.
    pub fn push_reference_negatives<S: AsRef<str>>(
        &mut self,
        site: &str,
        trace_ids: &[S],
        rows: &[f32],
        dim: usize,
    ) -> Result<()> {
        if !self.wants_reference_negatives() {
            return Ok(());
        }
        self.examples.push_reference(site, trace_ids, rows, dim)
    }

    /// Records what produced reference traces of `site` (call it for every reference batch,
    /// calibration part included, that declares a provenance). Every field is fixed by the
    /// first batch that declares it; a batch that declares another value is refused
    /// ([`Error::Provenance`]): one site's reference traces must come from one capture path.
    pub fn record_provenance(&mut self, site: &str, provenance: &Provenance) -> Result<()> {
        if provenance.is_empty() {
            return Ok(());
        }
        let recorded = self.provenance.entry(site.to_string()).or_default();
        recorded
            .merge(provenance)
            .map_err(|conflict| Error::Provenance {
                site: site.to_string(),
                conflict,
                scoring: false,
            })
    }

    /// What produced `site`'s reference traces, as recorded so far.
    pub fn provenance(&self, site: &str) -> Option<&Provenance> {
        self.provenance.get(site)
    }

    pub fn options(&self) -> &MonitorOptions {
        &self.options
    }

    /// Whether this computation belongs to the calibration part (a pure function of seed and id).
    pub fn is_calibration(&self, trace_id: &str) -> bool {
        self.split.unit(trace_id) < self.options.calibration_fraction
    }

    /// Adds fit-part traces of one site (`rows`: row-major, `dim` wide).
    pub fn push_fit(&mut self, site: &str, rows: &[f32], dim: usize) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        if !self.sites.contains_key(site) {
            let fitters = self
                .options
                .detectors
                .iter()
                .map(|d| d.fitter(dim))
                .collect::<Result<Vec<_>>>()?;
            self.sites.insert(
                site.to_string(),
                SiteFitter {
                    dim,
                    fitters,
                    traces: 0,
                },
            );
        }
        let s = self.sites.get_mut(site).expect("inserted above");
        if dim != s.dim {
            return Err(actwatch_core::Error::WidthMismatch {
                expected: s.dim,
                got: dim,
            }
            .into());
        }
        for f in &mut s.fitters {
            f.push_batch(rows)?;
        }
        s.traces += (rows.len() / dim) as u64;
        Ok(())
    }

    /// An empty fitter with the same options, for one part of the reference traces: fit parts
    /// apart (on other threads, processes or machines), then [`MonitorFitter::merge`] them in
    /// order.
    pub fn part(&self) -> Self {
        Self {
            split: self.split,
            options: self.options.clone(),
            sites: BTreeMap::new(),
            provenance: BTreeMap::new(),
            examples: ProbeExamples::default(),
            started: Instant::now(),
        }
    }

    /// Adds everything a fitter of the same options saw on the part of the traces that follows
    /// `self`'s. Merging parts in order gives, to the bit, the fitter that folds the same parts
    /// one after the other: the Gaussian statistics fold on a fixed grid of rows within a part
    /// and merge exactly across parts ([`crate::gaussian::GaussianFitter`]), the kNN sample is a
    /// function of the rows kept ([`crate::knn::KnnFitter`]), examples and provenance append.
    /// Fitters of other options are refused ([`Error::InvalidOption`]).
    pub fn merge(&mut self, other: MonitorFitter) -> Result<()> {
        let json = |o: &MonitorOptions| serde_json::to_string(o).unwrap_or_default();
        if json(&self.options) != json(&other.options) {
            return Err(Error::InvalidOption(
                "cannot merge fit states of monitors with different options".into(),
            ));
        }
        for (name, s) in &other.sites {
            if let Some(mine) = self.sites.get(name) {
                if mine.dim != s.dim {
                    return Err(Error::SiteWidth {
                        site: name.clone(),
                        expected: mine.dim,
                        got: s.dim,
                    });
                }
            }
        }
        for (name, p) in &other.provenance {
            self.record_provenance(name, p)?;
        }
        self.examples.merge(&other.examples)?;
        for (name, s) in other.sites {
            match self.sites.get_mut(&name) {
                None => {
                    self.sites.insert(name, s);
                }
                Some(mine) => {
                    for (a, b) in mine.fitters.iter_mut().zip(&s.fitters) {
                        a.merge(b)?;
                    }
                    mine.traces += s.traces;
                }
            }
        }
        Ok(())
    }

    /// Fit-part traces pushed so far, over all sites.
    pub fn fit_traces(&self) -> u64 {
        self.sites.values().map(|s| s.traces).sum()
    }

    /// Fits every detector and moves on to calibration.
    pub fn finish_fit(self) -> Result<MonitorCalibrator> {
        if self.sites.is_empty() {
            return Err(Error::NotEnoughData(
                "no reference traces in the fit part (is the input empty?)".into(),
            ));
        }
        let mut sites = Vec::with_capacity(self.sites.len());
        let mut provenance = self.provenance;
        for (name, s) in self.sites {
            let detectors = s
                .fitters
                .into_iter()
                .map(DetectorFitter::finish)
                .collect::<Result<Vec<_>>>()
                .map_err(|e| match e {
                    Error::NotEnoughData(m) => Error::NotEnoughData(format!("site {name}: {m}")),
                    e => e,
                })?;
            sites.push(PendingSite {
                recall: vec![(0, 0.0); detectors.len()],
                cal_scores: vec![Vec::new(); detectors.len()],
                provenance: provenance.remove(&name).unwrap_or_default(),
                name,
                dim: s.dim,
                detectors,
                fit_traces: s.traces,
            });
        }
        let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        let dims: Vec<usize> = sites.iter().map(|s| s.dim).collect();
        let probes = probes::fit_probes(&self.options, &self.examples, &names, &dims)?;
        let fit_seconds = self.started.elapsed().as_secs_f64();
        let joint = JointPhase::start(&self.options, &sites)?;
        Ok(MonitorCalibrator {
            joint,
            probes,
            split: self.split,
            site_index: sites
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name.clone(), i))
                .collect(),
            sites,
            options: self.options,
            computations: HashMap::new(),
            fit_seconds,
            started: Instant::now(),
        })
    }
}

/// Per computation (a row of `n_slots` running aggregates in `comp_agg`), the statistic its slots
/// fuse into; a slot without evidence counts as p = 1 ([`Fusion::fuse_slots`]).
pub(crate) fn fuse_computations(
    comp_agg: &[AggState],
    n_slots: usize,
    agg: Aggregation,
    fusion: Fusion,
) -> Vec<f64> {
    let mut values = Vec::with_capacity(n_slots);
    comp_agg
        .chunks_exact(n_slots)
        .map(|row| {
            values.clear();
            values.extend(row.iter().map(|st| agg.value(st).unwrap_or(f64::NAN)));
            fusion.fuse_slots(&values)
        })
        .collect()
}

/// What a serialised [`MonitorFitter`] holds (written through a borrow, read back owned). The
/// options travel as JSON text: their detector list is an internally tagged enum, which compact
/// binary formats such as bincode cannot decode.
#[derive(serde::Serialize)]
struct FitterStateRef<'a> {
    options_json: String,
    sites: &'a BTreeMap<String, SiteFitter>,
    provenance: &'a BTreeMap<String, Provenance>,
    examples: &'a ProbeExamples,
}

#[derive(serde::Deserialize)]
struct FitterState {
    options_json: String,
    sites: BTreeMap<String, SiteFitter>,
    provenance: BTreeMap<String, Provenance>,
    examples: ProbeExamples,
}

impl serde::Serialize for MonitorFitter {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        FitterStateRef {
            options_json: serde_json::to_string(&self.options)
                .map_err(serde::ser::Error::custom)?,
            sites: &self.sites,
            provenance: &self.provenance,
            examples: &self.examples,
        }
        .serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for MonitorFitter {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let state = FitterState::deserialize(deserializer)?;
        let options = serde_json::from_str(&state.options_json).map_err(D::Error::custom)?;
        let mut fitter = MonitorFitter::new(options).map_err(D::Error::custom)?;
        fitter.sites = state.sites;
        fitter.provenance = state.provenance;
        fitter.examples = state.examples;
        fitter.check_state().map_err(D::Error::custom)?;
        Ok(fitter)
    }
}

impl MonitorFitter {
    /// Checks a deserialised fitter (bytes from another process or a checkpoint, checksummed but
    /// not necessarily written by a fitter): every site's detector fitters are the options' own,
    /// of the site's width, with buffers of that shape; provenance and examples valid. What
    /// decodes can then be merged, folded into and finished without a panic.
    fn check_state(&self) -> Result<()> {
        for (name, s) in &self.sites {
            let bad = |why: String| {
                Error::InvalidOption(format!("corrupt fit state of site {name:?}: {why}"))
            };
            if s.fitters.len() != self.options.detectors.len() {
                return Err(bad(format!(
                    "{} fitters for {} detectors",
                    s.fitters.len(),
                    self.options.detectors.len()
                )));
            }
            for (f, spec) in s.fitters.iter().zip(&self.options.detectors) {
                f.check_state(spec, s.dim).map_err(|e| bad(e.to_string()))?;
            }
        }
        for p in self.provenance.values() {
            p.validate()?;
        }
        self.examples.check_state()
    }
}

struct PendingSite {
    name: String,
    dim: usize,
    detectors: Vec<FittedDetector>,
    fit_traces: u64,
    provenance: Provenance,
    /// Per detector: (calibration computation index, raw score) of every calibration trace.
    cal_scores: Vec<Vec<(u32, f64)>>,
    /// Per detector: (queries measured, sum of recall × queries) for HNSW detectors.
    recall: Vec<(usize, f64)>,
}

impl PendingSite {
    /// Builds this site's calibrations from its calibration traces' raw scores, and pushes each
    /// trace's leave-one-out `-ln p`, in arrival order, into its computation's running aggregate
    /// in `comp_agg` (`n_slots` per computation; this site's slots start at `slot0`).
    /// Each computation's length (its most traces at one site) is raised to its count here in
    /// `comp_len`.
    fn calibrate(
        self,
        options: &MonitorOptions,
        comp_agg: &mut [AggState],
        comp_len: &mut [u64],
        n_slots: usize,
        slot0: usize,
    ) -> Result<(SiteModel, Vec<KnnRecall>)> {
        let (fusion, agg) = (options.fusion, options.aggregation);
        let cal_traces = self.cal_scores.first().map_or(0, Vec::len);
        if cal_traces == 0 {
            return Err(Error::NotEnoughData(format!(
                "site {} has no calibration traces",
                self.name
            )));
        }
        let calibrations = self
            .cal_scores
            .iter()
            .map(|v| Calibration::new(v.iter().map(|(_, x)| *x).collect()))
            .collect::<Result<Vec<_>>>()?;
        let mut trace_stats = Vec::with_capacity(cal_traces);
        let mut nlps = vec![0.0; self.detectors.len()];
        let mut here = vec![0u64; comp_len.len()];
        for t in 0..cal_traces {
            let comp = self.cal_scores[0][t].0 as usize;
            here[comp] += 1;
            comp_len[comp] = comp_len[comp].max(here[comp]);
            for (j, cal) in calibrations.iter().enumerate() {
                let (c, raw) = self.cal_scores[j][t];
                debug_assert_eq!(c as usize, comp);
                nlps[j] = cal.smooth_neg_log_p(raw, true);
                agg.push(&mut comp_agg[comp * n_slots + slot0 + j], nlps[j]);
            }
            trace_stats.push(fusion.statistic(&nlps));
        }
        let recall = self
            .recall
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| *n > 0)
            .map(|(j, (n, sum))| KnnRecall {
                site: self.name.clone(),
                detector: j,
                queries: *n,
                k: RECALL_K,
                recall: sum / *n as f64,
            })
            .collect();
        let site = SiteModel {
            name: self.name,
            dim: self.dim,
            detectors: self.detectors,
            calibrations,
            trace_fused: Calibration::new(trace_stats)?,
            fit_traces: self.fit_traces,
            calibration_traces: cal_traces as u64,
            provenance: self.provenance,
        };
        Ok((site, recall))
    }
}

/// The joint detector's part of the second phase ([`crate::joint`]): its fit pass over the fit
/// part, then its calibration pass.
enum JointPhase {
    /// Nothing to fit: not asked for (`None`), or skipped (why).
    Off(Option<JointSummary>),
    Fitting {
        summary: JointSummary,
        /// Every part ended so far, merged in order.
        fitters: Vec<DetectorFitter>,
        /// The current part ([`MonitorCalibrator::end_part`] merges it into `fitters`).
        part: Vec<DetectorFitter>,
        joins: Joins,
        map: JointMap,
    },
    Calibrating {
        summary: JointSummary,
        site: Box<PendingSite>,
        joins: Joins,
        map: JointMap,
    },
}

/// Per computation, its traces waiting for the other sites, and the bytes they hold.
#[derive(Default)]
struct Joins {
    by_id: HashMap<String, Joiner>,
    bytes: usize,
}

impl Joins {
    /// Adds a batch of one site's traces; returns the completed joint vectors (row-major) and
    /// their computations, in completion order.
    #[allow(clippy::too_many_arguments)]
    fn add<S: AsRef<str>>(
        &mut self,
        map: &JointMap,
        n_sites: usize,
        site: usize,
        detectors: &[FittedDetector],
        trace_ids: &[S],
        rows: &[f32],
    ) -> Result<(Vec<String>, Vec<f32>)> {
        let mut ids = Vec::new();
        let mut joint = Vec::new();
        let parts = map.map_rows(site, rows, detectors)?;
        let width = map.part_width(site);
        for (id, row) in trace_ids.iter().zip(parts.chunks_exact(width)) {
            let id = id.as_ref();
            let j = match self.by_id.get_mut(id) {
                Some(j) => j,
                None => self
                    .by_id
                    .entry(id.to_string())
                    .or_insert_with(|| Joiner::new(n_sites)),
            };
            if let Some((_, v)) =
                j.add(site, None, row, &mut self.bytes, JOINT_PENDING_MAX_BYTES)?
            {
                ids.push(id.to_string());
                joint.extend_from_slice(&v);
            }
        }
        Ok((ids, joint))
    }

    fn incomplete(&self) -> u64 {
        self.by_id.values().map(|j| j.incomplete() as u64).sum()
    }
}

impl JointPhase {
    fn start(options: &MonitorOptions, sites: &[PendingSite]) -> Result<Self> {
        if options.joint.is_empty() {
            return Ok(JointPhase::Off(None));
        }
        if sites.iter().any(|s| s.name == JOINT_SITE) {
            return Err(Error::InvalidOption(format!(
                "a site is named {JOINT_SITE:?}, the name of the joint detector's slots: rename \
                 it or fit without a joint detector"
            )));
        }
        let summary = JointSummary {
            sites: sites.iter().map(|s| s.name.clone()).collect(),
            width: sites.iter().map(|s| s.dim).sum(),
            ..JointSummary::default()
        };
        let skip = |why: String| {
            Ok(JointPhase::Off(Some(JointSummary {
                skipped: Some(why),
                ..summary.clone()
            })))
        };
        if sites.len() < 2 {
            return skip("one site: a joint detector would repeat its own detectors".into());
        }
        let map = match JointMap::new(&joint_inputs(
            sites.iter().map(|s| (s.dim, &s.detectors[..])),
        )) {
            Ok(map) => map,
            Err(why) => return skip(why),
        };
        let summary = JointSummary {
            width: map.width(),
            site_widths: map.part_widths(),
            ..summary
        };
        let fitters = options
            .joint
            .iter()
            .map(|d| d.fitter(map.width()))
            .collect::<Result<Vec<_>>>()?;
        Ok(JointPhase::Fitting {
            summary,
            part: fitters.clone(),
            fitters,
            joins: Joins::default(),
            map,
        })
    }
}

/// Per site: its width and its first fitted Gaussian (its index among the site's detectors, and
/// it), what [`JointMap::new`] takes.
pub(crate) fn joint_inputs<'a>(
    sites: impl Iterator<Item = (usize, &'a [FittedDetector])>,
) -> Vec<(usize, Option<(usize, &'a crate::GaussianDetector)>)> {
    sites
        .map(|(dim, detectors)| {
            let g = detectors.iter().enumerate().find_map(|(i, d)| match d {
                FittedDetector::Gaussian(g) => Some((i, g)),
                FittedDetector::Knn(_) => None,
            });
            (dim, g)
        })
        .collect()
}

/// The index of calibration computation `id` (0, 1, 2, ... in order of first appearance).
fn computation_index(computations: &mut HashMap<String, u32>, id: &str) -> u32 {
    if let Some(&i) = computations.get(id) {
        return i;
    }
    let next = computations.len() as u32;
    computations.insert(id.to_string(), next);
    next
}

/// Second phase of fitting: push the calibration part, then [`MonitorCalibrator::finish`].
///
/// With a joint detector ([`MonitorCalibrator::joint_wanted`]), the same pass also pushes the fit
/// part's traces with [`MonitorCalibrator::push_joint_fit`] (the joint vectors need every site,
/// known only now), then [`MonitorCalibrator::finish_joint_fit`], and a third pass pushes the
/// calibration part again with [`MonitorCalibrator::push_joint_calibration`].
pub struct MonitorCalibrator {
    joint: JointPhase,
    probes: Vec<PendingProbe>,
    options: MonitorOptions,
    split: SplitHasher,
    sites: Vec<PendingSite>,
    site_index: HashMap<String, usize>,
    computations: HashMap<String, u32>,
    fit_seconds: f64,
    started: Instant,
}

/// What the calibration pass over one part of the reference traces found: per site and detector
/// the raw score of every calibration trace, with its computation. Calibrators of the same fit
/// each score a part ([`MonitorCalibrator::take_part`]); one of them absorbs the parts in order
/// ([`MonitorCalibrator::absorb`]) and finishes, which gives the monitor one calibrator over all
/// the parts gives, to the bit (a computation's traces must lie in one part, or in parts
/// absorbed in order, since its aggregate follows arrival order).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CalibrationPart {
    /// Computation ids in order of first appearance (the part's computation indices).
    computations: Vec<String>,
    /// Per site: per detector, (computation index, raw score) of every calibration trace.
    sites: BTreeMap<String, Vec<Vec<(u32, f64)>>>,
    /// Per site: per detector, (queries measured, sum of recall x queries) for HNSW detectors.
    recall: BTreeMap<String, Vec<(usize, f64)>>,
    /// The joint detectors' fit statistics of the part (the calibration pass's fit rows).
    joint_fit: Option<Vec<DetectorFitter>>,
    /// Per joint detector, (computation index, raw score) of the part's joint calibration vectors.
    joint_scores: Option<Vec<Vec<(u32, f64)>>>,
    /// Joint vectors fitted / scored, and positions left without one, in the part.
    joint_rows: u64,
    joint_incomplete: u64,
}

impl CalibrationPart {
    /// Calibration computations seen in this part.
    pub fn computations(&self) -> usize {
        self.computations.len()
    }
}

impl MonitorCalibrator {
    /// Refuses what a calibration in parts cannot do yet: concept probes (their calibration
    /// examples are held by one calibrator).
    fn check_partable(&self) -> Result<()> {
        if !self.options.probes.is_empty() {
            return Err(Error::InvalidOption(
                "a fit in parts cannot fit concept probes yet: fit monitors with probes in one \
                 process (actwatch fit --examples)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Hands out what this calibrator gathered so far, as a part to
    /// [`MonitorCalibrator::absorb`] elsewhere, and starts over empty: the raw scores of the
    /// calibration traces ([`MonitorCalibrator::push_calibration`]), and with a joint detector the
    /// statistics of its fit rows ([`MonitorCalibrator::push_joint_fit`]) or, once it is fitted,
    /// its raw scores ([`MonitorCalibrator::push_joint_calibration`]). A joint vector needs every
    /// site of its computation: a computation whose traces span parts has none.
    pub fn take_part(&mut self) -> Result<CalibrationPart> {
        self.check_partable()?;
        self.end_part()?;
        let mut computations = vec![String::new(); self.computations.len()];
        for (id, c) in self.computations.drain() {
            computations[c as usize] = id;
        }
        let mut part = CalibrationPart {
            computations,
            ..CalibrationPart::default()
        };
        for s in &mut self.sites {
            let k = s.detectors.len();
            let scores = std::mem::replace(&mut s.cal_scores, vec![Vec::new(); k]);
            if scores.iter().any(|v| !v.is_empty()) {
                part.sites.insert(s.name.clone(), scores);
            }
            let recall = std::mem::replace(&mut s.recall, vec![(0, 0.0); k]);
            if recall.iter().any(|r| r.0 > 0) {
                part.recall.insert(s.name.clone(), recall);
            }
        }
        match &mut self.joint {
            JointPhase::Off(_) => {}
            JointPhase::Fitting {
                summary,
                fitters,
                joins,
                ..
            } => {
                let fresh: Vec<DetectorFitter> = fitters.iter().map(|f| f.emptied()).collect();
                part.joint_fit = Some(std::mem::replace(fitters, fresh));
                part.joint_rows = std::mem::take(&mut summary.fit_rows);
                part.joint_incomplete =
                    std::mem::take(&mut summary.incomplete) + std::mem::take(joins).incomplete();
            }
            JointPhase::Calibrating {
                summary,
                site,
                joins,
                ..
            } => {
                let k = site.detectors.len();
                part.joint_scores =
                    Some(std::mem::replace(&mut site.cal_scores, vec![Vec::new(); k]));
                part.joint_rows = std::mem::take(&mut summary.calibration_rows);
                part.joint_incomplete = std::mem::take(joins).incomplete();
            }
        }
        Ok(part)
    }

    /// The joint detectors' fit statistics gathered so far (absorbed parts included), as a part
    /// for the workers of the joint calibration pass: each absorbs it, calls
    /// [`MonitorCalibrator::finish_joint_fit`] and scores its calibration traces with
    /// [`MonitorCalibrator::push_joint_calibration`].
    pub fn joint_fit_part(&mut self) -> Result<CalibrationPart> {
        self.end_part()?;
        match &self.joint {
            JointPhase::Fitting {
                summary, fitters, ..
            } => Ok(CalibrationPart {
                joint_fit: Some(fitters.clone()),
                joint_rows: summary.fit_rows,
                ..CalibrationPart::default()
            }),
            _ => Err(Error::InvalidOption(
                "no joint detector is being fitted".into(),
            )),
        }
    }

    /// Adds a part after those gathered so far (see [`CalibrationPart`]). A part of another fit
    /// (unknown site, other detector count, a joint phase this calibrator is not in) is refused.
    pub fn absorb(&mut self, part: CalibrationPart) -> Result<()> {
        self.check_partable()?;
        let foreign = |what: &str| {
            Error::InvalidOption(format!(
                "the calibration part {what} (a part of another fit, or of another pass?)"
            ))
        };
        for (name, scores) in &part.sites {
            let ok = self
                .site_index
                .get(name)
                .is_some_and(|&si| self.sites[si].detectors.len() == scores.len());
            if !ok {
                return Err(foreign(&format!(
                    "has scores of a site {name:?} this fit lacks"
                )));
            }
        }
        // Every detector of a site scored the same traces (calibration reads them in lockstep).
        let aligned = |scores: &[Vec<(u32, f64)>]| {
            scores.windows(2).all(|w| {
                w[0].len() == w[1].len() && w[0].iter().zip(&w[1]).all(|(a, b)| a.0 == b.0)
            })
        };
        if !part.sites.values().all(|s| aligned(s))
            || !part.joint_scores.as_deref().is_none_or(aligned)
        {
            return Err(foreign(
                "has detectors that scored different traces (corrupt)",
            ));
        }
        if let (JointPhase::Fitting { fitters, .. }, Some(theirs)) = (&self.joint, &part.joint_fit)
        {
            for (mine, t) in fitters.iter().zip(theirs) {
                t.check_as(mine)
                    .map_err(|e| foreign(&format!("holds a corrupt joint fitter ({e})")))?;
            }
        }
        let n = part.computations.len();
        let bad_index = part
            .sites
            .values()
            .flatten()
            .chain(part.joint_scores.iter().flatten())
            .flatten()
            .any(|&(c, _)| c as usize >= n);
        if bad_index {
            return Err(foreign("refers to a computation it does not list"));
        }
        match (&mut self.joint, &part.joint_fit, &part.joint_scores) {
            (_, None, None) => {}
            (JointPhase::Fitting { fitters, .. }, Some(theirs), None)
                if fitters.len() == theirs.len() => {}
            (JointPhase::Calibrating { site, .. }, None, Some(theirs))
                if site.detectors.len() == theirs.len() => {}
            _ => return Err(foreign("is of a joint phase this calibrator is not in")),
        }
        let map: Vec<u32> = part
            .computations
            .iter()
            .map(|id| computation_index(&mut self.computations, id))
            .collect();
        for (name, scores) in part.sites {
            let s = &mut self.sites[self.site_index[&name]];
            for (mine, theirs) in s.cal_scores.iter_mut().zip(scores) {
                mine.extend(theirs.into_iter().map(|(c, x)| (map[c as usize], x)));
            }
        }
        for (name, recall) in part.recall {
            if let Some(&si) = self.site_index.get(&name) {
                for (mine, (done, sum)) in self.sites[si].recall.iter_mut().zip(recall) {
                    mine.0 += done;
                    mine.1 += sum;
                }
            }
        }
        match &mut self.joint {
            JointPhase::Fitting {
                summary, fitters, ..
            } => {
                if let Some(theirs) = part.joint_fit {
                    for (f, t) in fitters.iter_mut().zip(&theirs) {
                        f.merge(t)?;
                    }
                    summary.fit_rows += part.joint_rows;
                    summary.incomplete += part.joint_incomplete;
                }
            }
            JointPhase::Calibrating { summary, site, .. } => {
                if let Some(theirs) = part.joint_scores {
                    for (mine, t) in site.cal_scores.iter_mut().zip(theirs) {
                        mine.extend(t.into_iter().map(|(c, x)| (map[c as usize], x)));
                    }
                    summary.calibration_rows += part.joint_rows;
                    summary.incomplete += part.joint_incomplete;
                }
            }
            JointPhase::Off(_) => {}
        }
        Ok(())
    }
}

impl MonitorCalibrator {
    pub fn options(&self) -> &MonitorOptions {
        &self.options
    }

    /// Whether this computation belongs to the calibration part (the same split as the fit phase).
    pub fn is_calibration(&self, trace_id: &str) -> bool {
        self.split.unit(trace_id) < self.options.calibration_fraction
    }

    /// Scores calibration traces of one site. `trace_ids[i]` is the computation of row `i`.
    pub fn push_calibration<S: AsRef<str>>(
        &mut self,
        trace_ids: &[S],
        site: &str,
        rows: &[f32],
    ) -> Result<()> {
        if trace_ids.is_empty() {
            return Ok(());
        }
        let Some(&si) = self.site_index.get(site) else {
            return Err(Error::NotEnoughData(format!(
                "site {site} has calibration traces but no fit traces"
            )));
        };
        let s = &mut self.sites[si];
        if rows.len() != trace_ids.len() * s.dim {
            return Err(actwatch_core::Error::WidthMismatch {
                expected: s.dim,
                got: rows.len() / trace_ids.len().max(1),
            }
            .into());
        }
        for p in &mut self.probes {
            p.push(si, trace_ids, rows, None)?;
        }
        let comps: Vec<u32> = trace_ids
            .iter()
            .map(|id| computation_index(&mut self.computations, id.as_ref()))
            .collect();
        for (j, det) in s.detectors.iter().enumerate() {
            let raw = det.score_batch(rows)?;
            s.cal_scores[j].extend(comps.iter().copied().zip(raw));
            if let FittedDetector::Knn(knn) = det {
                let (done, _) = s.recall[j];
                if !knn.is_exact() && done < RECALL_SAMPLE {
                    let take = (RECALL_SAMPLE - done).min(trace_ids.len());
                    if let Some(r) = knn.measure_recall(&rows[..take * s.dim], RECALL_K)? {
                        s.recall[j].0 += take;
                        s.recall[j].1 += r * take as f64;
                    }
                }
            }
        }
        Ok(())
    }

    /// Calibration-part labelled examples of one site (routed with
    /// [`MonitorCalibrator::is_calibration`]): the negatives join the probes' benign calibration
    /// computations, the positives are held out to measure recall. Never seen by the detectors.
    pub fn push_example_calibration<S: AsRef<str>>(
        &mut self,
        trace_ids: &[S],
        site: &str,
        rows: &[f32],
        labels: &[bool],
    ) -> Result<()> {
        if self.options.probes.is_empty() {
            return Err(Error::InvalidOption(
                "labelled examples were given, but the monitor has no probe to fit on them".into(),
            ));
        }
        if labels.len() != trace_ids.len() {
            return Err(Error::InvalidOption(format!(
                "{} labels for {} traces",
                labels.len(),
                trace_ids.len()
            )));
        }
        if trace_ids.is_empty() {
            return Ok(());
        }
        let Some(&si) = self.site_index.get(site) else {
            return Err(Error::NotEnoughData(format!(
                "site {site} has labelled examples but no reference traces"
            )));
        };
        let dim = self.sites[si].dim;
        if rows.len() != trace_ids.len() * dim {
            return Err(actwatch_core::Error::WidthMismatch {
                expected: dim,
                got: rows.len() / trace_ids.len(),
            }
            .into());
        }
        for p in &mut self.probes {
            p.push(si, trace_ids, rows, Some(labels))?;
        }
        Ok(())
    }

    /// Whether a joint detector waits for [`MonitorCalibrator::push_joint_fit`] (and then the
    /// rest of its passes).
    pub fn joint_wanted(&self) -> bool {
        matches!(self.joint, JointPhase::Fitting { .. })
    }

    /// Whether the joint detector waits for its calibration pass
    /// ([`MonitorCalibrator::push_joint_calibration`]).
    pub fn joint_calibrating(&self) -> bool {
        matches!(self.joint, JointPhase::Calibrating { .. })
    }

    /// Fit-part traces of one site for the joint detector (the same rows as given to
    /// [`MonitorFitter::push_fit`], with their computations); a no-op unless
    /// [`MonitorCalibrator::joint_wanted`].
    pub fn push_joint_fit<S: AsRef<str>>(
        &mut self,
        trace_ids: &[S],
        site: &str,
        rows: &[f32],
    ) -> Result<()> {
        let (n_sites, si) = self.site_of(site, rows, trace_ids.len())?;
        let JointPhase::Fitting {
            summary,
            part,
            joins,
            map,
            ..
        } = &mut self.joint
        else {
            return Ok(());
        };
        let (ids, joint) =
            joins.add(map, n_sites, si, &self.sites[si].detectors, trace_ids, rows)?;
        if !ids.is_empty() {
            for f in part.iter_mut() {
                f.push_batch(&joint)?;
            }
            summary.fit_rows += ids.len() as u64;
        }
        Ok(())
    }

    /// Ends a part of the calibration pass (call it after each file): the joint detector's fit
    /// statistics of the part are merged into those of the parts before it, as
    /// [`MonitorCalibrator::absorb`] merges the parts of other workers, so that a fit in parts
    /// and a fit in one process fold the same parts the same way. A no-op without a joint
    /// detector in its fit pass.
    pub fn end_part(&mut self) -> Result<()> {
        if let JointPhase::Fitting { fitters, part, .. } = &mut self.joint {
            for (f, p) in fitters.iter_mut().zip(part.iter_mut()) {
                let fresh = p.emptied();
                f.merge(&std::mem::replace(p, fresh))?;
            }
        }
        Ok(())
    }

    /// Fits the joint detectors on what [`MonitorCalibrator::push_joint_fit`] joined; a fit part
    /// with no complete joint vector skips the joint detector (and the fit says why).
    pub fn finish_joint_fit(&mut self) -> Result<()> {
        self.end_part()?;
        let phase = std::mem::replace(&mut self.joint, JointPhase::Off(None));
        self.joint = match phase {
            JointPhase::Fitting {
                mut summary,
                fitters,
                joins,
                map,
                ..
            } => {
                summary.incomplete += joins.incomplete();
                if summary.fit_rows == 0 {
                    summary.skipped = Some(
                        "no fit computation has a trace at every site at the same position".into(),
                    );
                    JointPhase::Off(Some(summary))
                } else {
                    let detectors = fitters
                        .into_iter()
                        .map(DetectorFitter::finish)
                        .collect::<Result<Vec<_>>>()
                        .map_err(|e| match e {
                            Error::NotEnoughData(m) => {
                                Error::NotEnoughData(format!("joint detector: {m}"))
                            }
                            e => e,
                        })?;
                    let n = detectors.len();
                    JointPhase::Calibrating {
                        site: Box::new(PendingSite {
                            name: JOINT_SITE.to_string(),
                            dim: summary.width,
                            detectors,
                            fit_traces: summary.fit_rows,
                            provenance: Provenance::default(),
                            cal_scores: vec![Vec::new(); n],
                            recall: vec![(0, 0.0); n],
                        }),
                        summary,
                        joins: Joins::default(),
                        map,
                    }
                }
            }
            other => other,
        };
        Ok(())
    }

    /// Calibration-part traces of one site for the joint detector (the same rows as given to
    /// [`MonitorCalibrator::push_calibration`]); a no-op unless
    /// [`MonitorCalibrator::joint_calibrating`].
    pub fn push_joint_calibration<S: AsRef<str>>(
        &mut self,
        trace_ids: &[S],
        site: &str,
        rows: &[f32],
    ) -> Result<()> {
        let (n_sites, si) = self.site_of(site, rows, trace_ids.len())?;
        let JointPhase::Calibrating {
            summary,
            site: joint_site,
            joins,
            map,
        } = &mut self.joint
        else {
            return Ok(());
        };
        let (ids, joint) =
            joins.add(map, n_sites, si, &self.sites[si].detectors, trace_ids, rows)?;
        if ids.is_empty() {
            return Ok(());
        }
        summary.calibration_rows += ids.len() as u64;
        let comps: Vec<u32> = ids
            .iter()
            .map(|id| computation_index(&mut self.computations, id))
            .collect();
        for (j, det) in joint_site.detectors.iter().enumerate() {
            let raw = det.score_batch(&joint)?;
            joint_site.cal_scores[j].extend(comps.iter().copied().zip(raw));
        }
        Ok(())
    }

    /// (number of sites, index) of `site`, checking that `rows` holds `n` of its vectors.
    fn site_of(&self, site: &str, rows: &[f32], n: usize) -> Result<(usize, usize)> {
        let Some(&si) = self.site_index.get(site) else {
            return Err(Error::NotEnoughData(format!(
                "site {site} has calibration traces but no fit traces"
            )));
        };
        let dim = self.sites[si].dim;
        if rows.len() != n * dim {
            return Err(actwatch_core::Error::WidthMismatch {
                expected: dim,
                got: rows.len() / n.max(1),
            }
            .into());
        }
        Ok((self.sites.len(), si))
    }

    /// Builds every calibration and the fused computation-level calibration.
    pub fn finish(mut self) -> Result<Monitor> {
        let n_comp = self.computations.len();
        let min_needed = (1.0 / self.options.fpr).ceil() as usize;
        if n_comp < min_needed {
            return Err(Error::NotEnoughData(format!(
                "{n_comp} calibration computations cannot calibrate a false-positive rate of {}: \
                 at least {min_needed} are needed (add reference data or raise --calibration-fraction)",
                self.options.fpr
            )));
        }
        // (A caller that never pushed joint traces gets a joint detector skipped, and says why.)
        self.finish_joint_fit()?;
        let (joint_site, joint_summary) = match self.joint {
            JointPhase::Fitting { .. } => unreachable!("finish_joint_fit ends the fitting phase"),
            JointPhase::Off(summary) => (None, summary),
            JointPhase::Calibrating {
                mut summary,
                site,
                joins,
                map: _,
            } => {
                summary.incomplete += joins.incomplete();
                if site.cal_scores.first().is_none_or(Vec::is_empty) {
                    summary.skipped = Some(
                        "no calibration computation has a trace at every site at the same \
                         position"
                            .into(),
                    );
                    (None, Some(summary))
                } else {
                    (Some(site), Some(summary))
                }
            }
        };
        let (fusion, agg) = (self.options.fusion, self.options.aggregation);
        let n_slots: usize = self.sites.iter().map(|s| s.detectors.len()).sum::<usize>()
            + joint_site.as_ref().map_or(0, |j| j.detectors.len());
        // Per computation and slot: the running aggregate of its traces' -ln p.
        let mut comp_agg: Vec<AggState> = (0..n_comp * n_slots).map(|_| agg.start()).collect();
        let mut comp_len = vec![0u64; n_comp];
        let mut sites = Vec::with_capacity(self.sites.len());
        let mut recall = Vec::new();
        let mut slot0 = 0;
        for s in self.sites {
            let k = s.detectors.len();
            let (site, site_recall) =
                s.calibrate(&self.options, &mut comp_agg, &mut comp_len, n_slots, slot0)?;
            sites.push(site);
            recall.extend(site_recall);
            slot0 += k;
        }
        let joint = match joint_site {
            // (joint vectors do not count towards a computation's length: they are positions
            // every site has, so never more than a site's traces)
            Some(j) => {
                let mut ignored = vec![0u64; n_comp];
                Some(
                    j.calibrate(&self.options, &mut comp_agg, &mut ignored, n_slots, slot0)?
                        .0,
                )
            }
            None => None,
        };
        let fused_scores = fuse_computations(&comp_agg, n_slots, agg, fusion);
        let fpr = self.options.fpr;
        let fused = LengthStrata::fit(
            &fused_scores,
            &comp_len,
            self.options.length_strata,
            min_needed,
        )?;
        // In-sample flag rate of the calibration computations, each judged leave-one-out within
        // its stratum.
        let flagged = fused_scores
            .iter()
            .zip(&comp_len)
            .filter(|&(&s, &l)| fused.member_p_value(s, l) <= fpr)
            .count();
        let threshold = |c: &Calibration| Some(c.threshold(fpr)).filter(|t| t.is_finite());
        let summary = FitSummary {
            fit_seconds: self.fit_seconds,
            calibration_seconds: self.started.elapsed().as_secs_f64(),
            calibration_computations: n_comp as u64,
            calibration_fpr: flagged as f64 / n_comp as f64,
            threshold: match fused.calibrations() {
                [only] => threshold(only),
                _ => None,
            },
            knn_recall: recall,
            joint: joint_summary,
            length_strata: fused
                .calibrations()
                .iter()
                .enumerate()
                .map(|(i, c)| LengthStratum {
                    max_length: fused.upper_bounds().get(i).copied(),
                    computations: c.len() as u64,
                    threshold: threshold(c),
                })
                .collect(),
        };
        let probes = self
            .probes
            .into_iter()
            .map(|p| p.finish(&self.options, min_needed))
            .collect::<Result<Vec<_>>>()?;
        Monitor::new(self.options, sites, joint, fused, summary, probes)
    }
}
