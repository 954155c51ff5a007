//! The one scoring door: [`Monitor::score`] turns a [`SiteBatch`] into per-trace results, and
//! [`OpenComputations`] gathers those into computation-level results.
//!
//! The gRPC service and the batch pipeline both score through these two types and nothing else,
//! so they give the same p-values by construction, not by convention. Site lookup, the width
//! check, the provenance check, the bound on open computations and the "complete only what is
//! open" rule live here once.

use std::collections::HashMap;

use actwatch_core::{ProvenanceConflict, SiteBatch};
use rayon::prelude::*;

use crate::aggregate::AggState;
use crate::joint::{Joiner, JOINT_PENDING_MAX_BYTES};
use crate::monitor::{Monitor, ProvenancePolicy};
use crate::spec::FittedDetector;
use crate::{Error, Result};

/// Per-trace results of one site's batch; `[detector][row]` where two indices are given.
#[derive(Debug, Clone, Default)]
pub struct SiteScores {
    /// The site's index in [`Monitor::sites`].
    pub site: usize,
    pub raw: Vec<Vec<f64>>,
    /// Conformal p-value of each detector's raw score.
    pub p: Vec<Vec<f64>>,
    /// Smoothed `-ln p`, the fusion ingredient.
    pub neg_log_p: Vec<Vec<f64>>,
    /// Trace statistic fused over this site's detectors (higher = more anomalous).
    pub trace_score: Vec<f64>,
    /// Conformal p-value of `trace_score` among calibration traces of this site.
    pub trace_p: Vec<f64>,
    /// Under [`ProvenancePolicy::Warn`]: how the batch's declared provenance conflicts with the
    /// site's (under `Refuse` such a batch is not scored at all).
    pub provenance_conflict: Option<ProvenanceConflict>,
    /// The concept probes that read this site ([`Monitor::probes`]).
    pub probes: Vec<ProbeTraceScores>,
    /// Scored for computations ([`Monitor::score_for_computations`]) by a monitor with a joint
    /// detector: each row's part of its joint vector, row-major. [`OpenComputations`] takes it,
    /// so the scores it hands back hold none.
    pub joint_part: Option<Vec<f32>>,
}

/// One probe's per-trace results on a site's batch.
#[derive(Debug, Clone, Default)]
pub struct ProbeTraceScores {
    /// Index into [`Monitor::probes`].
    pub probe: usize,
    /// Index among the probe's sites.
    pub slot: usize,
    /// The linear score `w·x + b` (higher = more of the concept).
    pub raw: Vec<f64>,
    /// Conformal p-value of the raw score among benign calibration traces.
    pub p: Vec<f64>,
    /// Smoothed `-ln p`.
    pub neg_log_p: Vec<f64>,
}

/// A computation's answer to one concept probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// Fused statistic, higher = more of the concept.
    pub score: f64,
    /// Conformal p-value among the probe's benign calibration computations.
    pub p_value: f64,
    /// `p_value` at or below the monitor's target rate.
    pub flagged: bool,
    /// Not flagged, but `p_value` at or below the probe's `defer_fpr` (the cascade's uncertain
    /// band); always false without one.
    pub deferred: bool,
    /// As [`ComputationResult::flagged_at`], for this probe.
    pub flagged_at: Option<i64>,
}

impl ProbeResult {
    /// `flag`, `defer` or `pass`: what a cascade does with the computation.
    pub fn verdict(&self) -> &'static str {
        if self.flagged {
            "flag"
        } else if self.deferred {
            "defer"
        } else {
            "pass"
        }
    }
}

impl SiteScores {
    pub fn rows(&self) -> usize {
        self.trace_score.len()
    }
}

/// A scored computation.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputationResult {
    /// Fused statistic, higher = more anomalous.
    pub score: f64,
    /// Conformal p-value among calibration computations.
    pub p_value: f64,
    pub flagged: bool,
    /// Per slot: conformal p-value of the computation's most anomalous trace there (None: no trace).
    pub slot_p: Vec<Option<f64>>,
    pub traces: u64,
    /// The position of the trace at which the running statistic first reached the threshold
    /// of every length stratum the computation could still end in (the trace's `position`, or
    /// without positions its 0-based index among the computation's traces at its site). Only
    /// monitors that flag early ([`Monitor::flags_early`]) track it; with one stratum every
    /// flagged computation has one, with several a computation flagged only in the stratum of
    /// its final length has none.
    pub flagged_at: Option<i64>,
    /// A running result of a computation not yet complete (an early flag); its final result
    /// follows at completion and is flagged too.
    pub partial: bool,
    /// Per concept probe, in the order of [`Monitor::probes`].
    pub probes: Vec<ProbeResult>,
}

