//! What the commands print: the fit report and the evaluation table.

use std::path::Path;

use actwatch_detect::metrics;
use actwatch_detect::{ComputationResult, Monitor};
use actwatch_io::artifact::Manifest;

pub fn print_fit_report(monitor: &Monitor, manifest: &Manifest, seconds: f64, out: &Path) {
    let s = monitor.summary();
    println!("monitor written to {}", out.display());
    println!(
        "reference: {} rows, {} computations ({} calibration), sha256 {}",
        manifest.reference.rows,
        manifest.reference.computations,
        s.calibration_computations,
        &manifest.reference.sha256[..16]
    );
    println!(
        "{:<12} {:>6} {:>10} {:>12}  detectors",
        "site", "width", "fit", "calibration"
    );
    for site in monitor.sites() {
        let dets: Vec<String> = site.detectors.iter().map(describe_detector).collect();
        println!(
            "{:<12} {:>6} {:>10} {:>12}  {}",
            site.name,
            site.dim,
            site.fit_traces,
            site.calibration_traces,
            dets.join(", ")
        );
    }
    if let Some(j) = monitor.joint() {
        let dets: Vec<String> = j.detectors.iter().map(describe_detector).collect();
        println!(
            "{:<12} {:>6} {:>10} {:>12}  {}",
            j.name,
            j.dim,
            j.fit_traces,
            j.calibration_traces,
            dets.join(", ")
        );
    }
    for site in monitor.sites() {
        println!("provenance of site {}: {}", site.name, site.provenance);
    }
    if let Some(j) = &s.joint {
        match &j.skipped {
            Some(why) => println!("joint detector skipped: {why}"),
            None if monitor
                .joint_map()
                .is_some_and(actwatch_detect::joint::JointMap::is_reduced) =>
            {
                let parts: Vec<String> = j
                    .sites
                    .iter()
                    .zip(&j.site_widths)
                    .map(|(s, w)| format!("{s} ({w})"))
                    .collect();
                println!(
                    "joint vectors: the top whitened principal coordinates of each site ({}) concatenated; {} positions left out (a site had no trace there)",
                    parts.join(", "),
                    j.incomplete
                )
            }
            None => println!(
                "joint vectors: sites {} concatenated; {} positions left out (a site had no trace there)",
                j.sites.join(", "),
                j.incomplete
            ),
        }
    }
    for r in &s.knn_recall {
        println!(
            "knn recall@{} at site {} (HNSW vs exact, {} calibration queries): {:.4}",
            r.k, r.site, r.queries, r.recall
        );
    }
    if s.knn_recall.is_empty() {
        println!("knn: exact search at every site (recall 1)");
    }
    println!(
        "aggregation {}, fusion {}, target FPR {}, calibration FPR {:.4} (each calibration computation judged against the others)",
        monitor.options().aggregation,
        monitor.options().fusion.name(),
        monitor.options().fpr,
        s.calibration_fpr
    );
    for p in monitor.probes() {
        print_probe_summary(&p.summary, monitor.options().fpr);
    }
    println!(
        "timings: fit {:.2}s, calibration {:.2}s, total {:.2}s",
        s.fit_seconds, s.calibration_seconds, seconds
    );
}

/// What fitting one concept probe found: per site its examples and C, then its calibration and
/// the recall on held-out positives.
fn print_probe_summary(p: &actwatch_detect::monitor::ProbeSummary, fpr: f64) {
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
    println!("probe {} ({}):", p.name, p.kind);
    for s in &p.sites {
        let c = match (s.c, s.cv_loss.is_empty()) {
            (Some(c), false) => format!(", C {c:.3e} (5-fold cross-validated)"),
            (Some(c), true) => format!(", C {c:.3e}"),
            (None, _) => String::new(),
        };
        println!(
            "  site {}: fitted on {} positive and {} negative computations{}{}",
            s.site,
            s.fit.positive,
            s.fit.negative,
            if s.fit.reference > 0 {
                format!(
                    " (+{} reference computations as negatives)",
                    s.fit.reference
                )
            } else {
                String::new()
            },
            c
        );
    }
    println!(
        "  calibrated on {} benign computations ({} reference, {} labelled negatives): FPR {} overall, {} on the labelled negatives",
        p.calibration_reference + p.calibration_negatives,
        p.calibration_reference,
        p.calibration_negatives,
        pct(Some(p.calibration_fpr)),
        pct(p.negatives_fpr)
    );
    println!(
        "  recall at FPR {fpr} on {} held-out positives: {}",
        p.heldout_positives,
        pct(p.recall)
    );
    if p.deferred_benign.is_some() {
        println!(
            "  deferred (cascade band): {} of benign computations, {} of held-out positives",
            pct(p.deferred_benign),
            pct(p.deferred_positives)
        );
    }
}

