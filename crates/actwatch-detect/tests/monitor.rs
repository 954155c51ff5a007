//! Oracle tests of the monitor (`src/monitor.rs`), the heart of the conformal guarantee.
//!
//! 1. The calibration a monitor builds is recomputed naively from its own fitted detectors and
//!    compared exactly: per-slot calibrations, leave-one-out `-ln p`, per-computation token
//!    aggregates (each operator's formula is tested in `src/aggregate.rs`), the joint vectors,
//!    fusion, the in-sample flag rate by an O(n²) count, and fresh p-values by their definition;
//!    the joint Gaussian against an explicit inverse; early flags against the running statistic.
//! 2. The false-positive rate achieved on fresh in-distribution computations, over many seeds, is
//!    the target rate within a derived binomial slack, from both sides; a shifted distribution
//!    (negative control) is flagged far more.
//! 3. Smaller crisp contracts: resuming a serialised fitter, the calibration-size floor, errors.
//!
//! All randomness comes from `actwatch_testkit::Rng`.

use std::time::Instant;

use actwatch_core::l2_normalize_rows;
use actwatch_core::{SiteBatch, Vectors};
use actwatch_detect::calibration::Calibration;
use actwatch_detect::monitor::{
    Monitor, MonitorCalibrator, MonitorFitter, MonitorOptions, DEFAULT_LENGTH_STRATA,
};
use actwatch_detect::spec::{DetectorSpec, DEFAULT_DETECTORS, DEFAULT_JOINT};
use actwatch_detect::{Aggregation, ComputationResult, Error, Fusion, OpenComputations};
use actwatch_testkit::Rng;

const FUSIONS: [Fusion; 3] = [Fusion::Fisher, Fusion::Cauchy, Fusion::MinP];

const AGGREGATIONS: [Aggregation; 5] = [
    Aggregation::Max,
    Aggregation::Mean,
    Aggregation::Ema { alpha: 0.3 },
    Aggregation::MaxRollingMean { window: 3 },
    Aggregation::TopkMean { k: 2 },
];

/// Uniform integer in `0..n`.
fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// One computation: per site (index into [`Synth::names`]), its traces, row-major, or `None`
/// when the computation has no trace at that site.
#[derive(Clone)]
struct Computation {
    id: String,
    sites: Vec<Option<Vec<f32>>>,
}

/// Synthetic activations: correlated Gaussian rows per site, a computation-level offset shared by
/// all traces of a computation at a site, and occasional outlier traces.
struct Synth {
    names: Vec<&'static str>,
    dims: Vec<usize>,
    /// Traces per present site: uniform in `1..=max_traces`.
    max_traces: usize,
    /// Probability that a computation has no trace at a site (at least one site is kept).
    p_missing: f64,
    /// Standard deviation (per coordinate) of the computation-level offset.
    shared: f64,
    /// Probability that a trace is scaled by 3.
    outlier_rate: f64,
}

impl Synth {
    fn computation(&self, rng: &mut Rng, id: String, shift: f64) -> Computation {
        let n_sites = self.dims.len();
        let mut present: Vec<bool> = (0..n_sites)
            .map(|_| rng.uniform() >= self.p_missing)
            .collect();
        if !present.iter().any(|&p| p) {
            present[below(rng, n_sites)] = true;
        }
        let mut sites = Vec::with_capacity(n_sites);
        for (s, &p) in present.iter().enumerate() {
            if !p {
                sites.push(None);
                continue;
            }
            let d = self.dims[s];
            let k = 1 + below(rng, self.max_traces);
            let mut rows = rng.correlated_rows(k, d, shift, 1000 + s as u64);
            let offset: Vec<f64> = (0..d).map(|_| rng.normal() * self.shared).collect();
            for row in rows.chunks_exact_mut(d) {
                let scale = if rng.uniform() < self.outlier_rate {
                    3.0
                } else {
                    1.0
                };
                for (x, o) in row.iter_mut().zip(&offset) {
                    *x = (f64::from(*x) * scale + o) as f32;
                }
            }
            sites.push(Some(rows));
        }
        Computation { id, sites }
    }

    fn site(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| *n == name)
            .expect("known site")
    }
}

/// Reference computations routed by the monitor's own split, with exactly `n_fit` fit and `n_cal`
/// calibration computations (the split is a pure function of seed and id, so surplus ids are
/// skipped). A share `dup_rate` of calibration computations are exact copies (new id, same
/// traces) of an earlier one, so fused statistics tie.
struct Reference {
    fit: Vec<Computation>,
    cal: Vec<Computation>,
}

fn reference(
    synth: &Synth,
    rng: &mut Rng,
    options: &MonitorOptions,
    (n_fit, n_cal): (usize, usize),
    dup_rate: f64,
    tag: &str,
) -> Reference {
    let router = MonitorFitter::new(options.clone()).unwrap();
    let (mut fit, mut cal) = (Vec::new(), Vec::<Computation>::new());
    let mut i = 0;
    while fit.len() < n_fit || cal.len() < n_cal {
        let id = format!("{tag}-{i}");
        i += 1;
        if router.is_calibration(&id) {
            if cal.len() == n_cal {
                continue;
            }
            let c = if !cal.is_empty() && rng.uniform() < dup_rate {
                let j = below(rng, cal.len());
                Computation {
                    id,
                    sites: cal[j].sites.clone(),
                }
            } else {
                synth.computation(rng, id, 0.0)
            };
            cal.push(c);
        } else if fit.len() < n_fit {
            fit.push(synth.computation(rng, id, 0.0));
        }
    }
    Reference { fit, cal }
}

fn fit_phase(synth: &Synth, options: &MonitorOptions, fit: &[Computation]) -> MonitorFitter {
    let mut fitter = MonitorFitter::new(options.clone()).unwrap();
    push_fit(&mut fitter, synth, fit);
    fitter
}

fn push_fit(fitter: &mut MonitorFitter, synth: &Synth, fit: &[Computation]) {
    for c in fit {
        assert!(!fitter.is_calibration(&c.id));
        for (s, rows) in c.sites.iter().enumerate() {
            if let Some(rows) = rows {
                fitter
                    .push_fit(synth.names[s], rows, synth.dims[s])
                    .unwrap();
            }
        }
    }
}

/// Pushes the calibration traces of every site in a random interleaving of the computations
/// (each computation's traces keep their order, as tokens do), in chunks of 1..=40 traces, so a
/// computation's traces are mixed with others' and spread over several calls.
fn push_calibration(
    cal_phase: &mut MonitorCalibrator,
    synth: &Synth,
    cal: &[Computation],
    rng: &mut Rng,
) {
    push_traces(cal_phase, synth, cal, rng, |c, ids, site, rows| {
        assert!(ids.iter().all(|id| c.is_calibration(id)));
        c.push_calibration(ids, site, rows)
    });
}

/// Pushes the traces of `set` with `push`, as [`push_calibration`] describes.
fn push_traces(
    cal_phase: &mut MonitorCalibrator,
    synth: &Synth,
    cal: &[Computation],
    rng: &mut Rng,
    mut push: impl FnMut(&mut MonitorCalibrator, &[&str], &str, &[f32]) -> Result<(), Error>,
) {
    for (s, &d) in synth.dims.iter().enumerate() {
        let mut queues: Vec<(&str, std::slice::ChunksExact<f32>)> = cal
            .iter()
            .filter_map(|c| {
                c.sites[s]
                    .as_deref()
                    .map(|r| (c.id.as_str(), r.chunks_exact(d)))
            })
            .collect();
        let mut traces: Vec<(&str, &[f32])> = Vec::new();
        while !queues.is_empty() {
            let q = below(rng, queues.len());
            match queues[q].1.next() {
                Some(row) => traces.push((queues[q].0, row)),
                None => {
                    let _ = queues.swap_remove(q);
                }
            }
        }
        let mut start = 0;
        while start < traces.len() {
            let end = (start + 1 + below(rng, 40)).min(traces.len());
            let ids: Vec<&str> = traces[start..end].iter().map(|t| t.0).collect();
            let rows: Vec<f32> = traces[start..end]
                .iter()
                .flat_map(|t| t.1)
                .copied()
                .collect();
            push(cal_phase, &ids, synth.names[s], &rows).unwrap();
            start = end;
        }
    }
}