/// Running evidence of one computation: per slot (site × detector) the running aggregate of its
/// traces' `-ln p` ([`crate::aggregate`]) and the most anomalous raw score.
#[derive(Debug, Clone)]
struct Evidence {
    slots: Vec<AggState>,
    max_raw: Vec<f64>,
    traces: u64,
    /// Traces seen per site (the position of a trace that carries none).
    per_site: Vec<u32>,
    flagged_at: Option<i64>,
    /// Traces waiting for the other sites of their joint vector (monitors with a joint detector).
    joiner: Option<Joiner>,
    /// Per probe and probe site (flattened, [`Monitor::probe_slot`]): the running aggregate of
    /// its traces' `-ln p`.
    probe_slots: Vec<AggState>,
    /// Per probe: where its running statistic first reached its threshold.
    probe_flagged_at: Vec<Option<i64>>,
}

impl Evidence {
    /// The computation's length so far: its most traces at one site (its tokens).
    fn length(&self) -> u64 {
        self.per_site.iter().copied().max().map_or(0, u64::from)
    }
}

/// One detector's raw scores of a site's rows, and the rows' joint parts when it made them.
type DetectorScores = (Vec<f64>, Option<Vec<f32>>);

/// Raw scores and smoothed `-ln p` of joint vectors, `[detector][row]`.
struct JointScores {
    raw: Vec<Vec<f64>>,
    neg_log_p: Vec<Vec<f64>>,
}

impl Monitor {
    /// Scores a batch of traces: finds its site (unknown sites are refused), checks its width and
    /// its declared provenance against the site's ([`Error::Provenance`] under
    /// [`ProvenancePolicy::Refuse`]), and computes per detector the raw score, p-value and
    /// `-ln p`, and the fused trace score.
    pub fn score(&self, batch: &SiteBatch) -> Result<SiteScores> {
        self.score_with(batch, false)
    }

    /// [`Monitor::score`], and each row's part of its joint vector ([`SiteScores::joint_part`],
    /// for a monitor with a joint detector): what [`OpenComputations`] scores with, so that the
    /// part is made with the rest of the scoring, where the site's Gaussian can give it from its
    /// own product, and can run apart from adding the rows ([`OpenComputations::add_scores`]).
    pub fn score_for_computations(&self, batch: &SiteBatch) -> Result<SiteScores> {
        self.score_with(batch, true)
    }

    fn score_with(&self, batch: &SiteBatch, joint: bool) -> Result<SiteScores> {
        let Some(site) = self.site_index(batch.site()) else {
            return Err(Error::UnknownSite {
                site: batch.site().to_string(),
                known: self.site_names().join(", "),
            });
        };
        let expected = self.sites()[site].dim;
        if batch.dim() != expected {
            return Err(Error::SiteWidth {
                site: batch.site().to_string(),
                expected,
                got: batch.dim(),
            });
        }
        let conflict = batch
            .provenance()
            .and_then(|p| self.sites()[site].provenance.conflict(p));
        if let (Some(conflict), ProvenancePolicy::Refuse) = (&conflict, self.provenance_policy()) {
            return Err(Error::Provenance {
                site: batch.site().to_string(),
                conflict: conflict.clone(),
                scoring: true,
            });
        }
        let mut scores = self.score_site_with(site, batch.vectors().as_slice(), joint)?;
        scores.provenance_conflict = conflict;
        Ok(scores)
    }

    /// [`Monitor::score`] for rows already known to belong to site `site` (an index from
    /// [`Monitor::site_index`]): `rows` is row-major, a whole number of the site's width.
    pub fn score_site(&self, site: usize, rows: &[f32]) -> Result<SiteScores> {
        self.score_site_with(site, rows, false)
    }