/// Warns, on stderr, of input scored despite provenance that conflicts with the monitor's.
pub fn print_provenance_conflicts(conflicts: &actwatch_io::pipeline::ProvenanceConflicts) {
    for (site, c) in conflicts {
        eprintln!(
            "warning: site {site}: the input declares {} {:?}, but the monitor's reference traces \
             declared {:?}; scored anyway (--provenance-policy warn)",
            c.field, c.declared, c.recorded
        );
    }
}

fn describe_detector(d: &actwatch_detect::spec::FittedDetector) -> String {
    use actwatch_detect::spec::FittedDetector;
    match d {
        FittedDetector::Gaussian(g) => format!(
            "gaussian(shrinkage {:.3}, rank {}{})",
            g.shrinkage(),
            g.rank(),
            if g.options().normalize { ", l2" } else { "" }
        ),
        FittedDetector::Knn(k) => format!(
            "knn(k {}, {:?}, {} refs, {})",
            k.options().k,
            k.options().metric,
            k.len(),
            if k.is_exact() { "exact" } else { "hnsw" }
        ),
    }
}

/// `eval --examples`: per probe, AUROC of its p-values (positives against negatives),
/// recall and FPR at the target rate, deferred shares; per group when given (each group's
/// positives against all negatives, each group's negatives flagged).
pub fn print_probe_eval(
    monitor: &Monitor,
    results: &[actwatch_detect::ComputationResult],
    labels: &[bool],
    groups: Option<&[Option<String>]>,
) {
    let fpr = monitor.options().fpr;
    let n_pos = labels.iter().filter(|&&l| l).count();
    println!(
        "{} computations: {} positive, {} negative; target FPR {fpr}",
        labels.len(),
        n_pos,
        labels.len() - n_pos
    );
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    let share = |idx: &[usize], f: &dyn Fn(usize) -> bool| -> Option<f64> {
        (!idx.is_empty()).then(|| idx.iter().filter(|&&i| f(i)).count() as f64 / idx.len() as f64)
    };
    let mut names: Vec<String> = vec!["all".into()];
    if let Some(g) = groups {
        for v in g {
            let v = v.clone().unwrap_or_else(|| "(null)".into());
            if !names.contains(&v) {
                names.push(v);
            }
        }
    }
    for (pi, p) in monitor.probes().iter().enumerate() {
        println!(
            "probe {} ({}, sites {}):",
            p.name(),
            p.spec.kind.name(),
            p.sites
                .iter()
                .map(|s| monitor.sites()[s.site].name.as_str())
                .collect::<Vec<_>>()
                .join("+")
        );
        println!(
            "  {:<40} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>9}",
            "group", "pos", "neg", "AUROC", "recall", "FPR", "defer+", "defer-"
        );
        // The p-value is what the monitor decides on (with length strata, fused statistics of
        // different strata are not comparable), so the AUROC ranks by it.
        let score = |i: usize| -results[i].probes[pi].p_value;
        let all_neg: Vec<usize> = (0..labels.len()).filter(|&i| !labels[i]).collect();
        let neg_scores: Vec<f64> = all_neg.iter().map(|&i| score(i)).collect();
        for name in &names {
            let member = |i: usize| {
                name == "all"
                    || groups.is_some_and(|g| g[i].as_deref().unwrap_or("(null)") == name.as_str())
            };
            let pos: Vec<usize> = (0..labels.len())
                .filter(|&i| labels[i] && member(i))
                .collect();
            let neg: Vec<usize> = (0..labels.len())
                .filter(|&i| !labels[i] && member(i))
                .collect();
            let pos_scores: Vec<f64> = pos.iter().map(|&i| score(i)).collect();
            let flagged = |i: usize| results[i].probes[pi].flagged;
            let deferred = |i: usize| results[i].probes[pi].deferred;
            let has_defer = p.spec.defer_fpr.is_some();
            println!(
                "  {:<40} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>9}",
                name,
                pos.len(),
                neg.len(),
                fmt(metrics::auroc(&neg_scores, &pos_scores)),
                fmt(share(&pos, &flagged)),
                fmt(share(&neg, &flagged)),
                if has_defer {
                    fmt(share(&pos, &deferred))
                } else {
                    "-".into()
                },
                if has_defer {
                    fmt(share(&neg, &deferred))
                } else {
                    "-".into()
                },
            );
        }
    }
    println!(
        "AUROC: of the p-values (smaller = more of the concept), the group's positives against all \
         negatives; recall and FPR: flagged at p <= {fpr}; \
         defer+/-: positives/negatives deferred (p in ({fpr}, defer_fpr])"
    );
}

