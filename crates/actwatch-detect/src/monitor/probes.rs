//! Concept probes inside a monitor: fitted on labelled examples, calibrated on benign traffic.
//!
//! A monitor answers two questions per computation: "is it unlike the trusted traffic?" (its
//! detectors) and, per probe, "is this concept present?". A probe follows the detectors' path
//! with its own data:
//!
//! 1. **Fit** ([`ProbeExamples`], in the [`super::MonitorFitter`]): the fit part of the labelled
//!    examples (the same seeded split by computation id as the reference traffic), optionally
//!    with the fit part of the reference traffic as extra negatives, held in memory up to
//!    [`MAX_PROBE_EXAMPLE_VALUES`]; one [`LinearProbe`] per site the probe reads. Every
//!    computation weighs the same whatever its number of traces (a long text does not outvote
//!    short ones).
//! 2. **Calibrate** ([`PendingProbe`], in the [`super::MonitorCalibrator`]): the *benign
//!    calibration computations* are the calibration part of the reference traffic plus the
//!    calibration part of the labelled negatives. Per site the probe's raw trace scores among
//!    their traces give a [`Calibration`] and a smoothed `-ln p`; per computation each site's
//!    `-ln p` aggregates over its traces (the probe's operator) and the sites fuse (the monitor's
//!    fusion), exactly as detector slots do; the fused statistics of the benign computations form
//!    the computation-level calibration, per length stratum. A probe's p-value is conformal among
//!    benign computations, so a probe flag has the same false-positive guarantee as an anomaly
//!    flag. The calibration part of the labelled *positives* is never fitted or calibrated on:
//!    it measures the recall at the target rate that the fit reports.

use std::collections::{BTreeMap, HashMap};

use crate::aggregate::{AggState, Aggregation};
use crate::calibration::Calibration;
use crate::fusion::Fusion;
use crate::probe::{
    choose_c, default_c_grid, difference_of_means, fit_logistic, LinearProbe, OwnedExamples,
    ProbeKind, ProbeSpec, DEFAULT_FOLDS,
};
use crate::strata::LengthStrata;
use crate::{Error, Result};

use super::MonitorOptions;

/// Most vector values (`f32`, over all sites) of labelled examples and reference negatives a fit
/// holds for its probes: 1 GiB. Probes are fitted by optimisation over all their examples, so
/// these are kept in memory, unlike the reference traffic, which is streamed.
pub const MAX_PROBE_EXAMPLE_VALUES: usize = 1 << 28;

/// Labelled examples (and reference negatives) of the fit part, per site. Labelled and
/// reference rows are kept apart, each in arrival order, and a fit orders computations by id:
/// so folding the same traces in another interleaving (an incremental fit: old reference, old
/// examples, new reference, new examples) gives the same probes to the bit.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct ProbeExamples {
    labelled: Rows,
    reference: Rows,
    values: usize,
}

/// Rows of one kind, per site, with their computations.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Rows {
    sites: BTreeMap<String, SiteExamples>,
    /// Computation id -> index into `labels`. Ordered, so that a fit state encodes to the same
    /// bytes every time (a hash map serialises in a random order).
    index: BTreeMap<String, u32>,
    /// Per computation its label (reference computations: false).
    labels: Vec<bool>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SiteExamples {
    dim: usize,
    rows: Vec<f32>,
    computations: Vec<u32>,
}

impl Rows {
    /// The computation index of `id`, adding it with `label`; a computation seen again with the
    /// other label is refused.
    fn computation(&mut self, id: &str, label: bool) -> Result<u32> {
        if let Some(&c) = self.index.get(id) {
            if self.labels[c as usize] != label {
                return Err(Error::InvalidOption(format!(
                    "computation {id:?} is labelled both 0 and 1; a label is per computation"
                )));
            }
            return Ok(c);
        }
        let c = u32::try_from(self.labels.len())
            .map_err(|_| Error::InvalidOption("more than 2^32 example computations".into()))?;
        self.labels.push(label);
        self.index.insert(id.to_string(), c);
        Ok(c)
    }