    /// [`Monitor::score_site`], and with `joint` each row's part of its joint vector
    /// ([`SiteScores::joint_part`]). Where the part is the site Gaussian's principal coordinates
    /// they come out of the Gaussian's own product, not a second one.
    fn score_site_with(&self, site: usize, rows: &[f32], joint: bool) -> Result<SiteScores> {
        let s = &self.sites()[site];
        if !rows.len().is_multiple_of(s.dim) {
            return Err(actwatch_core::Error::WidthMismatch {
                expected: s.dim,
                got: rows.len(),
            }
            .into());
        }
        let n = rows.len() / s.dim;
        let fusion = self.options().fusion;
        let mut out = SiteScores {
            site,
            ..SiteScores::default()
        };
        let map = self.joint_map().filter(|_| joint);
        let from_gaussian = map
            .and_then(|m| m.coordinates_of(site))
            .filter(|_| self.backend().is_native());
        let raw_scores = |j: usize, det: &FittedDetector| match (det, from_gaussian) {
            (FittedDetector::Gaussian(g), Some((gj, r))) if gj == j => {
                let (raw, part) = g.score_with_coordinates(rows, r)?;
                Ok((raw, Some(part)))
            }
            _ => Ok((self.backend().raw_scores(site, j, det, rows)?, None)),
        };
        // The detectors are independent, so natively they run side by side: a live token's
        // Gaussian product (one thread) overlaps its kNN scan instead of leaving the other cores
        // idle. An attached backend gets them one at a time. The first error in detector order
        // is the one reported, as in order.
        let raws: Vec<Result<DetectorScores>> =
            if self.backend().is_native() && s.detectors.len() > 1 {
                s.detectors
                    .par_iter()
                    .enumerate()
                    .map(|(j, det)| raw_scores(j, det))
                    .collect()
            } else {
                s.detectors
                    .iter()
                    .enumerate()
                    .map(|(j, det)| raw_scores(j, det))
                    .collect()
            };
        for (raw, cal) in raws.into_iter().zip(&s.calibrations) {
            let (raw, part) = raw?;
            if part.is_some() {
                out.joint_part = part;
            }
            out.p.push(raw.iter().map(|&x| cal.p_value(x)).collect());
            out.neg_log_p.push(
                raw.iter()
                    .map(|&x| cal.smooth_neg_log_p(x, false))
                    .collect(),
            );
            out.raw.push(raw);
        }
        if map.is_some() && out.joint_part.is_none() {
            out.joint_part = self.joint_parts(site, rows)?;
        }
        let mut nlps = vec![0.0; s.detectors.len()];
        for r in 0..n {
            for (j, v) in out.neg_log_p.iter().enumerate() {
                nlps[j] = v[r];
            }
            let t = fusion.statistic(&nlps);
            out.trace_p.push(s.trace_fused.p_value(t));
            out.trace_score.push(t);
        }
        for &(probe, slot) in self.probes_at(site) {
            let ps = &self.probes()[probe].sites[slot];
            let raw = ps.probe.scores(rows);
            out.probes.push(ProbeTraceScores {
                probe,
                slot,
                p: raw.iter().map(|&x| ps.calibration.p_value(x)).collect(),
                neg_log_p: raw
                    .iter()
                    .map(|&x| ps.calibration.smooth_neg_log_p(x, false))
                    .collect(),
                raw,
            });
        }
        Ok(out)
    }

    /// Whether probe `probe` flags computations early (as [`Monitor::flags_early`]).
    fn probe_flags_early(&self, probe: usize) -> bool {
        self.probes()[probe]
            .aggregation(self.options())
            .is_monotone()
            && self.options().fusion.is_monotone()
    }

    /// The index of (probe, probe site) among a computation's probe slots.
    fn probe_slot(&self, probe: usize, slot: usize) -> usize {
        self.probes()[..probe]
            .iter()
            .map(|p| p.sites.len())
            .sum::<usize>()
            + slot
    }