fn fit_monitor(
    synth: &Synth,
    options: &MonitorOptions,
    r: &Reference,
    rng: &mut Rng,
) -> Result<Monitor, Error> {
    let mut cal_phase = fit_phase(synth, options, &r.fit).finish_fit()?;
    if cal_phase.joint_wanted() {
        push_traces(&mut cal_phase, synth, &r.fit, rng, |c, ids, site, rows| {
            assert!(ids.iter().all(|id| !c.is_calibration(id)));
            c.push_joint_fit(ids, site, rows)
        });
    }
    push_calibration(&mut cal_phase, synth, &r.cal, rng);
    cal_phase.finish_joint_fit()?;
    if cal_phase.joint_calibrating() {
        push_traces(&mut cal_phase, synth, &r.cal, rng, |c, ids, site, rows| {
            c.push_joint_calibration(ids, site, rows)
        });
    }
    cal_phase.finish()
}

/// A detector list, or none for "none".
fn joint_list(text: &str) -> Vec<DetectorSpec> {
    if text == "none" {
        Vec::new()
    } else {
        DetectorSpec::parse_list(text).unwrap()
    }
}

/// The calibration recomputed naively from the monitor's fitted detectors.
struct Oracle {
    /// Per slot (monitor slot order): calibration of the raw scores of its calibration traces.
    slot_cals: Vec<Calibration>,
    /// Per monitor site: the trace statistic (fused over the site's detectors, leave-one-out) of
    /// every calibration trace.
    trace_stats: Vec<Vec<f64>>,
    /// Fused statistic of every calibration computation (in `Reference::cal` order).
    cal_stats: Vec<f64>,
}

/// Fuses slots by definition: Fisher and min-p count a slot without traces as p = 1 (so min-p's
/// Bonferroni factor is the monitor's slot count), Cauchy averages the slots present.
fn fuse(fusion: Fusion, slots: &[Option<f64>]) -> f64 {
    let values: Vec<f64> = match fusion {
        Fusion::Cauchy => slots.iter().flatten().copied().collect(),
        _ => slots.iter().map(|x| x.unwrap_or(0.0)).collect(),
    };
    fusion.statistic(&values)
}

/// The joint vectors of a computation by definition: at each index `k` below every site's trace
/// count (none when a site is missing), the sites' `k`-th vectors in monitor site order, each
/// L2-normalised, concatenated.
fn joint_rows(monitor: &Monitor, synth: &Synth, c: &Computation) -> Vec<f32> {
    let parts: Option<Vec<(&[f32], usize)>> = monitor
        .sites()
        .iter()
        .map(|site| {
            let s = synth.site(&site.name);
            c.sites[s].as_deref().map(|r| (r, synth.dims[s]))
        })
        .collect();
    let Some(parts) = parts else {
        return Vec::new();
    };
    let n = parts.iter().map(|(r, d)| r.len() / d).min().unwrap();
    let mut out = Vec::new();
    for k in 0..n {
        for &(rows, d) in &parts {
            let mut v = rows[k * d..(k + 1) * d].to_vec();
            l2_normalize_rows(&mut v, d);
            out.extend(v);
        }
    }
    out
}

fn oracle(monitor: &Monitor, synth: &Synth, cal: &[Computation]) -> Oracle {
    let fusion = monitor.options().fusion;
    let agg = monitor.options().aggregation;
    let n_slots: usize = monitor.slots().len();
    // per calibration computation and slot: the leave-one-out -ln p of its traces, in order
    let mut comp_nlp: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); n_slots]; cal.len()];
    let mut slot_cals = Vec::new();
    let mut trace_stats = Vec::new();
    let mut slot0 = 0;
    for site in monitor.sites() {
        let s = synth.site(&site.name);
        let d = synth.dims[s];
        assert_eq!(site.dim, d);
        // every calibration trace of the site, in computation order, scored in one batch
        let mut rows = Vec::new();
        let mut owner = Vec::new();
        for (c, comp) in cal.iter().enumerate() {
            if let Some(r) = &comp.sites[s] {
                rows.extend_from_slice(r);
                owner.extend(std::iter::repeat_n(c, r.len() / d));
            }
        }
        let raws: Vec<Vec<f64>> = site
            .detectors
            .iter()
            .map(|det| det.score_batch(&rows).unwrap())
            .collect();
        let cals: Vec<Calibration> = raws
            .iter()
            .map(|r| Calibration::new(r.clone()).unwrap())
            .collect();
        let mut stats = Vec::with_capacity(owner.len());
        for (t, &c) in owner.iter().enumerate() {
            let nlps: Vec<f64> = cals
                .iter()
                .zip(&raws)
                .map(|(cal, raw)| cal.smooth_neg_log_p(raw[t], true))
                .collect();
            for (j, &x) in nlps.iter().enumerate() {
                comp_nlp[c][slot0 + j].push(x);
            }
            stats.push(fusion.statistic(&nlps));
        }
        trace_stats.push(stats);
        slot_cals.extend(cals);
        slot0 += site.detectors.len();
    }
    if let Some(joint) = monitor.joint() {
        // every calibration computation's joint vectors, in computation and index order
        let mut rows = Vec::new();
        let mut owner = Vec::new();
        for (c, comp) in cal.iter().enumerate() {
            let r = joint_rows(monitor, synth, comp);
            owner.extend(std::iter::repeat_n(c, r.len() / joint.dim));
            rows.extend(r);
        }
        for (j, det) in joint.detectors.iter().enumerate() {
            let raw = det.score_batch(&rows).unwrap();
            let cal = Calibration::new(raw.clone()).unwrap();
            for (t, &c) in owner.iter().enumerate() {
                comp_nlp[c][slot0 + j].push(cal.smooth_neg_log_p(raw[t], true));
            }
            slot_cals.push(cal);
        }
    }
    let cal_stats = comp_nlp
        .iter()
        .map(|row| {
            let slots: Vec<Option<f64>> = row.iter().map(|v| agg.of(v)).collect();
            fuse(fusion, &slots)
        })
        .collect();
    Oracle {
        slot_cals,
        trace_stats,
        cal_stats,
    }
}