    /// Each computation's rank among this kind's computations ordered by id.
    fn ranks(&self) -> Vec<u32> {
        let mut by_id: Vec<(&str, u32)> =
            self.index.iter().map(|(id, &c)| (id.as_str(), c)).collect();
        by_id.sort_unstable();
        let mut rank = vec![0u32; self.labels.len()];
        for (r, (_, c)) in by_id.into_iter().enumerate() {
            rank[c as usize] = r as u32;
        }
        rank
    }
}

impl Rows {
    /// Checks a deserialised value: every computation indexed once (indices `0..n`, one label
    /// each), every site's rows whole and finite with one known computation per row. Returns the
    /// number of vector values held.
    fn check_state(&self) -> Result<usize> {
        let n = self.labels.len();
        let mut seen = vec![false; n];
        for &c in self.index.values() {
            match seen.get_mut(c as usize) {
                Some(s) if !*s => *s = true,
                _ => return Err(corrupt("a computation index out of range or repeated")),
            }
        }
        if self.index.len() != n {
            return Err(corrupt("labels and computations disagree"));
        }
        let mut values = 0usize;
        for ex in self.sites.values() {
            let rows = actwatch_core::check_rows(ex.dim, &ex.rows)?;
            if rows != ex.computations.len() || ex.computations.iter().any(|&c| c as usize >= n) {
                return Err(corrupt("rows and their computations disagree"));
            }
            values += ex.rows.len();
        }
        Ok(values)
    }

    /// Appends `other`'s rows, as the part that follows `self`'s.
    fn merge(&mut self, other: &Rows) -> Result<()> {
        let mut ids = vec![""; other.labels.len()];
        for (id, &c) in &other.index {
            ids[c as usize] = id;
        }
        let map = ids
            .iter()
            .zip(&other.labels)
            .map(|(id, &l)| self.computation(id, l))
            .collect::<Result<Vec<u32>>>()?;
        for (site, ex) in &other.sites {
            let comps: Vec<u32> = ex.computations.iter().map(|&c| map[c as usize]).collect();
            push(self, site, &comps, &ex.rows, ex.dim)?;
        }
        Ok(())
    }
}

/// A deserialised fit state whose probe examples do not hold together.
fn corrupt(why: &str) -> Error {
    Error::InvalidOption(format!("corrupt probe examples in a fit state: {why}"))
}