    /// Probe `probe`'s fused statistic of the evidence so far.
    fn probe_statistic(&self, ev: &Evidence, probe: usize) -> f64 {
        let p = &self.probes()[probe];
        let agg = p.aggregation(self.options());
        let first = self.probe_slot(probe, 0);
        let values: Vec<f64> = ev.probe_slots[first..first + p.sites.len()]
            .iter()
            .map(|st| agg.value(st).unwrap_or(f64::NAN))
            .collect();
        self.options().fusion.fuse_slots(&values)
    }

    /// Probe `probe`'s result on the evidence so far.
    fn probe_result(&self, ev: &Evidence, probe: usize) -> ProbeResult {
        let p = &self.probes()[probe];
        let score = self.probe_statistic(ev, probe);
        let p_value = p.fused.p_value(score, ev.length());
        let fpr = self.options().fpr;
        let flagged = p_value <= fpr;
        ProbeResult {
            score,
            p_value,
            flagged,
            deferred: !flagged && p.spec.defer_fpr.is_some_and(|d| p_value <= d),
            flagged_at: ev.probe_flagged_at[probe],
        }
    }

    /// Whether computations are flagged before they are complete: when both the token
    /// aggregation and the fusion never decrease as evidence arrives, a running statistic at the
    /// threshold means the complete computation will be flagged, so the early flag is the final
    /// flag and the false-positive guarantee is unchanged.
    pub fn flags_early(&self) -> bool {
        self.options().aggregation.is_monotone() && self.options().fusion.is_monotone()
    }

    fn new_evidence(&self) -> Evidence {
        let n = self.slot_count();
        let agg = self.options().aggregation;
        Evidence {
            slots: (0..n).map(|_| agg.start()).collect(),
            max_raw: vec![f64::NAN; n],
            traces: 0,
            per_site: vec![0; self.sites().len()],
            flagged_at: None,
            joiner: self.joint().map(|_| Joiner::new(self.sites().len())),
            probe_slots: self
                .probes()
                .iter()
                .flat_map(|p| {
                    let agg = p.aggregation(self.options());
                    p.sites.iter().map(move |_| agg.start())
                })
                .collect(),
            probe_flagged_at: vec![None; self.probes().len()],
        }
    }

    /// Scores joint vectors (row-major, the joint width) with the joint detectors. They run on
    /// the CPU whatever the backend (the torch backend holds the per-site detectors only).
    fn score_joint(&self, rows: &[f32]) -> Result<JointScores> {
        let joint = self.joint().expect("called only with a joint detector");
        let mut out = JointScores {
            raw: Vec::new(),
            neg_log_p: Vec::new(),
        };
        for (det, cal) in joint.detectors.iter().zip(&joint.calibrations) {
            let raw = det.score_batch(rows)?;
            out.neg_log_p.push(
                raw.iter()
                    .map(|&x| cal.smooth_neg_log_p(x, false))
                    .collect(),
            );
            out.raw.push(raw);
        }
        Ok(out)
    }

    /// Adds joint vector `row` of `scores` (at `position`) to a computation's evidence, like
    /// [`Monitor::accumulate`] does for a trace.
    fn accumulate_joint(
        &self,
        ev: &mut Evidence,
        scores: &JointScores,
        row: usize,
        position: i64,
    ) -> bool {
        let off = self.joint_offset();
        let agg = self.options().aggregation;
        for j in 0..scores.raw.len() {
            agg.push(&mut ev.slots[off + j], scores.neg_log_p[j][row]);
            let raw = scores.raw[j][row];
            let cell = &mut ev.max_raw[off + j];
            if cell.is_nan() || raw > *cell {
                *cell = raw;
            }
        }
        self.check_early(ev, position)
    }

    /// For a monitor that flags early, notes `position` if the running statistic reaches the
    /// threshold for the first time; says whether it did.
    fn check_early(&self, ev: &mut Evidence, position: i64) -> bool {
        if ev.flagged_at.is_none()
            && self.flags_early()
            && self.fused().flagged_at_any_longer(
                self.running_statistic(ev),
                ev.length(),
                self.options().fpr,
            )
        {
            ev.flagged_at = Some(position);
            return true;
        }
        false
    }