/// Conformal p-value of a fresh score by its definition, by a scan.
fn p_by_scan(cal: &[f64], s: f64) -> f64 {
    (1 + cal.iter().filter(|&&c| c >= s).count()) as f64 / (cal.len() + 1) as f64
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Checks one fitted monitor against the oracle; returns (calibration computations judged
/// exactly at the target rate, fresh computations whose p-value is exactly the target rate).
fn check_against_oracle(
    monitor: &Monitor,
    synth: &Synth,
    r: &Reference,
    fresh: &[Computation],
) -> (usize, usize) {
    let fpr = monitor.options().fpr;
    let fusion = monitor.options().fusion;
    let agg = monitor.options().aggregation;
    let o = oracle(monitor, synth, &r.cal);
    let ctx = format!("{fusion:?}, fpr {fpr}");

    // bookkeeping
    let n = r.cal.len();
    assert_eq!(
        monitor.summary().calibration_computations,
        n as u64,
        "{ctx}"
    );
    for site in monitor.sites() {
        let s = synth.site(&site.name);
        let count = |set: &[Computation]| -> u64 {
            set.iter()
                .filter_map(|c| c.sites[s].as_ref())
                .map(|rows| (rows.len() / synth.dims[s]) as u64)
                .sum()
        };
        assert_eq!(site.fit_traces, count(&r.fit), "{ctx}: {}", site.name);
        assert_eq!(
            site.calibration_traces,
            count(&r.cal),
            "{ctx}: {}",
            site.name
        );
    }

    // per-slot and per-site trace calibrations
    let cals: Vec<&Calibration> = monitor
        .sites()
        .iter()
        .chain(monitor.joint())
        .flat_map(|s| s.calibrations.iter())
        .collect();
    assert_eq!(cals.len(), o.slot_cals.len());
    for (slot, (got, want)) in cals.iter().zip(&o.slot_cals).enumerate() {
        assert_eq!(*got, want, "{ctx}: calibration of slot {slot}");
    }
    for (site, want) in monitor.sites().iter().zip(&o.trace_stats) {
        assert_eq!(
            site.trace_fused.scores(),
            sorted(want.clone()).as_slice(),
            "{ctx}: trace-level calibration of site {}",
            site.name
        );
    }

    // computation-level calibration, per length stratum (lengths by definition: a computation's
    // most traces at one site), and the in-sample (leave-one-out) flag rate
    let strata = monitor.fused();
    let lens: Vec<u64> = r.cal.iter().map(|c| length(synth, c)).collect();
    let min_needed = (1.0 / fpr).ceil() as usize;
    assert!(strata.len() <= monitor.options().length_strata, "{ctx}");
    for &u in strata.upper_bounds() {
        assert!(
            lens.contains(&u),
            "{ctx}: stratum bound {u} is no calibration length"
        );
    }
    let members =
        |k: usize| -> Vec<usize> { (0..n).filter(|&i| strata.stratum(lens[i]) == k).collect() };
    for k in 0..strata.len() {
        let m = members(k);
        assert!(
            m.len() >= min_needed,
            "{ctx}: stratum {k} has {} computations",
            m.len()
        );
        let stats: Vec<f64> = m.iter().map(|&i| o.cal_stats[i]).collect();
        assert_eq!(
            strata.calibrations()[k].scores(),
            sorted(stats).as_slice(),
            "{ctx}: fused calibration scores of stratum {k}"
        );
    }
    let s = &o.cal_stats;
    let loo_p: Vec<f64> = (0..n)
        .map(|i| {
            let m = members(strata.stratum(lens[i]));
            let c = m.iter().filter(|&&j| j != i && s[j] >= s[i]).count();
            (1 + c) as f64 / m.len() as f64
        })
        .collect();
    let flagged = loo_p.iter().filter(|&&p| p <= fpr).count();
    assert_eq!(
        monitor.summary().calibration_fpr,
        flagged as f64 / n as f64,
        "{ctx}: in-sample flag rate"
    );
    let cal_at_target = loo_p.iter().filter(|&&p| p == fpr).count();

    // fresh computations: statistic, p-value, flag, per-slot p-values, trace-level results
    let threshold = monitor.summary().threshold;
    let n_slots = o.slot_cals.len();
    let mut fresh_at_target = 0;
    for c in fresh {
        let mut open = OpenComputations::default();
        open.open(monitor, &c.id).unwrap();
        let mut nlp_seq: Vec<Vec<f64>> = vec![Vec::new(); n_slots];
        let mut max_raw: Vec<Option<f64>> = vec![None; n_slots];
        let mut slot0 = 0;
        for (si, site) in monitor.sites().iter().enumerate() {
            let s = synth.site(&site.name);
            let k = site.detectors.len();
            let Some(rows) = &c.sites[s] else {
                slot0 += k;
                continue;
            };
            let n_rows = rows.len() / site.dim;
            let batch = site_batch(&site.name, &c.id, site.dim, rows);
            let scores = open.score(monitor, &batch).unwrap();
            assert_eq!(scores.site, si, "{ctx}");
            let raws: Vec<Vec<f64>> = site
                .detectors
                .iter()
                .map(|det| det.score_batch(rows).unwrap())
                .collect();
            for row in 0..n_rows {
                let mut nlps = Vec::with_capacity(k);
                for (j, raw) in raws.iter().enumerate() {
                    let cal = &o.slot_cals[slot0 + j];
                    let x = raw[row];
                    let nlp = cal.smooth_neg_log_p(x, false);
                    assert_eq!(scores.raw[j][row], x, "{ctx}");
                    assert_eq!(scores.neg_log_p[j][row], nlp, "{ctx}");
                    assert_eq!(scores.p[j][row], p_by_scan(cal.scores(), x), "{ctx}");
                    nlps.push(nlp);
                    nlp_seq[slot0 + j].push(nlp);
                    let m = &mut max_raw[slot0 + j];
                    *m = Some(m.map_or(x, |y| y.max(x)));
                }
                let t = fusion.statistic(&nlps);
                assert_eq!(scores.trace_score[row], t, "{ctx}");
                assert_eq!(
                    scores.trace_p[row],
                    p_by_scan(&o.trace_stats[si], t),
                    "{ctx}"
                );
            }
            slot0 += k;
        }
        if let Some(joint) = monitor.joint() {
            let rows = joint_rows(monitor, synth, c);
            for (j, det) in joint.detectors.iter().enumerate() {
                let cal = &o.slot_cals[slot0 + j];
                for x in det.score_batch(&rows).unwrap() {
                    nlp_seq[slot0 + j].push(cal.smooth_neg_log_p(x, false));
                    let m = &mut max_raw[slot0 + j];
                    *m = Some(m.map_or(x, |y| y.max(x)));
                }
            }
        }
        let res = complete_one(monitor, &mut open, &c.id);
        let slots: Vec<Option<f64>> = nlp_seq.iter().map(|v| agg.of(v)).collect();
        let score = fuse(fusion, &slots);
        assert_eq!(res.score, score, "{ctx}: {}", c.id);
        let stratum = members(strata.stratum(length(synth, c)));
        let same_length: Vec<f64> = stratum.iter().map(|&i| o.cal_stats[i]).collect();
        let p = p_by_scan(&same_length, score);
        assert_eq!(res.p_value, p, "{ctx}: {}", c.id);
        assert_eq!(res.flagged, p <= fpr, "{ctx}: {} (p = {p})", c.id);
        if let Some(t) = threshold {
            assert_eq!(res.flagged, score >= t, "{ctx}: {} against threshold", c.id);
        }
        fresh_at_target += usize::from(p == fpr);
        let slot_p: Vec<Option<f64>> = max_raw
            .iter()
            .zip(&o.slot_cals)
            .map(|(raw, cal)| raw.map(|x| p_by_scan(cal.scores(), x)))
            .collect();
        assert_eq!(res.slot_p, slot_p, "{ctx}: {}", c.id);
        assert_eq!(res.traces, n_traces(synth, c), "{ctx}");
    }
    (cal_at_target, fresh_at_target)
}

/// A computation's length: its most traces at one site.
fn length(synth: &Synth, c: &Computation) -> u64 {
    c.sites
        .iter()
        .zip(&synth.dims)
        .filter_map(|(rows, d)| rows.as_ref().map(|r| (r.len() / d) as u64))
        .max()
        .unwrap_or(0)
}

/// Number of traces of a computation (rows over all sites).
fn n_traces(synth: &Synth, c: &Computation) -> u64 {
    c.sites
        .iter()
        .zip(&synth.dims)
        .filter_map(|(rows, d)| rows.as_ref().map(|r| (r.len() / d) as u64))
        .sum()
}

/// Test 1: everything the monitor calibrates equals a naive recomputation, for every fusion.
///
/// Two configurations: `n_cal · fpr` an integer (one calibration computation is judged exactly at
/// the target rate, so `<=` vs `<` in the in-sample rate matters), and `(n_cal + 1) · fpr` an
/// integer (fresh computations can get p exactly equal to the target, so the flag rule's `<=`
/// matters). Both rates are chosen where the f64 arithmetic of the monitor's in-sample rate is
/// exact (see `in_sample_rate_counts_a_computation_exactly_at_the_target`).
#[test]
fn calibration_matches_a_naive_recomputation() {
    let configs = [
        // (fpr, n_fit, n_cal, sites, dims, detectors, joint detectors)
        (
            0.05,
            150,
            200,
            vec!["a", "b", "c"],
            vec![4, 6, 8],
            DEFAULT_DETECTORS,
            DEFAULT_JOINT,
        ),
        (
            0.1,
            120,
            119,
            vec!["mlp", "attn"],
            vec![5, 7],
            "gaussian:shrinkage=oas,knn:k=3,metric=l2",
            "gaussian:shrinkage=0.2,knn:k=2",
        ),
    ];
    for (ci, (fpr, n_fit, n_cal, names, dims, detectors, joint)) in configs.into_iter().enumerate()
    {
        let synth = Synth {
            names,
            dims,
            max_traces: 5,
            p_missing: 0.25,
            shared: 0.5,
            outlier_rate: 0.05,
        };
        for (fi, fusion) in FUSIONS.into_iter().enumerate() {
            let seed = 100 * ci as u64 + fi as u64;
            let mut rng = Rng::new(seed);
            let options = MonitorOptions {
                detectors: DetectorSpec::parse_list(detectors).unwrap(),
                joint: joint_list(joint),
                aggregation: Aggregation::Max,
                fusion,
                fpr,
                calibration_fraction: 0.5,
                seed,
                length_strata: 1,
                probes: Vec::new(),
            };
            let r = reference(&synth, &mut rng, &options, (n_fit, n_cal), 0.05, "c");
            let fresh: Vec<Computation> = (0..2500)
                .map(|i| synth.computation(&mut rng, format!("fresh-{i}"), 0.0))
                .collect();
            let monitor = fit_monitor(&synth, &options, &r, &mut rng).unwrap();
            let (cal_at, fresh_at) = check_against_oracle(&monitor, &synth, &r, &fresh);
            // the boundary cases the configuration is for were exercised
            if ci == 0 {
                assert!(
                    cal_at > 0,
                    "{fusion:?}: no calibration computation at p = fpr"
                );
            } else {
                assert!(fresh_at > 0, "{fusion:?}: no fresh computation at p = fpr");
            }
        }
    }
}

/// Test 1b: every token aggregation, through fitting and scoring, equals its formula applied to
/// the traces' `-ln p` in arrival order (long computations, sites missing, several fusions).
#[test]
fn token_aggregations_match_a_naive_recomputation() {
    let synth = Synth {
        names: vec!["a", "b"],
        dims: vec![4, 6],
        max_traces: 12,
        p_missing: 0.2,
        shared: 0.5,
        outlier_rate: 0.05,
    };
    for (i, aggregation) in AGGREGATIONS.into_iter().enumerate() {
        let seed = 500 + i as u64;
        let mut rng = Rng::new(seed);
        let options = MonitorOptions {
            detectors: DetectorSpec::parse_list(DEFAULT_DETECTORS).unwrap(),
            joint: joint_list("gaussian"),
            aggregation,
            fusion: FUSIONS[i % 3],
            fpr: 0.05,
            calibration_fraction: 0.5,
            seed,
            length_strata: 4,
            probes: Vec::new(),
        };
        let r = reference(&synth, &mut rng, &options, (120, 140), 0.05, "c");
        let fresh: Vec<Computation> = (0..150)
            .map(|i| synth.computation(&mut rng, format!("fresh-{i}"), 0.0))
            .collect();
        let monitor = fit_monitor(&synth, &options, &r, &mut rng).unwrap();
        check_against_oracle(&monitor, &synth, &r, &fresh);
    }
}

/// Test 1d: the joint detector is the Mahalanobis distance of the joint vector (each site's
/// vector L2-normalised, concatenated) under the shrunk covariance of the fit part's joint
/// vectors, checked against an explicit inverse; and the fit reports what it joined.
#[test]
fn joint_detector_matches_a_naive_concatenate_and_invert() {
    let synth = Synth {
        names: vec!["b", "a", "c"],
        dims: vec![3, 4, 2],
        max_traces: 4,
        p_missing: 0.15,
        shared: 0.5,
        outlier_rate: 0.05,
    };
    let a = 0.3;
    let mut rng = Rng::new(77);
    let options = MonitorOptions {
        detectors: DetectorSpec::parse_list("gaussian").unwrap(),
        joint: joint_list(&format!("gaussian:shrinkage={a},normalize=false")),
        fpr: 0.1,
        calibration_fraction: 0.5,
        seed: 77,
        ..MonitorOptions::default()
    };
    let r = reference(&synth, &mut rng, &options, (200, 100), 0.0, "c");
    let monitor = fit_monitor(&synth, &options, &r, &mut rng).unwrap();
    let joint = monitor.joint().expect("a joint detector");
    assert_eq!(joint.dim, 9);
    let names: Vec<String> = monitor.site_names();
    assert_eq!(names, ["a", "b", "c"]);

    // naive: mean and covariance (1/n) of the fit part's joint vectors, shrunk, inverted
    let d = joint.dim;
    let fit: Vec<f32> = r
        .fit
        .iter()
        .flat_map(|c| joint_rows(&monitor, &synth, c))
        .collect();
    let n = fit.len() / d;
    let mean: Vec<f64> = (0..d)
        .map(|i| fit.chunks_exact(d).map(|x| f64::from(x[i])).sum::<f64>() / n as f64)
        .collect();
    let mut cov = vec![0.0; d * d];
    for x in fit.chunks_exact(d) {
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] +=
                    (f64::from(x[i]) - mean[i]) * (f64::from(x[j]) - mean[j]) / n as f64;
            }
        }
    }
    let mu = (0..d).map(|i| cov[i * d + i]).sum::<f64>() / d as f64;
    let mut m: Vec<f64> = (0..d * d)
        .map(|k| (1.0 - a) * cov[k] + if k / d == k % d { a * mu } else { 0.0 })
        .collect();
    // Gauss-Jordan inverse
    let mut inv: Vec<f64> = (0..d * d)
        .map(|k| f64::from(u8::from(k / d == k % d)))
        .collect();
    for col in 0..d {
        let piv = (col..d)
            .max_by(|&x, &y| m[x * d + col].abs().total_cmp(&m[y * d + col].abs()))
            .unwrap();
        for k in 0..d {
            m.swap(col * d + k, piv * d + k);
            inv.swap(col * d + k, piv * d + k);
        }
        let p = m[col * d + col];
        for k in 0..d {
            m[col * d + k] /= p;
            inv[col * d + k] /= p;
        }
        for row in (0..d).filter(|&row| row != col) {
            let f = m[row * d + col];
            for k in 0..d {
                m[row * d + k] -= f * m[col * d + k];
                inv[row * d + k] -= f * inv[col * d + k];
            }
        }
    }
    let fresh: Vec<f32> = (0..300)
        .map(|i| {
            synth.computation(
                &mut rng,
                format!("f{i}"),
                if i % 2 == 0 { 0.0 } else { 1.0 },
            )
        })
        .flat_map(|c| joint_rows(&monitor, &synth, &c))
        .collect();
    let got = joint.detectors[0].score_batch(&fresh).unwrap();
    assert_eq!(got.len(), fresh.len() / d);
    assert!(got.len() > 200);
    for (x, g) in fresh.chunks_exact(d).zip(&got) {
        let y: Vec<f64> = (0..d).map(|i| f64::from(x[i]) - mean[i]).collect();
        let want: f64 = (0..d)
            .map(|i| (0..d).map(|j| y[i] * inv[i * d + j] * y[j]).sum::<f64>())
            .sum();
        assert!((g - want).abs() <= 1e-4 * want.max(1.0), "{g} vs {want}");
    }

    // what the fit reports: joint vectors of each part, and positions some site never reached
    let count = |set: &[Computation]| -> (u64, u64) {
        set.iter().fold((0, 0), |(rows, incomplete), c| {
            let counts: Vec<usize> = c
                .sites
                .iter()
                .zip(&synth.dims)
                .map(|(r, d)| r.as_ref().map_or(0, |r| r.len() / d))
                .collect();
            let (lo, hi) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
            (rows + lo as u64, incomplete + (hi - lo) as u64)
        })
    };
    let (fit_rows, fit_incomplete) = count(&r.fit);
    let (cal_rows, cal_incomplete) = count(&r.cal);
    let summary = monitor.summary().joint.clone().unwrap();
    assert_eq!(summary.sites, names);
    assert_eq!(summary.width, 9);
    assert_eq!(summary.fit_rows, fit_rows);
    assert_eq!(joint.fit_traces, fit_rows);
    assert_eq!(summary.calibration_rows, cal_rows);
    assert_eq!(summary.incomplete, fit_incomplete + cal_incomplete);
    assert!(fit_incomplete > 0 && summary.skipped.is_none());
    assert_eq!(
        monitor.slots().last().unwrap(),
        &("joint".to_string(), "gaussian")
    );
}