impl ProbeExamples {
    /// Checks a deserialised value (see `Rows::check_state`), and that it counts the values it
    /// holds.
    pub(crate) fn check_state(&self) -> Result<()> {
        let held = self.labelled.check_state()? + self.reference.check_state()?;
        if held != self.values || held > MAX_PROBE_EXAMPLE_VALUES {
            return Err(corrupt("the count of values held is wrong"));
        }
        Ok(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.labelled.labels.is_empty()
    }

    /// Appends the examples another fitter kept, as the part that follows `self`'s.
    pub(crate) fn merge(&mut self, other: &ProbeExamples) -> Result<()> {
        self.check_room(other.values)?;
        self.labelled.merge(&other.labelled)?;
        self.reference.merge(&other.reference)?;
        self.values += other.values;
        Ok(())
    }

    /// Adds fit-part labelled traces of one site; `labels[i]` is row `i`'s computation's label.
    pub(crate) fn push_labelled<S: AsRef<str>>(
        &mut self,
        site: &str,
        trace_ids: &[S],
        rows: &[f32],
        dim: usize,
        labels: &[bool],
    ) -> Result<()> {
        if labels.len() != trace_ids.len() {
            return Err(Error::InvalidOption(format!(
                "{} labels for {} traces",
                labels.len(),
                trace_ids.len()
            )));
        }
        let comps = trace_ids
            .iter()
            .zip(labels)
            .map(|(id, &l)| self.labelled.computation(id.as_ref(), l))
            .collect::<Result<Vec<_>>>()?;
        self.check_room(rows.len())?;
        push(&mut self.labelled, site, &comps, rows, dim)?;
        self.values += rows.len();
        Ok(())
    }

    /// Adds fit-part reference traces of one site (negatives for probes that ask for them).
    pub(crate) fn push_reference<S: AsRef<str>>(
        &mut self,
        site: &str,
        trace_ids: &[S],
        rows: &[f32],
        dim: usize,
    ) -> Result<()> {
        let comps = trace_ids
            .iter()
            .map(|id| self.reference.computation(id.as_ref(), false))
            .collect::<Result<Vec<_>>>()?;
        self.check_room(rows.len())?;
        push(&mut self.reference, site, &comps, rows, dim)?;
        self.values += rows.len();
        Ok(())
    }

    fn check_room(&self, values: usize) -> Result<()> {
        if self.values.saturating_add(values) > MAX_PROBE_EXAMPLE_VALUES {
            return Err(Error::NotEnoughData(format!(
                "the probes' examples would hold more than {MAX_PROBE_EXAMPLE_VALUES} vector values \
                 (1 GiB); fit the probes on fewer examples (or pooled traces), or without \
                 reference_negatives"
            )));
        }
        Ok(())
    }

    /// The examples of one probe at one site: labelled computations (and reference ones when
    /// `reference_negatives`), each computation weighing 1 over its rows there, the reference
    /// computations together as much as the labelled negatives; groups numbered by id (labelled
    /// first), so cross-validation folds do not depend on arrival order.
    fn at_site(&self, site: &str, reference_negatives: bool) -> Option<(OwnedExamples, Counts)> {
        let l = self.labelled.sites.get(site)?;
        let r = self
            .reference
            .sites
            .get(site)
            .filter(|_| reference_negatives);
        let per_comp = |s: &SiteExamples, n: usize| {
            let mut count = vec![0u32; n];
            for &c in &s.computations {
                count[c as usize] += 1;
            }
            count
        };
        let l_count = per_comp(l, self.labelled.labels.len());
        let r_count = r.map(|r| per_comp(r, self.reference.labels.len()));
        let present = |count: &[u32], labels: &[bool], label: bool| {
            count
                .iter()
                .zip(labels)
                .filter(|&(&n, &l)| n > 0 && l == label)
                .count() as u64
        };
        let counts = Counts {
            positive: present(&l_count, &self.labelled.labels, true),
            negative: present(&l_count, &self.labelled.labels, false),
            reference: r_count
                .as_ref()
                .map_or(0, |c| c.iter().filter(|&&n| n > 0).count() as u64),
        };
        let reference_weight = if counts.reference > 0 {
            counts.negative as f64 / counts.reference as f64
        } else {
            0.0
        };
        let mut ex = OwnedExamples {
            dim: l.dim,
            ..OwnedExamples::default()
        };
        let l_rank = self.labelled.ranks();
        for (i, &c) in l.computations.iter().enumerate() {
            ex.rows
                .extend_from_slice(&l.rows[i * l.dim..(i + 1) * l.dim]);
            ex.labels.push(self.labelled.labels[c as usize]);
            ex.weights.push(1.0 / f64::from(l_count[c as usize]));
            ex.groups.push(l_rank[c as usize]);
        }
        if let (Some(r), Some(r_count)) = (r, &r_count) {
            if r.dim != l.dim {
                return None;
            }
            let r_rank = self.reference.ranks();
            let offset = self.labelled.labels.len() as u32;
            for (i, &c) in r.computations.iter().enumerate() {
                ex.rows
                    .extend_from_slice(&r.rows[i * r.dim..(i + 1) * r.dim]);
                ex.labels.push(false);
                ex.weights
                    .push(reference_weight / f64::from(r_count[c as usize]));
                ex.groups.push(offset + r_rank[c as usize]);
            }
        }
        Some((ex, counts))
    }
}

fn push(kind: &mut Rows, site: &str, comps: &[u32], rows: &[f32], dim: usize) -> Result<()> {
    if rows.len() != comps.len() * dim {
        return Err(actwatch_core::Error::WidthMismatch {
            expected: dim,
            got: rows.len() / comps.len().max(1),
        }
        .into());
    }
    let s = kind.sites.entry(site.to_string()).or_insert(SiteExamples {
        dim,
        rows: Vec::new(),
        computations: Vec::new(),
    });
    if s.dim != dim {
        return Err(actwatch_core::Error::WidthMismatch {
            expected: s.dim,
            got: dim,
        }
        .into());
    }
    s.rows.extend_from_slice(rows);
    s.computations.extend_from_slice(comps);
    Ok(())
}

/// Computations a probe was fitted on, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub positive: u64,
    pub negative: u64,
    /// Reference computations used as negatives.
    pub reference: u64,
}