    /// Adds row `row` of `scores` (at `position`, if its batch carries positions) to a
    /// computation's evidence; for a monitor that flags early, notes the position at which the
    /// running statistic first reaches the threshold, and says whether that was this row.
    fn accumulate(
        &self,
        ev: &mut Evidence,
        scores: &SiteScores,
        row: usize,
        position: Option<i32>,
    ) -> bool {
        let off = self.slot_offset(scores.site);
        let agg = self.options().aggregation;
        for j in 0..scores.raw.len() {
            agg.push(&mut ev.slots[off + j], scores.neg_log_p[j][row]);
            let raw = scores.raw[j][row];
            let cell = &mut ev.max_raw[off + j];
            if cell.is_nan() || raw > *cell {
                *cell = raw;
            }
        }
        for ps in &scores.probes {
            let agg = self.probes()[ps.probe].aggregation(self.options());
            let k = self.probe_slot(ps.probe, ps.slot);
            agg.push(&mut ev.probe_slots[k], ps.neg_log_p[row]);
        }
        ev.traces += 1;
        let seen = &mut ev.per_site[scores.site];
        let position = position.map_or(i64::from(*seen), i64::from);
        *seen = seen.saturating_add(1);
        let mut probe_flagged = false;
        for ps in &scores.probes {
            let i = ps.probe;
            if ev.probe_flagged_at[i].is_none()
                && self.probe_flags_early(i)
                && self.probes()[i].fused.flagged_at_any_longer(
                    self.probe_statistic(ev, i),
                    ev.length(),
                    self.options().fpr,
                )
            {
                ev.probe_flagged_at[i] = Some(position);
                probe_flagged = true;
            }
        }
        self.check_early(ev, position) | probe_flagged
    }

    /// The fused statistic of the evidence so far.
    fn running_statistic(&self, ev: &Evidence) -> f64 {
        let agg = self.options().aggregation;
        let values: Vec<f64> = ev
            .slots
            .iter()
            .map(|st| agg.value(st).unwrap_or(f64::NAN))
            .collect();
        self.options().fusion.fuse_slots(&values)
    }

    /// Fuses a computation's evidence and calibrates it.
    fn finish_computation(&self, ev: &Evidence, partial: bool) -> ComputationResult {
        let score = self.running_statistic(ev);
        let p_value = self.fused().p_value(score, ev.length());
        let cals = self
            .sites()
            .iter()
            .chain(self.joint())
            .flat_map(|s| s.calibrations.iter());
        let slot_p = ev
            .max_raw
            .iter()
            .zip(cals)
            .map(|(&raw, cal)| (!raw.is_nan()).then(|| cal.p_value(raw)))
            .collect();
        ComputationResult {
            score,
            p_value,
            flagged: p_value <= self.options().fpr,
            slot_p,
            traces: ev.traces,
            flagged_at: ev.flagged_at,
            partial,
            probes: (0..self.probes().len())
                .map(|i| self.probe_result(ev, i))
                .collect(),
        }
    }
}

/// Computations seen but not yet completed, each with its running evidence and its first-seen
/// number (0, 1, 2, ... in order of first appearance, never reused).
///
/// One per scoring stream (a StreamScores call, a Score request, a batch-scoring run), always
/// used with the same [`Monitor`]. At most `max_open` computations are open at once: a batch that
/// would open more is refused before it is scored ([`Error::TooManyOpen`]).
///
/// With a monitor that flags early ([`Monitor::flags_early`]), a computation whose running
/// statistic reaches the threshold is noted once, and [`OpenComputations::take_early_flags`]
/// hands out its running result.
#[derive(Debug, Clone)]
pub struct OpenComputations {
    open: HashMap<String, (u64, Evidence)>,
    next: u64,
    max_open: usize,
    /// Computations flagged early and not yet handed out, in the order they were flagged.
    early: Vec<String>,
    /// Bytes of traces waiting for the other sites of their joint vector, over all computations.
    joint_bytes: usize,
    max_joint_bytes: usize,
}

impl Default for OpenComputations {
    /// Unbounded: memory grows with the computations that are open.
    fn default() -> Self {
        Self::with_limit(usize::MAX)
    }
}

impl OpenComputations {
    /// At most `max_open` open computations, and [`JOINT_PENDING_MAX_BYTES`] of traces waiting
    /// for the other sites of their joint vectors.
    pub fn with_limit(max_open: usize) -> Self {
        Self::with_limits(max_open, JOINT_PENDING_MAX_BYTES)
    }