/// A joint detector is skipped, and the fit says why, with one site or a joint width above the
/// limit; a site named like the joint slots is refused.
#[test]
fn joint_detector_is_skipped_where_it_cannot_help() {
    for (names, dims, why) in [
        (vec!["only"], vec![4], "one site"),
        (vec!["x", "y"], vec![3000, 1200], "above 4096"),
    ] {
        let synth = Synth {
            names,
            dims,
            max_traces: 1,
            p_missing: 0.0,
            shared: 0.5,
            outlier_rate: 0.0,
        };
        let mut rng = Rng::new(3);
        let options = MonitorOptions {
            detectors: DetectorSpec::parse_list("knn:k=2").unwrap(),
            fpr: 0.2,
            calibration_fraction: 0.5,
            ..MonitorOptions::default()
        };
        let r = reference(&synth, &mut rng, &options, (20, 10), 0.0, "c");
        let monitor = fit_monitor(&synth, &options, &r, &mut rng).unwrap();
        assert!(monitor.joint().is_none());
        let j = monitor.summary().joint.clone().unwrap();
        assert!(j.skipped.as_deref().unwrap().contains(why), "{j:?}");
    }
    let synth = Synth {
        names: vec!["joint", "other"],
        dims: vec![3, 3],
        max_traces: 1,
        p_missing: 0.0,
        shared: 0.5,
        outlier_rate: 0.0,
    };
    let mut rng = Rng::new(4);
    let options = MonitorOptions {
        fpr: 0.2,
        calibration_fraction: 0.5,
        ..MonitorOptions::default()
    };
    let r = reference(&synth, &mut rng, &options, (20, 10), 0.0, "c");
    let err = fit_phase(&synth, &options, &r.fit)
        .finish_fit()
        .err()
        .unwrap();
    assert!(err.to_string().contains("named \"joint\""), "{err}");
}