/// What fitting one probe measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeSummary {
    pub name: String,
    pub kind: String,
    pub sites: Vec<ProbeSiteSummary>,
    /// Benign calibration computations: from the reference traffic, and labelled negatives.
    pub calibration_reference: u64,
    pub calibration_negatives: u64,
    /// Share of the benign calibration computations flagged (each judged against the others),
    /// over all, and over the labelled negatives alone (None without any).
    pub calibration_fpr: f64,
    pub negatives_fpr: Option<f64>,
    /// Held-out labelled positives (the calibration part of the positives) and the share of them
    /// flagged at the target rate (None without any).
    pub heldout_positives: u64,
    pub recall: Option<f64>,
    /// With `defer_fpr`: the share of benign calibration computations deferred (p-value in
    /// (fpr, defer_fpr]), and of held-out positives deferred.
    pub deferred_benign: Option<f64>,
    pub deferred_positives: Option<f64>,
}

/// What fitting one probe at one site found.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeSiteSummary {
    pub site: String,
    pub fit: Counts,
    /// Logistic probes: the inverse regularisation strength used (cross-validated or given),
    /// the cross-validated log-loss per grid value (empty when given), and L-BFGS iterations.
    pub c: Option<f64>,
    pub cv_loss: Vec<f64>,
    pub iterations: Option<usize>,
}

/// A fitted probe at one site.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProbeSite {
    /// Index into the monitor's sites.
    pub site: usize,
    pub probe: LinearProbe,
    /// Calibration of its raw trace scores among benign calibration traces.
    pub calibration: Calibration,
}

/// A fitted, calibrated probe. (An artifact stores its spec and summary in its manifest, as JSON,
/// and its sites and calibration as a binary blob.)
#[derive(Debug, Clone)]
pub struct ProbeModel {
    pub spec: ProbeSpec,
    /// In the order of the monitor's sites.
    pub sites: Vec<ProbeSite>,
    /// Computation-level calibration of the fused statistic among benign computations.
    pub fused: LengthStrata,
    pub summary: ProbeSummary,
}