/// One row of the evaluation table: the computation-level results of one category.
#[derive(Default)]
pub struct EvalRow {
    pub name: String,
    pub scores: Vec<f64>,
    pub flags: Vec<bool>,
    /// Per computation, per (site, detector) slot: the p-value of its most anomalous trace there.
    pub slot_p: Vec<Vec<Option<f64>>>,
}

impl EvalRow {
    pub fn new(name: String) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    pub fn push(&mut self, r: &ComputationResult) {
        self.scores.push(r.score);
        self.flags.push(r.flagged);
        self.slot_p.push(r.slot_p.clone());
    }

    /// Every row's computations in one row.
    fn pooled(name: &str, rows: &[EvalRow]) -> Self {
        let mut out = Self::new(name.into());
        for r in rows {
            out.scores.extend(&r.scores);
            out.flags.extend(&r.flags);
            out.slot_p.extend(r.slot_p.iter().cloned());
        }
        out
    }

    /// Slot `j` alone: its `-ln p` per computation (a computation with no trace there: p = 1)
    /// and whether `p <= fpr`.
    fn slot(&self, j: usize, fpr: f64) -> (Vec<f64>, Vec<bool>) {
        self.slot_p
            .iter()
            .map(|p| {
                let p = p[j].unwrap_or(1.0);
                (-p.ln(), p <= fpr)
            })
            .unzip()
    }
}

/// The achieved false-positive rate on `normal`, then per anomalous category (and pooled over
/// them) the monitor's AUROC, FPR at 95% TPR and recall at its target rate; then the same for
/// every (site, detector) slot alone, flagged at its own p-value <= the target, and which single
/// slot would have done best on the pooled anomalous set (a choice made in hindsight, which the
/// monitor has to match without seeing the anomalies).
pub fn print_eval_table(monitor: &Monitor, normal_row: &EvalRow, rows: &[EvalRow]) {
    let target = monitor.options().fpr;
    let fpr = metrics::rate(&normal_row.flags).unwrap_or(0.0);
    println!(
        "normal: {} computations, achieved FPR {:.4} at target {} ({} flagged)",
        normal_row.scores.len(),
        fpr,
        target,
        normal_row.flags.iter().filter(|&&f| f).count()
    );
    println!(
        "{:<24} {:>7} {:>8} {:>11} {:>16}",
        "anomalous", "n", "AUROC", "FPR@95TPR", "recall@target"
    );
    let pooled = (rows.len() > 1).then(|| EvalRow::pooled("pooled", rows));
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    for r in rows.iter().chain(&pooled) {
        println!(
            "{:<24} {:>7} {:>8} {:>11} {:>16}",
            r.name,
            r.scores.len(),
            fmt(metrics::auroc(&normal_row.scores, &r.scores)),
            fmt(metrics::fpr_at_tpr(&normal_row.scores, &r.scores, 0.95)),
            fmt(metrics::rate(&r.flags)),
        );
    }
    let all = pooled.as_ref().or(rows.first());
    let Some(all) = all else { return };
    println!(
        "each (site, detector) alone, flagged at its p-value <= {target}: AUROC per category{}, recall on {}, FPR on normal",
        if pooled.is_some() { " and pooled" } else { "" },
        all.name
    );
    let mut best: Option<(String, f64)> = None;
    for (j, (site, det)) in monitor.slots().iter().enumerate() {
        let name = format!("{site}/{det}");
        let (normal, normal_flags) = normal_row.slot(j, target);
        let aurocs: Vec<String> = rows
            .iter()
            .chain(&pooled)
            .map(|r| fmt(metrics::auroc(&normal, &r.slot(j, target).0)))
            .collect();
        let (all_scores, all_flags) = all.slot(j, target);
        let pooled_auroc = metrics::auroc(&normal, &all_scores);
        println!(
            "{:<24} {}  recall {}  FPR {}",
            name,
            aurocs.join(" "),
            fmt(metrics::rate(&all_flags)),
            fmt(metrics::rate(&normal_flags)),
        );
        if let Some(a) = pooled_auroc {
            if best.as_ref().is_none_or(|(_, b)| a > *b) {
                best = Some((name, a));
            }
        }
    }
    if let Some((name, a)) = best {
        println!(
            "best single (site, detector) on {}: {name}, AUROC {a:.4}; the monitor: {}",
            all.name,
            fmt(metrics::auroc(&normal_row.scores, &all.scores))
        );
    }
}