/// Test 1c (property): with a monotone aggregation and fusion, a computation streamed trace by
/// trace in random chunks (sites interleaved, positions given, three length strata) is flagged
/// early at the first position where the running statistic (recomputed by formula) reaches the
/// threshold of its length's stratum and of every longer one; then its final result is flagged
/// too, and the early result is partial and flagged; otherwise nothing is flagged early.
#[test]
fn an_early_flag_is_a_final_flag() {
    let synth = Synth {
        names: vec!["a", "b", "c"],
        dims: vec![4, 3, 5],
        max_traces: 10,
        p_missing: 0.2,
        shared: 0.5,
        outlier_rate: 0.1,
    };
    let mut checked_early = 0;
    let mut strata_only = 0;
    for (i, aggregation) in AGGREGATIONS.into_iter().enumerate() {
        for fusion in FUSIONS {
            let seed = 900 + 10 * i as u64 + fusion as u64;
            let mut rng = Rng::new(seed);
            let options = MonitorOptions {
                detectors: DetectorSpec::parse_list(DEFAULT_DETECTORS).unwrap(),
                joint: Vec::new(),
                aggregation,
                fusion,
                fpr: 0.1,
                calibration_fraction: 0.5,
                seed,
                length_strata: 3,
                probes: Vec::new(),
            };
            let r = reference(&synth, &mut rng, &options, (100, 100), 0.0, "c");
            let monitor = fit_monitor(&synth, &options, &r, &mut rng).unwrap();
            let early_ok = aggregation.is_monotone() && fusion.is_monotone();
            assert_eq!(monitor.flags_early(), early_ok);
            let o = oracle(&monitor, &synth, &r.cal);
            // flagged at this length whatever length the computation ends at: p <= fpr (by scan)
            // in the stratum of `len` and every longer one
            let strata = monitor.fused();
            let flagged_from = |stat: f64, len: u64| {
                strata.calibrations()[strata.stratum(len)..]
                    .iter()
                    .all(|c| p_by_scan(c.scores(), stat) <= 0.1)
            };
            for n in 0..60 {
                let shift = if n % 3 == 0 { 1.5 } else { 0.0 };
                let c = synth.computation(&mut rng, format!("x-{n}"), shift);
                // every trace as (site, row index, row), in a random interleaving of sites
                let mut queue: Vec<(usize, usize)> = Vec::new();
                let mut left: Vec<(usize, usize)> = c
                    .sites
                    .iter()
                    .enumerate()
                    .filter_map(|(s, r)| r.as_ref().map(|r| (s, r.len() / synth.dims[s])))
                    .collect();
                let mut next = vec![0usize; synth.dims.len()];
                while !left.is_empty() {
                    let k = below(&mut rng, left.len());
                    let s = left[k].0;
                    queue.push((s, next[s]));
                    next[s] += 1;
                    if next[s] == left[k].1 {
                        left.swap_remove(k);
                    }
                }
                // the running statistic by formula after each trace, and where it first crosses
                let mut seqs: Vec<Vec<f64>> = vec![Vec::new(); o.slot_cals.len()];
                let mut expected_at = None;
                let mut seen = vec![0u64; synth.dims.len()];
                for &(s, row) in &queue {
                    seen[s] += 1;
                    let si = monitor.site_index(synth.names[s]).unwrap();
                    let site = &monitor.sites()[si];
                    let off: usize = monitor.sites()[..si]
                        .iter()
                        .map(|m| m.detectors.len())
                        .sum();
                    let x = &c.sites[s].as_ref().unwrap()[row * site.dim..(row + 1) * site.dim];
                    for (j, det) in site.detectors.iter().enumerate() {
                        let raw = det.score_batch(x).unwrap()[0];
                        seqs[off + j].push(o.slot_cals[off + j].smooth_neg_log_p(raw, false));
                    }
                    let slots: Vec<Option<f64>> = seqs.iter().map(|v| aggregation.of(v)).collect();
                    let len = *seen.iter().max().unwrap();
                    if expected_at.is_none() && flagged_from(fuse(fusion, &slots), len) {
                        expected_at = Some(100 * s as i64 + row as i64);
                    }
                }
                // stream it in chunks of 1..=3 traces of one site, positions 100 * site + row
                let mut open = OpenComputations::default();
                let mut early = Vec::new();
                let mut at = 0;
                while at < queue.len() {
                    let s = queue[at].0;
                    let mut end = at + 1;
                    while end < queue.len()
                        && end - at < 1 + below(&mut rng, 3)
                        && queue[end].0 == s
                    {
                        end += 1;
                    }
                    let d = synth.dims[s];
                    let rows: Vec<f32> = queue[at..end]
                        .iter()
                        .flat_map(|&(_, row)| {
                            c.sites[s].as_ref().unwrap()[row * d..(row + 1) * d].to_vec()
                        })
                        .collect();
                    let positions = queue[at..end]
                        .iter()
                        .map(|&(_, row)| 100 * s as i32 + row as i32)
                        .collect();
                    let batch = SiteBatch::new(
                        synth.names[s],
                        vec![c.id.clone(); end - at],
                        Some(positions),
                        Vectors::new(d, rows).unwrap(),
                    )
                    .unwrap();
                    open.score(&monitor, &batch).unwrap();
                    early.extend(open.take_early_flags(&monitor));
                    at = end;
                }
                let fin = complete_one(&monitor, &mut open, &c.id);
                assert!(!fin.partial);
                if !early_ok {
                    assert!(early.is_empty(), "{aggregation} {fusion:?}: early flag");
                    assert_eq!(fin.flagged_at, None);
                    continue;
                }
                // an early flag is a final flag; with one stratum, every final flag was early
                // (with several, a computation can be flagged in its final stratum only)
                if expected_at.is_some() || strata.len() == 1 {
                    assert_eq!(
                        fin.flagged,
                        expected_at.is_some(),
                        "{aggregation} {fusion:?}"
                    );
                }
                strata_only += usize::from(fin.flagged && expected_at.is_none());
                assert_eq!(fin.flagged_at, expected_at, "{aggregation} {fusion:?}");
                assert!(early.len() <= 1);
                if let Some((id, e)) = early.first() {
                    assert_eq!(id, &c.id);
                    assert!(e.partial && e.flagged && fin.flagged);
                    assert_eq!(e.flagged_at, expected_at);
                    assert!(e.score <= fin.score && e.traces <= fin.traces);
                    checked_early += 1;
                } else {
                    // every crossing is handed out by the batch that made it
                    assert_eq!(expected_at, None, "{aggregation} {fusion:?}");
                }
            }
        }
    }
    assert!(
        checked_early > 20,
        "only {checked_early} early flags exercised"
    );
    eprintln!("{checked_early} early flags; {strata_only} computations flagged only at completion");
}