impl ProbeModel {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The aggregation of its traces (its own, or the monitor's).
    pub fn aggregation(&self, options: &MonitorOptions) -> Aggregation {
        self.spec.aggregation.unwrap_or(options.aggregation)
    }
}

/// The sites a spec reads among the monitor's `sites` (its own list, or all of them), as indices.
pub(crate) fn probe_sites(spec: &ProbeSpec, sites: &[&str]) -> Result<Vec<usize>> {
    if spec.sites.is_empty() {
        return Ok((0..sites.len()).collect());
    }
    let mut out: Vec<usize> = spec
        .sites
        .iter()
        .map(|s| {
            sites.iter().position(|n| n == s).ok_or_else(|| {
                Error::InvalidOption(format!(
                    "probe {:?} reads site {s:?}, which the monitor does not have (its sites: {})",
                    spec.name,
                    sites.join(", ")
                ))
            })
        })
        .collect::<Result<_>>()?;
    out.sort_unstable();
    Ok(out)
}

/// Fits the probes of `options` on `examples` (the monitor's sites are `sites`, in order, with
/// their widths `dims`).
pub(crate) fn fit_probes(
    options: &MonitorOptions,
    examples: &ProbeExamples,
    sites: &[&str],
    dims: &[usize],
) -> Result<Vec<PendingProbe>> {
    if options.probes.is_empty() {
        if !examples.is_empty() {
            return Err(Error::InvalidOption(
                "labelled examples were given, but the monitor has no probe to fit on them".into(),
            ));
        }
        return Ok(Vec::new());
    }
    options
        .probes
        .iter()
        .map(|spec| {
            let mut fitted = Vec::new();
            for si in probe_sites(spec, sites)? {
                let site = sites[si];
                let err = |e: Error| match e {
                    Error::NotEnoughData(m) => {
                        Error::NotEnoughData(format!("probe {:?} at site {site}: {m}", spec.name))
                    }
                    e => e,
                };
                let Some((ex, counts)) = examples.at_site(site, spec.reference_negatives) else {
                    return Err(Error::NotEnoughData(format!(
                        "probe {:?}: no labelled examples at site {site} in the fit part",
                        spec.name
                    )));
                };
                if ex.dim != dims[si] {
                    return Err(Error::SiteWidth {
                        site: site.to_string(),
                        expected: dims[si],
                        got: ex.dim,
                    });
                }
                let view = ex.view();
                let (probe, summary) = match spec.kind {
                    ProbeKind::DiffMeans => (
                        difference_of_means(&view).map_err(err)?,
                        ProbeSiteSummary {
                            site: site.to_string(),
                            fit: counts,
                            c: None,
                            cv_loss: Vec::new(),
                            iterations: None,
                        },
                    ),
                    ProbeKind::Logistic { c } => {
                        let (c, cv_loss) = match c {
                            Some(c) => (c, Vec::new()),
                            None => choose_c(&view, &default_c_grid(), DEFAULT_FOLDS, options.seed)
                                .map_err(err)?,
                        };
                        let fit = fit_logistic(&view, c).map_err(err)?;
                        let summary = ProbeSiteSummary {
                            site: site.to_string(),
                            fit: counts,
                            c: Some(c),
                            cv_loss,
                            iterations: Some(fit.iterations),
                        };
                        (fit.probe, summary)
                    }
                };
                fitted.push((si, probe, summary));
            }
            Ok(PendingProbe::new(spec.clone(), fitted))
        })
        .collect()
}

/// Where a probe calibration computation came from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Origin {
    Reference,
    Negative,
    Positive,
}

/// A fitted probe waiting for its calibration traces.
pub(crate) struct PendingProbe {
    spec: ProbeSpec,
    /// (monitor site index, probe, summary) per site it reads.
    sites: Vec<(usize, LinearProbe, ProbeSiteSummary)>,
    /// Per probe site: (computation, raw score) of every calibration trace, in arrival order.
    scores: Vec<Vec<(u32, f64)>>,
    origins: Vec<Origin>,
    reference: HashMap<String, u32>,
    labelled: HashMap<String, u32>,
}

impl PendingProbe {
    fn new(spec: ProbeSpec, sites: Vec<(usize, LinearProbe, ProbeSiteSummary)>) -> Self {
        Self {
            scores: vec![Vec::new(); sites.len()],
            spec,
            sites,
            origins: Vec::new(),
            reference: HashMap::new(),
            labelled: HashMap::new(),
        }
    }