    /// At most `max_open` open computations, and `max_joint_bytes` of traces waiting for the
    /// other sites of their joint vectors ([`Error::JointPending`] beyond).
    pub fn with_limits(max_open: usize, max_joint_bytes: usize) -> Self {
        Self {
            open: HashMap::new(),
            next: 0,
            max_open,
            early: Vec::new(),
            joint_bytes: 0,
            max_joint_bytes,
        }
    }

    /// Computations open now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// The first-seen number of computation `id`, opening it (with no evidence yet) if it is new.
    pub fn open(&mut self, monitor: &Monitor, id: &str) -> Result<u64> {
        if let Some((seq, _)) = self.open.get(id) {
            return Ok(*seq);
        }
        self.check_room(1)?;
        let seq = self.next;
        self.next += 1;
        self.open
            .insert(id.to_string(), (seq, monitor.new_evidence()));
        Ok(seq)
    }

    fn check_room(&self, new: usize) -> Result<()> {
        if self.open.len().saturating_add(new) > self.max_open {
            return Err(Error::TooManyOpen {
                max: self.max_open,
                open: self.open.len(),
                new,
            });
        }
        Ok(())
    }

    /// Room for the computations of `batch` not open yet.
    fn check_batch_room(&self, batch: &SiteBatch) -> Result<()> {
        let mut fresh: Vec<&str> = batch
            .trace_ids()
            .iter()
            .map(String::as_str)
            .filter(|id| !self.open.contains_key(*id))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        self.check_room(fresh.len())
    }

    /// Scores `batch` with `monitor` ([`Monitor::score`]) and adds each row to its computation's
    /// evidence, opening new computations in row order.
    pub fn score(&mut self, monitor: &Monitor, batch: &SiteBatch) -> Result<SiteScores> {
        self.check_batch_room(batch)?;
        let scores = monitor.score_for_computations(batch)?;
        self.add_rows(monitor, batch, scores)
    }

    /// [`OpenComputations::score`] in two halves, for callers that score the next batch while
    /// this one's rows are added (the batch pipeline): `scores` are [`Monitor::score`]'s for
    /// `batch`, computed elsewhere. The result is the same as `score`'s, in the same order of
    /// batches.
    ///
    /// # Panics
    /// If `scores` are of another site or another number of rows than `batch` (a caller's bug,
    /// never input).
    pub fn add_scores(
        &mut self,
        monitor: &Monitor,
        batch: &SiteBatch,
        scores: SiteScores,
    ) -> Result<SiteScores> {
        let n = batch.rows();
        let rows_ok = |v: &[Vec<f64>]| v.iter().all(|x| x.len() == n);
        let fits = monitor.site_index(batch.site()) == Some(scores.site)
            && scores.trace_p.len() == n
            && scores.trace_score.len() == n
            && scores.raw.len() == scores.neg_log_p.len()
            && rows_ok(&scores.raw)
            && rows_ok(&scores.neg_log_p)
            && scores.probes.iter().all(|p| p.neg_log_p.len() == n)
            && scores.joint_part.as_ref().is_none_or(|p| {
                monitor
                    .joint_map()
                    .is_some_and(|m| p.len() == n * m.part_width(scores.site))
            });
        assert!(
            fits,
            "scores of site {} for {} rows do not belong to a batch of {n} rows at site {}",
            scores.site,
            scores.trace_p.len(),
            batch.site()
        );
        self.check_batch_room(batch)?;
        self.add_rows(monitor, batch, scores)
    }