/// The f64 arithmetic of the in-sample rate: `FitSummary::calibration_fpr` is documented as the
/// share of calibration computations flagged, each judged against the others, i.e. with
/// `p_i = (1 + #{j != i : s_j >= s_i}) / n` and the flag rule `p_i <= fpr`. The monitor computes
/// `p_i` by counting; it once computed `(fused.p_value(s_i) · (n + 1) - 1) / n`, which rounds
/// above `fpr` for some computations judged exactly at the target (n = 24 at fpr 0.25:
/// `(7/25 · 25 - 1) / 24` > 0.25; n = 280 at fpr 0.2), so that such a computation was not
/// counted (found by this test).
#[test]
fn in_sample_rate_counts_a_computation_exactly_at_the_target() {
    let synth = Synth {
        names: vec!["s"],
        dims: vec![4],
        max_traces: 3,
        p_missing: 0.0,
        shared: 0.5,
        outlier_rate: 0.0,
    };
    for (fpr, n_cal) in [(0.25, 24), (0.2, 280)] {
        let mut rng = Rng::new(5);
        let options = MonitorOptions {
            detectors: DetectorSpec::parse_list("gaussian").unwrap(),
            joint: Vec::new(),
            aggregation: Aggregation::Max,
            fusion: Fusion::MinP,
            fpr,
            calibration_fraction: 0.5,
            seed: 5,
            length_strata: 1,
            probes: Vec::new(),
        };
        let r = reference(&synth, &mut rng, &options, (60, n_cal), 0.0, "c");
        let monitor = fit_monitor(&synth, &options, &r, &mut rng).unwrap();
        let (cal_at, _) = check_against_oracle(&monitor, &synth, &r, &[]);
        assert!(cal_at > 0);
    }
}

/// Scores one computation through the public scoring path.
fn score(monitor: &Monitor, synth: &Synth, c: &Computation) -> ComputationResult {
    let mut open = OpenComputations::default();
    open.open(monitor, &c.id).unwrap();
    for (s, rows) in c.sites.iter().enumerate() {
        if let Some(rows) = rows {
            let batch = site_batch(synth.names[s], &c.id, synth.dims[s], rows);
            open.score(monitor, &batch).unwrap();
        }
    }
    complete_one(monitor, &mut open, &c.id)
}

/// The rows of one computation at one site as a batch.
fn site_batch(site: &str, id: &str, dim: usize, rows: &[f32]) -> SiteBatch {
    let n = rows.len() / dim;
    SiteBatch::new(
        site,
        vec![id.to_string(); n],
        None,
        Vectors::new(dim, rows.to_vec()).unwrap(),
    )
    .unwrap()
}

/// Completes computation `id`, the only one open.
fn complete_one(monitor: &Monitor, open: &mut OpenComputations, id: &str) -> ComputationResult {
    let mut done = open.complete(monitor, &[id.to_string()]).unwrap();
    assert_eq!(done.len(), 1);
    assert!(open.is_empty());
    done.pop().unwrap().1
}

/// Test 2: the false-positive rate achieved on fresh in-distribution computations.
///
/// Per seed, a monitor is fitted on `N_FIT` and calibrated on exactly `N_CAL` computations
/// (every fusion in turn; traces of a computation share an offset, so they are correlated), and
/// `N_TEST` fresh computations from the same distribution are scored.
///
/// Slack: with `n = N_CAL` continuous calibration statistics and flag rule `p <= α`, a fresh
/// computation is flagged iff its statistic exceeds the l-th largest calibration statistic,
/// `l = #{k in 1..=n+1 : k/(n+1) <= α}`, so conditionally on the calibration set the flag
/// probability q is Beta(l, n+1-l) distributed: mean `e = l/(n+1)` (in `[α - 1/(n+1), α]`),
/// variance `e(1-e)/(n+2)`. The per-seed rate adds binomial noise of variance at most
/// `e(1-e)/N_TEST`. Seeds are independent, so the mean over `S` seeds has standard error
/// `se = sqrt(e(1-e) (1/(n+2) + 1/N_TEST) / S)`, and we require
/// `α - 1/(n+1) - 3 se <= mean <= α + 3 se`. The lower side matters: conformal validity is tight
/// for continuous scores, so a monitor that flags too little is as wrong as one that flags too
/// much. Negative control: the same monitors flag most computations of a shifted distribution
/// (every coordinate + `SHIFT`). Seeds alternate between the default detectors and raw-space ones;
/// the control uses the raw-space ones only, because the defaults judge directions (normalised
/// Gaussian, cosine kNN), to which a shift along the all-ones vector is nearly invisible (they
/// flag about 20% of such computations at `SHIFT` 2 or 3).
#[test]
fn achieved_fpr_over_seeds_is_the_target() {
    const SEEDS: u64 = 60;
    const N_FIT: usize = 300;
    const N_CAL: usize = 300;
    const N_TEST: usize = 800;
    const N_SHIFTED: usize = 100;
    const SHIFT: f64 = 2.0;
    const DETECTORS: [&str; 2] = [DEFAULT_DETECTORS, "gaussian:normalize=false,knn:metric=l2"];
    const ALPHAS: [f64; 2] = [0.05, 0.1];
    let synth = Synth {
        names: vec!["early", "late"],
        dims: vec![6, 4],
        max_traces: 3,
        p_missing: 0.1,
        shared: 0.7,
        outlier_rate: 0.0,
    };
    let started = Instant::now();
    let mut flagged = [0usize; ALPHAS.len()];
    let mut shifted_flagged = 0usize;
    for seed in 0..SEEDS {
        let mut rng = Rng::new(10_000 + seed);
        let options = MonitorOptions {
            detectors: DetectorSpec::parse_list(DETECTORS[(seed % 2) as usize]).unwrap(),
            joint: joint_list(if seed % 2 == 0 { "gaussian" } else { "none" }),
            aggregation: AGGREGATIONS[(seed % 5) as usize],
            fusion: FUSIONS[(seed % 3) as usize],
            fpr: ALPHAS[0],
            calibration_fraction: 0.5,
            seed,
            length_strata: 1,
            probes: Vec::new(),
        };
        let r = reference(&synth, &mut rng, &options, (N_FIT, N_CAL), 0.0, "ref");
        let monitor = fit_monitor(&synth, &options, &r, &mut rng).unwrap();
        assert_eq!(monitor.fused().computations(), N_CAL);
        for i in 0..N_TEST {
            let c = synth.computation(&mut rng, format!("test-{i}"), 0.0);
            let res = score(&monitor, &synth, &c);
            assert_eq!(res.flagged, res.p_value <= ALPHAS[0]);
            for (a, f) in ALPHAS.iter().zip(&mut flagged) {
                *f += usize::from(res.p_value <= *a);
            }
        }
        if seed % 2 == 1 {
            for i in 0..N_SHIFTED {
                let c = synth.computation(&mut rng, format!("shifted-{i}"), SHIFT);
                shifted_flagged += usize::from(score(&monitor, &synth, &c).flagged);
            }
        }
    }
    let n = N_CAL as f64;
    for (&alpha, &f) in ALPHAS.iter().zip(&flagged) {
        let mean = f as f64 / (SEEDS as usize * N_TEST) as f64;
        let l = (1..=N_CAL + 1)
            .filter(|&k| k as f64 / (n + 1.0) <= alpha)
            .count();
        let e = l as f64 / (n + 1.0);
        let se = (e * (1.0 - e) * (1.0 / (n + 2.0) + 1.0 / N_TEST as f64) / SEEDS as f64).sqrt();
        let (lo, hi) = (alpha - 1.0 / (n + 1.0) - 3.0 * se, alpha + 3.0 * se);
        eprintln!(
            "alpha {alpha}: achieved {mean:.4} (expected {e:.4}, accepted [{lo:.4}, {hi:.4}])"
        );
        assert!(
            mean <= hi,
            "alpha {alpha}: achieved FPR {mean} > {hi} (expected {e}, se {se})"
        );
        assert!(
            mean >= lo,
            "alpha {alpha}: achieved FPR {mean} < {lo} (expected {e}, se {se})"
        );
    }
    let shifted = shifted_flagged as f64 / (SEEDS as usize / 2 * N_SHIFTED) as f64;
    eprintln!(
        "shifted by {SHIFT}: flagged {shifted:.4} at alpha {}; {SEEDS} seeds in {:.1?}",
        ALPHAS[0],
        started.elapsed()
    );
    assert!(
        shifted >= 0.5,
        "a shifted distribution is flagged at only {shifted}"
    );
}