    /// Scores calibration traces of monitor site `site`: reference traffic (`labels` None) or
    /// labelled examples.
    pub(crate) fn push<S: AsRef<str>>(
        &mut self,
        site: usize,
        trace_ids: &[S],
        rows: &[f32],
        labels: Option<&[bool]>,
    ) -> Result<()> {
        let Some(k) = self.sites.iter().position(|(s, _, _)| *s == site) else {
            return Ok(());
        };
        let raw = self.sites[k].1.scores(rows);
        for (i, (id, raw)) in trace_ids.iter().zip(raw).enumerate() {
            let (map, origin) = match labels {
                None => (&mut self.reference, Origin::Reference),
                Some(l) if l[i] => (&mut self.labelled, Origin::Positive),
                Some(_) => (&mut self.labelled, Origin::Negative),
            };
            let c = match map.get(id.as_ref()) {
                Some(&c) => {
                    if self.origins[c as usize] != origin {
                        return Err(Error::InvalidOption(format!(
                            "computation {:?} is labelled both 0 and 1; a label is per computation",
                            id.as_ref()
                        )));
                    }
                    c
                }
                None => {
                    let c = self.origins.len() as u32;
                    self.origins.push(origin);
                    map.insert(id.as_ref().to_string(), c);
                    c
                }
            };
            self.scores[k].push((c, raw));
        }
        Ok(())
    }