    /// Adds each row of `batch`, scored as `scores`, to its computation's evidence.
    fn add_rows(
        &mut self,
        monitor: &Monitor,
        batch: &SiteBatch,
        mut scores: SiteScores,
    ) -> Result<SiteScores> {
        let positions = batch.positions();
        // every row's part of its joint vector, made when the batch was scored for computations
        let parts = match scores.joint_part.take() {
            Some(p) => Some(p),
            None => monitor.joint_parts(scores.site, batch.vectors().as_slice())?,
        };
        let part_width = parts.as_ref().map_or(0, |p| p.len() / batch.rows().max(1));
        // joint vectors this batch completes: their computation and position, and the vectors
        let mut joined: Vec<(String, i64)> = Vec::new();
        let mut joint_rows: Vec<f32> = Vec::new();
        for (r, id) in batch.trace_ids().iter().enumerate() {
            let ev = match self.open.get_mut(id) {
                Some((_, ev)) => ev,
                None => {
                    let seq = self.next;
                    self.next += 1;
                    &mut self
                        .open
                        .entry(id.clone())
                        .or_insert((seq, monitor.new_evidence()))
                        .1
                }
            };
            let position = positions.map(|p| p[r]);
            if monitor.accumulate(ev, &scores, r, position) {
                self.early.push(id.clone());
            }
            if let (Some(joiner), Some(parts)) = (ev.joiner.as_mut(), &parts) {
                let part = &parts[r * part_width..(r + 1) * part_width];
                if let Some((key, v)) = joiner.add(
                    scores.site,
                    position,
                    part,
                    &mut self.joint_bytes,
                    self.max_joint_bytes,
                )? {
                    joined.push((id.clone(), key));
                    joint_rows.extend_from_slice(&v);
                }
            }
        }
        if !joined.is_empty() {
            let js = monitor.score_joint(&joint_rows)?;
            for (i, (id, key)) in joined.into_iter().enumerate() {
                let (_, ev) = self.open.get_mut(&id).expect("opened above");
                if monitor.accumulate_joint(ev, &js, i, key) {
                    self.early.push(id);
                }
            }
        }
        Ok(scores)
    }

    /// The running results of the computations flagged early since the last call (each
    /// computation once per call, marked `partial`), in the order they were flagged; a
    /// computation completed in the meantime is left out (its final result says where it was
    /// flagged). A computation is flagged early at most once per question (the anomaly question
    /// and each probe, see [`ComputationResult::flagged_at`] and [`ProbeResult::flagged_at`]),
    /// so it comes back in a later call only when another question flags it.
    pub fn take_early_flags(&mut self, monitor: &Monitor) -> Vec<(String, ComputationResult)> {
        let mut seen = std::collections::HashSet::new();
        std::mem::take(&mut self.early)
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .filter_map(|id| {
                let (_, ev) = self.open.get(&id)?;
                let result = monitor.finish_computation(ev, true);
                Some((id, result))
            })
            .collect()
    }

    /// Forgets the bytes a completed computation's waiting traces held.
    fn release(&mut self, ev: &Evidence) {
        if let Some(j) = &ev.joiner {
            self.joint_bytes -= j.pending_bytes();
        }
    }

    /// The open computations' ids, in first-seen order.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<(u64, &String)> = self.open.iter().map(|(id, (s, _))| (*s, id)).collect();
        ids.sort_unstable();
        ids.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// Completes computations `ids`: fuses and calibrates their evidence, in the order given (an id
    /// listed twice is completed once). An id that is not open is refused ([`Error::NotOpen`]),
    /// and then nothing is completed.
    pub fn complete(
        &mut self,
        monitor: &Monitor,
        ids: &[String],
    ) -> Result<Vec<(String, ComputationResult)>> {
        if let Some(missing) = ids.iter().find(|id| !self.open.contains_key(*id)) {
            return Err(Error::NotOpen(missing.clone()));
        }
        Ok(ids
            .iter()
            .filter_map(|id| {
                let (_, ev) = self.open.remove(id)?;
                self.release(&ev);
                Some((id.clone(), monitor.finish_computation(&ev, false)))
            })
            .collect())
    }

    /// Completes every open computation, in first-seen order.
    pub fn complete_all(&mut self, monitor: &Monitor) -> Vec<(String, ComputationResult)> {
        let mut all: Vec<(u64, String, Evidence)> = self
            .open
            .drain()
            .map(|(id, (seq, ev))| (seq, id, ev))
            .collect();
        all.sort_unstable_by_key(|(seq, _, _)| *seq);
        self.joint_bytes = 0;
        all.into_iter()
            .map(|(_, id, ev)| {
                let r = monitor.finish_computation(&ev, false);
                (id, r)
            })
            .collect()
    }
}