/// Test 3a: a fitter serialised mid-fit and resumed with the remaining fit traces gives the very
/// monitor an uninterrupted fit gives (actwatch-io's checkpoint does this with bincode, which is
/// not a dependency here). The state goes through `serde_json::Value`, which keeps every f64
/// exactly; JSON *text* does not: serde_json's parser without its `float_roundtrip` feature reads
/// some 17-digit f64 one ulp off (e.g. `0.0013621257041421721`), so a fitter checkpointed as JSON
/// text would resume slightly differently.
#[test]
fn resumed_fitter_gives_the_identical_monitor() {
    let synth = Synth {
        names: vec!["a", "b"],
        dims: vec![5, 3],
        max_traces: 4,
        p_missing: 0.2,
        shared: 0.5,
        outlier_rate: 0.05,
    };
    // the second list keeps a kNN reservoir that samples (more fit traces than max_references)
    for detectors in [DEFAULT_DETECTORS, "knn:k=4,max_references=50,metric=l2"] {
        let mut rng = Rng::new(7);
        let options = MonitorOptions {
            detectors: DetectorSpec::parse_list(detectors).unwrap(),
            joint: Vec::new(),
            aggregation: Aggregation::MaxRollingMean { window: 2 },
            fusion: Fusion::Fisher,
            fpr: 0.05,
            calibration_fraction: 0.4,
            seed: 3,
            length_strata: DEFAULT_LENGTH_STRATA,
            probes: Vec::new(),
        };
        let r = reference(&synth, &mut rng, &options, (200, 60), 0.0, "ref");
        let (first, second) = r.fit.split_at(90);
        let mut whole = fit_phase(&synth, &options, first);
        let state = serde_json::to_value(&whole).unwrap();
        let mut resumed: MonitorFitter = serde_json::from_value(state.clone()).unwrap();
        assert_eq!(resumed.options(), &options);
        assert_eq!(resumed.fit_traces(), whole.fit_traces());
        assert_eq!(serde_json::to_value(&resumed).unwrap(), state);
        push_fit(&mut whole, &synth, second);
        push_fit(&mut resumed, &synth, second);
        let cal_seed = rng.next_u64();
        let finish = |f: MonitorFitter| {
            let mut c = f.finish_fit().unwrap();
            push_calibration(&mut c, &synth, &r.cal, &mut Rng::new(cal_seed));
            c.finish().unwrap()
        };
        let (a, b) = (finish(whole), finish(resumed));
        assert_eq!(
            serde_json::to_string(a.sites()).unwrap(),
            serde_json::to_string(b.sites()).unwrap(),
            "{detectors}"
        );
        assert_eq!(a.fused(), b.fused(), "{detectors}");
        assert_eq!(a.summary().calibration_fpr, b.summary().calibration_fpr);
        assert_eq!(a.summary().threshold, b.summary().threshold);
        assert_eq!(a.summary().knn_recall, b.summary().knn_recall);
        for i in 0..50 {
            let c = synth.computation(&mut rng, format!("fresh-{i}"), 0.5);
            assert_eq!(score(&a, &synth, &c), score(&b, &synth, &c), "{detectors}");
        }
    }
}

/// Test 3b: `finish` needs at least `ceil(1/fpr)` calibration *computations* (not traces), and
/// says how many; with that many it calibrates and has a finite threshold.
#[test]
fn finish_refuses_too_few_calibration_computations() {
    let synth = Synth {
        names: vec!["s"],
        dims: vec![4],
        max_traces: 5,
        p_missing: 0.0,
        shared: 0.5,
        outlier_rate: 0.0,
    };
    for (fpr, need) in [(0.05, 20), (0.1, 10), (0.3, 4)] {
        for n_cal in [need - 1, need] {
            let mut rng = Rng::new(need as u64);
            let options = MonitorOptions {
                detectors: DetectorSpec::parse_list("gaussian").unwrap(),
                fpr,
                ..MonitorOptions::default()
            };
            let r = reference(&synth, &mut rng, &options, (40, n_cal), 0.0, "ref");
            let traces: u64 = r.cal.iter().map(|c| n_traces(&synth, c)).sum();
            assert!(
                traces >= need as u64,
                "fewer traces than computations needed"
            );
            match fit_monitor(&synth, &options, &r, &mut rng) {
                Err(Error::NotEnoughData(m)) if n_cal < need => {
                    assert!(m.contains(&format!("at least {need} ")), "{m}");
                    assert!(
                        m.starts_with(&format!("{n_cal} calibration computations")),
                        "{m}"
                    );
                }
                Ok(monitor) if n_cal == need => {
                    assert_eq!(monitor.fused().computations(), need);
                    assert!(monitor.summary().threshold.is_some_and(f64::is_finite));
                }
                Err(e) => panic!("fpr {fpr}, {n_cal} computations: {e}"),
                Ok(_) => panic!("fpr {fpr}: {n_cal} computations accepted"),
            }
        }
    }
}

fn is_width_mismatch(r: Result<impl std::fmt::Debug, Error>, want_expected: usize) -> bool {
    matches!(
        r,
        Err(Error::Input(actwatch_core::Error::WidthMismatch { expected, .. })) if expected == want_expected
    )
}

/// Test 3c: invalid options, widths and missing data are refused with the right error, and a
/// refused push leaves the fitter unchanged.
#[test]
fn bad_input_is_refused_with_the_right_error() {
    let options = MonitorOptions {
        detectors: DetectorSpec::parse_list("gaussian").unwrap(),
        fpr: 0.1,
        calibration_fraction: 0.5,
        ..MonitorOptions::default()
    };
    let bad_options = [
        MonitorOptions {
            fpr: 0.0,
            ..options.clone()
        },
        MonitorOptions {
            fpr: 1.0,
            ..options.clone()
        },
        MonitorOptions {
            fpr: f64::NAN,
            ..options.clone()
        },
        MonitorOptions {
            calibration_fraction: 0.0,
            ..options.clone()
        },
        MonitorOptions {
            calibration_fraction: 1.0,
            ..options.clone()
        },
        MonitorOptions {
            detectors: Vec::new(),
            ..options.clone()
        },
    ];
    for o in bad_options {
        assert!(
            matches!(MonitorFitter::new(o.clone()), Err(Error::InvalidOption(_))),
            "{o:?} accepted"
        );
    }
    assert!(matches!(
        MonitorFitter::new(options.clone()).unwrap().finish_fit(),
        Err(Error::NotEnoughData(_))
    ));

    let mut rng = Rng::new(3);
    let fitter = |rng: &mut Rng| {
        let mut f = MonitorFitter::new(options.clone()).unwrap();
        f.push_fit("s", &rng.gaussian_rows(50, 4, 0.0), 4).unwrap();
        f.push_fit("t", &rng.gaussian_rows(40, 3, 0.0), 3).unwrap();
        f.push_fit("u", &[], 7).unwrap(); // empty: no site
        f
    };
    let mut f = fitter(&mut rng);
    let r = f.push_fit("s", &rng.gaussian_rows(5, 5, 0.0), 5);
    assert!(
        matches!(
            r,
            Err(Error::Input(actwatch_core::Error::WidthMismatch {
                expected: 4,
                got: 5
            }))
        ),
        "{r:?}"
    );
    assert_eq!(f.fit_traces(), 90, "a refused push changed the fitter");

    let ids: Vec<String> = (0..30).map(|i| format!("c{i}")).collect();
    let mut cal = f.finish_fit().unwrap();
    assert!(is_width_mismatch(
        cal.push_calibration(&ids[..2], "s", &rng.gaussian_rows(2, 5, 0.0)),
        4
    ));
    let r = cal.push_calibration(&ids[..2], "u", &rng.gaussian_rows(2, 7, 0.0));
    assert!(
        matches!(&r, Err(Error::NotEnoughData(m)) if m.contains("site u")),
        "{r:?}"
    );
    cal.push_calibration(&ids, "s", &rng.gaussian_rows(30, 4, 0.0))
        .unwrap();
    let r = cal.finish().map(|_| ());
    assert!(
        matches!(&r, Err(Error::NotEnoughData(m)) if m.contains("site t")),
        "{r:?}"
    );

    let mut cal = fitter(&mut rng).finish_fit().unwrap();
    cal.push_calibration(&ids, "s", &rng.gaussian_rows(30, 4, 0.0))
        .unwrap();
    cal.push_calibration(&ids[..5], "t", &rng.gaussian_rows(5, 3, 0.0))
        .unwrap();
    let monitor = cal.finish().unwrap();
    assert_eq!(monitor.site_names(), ["s", "t"]);
    let s = monitor.site_index("s").unwrap();
    assert!(is_width_mismatch(monitor.score_site(s, &[0.0; 7]), 4));
    assert!(monitor.site_index("u").is_none());
}