    /// Builds the per-site calibrations and the computation-level one, and measures recall and
    /// deferral on the held-out computations.
    pub(crate) fn finish(self, options: &MonitorOptions, min_needed: usize) -> Result<ProbeModel> {
        let name = &self.spec.name;
        let benign: Vec<bool> = self
            .origins
            .iter()
            .map(|o| *o != Origin::Positive)
            .collect();
        let n_comp = self.origins.len();
        let n_benign = benign.iter().filter(|&&b| b).count();
        if n_benign < min_needed {
            return Err(Error::NotEnoughData(format!(
                "probe {name:?}: {n_benign} benign calibration computations cannot calibrate a \
                 false-positive rate of {}: at least {min_needed} are needed",
                options.fpr
            )));
        }
        let agg = self.spec.aggregation.unwrap_or(options.aggregation);
        let fusion: Fusion = options.fusion;
        let n_slots = self.sites.len();
        let mut comp_agg: Vec<AggState> = (0..n_comp * n_slots).map(|_| agg.start()).collect();
        let mut comp_len = vec![0u64; n_comp];
        let mut sites = Vec::with_capacity(n_slots);
        let mut site_summaries = Vec::with_capacity(n_slots);
        for (k, ((site, probe, summary), scores)) in
            self.sites.into_iter().zip(&self.scores).enumerate()
        {
            let calibration = Calibration::new(
                scores
                    .iter()
                    .filter(|(c, _)| benign[*c as usize])
                    .map(|(_, x)| *x)
                    .collect(),
            )
            .map_err(|e| match e {
                Error::NotEnoughData(m) => {
                    Error::NotEnoughData(format!("probe {name:?} at site {}: {m}", summary.site))
                }
                e => e,
            })?;
            let mut here = vec![0u64; n_comp];
            for &(c, raw) in scores {
                let c = c as usize;
                here[c] += 1;
                comp_len[c] = comp_len[c].max(here[c]);
                // Benign members are judged leave-one-out, exactly like fresh traces.
                let nlp = calibration.smooth_neg_log_p(raw, benign[c]);
                agg.push(&mut comp_agg[c * n_slots + k], nlp);
            }
            sites.push(ProbeSite {
                site,
                probe,
                calibration,
            });
            site_summaries.push(summary);
        }
        let fused_all = super::fuse_computations(&comp_agg, n_slots, agg, fusion);
        let pick = |keep: &dyn Fn(usize) -> bool| -> (Vec<f64>, Vec<u64>) {
            (0..n_comp)
                .filter(|&c| keep(c))
                .map(|c| (fused_all[c], comp_len[c]))
                .unzip()
        };
        let (b_scores, b_lens) = pick(&|c| benign[c]);
        let fused = LengthStrata::fit(&b_scores, &b_lens, options.length_strata, min_needed)?;
        // Benign members leave-one-out within their stratum (as the monitor's in-sample rate);
        // held-out positives against the whole calibration.
        let p_of = |c: usize| -> f64 {
            let (s, l) = (fused_all[c], comp_len[c]);
            if benign[c] {
                fused.member_p_value(s, l)
            } else {
                fused.p_value(s, l)
            }
        };
        let fpr = options.fpr;
        let share = |origin: &dyn Fn(Origin) -> bool, hit: &dyn Fn(f64) -> bool| -> Option<f64> {
            let members: Vec<usize> = (0..n_comp).filter(|&c| origin(self.origins[c])).collect();
            (!members.is_empty()).then(|| {
                members.iter().filter(|&&c| hit(p_of(c))).count() as f64 / members.len() as f64
            })
        };
        let flagged = |p: f64| p <= fpr;
        let defer = self.spec.defer_fpr;
        let deferred = |p: f64| defer.is_some_and(|d| p > fpr && p <= d);
        let count = |o: Origin| self.origins.iter().filter(|&&x| x == o).count() as u64;
        let summary = ProbeSummary {
            name: name.clone(),
            kind: self.spec.kind.name().to_string(),
            sites: site_summaries,
            calibration_reference: count(Origin::Reference),
            calibration_negatives: count(Origin::Negative),
            calibration_fpr: share(&|o| o != Origin::Positive, &flagged).unwrap_or(0.0),
            negatives_fpr: share(&|o| o == Origin::Negative, &flagged),
            heldout_positives: count(Origin::Positive),
            recall: share(&|o| o == Origin::Positive, &flagged),
            deferred_benign: defer.and(share(&|o| o != Origin::Positive, &deferred)),
            deferred_positives: defer.and(share(&|o| o == Origin::Positive, &deferred)),
        };
        Ok(ProbeModel {
            spec: self.spec,
            sites,
            fused,
            summary,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(ids: &[String]) -> ProbeExamples {
        let mut ex = ProbeExamples::default();
        let labels: Vec<bool> = (0..ids.len()).map(|i| i % 2 == 0).collect();
        let rows: Vec<f32> = (0..ids.len() * 2).map(|i| i as f32).collect();
        ex.push_labelled("a", ids, &rows, 2, &labels).unwrap();
        ex
    }

    /// Regression (found by the fuzz suite, `crates/actwatch-io/tests/fuzz.rs`): the examples'
    /// computation index was a hash map, serialised in a random order, so one fit state encoded
    /// to different bytes each time.
    #[test]
    fn examples_encode_to_the_same_bytes_every_time() {
        let ids: Vec<String> = (0..64).map(|i| format!("c{i}")).collect();
        let a = serde_json::to_string(&examples(&ids)).unwrap();
        let b = serde_json::to_string(&examples(&ids)).unwrap();
        assert_eq!(a, b);
    }

    /// Regression (found by the fuzz suite): decoded examples whose computations point past their
    /// labels made a merge or a probe fit index out of bounds; they are refused when checked.
    #[test]
    fn decoded_examples_are_checked() {
        let ids: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
        let good = examples(&ids);
        assert!(good.check_state().is_ok());
        let mut v = serde_json::to_value(&good).unwrap();
        v["labelled"]["sites"]["a"]["computations"][0] = 9.into();
        let bad: ProbeExamples = serde_json::from_value(v).unwrap();
        assert!(bad.check_state().is_err());
        let mut v = serde_json::to_value(&good).unwrap();
        v["labelled"]["index"]["c0"] = 1.into();
        let bad: ProbeExamples = serde_json::from_value(v).unwrap();
        assert!(bad.check_state().is_err(), "an index repeated");
        let mut v = serde_json::to_value(&good).unwrap();
        v["values"] = 3.into();
        let bad: ProbeExamples = serde_json::from_value(v).unwrap();
        assert!(bad.check_state().is_err(), "a wrong count");
    }
}