/// Test 3d: the split is a pure function of seed and id, the same in both phases, and puts about
/// `calibration_fraction` of computations in calibration.
#[test]
fn split_is_stable_across_phases() {
    let options = MonitorOptions {
        detectors: DetectorSpec::parse_list("gaussian").unwrap(),
        calibration_fraction: 0.3,
        seed: 11,
        ..MonitorOptions::default()
    };
    let mut rng = Rng::new(1);
    let mut f = MonitorFitter::new(options.clone()).unwrap();
    f.push_fit("s", &rng.gaussian_rows(20, 2, 0.0), 2).unwrap();
    let ids: Vec<String> = (0..4000).map(|i| format!("id-{i}")).collect();
    let in_fit: Vec<bool> = ids.iter().map(|id| f.is_calibration(id)).collect();
    let cal = f.finish_fit().unwrap();
    let in_cal: Vec<bool> = ids.iter().map(|id| cal.is_calibration(id)).collect();
    assert_eq!(in_fit, in_cal);
    let other = MonitorFitter::new(MonitorOptions {
        seed: 12,
        ..options
    })
    .unwrap();
    assert_ne!(
        in_fit,
        ids.iter()
            .map(|id| other.is_calibration(id))
            .collect::<Vec<_>>()
    );
    // binomial: 4000 · 0.3 ± 4 sd (sd = sqrt(4000 · 0.21) ≈ 29)
    let share = in_fit.iter().filter(|&&c| c).count();
    assert!((1200usize.abs_diff(share)) < 116, "{share}");
}

/// Test 1e: above 4096 in total, a site's part of the joint vector is its top whitened principal
/// coordinates under its own Gaussian: `(normalise(x) - mean) · v_j / sqrt(λ_j)` for the `r`
/// largest eigenvalues, `r = min(rank, 4096 / sites)`, computed here from the site Gaussian's
/// eigenvectors and eigenvalues; the joint detector is fitted on exactly those vectors, and a
/// scored computation's joint slot gets the p-value of its oracle joint vector.
#[test]
fn a_wide_joint_vector_is_each_sites_whitened_principal_coordinates() {
    use actwatch_detect::spec::FittedDetector;
    let synth = Synth {
        names: vec!["a", "b", "c"],
        dims: vec![1400; 3],
        // (only names and widths are used: the computations are made below)
        max_traces: 1,
        p_missing: 0.0,
        shared: 0.0,
        outlier_rate: 0.0,
    };
    let mut rng = Rng::new(91);
    let options = MonitorOptions {
        detectors: DetectorSpec::parse_list("gaussian").unwrap(),
        joint: joint_list("gaussian"),
        fpr: 0.1,
        calibration_fraction: 0.4,
        seed: 91,
        ..MonitorOptions::default()
    };
    // Cheap wide data (the generic generator mixes with a d×d matrix per call): 40 latent
    // factors shared by a computation's three sites, each site mixing them its own way, plus noise.
    let d = 1400;
    let mixes: Vec<Vec<f64>> = (0..3)
        .map(|_| (0..d * 40).map(|_| rng.normal()).collect())
        .collect();
    let wide = |rng: &mut Rng, id: String, shift: f64| -> Computation {
        let z: Vec<f64> = (0..40).map(|_| rng.normal()).collect();
        let sites = mixes
            .iter()
            .map(|m| {
                let row: Vec<f32> = (0..d)
                    .map(|i| {
                        let v: f64 = (0..40).map(|k| m[i * 40 + k] * z[k]).sum();
                        (v + rng.normal() * 0.5 + shift) as f32
                    })
                    .collect();
                Some(row)
            })
            .collect();
        Computation { id, sites }
    };
    let router = MonitorFitter::new(options.clone()).unwrap();
    let mut r = Reference {
        fit: Vec::new(),
        cal: Vec::new(),
    };
    for i in 0.. {
        if r.fit.len() >= 300 && r.cal.len() >= 100 {
            break;
        }
        let id = format!("w-{i}");
        let part = if router.is_calibration(&id) {
            &mut r.cal
        } else {
            &mut r.fit
        };
        if part.len() < if router.is_calibration(&id) { 100 } else { 300 } {
            part.push(wide(&mut rng, id, 0.0));
        }
    }
    let monitor = fit_monitor(&synth, &options, &r, &mut rng).unwrap();
    let summary = monitor.summary().joint.clone().unwrap();
    assert_eq!(summary.skipped, None);
    // rank 256 at width 1400 (the default above 1024), under 4096 / 3
    assert_eq!(summary.site_widths, vec![256, 256, 256]);
    let joint = monitor.joint().expect("a joint detector");
    assert_eq!((summary.width, joint.dim), (768, 768));

    // the oracle's part of site `si` for one vector, in f64
    let part = |si: usize, x: &[f32]| -> Vec<f64> {
        let FittedDetector::Gaussian(g) = &monitor.sites()[si].detectors[0] else {
            panic!("a Gaussian")
        };
        let (d, rank) = (g.dim(), g.rank());
        let norm = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let y: Vec<f64> = x
            .iter()
            .zip(g.mean())
            .map(|(v, m)| f64::from(*v) / norm - f64::from(*m))
            .collect();
        (0..256)
            .map(|j| {
                let dot: f64 = (0..d)
                    .map(|i| y[i] * f64::from(g.projection()[i * rank + j]))
                    .sum();
                dot / g.eigenvalues()[j].sqrt()
            })
            .collect()
    };
    let oracle_joint = |c: &Computation| -> Vec<f64> {
        (0..3)
            .flat_map(|si| {
                let s = synth.site(&monitor.sites()[si].name);
                part(si, c.sites[s].as_deref().unwrap())
            })
            .collect()
    };
    // the mapping the monitor uses, against the oracle
    for c in r.cal.iter().take(20) {
        for si in 0..3 {
            let s = synth.site(&monitor.sites()[si].name);
            let x = c.sites[s].as_deref().unwrap();
            let got = monitor.joint_parts(si, x).unwrap().unwrap();
            for (g, w) in got.iter().zip(part(si, x)) {
                assert!((f64::from(*g) - w).abs() <= 1e-3, "{g} vs {w}");
            }
            // Scoring for computations takes the part from the site Gaussian's own product:
            // the same bits as the map the fit used, and the same scores as plain scoring.
            let site = &monitor.sites()[si];
            let batch = site_batch(&site.name, &c.id, site.dim, x);
            let scored = monitor.score_for_computations(&batch).unwrap();
            assert_eq!(scored.joint_part.as_deref(), Some(&got[..]));
            let plain = monitor.score(&batch).unwrap();
            assert_eq!((plain.raw, plain.joint_part), (scored.raw, None));
        }
    }
    // the joint Gaussian's mean is the fit part's mean oracle joint vector
    let FittedDetector::Gaussian(jg) = &joint.detectors[0] else {
        panic!("a joint Gaussian")
    };
    let n = r.fit.len() as f64;
    let mut mean = vec![0.0; 768];
    for c in &r.fit {
        for (m, v) in mean.iter_mut().zip(oracle_joint(c)) {
            *m += v / n;
        }
    }
    for (g, w) in jg.mean().iter().zip(&mean) {
        assert!((f64::from(*g) - w).abs() <= 1e-3, "{g} vs {w}");
    }
    // end to end: a scored computation's joint slot p-value is that of its oracle joint vector
    let (mut same, mut total) = (0, 0);
    for i in 0..60 {
        let c = wide(
            &mut rng,
            format!("fresh-{i}"),
            if i % 2 == 0 { 0.0 } else { 0.02 },
        );
        let mut open = OpenComputations::default();
        for site in monitor.sites() {
            let s = synth.site(&site.name);
            let rows = c.sites[s].as_deref().unwrap();
            open.score(&monitor, &site_batch(&site.name, &c.id, site.dim, rows))
                .unwrap();
        }
        let (_, result) = open
            .complete(&monitor, std::slice::from_ref(&c.id))
            .unwrap()
            .remove(0);
        let v: Vec<f32> = oracle_joint(&c).iter().map(|&x| x as f32).collect();
        let want = joint.calibrations[0].p_value(joint.detectors[0].score_batch(&v).unwrap()[0]);
        let got = result
            .slot_p
            .last()
            .copied()
            .flatten()
            .expect("a joint p-value");
        total += 1;
        if (got - want).abs() < 1e-12 {
            same += 1;
        }
    }
    // (a rounding difference can move a score across a calibration score: rare)
    assert!(
        same >= total - 2,
        "{same} of {total} joint p-values as the oracle's"
    );
}
